"""The "gather" top-k combine (``scattermoe.set_topk_combine``): rows grouped and ungated, then one pass per token.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D features.
The pass alone (backends/triton/gather_sum.py) against a float64 sum, into a poisoned output; then every op that
sums K rows per token (parallel_linear with gates, glu_moe, MoA's reduce) in that mode against the reference,
forward and every gradient; the switch itself. CPU cases run the Triton interpreter (fp32, fp16); the GPU cases
(bf16 too, and the cutlass backend, whose second GEMM then is the TMA grouped GEMM) run with the GPU suite.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import CPU_DTYPES, TOL, assert_close
from test_parallel_linear import SHAPES, check_against_reference

import scattermoe
from scattermoe.backends import triton as triton_kernels

GATED_MODES = ["gated_from_tokens", "gated_from_grouped", "gated_from_slot_rows"]
CPU = [pytest.param("cpu", dtype, marks=pytest.mark.interpreter, id=f"cpu-{str(dtype)[6:]}") for dtype in CPU_DTYPES]
GPU = [pytest.param("cuda", dtype, marks=pytest.mark.gpu, id=f"cuda-{str(dtype)[6:]}")
       for dtype in (torch.bfloat16, torch.float16, torch.float32)]


def _gather_sum_reference(rows, row_of_slot, gates, k):
    """float64: y[t] = sum_j gates[t*k + j] * rows[row_of_slot[t*k + j]]."""
    picked = rows.double().cpu()[row_of_slot.cpu().long()]
    if gates is not None:
        picked = picked * gates.double().cpu()[:, None]
    return picked.view(-1, k, rows.size(1)).sum(1)


@pytest.mark.parametrize("T, K, D", [(1, 2, 16), (13, 2, 45), (7, 3, 70), (6, 8, 33), (9, 1, 32)],
                         ids=["T1", "odd_D", "k3-two_col_blocks", "k8", "k1"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("dev, dtype", CPU + GPU)
def test_gather_sum_writes_every_element_of_the_gated_sum(T, K, D, gated, index_dtype, dev, dtype):
    # T and D not multiples of the interpreter's 4 x 32 blocks; rows in a random order (any expert order).
    rows = torch.randn(T * K, D, device=dev).to(dtype)
    row_of_slot = torch.randperm(T * K, device=dev).to(index_dtype)
    gates = torch.rand(T * K, device=dev) if gated else None  # fp32 gates beside half rows, as JetMoE's router
    out = torch.full((T, D), float("nan"), device=dev, dtype=dtype)
    y = triton_kernels.gather_sum(rows, row_of_slot, gates, K, out=out)
    assert y is out and not out.isnan().any(), "gather_sum left poisoned elements unwritten"
    assert_close(out, _gather_sum_reference(rows, row_of_slot, gates, K), TOL[dtype], "gather_sum")


@pytest.mark.parametrize("dev", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                 pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gather_sum_clamps_row_indices_that_are_not_a_permutation(dev):
    """A row index outside [0, N) (sorted ids passed by hand that are not a permutation, unchecked on CUDA outside
    debug mode) reads the nearest row of Y, never the memory around it: here NaN rows on both sides of the view."""
    N, D, pad = 4, 40, 8
    buf = torch.full((N + 2 * pad, D), float("nan"), device=dev)
    rows = buf[pad:pad + N]
    rows.copy_(torch.randn(N, D))
    row_of_slot = torch.tensor([-5, 2**40, 3, 1], device=dev)
    y = triton_kernels.gather_sum(rows, row_of_slot, None, 2)
    assert_close(y, torch.stack([rows[0] + rows[3], rows[3] + rows[1]]), 1e-6, "clamped gather")


@pytest.mark.interpreter
def test_gather_sum_writes_an_out_with_padded_rows_through_its_row_stride():
    """out may be any [T, D] with a unit column stride (torch.ops.scattermoe.gather_sum takes it), e.g. the first
    D columns of a wider buffer: token t lands in out's row t, and the columns beyond D stay untouched."""
    T, K, D = 5, 2, 40
    rows, row_of_slot, gates = torch.randn(T * K, D), torch.randperm(T * K), torch.rand(T * K)
    buffer = torch.full((T, D + 8), float("nan"))
    out = buffer[:, :D]
    assert triton_kernels.gather_sum(rows, row_of_slot, gates, K, out=out) is out
    assert_close(out, _gather_sum_reference(rows, row_of_slot, gates, K), TOL[torch.float32], "padded out")
    assert buffer[:, D:].isnan().all(), "gather_sum wrote past a row's D columns"


@pytest.mark.interpreter
def test_gather_sum_of_no_tokens_launches_nothing():
    y = triton_kernels.gather_sum(torch.randn(0, 8), torch.zeros(0, dtype=torch.long), None, 2)
    assert y.shape == (0, 8)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("mode", GATED_MODES)
@pytest.mark.parametrize("T, E, K, D, F, case", SHAPES)
def test_parallel_linear_with_gates_gather_combine_matches_reference(monkeypatch, T, E, K, D, F, case, mode, bias,
                                                                     dtype):
    calls = spy_gather_sum(monkeypatch)
    with scattermoe.use_topk_combine("gather"):
        check_against_reference("triton", T, E, K, D, F, case, mode, bias, dtype)
    # The gather pass ran (with K rows per token) exactly where K rows are summed per token.
    assert set(calls) == ({K} if K > 1 else set()), calls


def spy_gather_sum(monkeypatch):
    """The fan-out of every gather_sum launch from here on (a list that grows)."""
    calls = []
    real = triton_kernels.gather_sum
    monkeypatch.setattr(triton_kernels, "gather_sum", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    return calls


@pytest.mark.interpreter
def test_gather_sum_rejects_inputs_it_cannot_read_by_name():
    """Reachable as torch.ops.scattermoe.gather_sum: a layout the kernel does not read raises, naming it."""
    rows, slots, gates = torch.randn(6, 8), torch.randperm(6), torch.rand(6)
    bad = [
        (dict(rows=torch.randn(8, 6).t()), ValueError, "rows: expected a unit column stride"),
        (dict(rows=torch.randn(6, 8, 1)), ValueError, "rows: expected a 2-d tensor"),
        (dict(fan_out=0), ValueError, "fan_out: expected an int >= 1, got 0"),
        (dict(fan_out=4), ValueError, "rows: 6 rows are not whole tokens of fan_out=4"),
        (dict(row_of_slot=torch.randperm(12)[::2]), ValueError, "row_of_slot: expected a contiguous \\[6\\]"),
        (dict(row_of_slot=torch.randperm(5)), ValueError, "row_of_slot: expected a contiguous \\[6\\]"),
        (dict(row_of_slot=slots.float()), TypeError, "row_of_slot: expected dtype in \\(int32, int64\\)"),
        (dict(gates=torch.rand(3)), ValueError, "gates: expected a contiguous \\[6\\]"),
        (dict(gates=torch.ones(6, dtype=torch.long)), TypeError, "gates: expected dtype in \\(float16"),
        (dict(out=torch.empty(3, 8, dtype=torch.float16)), TypeError, "out: expected dtype in \\(float32\\)"),
        (dict(out=torch.empty(4, 8)), ValueError, "out: expected shape \\(3, 8\\)"),
        (dict(out=torch.empty(8, 3).t()), ValueError, "out: expected a unit column stride"),
    ]
    for change, error, message in bad:
        args = dict(rows=rows, row_of_slot=slots, gates=gates, fan_out=2, out=None) | change
        with pytest.raises(error, match=message):
            triton_kernels.gather_sum(args["rows"], args["row_of_slot"], args["gates"], args["fan_out"], args["out"])


@pytest.mark.interpreter
@pytest.mark.parametrize("K", [1, 2, 3])
def test_glumlp_takes_the_gather_path_only_in_gather_mode_and_only_for_k_above_1(monkeypatch, K):
    """The mode changes which kernels run, not the result: K > 1 runs the gather pass once per forward (the
    backward, the same code in both modes, does not run it), and equals the scatter mode's output; K = 1 never
    runs it."""
    calls = spy_gather_sum(monkeypatch)
    T, E, D, F = 11, 4, 24, 20
    layer = scattermoe.GLUMLP(D, F, E, K, bias=True)
    x = torch.randn(T, D, requires_grad=True)
    gates, idx = scattermoe.topk_gating(torch.randn(T, E), K)
    outs = {}
    for mode in ("scatter", "gather"):
        with scattermoe.use_backend("triton"), scattermoe.use_topk_combine(mode):
            y = layer(x, gates, idx)
            y.backward(torch.ones_like(y))
        outs[mode] = y.detach()
    assert calls == ([K] if K > 1 else [])
    assert_close(outs["gather"], outs["scatter"], 1e-5, "y")


@pytest.mark.interpreter
def test_moa_reduce_in_gather_mode_matches_scatter_mode(monkeypatch):
    calls = spy_gather_sum(monkeypatch)
    B, L, D, H, Dh, E, K = 2, 5, 32, 2, 8, 4, 2
    moa = scattermoe.MoA(D, Dh, H, E, K, bias=True)
    x = torch.randn(B, L, D)
    gates, idx = scattermoe.topk_gating(torch.randn(B, L, E), K)
    outs = []
    for mode in ("scatter", "gather"):
        with scattermoe.use_backend("triton"), scattermoe.use_topk_combine(mode), torch.no_grad():
            q, routing = moa.map(x, gates, idx)
            outs.append(moa.reduce(q, routing))
    assert calls == [K]
    assert_close(outs[1], outs[0], 1e-5, "MoA output")


def test_topk_combine_switch_checks_its_value_and_restores():
    # From a known mode, whatever SCATTERMOE_TOPK_COMBINE the suite runs under.
    with scattermoe.use_topk_combine("scatter"):
        with pytest.raises(ValueError, match="expected one of scatter, gather, got 'gathered'"):
            scattermoe.set_topk_combine("gathered")
        assert scattermoe.get_topk_combine() == "scatter"
        with scattermoe.use_topk_combine("gather"):
            assert scattermoe.get_topk_combine() == "gather"
            with pytest.raises(ValueError, match="got 'sum'"):
                with scattermoe.use_topk_combine("sum"):
                    pass
            assert scattermoe.get_topk_combine() == "gather"
            with scattermoe.use_topk_combine("scatter"):  # back to what was in force, not to a default
                assert scattermoe.get_topk_combine() == "scatter"
            assert scattermoe.get_topk_combine() == "gather"
        assert scattermoe.get_topk_combine() == "scatter"


def test_topk_combine_is_read_from_the_environment_at_import():
    code = "import scattermoe; print(scattermoe.get_topk_combine())"
    env = {**os.environ, "SCATTERMOE_TOPK_COMBINE": "gather"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["gather"], out.stderr[-2000:]
    env["SCATTERMOE_TOPK_COMBINE"] = " Gather "  # read as the switches are: any case, spaces ignored
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["gather"], out.stderr[-2000:]
    env["SCATTERMOE_TOPK_COMBINE"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SCATTERMOE_TOPK_COMBINE: expected one of scatter, gather" in out.stderr


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", GATED_MODES)
def test_parallel_linear_gather_combine_cuda(mode, dtype):
    with scattermoe.use_topk_combine("gather"):
        check_against_reference("triton", 1000, 8, 2, 256, 384, "random", mode, True, dtype, device="cuda")
        check_against_reference("triton", 777, 64, 8, 128, 200, "random", mode, False, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_glumlp_gather_combine_cuda_matches_reference(dtype):
    from test_layers import check_mlp_layer

    with scattermoe.use_topk_combine("gather"):
        check_mlp_layer("glu_silu_first", 4, 250, 256, 384, 8, 2, True, "triton", dtype=dtype, device="cuda",
                        per_token=False)
