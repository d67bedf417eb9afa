"""ScatterMoE 0.3.0's one-token kernel, ``scattermoe.kernels.single.single2scatter``, kept by signature.

The original had a Triton kernel of its own for decoding one token (sizes multiples of 128 only); here it is
the scatter GEMM over the token's K rows, any sizes.
"""

from __future__ import annotations

import torch

from .._validate import _INDEX_DTYPES, check_tensor
from ..routing import flatten_sort_count
from .ops import scatter2scatter

__all__ = ["single2scatter"]


def single2scatter(X: torch.Tensor, W: torch.Tensor, expert_idxs: torch.Tensor) -> torch.Tensor:
    """One token's K rows: Y[j] = X[j] W_e (X[0] when X has one row), e = expert_idxs[0, j] (not differentiable).

    X: [1, D] (the token) or [K, D] (a row per slot); W: [E, D, F]; expert_idxs: [1, K]. Returns Y [K, F] in X's
    dtype, in slot order.
    """
    check_tensor("W", W, dim=3)
    check_tensor("X", X, dim=2)
    check_tensor("expert_idxs", expert_idxs, dim=2, dtypes=_INDEX_DTYPES, device=W.device)
    if expert_idxs.size(0) != 1:
        raise ValueError(f"expert_idxs: expected [1, K] (one token's experts), got shape {tuple(expert_idxs.shape)}")
    fan_out = expert_idxs.size(1)
    if X.size(0) not in (1, fan_out):
        raise ValueError(f"X: expected [1, D] or [K={fan_out}, D] rows, got shape {tuple(X.shape)}")
    sorted_expert_idxs, sorted_scattered_idxs, _ = flatten_sort_count(expert_idxs, W.size(0))
    # One row: fanned out to the K slots. K rows: each slot reads its own (k=1 over the slot rows).
    return scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, fan_out if X.size(0) == 1 else 1)
