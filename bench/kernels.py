"""The kernel suite: cases, inputs and every implementation timed side by side (DESIGN.md section 7).

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D model dim, F expert
hidden dim (a GLU's first projection outputs 2F; for MoA, F = heads x head_dim).

Shapes (case names are ``<shape>_<mode>``, and ``routing``):
  jetmoe_moe        JetMoE-8B's MoE: SiLU GLU, D=2048, F=5632, E=8, K=2   fwd, bwd, fwd_bwd, infer, infer_graph
  jetmoe_moa        JetMoE-8B's MoA projections: 16 heads x 128, D=2048, E=8, K=2  fwd, fwd_bwd
                    (map then reduce, attention between them left out: o = q)
  finegrained_e64   GLU, D=2048, F=1408, E=64, K=8 (DeepSeek-style)               fwd, fwd_bwd
  finegrained_e128  GLU, D=2048, F=768, E=128, K=8 (Qwen3-MoE-style)              fwd, fwd_bwd
  jetmoe_glu_gemm   JetMoE-8B's first MoE GEMM alone, GLU fused: G = GLU(x[slot // k] @ W1[e]) [N, F],
                    pre-activation H [N, 2F] kept as in training, routing precomputed            fwd
                    (issue 3's kernel target: at least 80% of dense_same_flops, one [N, D] x [D, 2F] matmul)
  routing           the router after its linear layer: topk_gating then flatten_sort_count (top-k,
                    softmax, sort, counts, offsets), E=8, K=2, no gradient: impls ``scattermoe`` (the
                    library's: on CUDA one Triton launch each, the sort up to N * E = 16384, and the
                    device-side id assert), ``scattermoe_no_assert`` (the same without that assert),
                    ``torch_sort`` (the same functions on the torch path) and ``reference``
Each at T in {1, 16, 128, 1024, 4096, 16384, 32768}, uniform and Zipf-skewed routing, bf16.

Implementations (``impl``):
  scattermoe_triton, scattermoe_cutlass   the library's layer on that backend
  scattermoe_cutlass_persistent   the cutlass backend with its scatter GEMM on the persistent
                       kernel (one CTA per SM; csrc/README.md), forward and backward
  scattermoe_cutlass_tma          the same, with the scatter GEMM's weight tiles loaded by TMA
                       instead of cp.async (against the row above: what TMA for W gives)
  scattermoe_triton_gather, scattermoe_cutlass_gather   the GLU layer on that backend with the "gather" top-k
                       combine (scattermoe.set_topk_combine): the second GEMM writes grouped, ungated rows (on
                       csrc by the TMA grouped GEMM), a pass per token gates and sums them; against the plain
                       row (the scatter combine), what DESIGN.md 4 asks to try (NOTES.md 23)
  reference            the same layer on the ``torch`` backend (reference/: a loop over experts)
  torch_grouped_mm     the layer written with torch._grouped_mm (bench/grouped_mm_moe.py)
  dense_same_flops     plain cuBLAS matmuls with the same useful FLOPs and no routing: the ceiling
  scattermoe_original  the original ScatterMoE's GLUMLP, from third_party/ (bench/thirdparty.py)
  sonicmoe             SonicMoE's MoE layer, from third_party/ (its own router: see its row note)
Modes: ``fwd`` is the training forward (what backward needs is kept); ``bwd`` is
``y.backward(dy)`` alone, the forward run untimed before each call; ``fwd_bwd`` both; ``infer``
(JetMoE MoE, T <= INFER_MAX_TOKENS) the forward under ``torch.no_grad()``, as serving and decode run it;
``infer_graph`` the same forward captured in a CUDA graph and replayed, as serving stacks run decode (the
library's backends only: the reference and the peers sync with the host).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch._dynamo  # (config.patch for the original ScatterMoE's compiled routing)

import scattermoe
from reference import ops as reference_ops

from . import grouped_mm_moe, thirdparty

IMPLS = ("scattermoe_triton", "scattermoe_cutlass", "scattermoe_cutlass_persistent", "scattermoe_cutlass_tma",
         "scattermoe_triton_gather", "scattermoe_cutlass_gather",
         "reference", "torch_grouped_mm", "dense_same_flops", "scattermoe_original", "sonicmoe")
# The cutlass backend's kernel variants (csrc/README.md), set around everything an implementation runs (the
# plain row too, so that SCATTERMOE_CUTLASS_* in the environment cannot change what it measures).
CSRC_VARIANTS = {"scattermoe_cutlass": {"persistent": False, "weight_tma": False},
                 "scattermoe_cutlass_persistent": {"persistent": True, "weight_tma": False},
                 "scattermoe_cutlass_tma": {"persistent": True, "weight_tma": True}}


# The "gather" top-k combine (scattermoe.set_topk_combine, NOTES.md 23) on a backend, beside its plain row (the
# default scatter combine): the second MoE GEMM writes grouped, ungated rows (on csrc the TMA grouped GEMM) and a
# pass per token sums them. GLU shapes only: the second GEMM's store is what the mode changes. impl -> plain row.
GATHER_IMPLS = {"scattermoe_triton_gather": "scattermoe_triton", "scattermoe_cutlass_gather": "scattermoe_cutlass"}


def skipped_after_hang(impl: str) -> List[str]:
    """What a rerun should leave out after ``impl`` hung: it, the csrc variants after it (each adds to the
    kernels of the one before: a hang in the plain one would recur in all three), and the gather rows of a plain
    row that hung (the same kernels but the second GEMM's)."""
    if impl not in CSRC_VARIANTS:
        skipped = [impl]
    else:
        variants = list(CSRC_VARIANTS)
        skipped = variants[variants.index(impl):]
    return skipped + [gather for gather, plain in GATHER_IMPLS.items() if plain in skipped]


BACKEND_OF = {"scattermoe_triton": "triton", "reference": "torch", **{impl: "cutlass" for impl in CSRC_VARIANTS},
              "scattermoe_triton_gather": "triton", "scattermoe_cutlass_gather": "cutlass"}
TOKENS = (1, 16, 128, 1024, 4096, 16384, 32768)
ROUTINGS = ("uniform", "zipf")
ZIPF_S = 1.2
CHECK_TOL = 2e-2  # bf16 bound of DESIGN.md section 5
INFER_MAX_TOKENS = 128  # the inference-forward rows are decode and small-batch serving sizes
INFER_MODES = ("infer", "infer_graph")
GRAPH_IMPLS = ("scattermoe_triton", *CSRC_VARIANTS, *GATHER_IMPLS)
ROUTING_OUTPUTS = ("gates", "expert_idxs", "sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets")


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # "glu" | "moa" | "routing" | "glu_gemm" (the GLU layer's first GEMM alone)
    D: int = 2048
    F: int = 5632
    E: int = 8
    K: int = 2
    heads: int = 0
    modes: Tuple[str, ...] = ("fwd", "fwd_bwd")

    @property
    def head_dim(self) -> int:
        return self.F // self.heads

    @property
    def out1(self) -> int:
        """Width of the first projection: 2F for a GLU (both halves), F otherwise."""
        return 2 * self.F if self.kind in ("glu", "glu_gemm") else self.F


SHAPES: Dict[str, Shape] = {s.name: s for s in (
    Shape("jetmoe_moe", "glu", modes=("fwd", "bwd", "fwd_bwd", "infer", "infer_graph")),
    Shape("jetmoe_moa", "moa", F=16 * 128, heads=16),
    Shape("jetmoe_glu_gemm", "glu_gemm", modes=("fwd",)),
    Shape("finegrained_e64", "glu", F=1408, E=64, K=8),
    Shape("finegrained_e128", "glu", F=768, E=128, K=8),
    Shape("routing", "routing", modes=("fwd",)),
)}


@dataclass(frozen=True)
class Group:
    """One (shape, T, routing): inputs made once; every mode x impl is timed on them."""
    shape: Shape
    T: int
    routing: str = "uniform"
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        return f"{self.shape.name} T={self.T} {self.routing}"

    def case(self, mode: str) -> str:
        return self.shape.name if self.shape.kind == "routing" else f"{self.shape.name}_{mode}"


@contextlib.contextmanager
def _kernel_variant(impl: str):
    """A context for everything an implementation runs, backward included: the cutlass backend's kernel
    variant of CSRC_VARIANTS, the gather combine of GATHER_IMPLS (nothing for the other implementations; the
    run pins the scatter combine for the plain rows: bench.run)."""
    variant = CSRC_VARIANTS.get(GATHER_IMPLS.get(impl, impl))
    with contextlib.ExitStack() as stack:
        if impl in GATHER_IMPLS:
            stack.enter_context(scattermoe.use_topk_combine("gather"))
        if variant is not None:
            from scattermoe.backends import cutlass
            stack.enter_context(cutlass.persistent(variant["persistent"]))
            stack.enter_context(cutlass.weight_tma(variant["weight_tma"]))
        yield


def _in_variant(impl: str, fn: Callable[[int], object]) -> Callable[[int], object]:
    if impl not in CSRC_VARIANTS and impl not in GATHER_IMPLS:
        return fn

    def run(i: int) -> object:
        with _kernel_variant(impl):
            return fn(i)
    return run


# The routing rows' own names (beside "reference"); scattermoe_no_assert: the same without the device-side id
# assert (set_device_asserts(False)), so the pair measures that assert's cost (NOTES.md 22).
ROUTING_IMPLS = ("scattermoe", "scattermoe_no_assert", "torch_sort")


def impls_for(shape: Shape, impls: List[str]) -> List[str]:
    """The implementations a shape runs: routing has the library's own (one launch for few rows on CUDA), the
    library's torch.sort path (``torch_sort``, what it uses for more rows) and the reference."""
    if shape.kind != "routing":
        return list(impls)
    mine = list(ROUTING_IMPLS) if any(i.startswith("scattermoe_") for i in impls) else []
    return mine + (["reference"] if "reference" in impls else [])


def suite(name: str) -> List[Group]:
    """The groups of a suite, most important first, so a run cut short by its budget keeps those."""
    moe, moa, routing, gemm = SHAPES["jetmoe_moe"], SHAPES["jetmoe_moa"], SHAPES["routing"], SHAPES["jetmoe_glu_gemm"]
    if name == "headline":
        return [Group(moe, 16384), Group(gemm, 16384), Group(routing, 16384)]
    if name == "quick":
        return [Group(moe, 4096), Group(moe, 4096, "zipf"), Group(moe, 1), Group(routing, 4096),
                Group(moa, 4096), Group(SHAPES["finegrained_e64"], 4096)]
    if name == "smoke":  # CPU code-path check: tiny shapes, every kind
        tiny = {"glu": dict(D=64, F=96, E=4, K=2), "moa": dict(D=64, F=64, E=4, K=2, heads=4),
                "routing": dict(D=64, E=4, K=2), "glu_gemm": dict(D=64, F=96, E=4, K=2)}
        shapes = [Shape(s.name, s.kind, modes=s.modes, **tiny[s.kind]) for s in (moe, moa, routing, gemm)]
        # float16: the Triton interpreter multiplies bf16 dots wrongly (triton-lang/triton#11584).
        return [Group(s, t, r, "float16") for s in shapes for t, r in ((1, "uniform"), (40, "zipf"))]
    if name != "full":
        raise ValueError(f"suite: expected full, quick, headline or smoke, got {name!r}")
    # First what the targets are judged on: the headline, the routing share (routing and the layer's forward at
    # T >= 4096), decode (T=1); then the sweeps.
    head = [Group(moe, 16384), Group(gemm, 16384), Group(routing, 16384), Group(moe, 1), Group(routing, 4096),
            Group(moe, 4096)]
    rest = [Group(s, t, r) for s in (moe, routing, gemm, moa, SHAPES["finegrained_e64"], SHAPES["finegrained_e128"])
            for r in ROUTINGS for t in TOKENS]
    return head + [g for g in rest if g not in head]


# ---------------------------------------------------------------- counting


def flops(group: Group, mode: str) -> Optional[int]:
    """Useful FLOPs: the expert GEMMs over N rows (backward = 2x forward: dX and dW). None for routing."""
    s, n = group.shape, group.T * group.shape.K
    if s.kind == "routing":
        return None
    if s.kind == "glu_gemm":
        return 2 * n * s.D * s.out1
    fwd = 2 * n * s.D * s.out1 + 2 * n * s.F * s.D
    return {"fwd": fwd, "infer": fwd, "infer_graph": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode]


def weight_bytes(shape: Shape, experts: int, itemsize: int = 2) -> int:
    """Bytes of ``experts`` experts' weights (what a decode step must read at least)."""
    if shape.kind == "glu_gemm":
        return experts * shape.out1 * shape.D * itemsize
    return experts * (shape.out1 * shape.D + shape.F * shape.D) * itemsize


def useful_bytes(group: Group, mode: str, experts: int, itemsize: int = 2) -> Optional[int]:
    """Compulsory HBM traffic, the bytes counterpart of ``flops``: what any implementation of the case must move
    at least, each tensor once; what a fused kernel can keep on chip is not counted.

    Weights: the used experts' read once per pass; weight gradients written for all E experts (``.grad`` is a
    dense [E, ...] tensor). Token tensors: X read and Y written (forward), dY read and dX written (backward).
    Activations the backward needs: a GLU's training forward writes its pre-activation H [N, 2F] and the
    backward reads it (inference keeps nothing); MoA's query projection q [N, F] is written and the attention
    output read back (attention sits between the two projections), and the backward writes d(attention output),
    reads it back as dq, and reads the attention output for the output projection's dW. The first GEMM alone
    (glu_gemm) writes G [N, F] and H [N, 2F], as the layer's training forward runs it. Gates and routing indices
    (~10 bytes per routed row) are left out. None for routing."""
    s, t = group.shape, group.T
    if s.kind == "routing":
        return None
    n = t * s.K
    w_used, w_all = weight_bytes(s, experts, itemsize), weight_bytes(s, s.E, itemsize)
    if s.kind == "glu_gemm":
        return (t * s.D + n * s.F + n * s.out1) * itemsize + w_used
    if s.kind == "glu":
        infer_mid, fwd_mid, bwd_mid = 0, n * s.out1, n * s.out1  # H saved by the forward, read by the backward
    else:  # moa
        infer_mid, fwd_mid, bwd_mid = 2 * n * s.F, 2 * n * s.F, 3 * n * s.F
    infer = (2 * t * s.D + infer_mid) * itemsize + w_used
    fwd = (2 * t * s.D + fwd_mid) * itemsize + w_used
    bwd = (3 * t * s.D + bwd_mid) * itemsize + w_used + w_all
    return {"fwd": fwd, "infer": infer, "infer_graph": infer, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    x: torch.Tensor       # [T, D], requires grad
    gates: torch.Tensor   # [T, K], requires grad
    idx: torch.Tensor     # [T, K] int64
    dy: torch.Tensor      # [T, D]
    dense: Dict[str, torch.Tensor] = field(default_factory=dict)  # operands of dense_same_flops
    logits: Optional[torch.Tensor] = None  # [T, E] float32 router logits that gave gates and idx (routing case)
    # (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets) of idx: the GEMM-alone case times no routing
    routed: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


def router(group: Group, gen: torch.Generator, device: torch.device
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gates [T, K] fp32, expert_idxs [T, K], logits [T, E]): JetMoE's router on Gumbel-perturbed log-probs.

    Top-k of log p_e + Gumbel noise draws K distinct experts with probabilities p (the Gumbel-top-k
    trick): "uniform" is uniform routing, "zipf" sends the expert of rank r a share ~ (r+1)^-1.2, the ranks a
    fixed shuffle of the experts (a trained router's busiest expert is any one, not conveniently the first
    that index-ordered kernels launch).
    """
    E = group.shape.E
    logp = torch.zeros(E)
    if group.routing == "zipf":
        rank = torch.randperm(E, generator=torch.Generator().manual_seed(E))
        logp = -ZIPF_S * torch.log(rank.to(torch.float32) + 1)
    elif group.routing != "uniform":
        raise ValueError(f"routing: expected 'uniform' or 'zipf', got {group.routing!r}")
    u = torch.rand(group.T, E, generator=gen).clamp_(1e-9, 1 - 1e-9)
    logits = (logp - torch.log(-torch.log(u))).to(device)
    with scattermoe.use_backend("torch"):  # the inputs, not under test
        return (*scattermoe.topk_gating(logits, group.shape.K), logits)


def make_inputs(group: Group, n_sets: int, device: torch.device, seed: int, dense: bool) -> List[Inputs]:
    s, dtype = group.shape, getattr(torch, group.dtype)
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        gates, idx, logits = router(group, gen, device)
        x = torch.randn(group.T, s.D, generator=gen).to(device, dtype).requires_grad_()
        dy = torch.randn(group.T, s.D, generator=gen).to(device, dtype)
        inp = Inputs(x, gates.to(dtype).requires_grad_(), idx, dy, logits=logits)
        if s.kind == "glu_gemm":
            with scattermoe.use_backend("torch"):
                inp.routed = scattermoe.flatten_sort_count(idx, s.E)
        if dense and s.kind != "routing":
            n, out1 = group.T * s.K, s.out1
            g = torch.Generator(device=device).manual_seed(seed + len(sets))
            operands = (("a", (n, s.D)),) if s.kind == "glu_gemm" else (
                ("a", (n, s.D)), ("h", (n, s.F)), ("dh", (n, out1)), ("dy", (n, s.D)))
            inp.dense = {name: torch.randn(*shape, generator=g, device=device, dtype=dtype) for name, shape in operands}
        sets.append(inp)
    return sets


def expert_load(idx: torch.Tensor, num_experts: int) -> Dict:
    counts = torch.bincount(idx.reshape(-1).cpu(), minlength=num_experts).tolist()
    return {"rows_per_expert": counts, "experts_used": sum(c > 0 for c in counts),
            "max_over_mean": max(counts) / (sum(counts) / num_experts)}


# ---------------------------------------------------------------- implementations


Call = Callable[[int], object]
Prepare = Callable[[int], None]


class Workload:
    """The weights of one shape and a callable per (impl, mode). Every MoE implementation shares
    one set of weights (copied into the peers' layouts) and the same inputs."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int,
                 mm: Optional[grouped_mm_moe.GroupedMM], mm_unavailable: Optional[str],
                 skipped: Optional[Dict[str, str]] = None) -> None:
        self.shape, self.device, self.dtype = shape, device, dtype
        self.mm, self.mm_unavailable = mm, mm_unavailable
        self.skipped = dict(skipped or {})  # impl -> why it is not run (python -m bench --skip-impls)
        self.layer: Optional[torch.nn.Module] = None
        self._peers: Dict[str, Tuple[Optional[torch.nn.Module], Optional[str]]] = {}
        torch.manual_seed(seed)
        if shape.kind in ("glu", "glu_gemm"):  # glu_gemm times the first projection of this layer
            self.layer = scattermoe.GLUMLP(shape.D, shape.F, shape.E, shape.K, activation=torch.nn.SiLU(),
                                           activate_first=True).to(device, dtype)
        elif shape.kind == "moa":
            self.layer = scattermoe.MoA(shape.D, shape.head_dim, shape.heads, shape.E, shape.K).to(device, dtype)
        if self.layer is not None:
            gen = torch.Generator(device=device).manual_seed(seed + 1)
            self.w1 = torch.randn(shape.D, shape.out1, generator=gen, device=device, dtype=dtype) * 0.02
            self.w2 = torch.randn(shape.F, shape.D, generator=gen, device=device, dtype=dtype) * 0.02

    # -- which implementations run here

    def unavailable(self, impl: str, x: torch.Tensor) -> Optional[str]:
        if impl in self.skipped:
            return self.skipped[impl]
        kind = self.shape.kind
        if kind == "routing":
            return None if impl in (*ROUTING_IMPLS, "reference") else "not a routing implementation"
        if impl in GATHER_IMPLS and kind != "glu":
            return "the gather combine rows are for the GLU layers (what it changes is the second MoE GEMM)"
        if impl in ("scattermoe_triton", "scattermoe_triton_gather"):
            return scattermoe.backends.triton_unsupported_reason(x)
        if impl.startswith("scattermoe_cutlass"):
            from scattermoe.backends import cutlass
            return cutlass.unsupported_reason(x)
        if kind == "glu_gemm" and impl not in ("reference", "dense_same_flops") and impl not in BACKEND_OF:
            return "a layer, not a kernel: see the jetmoe_moe rows"
        if impl == "torch_grouped_mm":
            return self.mm_unavailable
        if impl in ("scattermoe_original", "sonicmoe"):
            return f"{impl} has no MoA layer" if kind == "moa" else self._peer(impl)[1]
        return None

    def mode_unavailable(self, impl: str, mode: str, routing: str = "uniform") -> Optional[str]:
        """Why impl has no row in this mode and routing (beyond ``unavailable``), or None."""
        if impl == "sonicmoe" and routing != "uniform":
            return f"SonicMoE routes with its own router (near uniform), so it has no {routing} row"
        if mode == "infer_graph":
            if self.device.type != "cuda":
                return "CUDA graphs need a CUDA device"
            if impl not in GRAPH_IMPLS:
                return "CUDA-graph replay is timed for the library's backends only"
            if scattermoe._validate.debug_enabled():
                return "SCATTERMOE_DEBUG's value checks read tensors on the host, which a capture forbids"
        return None

    def _peer(self, impl: str) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
        """The peer's GLU layer with our weights (original ScatterMoE), or its own (SonicMoE)."""
        if impl in self._peers:
            return self._peers[impl]
        s, module = self.shape, None
        if impl == "scattermoe_original":
            mod, why = thirdparty.load_scattermoe_original()
            if mod is not None:
                module = mod.mlp.GLUMLP(s.D, s.F, s.E, s.K, activation=torch.nn.SiLU()).to(self.device, self.dtype)
                # It activates the second half of the first projection, JetMoE the first: swap halves.
                w = self.layer.experts.weight.detach()
                module.experts.weight.data.copy_(torch.cat([w[:, s.F:], w[:, :s.F]], 1))
                module.output_experts.weight.data.copy_(self.layer.output_experts.weight.detach())
        else:
            mod, why = thirdparty.load_sonicmoe()
            if mod is not None:
                try:
                    from sonicmoe.enums import ActivationType
                    module = mod.MoE(num_experts=s.E, num_experts_per_tok=s.K, hidden_size=s.D,
                                     intermediate_size=s.F, activation_function=ActivationType.SWIGLU,
                                     add_bias=False, std=0.02).to(self.device, self.dtype)
                except Exception as exc:
                    why = f"construction failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
        self._peers[impl] = (module, why if module is None else None)
        return self._peers[impl]

    def own_bytes(self, impl: str, inp: Inputs, mode: str) -> int:
        """What one call of impl needs resident: its weights and the inputs it reads (the harness also holds
        other implementations' weights and operands, which are not this implementation's memory)."""
        if impl == "dense_same_flops":  # what its matmuls read in this mode (_dense_call)
            if self.shape.kind == "glu_gemm":
                tensors = [inp.dense["a"], self.w1]
            else:
                names = ("a", "h", "dh", "dy") if "bwd" in mode else ("a", "h")
                tensors = [inp.dense[n] for n in names] + [self.w1, self.w2]
        elif self.shape.kind == "routing":
            tensors = [inp.logits]
        elif self.shape.kind == "glu_gemm":
            tensors = self.params(impl) + [inp.x, *inp.routed[1:]]
        else:
            tensors = self.params(impl) + [inp.x, inp.gates, inp.idx] + ([inp.dy] if "bwd" in mode else [])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def params(self, impl: str) -> List[torch.Tensor]:
        if impl in ("scattermoe_original", "sonicmoe"):
            module = self._peer(impl)[0]
            return list(module.parameters()) if module is not None else []
        if self.shape.kind == "glu_gemm":  # the first projection only
            return [self.layer.experts.weight]
        return list(self.layer.parameters()) if self.layer is not None else []

    # -- forward per implementation

    def forward(self, impl: str) -> Callable[[Inputs], torch.Tensor]:
        s, layer = self.shape, self.layer
        if s.kind == "routing":
            # The router after its linear layer: top-k of the logits, softmax, then the sort by expert.
            if impl == "reference":
                def route_reference(inp: Inputs):
                    values, idx = torch.topk(inp.logits, s.K, dim=-1)
                    return (torch.softmax(values, -1), idx, *reference_ops.flatten_sort_count(idx, s.E))
                return route_reference

            def route(inp: Inputs):
                # torch_sort: the torch backend, which never launches the one-launch Triton kernels.
                asserts = scattermoe._validate.device_asserts_enabled()
                scattermoe.set_device_asserts(impl != "scattermoe_no_assert")
                try:
                    with torch.no_grad(), scattermoe.use_backend("torch" if impl == "torch_sort" else "auto"):
                        gates, idx = scattermoe.topk_gating(inp.logits, s.K)
                        return (gates, idx, *scattermoe.flatten_sort_count(idx, s.E))
                finally:
                    scattermoe.set_device_asserts(asserts)
            return route
        if s.kind == "glu_gemm":
            return self._glu_gemm(impl)
        if impl in BACKEND_OF:
            backend = BACKEND_OF[impl]
            if s.kind == "glu":
                def run(inp: Inputs) -> torch.Tensor:
                    with scattermoe.use_backend(backend):
                        return layer(inp.x, inp.gates, inp.idx)
            else:
                def run(inp: Inputs) -> torch.Tensor:
                    with scattermoe.use_backend(backend):
                        q, routing = layer.map(inp.x, inp.gates, inp.idx)
                        return layer.reduce(q, routing)
            return run
        if impl == "torch_grouped_mm":
            if s.kind == "glu":
                return lambda inp: grouped_mm_moe.grouped_mm_glu_moe(
                    inp.x, inp.gates, inp.idx, layer.experts.weight, layer.output_experts.weight,
                    activate_first=True, mm=self.mm)
            return lambda inp: grouped_mm_moe.grouped_mm_moa(
                inp.x, inp.gates, inp.idx, layer.input_linear.weight, layer.output_linear.weight, s.heads, mm=self.mm)
        if impl == "scattermoe_original":
            peer = self._peer(impl)[0]

            def run_original(inp: Inputs) -> torch.Tensor:
                # Its flatten_sort_count is @torch.compile: should inductor fail on the GPU machine, that call
                # runs eagerly (routing is not what these rows measure) instead of the peer's rows being lost.
                with torch._dynamo.config.patch(suppress_errors=True):
                    return peer(inp.x, inp.gates, inp.idx)
            return run_original
        if impl == "sonicmoe":
            from sonicmoe import KernelBackendMoE
            peer = self._peer(impl)[0]
            return lambda inp: peer(inp.x, kernel_backend_moe=KernelBackendMoE.sonicmoe)[0]
        raise KeyError(impl)

    # -- one timed call per (impl, mode)

    def _glu_gemm(self, impl: str) -> Callable[[Inputs], Tuple[torch.Tensor, torch.Tensor]]:
        """(G, H): the first projection with the GLU fused and H kept, as the layer's training forward runs it,
        on precomputed routing (no autograd: the kernel alone)."""
        s, w = self.shape, self.layer.experts.weight
        if impl == "reference":
            def glu_reference(inp: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
                with torch.no_grad():
                    h = reference_ops.parallel_linear(inp.x, w.permute(0, 2, 1), s.K, *inp.routed,
                                                      grouped_in=False, grouped_out=True)
                    return reference_ops.glu(h, torch.nn.functional.silu, activate_first=True), h
            return glu_reference
        kernels = scattermoe.backends.kernels(BACKEND_OF[impl])

        def glu_gemm(inp: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
            _, scattered, offsets = inp.routed
            with torch.no_grad():
                pre = inp.x.new_empty(scattered.numel(), s.out1)
                g = kernels.scatter2scatter(inp.x, w.permute(0, 2, 1), None, scattered, offsets, s.K, False, True,
                                            glu=1, pre_activation=pre)
                return g, pre
        return glu_gemm

    def call(self, impl: str, sets: List[Inputs], mode: str) -> Tuple[Call, Prepare]:
        """(fn(i), prepare(i)): fn is the timed call on input set i; prepare runs untimed before it
        (drops .grad so backward allocates rather than accumulates; for ``bwd``, runs the forward)."""
        fn, prepare = self._call(impl, sets, mode)
        return _in_variant(impl, fn), _in_variant(impl, prepare)

    def _call(self, impl: str, sets: List[Inputs], mode: str) -> Tuple[Call, Prepare]:
        self._reset = None
        if impl == "dense_same_flops":
            return self._dense_call(sets, mode), lambda i: None
        forward = self.forward(impl)
        if impl == "sonicmoe":  # its serving path (no pre-activation kept, no aux loss) runs when not training
            self._peer(impl)[0].train(mode not in ("infer", "infer_graph"))
        if self.shape.kind == "glu_gemm":
            return (lambda i: forward(sets[i])), lambda i: None
        grads = self.params(impl) + [t for s in sets for t in (s.x, s.gates)]
        pending: Dict[int, torch.Tensor] = {}

        def clear() -> None:
            for t in grads:
                t.grad = None

        # After an error: drop grads and a pending forward without running anything (the forward
        # itself may be what failed), so the next row starts from the same memory.
        self._release = self._reset = lambda: (clear(), pending.clear())

        if mode == "fwd":
            return (lambda i: forward(sets[i])), lambda i: clear()
        if mode == "infer_graph":
            return self._graph_call(impl, forward, sets), lambda i: None
        if mode == "infer":
            def infer(i: int) -> torch.Tensor:
                with torch.no_grad():  # serving: nothing kept for a backward
                    return forward(sets[i])
            return infer, lambda i: clear()
        if mode == "fwd_bwd":
            return (lambda i: forward(sets[i]).backward(sets[i].dy)), lambda i: clear()

        def prepare_bwd(i: int) -> None:
            clear()
            pending.clear()
            pending[i] = forward(sets[i])

        def bwd(i: int) -> None:
            pending.pop(i).backward(sets[i].dy)
        return bwd, prepare_bwd

    def _graph_call(self, impl: str, forward: Callable[[Inputs], torch.Tensor], sets: List[Inputs]) -> Call:
        """Each input set's no-grad forward captured in a CUDA graph, after two eager calls off the default
        stream (they also autotune); the timed call replays it. The first replay must equal the eager output."""
        graphs: List[torch.cuda.CUDAGraph] = []
        outs: List[torch.Tensor] = []
        self._release = lambda: (graphs.clear(), outs.clear())
        with torch.no_grad(), _kernel_variant(impl):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for inp in sets:
                    forward(inp)
                    forward(inp)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for inp in sets:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs.append(forward(inp))
                graphs.append(graph)
            eager = forward(sets[0])
            outs[0].fill_(float("nan"))  # poison: the replay must write every element
            graphs[0].replay()
            if not torch.equal(outs[0], eager):
                raise RuntimeError("the CUDA-graph replay differs from the eager forward")
        return lambda i: graphs[i].replay()

    def reset(self) -> None:
        """Drop the grads and the pending forward that the last ``call``'s prepare left, keeping the call usable:
        the memory baseline of a row is then its weights and inputs alone."""
        if getattr(self, "_reset", None) is not None:
            self._reset()

    def release(self) -> None:
        """Free what the last ``call`` left behind (grads, a pending forward); never raises."""
        release, self._release = getattr(self, "_release", None), None
        if release is not None:
            release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _dense_call(self, sets: List[Inputs], mode: str) -> Call:
        w1, w2 = self.w1, self.w2
        if self.shape.kind == "glu_gemm":
            return lambda i: torch.mm(sets[i].dense["a"], w1)  # [N, D] x [D, 2F]

        def fwd(d: Dict[str, torch.Tensor]) -> None:
            torch.mm(d["a"], w1)   # [N, out1]
            torch.mm(d["h"], w2)   # [N, D]

        def bwd(d: Dict[str, torch.Tensor]) -> None:
            torch.mm(d["dy"], w2.t())      # dH  [N, F]
            torch.mm(d["h"].t(), d["dy"])  # dW2 [F, D]
            torch.mm(d["dh"], w1.t())      # dA  [N, D]
            torch.mm(d["a"].t(), d["dh"])  # dW1 [D, out1]

        steps = {"fwd": (fwd,), "infer": (fwd,), "infer_graph": (fwd,), "bwd": (bwd,), "fwd_bwd": (fwd, bwd)}[mode]

        def run(i: int) -> None:
            for step in steps:
                step(sets[i].dense)
        return run

    # -- correctness

    def outputs(self, impl: str, inp: Inputs) -> Dict[str, Optional[torch.Tensor]]:
        """Output and every gradient of one forward+backward (routing: its three tensors)."""
        if self.shape.kind == "routing":
            return dict(zip(ROUTING_OUTPUTS, self.forward(impl)(inp), strict=True))
        if self.shape.kind == "glu_gemm":
            with _kernel_variant(impl):
                return dict(zip(("g", "h"), self.forward(impl)(inp), strict=True))
        for t in self.params(impl) + [inp.x, inp.gates]:
            t.grad = None
        with _kernel_variant(impl):
            y = self.forward(impl)(inp)
            y.backward(inp.dy)
        out = {"y": y, "dx": inp.x.grad, "dgates": inp.gates.grad}
        if impl == "scattermoe_original":
            peer, F = self._peer(impl)[0], self.shape.F
            g = peer.experts.weight.grad
            out["dw_in"] = None if g is None else torch.cat([g[:, F:], g[:, :F]], 1)  # back to our halves
            out["dw_out"] = peer.output_experts.weight.grad
        elif self.shape.kind == "glu":
            out["dw_in"], out["dw_out"] = self.layer.experts.weight.grad, self.layer.output_experts.weight.grad
        else:
            out["dw_in"], out["dw_out"] = self.layer.input_linear.weight.grad, self.layer.output_linear.weight.grad
        for t in self.params(impl) + [inp.x, inp.gates]:
            t.grad = None
        return out

    def oracle(self, inp: Inputs) -> Dict[str, torch.Tensor]:
        """The torch backend in float32 on the same (bf16) inputs, TF32 off."""
        if self.shape.kind == "routing":
            return self.outputs("reference", inp)
        saved, self.layer = self.layer, copy.deepcopy(self.layer).float()
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            inp32 = Inputs(inp.x.detach().float().requires_grad_(), inp.gates.detach().float().requires_grad_(),
                           inp.idx, inp.dy.float(), routed=inp.routed)
            return self.outputs("reference", inp32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            self.layer = saved


def _rel_err(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if out is None:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else float("inf")


def check(work: Workload, impls: List[str], group: Group, seed: int,
          watch: Callable[[str, str], ContextManager] = lambda impl, what: contextlib.nullcontext()
          ) -> Dict[str, Dict]:
    """Per impl: {"unavailable": why}, {"error": what, "ok": False} (it raised), or {"rel_err": {tensor: err},
    "ok": bool} against the oracle. Each impl's call and comparison run inside ``watch(impl, what)``
    (harness.HangWatch: the comparison is where the host waits for the device).
    Routing must match exactly; SonicMoE routes with its own router, so it is not compared."""
    inp = make_inputs(group, 1, work.device, seed, dense=False)[0]
    refs = work.oracle(inp)
    results: Dict[str, Dict] = {}
    for impl in impls:
        if impl == "dense_same_flops":
            continue
        why = work.unavailable(impl, inp.x)
        if why is not None:
            results[impl] = {"unavailable": why}
            continue
        if impl == "sonicmoe":
            results[impl] = {"not_compared": "SonicMoE routes with its own router"}
            continue
        with watch(impl, f"its check at T={group.T} {group.routing}"):
            try:
                outs = work.outputs(impl, inp)
            except Exception as exc:  # a crash is a finding for the table, not the end of the run
                results[impl] = {"error": f"{type(exc).__name__}: {first_line(exc)}", "ok": False}
                continue
            if work.shape.kind == "routing":  # the indices exactly, the gates to float32 rounding
                ok = all(torch.equal(outs[k].cpu(), refs[k].cpu()) for k in ROUTING_OUTPUTS[1:]) and bool(
                    torch.allclose(outs["gates"].cpu(), refs["gates"].cpu(), rtol=1e-6, atol=1e-6))
                results[impl] = {"exact": ok, "ok": ok}
            else:
                errors = {k: _rel_err(outs[k], refs[k]) for k in refs}
                results[impl] = {"T": group.T, "tol": CHECK_TOL, "rel_err": errors,
                                 "ok": all(e < CHECK_TOL for e in errors.values())}
    return results


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def group_record(group: Group) -> Dict:
    return {"shape": asdict(group.shape), "T": group.T, "routing": group.routing, "dtype": group.dtype}
