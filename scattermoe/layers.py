"""Drop-in layers: ParallelExperts, MLP, GLUMLP and MoA (mixture of attention heads).

Legend: T tokens, K experts per token, E experts, D model dim, F expert hidden dim,
H heads per expert, Dh head dim. Weights are stored ``[E, out, in]`` (the
nn.Linear convention and the JetMoE checkpoint layout).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module_globals  # nn.Module's global hook registries

from ._validate import (_FLOAT_DTYPES, _INDEX_DTYPES, check_dtype_like_x, check_features, check_not_meta,
                        check_tensor, flag, positive_int)
from .kernels._compat import accepts_padded_block_idxs
from .ops import glu_moe, parallel_linear
from .routing import flatten_sort_count


class ParallelExperts(nn.Module):
    """E independent linear maps; ``weight`` [E, output_size, input_size], ``bias`` [E, output_size] or None."""

    def __init__(self, num_experts: int, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        num_experts = positive_int("num_experts", num_experts)
        input_size, output_size = positive_int("input_size", input_size), positive_int("output_size", output_size)
        bias = False if bias is None else flag("bias", bias)  # None: no bias, as nn.Linear reads it
        self.weight = nn.Parameter(torch.empty(num_experts, output_size, input_size))
        self.bias = nn.Parameter(torch.empty(num_experts, output_size)) if bias else None
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, input_size={self.input_size}, "
                f"output_size={self.output_size}, bias={self.bias is not None}")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @accepts_padded_block_idxs(5, ("gates", "grouped_in", "grouped_out"))  # self counts
    def forward(self, inputs: torch.Tensor, k: int, sorted_expert_idxs: torch.Tensor,
                sorted_scattered_idxs: torch.Tensor, expert_offsets: torch.Tensor,
                gates: Optional[torch.Tensor] = None, grouped_in: bool = False,
                grouped_out: bool = False) -> torch.Tensor:
        """See ``scattermoe.parallel_linear``; the weight is passed as a [E, in, out] view, not copied."""
        # By this method's names (parallel_linear's own checks would say "x" and "expert_weights").
        check_tensor("inputs", inputs, dim=2, dtypes=_FLOAT_DTYPES)
        if inputs.size(1) != self.input_size:
            raise ValueError(f"inputs: expected {self.input_size} features (the layer's input_size), got shape "
                             f"{tuple(inputs.shape)}")
        check_dtype_like_x("weight", self.weight, inputs, "inputs")
        return parallel_linear(inputs, self.weight.permute(0, 2, 1), k, sorted_expert_idxs,
                               sorted_scattered_idxs, expert_offsets, expert_biases=self.bias,
                               gates=gates, grouped_in=grouped_in, grouped_out=grouped_out)


def _check_routing(x: torch.Tensor, expert_p: torch.Tensor, expert_idxs: torch.Tensor, top_k: int,
                   input_size: int, weight_name: str, weight: torch.Tensor) -> None:
    """The layers' arguments, told by the names the caller passed (the ops below call them otherwise), and the
    first projection's weight by its name in the layer."""
    check_features("x", x)
    if x.size(-1) != input_size:
        raise ValueError(f"x: expected {input_size} features (the layer's input_size) in its last dimension, got "
                         f"shape {tuple(x.shape)}")
    check_dtype_like_x(weight_name, weight, x)
    lead = tuple(x.shape[:-1])
    tokens = math.prod(lead)
    # x's leading dims, or one token dim (the original ScatterMoE's layers took x [B, L, D] with routing
    # [B*L, K], as a router over the flattened tokens makes it, and any shape of expert_idxs: flat [T*K] too).
    shapes = {"expert_p": (lead + (top_k,), (tokens, top_k)),
              "expert_idxs": (lead + (top_k,), (tokens, top_k), (tokens * top_k,))}
    for name, t, dtypes in (("expert_p", expert_p, _FLOAT_DTYPES), ("expert_idxs", expert_idxs, _INDEX_DTYPES)):
        check_tensor(name, t, dtypes=dtypes)
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (x's device), got one on {t.device}")
        if tuple(t.shape) not in shapes[name]:
            accepted = " or ".join(map(str, dict.fromkeys(shapes[name])))
            raise ValueError(f"{name}: expected shape {accepted} (x's leading dims, top_k; or one token dim), "
                             f"got {tuple(t.shape)}")


def _runs_hooks(module: nn.Module) -> bool:
    """Whether calling module runs a hook: its own (forward, pre-forward, backward, pre-backward) or a global one
    (nn.Module's own test for its slow path)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_globals._global_forward_hooks
                or _module_globals._global_forward_pre_hooks or _module_globals._global_backward_hooks
                or _module_globals._global_backward_pre_hooks)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as rows [T, D] the kernels read (unit stride along D: a transposed x is copied, as a loop's
    matmul would; the ops themselves refuse it)."""
    rows = x.reshape(-1, x.size(-1))
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _stack_linears(name: str, linears: Sequence, shape: Optional[Tuple[int, int]] = None
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights [E, out, in] and biases [E, out] (None when none has one) of E nn.Linear (or weight
    tensors [out, in], or one [E, out, in]), copied; a ValueError naming ``name`` and the expert when they
    do not stack."""
    if isinstance(linears, torch.Tensor) and linears.dim() == 3:
        linears = linears.unbind(0)
    if isinstance(linears, (nn.Module, torch.Tensor)) and not isinstance(linears, nn.ModuleList):
        raise TypeError(f"{name}: expected a sequence with one nn.Linear (or weight tensor [out, in]) per "
                        f"expert, got a single {type(linears).__name__}"
                        + (f" of shape {tuple(linears.shape)}" if isinstance(linears, torch.Tensor) else ""))
    linears = list(linears)
    if not linears:
        raise ValueError(f"{name}: expected one nn.Linear per expert, got none")
    weights, biases = [], []
    for e, lin in enumerate(linears):
        if isinstance(lin, nn.Linear):
            if type(lin).forward is not nn.Linear.forward:  # only the weights are copied: that forward would be lost
                raise TypeError(f"{name}[{e}]: {type(lin).__name__} overrides nn.Linear.forward; from_linears copies "
                                "only the weight and bias, so what that forward adds would be silently lost")
            w, b = lin.weight, lin.bias
        elif isinstance(lin, torch.Tensor):
            w, b = lin, None
        else:
            raise TypeError(f"{name}[{e}]: expected an nn.Linear or a weight tensor [out, in], "
                            f"got {type(lin).__name__}")
        if w.dim() != 2:
            raise ValueError(f"{name}[{e}]: expected a weight [out, in], got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"{name}[{e}]: expected a floating-point weight, got {str(w.dtype).replace('torch.', '')}")
        first = weights[0] if weights else w
        want = shape if shape is not None else tuple(first.shape)
        if tuple(w.shape) != want:
            raise ValueError(f"{name}[{e}]: expected a weight of shape {want} [out, in], got {tuple(w.shape)}")
        if (w.dtype, w.device) != (first.dtype, first.device):
            raise ValueError(f"{name}[{e}]: weight is {w.dtype} on {w.device}, expert 0's is {first.dtype} on "
                             f"{first.device}: the experts must share one dtype and device")
        weights.append(w)
        biases.append(b)
    has_bias = [b is not None for b in biases]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"{name}: experts {[e for e, h in enumerate(has_bias) if h]} have a bias and the others "
                         "do not: all or none must")
    with torch.no_grad():
        weight = torch.stack([w.detach() for w in weights])
        bias = torch.stack([b.detach().to(weight.dtype) for b in biases]) if all(has_bias) else None
    # Frozen experts stay frozen (a router-only fine-tune must not start training them): a stack is trainable
    # when any expert's tensor was.
    weight.requires_grad_(any(w.requires_grad for w in weights))
    if bias is not None:
        bias.requires_grad_(any(b.requires_grad for b in biases))
    return weight, bias


def _load_experts(target: "ParallelExperts", weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Put weight (and bias) into target's parameters, which take their dtype, device and requires_grad."""
    target.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    target.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad) if bias is not None else None


def _activation_in_bias_slot(bias, activation):
    """The 2024 signature, (input_size, hidden_size, num_experts, top_k, activation), had no bias: its fifth
    positional argument, a callable where ``bias`` now is, is the activation."""
    if activation is None and callable(bias):
        return False, bias
    return bias, activation


class MLP(nn.Module):
    """Mixture of plain MLP experts: y = sum_j p_j * W2_e act(W1_e x)."""

    _up_width = 1  # W1's output width per hidden unit (GLUMLP: 2, both halves)

    def __init__(self, input_size: int, hidden_size: int, num_experts: int, top_k: int,
                 bias: bool = False, activation: Optional[Callable] = None) -> None:
        super().__init__()
        bias, activation = _activation_in_bias_slot(bias, activation)
        num_experts = positive_int("num_experts", num_experts)
        input_size, hidden_size = positive_int("input_size", input_size), positive_int("hidden_size", hidden_size)
        top_k = positive_int("top_k", top_k)
        bias = False if bias is None else flag("bias", bias)  # None: no bias, as nn.Linear reads it
        if activation is not None and not callable(activation):
            raise TypeError(f"activation: expected a callable (e.g. torch.nn.GELU() or torch.nn.functional.gelu), "
                            f"got {activation!r}")
        self.num_experts = num_experts
        self.input_size = input_size
        self.hidden_size = hidden_size
        # Built at its width, W1 then W2: the random draws of the original ScatterMoE's layers, so a seed gives
        # the same initial weights there and here.
        self.experts = ParallelExperts(num_experts, input_size, self._up_width * hidden_size, bias=bias)
        self.output_experts = ParallelExperts(num_experts, hidden_size, input_size, bias=bias)
        self.top_k = min(top_k, num_experts)
        self.activation = activation if activation is not None else nn.GELU()

    @classmethod
    def from_linears(cls, up: Sequence, down: Sequence, top_k: int,
                     activation: Optional[Callable] = None) -> "MLP":
        """The layer holding the weights of E separate experts, each ``down(act(up(x)))`` (GELU unless
        ``activation`` says otherwise) with ``nn.Linear`` (or weight tensors [out, in]) ``up[e]`` D -> F and
        ``down[e]`` F -> D: what a loop over an ``nn.ModuleList`` of experts computes, in one fused op. The
        weights are copied (stacked to [E, out, in]); the layer takes their dtype, device and requires_grad (a
        stack trainable if any expert's tensor was). Biases: all experts' or none."""
        w1, b1 = _stack_linears("up", up)
        f, d = w1.shape[1:]
        w2, b2 = _stack_linears("down", down, shape=(d, f))
        if w2.shape[0] != w1.shape[0]:
            raise ValueError(f"down: expected {w1.shape[0]} experts (as many as up), got {w2.shape[0]}")
        if (b1 is None) != (b2 is None):
            raise ValueError("up and down: either both have biases or neither does")
        if (w2.dtype, w2.device) != (w1.dtype, w1.device):
            raise ValueError(f"up and down: the experts' weights must share one dtype and device, got {w1.dtype} "
                             f"on {w1.device} and {w2.dtype} on {w2.device}")
        with torch.device("meta"):  # no throw-away initialisation of a second set of weights
            layer = cls(d, f, w1.shape[0], top_k, bias=b1 is not None, activation=activation)
        _load_experts(layer.experts, w1, b1)
        _load_experts(layer.output_experts, w2, b2)
        return layer

    def extra_repr(self) -> str:
        return f"k={self.top_k}"

    def _hidden(self, x: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        """act(W1_e x) for the routed rows, grouped by expert: [N, F]."""
        return self.activation(self.experts(x, self.top_k, *routing, grouped_out=True))

    def forward(self, x: torch.Tensor, expert_p: torch.Tensor, expert_idxs: torch.Tensor) -> torch.Tensor:
        """x [..., D]; expert_p, expert_idxs [..., K] (or [T, K]; ids also [T*K]) -> [..., D]."""
        _check_routing(x, expert_p, expert_idxs, self.top_k, self.input_size, "experts.weight", self.experts.weight)
        x_shape = x.shape
        x = _token_rows(x)
        sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = flatten_sort_count(
            expert_idxs, num_experts=self.num_experts)
        h = self._hidden(x, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)
        y = self.output_experts(h, 1, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                                grouped_in=True, gates=expert_p.reshape(-1, self.top_k))
        return y.view(*x_shape[:-1], y.size(-1))


class GLUMLP(MLP):
    """Mixture of GLU experts: y = sum_j p_j * W2_e (act(a) * b), [a | b] or [b | a] = W1_e x.

    ``activate_first=False`` activates the second half of W1's output (ScatterMoE's
    GLUMLP); ``True`` activates the first half (JetMoE's checkpoints).
    """

    _up_width = 2

    def __init__(self, input_size: int, hidden_size: int, num_experts: int, top_k: int,
                 bias: bool = False, activation: Optional[Callable] = None,
                 activate_first: bool = False) -> None:
        bias, activation = _activation_in_bias_slot(bias, activation)
        super().__init__(input_size, hidden_size, num_experts, top_k, bias=bias,
                         activation=activation if activation is not None else nn.SiLU())
        self.activate_first = flag("activate_first", activate_first)

    def extra_repr(self) -> str:
        return f"k={self.top_k}, activate_first={self.activate_first}"

    @classmethod
    def from_linears(cls, gate: Sequence, up: Sequence, down: Sequence, top_k: int,
                     activation: Optional[Callable] = None) -> "GLUMLP":
        """The layer holding the weights of E separate SwiGLU experts, each
        ``down(act(gate(x)) * up(x))`` (Llama, Mixtral, Qwen MoE; SiLU unless ``activation`` says otherwise),
        with ``nn.Linear`` (or weight tensors [out, in]) ``gate[e]``, ``up[e]`` D -> F and ``down[e]`` F -> D:
        what a loop over an ``nn.ModuleList`` of experts computes, in one fused op. The weights are copied
        (``experts.weight[e]`` is ``[gate; up]``, so ``activate_first=True``: a state_dict saved from this layer
        loads into ``GLUMLP(..., activate_first=True)``, not the default, which activates the other half); the
        layer takes their dtype, device and requires_grad (a stack trainable if any expert's tensor was).
        Biases: all experts' or none."""
        wg, bg = _stack_linears("gate", gate)
        f, d = wg.shape[1:]
        wu, bu = _stack_linears("up", up, shape=(f, d))
        w2, b2 = _stack_linears("down", down, shape=(d, f))
        for name, w in (("up", wu), ("down", w2)):
            if w.shape[0] != wg.shape[0]:
                raise ValueError(f"{name}: expected {wg.shape[0]} experts (as many as gate), got {w.shape[0]}")
        if len({b is None for b in (bg, bu, b2)}) != 1:
            raise ValueError("gate, up and down: either all have biases or none does")
        if (wu.dtype, wu.device) != (wg.dtype, wg.device) or (w2.dtype, w2.device) != (wg.dtype, wg.device):
            raise ValueError(f"gate, up and down: the experts' weights must share one dtype and device, got "
                             f"{wg.dtype} on {wg.device}, {wu.dtype} on {wu.device}, {w2.dtype} on {w2.device}")
        with torch.device("meta"):  # no throw-away initialisation of a second set of weights
            layer = cls(d, f, wg.shape[0], top_k, bias=bg is not None, activation=activation, activate_first=True)
        _load_experts(layer.experts, torch.cat([wg, wu], dim=1), None if bg is None else torch.cat([bg, bu], dim=1))
        _load_experts(layer.output_experts, w2, b2)
        return layer

    def _fusable(self) -> bool:
        """Whether forward may be the one fused op, which reads both weights directly: plain SiLU (not a
        subclass, which may compute something else) and the two expert modules exactly ParallelExperts with
        no hooks (a subclass's own forward, e.g. an adapter, a hook, or FSDP sharding them must run)."""
        if not (type(self.activation) is nn.SiLU or self.activation is F.silu):
            return False
        # Backward hooks, the activation's hooks and global ones too: the fused op calls none of these modules.
        return (all(type(m) is ParallelExperts and not _runs_hooks(m) for m in (self.experts, self.output_experts))
                and not (isinstance(self.activation, nn.Module) and _runs_hooks(self.activation)))

    def _hidden(self, x: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        h = self.experts(x, self.top_k, *routing, grouped_out=True)
        # Two narrow views, not chunk's pair: an in-place activation (nn.ReLU(inplace=True)) may write into one.
        a, b = h.narrow(-1, 0, self.hidden_size), h.narrow(-1, self.hidden_size, self.hidden_size)
        return self.activation(a) * b if self.activate_first else a * self.activation(b)

    def forward(self, x: torch.Tensor, expert_p: torch.Tensor, expert_idxs: torch.Tensor) -> torch.Tensor:
        """x [..., D]; expert_p, expert_idxs [..., K] (or [T, K]; ids also [T*K]) -> [..., D]."""
        if not self._fusable():
            return super().forward(x, expert_p, expert_idxs)
        # SiLU: one fused op (GLU in the first GEMM's epilogue, G recomputed in backward).
        _check_routing(x, expert_p, expert_idxs, self.top_k, self.input_size, "experts.weight", self.experts.weight)
        routing = flatten_sort_count(expert_idxs, num_experts=self.num_experts)
        y = glu_moe(_token_rows(x), self.experts.weight.permute(0, 2, 1),
                    self.output_experts.weight.permute(0, 2, 1), expert_p.reshape(-1, self.top_k), routing,
                    self.experts.bias, self.output_experts.bias, self.activate_first)
        return y.view(*x.shape[:-1], y.size(-1))


class MoARouting(NamedTuple):
    """What MoA.map hands to MoA.reduce for the same tokens."""
    expert_p: torch.Tensor  # [..., K] gates, with x's leading dims (reduce checks attn_out's against them)
    sorted_expert_idxs: torch.Tensor
    sorted_scattered_idxs: torch.Tensor
    expert_offsets: torch.Tensor


class MoA(nn.Module):
    """Mixture of attention heads (JetMoE): per-expert query and output projections.

    ``input_linear.weight`` [E, H*Dh, D], ``output_linear.weight`` [E, D, H*Dh], ``bias`` [D]
    (one shared output bias) or None. Keys and values are the caller's: every query
    head of slot j reads KV head h, so queries come back as ``[..., H*K, Dh]`` ordered
    (kv head h, slot j) -> h*K + j. That is the grouping of torch's
    ``scaled_dot_product_attention(..., enable_gqa=True)``: the H shared K/V heads are
    used as they are, never repeated K times.
    """

    def __init__(self, input_size: int, head_dim: int, num_heads: int, num_experts: int, top_k: int,
                 bias: bool = False) -> None:
        super().__init__()
        num_experts, top_k = positive_int("num_experts", num_experts), positive_int("top_k", top_k)
        input_size, head_dim = positive_int("input_size", input_size), positive_int("head_dim", head_dim)
        num_heads = positive_int("num_heads", num_heads)
        self.num_experts = num_experts
        self.input_size = input_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.top_k = min(top_k, num_experts)
        self.input_linear = ParallelExperts(num_experts, input_size, num_heads * head_dim)
        self.output_linear = ParallelExperts(num_experts, num_heads * head_dim, input_size)
        bias = False if bias is None else flag("bias", bias)
        self.bias = nn.Parameter(torch.zeros(input_size)) if bias else None

    def extra_repr(self) -> str:
        return f"k={self.top_k}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def map(self, x: torch.Tensor, expert_p: torch.Tensor, expert_idxs: torch.Tensor
            ) -> Tuple[torch.Tensor, MoARouting]:
        """x [..., D]; expert_p, expert_idxs [..., K] (or [T, K]; ids also [T*K]) -> (queries [..., H*K, Dh],
        routing for reduce)."""
        _check_routing(x, expert_p, expert_idxs, self.top_k, self.input_size, "input_linear.weight",
                       self.input_linear.weight)
        lead = x.shape[:-1]
        # expert_p with x's leading dims (given [T, K] too): reduce checks attn_out's layout against them
        routing = MoARouting(expert_p.reshape(*lead, self.top_k), *flatten_sort_count(expert_idxs, self.num_experts))
        q = self.input_linear(_token_rows(x), self.top_k, *routing[1:])  # [T*K, H*Dh], slot order
        # (token, slot, head) -> (token, head, slot): one copy of q, so SDPA's GQA grouping matches.
        q = q.view(-1, self.top_k, self.num_heads, self.head_dim).transpose(1, 2)
        return q.reshape(*lead, self.num_heads * self.top_k, self.head_dim), routing

    def reduce(self, attn_out: torch.Tensor, routing: MoARouting) -> torch.Tensor:
        """attn_out [..., H*K, Dh] (the order map produced) -> [..., D]: gated sum of per-expert projections."""
        if not isinstance(routing, MoARouting):
            raise TypeError(f"routing: expected the MoARouting that map returned for these tokens, "
                            f"got {type(routing).__name__}")
        check_features("attn_out", attn_out)
        # Here, not in the projection below, which would name attn_out "x" and the weights "expert_weights".
        check_not_meta("attn_out", attn_out)
        check_dtype_like_x("output_linear.weight", self.output_linear.weight, attn_out, "attn_out")
        lead = attn_out.shape[:-2]
        expected = (self.num_heads * self.top_k, self.head_dim)
        if tuple(attn_out.shape[-2:]) != expected:
            raise ValueError(f"attn_out: expected [..., {expected[0]}, {expected[1]}], got {tuple(attn_out.shape)}")
        if routing.expert_p.size(-1) != self.top_k:
            raise ValueError(f"routing: made by a map with top_k={routing.expert_p.size(-1)}, but this layer has "
                             f"top_k={self.top_k}: pass the routing of this layer's own map")
        tokens, mapped = math.prod(lead), routing.expert_p.numel() // self.top_k
        if tokens != mapped:
            raise ValueError(f"routing: made by map for {mapped} tokens, but attn_out holds "
                             f"{tokens} (shape {tuple(attn_out.shape)}): pass the routing map returned for these "
                             "tokens")
        if routing.expert_offsets.numel() != self.num_experts:
            raise ValueError(f"routing: made by a map over {routing.expert_offsets.numel()} experts, but this layer "
                             f"has {self.num_experts}: pass the routing of this layer's own map")
        # Same count, other layout (e.g. [L, B] for map's [B, L]: tokens would be paired with other tokens' routing).
        # One flat token dim, or dims of size 1 added or dropped, keep the order.
        token_shape = tuple(routing.expert_p.shape[:-1])
        if len(lead) > 1 and len(token_shape) > 1 and [d for d in lead if d != 1] != [d for d in token_shape if d != 1]:
            raise ValueError(f"attn_out: expected leading dims {token_shape} (x's in map) or one flat token "
                             f"dim, got shape {tuple(attn_out.shape)}: were the attention output's dims left "
                             "transposed?")
        o = attn_out.reshape(-1, self.num_heads, self.top_k, self.head_dim).transpose(1, 2)
        # [T*K, H*Dh], slot order; row-major (with one token and Dh=1 the reshape is a column-major view, not a copy)
        o = o.reshape(-1, self.num_heads * self.head_dim).contiguous()
        y = self.output_linear(o, 1, *routing[1:], gates=routing.expert_p.reshape(-1, self.top_k))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # under autocast y is in its dtype, as nn.Linear's output with its bias
        return y.view(*lead, self.input_size)
