"""The Python side of the cutlass backend, without a GPU or the extension.

Checked here: which calls the csrc grouped GEMM and the csrc scatter GEMM take and which
fall back to Triton (each fallback named), the plan's reading of strides (k-major / f-major W, expert stride,
alignment), strict mode, the reasons the backend gives when it cannot run, and that
importing it never fails. The launch itself is replaced by an emulator that applies the
kernel's contract to the plan's integers, so a wrong stride in the plan shows up as a wrong
result here, before any GPU sees it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
from helpers import per_expert_wgrad

import reference
from scattermoe.backends import cutlass
from scattermoe.backends.cutlass import _extension, dispatch, glu_grad
from scattermoe.backends.cutlass import weight_grad as wg
from scattermoe.backends.cutlass import grouped_gemm as gg
from scattermoe.backends.cutlass import scatter_gemm as sg

# Legend: N routed rows, E experts, K input features, F output features.


def routing(counts, seed=0):
    """(sorted_expert_idxs [N], sorted_scattered_idxs [N], expert_offsets [E]) for rows grouped by expert."""
    g = torch.Generator().manual_seed(seed)
    sorted_expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = int(sum(counts))
    scattered = torch.randperm(n, generator=g)
    return sorted_expert, scattered, torch.tensor(counts).cumsum(0)


def make_case(counts, k_in, n_out, dtype=torch.bfloat16, w_layout="k_major", bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_experts, n = len(counts), int(sum(counts))
    x = torch.randn(n, k_in, generator=g).to(dtype)
    if w_layout == "k_major":  # ParallelExperts.weight [E, F, K] permuted: unit stride along K
        w = torch.randn(num_experts, n_out, k_in, generator=g).to(dtype).permute(0, 2, 1)
    else:  # contiguous [E, K, F]: unit stride along F (the transposed view of the dX GEMM)
        w = torch.randn(num_experts, k_in, n_out, generator=g).to(dtype)
    b = torch.randn(num_experts, n_out, generator=g).to(dtype) if bias else None
    return x, w, b, routing(counts, seed)


def experts_as_planned(p, w, expert_offsets):
    """(e, start, end, W[e] as float64) per expert, read through the plan's integers as both kernels do:
    offsets clamped to [0, num_rows], W[e] at w + e * stride_we with the plan's layout and stride
    (2 * n_out columns with the scatter GEMM's GLU)."""
    ld = p.stride_w_ld
    w_strides = (1, ld) if p.w_k_major else (ld, 1)
    w_cols = p.n_out * (2 if getattr(p, "glu", 0) else 1)
    start = 0
    for e in range(p.num_experts):
        end = min(max(int(expert_offsets[e]), 0), p.num_rows)
        start = min(start, end)
        yield e, start, end, torch.as_strided(w, (p.k_in, w_cols), w_strides,
                                              w.storage_offset() + e * p.stride_we).double()
        start = end


def emulate_kernel(p: gg.GroupedGemmPlan, x, w, bias, expert_offsets, y):
    """The csrc kernel's contract applied to the plan's integers (what _C.grouped_gemm receives)."""
    for e, start, end, w_e in experts_as_planned(p, w, expert_offsets):
        out = x[start:end].double() @ w_e
        if bias is not None:
            out += bias[e].double()
        y[start:end] = out.to(y.dtype)
    return y


def emulate_scatter_kernel(p: sg.ScatterGemmPlan, x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out,
                           grouped_in, grouped_out, row_scale, y, pre_activation=None):
    """The csrc scatter kernel's contract (include/scattermoe/scatter_gemm.h) on the plan's integers."""
    silu = torch.nn.functional.silu
    for e, start, end, w_e in experts_as_planned(p, w, expert_offsets):
        for r in range(start, end):
            slot = int(sorted_scattered_idxs[r])
            v = x[r if grouped_in else slot // fan_out].double() @ w_e
            if bias is not None:
                v += bias[e].double()
            out_row = r if grouped_out else slot
            if p.glu:
                if pre_activation is not None:
                    pre_activation[out_row] = v.to(pre_activation.dtype)
                a, b = v[:p.n_out], v[p.n_out:]
                v = silu(a) * b if p.glu == 1 else a * silu(b)
            if row_scale is not None:
                v *= float(row_scale.reshape(-1)[slot])
            y[out_row] = v.to(y.dtype)
    return y


def emulate_wgrad_kernel(p: wg.GroupBwdWPlan, x, dy, sorted_scattered_idxs, expert_offsets, x_fan_out, dy_fan_out,
                         x_grouped, dy_grouped, dw, row_scale=None, db=None):
    """The csrc dW kernel's contract (include/scattermoe/group_bwd_w.h) on the plan's integers: every dW[e]
    (and db[e]) written (zeros for an empty expert), offsets clamped to [0, num_rows], dY rows scaled by
    row_scale[slot] and rounded to dY's dtype."""
    start = 0
    for e in range(p.num_experts):
        end = min(max(int(expert_offsets[e]), 0), p.num_rows)
        start = min(start, end)
        acc = torch.zeros(p.k_in, p.n_out, dtype=torch.float64)
        bias_acc = torch.zeros(p.n_out, dtype=torch.float64)
        for r in range(start, end):
            slot = int(sorted_scattered_idxs[r])
            xr = x[r if x_grouped else slot // x_fan_out].double()
            dyr = dy[r if dy_grouped else slot // dy_fan_out]
            if row_scale is not None:
                dyr = (dyr.float() * row_scale[slot].float()).to(dy.dtype)
            acc += torch.outer(xr, dyr.double())
            bias_acc += dyr.double()
        dw[e] = acc.to(dw.dtype)
        if db is not None:
            db[e] = bias_acc.to(db.dtype)
        start = end
    return dw


def emulate_glu_backward(pre, dg, activate_first, row_scale, store_g, store_dot):
    """The csrc GLU backward's contract (include/scattermoe/glu_backward.h), through autograd in float64."""
    h = pre.double().requires_grad_()
    s = row_scale.double().view(-1, 1) if row_scale is not None else torch.ones(pre.size(0), 1, dtype=torch.float64)
    g = reference.glu(h, torch.nn.functional.silu, activate_first)
    (dh,) = torch.autograd.grad(g, h, dg.double() * s)
    g = g.detach()
    return (dh.to(pre.dtype), (g * s).to(pre.dtype) if store_g else None,
            (dg.double() * g).sum(-1).float() if store_dot else None)


@pytest.fixture
def fake_launch(monkeypatch):
    """Every csrc launch replaced by an emulator; records the plan of every launch. The emulator runs on the
    CPU, so the planners are told to take CPU tensors as if they were CUDA ones."""
    calls = []
    monkeypatch.setattr(dispatch, "_not_cuda", lambda t: None)

    def launch(p, x, w, bias, expert_offsets, y):
        calls.append(p)
        return emulate_kernel(p, x, w, bias, expert_offsets, y)

    def launch_scatter(p, *args):
        calls.append(p)
        return emulate_scatter_kernel(p, *args)

    def launch_wgrad(p, *args):
        calls.append(p)
        return emulate_wgrad_kernel(p, *args)

    monkeypatch.setattr(gg, "launch", launch)
    monkeypatch.setattr(sg, "launch", launch_scatter)
    def launch_glu(pre, dg, activate_first, row_scale, store_g, store_dot):
        calls.append("glu_backward")
        return emulate_glu_backward(pre, dg, activate_first, row_scale, store_g, store_dot)

    monkeypatch.setattr(wg, "launch", launch_wgrad)
    monkeypatch.setattr(glu_grad, "launch", launch_glu)
    return calls


@pytest.fixture
def fake_triton(monkeypatch):
    """Triton launchers replaced by recorders (the real ones need a GPU or the interpreter)."""
    calls = []

    class FakeTriton:
        @staticmethod
        def scatter2scatter(*args, **kwargs):
            calls.append(("scatter2scatter", args, kwargs))
            return "triton-result"

        @staticmethod
        def group_bwd_w(*args, **kwargs):
            calls.append(("group_bwd_w", args, kwargs))
            return "triton-dw", None

        @staticmethod
        def glu_backward(*args, **kwargs):
            calls.append(("glu_backward", args, kwargs))
            return "triton-dh", None, None

    monkeypatch.setattr(dispatch, "_triton", lambda: FakeTriton)
    monkeypatch.setattr(dispatch, "_check_triton", lambda x, reason: None)
    dispatch.FALLBACKS.clear()
    return calls


def s2s(x, w, b, route, grouped_in=True, grouped_out=True, **kwargs):
    _, scattered, offsets = route
    return cutlass.scatter2scatter(x, w, b, scattered, offsets, 1, grouped_in, grouped_out, **kwargs)


def ref(x, w, b, route):
    sorted_expert, scattered, offsets = route
    return reference.parallel_linear(x.double(), w.double(), 1, sorted_expert, scattered, offsets,
                                     b.double() if b is not None else None, None, True, True)


CASES = [
    # (counts, K, F, name)
    ([5, 0, 17, 9], 64, 128, "empty expert"),
    ([0, 0, 40, 0], 32, 48, "all rows on one expert"),
    ([0, 1, 0], 16, 8, "T=1"),
    ([70, 3], 72, 200, "dims not multiples of the 128x128x64 tile"),
    ([33], 24, 40, "E=1"),
]


@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("counts,k_in,n_out,name", CASES, ids=[c[-1] for c in CASES])
def test_grouped_calls_take_the_csrc_kernel_with_the_right_strides(fake_launch, fake_triton, counts, k_in, n_out,
                                                                    name, w_layout, bias):
    x, w, b, route = make_case(counts, k_in, n_out, w_layout=w_layout, bias=bias)
    y = s2s(x, w, b, route)
    if sum(counts) > 0:
        assert len(fake_launch) == 1 and not fake_triton, name
        p = fake_launch[0]
        assert p.w_k_major == (w_layout == "k_major")
        assert p.stride_we == (0 if len(counts) == 1 else w.stride(0))
        assert (p.num_experts, p.num_rows, p.k_in, p.n_out) == (len(counts), sum(counts), k_in, n_out)
    expected = ref(x, w, b, route)
    err = (y.double() - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err < 2e-2, f"{name}: relative error {err:.2e}"


def test_no_rows_returns_empty_without_a_launch(fake_launch, fake_triton):
    x, w, _, route = make_case([0, 0], 16, 16)
    y = s2s(x, w, None, route)
    assert y.shape == (0, 16) and not fake_launch and not fake_triton


def test_out_is_written_in_place(fake_launch, fake_triton):
    x, w, _, route = make_case([3, 4], 16, 32)
    out = torch.full((7, 32), float("nan"), dtype=torch.bfloat16)
    y = s2s(x, w, None, route, out=out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()


@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("grouped_in,grouped_out,gated", [(False, True, False), (True, False, False),
                                                          (False, False, True), (True, True, True)])
def test_gathered_scattered_and_gated_calls_take_the_scatter_kernel(fake_launch, fake_triton, grouped_in,
                                                                    grouped_out, gated, w_layout):
    """Token rows gathered (x has T rows, slot // k), rows scattered to slots, gates by slot: the scatter
    GEMM's plan and contract, row by row, k=2, an empty expert, dims off the tile."""
    k, counts, k_in, n_out = 2, [9, 0, 21, 4], 40, 24
    x, w, b, route = make_case(counts, k_in, n_out, w_layout=w_layout, bias=True)
    sorted_expert, scattered, offsets = route
    n = sum(counts)
    g = torch.Generator().manual_seed(5)
    x_in = x if grouped_in else torch.randn(n // k, k_in, generator=g).to(x.dtype)
    gates = torch.rand(n // k, k, generator=g) if gated else None
    y = cutlass.scatter2scatter(x_in, w, b, scattered, offsets, k, grouped_in, grouped_out, row_scale=gates)
    assert len(fake_launch) == 1 and isinstance(fake_launch[0], sg.ScatterGemmPlan) and not fake_triton
    assert fake_launch[0].w_k_major == (w_layout == "k_major")
    assert y.shape == (n, n_out)
    # Row by row from the contract: y[r or slot] = (x[r or slot // k] @ w[e] + b[e]) * gates[slot].
    for r, slot in enumerate(scattered.tolist()):
        e = int(sorted_expert[r])
        want = x_in[r if grouped_in else slot // k].double() @ w[e].double() + b[e].double()
        if gated:
            want = want * gates.reshape(-1)[slot].double()
        got = y[r if grouped_out else slot].double()
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2), (r, slot, (got - want).abs().max())


@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
@pytest.mark.parametrize("glu", [1, 2])
@pytest.mark.parametrize("grouped_in,grouped_out,gated,keep_pre", [
    (False, True, False, True), (True, True, False, False), (True, False, True, True), (False, False, True, False)])
def test_glu_calls_take_the_scatter_kernel(fake_launch, fake_triton, grouped_in, grouped_out, gated, keep_pre, glu,
                                           w_layout):
    """The GLU epilogue: w [E, K, 2F] and bias [E, 2F] give y [N, F] = GLU(h) (* gates) and, when asked, the
    pre-activation h [N, 2F], rows placed like y. Checked row by row against the contract, k=2."""
    k, counts, k_in, half = 2, [12, 0, 6, 30], 48, 40
    x, w, b, route = make_case(counts, k_in, 2 * half, w_layout=w_layout, bias=True, seed=glu)
    sorted_expert, scattered, offsets = route
    n = sum(counts)
    g = torch.Generator().manual_seed(7)
    x_in = x if grouped_in else torch.randn(n // k, k_in, generator=g).to(x.dtype)
    gates = torch.rand(n // k, k, generator=g) if gated else None
    pre = torch.full((n, 2 * half), float("nan")).to(x.dtype) if keep_pre else None
    y = cutlass.scatter2scatter(x_in, w, b, scattered, offsets, k, grouped_in, grouped_out, row_scale=gates,
                                glu=glu, pre_activation=pre)
    assert len(fake_launch) == 1 and isinstance(fake_launch[0], sg.ScatterGemmPlan) and not fake_triton
    assert (fake_launch[0].glu, fake_launch[0].n_out) == (glu, half)
    assert y.shape == (n, half)
    silu = torch.nn.functional.silu
    for r, slot in enumerate(scattered.tolist()):
        e = int(sorted_expert[r])
        h = x_in[r if grouped_in else slot // k].double() @ w[e].double() + b[e].double()
        a, bb = h[:half], h[half:]
        want = silu(a) * bb if glu == 1 else a * silu(bb)
        if gated:
            want = want * gates.reshape(-1)[slot].double()
        row = r if grouped_out else slot
        assert torch.allclose(y[row].double(), want, rtol=2e-2, atol=2e-2), (r, slot)
        if keep_pre:
            assert torch.allclose(pre[row].double(), h, rtol=2e-2, atol=2e-2), (r, slot)


FALLBACK_CASES = {
    # name: (kwargs of s2s, make_case kwargs, expected reason)
    "GLU with an odd weight width": (dict(glu=1), dict(n_out=63), "glu=1 with 63 weight columns"),
    "float32": ({}, dict(dtype=torch.float32), "dtype float32"),
    "K not a multiple of 8": ({}, dict(k_in=12), "K=12"),
    "F not a multiple of 8, F-major w": ({}, dict(n_out=20, w_layout="f_major"), "F=20"),
    # the kernels write a pre-activation only beside a GLU: asked for one without, Triton takes the call
    "pre-activation without a GLU": (dict(pre_activation=torch.empty(24, 64, dtype=torch.bfloat16)), {},
                                     "pre_activation without glu"),
}


@pytest.mark.parametrize("name", sorted(FALLBACK_CASES))
def test_uncovered_cases_fall_back_to_triton_by_name(fake_launch, fake_triton, name):
    call_kwargs, case_kwargs, reason = FALLBACK_CASES[name]
    case = dict(counts=[10, 0, 14], k_in=32, n_out=64)
    case.update(case_kwargs)
    x, w, b, route = make_case(**case)
    assert s2s(x, w, b, route, **call_kwargs) == "triton-result"
    assert not fake_launch and len(fake_triton) == 1
    assert [k for k in dispatch.FALLBACKS if reason in k], dict(dispatch.FALLBACKS)


def test_layouts_tma_cannot_take_fall_back(fake_launch, fake_triton):
    x, w, _, route = make_case([8, 8], 32, 64)
    offsets = route[2]
    wide = torch.randn(16, 40).to(torch.bfloat16)[:, :32]  # row stride 40: aligned (40 % 8 == 0)
    assert dispatch.scatter2scatter_fallback_reason(wide, w, None, offsets, 16, True, True, None, None, 0, None) is None
    odd = torch.randn(16, 36).to(torch.bfloat16)[:, :32]  # row stride 36: rows not 16-byte aligned
    assert "x (strides" in dispatch.scatter2scatter_fallback_reason(odd, w, None, offsets, 16, True, True, None, None,
                                                                    0, None)
    shifted = torch.randn(16 * 32 + 1).to(torch.bfloat16)[1:].view(16, 32)  # base 2 bytes off alignment
    assert "x (strides" in dispatch.scatter2scatter_fallback_reason(shifted, w, None, offsets, 16, True, True, None,
                                                                    None, 0, None)
    no_unit = torch.randn(2, 32, 128).to(torch.bfloat16)[:, :, ::2]  # strides (4096, 128, 2)
    assert "no unit stride" in dispatch.scatter2scatter_fallback_reason(x, no_unit, None, offsets, 16, True, True,
                                                                        None, None, 0, None)
    # Rows the TMA store cannot take go to the scatter GEMM, which stores element by element.
    out_odd = torch.empty(16, 72).to(torch.bfloat16)[:, 4:68]
    assert isinstance(gg.plan(x, w, None, offsets, 16, out_odd), str)
    assert dispatch.scatter2scatter_fallback_reason(x, w, None, offsets, 16, True, True, None, out_odd, 0, None) is None
    assert "out must have" in dispatch.scatter2scatter_fallback_reason(x, w, None, offsets, 16, True, True, None,
                                                                       out_odd.t(), 0, None)


def test_overlapping_rows_and_unlaid_weights_fall_back_instead_of_failing_in_the_kernel(fake_launch, fake_triton):
    """What the kernels' own argument checks would refuse with an error must be a fallback reason here: an
    expanded x (row stride 0) for every GEMM, and for dW a weight with no unit stride along K or F."""
    x, w, _, route = make_case([8, 8], 32, 64)
    _, scattered, offsets = route
    expanded = x[:1].expand(16, 32)
    assert "x (strides (0, 1))" in dispatch.scatter2scatter_fallback_reason(expanded, w, None, offsets, 16, True, True,
                                                                           None, None, 0, None)
    assert isinstance(gg.plan(expanded, w, None, offsets, 16), str)
    one_column = w[:, :, :1].expand(2, 32, 64)  # row stride 1 along F in a K-major weight: columns overlap
    assert "overlapping" in dispatch.scatter2scatter_fallback_reason(x, one_column, None, offsets, 16, True, True,
                                                                     None, None, 0, None)
    dy = torch.randn(16, 64).to(w.dtype)
    assert isinstance(wg.plan(x, dy, offsets, w, 16, None), wg.GroupBwdWPlan)
    assert "x (strides" in wg.plan(expanded, dy, offsets, w, 16, None)
    no_unit = torch.randn(2, 32, 128).to(w.dtype)[:, :, ::2]  # strides (4096, 128, 2)
    assert "no unit stride" in wg.plan(x, dy, offsets, no_unit, 16, None)
    dw, _ = cutlass.group_bwd_w(x, dy, scattered, offsets, no_unit, 1, 1, True, True)
    assert dw == "triton-dw" and not fake_launch


def test_misaligned_bias_is_copied_not_refused():
    bias = torch.randn(3 * 64 + 1).to(torch.bfloat16)[1:].view(3, 64)
    fixed = gg._bias_for_kernel(bias)
    assert fixed.data_ptr() % 16 == 0 and fixed.stride() == (64, 1) and torch.equal(fixed, bias)
    aligned = torch.randn(3, 64).to(torch.bfloat16)
    assert gg._bias_for_kernel(aligned) is aligned


@pytest.mark.parametrize("with_bias", [False, True], ids=["dw", "dw_db"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "row_scale"])
@pytest.mark.parametrize("x_grouped,dy_grouped", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("w_layout", ["k_major", "f_major"])
def test_dw_and_db_take_the_csrc_kernel(fake_launch, fake_triton, x_grouped, dy_grouped, w_layout, scaled, with_bias):
    """dW[e] = sum over expert e's rows of x[row]^T (s_slot dy[row]) and db[e] = sum of s_slot dy[row], rows gathered
    by slot // k where not grouped, k=2, an empty expert (zeros), dW strided like the weight; checked expert by
    expert from the routing."""
    k, counts, k_in, n_out = 2, [10, 0, 16, 6], 24, 40
    _, w, _, route = make_case(counts, k_in, n_out, w_layout=w_layout)
    sorted_expert, scattered, offsets = route
    n = sum(counts)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n if x_grouped else n // k, k_in, generator=g).to(w.dtype)
    dy = torch.randn(n if dy_grouped else n // k, n_out, generator=g).to(w.dtype)
    gates = torch.rand(n, generator=g) if scaled else None
    dw, db = cutlass.group_bwd_w(x, dy, scattered, offsets, w, k, k, x_grouped, dy_grouped, gates, with_bias)
    assert (db is not None) == with_bias and not fake_triton
    assert len(fake_launch) == 1 and isinstance(fake_launch[0], wg.GroupBwdWPlan)
    assert dw.shape == w.shape and dw.stride() == w.stride()
    rows = torch.arange(n)
    xs, dys = x[rows if x_grouped else scattered // k], dy[rows if dy_grouped else scattered // k].double()
    if scaled:
        dys = dys * gates.double()[scattered].unsqueeze(1)
    want = per_expert_wgrad(xs, dys, sorted_expert, len(counts))
    assert torch.allclose(dw.double(), want, rtol=2e-2, atol=5e-2), (dw.double() - want).abs().amax((1, 2))
    assert (dw[1] == 0).all()
    if with_bias:
        want_db = torch.zeros(len(counts), n_out, dtype=torch.float64).index_add_(0, sorted_expert, dys)
        assert db.shape == (len(counts), n_out) and db.dtype == w.dtype
        assert torch.allclose(db.double(), want_db, rtol=2e-2, atol=5e-2), (db.double() - want_db).abs().amax(1)
        assert (db[1] == 0).all()


def test_backward_calls_csrc_cannot_take_go_to_triton(fake_launch, fake_triton):
    _, w, _, route = make_case([4, 4], 16, 24)
    _, scattered, offsets = route
    x, dy = torch.randn(8, 16).to(w.dtype), torch.randn(8, 24).to(w.dtype)
    gates_2d = torch.rand(4, 2)  # one scale per slot, but [T, k]: the csrc dW reads a 1-d one
    assert cutlass.group_bwd_w(x, dy, scattered, offsets, w, 1, 1, True, True, gates_2d) == ("triton-dw", None)
    assert cutlass.glu_backward(x.float(), x.float()[:, :8], True)[0] == "triton-dh"
    assert [k for k in dispatch.FALLBACKS if k.startswith("row_scale of shape (4, 2)")]
    short_gates = torch.rand(7)  # fewer scales than slots: refused before either kernel (a read past the end)
    with pytest.raises(ValueError, match=r"row_scale: expected one scale per slot \(N=8\)"):
        cutlass.group_bwd_w(x, dy, scattered, offsets, w, 1, 1, True, True, short_gates)
    assert [k for k in dispatch.FALLBACKS if k.startswith("dtype float32")] and not fake_launch


@pytest.mark.parametrize("activate_first", [True, False])
def test_glu_backward_takes_the_csrc_kernel(fake_launch, fake_triton, activate_first):
    """bf16 pre-activation and gradient: the csrc pass, checked against autograd through the GLU (s applied to dG,
    s * G stored, the dot with the unscaled G)."""
    g = torch.Generator().manual_seed(4)
    pre = torch.randn(12, 2 * 20, generator=g).to(torch.bfloat16)
    dg = torch.randn(12, 20, generator=g).to(torch.bfloat16)
    scale = torch.rand(12, generator=g)
    dh, g_scaled, dot = cutlass.glu_backward(pre, dg, activate_first, scale, True, True)
    assert fake_launch == ["glu_backward"] and not fake_triton
    a, b = pre.double().chunk(2, -1)
    act_in, lin = (a, b) if activate_first else (b, a)
    sig = torch.sigmoid(act_in)
    dgs = dg.double() * scale.double()[:, None]
    d_act, d_lin = dgs * lin * sig * (1 + act_in * (1 - sig)), dgs * act_in * sig
    want_dh = torch.cat([d_act, d_lin] if activate_first else [d_lin, d_act], -1)
    assert torch.allclose(dh.double(), want_dh, rtol=2e-2, atol=2e-2)
    glu = act_in * sig * lin
    assert torch.allclose(g_scaled.double(), glu * scale.double()[:, None], rtol=2e-2, atol=2e-2)
    assert torch.allclose(dot.double(), (dg.double() * glu).sum(-1), rtol=2e-2, atol=5e-2)


def test_strict_mode_refuses_to_fall_back(fake_launch, fake_triton):
    x, w, _, route = make_case([4, 4], 32, 64)
    dispatch.set_strict(True)
    try:
        with pytest.raises(NotImplementedError, match="dtype float32"):
            s2s(x.float(), w.float(), None, route)
        s2s(x, w, None, route)  # covered: still runs
        s2s(x, w, None, route, grouped_out=False)  # covered by the scatter GEMM
        s2s(x, w, None, route, glu=1)  # and so is the GLU epilogue
    finally:
        dispatch.set_strict(False)
    assert len(fake_launch) == 3 and not fake_triton


def test_fallback_without_triton_names_both_reasons(monkeypatch, fake_launch):
    import scattermoe.backends as backends

    monkeypatch.setattr(backends, "triton_unsupported_reason", lambda x: "triton is not installed")
    x, w, _, route = make_case([4, 4], 32, 64)
    with pytest.raises(RuntimeError, match="dtype float32.*triton is not installed"):
        s2s(x.float(), w.float(), None, route)


def test_grouped_gemm_custom_op_has_a_fake_impl():
    x = torch.empty(10, 32, dtype=torch.bfloat16, device="meta")
    w = torch.empty(3, 32, 64, dtype=torch.bfloat16, device="meta")
    offsets = torch.empty(3, dtype=torch.int64, device="meta")
    y = torch.ops.scattermoe.cutlass_grouped_gemm(x, w, None, offsets)
    assert y.shape == (10, 64) and y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- availability


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(_extension, "load", lambda: (None, "ModuleNotFoundError: No module named 'scattermoe._C'"))
    monkeypatch.setattr(_extension, "probe", lambda: {"error": None, "device_count": 0})


def test_missing_extension_is_reported_not_raised(no_extension):
    reason = cutlass.unsupported_reason(torch.zeros(2, dtype=torch.bfloat16))
    assert "not built" in reason and "SCATTERMOE_BUILD_CUDA=1" in reason and "nvidia-cutlass==4.2.0.0" in reason


def test_no_driver_is_reported_with_the_cuda_error(monkeypatch):
    monkeypatch.setattr(_extension, "load", lambda: (object(), None))
    monkeypatch.setattr(_extension, "probe", lambda: {
        "error": 35, "error_name": "cudaErrorInsufficientDriver",
        "error_string": "CUDA driver version is insufficient for CUDA runtime version", "device_count": 0})
    reason = cutlass.unsupported_reason(torch.zeros(2, dtype=torch.bfloat16))
    assert "cudaErrorInsufficientDriver" in reason and "CUDA error 35" in reason


def test_no_gpu_and_cpu_tensors_are_reported(monkeypatch):
    monkeypatch.setattr(_extension, "load", lambda: (object(), None))
    monkeypatch.setattr(_extension, "probe", lambda: {"error": 0, "device_count": 0})
    assert "no CUDA GPU" in cutlass.unsupported_reason(torch.zeros(2))
    monkeypatch.setattr(_extension, "probe", lambda: {"error": 0, "device_count": 1})
    assert "CUDA tensors" in cutlass.unsupported_reason(torch.zeros(2))


def test_bad_module_path_is_a_reason_not_an_import_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SCATTERMOE_CSRC_MODULE", str(tmp_path / "missing_C.so"))
    _extension.load.cache_clear()
    _extension.probe.cache_clear()
    try:
        module, error = _extension.load()
        assert module is None and error
        assert "not built" in _extension.unavailable_reason() and "SCATTERMOE_CSRC_MODULE=" in error
        # A module that loads but is not the extension (or is an older build of it): a reason too, not an
        # AttributeError from probe().
        other = tmp_path / "other.py"
        other.write_text("x = 1\n")
        monkeypatch.setenv("SCATTERMOE_CSRC_MODULE", str(other))
        _extension.load.cache_clear()
        _extension.probe.cache_clear()
        assert _extension.load()[0] is None and "has no cuda_probe" in _extension.unavailable_reason()
        assert _extension.probe() == {"error": None, "device_count": 0}
    finally:
        _extension.load.cache_clear()
        _extension.probe.cache_clear()
        sys.modules.pop("scattermoe._C", None)


def test_cuda_error_code_parses_extension_messages():
    msg = "cudaGetDevice(&previous_) failed: cudaErrorInsufficientDriver (CUDA error 35): ... [x.cuh:1]"
    assert _extension.cuda_error_code(msg) == 35
    assert _extension.cuda_error_code("no code here") is None


def test_persistent_scatter_gemm_switch_sets_the_kernels_cta_count(monkeypatch):
    """num_ctas is the scatter GEMM's kernel choice: 0 (one CTA per tile, the default), the SM count
    (set_persistent()), or a given count (tests: a few CTAs, each looping over many tiles)."""
    monkeypatch.setattr(sg, "_sm_count", lambda device: 132 + device)
    monkeypatch.setattr(sg, "_persistent", False)
    assert sg.num_ctas(0) == 0
    with cutlass.persistent():
        assert sg.num_ctas(0) == 132 and sg.num_ctas(1) == 133
        with cutlass.persistent(3):
            assert sg.num_ctas(0) == 3
        assert sg.num_ctas(0) == 132
    assert sg.num_ctas(0) == 0
    for bad in (0, -2, 1.5, "yes", None):
        with pytest.raises(ValueError, match="set_persistent: expected True, False or a positive CTA count"):
            cutlass.set_persistent(bad)
    assert sg.num_ctas(0) == 0  # a refused value changes nothing


def test_persistent_scatter_gemm_env_switch():
    code = ("from scattermoe.backends.cutlass import scatter_gemm as sg; "
            "sg._sm_count = lambda device: 132; print(sg.num_ctas(0))")
    for value, expected in (("1", "132"), ("0", "0"), ("", "0")):
        env = dict(os.environ, SCATTERMOE_CUTLASS_PERSISTENT=value)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


@pytest.fixture
def cpu_launch(monkeypatch):
    """A launcher's CUDA queries (current device, stream) answered without CUDA, so that its call into a fake
    module can run on CPU tensors."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_weight_tma_switch_reaches_the_kernel_and_what_it_did_is_recorded(monkeypatch, cpu_launch):
    """set_weight_tma() / weight_tma() become the scatter GEMM's w_tma argument; what the kernel reports doing
    (TMA, or cp.async where no tensor map can describe W) becomes last_weight_load."""
    seen = []

    class FakeModule:
        def __init__(self, can_tma):
            self.can_tma = can_tma

        def scatter_gemm(self, **kwargs):
            seen.append(kwargs["w_tma"])
            return kwargs["w_tma"] and self.can_tma

    monkeypatch.setattr(sg, "_weight_tma", False)
    counts = [3, 0, 5]
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = torch.zeros(3, 128, 64, dtype=torch.bfloat16).permute(0, 2, 1)
    offsets = torch.tensor(counts).cumsum(0)
    idx = torch.arange(8)
    y = torch.empty(8, 128, dtype=torch.bfloat16)
    p = sg.plan(x, w, None, offsets, 8)
    assert isinstance(p, sg.ScatterGemmPlan), p
    for can_tma in (True, False):
        monkeypatch.setattr(_extension, "load", lambda: (FakeModule(can_tma), None))
        sg.launch(p, x, w, None, idx, offsets, 2, False, False, None, y)
        assert seen[-1] is False and sg.last_weight_load == "cp.async"
        with cutlass.weight_tma():
            sg.launch(p, x, w, None, idx, offsets, 2, False, False, None, y)
            assert seen[-1] is True and sg.last_weight_load == ("tma" if can_tma else "cp.async")
        assert sg._weight_tma is False
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="set_weight_tma: expected True or False"):
            cutlass.set_weight_tma(bad)
    code = "from scattermoe.backends.cutlass import scatter_gemm as sg; print(sg._weight_tma)"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = dict(os.environ, SCATTERMOE_CUTLASS_WEIGHT_TMA=value)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr)


def test_dw_launch_passes_the_largest_first_order_only_when_there_is_one(monkeypatch, cpu_launch):
    """The csrc dW gets expert_order (an int32 permutation, largest expert first) with many experts and rows,
    and no such argument otherwise (so an extension built before it existed still runs)."""
    from scattermoe.backends import _schedule

    seen = []

    class FakeModule:
        def group_bwd_w(self, **kwargs):
            seen.append(kwargs)

    monkeypatch.setattr(_extension, "load", lambda: (FakeModule(), None))
    monkeypatch.setattr(_schedule, "LARGEST_FIRST_MIN_ROWS", 1)
    orders = []
    monkeypatch.setattr(wg, "largest_experts_first",
                        lambda *args: orders.append(_schedule.largest_experts_first(*args)) or orders[-1])
    for num_experts in (16, 15):
        counts = torch.arange(num_experts) % 5
        offsets = counts.cumsum(0)
        n = int(counts.sum())
        x, dy = torch.zeros(n, 64, dtype=torch.bfloat16), torch.zeros(n, 32, dtype=torch.bfloat16)
        like = torch.zeros(num_experts, 64, 32, dtype=torch.bfloat16)
        p = wg.plan(x, dy, offsets, like, n, None)
        assert isinstance(p, wg.GroupBwdWPlan), p
        wg.launch(p, x, dy, torch.arange(n), offsets, 1, 1, True, True, torch.empty_like(like))
    (with_order, without) = seen
    assert orders[0] is not None and with_order["expert_order"] == orders[0].data_ptr()
    assert orders[0].tolist()[:3] == [4, 9, 14]  # 4 rows each, the most, in index order
    assert orders[1] is None and "expert_order" not in without


def test_one_row_with_any_row_stride_runs_on_csrc_and_the_kernels_get_the_row_width(monkeypatch, cpu_launch):
    """T=1, k=1: a [1, K] tensor may come with strides (1, 1) (autograd's gradients, kept by .contiguous()).
    The planners take it (it used to fall back to Triton) and every launcher passes the row's width as its row
    stride, which the kernels' checks (row stride >= width, a multiple of 8) accept and never read."""
    calls = []

    class Module:  # the row-stride checks of csrc/*/run()
        @staticmethod
        def check(kw, names):
            for name, width in names:
                if kw[name] < width or kw[name] % 8:
                    raise ValueError(f"the kernel refuses {name}={kw[name]} (width {width})")
            calls.append(kw)

        def scatter_gemm(self, **kw):
            self.check(kw, [("stride_xm", kw["k_in"]), ("stride_ym", kw["n_out"])])
            return False

        def group_bwd_w(self, **kw):
            self.check(kw, [("stride_xm", kw["k_in"]), ("stride_dym", kw["n_out"])])

        def grouped_gemm(self, **kw):
            self.check(kw, [("stride_xm", kw["k_in"]), ("stride_ym", kw["n_out"])])

    monkeypatch.setattr(_extension, "load", lambda: (Module(), None))
    monkeypatch.setattr(gg, "_sm_count", lambda device: 132)  # (both cached: patched, not called with a fake)
    monkeypatch.setattr(gg, "_workspace_bytes", lambda *args: 0)
    one_row = lambda n: torch.zeros(n, 1, dtype=torch.bfloat16).t()  # noqa: E731
    x, dy, y = one_row(64), one_row(32), one_row(32)
    assert x.is_contiguous() and x.stride() == (1, 1) and x.contiguous().stride() == (1, 1)
    w = torch.zeros(2, 32, 64, dtype=torch.bfloat16).permute(0, 2, 1)  # [E, K, F], K-major
    offsets, idx = torch.tensor([0, 1]), torch.tensor([0])
    p = sg.plan(x, w, None, offsets, 1, y)
    assert isinstance(p, sg.ScatterGemmPlan), p
    sg.launch(p, x, w, None, idx, offsets, 1, False, False, None, y)
    p = wg.plan(x, dy, offsets, w, 1, None)
    assert isinstance(p, wg.GroupBwdWPlan), p
    wg.launch(p, x, dy, idx, offsets, 1, 1, True, True, torch.empty_like(w))
    p = gg.plan(x, w, None, offsets, 1, y)
    assert not isinstance(p, str), p
    gg.launch(p, x, w, None, offsets, y)
    assert [(kw["stride_xm"], kw.get("stride_ym", kw.get("stride_dym"))) for kw in calls] == [(64, 32)] * 3


def test_cpu_tensors_never_reach_a_csrc_plan_and_fall_back_by_name(monkeypatch):
    """Without the emulator: CPU tensors are refused by every planner (they would reach a CUDA stream), the
    fallback is counted only once it can run, and strict mode is a real bool."""
    x, w, _, route = make_case([3, 2], 16, 8)
    _, scattered, offsets = route
    reason = cutlass.scatter2scatter_fallback_reason(x, w, None, offsets, scattered.numel(), True, True, None, None,
                                                     0, None)
    assert reason == "tensors on cpu, not CUDA"
    dispatch.FALLBACKS.clear()
    monkeypatch.setattr(dispatch, "_check_triton", lambda t, why: (_ for _ in ()).throw(RuntimeError(why)))
    for call in (lambda: s2s(x, w, None, route),
                 lambda: cutlass.group_bwd_w(x, torch.randn(5, 8).to(w.dtype), scattered, offsets, w, 1, 1, True,
                                             True),
                 lambda: cutlass.glu_backward(torch.randn(5, 8), torch.randn(5, 4), True)):
        with pytest.raises(RuntimeError, match="tensors on cpu, not CUDA"):
            call()
    assert not dispatch.FALLBACKS, "a fallback that could not run was counted"
    for bad in ("no", None, 2):
        with pytest.raises(ValueError, match="enabled: expected True or False"):
            cutlass.set_strict(bad)


def test_glu_backward_gives_the_kernel_row_strides_it_accepts_and_falls_back_on_overlapping_rows(monkeypatch):
    """One routed row: autograd may hand dG back with strides (1, 1) (torch ignores a size-1 dim's stride); the
    kernel refuses a row stride under the row's width (its SMOE_CHECK), so the launcher passes the width, which
    it never reads with one row. Rows that overlap (an expanded dG) go to Triton instead."""
    calls = []

    class Module:  # the extension's glu_backward, with the argument checks of csrc/glu_backward/ (run())
        @staticmethod
        def glu_backward(**kw):
            f = kw["f"]
            if kw["stride_pm"] < 2 * f or kw["stride_dgm"] < f or kw["stride_dhm"] < 2 * f:
                raise ValueError(f"the kernel refuses these strides: {kw}")
            calls.append(kw)

    monkeypatch.setattr(_extension, "load", lambda: (Module, None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    pre = torch.randn(1, 16, dtype=torch.bfloat16)
    dg = torch.randn(8, 1, dtype=torch.bfloat16).t()
    assert dg.shape == (1, 8) and dg.stride() == (1, 1)
    assert glu_grad.plan(pre, dg) is None
    glu_grad.launch(pre, dg, True, None, True, True)
    assert calls and calls[0]["stride_dgm"] == 8
    expanded = torch.randn(1, 8, dtype=torch.bfloat16).expand(4, 8)
    assert "rows overlap" in glu_grad.plan(torch.randn(4, 16, dtype=torch.bfloat16), expanded)


def test_the_registered_grouped_gemm_op_checks_shapes_before_the_kernel():
    bf16 = torch.bfloat16
    x, w = torch.randn(6, 8, dtype=bf16), torch.randn(3, 8, 16, dtype=bf16)
    offsets = torch.tensor([2, 4, 6])
    for args, message in (((x, w, None, offsets[:2]), r"^expert_offsets: expected \[E=3\]"),
                          ((x, w, torch.randn(16, dtype=bf16), offsets), r"^bias: expected a 2-d tensor"),
                          ((x, w, torch.randn(3, 8, dtype=bf16), offsets), r"^bias: expected shape \(3, 16\)"),
                          ((x[:, :4], w, None, offsets), r"^x: expected \[N, 8\]")):
        with pytest.raises(ValueError, match=message):
            gg.grouped_gemm_op(*args)


def test_the_dw_plan_refuses_an_empty_weight():
    x, dy = torch.randn(4, 8, dtype=torch.bfloat16)[:, :0], torch.randn(4, 8, dtype=torch.bfloat16)
    like = torch.empty(2, 0, 8, dtype=torch.bfloat16)
    assert "an empty weight" in wg.plan(x, dy, torch.tensor([2, 4]), like, 4, None)


def test_the_glu_launch_reads_each_experts_bias_through_the_bias_own_row_stride(monkeypatch, cpu_launch):
    """With the GLU epilogue a contiguous bias is [E, 2F] (row stride 2F), not [E, F] like y: the integers the kernel
    gets must lead it to bias[e] for expert e (the emulated launches above read the plan, not these integers)."""
    seen = {}

    class FakeModule:
        def scatter_gemm(self, **kwargs):
            seen.update(kwargs)
            return False

    E, K, F = 3, 16, 8
    x = torch.zeros(6, K, dtype=torch.bfloat16)
    w = torch.zeros(E, 2 * F, K, dtype=torch.bfloat16).permute(0, 2, 1)
    bias = torch.arange(E * 2 * F, dtype=torch.float32).to(torch.bfloat16).view(E, 2 * F)
    offsets = torch.tensor([2, 4, 6])
    p = sg.plan(x, w, bias, offsets, 6, glu=1)
    assert isinstance(p, sg.ScatterGemmPlan), p
    monkeypatch.setattr(_extension, "load", lambda: (FakeModule(), None))
    sg.launch(p, x, w, bias, torch.arange(6), offsets, 1, True, True, None, torch.empty(6, F, dtype=torch.bfloat16))
    flat = bias.reshape(-1)
    for e in range(E):
        assert torch.equal(flat[e * seen["stride_be"]:][:2 * F], bias[e]), (e, seen["stride_be"])


@pytest.mark.parametrize("capability, supported", [((9, 0), True), ((8, 0), False), ((10, 0), False),
                                                    ((12, 0), False)])
def test_only_sm90_runs_the_sm90a_cubins(monkeypatch, capability, supported):
    """sm_90a machine code runs on sm_90 alone: an older GPU and a newer one (B200 sm_100, sm_120) are refused."""
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    x = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=torch.bfloat16)
    reason = cutlass.unsupported_reason(x)
    assert (reason is None) == supported, reason
    if not supported:
        assert f"sm_{capability[0]}{capability[1]}" in reason


def test_a_weight_whose_experts_start_off_alignment_falls_back():
    """TMA (and the 16-byte cp.async loads) need every expert's first element 16-byte aligned: experts 4 elements
    apart cannot be read, though each row is aligned; both csrc plans must refuse, naming the alignment."""
    E, K, F = 3, 16, 16
    w = torch.zeros(E * (K * F + 4), dtype=torch.bfloat16).as_strided((E, K, F), (K * F + 4, F, 1))
    x, offsets = torch.zeros(6, K, dtype=torch.bfloat16), torch.tensor([2, 4, 6])
    for p in (gg.plan(x, w, None, offsets, 6), sg.plan(x, w, None, offsets, 6)):
        assert isinstance(p, str) and "aligned" in p, p


def test_the_dw_plan_takes_up_to_65535_experts_the_grids_limit():
    x = dy = torch.zeros(4, 8, dtype=torch.bfloat16)
    for num_experts in (65535, 65536):
        like = torch.zeros(1, 8, 8, dtype=torch.bfloat16).expand(num_experts, 8, 8)
        p = wg.plan(x, dy, torch.zeros(num_experts, dtype=torch.int64), like, 4, None)
        assert isinstance(p, str) == (num_experts > 65535), (num_experts, p)
        if isinstance(p, str):
            assert "65535" in p


def test_the_dw_plan_refuses_what_its_16_byte_copies_cannot_read():
    """The csrc dW copies x and dy rows 16 bytes (8 elements) at a time and writes a dW allocated like the weight:
    F not a multiple of 8, or a weight of another dtype than x and dy, go to Triton (named), not to the kernel."""
    x, offsets = torch.zeros(4, 16, dtype=torch.bfloat16), torch.tensor([2, 4])
    dy, like = torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    assert isinstance(wg.plan(x, dy, offsets, like, 4, None), wg.GroupBwdWPlan)
    p = wg.plan(x, dy[:, :12], offsets, like[:, :, :12], 4, None)
    assert isinstance(p, str) and "F=12" in p and "multiples of 8" in p, p
    p = wg.plan(x, dy, offsets, like.float(), 4, None)
    assert isinstance(p, str) and "mixed dtypes" in p, p


def test_the_gather_combine_on_the_cutlass_backend_says_why_triton_cannot_run_it(monkeypatch):
    """gather_sum is Triton's pass on the cutlass backend too: where Triton cannot run, the error says so (as a
    fallback's does) instead of failing inside Triton."""
    import scattermoe.backends as backends

    monkeypatch.setattr(backends, "triton_unsupported_reason", lambda x: "triton is not installed")
    with pytest.raises(RuntimeError, match="gather_sum runs on Triton.*triton is not installed"):
        cutlass.gather_sum(torch.randn(4, 8), torch.arange(4), None, 2)


def test_the_dw_plan_checks_dy_rows_as_it_checks_x_rows():
    """Both dW operands are copied 16 bytes at a time: a dY that is column-major (a transposed gradient) or whose
    rows start off 16-byte alignment (a slice 1 element in) goes to Triton, named, like such an x."""
    x, offsets = torch.zeros(4, 16, dtype=torch.bfloat16), torch.tensor([2, 4])
    like = torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    transposed = torch.zeros(16, 4, dtype=torch.bfloat16).t()
    off_alignment = torch.zeros(4 * 16 + 1, dtype=torch.bfloat16)[1:].view(4, 16)
    for dy in (transposed, off_alignment):
        p = wg.plan(x, dy, offsets, like, 4, None)
        assert isinstance(p, str) and "dy (strides" in p, (dy.stride(), p)
        assert isinstance(wg.plan(dy, x, offsets, like, 4, None), str)  # the same tensor as x: refused too


def test_a_bias_without_unit_column_stride_goes_to_triton_on_the_scatter_kernel(fake_launch, fake_triton):
    """The scatter GEMM's epilogue reads bias[e] as consecutive elements: a bias that is a transposed view ([F, E]
    stored, .t() passed) is Triton's (it reads any stride), not read wrong by the kernel."""
    x, w, _, route = make_case([4, 4], 32, 64)
    bias = torch.randn(64, 2).to(torch.bfloat16).t()
    p = sg.plan(x, w, bias, route[2], 8)
    assert isinstance(p, str) and "bias must have a unit column stride" in p, p
    assert s2s(x, w, bias, route, grouped_out=False) == "triton-result" and not fake_launch


def test_a_bias_whose_rows_start_off_alignment_is_copied():
    """The grouped GEMM reads bias[e] 16 bytes at a time from bias + e * row stride: a bias whose base is aligned
    but whose row stride is not a multiple of 8 elements (a slice of a wider tensor) is copied, values kept."""
    bias = torch.randn(3, 68).to(torch.bfloat16)[:, :64]
    assert bias.data_ptr() % 16 == 0 and bias.stride() == (68, 1)
    fixed = gg._bias_for_kernel(bias)
    assert fixed.stride() == (64, 1) and fixed.data_ptr() % 16 == 0 and torch.equal(fixed, bias)
    one_expert = torch.randn(1, 68).to(torch.bfloat16)[:, :64]  # one row: its stride is never read
    assert gg._bias_for_kernel(one_expert) is one_expert


def test_the_grouped_gemm_launch_reads_each_experts_bias_through_the_bias_own_row_stride(monkeypatch, cpu_launch):
    """A bias kept as it is (aligned rows, unit column stride) may be a slice of a wider tensor, its row stride
    not F: the integers the grouped GEMM gets must lead it to bias[e] for expert e."""
    seen = {}

    class FakeModule:
        def grouped_gemm(self, **kwargs):
            seen.update(kwargs)

    E, K, F = 3, 16, 64
    x = torch.zeros(6, K, dtype=torch.bfloat16)
    w = torch.zeros(E, F, K, dtype=torch.bfloat16).permute(0, 2, 1)
    bias = torch.arange(E * 72, dtype=torch.float32).to(torch.bfloat16).view(E, 72)[:, :F]
    offsets = torch.tensor([2, 4, 6])
    p = gg.plan(x, w, bias, offsets, 6)
    assert isinstance(p, gg.GroupedGemmPlan), p
    monkeypatch.setattr(_extension, "load", lambda: (FakeModule(), None))
    monkeypatch.setattr(gg, "_sm_count", lambda device: 132)
    monkeypatch.setattr(gg, "_workspace_bytes", lambda *args: 0)
    gg.launch(p, x, w, bias, offsets, torch.empty(6, F, dtype=torch.bfloat16))
    assert seen["bias"] == bias.data_ptr()  # kept, not copied
    flat = bias.as_strided(((E - 1) * 72 + F,), (1,))  # the bias's memory, first row to last
    for e in range(E):
        assert torch.equal(flat[e * seen["stride_be"]:][:F], bias[e]), (e, seen["stride_be"])


def _malformed_scatter2scatter_calls():
    """(name, kwargs of cutlass.scatter2scatter, the argument the error must name) for calls whose tensors the
    kernels (csrc and Triton alike) would read or write past: what torch.ops.scattermoe.scatter2scatter(_glu) can
    be handed without parallel_linear's checks."""
    bf16 = torch.bfloat16
    x, w, _, (_, scattered, offsets) = make_case([3, 0, 5], 16, 32)
    good = dict(x=x, w=w, bias=None, sorted_scattered_idxs=scattered, expert_offsets=offsets, fan_out=1,
                grouped_in=True, grouped_out=False)
    glu = dict(good, glu=1)
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731  (another device, without a GPU)
    return [
        ("offsets shorter than E", dict(good, expert_offsets=offsets[:2]), "expert_offsets"),
        ("row_scale shorter than N", dict(good, row_scale=torch.ones(7)), "row_scale"),
        ("pre_activation with too few rows", dict(glu, pre_activation=torch.empty(7, 32, dtype=bf16)),
         "pre_activation"),
        ("pre_activation narrower than 2F", dict(glu, pre_activation=torch.empty(8, 16, dtype=bf16)),
         "pre_activation"),
        ("out with too few rows", dict(good, out=torch.empty(7, 32, dtype=bf16)), "out"),
        ("x narrower than K", dict(good, x=x[:, :8].contiguous()), "x"),
        ("x with fewer rows than the slots", dict(good, x=x[:7]), "x"),
        ("x with fewer tokens than N / fan_out", dict(good, x=x[:3], fan_out=2, grouped_in=False), "x"),
        ("bias of the wrong width", dict(good, bias=torch.zeros(3, 16, dtype=bf16)), "bias"),
        ("w on another device", dict(good, w=meta(w)), "w"),
        ("offsets on another device", dict(good, expert_offsets=meta(offsets)), "expert_offsets"),
        ("indices on another device", dict(good, sorted_scattered_idxs=meta(scattered)), "sorted_scattered_idxs"),
        ("row_scale on another device", dict(good, row_scale=torch.ones(8, device="meta")), "row_scale"),
    ]


@pytest.mark.parametrize("name,kwargs,argument", _malformed_scatter2scatter_calls(),
                         ids=[c[0] for c in _malformed_scatter2scatter_calls()])
def test_malformed_scatter2scatter_calls_raise_naming_the_argument_before_any_kernel(fake_launch, fake_triton, name,
                                                                                     kwargs, argument):
    """Neither the csrc kernel nor the Triton fallback (which reads the same indices unchecked) is reached."""
    with pytest.raises(ValueError, match=f"^{argument}: "):
        cutlass.scatter2scatter(**kwargs)
    assert not fake_launch and not fake_triton, name


@pytest.mark.parametrize("name,kwargs,argument", _malformed_scatter2scatter_calls(),
                         ids=[c[0] for c in _malformed_scatter2scatter_calls()])
def test_the_triton_launcher_refuses_the_same_malformed_calls(name, kwargs, argument):
    """torch.ops.scattermoe.scatter2scatter(..., backend="triton") goes straight to the Triton launcher: the same
    checks there (a malformed call raises before the kernel, which would read or write past the tensors)."""
    from scattermoe.backends import triton as triton_backend

    with pytest.raises(ValueError, match=f"^{argument}: "):
        triton_backend.scatter2scatter(**kwargs)


def test_a_well_formed_scatter2scatter_call_passes_the_argument_checks(fake_launch, fake_triton):
    """The same tensors as the malformed calls above, well formed: they reach the kernel (offsets may be longer
    than E, row_scale and the outputs may have more rows than N: the kernels read only the first ones)."""
    x, w, _, (_, scattered, offsets) = make_case([3, 0, 5], 16, 32)
    pre = torch.empty(9, 32, dtype=torch.bfloat16)
    cutlass.scatter2scatter(x, w, None, scattered, torch.cat([offsets, offsets[-1:]]), 1, True, False,
                            row_scale=torch.ones(9), glu=1, pre_activation=pre)
    assert len(fake_launch) == 1 and not fake_triton


@pytest.mark.parametrize("name,pre,dg,row_scale,argument", [
    ("odd pre width", (6, 15), (6, 7), None, "pre"),
    ("dg with fewer rows", (6, 16), (5, 8), None, "dg"),
    ("dg narrower than F", (6, 16), (6, 4), None, "dg"),
    ("row_scale shorter than N", (6, 16), (6, 8), 5, "row_scale"),
    ("dg on another device", (6, 16), "meta", None, "dg"),
])
def test_malformed_glu_backward_calls_raise_naming_the_argument_before_any_kernel(fake_launch, fake_triton, name, pre,
                                                                                  dg, row_scale, argument):
    pre_t = torch.randn(*pre).to(torch.bfloat16)
    dg_t = (torch.empty(6, 8, dtype=torch.bfloat16, device="meta") if dg == "meta"
            else torch.randn(*dg).to(torch.bfloat16))
    scale = torch.ones(row_scale) if row_scale is not None else None
    with pytest.raises(ValueError, match=f"^{argument}: "):
        cutlass.glu_backward(pre_t, dg_t, True, scale)
    assert not fake_launch and not fake_triton, name
    from scattermoe.backends import triton as triton_backend

    with pytest.raises(ValueError, match=f"^{argument}: "):  # the Triton launcher, reached directly, alike
        triton_backend.glu_backward(pre_t, dg_t, True, scale)


def _malformed_group_bwd_w_calls():
    """(name, kwargs of group_bwd_w, the argument the error must name) for calls whose tensors the weight-gradient
    kernels (csrc and Triton alike) would read past: what torch.ops.scattermoe.group_bwd_w can be handed."""
    x, w, _, (_, scattered, offsets) = make_case([3, 0, 5], 16, 32)
    dy = torch.randn(8, 32).to(torch.bfloat16)
    good = dict(x=x, dy=dy, sorted_scattered_idxs=scattered, expert_offsets=offsets, like_weight=w, x_fan_out=1,
                dy_fan_out=1, x_grouped=False, dy_grouped=True)
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731  (another device, without a GPU)
    return [
        ("offsets shorter than E", dict(good, expert_offsets=offsets[:2]), "expert_offsets", ValueError),
        ("row_scale shorter than N", dict(good, row_scale=torch.ones(7)), "row_scale", ValueError),
        ("x narrower than K", dict(good, x=x[:, :8].contiguous()), "x", ValueError),
        ("dy narrower than F", dict(good, dy=dy[:, :16].contiguous()), "dy", ValueError),
        ("grouped dy with fewer rows than N", dict(good, dy=dy[:7]), "dy", ValueError),
        ("x with fewer tokens than N / fan_out", dict(good, x=x[:3], x_fan_out=2), "x", ValueError),
        ("a zero fan_out (the kernels divide by it)", dict(good, x_fan_out=0), "x_fan_out", ValueError),
        ("dy of another dtype", dict(good, dy=dy.float()), "dy", TypeError),
        ("float indices", dict(good, sorted_scattered_idxs=scattered.float()), "sorted_scattered_idxs", TypeError),
        ("x on another device", dict(good, x=meta(x)), "x", ValueError),
        ("offsets on another device", dict(good, expert_offsets=meta(offsets)), "expert_offsets", ValueError),
        ("indices on another device", dict(good, sorted_scattered_idxs=meta(scattered)), "sorted_scattered_idxs",
         ValueError),
    ]


@pytest.mark.parametrize("name,kwargs,argument,error", _malformed_group_bwd_w_calls(),
                         ids=[c[0] for c in _malformed_group_bwd_w_calls()])
def test_malformed_group_bwd_w_calls_raise_naming_the_argument_before_any_kernel(fake_launch, fake_triton, name,
                                                                                 kwargs, argument, error):
    """Neither the csrc weight-gradient kernel nor the Triton one (reached directly through
    torch.ops.scattermoe.group_bwd_w(..., backend="triton")) is launched."""
    with pytest.raises(error, match=f"^{argument}: "):
        cutlass.group_bwd_w(**kwargs)
    assert not fake_launch and not fake_triton, name
    from scattermoe.backends import triton as triton_backend

    with pytest.raises(error, match=f"^{argument}: "):
        triton_backend.group_bwd_w(**kwargs)


def test_a_well_formed_group_bwd_w_call_passes_the_argument_checks(fake_launch, fake_triton):
    """The same tensors as the malformed calls above, well formed, reach the csrc kernel (offsets may be longer than
    E and row_scale longer than N: the kernels read only the first ones)."""
    x, w, _, (_, scattered, offsets) = make_case([3, 0, 5], 16, 32)
    dy = torch.randn(8, 32).to(torch.bfloat16)
    cutlass.group_bwd_w(x, dy, scattered, torch.cat([offsets, offsets[-1:]]), w, 1, 1, False, True,
                        row_scale=torch.ones(9))
    assert len(fake_launch) == 1 and not fake_triton


def _locate_row_tile(offsets, num_rows, tile, tile_m=128):
    """The definition (csrc/scatter_gemm/scatter_gemm_sm90.cuh, above locate_row_tile_warp), one expert at a time."""
    tiles_before = prev_end = 0
    for e, end in enumerate(offsets):
        end = min(max(end, 0), num_rows)
        start, prev_end = min(prev_end, end), end
        tiles = -(-(end - start) // tile_m)
        if tile < tiles_before + tiles:
            return start + (tile - tiles_before) * tile_m, end, e
        tiles_before += tiles
    return 0, 0, -1


def _locate_row_tile_warp(offsets, num_rows, tile, tile_m=128):
    """locate_row_tile_warp transcribed lane by lane: 32 experts a pass, shfl_up for the previous end and the
    inclusive scan, a ballot for the first lane whose tiles reach past `tile`, shfl from lane 31 for the carry."""
    num_experts = len(offsets)
    tiles_before = prev_end = 0
    for base in range(0, num_experts, 32):
        lanes = range(32)
        valid = [base + lane < num_experts for lane in lanes]
        end = [min(max(offsets[base + lane], 0), num_rows) if valid[lane] else 0 for lane in lanes]
        before = [prev_end] + end[:31]
        start = [min(b, e) for b, e in zip(before, end)]
        count = [-(-(end[i] - start[i]) // tile_m) if valid[i] else 0 for i in lanes]
        upto = list(count)
        d = 1
        while d < 32:  # shfl_up by d: lanes below d keep theirs
            upto = [upto[i] + (upto[i - d] if i >= d else 0) for i in lanes]
            d *= 2
        holds = [valid[i] and tile < tiles_before + upto[i] for i in lanes]
        if any(holds):
            src = holds.index(True)
            first_tile = tiles_before + upto[src] - count[src]
            return start[src] + (tile - first_tile) * tile_m, end[src], base + src
        tiles_before += upto[31]
        prev_end = end[31]
    return 0, 0, -1


def test_the_warp_search_finds_each_row_tile_where_the_serial_definition_does():
    """Both scatter-GEMM kernels find a tile's expert with locate_row_tile_warp (the per-tile one since 2026-12-03,
    in place of thread 0's serial walk): its transcription gives the serial definition's answer for every row tile
    of the grid (cdiv(N, 128) + E, the tiles past the last included), with sorted offsets, empty experts, unsorted
    ones and ones outside [0, N] (hand-made routing, unchecked on CUDA), E from 1 to 130 (passes of 32 and a
    partial one)."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for case in range(240):
        num_experts = [1, 2, 31, 32, 33, 64, 100, 128, 130][case % 9]
        num_rows = int(torch.randint(0, 1500, (1,), generator=g))
        if case % 3 == 0:  # routing-made: sorted, ending at N
            cuts = torch.randint(0, num_rows + 1, (num_experts,), generator=g).sort().values
            cuts[-1] = num_rows
        else:  # unsorted, some below 0 or above N
            cuts = torch.randint(-200, num_rows + 400, (num_experts,), generator=g)
        offsets = cuts.tolist()
        for tile in range(-(-num_rows // 128) + num_experts):
            assert _locate_row_tile_warp(offsets, num_rows, tile) == _locate_row_tile(offsets, num_rows, tile), (
                offsets, num_rows, tile)
            checked += 1
    assert checked > 5000


def test_the_scatter_gemm_launch_gives_the_kernel_the_pre_activation_rows(monkeypatch, cpu_launch):
    """The kernel's run() refuses a pre-activation with fewer rows than N (pre_rows, as y_rows for y): the launcher
    must pass the tensor's rows, 0 without one."""
    seen = []

    class FakeModule:  # scatter_gemm with run()'s row checks
        def scatter_gemm(self, **kw):
            if kw["y_rows"] < kw["num_rows"] or (kw["pre"] and kw.get("pre_rows", 0) < kw["num_rows"]):
                raise ValueError(f"the kernel refuses these rows: {kw}")
            seen.append(kw)
            return False

    monkeypatch.setattr(_extension, "load", lambda: (FakeModule(), None))
    x, w, _, (_, scattered, offsets) = make_case([3, 0, 5], 16, 32)
    p = sg.plan(x, w, None, offsets, 8, glu=1)
    assert isinstance(p, sg.ScatterGemmPlan), p
    y, pre = torch.empty(8, 16, dtype=torch.bfloat16), torch.empty(9, 32, dtype=torch.bfloat16)
    sg.launch(p, x, w, None, scattered, offsets, 1, True, False, None, y, pre)
    sg.launch(p, x, w, None, scattered, offsets, 1, True, False, None, y)
    assert [(kw["pre"] != 0, kw["pre_rows"]) for kw in seen] == [(True, 9), (False, 0)]


# Preconditions of the csrc kernels' argument checks (csrc/*/run(), the bindings' 32-bit ints) that the planners
# must guarantee, or else fall back to Triton: a plan the kernel then refuses is a ValueError out of the launch.


def test_an_overlapping_pre_activation_falls_back_instead_of_reaching_the_kernel(fake_launch, fake_triton):
    """run() of the scatter GEMM refuses stride_pm < 2F (its SMOE_CHECK); an expanded or row-overlapping
    pre_activation passes the shape checks, so the plan must name it."""
    x, w, b, route = make_case([5, 0, 7], 32, 64)
    for pre in (torch.empty(1, 64, dtype=torch.bfloat16).expand(12, 64),  # row stride 0
                torch.empty(12 * 40 + 24, dtype=torch.bfloat16).as_strided((12, 64), (40, 1))):  # rows overlap
        reason = dispatch.scatter2scatter_fallback_reason(x, w, b, route[2], 12, True, False, None, None, 1, pre)
        assert reason is not None and reason.startswith("pre_activation (strides"), reason
        assert s2s(x, w, b, route, grouped_out=False, glu=1, pre_activation=pre) == "triton-result"
    assert not fake_launch and len(fake_triton) == 2
    kept = torch.empty(12, 72, dtype=torch.bfloat16)[:, :64]  # row stride 72 >= 2F: still the csrc kernel
    s2s(x, w, b, route, grouped_out=False, glu=1, pre_activation=kept)
    assert len(fake_launch) == 1 and len(fake_triton) == 2


def _empty_weight_calls():
    bf16 = torch.bfloat16
    x = torch.randn(8, 16).to(bf16)
    offsets = torch.tensor([3, 8])
    return {
        # x [8, 0] sliced from a [8, 8] buffer: a row stride of 8, which rows_ok takes
        "K=0": (x[:, :0], torch.empty(2, 0, 24, dtype=bf16), offsets, "K=0, F=24: an empty weight"),
        "F=0, K-major w": (x, torch.empty(2, 0, 16, dtype=bf16).permute(0, 2, 1), offsets,
                           "K=16, F=0: an empty weight"),
        "E=0": (x, torch.empty(0, 16, 24, dtype=bf16), offsets[:0], "E=0: no experts"),
    }


@pytest.mark.parametrize("name", sorted(_empty_weight_calls()))
def test_an_empty_weight_falls_back_instead_of_reaching_the_kernel(fake_launch, fake_triton, name):
    """run() of every GEMM refuses E, K or F = 0 (num_experts / k_in / n_out >= 1); those planned a launch (a
    K-major [E, K, 0] weight, a sliced [N, 0] x with an aligned row stride, an E=0 weight) and raised there.
    Triton takes them (it writes the bias for K=0, nothing for F=0)."""
    x, w, offsets, reason = _empty_weight_calls()[name]
    assert gg.plan(x, w, None, offsets, 8).startswith(reason)
    assert sg.plan(x, w, None, offsets, 8).startswith(reason)
    assert cutlass.scatter2scatter(x, w, None, torch.arange(8), offsets, 1, True, True) == "triton-result"
    assert not fake_launch and [k for k in dispatch.FALLBACKS if k.startswith(reason)]


@pytest.mark.interpreter
def test_dw_with_no_experts_is_empty_without_a_kernel(fake_launch):
    """E=0: dW [0, K, F] and db [0, F] have nothing to compute. The csrc kernel refuses num_experts < 1, so the plan
    gives the call to the Triton launcher by name, which returns them without a kernel (it indexed dw[0] once: an
    IndexError). float16: the interpreter's bfloat16 is refused (upstream bug), and both dtypes plan alike."""
    half = torch.float16
    x, dy = torch.randn(4, 16).to(half), torch.randn(4, 24).to(half)
    like = torch.empty(0, 16, 24, dtype=half)
    idx, offsets = torch.arange(4), torch.empty(0, dtype=torch.int64)
    assert wg.plan(x, dy, offsets, like, 4, None).startswith("E=0: no experts")
    dispatch.FALLBACKS.clear()
    for with_bias in (False, True):
        dw, db = cutlass.group_bwd_w(x, dy, idx, offsets, like, 1, 1, True, True, None, with_bias)
        assert dw.shape == (0, 16, 24) and dw.dtype == half
        assert (db.shape == (0, 24) and db.dtype == half) if with_bias else db is None
    assert not fake_launch and [k for k in dispatch.FALLBACKS if k.startswith("E=0: no experts")]


def test_feature_dims_past_32_bits_fall_back_on_metadata_alone():
    """The bindings take K and F as 32-bit ints (checked_int) and the kernels index columns in int up to a tile past
    them: wider weights must be a reason, read from shapes and strides only (meta tensors: no memory)."""
    bf16, big = torch.bfloat16, 2**31
    offsets = torch.tensor([2])

    def meta(*shape):
        return torch.empty(*shape, dtype=bf16, device="meta")

    wide_k = (meta(2, big), meta(1, big, 8))
    wide_f = (meta(2, 8), meta(1, 8, big))
    wide_f_k_major = (meta(2, 8), meta(1, big, 8).permute(0, 2, 1))  # strides (8 * 2^31, 1, 8)
    for x, w in (wide_k, wide_f, wide_f_k_major):
        for reason in (gg.plan(x, w, None, offsets, 2), sg.plan(x, w, None, offsets, 2)):
            assert isinstance(reason, str) and "32-bit column indices" in reason, reason
    x, w = wide_f_k_major
    assert "32-bit column indices" in sg.plan(x, w, None, offsets, 2, glu=1)  # 2F = 2^31 columns of W
    x, w = wide_k
    assert "32-bit column indices" in wg.plan(x, meta(2, 8), offsets, w, 2, None)
    assert "32-bit column indices" in glu_grad.plan(meta(2, 2 * big), meta(2, big))
    # Just below: still planned (meta tensors' data_ptr() is 0, so aligned).
    x, w = meta(2, 2**30), meta(1, 2**30, 8)
    assert isinstance(sg.plan(x, w, None, offsets, 2), sg.ScatterGemmPlan)
    assert isinstance(gg.plan(x, w, None, offsets, 2), gg.GroupedGemmPlan)
    assert isinstance(wg.plan(x, meta(2, 8), offsets, w, 2, None), wg.GroupBwdWPlan)
    assert glu_grad.plan(meta(2, 2**31), meta(2, 2**30)) is None


def test_a_fan_out_past_32_bits_reaches_the_kernels_as_one_that_reads_the_same_rows(monkeypatch, cpu_launch):
    """The bindings take fan_out as a 32-bit int; Python's may be any positive int (a huge one is a valid call
    when x has one row). The kernels read row slot // fan_out for slots in [0, N): the launchers pass a fan-out
    that reads the same row for every slot."""
    seen = []

    class FakeModule:
        def scatter_gemm(self, **kw):
            seen.append(("fan_out", kw["fan_out"], kw["num_rows"]))
            return False

        def group_bwd_w(self, **kw):
            seen.extend([("x_fan_out", kw["x_fan_out"], kw["num_rows"]),
                         ("dy_fan_out", kw["dy_fan_out"], kw["num_rows"])])

    monkeypatch.setattr(_extension, "load", lambda: (FakeModule(), None))
    x, w, _, (_, scattered, offsets) = make_case([3, 0, 5], 16, 32)
    y = torch.empty(8, 32, dtype=torch.bfloat16)
    p = sg.plan(x[:1], w, None, offsets, 8)
    assert isinstance(p, sg.ScatterGemmPlan), p
    dy = torch.randn(8, 32).to(torch.bfloat16)
    pw = wg.plan(x[:1], dy, offsets, w, 8, None)
    assert isinstance(pw, wg.GroupBwdWPlan), pw
    for fan_out in (2, 8, 2**31, 2**40 + 3):
        seen.clear()
        sg.launch(p, x[:1], w, None, scattered, offsets, fan_out, False, False, None, y)
        wg.launch(pw, x[:1], dy, scattered, offsets, fan_out, fan_out, False, False, torch.empty_like(w))
        for name, passed, num_rows in seen:
            assert 1 <= passed <= 2**31 - 1, (name, passed)
            assert [s // passed for s in range(num_rows)] == [s // fan_out for s in range(num_rows)], (name, passed)
    monkeypatch.setattr(sg, "_persistent", 2**40)  # set_persistent takes any positive int
    assert sg.num_ctas(0) == 2**31 - 1
