"""Routing: flatten_sort_count invariants, JetMoE's top-k gating, the auxiliary losses.

Legend: T tokens, K experts per token, N = T*K routed slots, E experts.
"""

import pytest
import torch
from helpers import assert_close, make_expert_idxs

import reference
import scattermoe

ROUTING_SHAPES = [
    # (T, E, K, case)
    (37, 5, 2, "random"),      # the last expert gets zero tokens
    (1, 4, 2, "random"),       # T=1: most experts empty
    (19, 3, 3, "random"),      # k=E
    (21, 1, 1, "random"),      # E=1
    (16, 4, 1, "all_on_one"),  # k=1, every token on the middle expert: empty experts on both sides
    (40, 6, 2, "same_set"),    # duplicate experts across tokens, 4 experts empty
    (9, 4, 2, "repeat"),       # a token routed twice to the same expert
    (0, 4, 2, "random"),       # no tokens at all
]


@pytest.mark.parametrize("T, E, K, case", ROUTING_SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_flatten_sort_count_invariants(T, E, K, case, index_dtype):
    idx_TK = make_expert_idxs(T, E, K, case).to(index_dtype)
    flat = idx_TK.reshape(-1).long()
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = scattermoe.flatten_sort_count(idx_TK, E)

    N = T * K
    assert sorted_expert_idxs.shape == (N,) and sorted_scattered_idxs.shape == (N,) and expert_offsets.shape == (E,)
    for name, t in (("sorted_expert_idxs", sorted_expert_idxs), ("sorted_scattered_idxs", sorted_scattered_idxs),
                    ("expert_offsets", expert_offsets)):
        assert t.dtype == torch.int64, f"{name}: dtype {t.dtype}, expected int64"
    # sorted_scattered_idxs is a permutation of the slots, and it inverts: gathering by it sorts the ids.
    assert torch.equal(torch.sort(sorted_scattered_idxs).values, torch.arange(N))
    assert torch.equal(flat[sorted_scattered_idxs], sorted_expert_idxs)
    inverse = torch.argsort(sorted_scattered_idxs)
    assert torch.equal(sorted_expert_idxs[inverse], flat)
    # Expert order, and stable within an expert (token order kept: deterministic).
    assert bool((sorted_expert_idxs[1:] >= sorted_expert_idxs[:-1]).all()), "sorted_expert_idxs not nondecreasing"
    same = sorted_expert_idxs[1:] == sorted_expert_idxs[:-1]
    assert bool((sorted_scattered_idxs[1:][same] > sorted_scattered_idxs[:-1][same]).all()), "sort is not stable"
    # Offsets: cumulative counts, ending at T*K; empty experts repeat the previous offset.
    counts = torch.tensor([int((flat == e).sum()) for e in range(E)], dtype=torch.long)
    assert torch.equal(expert_offsets, counts.cumsum(0)), f"offsets {expert_offsets.tolist()}, counts {counts.tolist()}"
    assert int(expert_offsets[-1]) == N
    for e in range(E):
        start = int(expert_offsets[e - 1]) if e else 0
        assert bool((sorted_expert_idxs[start:int(expert_offsets[e])] == e).all()), f"expert {e}'s rows"
    # The reference gives the very same tensors.
    ref = reference.flatten_sort_count(idx_TK.long(), E)
    for name, got, want in zip(("sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets"),
                               (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets), ref):
        assert torch.equal(got, want), f"{name}: {got.tolist()} != reference {want.tolist()}"


def test_flatten_sort_count_accepts_flat_ids():
    idx_TK = make_expert_idxs(13, 5, 2)
    got = scattermoe.flatten_sort_count(idx_TK.reshape(-1), 5)
    want = scattermoe.flatten_sort_count(idx_TK, 5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_flatten_sort_count_counts_empty_experts():
    idx_TK = torch.tensor([[5, 1], [1, 5], [5, 5]])  # experts 0, 2, 3, 4, 6, 7 empty
    _, _, expert_offsets = scattermoe.flatten_sort_count(idx_TK, 8)
    assert expert_offsets.tolist() == [0, 2, 2, 2, 2, 6, 6, 6]


@pytest.mark.parametrize("bad", [-1, 4, 100], ids=["negative", "equal_to_E", "far_above_E"])
def test_flatten_sort_count_rejects_out_of_range_ids(bad):
    idx_TK = make_expert_idxs(6, 4, 2)
    idx_TK[3, 1] = bad
    with pytest.raises(ValueError, match="expert_idxs"):
        scattermoe.flatten_sort_count(idx_TK, 4)


def test_flatten_sort_count_rejects_float_ids():
    with pytest.raises(TypeError, match="expert_idxs"):
        scattermoe.flatten_sort_count(torch.zeros(4, 2), 3)


def _topk_softmax_by_hand(logits_TE: torch.Tensor, K: int):
    """Sort each row descending, keep K, softmax of those K by hand: exp(l - max) / sum, in float32."""
    values, idxs = torch.sort(logits_TE.float(), dim=-1, descending=True)
    top = values[:, :K]
    e = torch.exp(top - top[:, :1])
    return e / e.sum(-1, keepdim=True), idxs[:, :K]


@pytest.mark.parametrize("T, E, K", [(17, 8, 2), (1, 4, 1), (9, 3, 3), (5, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_gating_matches_softmax_over_topk_logits(T, E, K, dtype):
    logits = (torch.randn(T, E) * 3).to(dtype)
    gates, expert_idxs = scattermoe.topk_gating(logits, K)
    want_gates, want_idxs = _topk_softmax_by_hand(logits, K)
    assert gates.dtype == torch.float32, f"gates are computed and returned in float32, got {gates.dtype}"
    assert expert_idxs.dtype == torch.int64 and expert_idxs.shape == (T, K)
    assert torch.equal(expert_idxs, want_idxs)
    assert_close(gates, want_gates, 1e-6, "gates")
    assert_close(gates.sum(-1), torch.ones(T), 1e-6, "sum of gates")


def test_topk_gating_is_not_a_renormalised_full_softmax_of_a_low_precision_cast():
    """Softmax over the k *raw* logits in fp32: large logits far apart must not underflow to a one-hot."""
    logits = torch.tensor([[1000.0, 999.0, -5.0, 998.5]])
    gates, expert_idxs = scattermoe.topk_gating(logits, 2)
    assert expert_idxs.tolist() == [[0, 1]]
    e = torch.exp(torch.tensor([0.0, -1.0], dtype=torch.float64))
    assert_close(gates, (e / e.sum()).unsqueeze(0), 1e-6, "gates")


def test_topk_gating_rejects_bad_arguments():
    with pytest.raises(ValueError, match="router_logits"):
        scattermoe.topk_gating(torch.randn(2, 3, 0), 2)
    with pytest.raises(ValueError, match="top_k"):
        scattermoe.topk_gating(torch.randn(5, 4), 5)
    with pytest.raises(ValueError, match="top_k"):
        scattermoe.topk_gating(torch.randn(5, 4), 0)


def test_routing_takes_any_leading_shape_like_the_layers():
    """Logits [B, S, E] (a router on x [B, S, D]) give gates and ids [B, S, K], which the layer takes beside x, and
    the same values, losses and gradients as the tokens flattened to [B*S, E]."""
    B, S, D, F, E, K = 2, 3, 8, 12, 5, 2
    logits = torch.randn(B, S, E, requires_grad=True)
    gates, idx = scattermoe.topk_gating(logits, K)
    flat_gates, flat_idx = scattermoe.topk_gating(logits.detach().reshape(B * S, E), K)
    assert gates.shape == idx.shape == (B, S, K)
    assert torch.equal(idx.reshape(-1, K), flat_idx) and torch.equal(gates.detach().reshape(-1, K), flat_gates)
    assert scattermoe.topk_gating(logits[0, 0], K)[1].shape == (K,)  # one token, no leading dims
    flat = logits.detach().reshape(-1, E).requires_grad_()
    for loss, flat_loss in ((scattermoe.load_balancing_loss(logits, idx, E),
                             scattermoe.load_balancing_loss(flat, flat_idx, E)),
                            (scattermoe.router_z_loss(logits), scattermoe.router_z_loss(flat))):
        assert_close(loss, flat_loss.detach(), 1e-6)
        (grad,) = torch.autograd.grad(loss, logits)
        (flat_grad,) = torch.autograd.grad(flat_loss, flat)
        assert_close(grad.reshape(-1, E), flat_grad, 1e-6)
    moe = scattermoe.GLUMLP(D, F, E, K)
    x = torch.randn(B, S, D)
    y = moe(x, gates, idx)
    assert_close(y.reshape(-1, D), moe(x.reshape(-1, D), flat_gates, flat_idx).detach(), 1e-6)


def _switch_loss_by_hand(logits_TE: torch.Tensor, idx_TK: torch.Tensor, E: int) -> torch.Tensor:
    """E * sum_e P_e f_e with explicit loops, in float64: P_e mean softmax probability, f_e share of the T*K slots."""
    l64 = logits_TE.double()
    probs = torch.exp(l64 - l64.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)
    total = l64.new_zeros(())
    for e in range(E):
        P_e = probs[:, e].mean()
        f_e = (idx_TK == e).sum().double() / idx_TK.numel()
        total = total + P_e * f_e
    return E * total


def test_load_balancing_loss_is_one_for_a_uniform_router():
    T, E, K = 24, 6, 2
    # Uniform probabilities: loss = E * sum_e (1/E) f_e = 1 whatever the assignments.
    idx_TK = make_expert_idxs(T, E, K)
    loss = scattermoe.load_balancing_loss(torch.zeros(T, E), idx_TK, E)
    assert abs(loss.item() - 1.0) < 1e-6, f"uniform probabilities: loss {loss.item()}"
    # Perfectly balanced assignments (each expert 1/E of the slots): loss = E * sum_e P_e / E = 1 for any logits.
    balanced = torch.arange(T * K).remainder(E).view(T, K)
    loss = scattermoe.load_balancing_loss(torch.randn(T, E) * 2, balanced, E)
    assert abs(loss.item() - 1.0) < 1e-6, f"balanced assignments: loss {loss.item()}"


def test_load_balancing_loss_collapsed_router_approaches_E():
    T, E = 16, 4
    logits = torch.full((T, E), -30.0)
    logits[:, 0] = 30.0
    loss = scattermoe.load_balancing_loss(logits, torch.zeros(T, 1, dtype=torch.long), E)
    assert abs(loss.item() - E) < 1e-4, f"all tokens on expert 0 with probability ~1: loss {loss.item()}, expected {E}"


@pytest.mark.parametrize("T, E, K", [(31, 8, 2), (7, 4, 3), (12, 5, 1)])  # k<E: at k=E the loss is constant 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_balancing_loss_and_gradient_match_formula(T, E, K, dtype):
    logits = (torch.randn(T, E) * 2).to(dtype).requires_grad_()
    _, idx_TK = scattermoe.topk_gating(logits.detach(), K)
    loss = scattermoe.load_balancing_loss(logits, idx_TK, E)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref_logits = logits.detach().double().requires_grad_()
    ref = _switch_loss_by_hand(ref_logits, idx_TK, E)
    assert_close(loss, ref, 1e-6, "load_balancing_loss")
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert_close(grad, ref_grad, 1e-5 if dtype == torch.float32 else 1e-2, "d(load_balancing_loss)/d(logits)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_z_loss_matches_formula(dtype):
    T, E = 19, 7
    logits = (torch.randn(T, E) * 4 + 10).to(dtype).requires_grad_()  # large logits: exp overflows fp16
    loss = scattermoe.router_z_loss(logits)
    ref_logits = logits.detach().double().requires_grad_()
    m = ref_logits.max(-1, keepdim=True).values
    lse = (m + torch.log(torch.exp(ref_logits - m).sum(-1, keepdim=True))).squeeze(-1)
    ref = (lse * lse).sum() / T
    assert loss.dtype == torch.float32
    assert_close(loss, ref, 1e-6, "router_z_loss")
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert_close(grad, ref_grad, 1e-5 if dtype == torch.float32 else 3e-3, "d(router_z_loss)/d(logits)")


def test_router_z_loss_of_zero_logits_is_log_E_squared():
    E = 8
    loss = scattermoe.router_z_loss(torch.zeros(5, E))
    expected = torch.log(torch.tensor(float(E), dtype=torch.float64)) ** 2
    assert abs(loss.item() - expected.item()) < 1e-5


# ---- the one-launch counting sort flatten_sort_count uses on CUDA for few rows (Triton, interpreted here) ----

@pytest.mark.interpreter
@pytest.mark.parametrize("T, E, K, case", [s for s in ROUTING_SHAPES if s[0] > 0] + [
    (1024, 8, 2, "random"),   # the largest JetMoE N that fits (N * E = 16384), BLOCK = N
    (23, 64, 8, "random"),    # fine-grained: most experts hold a row or two, N not a power of two
])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_fused_sort_by_expert_matches_reference(T, E, K, case, index_dtype, monkeypatch):
    from scattermoe.backends.triton import routing as triton_routing

    assert triton_routing.fused_routing_fits(T * K, E)
    # Poison the outputs: an element the kernel does not write fails the comparison.
    monkeypatch.setattr(triton_routing, "_new_index", lambda n, device: torch.full((n,), -7, dtype=torch.int64))
    idx_TK = make_expert_idxs(T, E, K, case).to(index_dtype)
    got = triton_routing.sort_by_expert(idx_TK.reshape(-1).contiguous(), E)
    want = reference.flatten_sort_count(idx_TK.long(), E)
    for name, g, w in zip(("sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets"), got, want):
        assert g.dtype == torch.int64 and torch.equal(g, w), f"{name}: {g.tolist()} != reference {w.tolist()}"


@pytest.mark.interpreter
def test_fused_sort_by_expert_places_out_of_range_ids_after_every_expert(monkeypatch):
    # On CUDA ids are range-checked only in debug mode; a bad id must still leave every output written and
    # no expert's range holding it (the GEMMs then never read its row).
    from scattermoe.backends.triton import routing as triton_routing

    monkeypatch.setattr(triton_routing, "_new_index", lambda n, device: torch.full((n,), -7, dtype=torch.int64))
    ids = torch.tensor([3, -1, 0, 9, 0, 2, 4], dtype=torch.int32)
    sorted_expert, sorted_slot, offsets = triton_routing.sort_by_expert(ids, 4)
    assert sorted_expert.tolist() == [0, 0, 2, 3, -1, 9, 4]
    assert sorted_slot.tolist() == [2, 4, 5, 0, 1, 3, 6]
    assert offsets.tolist() == [2, 2, 3, 4]


@pytest.mark.interpreter
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", [None, -1, 4, 9], ids=["valid", "negative", "E", "beyond_E"])
def test_fused_sort_reports_whether_every_id_was_in_range(bad, index_dtype):
    # The verdict flatten_sort_count's device-side assert reads on CUDA for few rows, written by the kernel.
    from scattermoe.backends.triton import routing as triton_routing

    E = 4
    for trial in range(3):
        ids = torch.randint(0, E, (7,), dtype=index_dtype)
        if bad is not None:
            ids[torch.randint(0, 7, ()).item()] = bad
        ids_ok = torch.tensor([bad is not None])  # poisoned: the opposite of the right answer
        triton_routing.sort_by_expert(ids, E, ids_ok)
        assert ids_ok.item() == (bad is None), ids.tolist()
    with pytest.raises(ValueError, match="ids_ok: expected a \\[1\\] bool tensor"):
        triton_routing.sort_by_expert(ids, E, torch.ones(1, dtype=torch.int32))


@pytest.mark.parametrize("bad", [None, -1, 4, 9], ids=["valid", "negative", "E", "beyond_E"])
def test_device_assert_on_torch_sort_fails_exactly_when_an_id_is_out_of_range(bad):
    # On CUDA outside debug mode, flatten_sort_count's torch path queues assert_ids_in_range_async on its
    # result (no sync); it raises a RuntimeError on the CPU (on CUDA a device-side assert, tests/test_gpu.py).
    from scattermoe.routing import _sort_count_torch, assert_ids_in_range_async

    E = 4
    for trial in range(3):
        ids = torch.randint(0, E, (7,))
        if bad is not None:
            ids[torch.randint(0, 7, ()).item()] = bad
        # flatten_sort_count's torch path, without the value check it makes first on the CPU
        sorted_ids, _, offsets = _sort_count_torch(ids, E)
        if bad is None:
            assert_ids_in_range_async(sorted_ids, offsets, E)
        else:
            with pytest.raises(RuntimeError, match=r"expert ids must lie in \[0, num_experts=4\)"):
                assert_ids_in_range_async(sorted_ids, offsets, E)


@pytest.mark.interpreter
@pytest.mark.parametrize("fused", [True, False], ids=["fused_kernel", "torch_sort"])
def test_flatten_sort_count_queues_the_device_assert_where_values_go_unread(fused, monkeypatch):
    # CUDA outside debug mode, simulated on the CPU: the value check skipped, the assert queued on the result.
    from scattermoe import routing

    monkeypatch.setattr(routing, "check_expert_idxs", lambda ids, e: None)
    monkeypatch.setattr(routing, "_needs_device_assert", lambda flat: True)
    monkeypatch.setattr(routing, "_use_fused_routing", lambda flat, e: fused)
    got = routing.flatten_sort_count(torch.tensor([[1, 0], [2, 1]]), 3)
    for g, w in zip(got, reference.flatten_sort_count(torch.tensor([[1, 0], [2, 1]]), 3)):
        assert torch.equal(g, w)
    for bad in (3, -2):
        with pytest.raises(RuntimeError, match="expert ids must lie in"):
            routing.flatten_sort_count(torch.tensor([[1, 0], [bad, 1]]), 3)


def test_device_assert_is_queued_only_on_cuda_outside_debug_mode_unless_switched_off(monkeypatch):
    # A stand-in for CUDA ids (no GPU needed): the decision reads the device type, the size and the switches.
    import types

    from scattermoe import _validate, routing

    def ids(device_type, n=4):
        return types.SimpleNamespace(numel=lambda: n, device=types.SimpleNamespace(type=device_type))

    monkeypatch.setattr(_validate, "_DEBUG", False)
    monkeypatch.setattr(_validate, "_DEVICE_ASSERTS", True)
    assert routing._needs_device_assert(ids("cuda"))
    assert not routing._needs_device_assert(ids("cpu"))        # values checked on the host instead
    assert not routing._needs_device_assert(ids("cuda", n=0))  # nothing routed
    scattermoe.set_debug(True)                                 # values read on the host: a ValueError instead
    assert not routing._needs_device_assert(ids("cuda"))
    scattermoe.set_debug(False)
    scattermoe.set_device_asserts(False)
    assert not routing._needs_device_assert(ids("cuda"))
    with pytest.raises(ValueError, match=r"^enabled: expected True or False, got 'off'"):
        scattermoe.set_device_asserts("off")


def test_fused_routing_limits():
    from scattermoe.backends.triton.routing import (FUSED_ROUTING_MAX_EXPERTS, FUSED_ROUTING_MAX_ROWS,
                                                    FUSED_ROUTING_MAX_WORK, fused_routing_fits)

    assert not fused_routing_fits(0, 8)  # no rows: the torch path returns the empty tensors
    assert fused_routing_fits(1, 8) and fused_routing_fits(FUSED_ROUTING_MAX_WORK // 8, 8)
    assert not fused_routing_fits(FUSED_ROUTING_MAX_WORK // 8 + 1, 8)
    assert not fused_routing_fits(FUSED_ROUTING_MAX_ROWS + 1, 1)
    assert not fused_routing_fits(1, FUSED_ROUTING_MAX_EXPERTS + 1)  # a serial loop over experts
    with pytest.raises(ValueError, match="one-program range"):
        from scattermoe.backends.triton.routing import sort_by_expert

        sort_by_expert(torch.zeros(FUSED_ROUTING_MAX_ROWS + 1, dtype=torch.int64), 1)


def test_flatten_sort_count_takes_the_fused_path_only_on_cuda(monkeypatch):
    # The choice is made on the tensor: CPU ids (here) never launch the Triton sort, even under the interpreter.
    from scattermoe.backends.triton import routing as triton_routing

    def fail(*args):
        raise AssertionError("sort_by_expert was called for CPU ids")

    monkeypatch.setattr(triton_routing, "sort_by_expert", fail)
    with scattermoe.use_backend("triton"):
        scattermoe.flatten_sort_count(torch.tensor([[1, 0]]), 2)


# ---- top-k gating in one launch (Triton, interpreted here; used on CUDA when no gradient is needed) ----

# The interpreter computes padding lanes too (-inf - -inf there: numpy warns; the lanes are never stored).
ignore_padding_lane_warnings = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.mark.interpreter
@ignore_padding_lane_warnings
@pytest.mark.parametrize("T, E, K", [(1, 8, 2), (7, 3, 3), (300, 8, 2), (5, 1, 1), (33, 64, 8), (9, 128, 8),
                                     (3, 100, 4), (0, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_topk_softmax_matches_torch(T, E, K, dtype):
    from scattermoe.backends.triton.routing import topk_softmax

    logits = torch.randn(T, 2 * E, dtype=torch.float64).to(dtype)[:, :E]  # a row stride of 2E, not E
    gates, idx = topk_softmax(logits, K)
    values, _ = torch.topk(logits.float(), K, dim=-1)
    assert gates.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == gates.shape == (T, K)
    # Ties (frequent in bf16) may be ordered differently from torch: compare the chosen logits, largest first.
    assert torch.equal(logits.float().gather(1, idx), values)
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all()), "an expert chosen twice"
    torch.testing.assert_close(gates, torch.softmax(values, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.interpreter
@ignore_padding_lane_warnings
def test_fused_topk_softmax_picks_distinct_valid_experts_whatever_the_logits():
    from scattermoe.backends.triton.routing import topk_softmax

    logits = torch.full((3, 6), float("-inf"))
    logits[0, 4] = 1.0                 # one finite logit, the rest -inf
    logits[1, 2] = float("nan")        # NaN beside -inf
    logits[2] = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 0.0])  # a three-way tie
    gates, idx = topk_softmax(logits, 3)
    assert bool(((idx >= 0) & (idx < 6)).all()) and all(len(set(row)) == 3 for row in idx.tolist())
    assert idx[0, 0] == 4 and torch.equal(gates[0], torch.tensor([1.0, 0.0, 0.0]))
    assert gates[1].isnan().all()  # a NaN logit gives NaN gates, as on the torch path
    assert idx[2].tolist() == [1, 2, 4]  # the lowest index first among equals
    torch.testing.assert_close(gates[2], torch.full((3,), 1 / 3))


@pytest.mark.interpreter
@ignore_padding_lane_warnings
def test_fused_topk_softmax_keeps_the_experts_distinct_on_a_row_of_nans():
    """A diverged router's row of NaN logits matches no maximum at all: each round then takes the lowest expert not
    yet taken, so the K experts stay distinct (the gates are NaN, as on the torch path)."""
    from scattermoe.backends.triton.routing import topk_softmax

    gates, idx = topk_softmax(torch.full((2, 5), float("nan")), 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert gates.isnan().all()


@pytest.mark.interpreter
@ignore_padding_lane_warnings
def test_fused_topk_softmax_is_stable_at_extreme_logits_and_flags_a_nan_among_finite_ones():
    from scattermoe.backends.triton.routing import topk_softmax

    logits = torch.tensor([[1000.0, 999.0, -3.0, 0.0],          # exp would overflow without the max taken out
                           [-1000.0, -1001.0, -2000.0, -5000.0],  # and underflow to 0/0 here
                           [3.0, 1.0, float("nan"), 0.0]])       # a NaN the top-k passes over: still NaN gates
    gates, idx = topk_softmax(logits, 2)
    values = torch.topk(logits[:2], 2, dim=-1).values
    torch.testing.assert_close(gates[:2], torch.softmax(values, -1), rtol=1e-6, atol=1e-6)
    assert gates[2].isnan().all()
    assert torch.softmax(torch.topk(logits[2:], 2, dim=-1).values, -1).isnan().all()  # torch's path agrees


def test_fused_topk_is_only_taken_without_a_gradient(monkeypatch):
    """The one-launch top-k kernel has no backward: a router being trained must keep torch's path (else its
    logits get no gradient on CUDA). The CUDA condition is faked so that the choice itself is checked here."""
    from scattermoe import routing
    from scattermoe.backends.triton import routing as triton_routing

    monkeypatch.setattr(routing, "_triton_routing_allowed", lambda t: True)
    monkeypatch.setattr(triton_routing, "fused_topk_fits", lambda num_experts: True)
    logits = torch.randn(4, 8)
    assert routing._use_fused_topk(logits)  # inference: the fused kernel
    assert not routing._use_fused_topk(logits.requires_grad_())  # training: torch's differentiable path
    with torch.no_grad():
        assert routing._use_fused_topk(logits)  # no graph is built: nothing to differentiate
