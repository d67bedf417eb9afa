"""sort_by_expert: flatten_sort_count in one launch, for few routed rows (decode).

Legend: N = T*K routed slots, E experts. At small N, flatten_sort_count on torch is
four launches (a stable sort, arange, searchsorted, a cast), each costing more
than the work: at T=1 the whole MoE layer should take ~2x the time of reading two
experts' weights (~80 us for JetMoE on an H100), and launches eat into that.

One program holds all N expert ids and makes a counting sort of them: for each
expert e in turn, a prefix sum of (id == e) gives each of e's slots its rank among
them, so slot s goes to position offsets[e-1] + rank. That is stable (slots keep
their order within an expert, as torch.sort(stable=True) keeps them) and costs
O(N * E) work, which is why it is used only while N * E is small
(``FUSED_ROUTING_MAX_WORK``); larger inputs take the torch path.

Ids outside [0, E) (possible on CUDA, where values are checked only in debug mode)
are placed after every expert's rows, in slot order, so every output element is
written and no expert's range holds them.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

# Up to this N * E the one-program counting sort is used on CUDA (JetMoE, E=8: N <= 2048, T <= 1024;
# E=64, K=8: T <= 32). A prediction from the work count, to be checked by the bench's routing case.
FUSED_ROUTING_MAX_WORK = 16384
# One program holds every id in registers.
FUSED_ROUTING_MAX_ROWS = 4096


@triton.jit
def _sort_by_expert_kernel(
    ids_ptr,              # [N] expert ids (any integer dtype), slot order
    sorted_expert_ptr,    # [N] int64 out: expert of each row, in expert order
    sorted_slot_ptr,      # [N] int64 out: slot of each row, in expert order
    offsets_ptr,          # [E] int64 out: end of each expert's rows
    N, E,
    BLOCK: tl.constexpr,
):
    slots = tl.arange(0, BLOCK)
    in_range = slots < N
    ids = tl.load(ids_ptr + slots, mask=in_range, other=-1).to(tl.int64)
    end = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)  # rows placed so far (a tensor: loop-carried)
    for e in range(0, E):
        hit = ids == e
        rank = tl.cumsum(hit.to(tl.int32), axis=0)  # inclusive: 1 for the expert's first slot
        position = end + rank - 1
        tl.store(sorted_expert_ptr + position, ids, mask=hit)
        tl.store(sorted_slot_ptr + position, slots.to(tl.int64), mask=hit)
        end += tl.sum(hit.to(tl.int32), axis=0)
        tl.store(offsets_ptr + e, end.to(tl.int64))
    stray = in_range & ((ids < 0) | (ids >= E))
    position = end + tl.cumsum(stray.to(tl.int32), axis=0) - 1
    tl.store(sorted_expert_ptr + position, ids, mask=stray)
    tl.store(sorted_slot_ptr + position, slots.to(tl.int64), mask=stray)


def _new_index(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, device=device)  # the tests poison this to see every element written


def fused_routing_fits(num_rows: int, num_experts: int) -> bool:
    """Whether sort_by_expert takes this many rows and experts (and is expected to beat torch.sort)."""
    return 0 < num_rows <= FUSED_ROUTING_MAX_ROWS and num_rows * num_experts <= FUSED_ROUTING_MAX_WORK


def sort_by_expert(flat_ids: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flatten_sort_count's three outputs (int64) from flat contiguous ids [N], in one launch.

    The caller checks the ids (dtype, range where affordable) and that fused_routing_fits(N, E).
    """
    n = flat_ids.numel()
    if not fused_routing_fits(n, num_experts):
        raise ValueError(f"sort_by_expert: N={n}, E={num_experts} is outside the one-program range "
                         f"(N <= {FUSED_ROUTING_MAX_ROWS}, N * E <= {FUSED_ROUTING_MAX_WORK})")
    sorted_expert, sorted_slot = _new_index(n, flat_ids.device), _new_index(n, flat_ids.device)
    offsets = _new_index(num_experts, flat_ids.device)
    block = triton.next_power_of_2(n)
    _sort_by_expert_kernel[(1,)](flat_ids, sorted_expert, sorted_slot, offsets, n, num_experts,
                                 BLOCK=block, num_warps=1 if block <= 256 else 4)
    return sorted_expert, sorted_slot, offsets
