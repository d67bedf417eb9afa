"""scattermoe.parallel_linear against reference.parallel_linear in float64: forward and every gradient.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D input features, F output features.
Weights are stored [E, F, D] (ParallelExperts' nn.Linear layout) and passed as the permuted [E, D, F] view,
as ParallelExperts does, unless a test says otherwise.

The Triton kernels run under the CPU interpreter here (float32 and float16; the interpreter's bf16 dot
is broken upstream), with the interpreter's 32x32x32 tiles: shapes are kept small and chosen around 32.
"""

import math

import pytest
import torch
from helpers import CPU_DTYPES, TOL, assert_all_close, assert_close, float64_leaves, make_expert_idxs

import reference
import scattermoe
from scattermoe.backends.triton import scatter2scatter

SHAPES = [
    # (T, E, K, D, F, routing case)
    pytest.param(37, 5, 2, 24, 40, "random", id="odd_sizes-empty_expert"),  # T, D, F not multiples of 32; expert 4 idle
    pytest.param(1, 4, 2, 16, 24, "random", id="T1"),                         # T=1: one row per used expert
    pytest.param(16, 4, 1, 32, 32, "all_on_one", id="k1-all_on_one"),        # k=1, every token on expert 2
    pytest.param(19, 3, 3, 40, 36, "random", id="k_eq_E"),                    # k=E, D spans two K blocks
    pytest.param(21, 1, 1, 24, 20, "random", id="E1"),                        # E=1
    pytest.param(40, 6, 2, 48, 64, "same_set", id="dup_experts-2_tiles"),     # duplicate experts across tokens: 40 rows
                                                                              # per used expert, two 32-row tiles
    pytest.param(9, 4, 2, 24, 24, "repeat", id="same_expert_twice"),          # a token routed twice to one expert
    pytest.param(29, 7, 3, 40, 24, "random", id="prime_E"),                   # prime E, an empty expert
]

# mode -> (grouped_in, grouped_out, gated, slot_rows). slot_rows: x holds the N rows in slot order (MoA's reduce).
MODES = {
    "scatter_to_scatter": (False, False, False, False),
    "scatter_to_grouped": (False, True, False, False),   # the first MoE GEMM
    "grouped_to_scatter": (True, False, False, False),
    "grouped_to_grouped": (True, True, False, False),
    "gated_from_tokens": (False, False, True, False),    # x [T, D] fanned out to K slots, gate-weighted sum
    "gated_from_grouped": (True, False, True, False),    # the second MoE GEMM
    "gated_from_slot_rows": (False, False, True, True),  # MoA's reduce: x [N, D] in slot order, k=1, gates [T, K]
}


def _make_inputs(T, E, K, D, F, case, mode, bias, dtype, device, gates_dtype=None):
    """Routing, leaves (requiring grad) and the call's arguments for one case."""
    grouped_in, grouped_out, gated, slot_rows = MODES[mode]
    idx_TK = make_expert_idxs(T, E, K, case, device)
    routing = scattermoe.flatten_sort_count(idx_TK, E)
    N = T * K
    k_arg = 1 if (grouped_in or slot_rows) else K
    x = torch.randn(N if (grouped_in or slot_rows) else T, D, device=device)
    w_EFD = torch.randn(E, F, D, device=device) / math.sqrt(D)
    leaves = {"x": x.to(dtype), "weight": w_EFD.to(dtype)}
    if bias:
        leaves["bias"] = torch.randn(E, F, device=device).to(dtype)
    if gated:
        leaves["gates"] = torch.softmax(torch.randn(T, K, device=device), -1).to(gates_dtype or dtype)
    for t in leaves.values():
        t.requires_grad_()
    return routing, leaves, dict(k=k_arg, grouped_in=grouped_in, grouped_out=grouped_out)


def _call(fn, routing, leaves, kw):
    """fn = scattermoe.parallel_linear or reference.parallel_linear; the weight goes in as the [E, D, F] view."""
    return fn(leaves["x"], leaves["weight"].permute(0, 2, 1), kw["k"], *routing,
              expert_biases=leaves.get("bias"), gates=leaves.get("gates"),
              grouped_in=kw["grouped_in"], grouped_out=kw["grouped_out"])


def check_against_reference(backend, T, E, K, D, F, case, mode, bias, dtype, device="cpu", gates_dtype=None,
                            tol=None):
    """Forward and every gradient of parallel_linear on ``backend`` vs the float64 reference from the same inputs."""
    routing, leaves, kw = _make_inputs(T, E, K, D, F, case, mode, bias, dtype, device, gates_dtype)
    with scattermoe.use_backend(backend):
        y = _call(scattermoe.parallel_linear, routing, leaves, kw)
    dy = torch.randn_like(y)
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], dy)

    ref_leaves = dict(zip(names, float64_leaves([leaves[n] for n in names])))
    cpu_routing = [r.cpu() for r in routing]
    y_ref = _call(reference.parallel_linear, cpu_routing, ref_leaves, kw)
    ref_grads = torch.autograd.grad(y_ref, [ref_leaves[n] for n in names], dy.double().cpu())

    expected_rows = T if "gates" in leaves else T * K
    assert y.shape == (expected_rows, F) and y.dtype == dtype and y.device == leaves["x"].device
    for name, g in zip(names, grads):
        assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, f"d{name}: {g.dtype} {tuple(g.shape)}"
    assert_all_close(["y"] + [f"d{n}" for n in names], (y,) + grads, (y_ref,) + ref_grads, tol or TOL[dtype])

    # An expert with no rows gets an exactly zero weight (and bias) gradient: the kernel must write it.
    counts = torch.diff(routing[2].cpu(), prepend=torch.zeros(1, dtype=torch.long))
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert bool((grads[names.index("weight")][e] == 0).all()), f"dweight of empty expert {e} is not zero"
        if "bias" in leaves:
            assert bool((grads[names.index("bias")][e] == 0).all()), f"dbias of empty expert {e} is not zero"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T, E, K, D, F, case", SHAPES)
def test_triton_matches_reference(T, E, K, D, F, case, mode, bias, dtype):
    check_against_reference("triton", T, E, K, D, F, case, mode, bias, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T, E, K, D, F, case", SHAPES)
def test_torch_backend_matches_reference(T, E, K, D, F, case, mode, bias, dtype):
    check_against_reference("torch", T, E, K, D, F, case, mode, bias, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["gated_from_tokens", "gated_from_grouped", "gated_from_slot_rows"])
def test_triton_fp32_gates_beside_fp16_x(mode):
    """JetMoE's router gives float32 gates to a half-precision layer: output in x's dtype, dgates in float32."""
    check_against_reference("triton", 23, 5, 2, 24, 40, "random", mode, True, torch.float16,
                            gates_dtype=torch.float32)


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                 pytest.param("cuda", marks=pytest.mark.gpu)])
def test_registered_ops_take_strided_index_scale_and_gradient_tensors(dev):
    """torch.ops.scattermoe.* are reachable without the public functions' checks: a strided slot-id, offsets or
    row_scale tensor, or a column-major dG or pre-activation, gives what its contiguous copy gives."""
    T, K, E, D, F = 9, 2, 3, 24, 20
    _, scattered, offsets = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K, "random", dev), E)
    x, w = torch.randn(T, D, device=dev), torch.randn(E, D, F, device=dev)
    scale, dy = torch.rand(T * K, device=dev), torch.randn(T * K, F, device=dev)
    pre, dg = torch.randn(T * K, 2 * F, device=dev), torch.randn(T * K, F, device=dev)

    def strided(t):  # the same values at stride 2
        return torch.stack([t, torch.zeros_like(t)], 1).reshape(-1)[::2]

    ops = torch.ops.scattermoe
    calls = {
        "scatter2scatter": lambda s, o, r, g: (ops.scatter2scatter(x, w, None, s, o, r, K, False, False, "triton"),),
        "group_bwd_w": lambda s, o, r, g: ops.group_bwd_w(x, dy, s, o, w, r, K, 1, False, False, True, "triton"),
        "glu_backward": lambda s, o, r, g: ops.glu_backward(pre, g, r, True, True, True, "triton"),
        "glu_backward (column-major pre)": lambda s, o, r, g: ops.glu_backward(
            pre if s.is_contiguous() else pre.t().contiguous().t(), g, r, True, True, True, "triton"),
    }
    for name, call in calls.items():
        want = call(scattered, offsets, scale, dg)
        got = call(strided(scattered), strided(offsets), strided(scale), dg.t().contiguous().t())
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, 1e-6, f"{name} output {i}")


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                 pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["gated_from_tokens", "gated_from_grouped", "gated_from_slot_rows"])
def test_fp16_gate_gradient_beyond_the_fp16_range(dev, mode):
    """d(gates) = <dY W_e^T, x> sums D products: with every operand in float16's range it can pass 65504 (here
    ~82000, as a loss-scaled dY gives). The gates are float32, and so is their gradient: finite, as the
    reference's, not inf."""
    T, E, K, D, F = 6, 3, 2, 64, 64
    routing, leaves, kw = _make_inputs(T, E, K, D, F, "random", mode, False, torch.float16, dev, torch.float32)
    with torch.no_grad():
        leaves["x"].copy_(4 + 0.1 * torch.randn_like(leaves["x"]))
        leaves["weight"].copy_(0.25 + 0.01 * torch.randn_like(leaves["weight"]))
    with scattermoe.use_backend("triton"):
        y = _call(scattermoe.parallel_linear, routing, leaves, kw)
    dy = (20 + torch.randn_like(y, dtype=torch.float32)).to(y.dtype)
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], dy)
    ref_leaves = dict(zip(names, float64_leaves([leaves[n] for n in names])))
    y_ref = _call(reference.parallel_linear, [r.cpu() for r in routing], ref_leaves, kw)
    ref_grads = torch.autograd.grad(y_ref, [ref_leaves[n] for n in names], dy.double().cpu())
    assert float(ref_grads[names.index("gates")].abs().min()) > 65504  # the case is the one it claims
    assert_all_close(["y"] + [f"d{n}" for n in names], (y,) + grads, (y_ref,) + ref_grads, TOL[torch.float16])


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
@pytest.mark.parametrize("mode", ["scatter_to_grouped", "gated_from_grouped", "gated_from_tokens"])
def test_strided_operands(backend, mode):
    """Weights as a contiguous [E, D, F] tensor, x as a column slice of a wider tensor (row-major, row stride
    > D), bias as a transposed view and gates as a column slice: the kernels honour every stride."""
    T, E, K, D, F = 33, 5, 2, 24, 40
    grouped_in, grouped_out, gated, _ = MODES[mode]
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    rows = T * K if grouped_in else T
    x = torch.randn(rows, D + 8)[:, 3:3 + D].requires_grad_()
    w = torch.randn(E, D, F).div(math.sqrt(D)).requires_grad_()  # [E, D, F] contiguous, not a permuted view
    b = torch.randn(F, E).t().requires_grad_()                    # [E, F] with strides (1, E)
    gates = torch.rand(T, 2 * K)[:, 1:1 + K].requires_grad_() if gated else None
    assert x.stride(0) == D + 8 and not b.is_contiguous()
    leaves = [t for t in (x, w, b, gates) if t is not None]
    k = 1 if grouped_in else K
    with scattermoe.use_backend(backend):
        y = scattermoe.parallel_linear(x, w, k, *routing, b, gates, grouped_in, grouped_out)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref = float64_leaves(leaves)
    y_ref = reference.parallel_linear(ref[0], ref[1], k, *routing, ref[2], ref[3] if gated else None,
                                      grouped_in, grouped_out)
    ref_grads = torch.autograd.grad(y_ref, ref, dy.double())
    names = ["y", "dx", "dweight", "dbias", "dgates"][: 1 + len(leaves)]
    assert_all_close(names, (y,) + grads, (y_ref,) + ref_grads, TOL[torch.float32])



@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_one_feature_with_any_stride_along_it(backend):
    """x [T, 1] made as a transpose ([1, T].t(): strides (1, T)) is row-major all the same, and torch calls it
    contiguous (.contiguous() returns it as it is): accepted, not refused with advice that cannot help."""
    T, E, K, F = 9, 4, 2, 12
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    x = torch.randn(1, T).t().requires_grad_()
    assert x.stride() == (1, T) and x.is_contiguous()
    w = torch.randn(E, 1, F).requires_grad_()
    gates = torch.rand(T, K).requires_grad_()
    with scattermoe.use_backend(backend):
        y = scattermoe.parallel_linear(x, w, K, *routing, gates=gates)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, gates], dy)
    ref = float64_leaves([x, w, gates])
    y_ref = reference.parallel_linear(ref[0], ref[1], K, *routing, gates=ref[2])
    ref_grads = torch.autograd.grad(y_ref, ref, dy.double())
    assert_all_close(["y", "dx", "dweight", "dgates"], (y,) + grads, (y_ref,) + ref_grads, TOL[torch.float32])

POISON_SHAPES = [
    # (T, E, K, D, F, routing case)
    pytest.param(37, 5, 2, 24, 40, "random", id="odd_sizes-empty_expert"),
    pytest.param(1, 4, 2, 16, 24, "random", id="T1"),
    pytest.param(40, 6, 2, 48, 64, "same_set", id="dup_experts-2_tiles"),
    pytest.param(21, 1, 1, 24, 20, "random", id="E1"),
]


def check_poisoned_scatter2scatter(T, E, K, D, F, case, grouped_in, grouped_out, with_bias_and_scale, dtype,
                                   device="cpu"):
    """The launcher with ``out=`` prefilled with NaN: every element must be written, with the right value."""
    idx_TK = make_expert_idxs(T, E, K, case, device)
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = scattermoe.flatten_sort_count(idx_TK, E)
    N = T * K
    x = torch.randn(N if grouped_in else T, D, device=device).to(dtype)
    w = (torch.randn(E, F, D, device=device) / math.sqrt(D)).to(dtype).permute(0, 2, 1)
    bias = torch.randn(E, F, device=device).to(dtype) if with_bias_and_scale else None
    row_scale = torch.rand(N, device=device) + 0.5 if with_bias_and_scale else None  # per slot
    out = torch.full((N, F), float("nan"), dtype=dtype, device=device)
    y = scatter2scatter(x, w, bias, sorted_scattered_idxs, expert_offsets, 1 if grouped_in else K,
                        grouped_in, grouped_out, row_scale, out=out)
    assert y.data_ptr() == out.data_ptr(), "the launcher must write into out="
    nan_rows = torch.isnan(out).any(-1).nonzero().flatten().tolist()
    assert not nan_rows, f"{len(nan_rows)} rows left unwritten (still NaN), first {nan_rows[:10]}"
    routing = [t.cpu() for t in (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)]
    ref = reference.parallel_linear(x.double().cpu(), w.double().cpu(), 1 if grouped_in else K, *routing,
                                    bias.double().cpu() if bias is not None else None, None, grouped_in, grouped_out)
    if row_scale is not None:  # row i of the output belongs to slot sorted_scattered_idxs[i] if grouped, else slot i
        slots = routing[1] if grouped_out else torch.arange(N)
        ref = ref * row_scale.double().cpu()[slots].unsqueeze(-1)
    assert_close(out, ref, TOL[dtype], "scatter2scatter out")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_bias_and_scale", [False, True], ids=["plain", "bias_and_row_scale"])
@pytest.mark.parametrize("grouped_in, grouped_out", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("T, E, K, D, F, case", POISON_SHAPES)
def test_scatter2scatter_writes_every_row_of_a_poisoned_output(T, E, K, D, F, case, grouped_in, grouped_out,
                                                              with_bias_and_scale, dtype):
    check_poisoned_scatter2scatter(T, E, K, D, F, case, grouped_in, grouped_out, with_bias_and_scale, dtype)


@pytest.mark.interpreter
def test_parallel_linear_triton_without_grad_matches_with_grad():
    """Inference (no_grad) and training run the same kernels: bitwise the same output."""
    T, E, K, D, F = 17, 4, 2, 24, 20
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    x, w, gates = torch.randn(T, D), torch.randn(E, D, F), torch.rand(T, K)
    with scattermoe.use_backend("triton"):
        with torch.no_grad():
            y_infer = scattermoe.parallel_linear(x, w, K, *routing, gates=gates)
        y_train = scattermoe.parallel_linear(x.requires_grad_(), w, K, *routing, gates=gates)
    assert torch.equal(y_infer, y_train.detach())


@pytest.mark.interpreter
def test_one_expert_with_several_column_tiles_gets_every_tile():
    """The launcher's grid and the kernel's launch order share one row-tile bound, cdiv(N, BLOCK_M) + E
    (config.num_row_tiles_bound). With one expert nearly every row tile of that bound is real, so a grid one row
    tile short leaves tiles of the last column block unwritten. y = x @ W[0], k=1, 64 rows, 72 columns."""
    T, D, F = 64, 24, 72
    routing = scattermoe.flatten_sort_count(torch.zeros(T, 1, dtype=torch.long), 1)
    x, w = torch.randn(T, D), torch.randn(1, D, F)
    with scattermoe.use_backend("triton"):
        y = scattermoe.parallel_linear(x, w, 1, *routing)
    assert_close(y, x.double() @ w[0].double(), TOL[torch.float32], "y")


@pytest.mark.interpreter
def test_triton_backend_refuses_bf16_on_the_cpu():
    """The interpreter's bf16 tl.dot is wrong upstream: the CPU triton backend must refuse bf16, not compute."""
    T, E, K, D, F = 4, 2, 1, 8, 8
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    x, w = torch.randn(T, D, dtype=torch.bfloat16), torch.randn(E, D, F, dtype=torch.bfloat16)
    with scattermoe.use_backend("triton"):
        with pytest.raises(RuntimeError, match="bfloat16"):
            scattermoe.parallel_linear(x, w, K, *routing)


def test_auto_backend_runs_bf16_on_the_cpu_through_the_reference():
    """'auto' must not pick the broken interpreter path for bf16: it falls back to the reference and is right."""
    T, E, K, D, F = 11, 3, 2, 16, 24
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    x, w = torch.randn(T, D, dtype=torch.bfloat16), torch.randn(E, D, F, dtype=torch.bfloat16)
    with scattermoe.use_backend("auto"):
        y = scattermoe.parallel_linear(x, w, K, *routing)
    ref = reference.parallel_linear(x.double(), w.double(), K, *routing)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, TOL[torch.bfloat16], "y (auto, bf16)")


def _int32_cases():
    for mode in MODES:
        yield pytest.param("triton", mode, marks=pytest.mark.interpreter, id=f"triton-{mode}")
        yield pytest.param("torch", mode, id=f"torch-{mode}")


@pytest.mark.parametrize("backend, mode", list(_int32_cases()))
def test_int32_routing_tensors(backend, mode):
    """The checks accept int32 routing tensors (as ScatterMoE users may pass): results equal the int64 ones."""
    T, E, K, D, F = 13, 4, 2, 24, 20
    routing, leaves, kw = _make_inputs(T, E, K, D, F, "random", mode, True, torch.float32, "cpu")
    routing32 = [t.int() for t in routing]
    with scattermoe.use_backend(backend):
        y32 = _call(scattermoe.parallel_linear, routing32, leaves, kw)
        y64 = _call(scattermoe.parallel_linear, routing, leaves, kw)
    dy = torch.randn_like(y64)
    names = list(leaves)
    g32 = torch.autograd.grad(y32, [leaves[n] for n in names], dy)
    g64 = torch.autograd.grad(y64, [leaves[n] for n in names], dy)
    assert_all_close(["y"] + [f"d{n}" for n in names], (y32,) + g32, (y64,) + g64, TOL[torch.float32])


def _empty_batch_cases():
    for mode in MODES:
        yield pytest.param("triton", mode, marks=pytest.mark.interpreter, id=f"triton-{mode}")
        yield pytest.param("torch", mode, id=f"torch-{mode}")


@pytest.mark.parametrize("backend, mode", list(_empty_batch_cases()))
def test_empty_batch(backend, mode):
    """T=0 tokens (an empty micro-batch, or a rank that received no tokens): empty output, zero gradients."""
    T, E, K, D, F = 0, 4, 2, 24, 20
    routing, leaves, kw = _make_inputs(T, E, K, D, F, "random", mode, True, torch.float32, "cpu")
    with scattermoe.use_backend(backend):
        y = _call(scattermoe.parallel_linear, routing, leaves, kw)
        assert y.shape == (0, F)
        names = list(leaves)
        grads = torch.autograd.grad(y, [leaves[n] for n in names], torch.zeros_like(y))
    for name, g in zip(names, grads):
        assert g.shape == leaves[name].shape and bool((g == 0).all()), f"d{name}"


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_float64_is_left_alone_under_autocast(backend):
    """torch.autocast casts float32/16 operands only: float64 x and weights stay float64, as F.linear's do
    (the torch backend computes float64; the Triton kernels refuse it by name, never silently in bf16)."""
    T, E, K, D, F = 7, 3, 2, 8, 6
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    x, w = torch.randn(T, D, dtype=torch.float64), torch.randn(E, D, F, dtype=torch.float64)
    gates = torch.rand(T, K, dtype=torch.float64)
    with scattermoe.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        if backend == "triton":
            with pytest.raises((TypeError, RuntimeError), match="float64"):
                scattermoe.parallel_linear(x, w, K, *routing, gates=gates)
            return
        y = scattermoe.parallel_linear(x, w, K, *routing, gates=gates)
    assert y.dtype == torch.float64
    assert_close(y, reference.parallel_linear(x, w, K, *routing, None, gates), 1e-12, "y (float64 under autocast)")


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["parallel_linear", "parallel_linear_glu", "glu_moe"])
def test_kernel_backends_refuse_double_backward_by_name(op):
    """A second derivative through the Triton ops raises an error naming the backend and the way out; with
    create_graph=True the first derivatives are still the plain backward's."""
    T, E, K, D, F = 6, 3, 2, 8, 6
    torch.manual_seed(5)
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    x = torch.randn(T, D, requires_grad=True)
    gates = torch.rand(T, K, requires_grad=True)
    w_in = torch.randn(E, D, 2 * F, requires_grad=True)
    w_out = torch.randn(E, F, D, requires_grad=True)

    def run(inputs=x):
        if op == "parallel_linear":
            return scattermoe.parallel_linear(inputs, w_in, K, *routing, gates=gates)
        if op == "parallel_linear_glu":
            return scattermoe.parallel_linear_glu(inputs, w_in, K, *routing)
        return scattermoe.glu_moe(inputs, w_in, w_out, gates, routing)

    message = r"the triton backend computes first derivatives only.*use_backend\('torch'\)"
    # A loss whose gradient is itself differentiable, and y.sum(), whose incoming gradient is a constant but whose
    # dx still depends on the weights: neither may lose its second-order terms silently.
    for loss in (lambda y: y.square().sum(), lambda y: y.sum()):
        with scattermoe.use_backend("triton"):
            plain = torch.autograd.grad(loss(run()), x)[0]
            dx, = torch.autograd.grad(loss(run()), x, create_graph=True)
        assert torch.equal(dx.detach(), plain)
        # The results stay tensors of their own: modified in place, as a caller may (they were custom-Function views
        # once, which autograd refuses to modify in place).
        with scattermoe.use_backend("triton"):
            for inputs in [x] + ([gates] if op != "parallel_linear_glu" else []):
                torch.autograd.grad(loss(run()), inputs, create_graph=True)[0].mul_(1.0)
        with pytest.raises(RuntimeError, match=message):
            dx.square().sum().backward()
        with pytest.raises(RuntimeError, match=message):  # beside a first-order term
            (dx.square().sum() + w_in.square().sum()).backward()
        # A gradient penalty differentiated for chosen inputs, the usual form: autograd then runs only the nodes on
        # a path to them. An error node fed detached copies was pruned: the weights' grad came back None (or
        # "not used in the graph"), and through a tanh in front of the op, dx's grad held only tanh's term.
        with scattermoe.use_backend("triton"):
            dx_tanh, = torch.autograd.grad(loss(run(torch.tanh(x))), x, create_graph=True)
        for penalty in (dx, dx_tanh):
            for inputs in ([w_in], [x]) + (([gates],) if op != "parallel_linear_glu" else ()):
                with pytest.raises(RuntimeError, match=message):
                    torch.autograd.grad(penalty.square().sum(), inputs, retain_graph=True, allow_unused=True)
                with pytest.raises(RuntimeError, match=message):
                    penalty.square().sum().backward(inputs=inputs, retain_graph=True)
    with scattermoe.use_backend("torch"):  # the way out the message names works
        dx, = torch.autograd.grad(run().square().sum(), x, create_graph=True)
        dx.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# Offsets that disagree with N (CUDA checks them only in debug mode): (expert_offsets, rows of each expert once
# the kernels clamp every end to [0, N] and every start to [0, its end]), N = 4 grouped rows, E = 2.
INCONSISTENT_OFFSETS = {
    "end_past_N": ([2, 70], [(0, 2), (2, 4)]),
    "negative": ([-3, 2], [(0, 0), (0, 2)]),
    "decreasing": ([3, 1], [(0, 3), (1, 1)]),
}


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                 pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", list(INCONSISTENT_OFFSETS))
def test_kernels_stay_in_bounds_under_inconsistent_offsets(case, dev):
    """The kernels clamp the offsets they read, so bad offsets can cost wrong rows, never memory outside the
    tensors: every operand is a view inside a larger buffer, whose rows around the view must stay untouched
    (an unclamped kernel reads the neighbours, valid slot ids, and writes past the output's end)."""
    from scattermoe.backends.triton import group_bwd_w

    offsets, expert_rows = INCONSISTENT_OFFSETS[case]
    offsets = torch.tensor(offsets, device=dev)
    N, E, D, F_, pad = 4, 2, 8, 8, 80
    slot_buf = torch.zeros(2 * pad, dtype=torch.long, device=dev)  # slot 0 past the view: an overrun reads data
    slot_buf[pad:pad + N] = torch.arange(N)
    slots = slot_buf[pad:pad + N]
    x_buf, dy_buf = torch.randn(2 * pad, D, device=dev), torch.randn(2 * pad, F_, device=dev)
    x, dy = x_buf[pad:pad + N], dy_buf[pad:pad + N]
    w = torch.randn(E, D, F_, device=dev)
    y_buf = torch.full((2 * pad, F_), float("nan"), device=dev)
    y = y_buf[pad:pad + N]
    scatter2scatter(x, w, None, slots, offsets, 1, True, True, out=y)
    assert y_buf[:pad].isnan().all() and y_buf[pad + N:].isnan().all(), "rows outside the output were written"
    written = torch.zeros(N, dtype=torch.bool, device=dev)
    for e, (start, end) in enumerate(expert_rows):
        assert_close(y[start:end], x[start:end] @ w[e], 1e-5, f"y rows {start}:{end} of expert {e}")
        written[start:end] = True
    assert y[~written].isnan().all(), "rows that no clamped expert owns were written"

    dw, _ = group_bwd_w(x, dy, slots, offsets, w, 1, 1, True, True)
    for e, (start, end) in enumerate(expert_rows):
        assert_close(dw[e], x[start:end].T @ dy[start:end], 1e-5, f"dW of expert {e}")


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                 pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("with_scale", [False, True], ids=["plain", "row_scale"])
def test_kernels_skip_rows_whose_slot_is_out_of_range(dev, with_scale):
    """Slot ids outside [0, N) (hand-made routing; checked on CUDA only in debug mode): the kernels neither read
    nor write those rows, so the memory around every operand stays untouched (each is a view inside a larger
    buffer) and the valid rows are exact; the rows nobody owns stay as they were."""
    from scattermoe.backends.triton import group_bwd_w

    N, E, D, F_, fan, pad = 4, 2, 8, 8, 2, 80
    offsets = torch.tensor([2, 4], device=dev)              # rows 0-1 on expert 0, rows 2-3 on expert 1
    slots = torch.tensor([3, -7, 0, 2**40], device=dev)     # rows 1 and 3 carry bad slots
    valid = [(0, 3, 0), (2, 0, 1)]                          # (row, slot, expert)
    x_buf = torch.full((2 * pad, D), float("nan"), device=dev)  # NaN around x: a read outside x poisons sums
    x = x_buf[pad:pad + N // fan]
    x.copy_(torch.randn(N // fan, D))
    w = torch.randn(E, D, F_, device=dev)
    scale = torch.rand(N, device=dev) if with_scale else None
    y_buf = torch.full((2 * pad, F_), float("nan"), device=dev)
    y = y_buf[pad:pad + N]
    scatter2scatter(x, w, None, slots, offsets, fan, False, False, out=y, row_scale=scale)
    assert y_buf[:pad].isnan().all() and y_buf[pad + N:].isnan().all(), "rows outside the output were written"
    for row, slot, e in valid:
        want = x[slot // fan] @ w[e] * (scale[slot] if with_scale else 1.0)
        assert_close(y[slot], want, 1e-5, f"y row of slot {slot}")
    assert y[[1, 2]].isnan().all(), "rows of no valid slot were written"  # slots 1 and 2 are nobody's

    dy_buf = torch.full((2 * pad, F_), float("nan"), device=dev)
    dy = dy_buf[pad:pad + N // fan]
    dy.copy_(torch.randn(N // fan, F_))
    dw, _ = group_bwd_w(x, dy, slots, offsets, w, fan, fan, False, False, row_scale=scale)
    for _, slot, e in valid:
        s = scale[slot] if with_scale else 1.0
        assert_close(dw[e], torch.outer(x[slot // fan], dy[slot // fan]) * s, 1e-5, f"dW of expert {e}")


@pytest.mark.interpreter
@pytest.mark.parametrize("gate", [1e-7, 1e5], ids=["tiny", "huge"])
@pytest.mark.parametrize("path", ["grouped_in", "fanned_out"])
def test_float32_gates_scale_a_float16_dx_in_float32(path, gate):
    """float16 x beside float32 gates (a float32 router's, part of the contract): dX took the gates cast to float16,
    subnormal below 6e-5 (at 1e-7, a few bits), 0 below ~3e-8 and inf above 65504 (dX all inf under a finite
    output). Both gated paths: rows already grouped (MLP's second layer, MoA.reduce) and x [T, D] fanned out to
    K slots."""
    T, E, K, D, F = 6, 3, 2, 8, 5
    torch.manual_seed(11)
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    gates = gate * (1 + torch.rand(T, K))
    w = torch.randn(E, D, F).half()
    x = (torch.randn(T * K if path == "grouped_in" else T, D) * (1e-3 if gate > 1 else 1)).half().requires_grad_()
    k = 1 if path == "grouped_in" else K
    # dY as a loss scale makes it, so that dX itself is a normal float16 (with tiny gates) and stays finite (huge)
    dy = torch.randn(T, F).half() * (1e-3 if gate > 1 else 1e3)
    with scattermoe.use_backend("triton"):
        y = scattermoe.parallel_linear(x, w, k, *routing, gates=gates, grouped_in=path == "grouped_in")
        y.backward(dy)
    assert torch.isfinite(y).all()
    x64 = x.detach().double().requires_grad_()
    reference.parallel_linear(x64, w.double(), k, *routing, None, gates.double(),
                              grouped_in=path == "grouped_in").backward(dy.double())
    assert_close(x.grad, x64.grad, TOL[torch.float16], "dx")
