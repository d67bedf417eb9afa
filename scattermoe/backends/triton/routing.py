"""Routing kernels for few tokens (decode), where torch's launches cost more than the work.

sort_by_expert: flatten_sort_count in one launch, for few routed rows.
topk_softmax: topk_gating in one launch (no backward: used when no gradient is needed).

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

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .config import on_tensor_device

# Up to this N * E the one-program counting sort is used on CUDA (JetMoE, E=8: N <= 2048, T <= 1024;
# E=64, K=8: T <= 32). A prediction from the work count, to be checked by the bench's routing case.
FUSED_ROUTING_MAX_WORK = 16384
# One program holds every id in registers.
FUSED_ROUTING_MAX_ROWS = 4096
# Its loop over experts is serial: past this many, torch's launches are cheaper even for one row.
FUSED_ROUTING_MAX_EXPERTS = 64


@triton.jit
def _sort_by_expert_kernel(
    ids_ptr,              # [N] expert ids (any integer dtype), slot order
    sorted_expert_ptr,    # [N] int64 out: expert of each row, in expert order
    sorted_slot_ptr,      # [N] int64 out: slot of each row, in expert order
    offsets_ptr,          # [E] int64 out: end of each expert's rows
    ids_ok_ptr,           # [1] bool out: every id in [0, E) (the routing's device-side assert reads it)
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
    tl.store(ids_ok_ptr, end == N)  # every slot placed by the expert loop: no stray (no extra reduction)


def _new_index(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, device=device)  # the tests poison this to see every element written


def fused_routing_fits(num_rows: int, num_experts: int) -> bool:
    """Whether sort_by_expert takes this many rows and experts (and is expected to beat torch.sort)."""
    return (0 < num_rows <= FUSED_ROUTING_MAX_ROWS and num_experts <= FUSED_ROUTING_MAX_EXPERTS
            and num_rows * num_experts <= FUSED_ROUTING_MAX_WORK)


@on_tensor_device
def sort_by_expert(flat_ids: torch.Tensor, num_experts: int,
                   ids_ok: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flatten_sort_count's three outputs (int64) from flat contiguous ids [N], in one launch.

    The caller checks the ids (dtype, range where affordable) and that fused_routing_fits(N, E). ids_ok, a
    one-element bool tensor on the ids' device if given, receives whether every id was in [0, E), with no
    launch of its own (flatten_sort_count's device-side assert on CUDA reads it).
    """
    n = flat_ids.numel()
    if not fused_routing_fits(n, num_experts):
        raise ValueError(f"sort_by_expert: N={n}, E={num_experts} is outside the one-program range "
                         f"(N <= {FUSED_ROUTING_MAX_ROWS}, E <= {FUSED_ROUTING_MAX_EXPERTS}, "
                         f"N * E <= {FUSED_ROUTING_MAX_WORK})")
    sorted_expert, sorted_slot = _new_index(n, flat_ids.device), _new_index(n, flat_ids.device)
    offsets = _new_index(num_experts, flat_ids.device)
    if ids_ok is None:
        ids_ok = torch.empty(1, dtype=torch.bool, device=flat_ids.device)
    elif ids_ok.shape != (1,) or ids_ok.dtype != torch.bool or ids_ok.device != flat_ids.device:
        raise ValueError(f"ids_ok: expected a [1] bool tensor on {flat_ids.device}, got {tuple(ids_ok.shape)} "
                         f"{ids_ok.dtype} on {ids_ok.device}")
    block = triton.next_power_of_2(n)
    _sort_by_expert_kernel[(1,)](flat_ids, sorted_expert, sorted_slot, offsets, ids_ok, n, num_experts,
                                 BLOCK=block, num_warps=1 if block <= 256 else 4)
    return sorted_expert, sorted_slot, offsets


# ---------------------------------------------------------------- top-k gating

# Up to this many experts one program row holds all of a token's logits.
FUSED_TOPK_MAX_EXPERTS = 1024
# Logits per program (4 warps): 4096 spills at E=64, k=8 (255 registers, checked by tests/test_aot_sm90.py).
TOPK_LOGITS_PER_PROGRAM = 2048


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, stride_lt,  # [T, E] router logits, unit stride along E
    gates_ptr,              # [T, K] float32 out: softmax over the K chosen logits
    idx_ptr,                # [T, K] int64 out: the chosen experts, largest logit first
    T, E,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_ok = tokens < T
    logits = tl.load(logits_ptr + tokens.to(tl.int64)[:, None] * stride_lt + experts[None, :],
                     mask=token_ok[:, None] & (experts < E)[None, :], other=float("-inf")).to(tl.float32)
    slots = tl.arange(0, K_POW2)
    chosen = tl.full((BLOCK_T, K_POW2), float("-inf"), tl.float32)
    taken = (experts[None, :] >= E) | (tokens[:, None] < 0)  # [BLOCK_T, BLOCK_E]: padding, then the chosen
    for j in tl.static_range(K):  # k rounds of max, each chosen expert taken out of the next
        candidates = tl.where(taken, float("-inf"), logits)
        top = tl.max(candidates, axis=1)
        # The lowest index holding the max; if none matches (a NaN logit), the lowest index not yet taken, so the
        # K experts are always distinct and in [0, E), whatever the logits (-inf and NaN included).
        best = tl.min(tl.where(~taken & (candidates == top[:, None]), experts[None, :], BLOCK_E), axis=1)
        free = tl.min(tl.where(taken, BLOCK_E, experts[None, :]), axis=1)
        best = tl.where(best < BLOCK_E, best, free)
        tl.store(idx_ptr + tokens.to(tl.int64) * K + j, best.to(tl.int64), mask=token_ok)
        value = tl.max(tl.where(experts[None, :] == best[:, None], logits, float("-inf")), axis=1)
        chosen = tl.where(slots[None, :] == j, value[:, None], chosen)
        taken = taken | (experts[None, :] == best[:, None])
    # Softmax over the K chosen (the first is the largest: subtract it; 0 for padding rows, never stored).
    first = tl.where(token_ok, tl.max(chosen, axis=1), 0.0)
    weights = tl.exp(chosen - first[:, None])
    weights = tl.where(slots[None, :] < K, weights, 0.0)
    gates = weights / tl.sum(weights, axis=1)[:, None]
    # tl.max skips NaN: a row with a NaN logit gets NaN gates, as torch.topk + softmax give it (a broken router
    # must not look healthy at inference and broken in training).
    has_nan = tl.max(tl.where((logits != logits) & (experts < E)[None, :], 1, 0), axis=1) > 0
    gates = tl.where(has_nan[:, None], float("nan"), gates)
    tl.store(gates_ptr + tokens.to(tl.int64)[:, None] * K + slots[None, :], gates,
             mask=token_ok[:, None] & (slots < K)[None, :])


def fused_topk_fits(num_experts: int) -> bool:
    return num_experts <= FUSED_TOPK_MAX_EXPERTS


@on_tensor_device
def topk_softmax(router_logits: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """topk_gating in one launch: (gates [T, K] float32, expert_idxs [T, K] int64) from logits [T, E].

    The caller checks the arguments; logits need a unit stride along E.
    """
    T, E = router_logits.shape
    gates = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    if T == 0:
        return gates, idx
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, TOPK_LOGITS_PER_PROGRAM // block_e, triton.next_power_of_2(T)))
    _topk_softmax_kernel[(triton.cdiv(T, block_t),)](
        router_logits, router_logits.stride(0), gates, idx, T, E,
        K=top_k, K_POW2=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)
    return gates, idx
