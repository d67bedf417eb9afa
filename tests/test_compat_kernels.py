"""scattermoe.kernels.ops: both generations of ScatterMoE's kernel module, against loops.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D in, F out.
"""

import pytest
import torch

import reference
import scattermoe
import scattermoe.kernels.ops as kops
from helpers import TOL, assert_close
from scattermoe.backends.triton import config as triton_config

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _routing(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    pool = E - 1 if E > K else E  # leave the last expert empty when possible
    return torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])


def _loop_rows(X, W, b, idx_TK, K):
    """Y [N, F] in slot order t*K + j: X[t] W_e (+ b_e), one row at a time."""
    flat = idx_TK.reshape(-1)
    return torch.stack([X[s // K] @ W[flat[s]] + (b[flat[s]] if b is not None else 0) for s in range(flat.numel())])


def test_allow_tf32_is_the_triton_switch():
    before = triton_config.ALLOW_TF32
    try:
        kops.ALLOW_TF32 = True
        assert triton_config.ALLOW_TF32 is True and kops.ALLOW_TF32 is True
        assert triton_config.input_precision(torch.float32) == "tf32"
        kops.ALLOW_TF32 = False
        assert triton_config.ALLOW_TF32 is False and kops.ALLOW_TF32 is False
        assert triton_config.input_precision(torch.float32) == "ieee"
        for bad in ("no", "False", None, 2):  # bool("no") would have turned TF32 on
            with pytest.raises(ValueError, match="^ALLOW_TF32: expected True or False"):
                kops.ALLOW_TF32 = bad
            assert triton_config.ALLOW_TF32 is False
    finally:
        triton_config.ALLOW_TF32 = before


@pytest.mark.parametrize("T, E, K", [(13, 4, 2), (1, 3, 1), (9, 3, 3), (300, 4, 2)])
def test_flatten_and_sort_and_padded_block_indices(T, E, K):
    idx = _routing(T, E, K, seed=T)
    sorted_expert_idxs, sorted_scattered_idxs = kops.flatten_and_sort(idx)
    assert torch.equal(idx.reshape(-1)[sorted_scattered_idxs], sorted_expert_idxs)
    assert torch.equal(sorted_scattered_idxs.sort().values, torch.arange(T * K))  # a permutation
    for e in range(E):  # stable: token order within each expert (an unstable CPU sort reorders from ~100 rows)
        slots = sorted_scattered_idxs[sorted_expert_idxs == e]
        assert bool((slots.diff() > 0).all()), f"expert {e}: slots out of order"
    for block in (4, 128):
        padded_block_idxs, expert_offsets = kops.padded_block_indices(sorted_expert_idxs, E, N_BLOCK_SIZE=block)
        counts = torch.bincount(idx.reshape(-1), minlength=E)
        assert torch.equal(expert_offsets, counts.cumsum(0))
        expected = [int(start) + i * block for e, start in enumerate(expert_offsets - counts)
                    for i in range((int(counts[e]) + block - 1) // block)]
        assert padded_block_idxs.tolist() == expected
    # int64 whatever the ids' dtype, as the 2024 code's type promotion (bincount's int64) returned them
    padded_block_idxs, expert_offsets = kops.padded_block_indices(sorted_expert_idxs.int(), E)
    assert (padded_block_idxs.dtype, expert_offsets.dtype) == (torch.int64, torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("generation", ["2024", "0.3.0"])
@pytest.mark.parametrize("grouped_out", [False, True])
def test_scatter2scatter_both_signatures(backend, generation, grouped_out):
    T, E, K, D, F = 13, 5, 2, 24, 20  # expert 4 empty; dims not multiples of the 32 block
    torch.manual_seed(7)
    idx = _routing(T, E, K, seed=3)
    X, W, b = torch.randn(T, D), torch.randn(E, D, F), torch.randn(E, F)
    sorted_expert_idxs, sorted_scattered_idxs = kops.flatten_and_sort(idx)
    padded_block_idxs, _ = kops.padded_block_indices(sorted_expert_idxs, E)
    ref = _loop_rows(X, W, b if generation == "0.3.0" else None, idx, K)
    if grouped_out:
        ref = ref[sorted_scattered_idxs]
    with scattermoe.use_backend(backend):
        if generation == "2024":
            y = kops.scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, K, padded_block_idxs,
                                     False, grouped_out)
            y_kw = kops.scatter2scatter(X=X, W=W, sorted_expert_idxs=sorted_expert_idxs,
                                        sorted_scattered_idxs=sorted_scattered_idxs,
                                        padded_block_idxs=padded_block_idxs,
                                        k=K, x_grouped=False, y_grouped=grouped_out)
            torch.testing.assert_close(y_kw, y, rtol=0, atol=0)
        else:
            y = kops.scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, K, b=b, y_grouped=grouped_out)
        # grouped input, k=1, written into a given buffer (the original's backward reuses buffers this way)
        out = torch.full((T * K, F), float("nan"))
        xg = X[torch.div(sorted_scattered_idxs, K, rounding_mode="floor")]
        y2 = kops.scatter2scatter(xg, W, sorted_expert_idxs, sorted_scattered_idxs, 1,
                                  b if generation == "0.3.0" else padded_block_idxs,
                                  x_grouped=True, y_grouped=grouped_out, out=out)
    assert y2.data_ptr() == out.data_ptr()
    assert y.grad_fn is None  # kernel-level, like the original
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_and_group_bwd_W(backend):
    T, E, K, D, F = 11, 4, 3, 20, 36
    torch.manual_seed(1)
    idx = _routing(T, E, K, seed=5)
    sorted_expert_idxs, sorted_scattered_idxs = kops.flatten_and_sort(idx)
    _, expert_offsets = kops.padded_block_indices(sorted_expert_idxs, E)
    X, coeff, DY = torch.randn(T, D), torch.rand(T, K), torch.randn(T * K, F)
    with scattermoe.use_backend(backend):
        xg = kops.group(X, sorted_scattered_idxs, fan_out=K)
        xg_scaled = kops.group(X, sorted_scattered_idxs, coeff=coeff.reshape(-1), fan_out=K,
                               out=torch.empty(T * K, D))
        dw_2024 = kops.group_bwd_W(DY, xg, expert_offsets, E)
        dw, db = kops.group_bwd_W(DY, xg, expert_offsets, E, has_bias=True)
        dw_nb, db_none = kops.group_bwd_W(DY, xg, expert_offsets, E, has_bias=False)
    slots = sorted_scattered_idxs
    torch.testing.assert_close(xg, X[slots // K], rtol=0, atol=0)
    torch.testing.assert_close(xg_scaled, X[slots // K] * coeff.reshape(-1)[slots, None])
    ref_w = torch.stack([xg[sorted_expert_idxs == e].t() @ DY[sorted_expert_idxs == e] for e in range(E)])
    ref_b = torch.stack([DY[sorted_expert_idxs == e].sum(0) for e in range(E)])
    for got in (dw_2024, dw, dw_nb):
        assert got.shape == (E, D, F) and got.permute(0, 2, 1).is_contiguous()  # the original's layout
        torch.testing.assert_close(got, ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, ref_b, rtol=1e-5, atol=1e-5)
    assert db_none is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_2024_parallel_linear_and_parallel_experts_forms(backend):
    """The 2024 MLP as written then: flatten_and_sort + padded_block_indices, and calls that pass
    padded_block_idxs before expert_offsets, positionally and by keyword; same values and grads."""
    T, E, K, D, H = 17, 6, 2, 24, 40
    torch.manual_seed(2)
    idx = _routing(T, E, K, seed=9)
    gates = torch.softmax(torch.randn(T, K), -1).requires_grad_()
    x = torch.randn(T, D, requires_grad=True)
    experts = scattermoe.ParallelExperts(E, D, H)
    output_experts = scattermoe.ParallelExperts(E, H, D, bias=True)
    torch.nn.init.normal_(output_experts.bias)
    w_skip = torch.randn(E, D, D, requires_grad=True)  # [E, in, out] for direct parallel_linear calls
    params = (x, gates, experts.weight, output_experts.weight, output_experts.bias, w_skip)

    def run(old):
        with torch.no_grad():
            if old:
                sei, ssi = kops.flatten_and_sort(idx)
                pbi, eo = kops.padded_block_indices(sei, E)
            else:
                sei, ssi, eo = scattermoe.flatten_sort_count(idx, E)
        with scattermoe.use_backend(backend):
            if old:
                h = kops.parallel_experts_forward(experts, x, K, sei, ssi, pbi, eo, grouped_out=True)
                h = torch.nn.functional.gelu(h)
                y = kops.parallel_experts_forward(output_experts, h, 1, sei, ssi, pbi, eo, gates, True)
                # the 2024 parallel_linear: (inputs, W, k, sei, ssi, padded_block_idxs, expert_offsets, gates)
                y = y + kops.parallel_linear(x, w_skip, K, sei, ssi, pbi, eo, gates)
                y = y + kops.parallel_linear(x, w_skip, K, sei, ssi, padded_block_idxs=pbi, expert_offsets=eo,
                                             gates=gates)
            else:
                h = torch.nn.functional.gelu(experts(x, K, sei, ssi, eo, grouped_out=True))
                y = output_experts(h, 1, sei, ssi, eo, gates=gates, grouped_in=True)
                y = y + 2 * scattermoe.parallel_linear(x, w_skip, K, sei, ssi, eo, gates=gates)
        return y, torch.autograd.grad(y.square().sum(), params)

    y_old, g_old = run(True)
    y_new, g_new = run(False)
    torch.testing.assert_close(y_old, y_new, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_old, g_new):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_accepts_padded_block_idxs_rejects_extra_positionals():
    f = kops.accepts_padded_block_idxs(1, ("c",))(lambda a, b, c=None: (a, b, c))
    i = torch.arange(3)
    out = f(0, i, i + 1, "c")
    assert torch.equal(out[1], i + 1) and out[2] == "c"
    out = f(0, i, padded_block_idxs=i)
    assert torch.equal(out[1], i) and out[2] is None
    with pytest.raises(TypeError, match="too many"):
        f(0, i, i, 1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_linear_function_takes_the_originals_argument_order(backend):
    """scattermoe.parallel_experts.ParallelLinear.apply as the original's users call it (0.3.0 and 2024)."""
    from scattermoe.parallel_experts import ParallelLinear

    T, E, K, D, F = 9, 4, 2, 12, 20
    idx = _routing(T, E, K, seed=3)
    routing = scattermoe.flatten_sort_count(idx, E)
    padded_block_idxs, _ = kops.padded_block_indices(routing[0], E)
    x = torch.randn(T, D, requires_grad=True)
    w, b, gates = torch.randn(E, D, F), torch.randn(E, F), torch.rand(T, K)
    with scattermoe.use_backend(backend):
        y = ParallelLinear.apply(x, w, K, *routing, b, gates, False, False)
        y_2024 = ParallelLinear.apply(x, w, K, routing[0], routing[1], padded_block_idxs, routing[2], gates)
    x64 = x.detach().double().requires_grad_()
    ref = reference.parallel_linear(x64, w.double(), K, *routing, b.double(), gates.double(), False, False)
    ref_2024 = reference.parallel_linear(x64, w.double(), K, *routing, None, gates.double(), False, False)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_2024.double(), ref_2024, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)  # differentiable, like the original's Function
    (gx_ref,) = torch.autograd.grad(ref, x64, dy.double())
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_ops_reject_bad_input_by_name(backend):
    T, E, K, D, F = 6, 3, 2, 8, 5
    idx = _routing(T, E, K, seed=4)
    sorted_expert_idxs, sorted_scattered_idxs = kops.flatten_and_sort(idx)
    _, offsets = kops.padded_block_indices(sorted_expert_idxs, E)
    X, W, DY, xg = torch.randn(T, D), torch.randn(E, D, F), torch.randn(T * K, F), torch.randn(T * K, D)
    s2s = lambda **kw: kops.scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, K, **kw)  # noqa: E731
    cases = [
        (lambda: s2s(out=torch.zeros(1, F).expand(T * K, F)), ValueError, r"^out: .*share memory"),
        (lambda: s2s(out=torch.zeros(T * K, F, dtype=torch.int64)), TypeError, r"^out: .*dtype"),
        (lambda: s2s(out=torch.zeros(T * K, F + 1)), ValueError, r"^out: expected shape"),
        (lambda: kops.group_bwd_W(DY, xg, offsets.diff(prepend=offsets.new_zeros(1)), E), ValueError,
         r"^expert_offsets: "),  # counts, not cumulative counts
        (lambda: kops.group_bwd_W(DY, xg, offsets.flip(0), E), ValueError, r"^expert_offsets: "),
        # Ending short of N: the rows past the last offset would belong to no expert's dW.
        (lambda: kops.group_bwd_W(DY, xg, torch.minimum(offsets, offsets.new_tensor(T * K - 2)), E), ValueError,
         rf"^expert_offsets: .*up to N={T * K}"),
        (lambda: kops.group_bwd_W(DY, xg, offsets.float(), E), TypeError, r"^expert_offsets: "),
        (lambda: kops.group_bwd_W(DY.half(), xg, offsets, E), TypeError, r"^DY: .*dtype"),
        (lambda: kops.group_bwd_W(DY, xg, offsets, 0), ValueError, r"^E: "),
        (lambda: kops.group(X, sorted_scattered_idxs + T * K, fan_out=K), ValueError, r"^sorted_expert_idxs: "),
        (lambda: kops.group(X, sorted_scattered_idxs, coeff=torch.rand(3), fan_out=K), ValueError, r"^coeff: "),
        (lambda: kops.padded_block_indices(torch.tensor([0, 7]), 4), ValueError, r"^expert_idxs: "),
        (lambda: kops.padded_block_indices(sorted_expert_idxs, E, 0), ValueError, r"^N_BLOCK_SIZE: "),
    ]
    with scattermoe.use_backend(backend):
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()
        # A strided (non-overlapping) out is fine: written in place, as the original does.
        wide = torch.full((T * K, 2 * F), float("nan"))
        y = s2s(out=wide[:, :F])
        assert torch.isfinite(wide[:, :F]).all() and wide[:, F:].isnan().all()
        torch.testing.assert_close(y, s2s())


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
@pytest.mark.parametrize("alias", ["X", "W"])
def test_scatter2scatter_out_over_its_own_input(backend, alias):
    """out sharing memory with X (in place, grouped rows of equal width) or W: the result is still X W_e, as if
    out were separate (the kernels' programs would otherwise read rows another program already overwrote)."""
    T, E, K, D = 12, 3, 2, 16
    sorted_expert_idxs, sorted_scattered_idxs = kops.flatten_and_sort(_routing(T, E, K, seed=6))
    X, W = torch.randn(T * K, D), torch.randn(E, D, D) / 4
    _, offsets = kops.padded_block_indices(sorted_expert_idxs, E)
    want = reference.parallel_linear(X.double(), W.double(), 1, sorted_expert_idxs, sorted_scattered_idxs,
                                     offsets, None, None, True, False)
    if alias == "X":
        X_in = X.clone()
        out = X_in
    else:  # out over W's storage: a weight buffer large enough for the N rows
        W_in = torch.cat([W.reshape(-1), torch.zeros(T * K * D)]).view(-1)
        out = W_in[E * D * D:].view(T * K, D)
        W = W_in[:E * D * D].view(E, D, D)
        X_in = X
    with scattermoe.use_backend(backend):
        y = kops.scatter2scatter(X_in, W, sorted_expert_idxs, sorted_scattered_idxs, 1, None, True, False, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, want, TOL[torch.float32], f"y with out over {alias}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3])
def test_single2scatter_is_one_tokens_rows(backend, rows):
    """0.3.0's one-token kernel: Y[j] = X[j, or 0 with one row] W_e, e = expert_idxs[0, j]; any sizes (the
    original's kernel took multiples of 128 only)."""
    from scattermoe.kernels.single import single2scatter

    E, K, D, F = 5, 3, 24, 20
    torch.manual_seed(rows)
    X, W = torch.randn(rows, D), torch.randn(E, D, F)
    idx = torch.tensor([[4, 0, 2]])
    with scattermoe.use_backend(backend):
        y = single2scatter(X, W, idx)
    expected = torch.stack([X[j if rows > 1 else 0].double() @ W[idx[0, j]].double() for j in range(K)])
    assert_close(y, expected, TOL[torch.float32], "Y")
    for args, error, match in [
        ((torch.randn(2, D), W, idx), ValueError, r"^X: expected \[1, D\] or \[K=3, D\]"),
        ((X, W, idx.expand(2, K)), ValueError, r"^expert_idxs: expected \[1, K\]"),
        ((X, W, idx[0]), ValueError, r"^expert_idxs: expected a 2-d tensor"),
        ((X, W, idx.float()), TypeError, r"^expert_idxs: expected dtype"),
    ]:
        with pytest.raises(error, match=match):
            single2scatter(*args)


# Column strides whose offsets pass 2^31 elements: the kernels once multiplied column offsets by strides in int32,
# so a column-major operand's last column wrapped to 2^32 elements below where it is, read or written silently.
# The views lie in a sparse file mapped shared (8 GiB of address space, a few pages of memory and disk: only the
# touched pages exist, and a shared file mapping is not charged against the overcommit limit as malloc would be).
_SPREAD = 2**31 - 2**20  # column stride: column 2 sits at 2^32 - 2^21 elements, which int32 wraps to -2^21
_BASE = 2**21 + 64  # first element of each view, so that the wrapped address still lies inside the mapping


def _spread_columns(tmp_path, name: str, shape: tuple, inner: tuple) -> tuple:
    """(view, canary): a float16 view of `shape` with strides `inner` + (_SPREAD,) (3 columns), and the elements
    2^32 below its start, where the int32 wrap sends column 2, set to a value no result contains."""
    assert shape[-1] == 3
    span = _BASE + 2 * _SPREAD + 4096
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(span * 2)
    base = torch.from_file(str(path), shared=True, size=span, dtype=torch.float16)
    canary = base[_BASE - 2**21:_BASE - 2**21 + 4096]
    canary.fill_(1000.0)
    return base.as_strided(shape, inner + (_SPREAD,), _BASE), canary


@pytest.mark.interpreter
def test_group_bwd_W_reads_columns_past_2_31_elements(tmp_path):
    N, E, D, F = 5, 2, 3, 3
    X, _ = _spread_columns(tmp_path, "x", (N, D), (1,))
    DY, _ = _spread_columns(tmp_path, "dy", (N, F), (1,))
    X.copy_(torch.randn(N, D))
    DY.copy_(torch.randn(N, F))
    offsets = torch.tensor([2, N])
    with scattermoe.use_backend("triton"):
        dw, db = kops.group_bwd_W(DY, X, offsets, E, has_bias=True)
    Xd, DYd = X.double(), DY.double()
    assert_close(dw, torch.stack([Xd[:2].t() @ DYd[:2], Xd[2:].t() @ DYd[2:]]), TOL[torch.float16], "dW")
    assert_close(db, torch.stack([DYd[:2].sum(0), DYd[2:].sum(0)]), TOL[torch.float16], "db")


@pytest.mark.interpreter
def test_scatter2scatter_weight_and_out_columns_past_2_31_elements(tmp_path):
    """A weight whose output columns are spread (any strides are accepted) and a column-major `out`."""
    T, E, K, D = 3, 2, 2, 16
    sorted_expert_idxs, sorted_scattered_idxs = kops.flatten_and_sort(_routing(T, E, K, seed=7))
    X = torch.randn(T, D).half()
    W, _ = _spread_columns(tmp_path, "w", (E, D, 3), (D, 1))
    W.copy_(torch.randn(E, D, 3) / 4)
    out, canary = _spread_columns(tmp_path, "out", (T * K, 3), (1,))
    out.fill_(float("nan"))
    _, offsets = kops.padded_block_indices(sorted_expert_idxs, E)
    want = reference.parallel_linear(X.double(), W.double(), K, sorted_expert_idxs, sorted_scattered_idxs,
                                     offsets, None, None, False, False)
    with scattermoe.use_backend("triton"):
        y = kops.scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, K, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, want, TOL[torch.float16], "y")
    assert bool((canary == 1000.0).all()), "a store landed 2^32 elements below out"


def test_int64_column_offsets_only_where_int32_would_wrap():
    """The kernels take the int64 path (INT64_COLS) only for such operands: every usual layout keeps the int32
    column offsets, whose code tests/test_aot_sm90.py checks (the int64 ones cost registers)."""
    assert not triton_config.int64_columns((2048, 1), (5632, 2048), (11264, 2048))  # JetMoE, K-major weight
    assert not triton_config.int64_columns((5632, 1), (2048, 5632), (65536, 16384))  # a transposed [T, D] view
    assert triton_config.int64_columns((2048, 1), (3, _SPREAD))
    assert not triton_config.int64_columns((1024 - 256, 2**21 - 1))  # the last product below 2^31
    assert triton_config.int64_columns((1024 - 256, 2**21))  # 2^31 exactly
