"""Reference implementations: loops over experts (and, for the MLP, over tokens).

Legend: T tokens, K experts per token, N = T*K routed rows, E experts,
D input features, F output features.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def flatten_sort_count(expert_idxs: torch.Tensor, num_experts: int):
    """Sort the T*K routed slots by expert.

    expert_idxs: [T, K] integer expert ids in [0, E).
    Returns (sorted_expert_idxs [N], sorted_scattered_idxs [N], expert_offsets [E]):
    slot ``sorted_scattered_idxs[i]`` (= t*K + j) is the i-th row in expert order,
    and ``expert_offsets[e]`` is the end of expert e's rows (cumulative counts).
    """
    flat = expert_idxs.reshape(-1)
    sorted_expert_idxs, sorted_scattered_idxs = torch.sort(flat, stable=True)
    counts = torch.stack([(flat == e).sum() for e in range(num_experts)])
    return sorted_expert_idxs, sorted_scattered_idxs, counts.cumsum(0)


def parallel_linear(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    expert_biases: Optional[torch.Tensor] = None,
    gates: Optional[torch.Tensor] = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> torch.Tensor:
    """Y = X W_e (+ b_e) over the routed rows, one expert at a time.

    x: [T, D] (token order) or, with ``grouped_in``, [N, D] in expert order.
    expert_weights: [E, D, F]. expert_biases: [E, F] or None.
    gates: [T, K] or None. Without gates the result is [N, F]: in expert order if
    ``grouped_out``, else slot order (row t*K + j). With gates it is [T, F], the
    gate-weighted sum over each token's K rows.
    """
    num_rows = sorted_expert_idxs.numel()
    out = x.new_zeros(num_rows, expert_weights.size(-1))
    positions = torch.arange(num_rows, device=x.device)
    sorted_scattered_idxs = sorted_scattered_idxs.long()  # index_copy takes int64 only; callers may pass int32
    for e in range(expert_weights.size(0)):
        # An expert with no rows still runs (on 0 rows), so the result is in the graph of every
        # weight even when T=0 and their gradients are zeros, not missing.
        pos = positions[sorted_expert_idxs == e]  # this expert's rows, in expert order
        slots = sorted_scattered_idxs[pos]
        in_rows = pos if grouped_in else torch.div(slots, k, rounding_mode="floor")
        # W^T X^T, transposed, not X W: under torch.compile, with D=1, mm's backward guards on the
        # data-dependent row count of the [rows, 1] X (a stride test; GuardOnDataDependentSymNode).
        y = (expert_weights[e].t() @ x[in_rows].t()).t()
        if expert_biases is not None:
            y = y + expert_biases[e]
        out = out.index_copy(0, pos if grouped_out else slots, y)
    if gates is None:
        return out
    num_tokens, fan = gates.shape
    # gates may be float32 beside half-precision x (JetMoE's router): the result keeps x's dtype.
    return (gates.unsqueeze(-1) * out.view(num_tokens, fan, out.size(-1))).sum(1).to(x.dtype)


def glu(h: torch.Tensor, activation: Callable = F.silu, activate_first: bool = False) -> torch.Tensor:
    """act(one half) * other half of the last dim; ScatterMoE activates the second half, JetMoE the first."""
    a, b = h.chunk(2, dim=-1)
    return activation(a) * b if activate_first else a * activation(b)


def moe_mlp_per_token(
    x: torch.Tensor,
    expert_p: torch.Tensor,
    expert_idxs: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: Optional[torch.Tensor] = None,
    b_out: Optional[torch.Tensor] = None,
    activation: Callable = F.silu,
    glu_activate_first: Optional[bool] = None,
) -> torch.Tensor:
    """The MoE MLP written token by token: y_t = sum_j p_tj * W2_e (act(W1_e x_t)).

    x: [T, D]; expert_p, expert_idxs: [T, K]; w_in: [E, H, D] (nn.Linear layout,
    H = 2F for GLU); w_out: [E, D, F]. ``glu_activate_first`` None means a plain MLP.
    """
    rows = []
    for t in range(x.size(0)):
        y = x.new_zeros(w_out.size(1))
        for j in range(expert_idxs.size(1)):
            e = int(expert_idxs[t, j])
            h = w_in[e] @ x[t] + (b_in[e] if b_in is not None else 0)
            if glu_activate_first is None:
                h = activation(h)
            else:
                h = glu(h, activation, glu_activate_first)
            y = y + expert_p[t, j] * (w_out[e] @ h + (b_out[e] if b_out is not None else 0))
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, w_out.size(1))  # T=0: no tokens, no rows
