"""Launch order of the per-expert dW programs, shared by the Triton and csrc kernels.

The dW kernels run one program per (dW tile, expert), each reducing all of its expert's rows, so a
program's length is its expert's row count. Launched expert by expert in index order, an expert that
holds many rows but comes last starts its long programs when the others are done, and the GPU idles
behind them. Launching the experts largest first (longest-processing-time first, the classic list
scheduling rule) lets the short programs fill in around the long ones.
"""

from __future__ import annotations

from typing import Optional

import torch

# With few experts every expert has far more dW programs than the GPU has SMs (JetMoE, E=8: ~1400
# each at 128x128 tiles), so their order does not matter; with few rows the dW is mostly writing the
# weight gradient out, not reducing rows. Neither pays for the order's ~9 small launches.
LARGEST_FIRST_MIN_EXPERTS = 16
LARGEST_FIRST_MIN_ROWS = 16384


def expert_rows(expert_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows per expert as the kernels count them: offsets clamped to [0, num_rows], an expert starting where
    the previous one ended (or at its own end, if that is smaller). int64 [E], on the offsets' device."""
    ends = expert_offsets.to(torch.int64).clamp(0, num_rows)
    starts = torch.nn.functional.pad(ends[:-1], (1, 0))
    return ends - torch.minimum(starts, ends)


def largest_experts_first(expert_offsets: torch.Tensor, num_rows: int, num_experts: int) -> Optional[torch.Tensor]:
    """int32 [num_experts]: the experts by row count, largest first (ties in index order): the dW kernels'
    program p along the expert axis works on expert order[p]. Only the first num_experts offsets count (the
    kernels read no others). None (index order) below LARGEST_FIRST_MIN_EXPERTS experts or
    LARGEST_FIRST_MIN_ROWS rows. No host sync."""
    if num_experts < LARGEST_FIRST_MIN_EXPERTS or num_rows < LARGEST_FIRST_MIN_ROWS:
        return None
    rows = expert_rows(expert_offsets[:num_experts], num_rows)
    return torch.argsort(rows, descending=True, stable=True).to(torch.int32)
