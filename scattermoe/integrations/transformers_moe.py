"""Run the MoE blocks of Hugging Face ``transformers`` models on scattermoe (transformers >= 5).

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D hidden size,
F expert intermediate size.

What is replaced is the expert computation only. Each block keeps calling its own router
module, so routing semantics (softmax before or after top-k, renormalised top-k weights,
jitter only in training, router-logit capture for aux losses) are the model's, and so is
everything around the experts (Qwen2-MoE's shared expert, JetMoE's output bias, GPT-OSS's
clamped SwiGLU via the module's own ``_apply_gate``).

Parameters are reused as they are, never copied: transformers 5 stores fused experts as
3-D parameters, ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F] (the nn.Linear
``[E, out, in]`` layout of ``scattermoe.ParallelExperts``), or already ``[E, in, out]``
where the experts class says ``is_transposed`` (GPT-OSS); scattermoe takes ``[E, in, out]``
with any strides, so a ``permute`` view is all it needs. The modules keep their class's
parameters and names (the replacement is a subclass), so ``state_dict`` keys do not change
and a checkpoint saved after patching loads into an unpatched model.

Two ways in (Liger-Kernel's split):
- ``apply_scattermoe(model)``: swap, in place, the class of every supported MoE block of a loaded model;
- ``apply_scattermoe_to_<family>()``: patch the family's modeling module before the model is
  built or loaded, so ``from_pretrained`` builds scattermoe blocks directly.
``revert_scattermoe_patches()`` undoes the module patches (models already built keep theirs).
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from ..layers import _token_rows
from ..ops import glu_moe, parallel_linear
from ..routing import flatten_sort_count

# ----------------------------------------------------------------------------- expert computations


def _is_silu(act) -> bool:
    """True for SiLU activations (nn.SiLU, transformers' SiLUActivation, F.silu): the fused GLU path."""
    return act is nn.functional.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


def _as_in_out(w: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """[E, in, out] view of an expert weight: transformers stores [E, out, in] unless ``is_transposed``."""
    return w if is_transposed else w.permute(0, 2, 1)


def _fused_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """forward of a transformers 5 fused experts class (``@use_experts_implementation``) on scattermoe.

    hidden_states [T, D]; top_k_index [T, K] int; top_k_weights [T, K] (the router's, any float dtype).
    Reads the layout flags that the decorator sets: ``has_gate``, ``has_bias``, ``is_transposed``,
    ``is_concatenated``. Returns [T, D] in hidden_states' dtype.
    """
    if getattr(self, "_is_expert_parallel", False):
        # Expert parallelism sends sentinel ids >= E: the eager loop of the class on the interface runs
        # (``__wrapped__``: the forward under transformers' dispatcher). Not type(self)'s forward: a subclass's
        # own forward may be what called the dispatcher (ErgoExperts).
        cls = next((c for c in type(self).__mro__ if _is_interface_class(c)), type(self))
        eager = getattr(cls.forward, "__wrapped__", cls.forward)
        return eager(self, hidden_states, top_k_index, top_k_weights)
    hidden_states = _token_rows(hidden_states)  # the eager loop takes any strides; the ops read row-major rows
    num_experts = self.num_experts if hasattr(self, "num_experts") else self.down_proj.size(0)
    k = top_k_index.size(-1)
    routing = flatten_sort_count(top_k_index, num_experts)
    transposed = getattr(self, "is_transposed", False)
    has_bias = getattr(self, "has_bias", False)
    has_gate = getattr(self, "has_gate", True)
    w_in = _as_in_out(self.gate_up_proj if has_gate else self.up_proj, transposed)  # [E, D, 2F] or [E, D, F]
    w_out = _as_in_out(self.down_proj, transposed)  # [E, F, D]
    b_in = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    b_out = self.down_proj_bias if has_bias else None

    # The default gate is act(first half) * second half; a class may override it (GPT-OSS: interleaved, clamped).
    default_gate = getattr(type(self)._apply_gate, "__name__", "") == "_default_apply_gate"
    post_norm = getattr(self, "has_post_expert_norm", False)  # a norm on each expert's output row (MuseSpark)
    if (has_gate and getattr(self, "is_concatenated", True) and default_gate and _is_silu(self.act_fn)
            and not post_norm):
        # One op: SiLU GLU fused into the first GEMM's epilogue, G recomputed in backward.
        y = glu_moe(hidden_states, w_in, w_out, top_k_weights, routing, b_in, b_out, activate_first=True)
    else:
        h = parallel_linear(hidden_states, w_in, k, *routing, expert_biases=b_in, grouped_out=True)  # [N, *] grouped
        h = self._apply_gate(h) if has_gate else self.act_fn(h)
        if post_norm:
            # The rows ungated, in slot order t*K + j; normed, then gated and summed over K as transformers does.
            rows = parallel_linear(h, w_out, 1, *routing, expert_biases=b_out, grouped_in=True)
            rows = self.post_expert_norm(rows)
            rows = rows.view(hidden_states.size(0), k, rows.size(-1))  # (not -1: T may be 0)
            y = (rows * top_k_weights.unsqueeze(-1)).sum(dim=1)
        else:
            y = parallel_linear(h, w_out, 1, *routing, expert_biases=b_out, gates=top_k_weights, grouped_in=True)
    return y.to(hidden_states.dtype)


def _jetmoe_routing(router: nn.Module, x: torch.Tensor):
    """Call JetMoE's own router and turn its outputs into scattermoe routing, without re-sorting.

    JetMoeTopKGating returns (index_sorted_experts [N]: slots in expert order, batch_index,
    batch_gates [N]: gates in that order, expert_size: list of E counts, logits [T, E]).
    Returns ((sorted_expert_idxs, sorted_scattered_idxs, expert_offsets), gates [T, K], logits).
    """
    index_sorted_experts, _, batch_gates, expert_size, logits = router(x)
    counts = torch.as_tensor(expert_size, device=x.device, dtype=torch.long)
    sorted_expert_idxs = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    # Gates back to slot order t*K + j; differentiable in batch_gates (so the router learns).
    gates = batch_gates.new_zeros(batch_gates.shape).scatter(0, index_sorted_experts, batch_gates)
    routing = (sorted_expert_idxs, index_sorted_experts.contiguous(), counts.cumsum(0))
    return routing, gates.view(x.size(0), router.top_k), logits


def _jetmoe_moe_forward(self, layer_input: torch.Tensor) -> torch.Tensor:
    """JetMoeMoE.forward on scattermoe: sum_j g_j W2_e (act(a) * b), [a | b] = W1_e x, plus the shared bias."""
    bsz, length, _ = layer_input.shape
    x = _token_rows(layer_input)
    routing, gates, _ = _jetmoe_routing(self.router, x)
    w_in = self.input_linear.weight.permute(0, 2, 1)  # [E, D, 2F] view of the [E, 2F, D] parameter
    w_out = self.output_linear.weight.permute(0, 2, 1)  # [E, F, D]
    if _is_silu(self.activation):
        y = glu_moe(x, w_in, w_out, gates, routing, activate_first=True)
    else:
        a, b = parallel_linear(x, w_in, self.router.top_k, *routing, grouped_out=True).chunk(2, dim=-1)
        y = parallel_linear(self.activation(a) * b, w_out, 1, *routing, gates=gates, grouped_in=True)
    return y.view(bsz, length, self.input_size) + self.bias


def _jetmoe_moa_map(self, layer_input: torch.Tensor):
    """JetMoeMoA.map on scattermoe: per-expert query projection, back in slot order [B, L, K, H*Dh]."""
    bsz, length, _ = layer_input.shape
    x = _token_rows(layer_input)
    routing, gates, router_logits = _jetmoe_routing(self.router, x)
    q = parallel_linear(x, self.input_linear.weight.permute(0, 2, 1), self.top_k, *routing)  # [T*K, H*Dh]
    return q.view(bsz, length, self.top_k, -1), router_logits, (routing, gates)


def _jetmoe_moa_reduce(self, layer_input: torch.Tensor, topo_info) -> torch.Tensor:
    """JetMoeMoA.reduce on scattermoe: per-expert output projection, gated sum over the K slots, plus bias."""
    bsz, length = layer_input.shape[:2]
    routing, gates = topo_info
    o = _token_rows(layer_input)  # [T*K, H*Dh], slot order
    y = parallel_linear(o, self.output_linear.weight.permute(0, 2, 1), 1, *routing, gates=gates)
    return y.view(bsz, length, self.input_size) + self.bias


# ----------------------------------------------------------------------------- families

_EXPERTS = {"forward": _fused_experts_forward}
_JETMOE_MODULE = "transformers.models.jetmoe.modeling_jetmoe"
_JETMOE_CLASSES = {
    "JetMoeMoE": {"forward": _jetmoe_moe_forward},
    "JetMoeMoA": {"map": _jetmoe_moa_map, "reduce": _jetmoe_moa_reduce},
}

# Every experts class of transformers 5's fused-experts interface (``@use_experts_implementation``) is patched,
# whatever its family: the interface fixes what such a class computes (its router stays the model's own), which is
# what transformers' own grouped_mm and batched_mm experts rely on too. JetMoE's blocks predate the interface and
# have their own methods above. The families below are the ones tested here, each against its unpatched model
# (tests/test_integrations_transformers.py); each has an ``apply_scattermoe_to_<family>()`` below, and any other
# family with fused experts gets one on first use.
SUPPORTED_FAMILIES: Tuple[str, ...] = (
    "jetmoe", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "granitemoe", "gpt_oss", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "qwen3_next", "phimoe", "minimax", "minimax_m2",
    "ernie4_5_moe", "hunyuan_v1_moe", "flex_olmo", "granitemoeshared", "afmoe", "cohere2_moe", "deepseek_v4", "flint",
    "granitemoe_swa", "hy_v3", "kolibri1", "laguna", "mellum", "mimo_v2_flash", "qwen3_5_moe", "zaya", "gemma4",
    "nemotron_h", "granitemoehybrid", "lfm2_moe", "glm_moe_dsa", "deepseek_v32", "jamba", "kimi_linear", "aria",
    "axk1", "axk2", "bailing_hybrid", "beam", "hy_v4", "dots3_note", "inkling", "inkling2", "minimax_m3_vl",
    "qwen4_exp", "qwen3_vl_moe", "glm4v_moe", "glm5_next", "ernie4_5_vl_moe", "mistral4",
    "mistral_large4", "deepseek_ocr2", "unlimited_ocr", "qwen3_omni_moe", "openai_privacy_filter",
    # New in transformers 5.25 (tested with it; the tests skip them under older versions, which lack them or, for
    # longcat_flash and step3p7, have them off the fused-experts interface):
    "hy_v4_vl", "inkling2_loop", "kolibri1_1", "lara_mini", "longcat_flash", "minicpm5_moe", "step3p7",
)

# What reaches experts that a subclass's own forward wraps (patching would discard that forward).
_RUN_INSIDE_ITS_FORWARD = ('register_experts_implementation() and experts_implementation="scattermoe" run the experts '
                           "on scattermoe inside it")
_subclasses: Dict[type, type] = {}  # original class -> its scattermoe subclass
_module_patches: Dict[Tuple[str, str], type] = {}  # (modeling module, class name) -> original class
_interface: List[Tuple[object, object]] = []  # [(code of the interface's forward, ALL_EXPERTS_FUNCTIONS)], once found


def _interface_forward_code() -> Optional[object]:
    """The code object of the forward that ``@use_experts_implementation`` gives every class it decorates (one code
    object, although functools.wraps gives each function its class's names), found by decorating a throwaway class.
    None where the installed transformers has no such interface."""
    if not _interface:
        try:
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
        except ImportError:
            return None

        class _Probe(nn.Module):
            def forward(self, hidden_states, top_k_index, top_k_weights):
                raise NotImplementedError

        _interface.append((use_experts_implementation(_Probe).forward.__code__, ALL_EXPERTS_FUNCTIONS))
    return _interface[0][0]


def _is_interface_class(cls: type) -> bool:
    """True for a class that ``@use_experts_implementation`` decorated itself (not one inheriting its forward), on the
    plain experts interface: the same decorator puts quantized experts (transformers' FP8Experts, float8 weights with
    block scales) on interfaces of their own, which scattermoe's ops cannot run."""
    code, forward = _interface_forward_code(), cls.__dict__.get("forward")
    if code is None or getattr(forward, "__code__", None) is not code:
        return False
    cells = dict(zip(code.co_freevars, forward.__closure__ or ()))
    return "experts_interface" not in cells or cells["experts_interface"].cell_contents is _interface[0][1]


def _transformers_version() -> str:
    return getattr(sys.modules.get("transformers"), "__version__", "(not installed)")


def _modeling_module_name(family: str) -> str:
    """transformers' modeling module of a model_type (a few model_types live in another's module: qwen3_vl_moe_text)."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        name = model_type_to_module_name(family)
    except ImportError:
        name = family
    return f"transformers.models.{name}.modeling_{name}"


def _family_classes(family: str) -> List[Tuple[object, str, type, Dict[str, Callable]]]:
    """[(modeling module, class name, original class, methods)] of a family: JetMoE's MoE and MoA blocks, or the
    fused-experts classes its modeling module defines. A ValueError naming the family when the installed transformers
    lacks it or it has no MoE block scattermoe can run."""
    return _scan_family(family)[0]


def _scan_family(family: str) -> Tuple[List[Tuple[object, str, type, Dict[str, Callable]]], List[str]]:
    """_family_classes, and the names of the module's subclasses of them with their own forward (not among them)."""
    if not isinstance(family, str) or not family.isidentifier():
        raise _unsupported(f"unknown family {family!r}")
    module_name = _modeling_module_name(family)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"scattermoe: family {family!r} needs {module_name}, which transformers "
                         f"{_transformers_version()} lacks ({exc})") from None
    own = []
    if family == "jetmoe":
        try:
            found = [(name, getattr(module, name), methods) for name, methods in _JETMOE_CLASSES.items()]
        except AttributeError as exc:
            raise ValueError(f"scattermoe: family 'jetmoe' needs {', '.join(_JETMOE_CLASSES)} in {module_name} "
                             f"({exc})") from None
    else:
        classes = {name: getattr(obj, "_scattermoe_original", None) or obj for name, obj in vars(module).items()
                   if isinstance(obj, type)}
        interface = [cls for cls in classes.values() if _is_interface_class(cls)]
        if not interface:
            raise _unsupported(f"family {family!r}: {module_name} of transformers {_transformers_version()} has no "
                               f"experts class on the fused-experts interface")
        # The module's subclasses of those were built on the original classes: rebinding the originals alone would
        # leave them unpatched, so they are patched too, unless they run their own forward (transformers' ergo).
        found = []
        for name, cls in classes.items():
            if issubclass(cls, tuple(interface)):
                own_forward = cls.forward is not next(c for c in cls.__mro__ if c in interface).forward
                if own_forward:
                    own.append(name)
                else:
                    found.append((name, cls, _EXPERTS))
    return [(module, name, getattr(cls, "_scattermoe_original", None) or cls, methods)
            for name, cls, methods in found], own


def _scattermoe_class(original: type, methods: Dict[str, Callable]) -> type:
    """The subclass of ``original`` whose listed methods run on scattermoe (built once per class)."""
    if getattr(original, "_scattermoe_original", None) is not None:  # already ours
        return original
    if original not in _subclasses:
        name = f"ScatterMoE{original.__name__}"
        attrs = dict(methods, _scattermoe_original=original, __module__=__name__, __qualname__=name,
                     __doc__=f"{original.__name__} with its expert computation on scattermoe.")
        _subclasses[original] = type(name, (original,), attrs)
        # A module attribute, so that pickle finds it by name (a name already taken, by a same-named subclass
        # elsewhere, is left alone: that class then does not pickle, rather than unpickle as the other).
        globals().setdefault(name, _subclasses[original])
    return _subclasses[original]


def _patched_class(module: nn.Module, methods: Dict[str, Callable]) -> type:
    """The class to give ``module``: ScatterMoE<its class>; for a module torch.nn.utils.parametrize has given a
    class of its own (Parametrized<X>, holding the parametrized weights' properties), that class rebuilt over
    ScatterMoE<X>, so that removing the parametrizations (which deletes the properties from the module's class and
    then goes back to its first base) leaves ScatterMoE<X>, still patched."""
    cls = type(module)
    if not parametrize.is_parametrized(module):
        return _scattermoe_class(cls, methods)
    base = _scattermoe_class(cls.__bases__[0], methods)
    attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{base.__name__}", (base,), attrs)


def _families_named_by(class_name: str) -> List[str]:
    """model_types whose config class name, less its "Config", begins ``class_name`` (Qwen3_5MoeExperts: qwen3_5_moe),
    longest first: where to look for a transformers class known only by name."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return []
    prefixes = [(config[: -len("Config")], family) for family, config in CONFIG_MAPPING_NAMES.items()
                if config.endswith("Config") and class_name.startswith(config[: -len("Config")])]
    return [family for _, family in sorted(prefixes, key=lambda p: -len(p[0]))]


def __getattr__(name: str):
    """Built on first use: ``ScatterMoE<Class>`` of a family's MoE block, which is how pickle (``torch.save(model)``,
    process spawning) finds a patched block's class in a process that has not patched anything yet; and
    ``apply_scattermoe_to_<family>`` for a family with fused experts that has no patcher below."""
    if name.startswith("ScatterMoE"):
        wanted = name[len("ScatterMoE"):]
        families = ["jetmoe"] if wanted in _JETMOE_CLASSES else _families_named_by(wanted)
        for family in families:
            try:
                classes = _family_classes(family)
            except ValueError:
                continue
            for _, found_name, original, methods in classes:
                if found_name == wanted:
                    return _scattermoe_class(original, methods)
    elif name.startswith("apply_scattermoe_to_"):
        family = name[len("apply_scattermoe_to_"):]
        try:
            _family_classes(family)
        except ValueError as exc:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}: {exc}") from None
        return _family_patcher(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unsupported(what: str) -> ValueError:
    return ValueError(f"scattermoe: {what}; supported: JetMoE's MoE and MoA blocks, and the experts of every model on "
                      f"transformers' fused-experts interface (@use_experts_implementation); tested architectures "
                      f"(transformers model_type): {', '.join(SUPPORTED_FAMILIES)}")


def apply_scattermoe(model: nn.Module, families: Optional[List[str]] = None) -> nn.Module:
    """Run every supported MoE block of a loaded ``transformers`` model on scattermoe, in place.

    Each block's class is swapped for a scattermoe subclass: parameters (and their names, so the
    ``state_dict``) stay as they are, no weight is copied, the router is the model's own.
    Supported blocks: every experts class of transformers' fused-experts interface, whatever its family, and
    JetMoE's MoE and MoA blocks. ``families``: restrict to the blocks of these model types (one the installed
    transformers lacks, or without such blocks, raises).
    Returns the model. Raises ValueError, listing the tested architectures, when the model
    holds no supported block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a loaded transformers model), got {type(model).__name__}")
    if isinstance(families, str):  # one family by name, not its letters
        families = [families]
    if families is not None:
        try:
            names = list(families)
        except TypeError:
            names = None
        if names is None or not all(isinstance(f, str) for f in names):
            raise TypeError(f"families: expected model_type names (a str or a list of them), got {families!r}")
        if not names:
            raise ValueError("families: an empty list patches nothing; pass None (the default) for every supported "
                             "block")
        families = names
    targets: Dict[type, Dict[str, Callable]] = {}  # JetMoE's classes, or those of the families named
    generic = families is None  # then any class on the fused-experts interface is a target too
    if families is not None:
        for family in families:
            targets.update({original: methods for _, _, original, methods in _family_classes(family)})
    elif _JETMOE_MODULE in sys.modules:  # a loaded JetMoE model's module is imported; no other is imported here
        try:
            targets.update({original: methods for _, _, original, methods in _family_classes("jetmoe")})
        except ValueError:
            pass  # a transformers without JetMoE's own blocks (on the interface, say): not targets here

    def target(cls: type) -> Tuple[Optional[type], Dict[str, Callable]]:
        """The supported class that ``cls`` is or derives from, and the methods that scattermoe replaces."""
        base = next((t for t in targets if issubclass(cls, t)), None)
        if base is not None:
            return base, targets[base]
        return next(((c, _EXPERTS) for c in cls.__mro__ if generic and _is_interface_class(c)), (None, {}))

    swapped, kept = 0, []
    for path, module in model.named_modules():
        cls = type(module)
        original = getattr(cls, "_scattermoe_original", None)
        if original is not None and target(original)[0] is not None:
            swapped += 1  # already patched (e.g. built after apply_scattermoe_to_<family>())
            continue
        # The supported class, or a subclass of it that leaves the replaced methods alone (e.g. the class
        # torch.nn.utils.parametrize gives a module whose expert weights carry a LoRA or weight norm).
        base, methods = target(cls)
        if base is None:
            continue
        if any(getattr(cls, m) is not getattr(base, m) for m in methods):  # its own code: left to run it
            kept.append(f"{path} ({cls.__name__} overrides {base.__name__}.{'/'.join(methods)})")
            continue
        # accelerate's hooks (offloading, device maps) set an instance ``forward`` that calls ``_old_forward``,
        # bound to the class's forward when hooked: rebound to ours, else the class swap would never run.
        shadowed = [m for m in methods if m in vars(module)]
        hooked = shadowed == ["forward"] and "_old_forward" in vars(module)
        if shadowed and not hooked:
            kept.append(f"{path} (its instance attribute {'/'.join(shadowed)} would bypass the patch)")
            continue
        module.__class__ = _patched_class(module, methods)
        if shadowed:
            module._old_forward = types.MethodType(module.__class__.forward, module)
        swapped += 1
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if swapped == 0 and kept:
        raise ValueError(f"scattermoe: the MoE blocks of {type(model).__name__} (model_type={model_type!r}) are "
                         f"subclasses with their own forward, which patching would discard: {'; '.join(kept[:3])}"
                         + ("; ..." if len(kept) > 3 else "")
                         + f"; where such a forward calls the fused-experts interface's, {_RUN_INSIDE_ITS_FORWARD}")
    if swapped == 0 and families is not None and (model_type == "jetmoe" or any(
            _is_interface_class(c) for m in model.modules() for c in type(m).__mro__)):  # blocks of other families
        raise ValueError(f"scattermoe: no MoE block of the model types {families} found in {type(model).__name__} "
                         f"(model_type={model_type!r}); apply_scattermoe(model) without families= patches every "
                         "supported block")
    if swapped == 0:
        raise _unsupported(f"no supported MoE block found in {type(model).__name__} (model_type={model_type!r})")
    if kept:
        warnings.warn(f"scattermoe: {len(kept)} MoE blocks keep their own code (their class overrides what "
                      f"scattermoe replaces, or an instance attribute shadows it): {'; '.join(kept[:3])}"
                      + ("; ..." if len(kept) > 3 else ""))
    return model


def register_experts_implementation(name: str = "scattermoe") -> None:
    """Register scattermoe in transformers' experts interface, for the fused-experts families.

    Afterwards ``from_pretrained(..., experts_implementation="scattermoe")`` (or
    ``model.set_experts_implementation("scattermoe")``) runs those experts on scattermoe with no
    patching at all. JetMoE's blocks are not experts classes of that interface: use
    ``apply_scattermoe`` or ``apply_scattermoe_to_jetmoe`` there.
    """
    if not isinstance(name, str) or not name:  # another key could never be selected by experts_implementation=
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, _fused_experts_forward)


def _apply_to_family(family: str, model: Optional[nn.Module]) -> None:
    classes, own = _scan_family(family)
    if own:
        raise ValueError(f"scattermoe: family {family!r}: {', '.join(own)} has its own forward, which patching "
                         f"would discard; {_RUN_INSIDE_ITS_FORWARD}")
    if model is not None:  # first: a model of another family raises before transformers is patched
        apply_scattermoe(model, families=[family])
    for module, name, original, methods in classes:
        _module_patches.setdefault((module.__name__, name), original)
        setattr(module, name, _scattermoe_class(original, methods))


def revert_scattermoe_patches() -> None:
    """Undo every ``apply_scattermoe_to_<family>()`` module patch (models already built keep scattermoe)."""
    for (module_name, name), original in list(_module_patches.items()):
        setattr(importlib.import_module(module_name), name, original)
        del _module_patches[(module_name, name)]


def _family_patcher(family: str) -> Callable[[Optional[nn.Module]], None]:
    def patch(model: Optional[nn.Module] = None) -> None:
        _apply_to_family(family, model)

    patch.__name__ = f"apply_scattermoe_to_{family}"
    patch.__doc__ = (f"Patch transformers' {family} modeling module so models built or loaded afterwards run their "
                     f"MoE blocks on scattermoe; with ``model``, also patch that loaded model in place.")
    return patch


apply_scattermoe_to_mixtral = _family_patcher("mixtral")
apply_scattermoe_to_qwen3_moe = _family_patcher("qwen3_moe")
apply_scattermoe_to_olmoe = _family_patcher("olmoe")
apply_scattermoe_to_qwen2_moe = _family_patcher("qwen2_moe")
apply_scattermoe_to_granitemoe = _family_patcher("granitemoe")
apply_scattermoe_to_gpt_oss = _family_patcher("gpt_oss")
apply_scattermoe_to_jetmoe = _family_patcher("jetmoe")
apply_scattermoe_to_deepseek_v2 = _family_patcher("deepseek_v2")
apply_scattermoe_to_deepseek_v3 = _family_patcher("deepseek_v3")
apply_scattermoe_to_glm4_moe = _family_patcher("glm4_moe")
apply_scattermoe_to_glm4_moe_lite = _family_patcher("glm4_moe_lite")
apply_scattermoe_to_dots1 = _family_patcher("dots1")
apply_scattermoe_to_exaone_moe = _family_patcher("exaone_moe")
apply_scattermoe_to_qwen3_next = _family_patcher("qwen3_next")
apply_scattermoe_to_phimoe = _family_patcher("phimoe")
apply_scattermoe_to_minimax = _family_patcher("minimax")
apply_scattermoe_to_minimax_m2 = _family_patcher("minimax_m2")
apply_scattermoe_to_ernie4_5_moe = _family_patcher("ernie4_5_moe")
apply_scattermoe_to_hunyuan_v1_moe = _family_patcher("hunyuan_v1_moe")
apply_scattermoe_to_flex_olmo = _family_patcher("flex_olmo")
apply_scattermoe_to_granitemoeshared = _family_patcher("granitemoeshared")
apply_scattermoe_to_afmoe = _family_patcher("afmoe")
apply_scattermoe_to_cohere2_moe = _family_patcher("cohere2_moe")
apply_scattermoe_to_deepseek_v4 = _family_patcher("deepseek_v4")
apply_scattermoe_to_flint = _family_patcher("flint")
apply_scattermoe_to_granitemoe_swa = _family_patcher("granitemoe_swa")
apply_scattermoe_to_hy_v3 = _family_patcher("hy_v3")
apply_scattermoe_to_kolibri1 = _family_patcher("kolibri1")
apply_scattermoe_to_laguna = _family_patcher("laguna")
apply_scattermoe_to_mellum = _family_patcher("mellum")
apply_scattermoe_to_mimo_v2_flash = _family_patcher("mimo_v2_flash")
apply_scattermoe_to_qwen3_5_moe = _family_patcher("qwen3_5_moe")
apply_scattermoe_to_zaya = _family_patcher("zaya")
apply_scattermoe_to_gemma4 = _family_patcher("gemma4")
apply_scattermoe_to_nemotron_h = _family_patcher("nemotron_h")
apply_scattermoe_to_granitemoehybrid = _family_patcher("granitemoehybrid")
apply_scattermoe_to_lfm2_moe = _family_patcher("lfm2_moe")
apply_scattermoe_to_glm_moe_dsa = _family_patcher("glm_moe_dsa")
apply_scattermoe_to_deepseek_v32 = _family_patcher("deepseek_v32")
apply_scattermoe_to_jamba = _family_patcher("jamba")
apply_scattermoe_to_kimi_linear = _family_patcher("kimi_linear")
apply_scattermoe_to_aria = _family_patcher("aria")
apply_scattermoe_to_axk1 = _family_patcher("axk1")
apply_scattermoe_to_axk2 = _family_patcher("axk2")
apply_scattermoe_to_bailing_hybrid = _family_patcher("bailing_hybrid")
apply_scattermoe_to_beam = _family_patcher("beam")
apply_scattermoe_to_hy_v4 = _family_patcher("hy_v4")
apply_scattermoe_to_dots3_note = _family_patcher("dots3_note")
apply_scattermoe_to_inkling = _family_patcher("inkling")
apply_scattermoe_to_inkling2 = _family_patcher("inkling2")
apply_scattermoe_to_minimax_m3_vl = _family_patcher("minimax_m3_vl")
apply_scattermoe_to_qwen4_exp = _family_patcher("qwen4_exp")
apply_scattermoe_to_qwen3_vl_moe = _family_patcher("qwen3_vl_moe")
apply_scattermoe_to_glm4v_moe = _family_patcher("glm4v_moe")
apply_scattermoe_to_glm5_next = _family_patcher("glm5_next")
apply_scattermoe_to_ernie4_5_vl_moe = _family_patcher("ernie4_5_vl_moe")
apply_scattermoe_to_mistral4 = _family_patcher("mistral4")
apply_scattermoe_to_mistral_large4 = _family_patcher("mistral_large4")
apply_scattermoe_to_deepseek_ocr2 = _family_patcher("deepseek_ocr2")
apply_scattermoe_to_unlimited_ocr = _family_patcher("unlimited_ocr")
apply_scattermoe_to_qwen3_omni_moe = _family_patcher("qwen3_omni_moe")
apply_scattermoe_to_openai_privacy_filter = _family_patcher("openai_privacy_filter")
apply_scattermoe_to_hy_v4_vl = _family_patcher("hy_v4_vl")
apply_scattermoe_to_inkling2_loop = _family_patcher("inkling2_loop")
apply_scattermoe_to_kolibri1_1 = _family_patcher("kolibri1_1")
apply_scattermoe_to_lara_mini = _family_patcher("lara_mini")
apply_scattermoe_to_longcat_flash = _family_patcher("longcat_flash")
apply_scattermoe_to_minicpm5_moe = _family_patcher("minicpm5_moe")
apply_scattermoe_to_step3p7 = _family_patcher("step3p7")
