"""The cutlass grouped GEMM on an H100/H200 against the float64 reference and the Triton backend.

Not run yet: written on a machine with no GPU (see csrc/README.md). Skipped with a reason
without CUDA, without an sm_90 GPU, or without the extension. The extension comes from the
install (scattermoe._C), from SCATTERMOE_CSRC_MODULE, or else is built once into
build/csrc-cache/ by csrc/build.py (needs nvcc, pybind11 and nvidia-cutlass==4.2.0.0).

Strict mode is on in every test: a call that silently fell back to Triton would fail, so
a pass means the csrc kernel produced the numbers.
"""

from __future__ import annotations

import importlib.util
import os
import types
import zlib

import pytest
import torch
from helpers import per_expert_wgrad

import reference

pytestmark = [pytest.mark.gpu, pytest.mark.csrc_build]  # csrc_build: after the other tests (conftest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}  # DESIGN.md section 5


def _sm90_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module")
def cutlass():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _sm90_available():
        major, minor = torch.cuda.get_device_capability()
        pytest.skip(f"the csrc kernels are sm_90a only; this GPU is sm_{major}{minor}")
    from scattermoe.backends.cutlass import _extension

    if _extension.load()[0] is None and not os.environ.get("SCATTERMOE_CSRC_MODULE"):
        spec = importlib.util.spec_from_file_location("scattermoe_csrc_build", os.path.join(REPO, "csrc", "build.py"))
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        if build.missing_tools():
            pytest.skip("scattermoe._C is not installed and cannot be built here: " + "; ".join(build.missing_tools()))
        info = build.cached_build(os.path.join(REPO, "build", "csrc-cache"))
        os.environ["SCATTERMOE_CSRC_MODULE"] = info["module"]
        _extension.load.cache_clear()
        _extension.probe.cache_clear()
    from scattermoe.backends import cutlass as backend

    reason = backend.unsupported_reason(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    if reason is not None:
        pytest.skip(reason)
    backend.set_strict(True)
    yield backend
    backend.set_strict(False)


def routing(counts, device="cuda", offsets_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sorted_expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    scattered = torch.randperm(int(sum(counts)), generator=g)
    offsets = torch.tensor(counts, dtype=torch.long).cumsum(0).to(offsets_dtype)
    return sorted_expert.to(device), scattered.to(device), offsets.to(device)


def make_inputs(counts, k_in, n_out, dtype, w_layout, bias, seed):
    g = torch.Generator().manual_seed(seed)
    num_experts, n = len(counts), int(sum(counts))
    x = torch.randn(n, k_in, generator=g).to(dtype)
    if w_layout == "k_major":  # ParallelExperts.weight [E, F, K].permute(0, 2, 1)
        w = (torch.randn(num_experts, n_out, k_in, generator=g) / k_in**0.5).to(dtype).permute(0, 2, 1)
    else:  # [E, K, F] contiguous, like the transposed weight of the dX GEMM
        w = (torch.randn(num_experts, k_in, n_out, generator=g) / k_in**0.5).to(dtype)
    b = torch.randn(num_experts, n_out, generator=g).to(dtype) if bias else None
    return x, w, b


def reference_rows(x, w, b, k, sorted_expert, scattered, offsets, grouped_in, grouped_out):
    """float64 [N, F]: x's rows (grouped, or token slot // k) times w[e] (+ b[e]), placed like the kernel's
    output (grouped or by slot), by the oracle (expert by expert: no [N, K, F] gather of the weights)."""
    return reference.parallel_linear(x.double(), w.double(), 1 if grouped_in else k, sorted_expert, scattered,
                                     offsets, b.double() if b is not None else None, None, grouped_in, grouped_out)


def scatter_case(counts, k_in, w_cols, dtype, w_layout, grouped_in, grouped_out, gated, seed, k=2):
    """One scatter-GEMM call, k=2 with bias: its CPU inputs, h = the float64 rows placed like the output,
    and row_gates, the gate of each output row ([N, 1]; None ungated)."""
    x, w, b = make_inputs(counts, k_in, w_cols, dtype, w_layout, True, seed)
    sorted_expert, scattered, offsets = routing(counts, "cpu", torch.int64, seed)
    n = int(sum(counts))
    g = torch.Generator().manual_seed(seed)
    x_in = x if grouped_in else torch.randn(n // k, k_in, generator=g).to(dtype)
    gates = torch.rand(n // k, k, generator=g) if gated else None
    h = reference_rows(x_in, w, b, k, sorted_expert, scattered, offsets, grouped_in, grouped_out)
    slots = scattered if grouped_out else torch.arange(n)
    row_gates = gates.double().reshape(-1)[slots].unsqueeze(1) if gated else None
    return types.SimpleNamespace(x=x_in, w=w, b=b, scattered=scattered, offsets=offsets, gates=gates, h=h,
                                 row_gates=row_gates, n=n, k=k)


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in the output: some rows were never written"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


SHAPES = [
    # (counts per expert, K, F, what it tests)
    ([37, 0, 129, 64], 256, 512, "an expert with zero tokens"),
    ([0, 0, 0, 300, 0, 0, 0, 0], 128, 256, "all tokens on one expert"),
    ([0, 1, 0, 0], 64, 128, "T=1"),
    ([131, 7, 255], 72, 200, "K, F and rows not multiples of the 128x128x64 tile"),
    ([513], 512, 136, "E=1"),
    ([1, 2, 0, 700, 3, 0, 90, 5] * 8, 64, 64, "E=64, very uneven (Zipf-like)"),
    ([512] * 8, 2048, 1408, "JetMoE-like, balanced"),
]


@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("counts,k_in,n_out,name", SHAPES, ids=[s[-1] for s in SHAPES])
def test_grouped_gemm_matches_reference(cutlass, counts, k_in, n_out, name, dtype, w_layout, bias, offsets_dtype):
    seed = zlib.crc32(f"{name}-{dtype}-{w_layout}-{bias}".encode())
    x, w, b = make_inputs(counts, k_in, n_out, dtype, w_layout, bias, seed)
    sorted_expert, scattered, offsets = routing(counts, "cpu", offsets_dtype, seed)
    ref = reference.parallel_linear(x.double(), w.double(), 1, sorted_expert, scattered, offsets.long(),
                                    b.double() if b is not None else None, None, True, True)
    xd, wd = x.cuda(), w.cuda()  # .cuda() keeps the permuted strides of a k-major w
    bd = b.cuda() if b is not None else None
    out = torch.full((x.size(0), n_out), float("nan"), dtype=dtype, device="cuda")  # poison
    y = cutlass.scatter2scatter(xd, wd, bd, scattered.cuda(), offsets.cuda(), 1, True, True, out=out)
    torch.cuda.synchronize()
    err = rel_err(y, ref)
    print(f"\n{name} {dtype} {w_layout} bias={bias}: rel err {err:.2e}, "
          f"max abs {(y.double().cpu() - ref).abs().max().item():.3e}")
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


SCATTER_SHAPES = [
    # (counts per expert, K, F, what it tests); rows are T*k slots, k=2
    ([38, 0, 130, 64], 256, 512, "an expert with zero tokens"),
    ([0, 0, 300, 0], 128, 256, "all tokens on one expert"),
    ([0, 2, 0, 0], 64, 128, "T=1 (two slots of one token on one expert)"),
    ([131, 7, 256], 72, 200, "K, F and rows not multiples of the 128x128x64 tile"),
    ([2, 4, 0, 700, 2, 0, 90, 6] * 8, 64, 64, "E=64, very uneven"),
]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("grouped_in,grouped_out", [(False, True), (True, False), (False, False), (True, True)])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("counts,k_in,n_out,name", SCATTER_SHAPES, ids=[s[-1] for s in SCATTER_SHAPES])
def test_scatter_gemm_matches_reference(cutlass, counts, k_in, n_out, name, dtype, w_layout, grouped_in,
                                        grouped_out, gated):
    """The csrc scatter GEMM (gather on load, scatter on store, gates), k=2, against the float64 contract:
    y[r or slot] = (x[r or slot // 2] @ w[e] + b[e]) * gates[slot]. The output is poisoned first."""
    if grouped_in and grouped_out and not gated:
        pytest.skip("grouped in and out without gates is the TMA grouped GEMM (test_grouped_gemm_matches_reference)")
    seed = zlib.crc32(f"scatter-{name}-{dtype}-{w_layout}-{grouped_in}-{grouped_out}-{gated}".encode())
    c = scatter_case(counts, k_in, n_out, dtype, w_layout, grouped_in, grouped_out, gated, seed)
    ref = c.h * c.row_gates if gated else c.h
    out = torch.full((c.n, n_out), float("nan"), dtype=dtype, device="cuda")  # poison: every row must be written
    y = cutlass.scatter2scatter(c.x.cuda(), c.w.cuda(), c.b.cuda(), c.scattered.cuda(), c.offsets.cuda(), c.k,
                                grouped_in, grouped_out, row_scale=c.gates.cuda() if gated else None, out=out)
    torch.cuda.synchronize()
    err = rel_err(y, ref)
    print(f"\n{name} {dtype} {w_layout} in={grouped_in} out={grouped_out} gated={gated}: rel err {err:.2e}")
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


GLU_SHAPES = [
    # (counts per expert, K, F (half of W's width), what it tests); k=2
    ([38, 0, 130, 64], 256, 256, "an expert with zero tokens"),
    ([0, 2, 0, 0], 64, 64, "T=1"),
    ([131, 7, 256], 72, 200, "F not a multiple of the 64-column half tile"),
    ([131, 7, 256], 64, 36, "F not a multiple of 8: partial 16-byte chunks"),
]


@pytest.mark.parametrize("glu,keep_pre", [(1, True), (2, False)])  # JetMoE's order with h kept (training);
                                                                    # the other order without (inference)
@pytest.mark.parametrize("grouped_in,grouped_out,gated", [(False, True, False), (True, False, True),
                                                          (True, True, False), (False, False, True)])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("counts,k_in,half,name", GLU_SHAPES, ids=[s[-1] for s in GLU_SHAPES])
def test_scatter_gemm_glu_matches_reference(cutlass, counts, k_in, half, name, dtype, w_layout, grouped_in,
                                            grouped_out, gated, glu, keep_pre):
    """The GLU epilogue against float64: h = x @ w[e] + b[e] (2F wide), y = GLU(h) (* gates) (F wide), and the
    kept pre-activation h, rows placed like y. Outputs poisoned first."""
    if w_layout == "f_major" and half % 8:
        pytest.skip("an F-major W needs F % 8 == 0 (the plan sends it to Triton; test_cutlass_backend checks that)")
    seed = zlib.crc32(f"glu-{name}-{dtype}-{w_layout}-{grouped_in}-{grouped_out}-{gated}-{glu}".encode())
    c = scatter_case(counts, k_in, 2 * half, dtype, w_layout, grouped_in, grouped_out, gated, seed)
    ref_y = reference.glu(c.h, torch.nn.functional.silu, glu == 1)
    if gated:
        ref_y *= c.row_gates
    out = torch.full((c.n, half), float("nan"), dtype=dtype, device="cuda")  # poison: every element must be written
    pre = torch.full((c.n, 2 * half), float("nan"), dtype=dtype, device="cuda") if keep_pre else None
    y = cutlass.scatter2scatter(c.x.cuda(), c.w.cuda(), c.b.cuda(), c.scattered.cuda(), c.offsets.cuda(), c.k,
                                grouped_in, grouped_out, row_scale=c.gates.cuda() if gated else None, out=out,
                                glu=glu, pre_activation=pre)
    torch.cuda.synchronize()
    err = rel_err(y, ref_y)
    print(f"\n{name} {dtype} {w_layout} glu={glu} in={grouped_in} out={grouped_out} gated={gated}: rel err {err:.2e}")
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"
    if keep_pre:
        assert rel_err(pre, c.h) < TOLERANCE[dtype]


def test_glu_rows_with_odd_strides_take_the_element_store_path(cutlass):
    """Output rows whose starts are not 16-byte aligned (row stride 100 + 3 elements): the epilogue must fall
    back to element stores there, not write a misaligned 16-byte vector (which faults)."""
    counts = [70, 0, 58]
    x, w, b = make_inputs(counts, 128, 2 * 96, torch.bfloat16, "k_major", True, 21)
    sorted_expert, scattered, offsets = routing(counts, "cpu", torch.int64, 21)
    h = reference_rows(x, w, b, 1, sorted_expert, scattered, offsets, True, True)
    ref = reference.glu(h, torch.nn.functional.silu, True)
    wide = torch.full((128, 103), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = wide[:, 3:99]  # row stride 103, base 6 bytes past the allocation
    y = cutlass.scatter2scatter(x.cuda(), w.cuda(), b.cuda(), scattered.cuda(), offsets.cuda(), 1, True, True,
                                out=out, glu=1)
    torch.cuda.synchronize()
    assert rel_err(y, ref) < TOLERANCE[torch.bfloat16]
    assert torch.isnan(wide[:, :3]).all() and torch.isnan(wide[:, 99:]).all(), "wrote outside the output columns"


WGRAD_SHAPES = [
    # (counts per expert, K, F, what it tests); k=2 where rows are gathered
    ([38, 0, 130, 64], 256, 512, "an expert with zero tokens (its dW must be written as zeros)"),
    ([0, 2, 0, 0], 64, 128, "T=1"),
    ([131, 7, 256], 72, 200, "K, F and rows not multiples of the 128x128x64 tile"),
    ([2, 4, 0, 700, 2, 0, 90, 6] * 8, 64, 64, "E=64, very uneven"),
]


# Every gather combination plain; the row scale and db (the producer's deferred path) on the two the gated
# backward uses: MLP's second GEMM (x grouped, dY gathered from tokens) and MoA's output (both gathered).
WGRAD_MODES = [(xg, dg, False, False) for xg, dg in [(False, True), (True, False), (True, True), (False, False)]] + [
    (xg, dg, scaled, with_bias) for xg, dg in [(True, False), (False, False)]
    for scaled, with_bias in [(True, False), (False, True), (True, True)]]


@pytest.mark.parametrize("x_grouped,dy_grouped,scaled,with_bias", WGRAD_MODES,
                         ids=[f"x_{'grouped' if m[0] else 'gathered'}-dy_{'grouped' if m[1] else 'gathered'}"
                              + "-row_scale" * m[2] + "-db" * m[3] for m in WGRAD_MODES])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("counts,k_in,n_out,name", WGRAD_SHAPES, ids=[s[-1] for s in WGRAD_SHAPES])
def test_group_bwd_w_matches_reference(cutlass, counts, k_in, n_out, name, dtype, w_layout, x_grouped, dy_grouped,
                                       scaled, with_bias):
    """dW[e] = X_e^T (s dY_e) with rows gathered by slot // 2 where not grouped and s = row_scale[slot] (the gated
    backward; scaled in shared memory after the copy lands) or 1, and db[e] = the column sums of s dY_e, against
    float64; dW strided like the weight (k-major: ParallelExperts' layout, stored transposed by the epilogue);
    dW and db poisoned first."""
    k = 2
    seed = zlib.crc32(f"wgrad-{name}-{dtype}-{w_layout}-{x_grouped}-{dy_grouped}-{scaled}-{with_bias}".encode())
    _, w, _ = make_inputs(counts, k_in, n_out, dtype, w_layout, False, seed)
    sorted_expert, scattered, offsets = routing(counts, "cpu", torch.int64, seed)
    n = int(sum(counts))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n if x_grouped else n // k, k_in, generator=g).to(dtype)
    dy = torch.randn(n if dy_grouped else n // k, n_out, generator=g).to(dtype)
    xs = x.double()[torch.arange(n) if x_grouped else scattered // k]
    dys = dy.double()[torch.arange(n) if dy_grouped else scattered // k]
    gates = torch.rand(n, generator=g) + 0.5 if scaled else None  # by slot
    if scaled:
        dys = dys * gates.double()[scattered].unsqueeze(1)
    ref = per_expert_wgrad(xs, dys, sorted_expert, len(counts))
    w_gpu = w.cuda()
    gates_gpu = gates.cuda() if scaled else None
    from scattermoe.backends.cutlass import weight_grad

    p = weight_grad.plan(x.cuda(), dy.cuda(), offsets.cuda(), w_gpu, n, gates_gpu)
    assert not isinstance(p, str), p
    dw = torch.empty_like(w_gpu).fill_(float("nan"))  # poison, strided like the weight
    db = torch.full((len(counts), n_out), float("nan"), device="cuda", dtype=dtype) if with_bias else None
    weight_grad.launch(p, x.cuda(), dy.cuda(), scattered.cuda(), offsets.cuda(), k, k, x_grouped, dy_grouped, dw,
                       gates_gpu, db)
    torch.cuda.synchronize()
    if with_bias:
        ref_db = torch.zeros(len(counts), n_out, dtype=torch.float64).index_add_(0, sorted_expert, dys)
        assert rel_err(db, ref_db) < TOLERANCE[dtype], f"{name}: db relative error {rel_err(db, ref_db):.2e}"
        assert all((db[e] == 0).all() for e, c in enumerate(counts) if c == 0), "an empty expert's db is not zero"
    err = rel_err(dw, ref)
    print(f"\n{name} {dtype} {w_layout} x_grouped={x_grouped} dy_grouped={dy_grouped} scaled={scaled} "
          f"db={with_bias}: "
          f"rel err {err:.2e}")
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert all((dw[e] == 0).all() for e in empty), "an empty expert's dW is not zero"


@pytest.mark.parametrize("backend_name", ["cutlass", "triton"])
def test_group_bwd_w_largest_first_equals_index_order(request, monkeypatch, backend_name):
    """With 16 experts or more (and enough rows) the dW kernels launch the experts largest first: the same
    programs in another order, so dW and db must equal the index-order launch's bit for bit, and the reference;
    E=64 very uneven experts, some empty (their dW and db zeros), gated with db; both poisoned first."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from scattermoe.backends import _schedule
    from scattermoe.backends import triton as triton_backend
    from scattermoe.backends.cutlass import weight_grad

    if backend_name == "cutlass":
        request.getfixturevalue("cutlass")
    counts, k_in, n_out, k = [2, 4, 0, 700, 2, 0, 90, 6] * 8, 64, 64, 2
    _, w, _ = make_inputs(counts, k_in, n_out, torch.bfloat16, "k_major", False, 5)
    sorted_expert, scattered, offsets = routing(counts, "cuda", torch.int64, 5)
    n = int(sum(counts))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, k_in, generator=g).to(torch.bfloat16).cuda()
    dy = torch.randn(n // k, n_out, generator=g).to(torch.bfloat16).cuda()
    gates = (torch.rand(n, generator=g) + 0.5).cuda()
    w = w.cuda()

    def run(min_rows):
        monkeypatch.setattr(_schedule, "LARGEST_FIRST_MIN_ROWS", min_rows)
        assert (_schedule.largest_experts_first(offsets, n, len(counts)) is None) == (min_rows > n)
        if backend_name == "triton":
            dw, db = triton_backend.group_bwd_w(x, dy, scattered, offsets, w, 1, k, True, False, gates, True)
        else:
            p = weight_grad.plan(x, dy, offsets, w, n, gates)
            assert not isinstance(p, str), p
            dw = torch.empty_like(w).fill_(float("nan"))
            db = torch.full((len(counts), n_out), float("nan"), device="cuda", dtype=torch.bfloat16)
            weight_grad.launch(p, x, dy, scattered, offsets, 1, k, True, False, dw, gates, db)
        torch.cuda.synchronize()
        return dw, db

    dw, db = run(1)
    dw_index, db_index = run(n + 1)
    assert torch.equal(dw, dw_index) and torch.equal(db, db_index), "largest-first differs from index order"
    dys = dy.double().cpu()[scattered.cpu() // k] * gates.double().cpu()[scattered.cpu()].unsqueeze(1)
    ref = per_expert_wgrad(x.double().cpu(), dys, sorted_expert.cpu(), len(counts))
    assert rel_err(dw, ref) < TOLERANCE[torch.bfloat16], f"dW relative error {rel_err(dw, ref):.2e}"
    assert all((dw[e] == 0).all() and (db[e] == 0).all() for e, c in enumerate(counts) if c == 0)


def test_group_bwd_w_with_no_rows_writes_zeros(cutlass):
    w = torch.randn(3, 64, 32, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    dy = torch.empty(0, 32, device="cuda", dtype=torch.bfloat16)
    idx = torch.empty(0, dtype=torch.long, device="cuda")
    dw, db = cutlass.group_bwd_w(x, dy, idx, torch.zeros(3, dtype=torch.long, device="cuda"), w, 1, 1, True, True)
    torch.cuda.synchronize()
    assert db is None and dw.shape == w.shape and (dw == 0).all()


def test_jetmoe_sized_gemms_match_reference(cutlass):
    """The four csrc GEMMs of a JetMoE-8B MoE layer at its width (D=2048, F=5632, E=8, k=2), T=2048 tokens,
    bf16, uniform routing: the GLU first GEMM (tokens gathered, rows grouped, pre-activation kept), the gated
    second GEMM (rows scattered to slots), a dX GEMM (the F-major transposed weight) and a dW. Poisoned outputs,
    float64 references expert by expert. The full matrices above use small shapes; this is the size that runs."""
    from scattermoe.backends.cutlass import weight_grad

    D, F_, E, k, T = 2048, 5632, 8, 2, 2048
    n = T * k
    g = torch.Generator().manual_seed(2048)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    sorted_expert, order = idx.view(-1).sort(stable=True)
    scattered = order
    offsets = torch.bincount(sorted_expert, minlength=E).cumsum(0)
    dt = torch.bfloat16
    x = torch.randn(T, D, generator=g).to(dt)
    w1 = (torch.randn(E, 2 * F_, D, generator=g) / D**0.5).to(dt).permute(0, 2, 1)  # [E, D, 2F], k-major
    w2 = (torch.randn(E, D, F_, generator=g) / F_**0.5).to(dt).permute(0, 2, 1)     # [E, F, D], k-major
    gates = torch.rand(T, k, generator=g)
    cuda = dict(device="cuda")
    xd, w1d, w2d, sd, od = x.cuda(), w1.cuda(), w2.cuda(), scattered.cuda(), offsets.cuda()

    # 1. GLU first GEMM: gathered tokens -> grouped rows, h kept.
    h_ref = reference_rows(x, w1, None, k, sorted_expert, scattered, offsets, False, True)
    g_ref = reference.glu(h_ref, torch.nn.functional.silu, True)
    g_out = torch.full((n, F_), float("nan"), dtype=dt, **cuda)
    pre = torch.full((n, 2 * F_), float("nan"), dtype=dt, **cuda)
    cutlass.scatter2scatter(xd, w1d, None, sd, od, k, False, True, out=g_out, glu=1, pre_activation=pre)
    # 2. Gated second GEMM: grouped rows -> slots, times the gates (the k-way sum is ops.py's).
    y_ref = reference_rows(g_out.cpu(), w2, None, k, sorted_expert, scattered, offsets, True, False) \
        * gates.double().view(-1, 1)  # slot order: row s times gates[s]
    y = torch.full((n, D), float("nan"), dtype=dt, **cuda)
    cutlass.scatter2scatter(g_out, w2d, None, sd, od, 1, True, False, row_scale=gates.cuda(), out=y)
    # 3. dX GEMM of the second projection: dY [T, D] gathered by slot // k, times W2^T (F-major view).
    dy = torch.randn(T, D, generator=g).to(dt)
    dg_ref = reference_rows(dy, w2.transpose(1, 2), None, k, sorted_expert, scattered, offsets, False, True)
    dg = torch.full((n, F_), float("nan"), dtype=dt, **cuda)
    cutlass.scatter2scatter(dy.cuda(), w2d.transpose(1, 2), None, sd, od, k, False, True, out=dg)
    # 4. dW of the first projection: x gathered, dH grouped (here: the kept pre-activation as a stand-in).
    dw_ref = per_expert_wgrad(x.double()[scattered // k], pre.double().cpu(), sorted_expert, E)
    p = weight_grad.plan(xd, pre, od, w1d, n, None)
    assert not isinstance(p, str), p
    dw = torch.empty_like(w1d).fill_(float("nan"))
    weight_grad.launch(p, xd, pre, sd, od, k, 1, False, True, dw)
    torch.cuda.synchronize()
    errors = {"h": rel_err(pre, h_ref), "glu": rel_err(g_out, g_ref), "y": rel_err(y, y_ref),
              "dX": rel_err(dg, dg_ref), "dW": rel_err(dw, dw_ref)}
    print("\nJetMoE-sized csrc GEMMs, bf16, rel err:", {name: f"{e:.2e}" for name, e in errors.items()})
    assert all(e < TOLERANCE[dt] for e in errors.values()), errors


@pytest.mark.parametrize("activate_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows,f,row_pad", [(37, 45, 0), (300, 1408, 0), (64, 256, 3)],
                         ids=["F odd", "F=1408", "rows not 16-byte aligned"])
def test_glu_backward_matches_reference(cutlass, rows, f, row_pad, dtype, activate_first):
    """dH, s * G and <dG, G> of the csrc pass against autograd through reference.glu in float64; outputs are
    fresh allocations (every element must be written: NaN checks), inputs with padded rows where asked."""
    g = torch.Generator().manual_seed(rows + f)
    # Sliced on the GPU: .cuda() of a column slice would make it contiguous again.
    pre = torch.randn(rows, 2 * f + row_pad, generator=g).to(dtype).cuda()[:, :2 * f]
    dg = torch.randn(rows, f + row_pad, generator=g).to(dtype).cuda()[:, :f]
    assert pre.stride(0) == 2 * f + row_pad and dg.stride(0) == f + row_pad
    scale = torch.rand(rows, generator=g)
    dh, gs, dot = cutlass.glu_backward(pre, dg, activate_first, scale.cuda(), True, True)
    torch.cuda.synchronize()
    h = pre.double().requires_grad_()
    glu = reference.glu(h, torch.nn.functional.silu, activate_first)
    (dh_ref,) = torch.autograd.grad(glu, h, dg.double() * scale.double()[:, None])
    glu = glu.detach()
    assert rel_err(dh, dh_ref) < TOLERANCE[dtype]
    assert rel_err(gs, glu * scale.double()[:, None]) < TOLERANCE[dtype]
    assert rel_err(dot, (dg.double() * glu).sum(-1)) < TOLERANCE[dtype]


def test_cutlass_and_triton_agree(cutlass):
    from scattermoe.backends import triton as triton_backend

    counts = [100, 0, 333, 1, 64, 17, 0, 250]
    x, w, b = make_inputs(counts, 1024, 768, torch.bfloat16, "k_major", True, 7)
    _, scattered, offsets = routing(counts)
    args = (x.cuda(), w.cuda(), b.cuda(), scattered, offsets, 1, True, True)
    y_cutlass = cutlass.scatter2scatter(*args)
    y_triton = triton_backend.scatter2scatter(*args)
    assert rel_err(y_cutlass, y_triton) < 2e-2


def test_runs_on_the_current_stream_without_host_sync(cutlass):
    counts = [50, 0, 70]
    x, w, _ = make_inputs(counts, 128, 256, torch.float16, "k_major", False, 3)
    sorted_expert, scattered, offsets = routing(counts)
    x, w = x.cuda(), w.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call in the wrapper raises
        try:
            y = cutlass.scatter2scatter(x, w, None, scattered, offsets, 1, True, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    side.synchronize()
    ref = reference.parallel_linear(x.double().cpu(), w.double().cpu(), 1, sorted_expert.cpu(), scattered.cpu(),
                                    offsets.cpu(), None, None, True, True)
    assert rel_err(y, ref) < TOLERANCE[torch.float16]


def test_offsets_beyond_the_rows_are_clamped_not_read_out_of_bounds(cutlass):
    # Inconsistent routing (offsets past N) must neither fault nor write past y: the setup kernel clamps.
    x, w, _ = make_inputs([16, 16], 64, 64, torch.bfloat16, "k_major", False, 1)
    offsets = torch.tensor([16, 10_000], device="cuda")
    scattered = torch.arange(32, device="cuda")
    y = cutlass.scatter2scatter(x.cuda(), w.cuda(), None, scattered, offsets, 1, True, True)
    torch.cuda.synchronize()
    assert y.shape == (32, 64) and not torch.isnan(y).any()


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_rows_whose_slot_is_out_of_range_are_skipped(cutlass, gated):
    """As the Triton kernels (test_parallel_linear.py): a slot outside [0, N) (hand-made routing) is neither read
    nor written by the scatter GEMM and adds nothing to dW (strict mode: on csrc, no fallback); the memory around
    each operand, a view inside a NaN buffer, stays untouched, and 2**40 is not truncated to a valid slot."""
    N, E, D, F_, fan, pad = 4, 2, 64, 64, 2, 64
    offsets = torch.tensor([2, 4], device="cuda")               # rows 0-1 on expert 0, rows 2-3 on expert 1
    slots = torch.tensor([3, -7, 0, 2**40], device="cuda")      # rows 1 and 3 carry bad slots
    valid = [(3, 0), (0, 1)]                                    # (slot, expert)
    x_buf = torch.full((2 * pad, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    x = x_buf[pad:pad + N // fan]
    x.copy_(torch.randn(N // fan, D))
    w = torch.randn(E, F_, D, device="cuda").to(torch.bfloat16).permute(0, 2, 1)  # [E, D, F], K-major
    scale = torch.rand(N, device="cuda") if gated else None
    y_buf = torch.full((2 * pad, F_), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = y_buf[pad:pad + N]
    cutlass.scatter2scatter(x, w, None, slots, offsets, fan, False, False, row_scale=scale, out=y)
    torch.cuda.synchronize()
    assert y_buf[:pad].isnan().all() and y_buf[pad + N:].isnan().all(), "rows outside the output were written"
    assert y[[1, 2]].isnan().all(), "rows of no valid slot were written"
    for slot, e in valid:
        want = x[slot // fan].double() @ w[e].double() * (scale[slot].double() if gated else 1.0)
        err = ((y[slot].double() - want).norm() / want.norm()).item()
        assert err < TOLERANCE[torch.bfloat16], f"y row of slot {slot}: rel err {err:.2e}"

    dy_buf = torch.full((2 * pad, F_), float("nan"), device="cuda", dtype=torch.bfloat16)
    dy = dy_buf[pad:pad + N // fan]
    dy.copy_(torch.randn(N // fan, F_))
    dw, _ = cutlass.group_bwd_w(x, dy, slots, offsets, w, fan, fan, False, False, row_scale=scale)
    torch.cuda.synchronize()
    for slot, e in valid:
        s = scale[slot].double() if gated else 1.0
        want = torch.outer(x[slot // fan].double(), dy[slot // fan].double()) * s
        err = ((dw[e].double() - want).norm() / want.norm()).item()
        assert err < TOLERANCE[torch.bfloat16], f"dW of expert {e}: rel err {err:.2e}"


def test_through_parallel_linear_when_the_backend_is_wired(cutlass):
    import scattermoe
    from scattermoe import backends

    if "not built" in (backends.cutlass_unsupported_reason(torch.empty(1, device="cuda")) or ""):
        pytest.skip("scattermoe.backends does not route 'cutlass' to scattermoe.backends.cutlass yet")
    counts = [40, 0, 88, 1]
    x, w, b = make_inputs(counts, 256, 128, torch.bfloat16, "k_major", True, 11)
    sorted_expert, scattered, offsets = routing(counts)
    ref = reference.parallel_linear(x.double(), w.double(), 1, sorted_expert.cpu(), scattered.cpu(), offsets.cpu(),
                                    b.double(), None, True, True)
    with scattermoe.use_backend("cutlass"):
        y = scattermoe.parallel_linear(x.cuda(), w.cuda(), 1, sorted_expert, scattered, offsets, b.cuda(),
                                       grouped_in=True, grouped_out=True)
    assert rel_err(y, ref) < TOLERANCE[torch.bfloat16]


# ----------------------------------------------------------------------------- whole ops and layers

@pytest.fixture
def cutlass_with_fallbacks(cutlass):
    """The cutlass backend as users get it: csrc where it can, Triton for what it cannot take. Yields the
    fallback counter, cleared; the tests check that nothing fell back (every piece of these ops is in csrc)."""
    from scattermoe.backends.cutlass import dispatch

    cutlass.set_strict(False)
    dispatch.FALLBACKS.clear()
    yield dispatch.FALLBACKS
    cutlass.set_strict(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["scatter_to_grouped", "grouped_to_grouped", "gated_from_tokens", "gated_from_grouped",
                                  "gated_from_slot_rows"])
def test_parallel_linear_forward_and_backward_on_cutlass(cutlass_with_fallbacks, mode, dtype):
    from test_parallel_linear import check_against_reference

    check_against_reference("cutlass", 1000, 8, 2, 256, 384, "random", mode, True, dtype, device="cuda")
    assert not cutlass_with_fallbacks, dict(cutlass_with_fallbacks)  # bias gradient included


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("layer_name", ["mlp_gelu", "glu_silu_second", "glu_silu_first", "glu_gelu"])
def test_mlp_layers_on_cutlass(cutlass_with_fallbacks, layer_name, bias, dtype):
    from test_layers import check_mlp_layer

    check_mlp_layer(layer_name, 4, 250, 256, 384, 8, 2, bias, "cutlass", dtype=dtype, device="cuda", per_token=False)
    assert not cutlass_with_fallbacks, dict(cutlass_with_fallbacks)  # dW, db and the GLU backward included


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("layer_name", ["mlp_gelu", "glu_silu_first"])
def test_one_token_layers_run_wholly_on_cutlass(cutlass_with_fallbacks, layer_name, k):
    """T=1: autograd may hand the one-row gradients back with strides (1, 1); they still run on csrc."""
    from test_layers import check_mlp_layer

    check_mlp_layer(layer_name, 1, 1, 256, 384, 8, k, True, "cutlass", dtype=torch.bfloat16, device="cuda",
                    per_token=False)
    assert not cutlass_with_fallbacks, dict(cutlass_with_fallbacks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_glumlp_gather_combine_runs_its_second_gemm_on_the_grouped_gemm(cutlass_with_fallbacks, monkeypatch, dtype):
    """set_topk_combine("gather"): the second GEMM is grouped in and out and ungated, so the TMA grouped GEMM runs it
    (the scatter mode's GLUMLP never launches it); the gather pass then sums each token's rows. Forward and
    backward against float64, nothing on a fallback."""
    from test_layers import check_mlp_layer

    import scattermoe
    from scattermoe.backends.cutlass import grouped_gemm

    launches = []
    real = grouped_gemm.launch
    monkeypatch.setattr(grouped_gemm, "launch", lambda *a: launches.append(1) or real(*a))
    with scattermoe.use_topk_combine("gather"):
        check_mlp_layer("glu_silu_first", 4, 250, 256, 384, 8, 2, True, "cutlass", dtype=dtype, device="cuda",
                        per_token=False)
    assert launches, "the gather mode's second GEMM did not run on the grouped GEMM"
    assert not cutlass_with_fallbacks, dict(cutlass_with_fallbacks)


@pytest.mark.parametrize("variant", ["persistent", "weight_tma", "persistent_weight_tma"])
@pytest.mark.parametrize("layer_name", ["mlp_gelu", "glu_silu_first"])
def test_mlp_layers_on_cutlass_with_the_scatter_gemm_variants(cutlass_with_fallbacks, layer_name, variant):
    """A layer forward and backward with every scatter GEMM (forward and dX) on the persistent kernel, with W
    loaded by TMA, or both."""
    from test_layers import check_mlp_layer

    from scattermoe.backends import cutlass as backend
    from scattermoe.backends.cutlass import scatter_gemm as sg

    sg.last_weight_load = None
    with backend.persistent("persistent" in variant), backend.weight_tma("weight_tma" in variant):
        check_mlp_layer(layer_name, 4, 250, 256, 384, 8, 2, True, "cutlass", dtype=torch.bfloat16, device="cuda",
                        per_token=False)
    assert sg.last_weight_load == ("tma" if "weight_tma" in variant else "cp.async"), sg.last_weight_load
    assert not cutlass_with_fallbacks, dict(cutlass_with_fallbacks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_moa_on_cutlass(cutlass_with_fallbacks, dtype):
    from test_layers import check_moa
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        check_moa(2, 32, 128, 4, 32, 8, 2, True, "cutlass", dtype=dtype, device="cuda")
    # JetMoE's MoA, forward and backward, all on csrc: the gated dW of its output projection scales dY rows
    # in the dW kernel.
    assert not cutlass_with_fallbacks, dict(cutlass_with_fallbacks)


@pytest.mark.parametrize("persistent", [False, True], ids=["per_tile", "persistent"])
@pytest.mark.parametrize("T", [1, 300])
def test_decode_forward_replays_in_a_cuda_graph_on_cutlass(cutlass, T, persistent):
    """The cutlass backend's GLUMLP forward (both GEMMs on the scatter GEMM, cudaFuncSetAttribute inside the
    capture) captured in a CUDA graph replays on new inputs to the eager output bit for bit."""
    import scattermoe

    torch.manual_seed(0)
    D, F_, E, K = 256, 384, 8, 2
    layer = scattermoe.GLUMLP(D, F_, E, K, activate_first=True).to("cuda", torch.bfloat16)
    static_logits = torch.randn(T, E, device="cuda")  # an input: cuBLAS may choose differently inside a capture

    def step(x):
        gates, idx = scattermoe.topk_gating(static_logits, K)
        return layer(x, gates.to(x.dtype), idx)

    static_x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), scattermoe.use_backend("cutlass"), cutlass.persistent(persistent):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = step(static_x)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
        static_x.copy_(x)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, step(x)), "the graph replay differs from the eager forward"


# The scatter GEMM's opt-in variants (persistent, W by TMA) against the default kernel, bit for bit. Last in the
# file: the GPU protocol runs this file within a time budget, and the default kernels' checks come first.
PERSISTENT_SHAPES = SCATTER_SHAPES + [
    ([1500, 900, 0, 2100, 600], 256, 1024, "more tiles than SMs, uneven, an empty expert"),
]
PERSISTENT_MODES = {  # (grouped_in, grouped_out, gated, glu, keep_pre)
    "gather_from_tokens": (False, True, False, 0, False),      # MLP's first GEMM
    "scatter_gated": (True, False, True, 0, False),            # the second GEMM
    "gather_and_scatter_gated": (False, False, True, 0, False),
    "glu_gather_keep_pre": (False, True, False, 1, True),      # JetMoE's fused first GEMM in training
    "glu_scatter_gated": (True, False, True, 2, False),
}


@pytest.mark.parametrize("ctas", [1, 3, "sm_count"])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("mode", sorted(PERSISTENT_MODES))
@pytest.mark.parametrize("counts,k_in,n_out,name", PERSISTENT_SHAPES, ids=[s[-1] for s in PERSISTENT_SHAPES])
def test_persistent_scatter_gemm_matches_one_cta_per_tile(cutlass, counts, k_in, n_out, name, mode, w_layout, ctas):
    """The persistent scatter GEMM runs the per-tile kernel's mainloop and epilogue code on the same tiles, so
    its outputs must equal the per-tile kernel's bit for bit (both poisoned with NaN first), on 1 or 3 CTAs
    (each loops over many tiles, skipping those past the last row tile; E=64 takes two passes of the warp scan
    that finds a tile's expert) and on one CTA per SM; and both match the float64 contract."""
    grouped_in, grouped_out, gated, glu, keep_pre = PERSISTENT_MODES[mode]
    seed = zlib.crc32(f"persistent-{name}-{mode}-{w_layout}".encode())
    c = scatter_case(counts, k_in, 2 * n_out if glu else n_out, torch.bfloat16, w_layout, grouped_in, grouped_out,
                     gated, seed)
    ref = reference.glu(c.h, torch.nn.functional.silu, glu == 1) if glu else c.h
    if gated:
        ref = ref * c.row_gates
    args = (c.x.cuda(), c.w.cuda(), c.b.cuda(), c.scattered.cuda(), c.offsets.cuda(), c.k, grouped_in, grouped_out)

    def run(persistent):
        out = torch.full((c.n, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
        pre = torch.full((c.n, 2 * n_out), float("nan"), dtype=torch.bfloat16, device="cuda") if keep_pre else None
        with cutlass.persistent(persistent):
            y = cutlass.scatter2scatter(*args, row_scale=c.gates.cuda() if gated else None, out=out, glu=glu,
                                        pre_activation=pre)
        torch.cuda.synchronize()
        return y, pre

    per_tile, per_tile_pre = run(False)
    y, pre = run(True if ctas == "sm_count" else ctas)
    err = rel_err(y, ref)
    print(f"\n{name} {mode} {w_layout} ctas={ctas}: rel err {err:.2e}")
    assert err < TOLERANCE[torch.bfloat16], f"{name}: relative error {err:.2e}"
    assert torch.equal(y, per_tile), f"{name}: the persistent kernel differs from the per-tile one"
    if keep_pre:
        assert torch.equal(pre, per_tile_pre), f"{name}: the kept pre-activations differ"


TMA_SHAPES = PERSISTENT_SHAPES + [([300], 136, 192, "E=1")]


def _padded(w):
    """w's values with each unit-stride row 16 elements longer in memory (stride_w_ld > the row's length), on
    w's device (.cuda() of a tensor with gaps would copy it contiguous)."""
    e, k_in, n_out = w.shape
    if w.stride(1) == 1:  # K-major: [E, F, K + 16][..., :K], permuted
        base = torch.zeros(e, n_out, k_in + 16, dtype=w.dtype, device=w.device)
        base[..., :k_in] = w.permute(0, 2, 1)
        return base[..., :k_in].permute(0, 2, 1)
    base = torch.zeros(e, k_in, n_out + 16, dtype=w.dtype, device=w.device)
    base[..., :n_out] = w
    return base[..., :n_out]


def _weight_tma_case(cutlass, counts, k_in, n_out, name, mode, w_layout, persistent, padded=False,
                     dtype=torch.bfloat16):
    from scattermoe.backends.cutlass import scatter_gemm as sg

    grouped_in, grouped_out, gated, glu, keep_pre = PERSISTENT_MODES[mode]
    seed = zlib.crc32(f"w-tma-{name}-{mode}-{w_layout}".encode())
    c = scatter_case(counts, k_in, 2 * n_out if glu else n_out, dtype, w_layout, grouped_in, grouped_out, gated,
                     seed)
    w = _padded(c.w.cuda()) if padded else c.w.cuda()
    if padded:
        assert w.stride(1 if w_layout == "f_major" else 2) > (w.shape[2] if w_layout == "f_major" else w.shape[1])
    ref = reference.glu(c.h, torch.nn.functional.silu, glu == 1) if glu else c.h
    if gated:
        ref = ref * c.row_gates
    args = (c.x.cuda(), w, c.b.cuda(), c.scattered.cuda(), c.offsets.cuda(), c.k, grouped_in, grouped_out)

    def run(tma):
        out = torch.full((c.n, n_out), float("nan"), dtype=dtype, device="cuda")
        pre = torch.full((c.n, 2 * n_out), float("nan"), dtype=dtype, device="cuda") if keep_pre else None
        with cutlass.weight_tma(tma), cutlass.persistent(persistent):
            y = cutlass.scatter2scatter(*args, row_scale=c.gates.cuda() if gated else None, out=out, glu=glu,
                                        pre_activation=pre)
        torch.cuda.synchronize()
        return y, pre, sg.last_weight_load

    y_cp, pre_cp, load_cp = run(False)
    y, pre, load = run(True)
    assert (load_cp, load) == ("cp.async", "tma"), f"{name}: W was loaded by {load} with weight_tma on"
    err = rel_err(y, ref)
    print(f"\n{name} {mode} {w_layout} {dtype} persistent={persistent} padded={padded}: rel err {err:.2e}")
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"
    assert torch.equal(y, y_cp), f"{name}: W by TMA gives other outputs than W by cp.async"
    if keep_pre:
        assert torch.equal(pre, pre_cp), f"{name}: the kept pre-activations differ"


@pytest.mark.parametrize("persistent", [False, True], ids=["per_tile", "persistent"])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("mode", sorted(PERSISTENT_MODES))
@pytest.mark.parametrize("counts,k_in,n_out,name", TMA_SHAPES, ids=[s[-1] for s in TMA_SHAPES])
def test_weight_tma_scatter_gemm_matches_cp_async(cutlass, counts, k_in, n_out, name, mode, w_layout, persistent):
    """W loaded by TMA lands in the same shared memory, with the same values, as W loaded by cp.async (zeros
    past K and F alike; a GLU tile's first half past F reads second-half columns that are never stored), so
    the outputs must equal the cp.async kernel's bit for bit (both poisoned with NaN first), on the per-tile
    and the persistent kernel, and the launch must say that it did load W by TMA."""
    _weight_tma_case(cutlass, counts, k_in, n_out, name, mode, w_layout, persistent)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("persistent", [False, True], ids=["per_tile", "persistent"])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("mode", ["gather_from_tokens", "glu_gather_keep_pre"])
def test_weight_tma_reads_a_w_with_padded_rows(cutlass, mode, w_layout, persistent, dtype):
    """A W whose unit-stride rows are padded in memory (stride_w_ld > their length), so its experts are not
    K * F apart either: the tensor map's strides, in both dtypes (the map's element type)."""
    _weight_tma_case(cutlass, [131, 7, 256], 72, 200, "padded W", mode, w_layout, persistent, padded=True,
                     dtype=dtype)
