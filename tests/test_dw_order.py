"""The dW kernels launch their experts largest first (scattermoe/backends/_schedule.py).

A dW program reduces all of its expert's rows, so with many uneven experts the order of the expert axis
decides whether a large expert's long programs start first or last. The order must be a permutation
(every expert's dW written once), computed on the device from expert_offsets as the kernels clamp them.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import TOL, assert_close, per_expert_wgrad

from scattermoe.backends import _schedule
from scattermoe.backends.triton import group_bwd_w as triton_group_bwd_w

gbw_module = importlib.import_module("scattermoe.backends.triton.group_bwd_w")  # the module, not the launcher


@pytest.fixture
def any_rows(monkeypatch):
    """The order for any number of rows (the tests' shapes are far below LARGEST_FIRST_MIN_ROWS)."""
    monkeypatch.setattr(_schedule, "LARGEST_FIRST_MIN_ROWS", 1)


def test_largest_experts_first_is_a_stable_permutation_by_row_count(any_rows):
    counts = torch.tensor([3, 0, 7, 3, 0, 9, 1, 7, 2, 0, 5, 5, 0, 0, 4, 6, 0])
    offsets = counts.cumsum(0)
    order = _schedule.largest_experts_first(offsets, int(counts.sum()), len(counts))
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(len(counts)))
    assert order.tolist() == sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
    # Offsets clamped as the kernels clamp them: past num_rows, negative, decreasing; int32 like int64.
    bad = torch.tensor([2, -1, 5, 4, 30, 30] + [30] * 11, dtype=torch.int32)
    rows = _schedule.expert_rows(bad, 20).tolist()
    assert rows == [2, 0, 5, 0, 16, 0] + [0] * 11  # an expert starts at the previous end, or its own if smaller
    assert _schedule.largest_experts_first(bad, 20, 17).tolist()[:3] == [4, 2, 0]
    # Only the weight's experts are ordered: more offsets than experts must not hand out an expert >= E.
    long = torch.tensor([0] * 16 + [50, 90])
    assert sorted(_schedule.largest_experts_first(long, 90, 16).tolist()) == list(range(16))


def test_few_experts_or_few_rows_keep_index_order(monkeypatch):
    offsets = torch.arange(1, 17) * 2000
    assert _schedule.largest_experts_first(offsets[:15], 30000, 15) is None  # E < 16
    assert _schedule.largest_experts_first(offsets, 32000, 16) is not None
    monkeypatch.setattr(_schedule, "LARGEST_FIRST_MIN_ROWS", 32001)
    assert _schedule.largest_experts_first(offsets, 32000, 16) is None  # too few rows to pay for it


@pytest.mark.interpreter
@pytest.mark.parametrize("x_grouped", [False, True], ids=["x_gathered", "x_grouped"])
def test_triton_dw_in_largest_first_order_matches_the_reference(monkeypatch, any_rows, x_grouped):
    """E=20 uneven experts (some empty): each program takes the expert the order gives it, and every
    expert's dW (poisoned with NaN first: each must be written, the empty ones with zeros) and db are right;
    a constant order (every program on one expert) must break it, so the kernel does read the order."""
    g = torch.Generator().manual_seed(3)
    E, K, D, F = 20, 2, 24, 40
    counts = torch.tensor([0, 9, 1, 0, 30, 2, 2, 0, 5, 14, 0, 1, 3, 0, 8, 0, 4, 6, 0, 3])  # 88 rows
    n = int(counts.sum())
    sorted_expert = torch.repeat_interleave(torch.arange(E), counts)
    scattered = torch.randperm(n, generator=g)
    offsets = counts.cumsum(0)
    x = torch.randn(n if x_grouped else n // K, D, generator=g)
    dy = torch.randn(n, F, generator=g)
    like = torch.empty(E, D, F)
    calls = []

    def spy(expert_offsets, num_rows, num_experts):
        order = _schedule.largest_experts_first(expert_offsets, num_rows, num_experts)
        calls.append(order)
        return order

    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: empty_like(t, *a, **k).fill_(float("nan")))
    monkeypatch.setattr(gbw_module, "largest_experts_first", spy)
    dw, db = triton_group_bwd_w(x, dy, scattered, offsets, like, 1 if x_grouped else K, 1, x_grouped, True, None, True)
    assert len(calls) == 1 and calls[0] is not None and calls[0].tolist() != list(range(E))
    xs = x if x_grouped else x[scattered // K]
    assert_close(dw, per_expert_wgrad(xs, dy, sorted_expert, E), TOL[torch.float32], "dW")
    want_db = torch.zeros(E, F, dtype=torch.float64).index_add_(0, sorted_expert, dy.double())
    assert_close(db, want_db, TOL[torch.float32], "db")

    monkeypatch.setattr(gbw_module, "largest_experts_first",
                        lambda expert_offsets, num_rows, num_experts: torch.full((E,), 4, dtype=torch.int32))
    dw_bad, _ = triton_group_bwd_w(x, dy, scattered, offsets, like, 1 if x_grouped else K, 1, x_grouped, True,
                                   None, True)
    assert torch.equal(dw_bad[4], dw[4])  # expert 4 computed (by every program) ...
    assert torch.isnan(dw_bad[9]).all()  # ... and expert 9 never: its dW is still the poison


@pytest.mark.parametrize("row_scale", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("dy_grouped", [False, True], ids=["dy_gathered", "dy_grouped"])
def test_triton_dw_of_an_empty_weight_is_empty_and_its_db_still_sums_the_rows(dy_grouped, row_scale):
    """torch.ops.scattermoe.group_bwd_w reaches the Triton launcher with any weight: with E = 0 it raised an
    IndexError, and with K = 0 (the bias alone makes the output) db came back unwritten (uninitialised memory),
    as the grid had no program. db_e = sum over expert e's rows of s * dy, expert by expert, with an empty expert."""
    g = torch.Generator().manual_seed(5)
    E, K, F = 3, 2, 5
    counts = torch.tensor([2, 0, 4])
    n = int(counts.sum())
    sorted_expert = torch.repeat_interleave(torch.arange(E), counts)
    scattered = torch.randperm(n, generator=g)
    offsets = counts.cumsum(0)
    dy = torch.randn(n if dy_grouped else n // K, F, generator=g)
    scale = torch.rand(n, generator=g) if row_scale else None
    dys = dy if dy_grouped else dy[scattered // K]
    if row_scale:
        dys = dys * scale[scattered][:, None]
    want = torch.zeros(E, F, dtype=torch.float64)
    for e in range(E):
        want[e] = dys.double()[sorted_expert == e].sum(0)
    like = torch.empty(E, 0, F)
    dw, db = triton_group_bwd_w(torch.empty(n, 0), dy, scattered, offsets, like, 1, 1 if dy_grouped else K, True,
                                dy_grouped, scale, True)
    assert dw.shape == (E, 0, F) and db.shape == (E, F)
    assert_close(db, want, TOL[torch.float32], "db of a K=0 weight")
    dw, db = triton_group_bwd_w(torch.empty(0, 4), torch.empty(0, F), scattered[:0], offsets[:0],
                                torch.empty(0, 4, F), 1, 1, True, True, None, True)
    assert dw.shape == (0, 4, F) and db.shape == (0, F)
    dw, db = triton_group_bwd_w(torch.randn(n, 4), torch.empty(n, 0), scattered, offsets, torch.empty(E, 4, 0), 1, 1,
                                True, True, None, True)
    assert dw.shape == (E, 4, 0) and db.shape == (E, 0)
