"""Routing: top-k gating, sorting routed slots by expert, auxiliary losses.

Legend: T tokens, K experts per token, N = T*K routed slots, E experts.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import backends
from ._validate import (_FLOAT_DTYPES, _values_checkable, check_expert_idxs, check_tensor, device_asserts_enabled,
                        positive_int)


@torch.no_grad()
def flatten_sort_count(expert_idxs: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N = T*K routed slots by expert, without a host sync.

    expert_idxs: [T, K] (or [N]) integer expert ids in [0, num_experts).
    Returns:
      sorted_expert_idxs [N] int64: expert of the i-th row in expert order;
      sorted_scattered_idxs [N] int64: its slot t*K + j (token t = slot // K);
      expert_offsets [E] int64: end of each expert's rows (cumulative counts).
    The sort is stable, so within an expert rows keep token order (deterministic).
    Ids are range-checked with a ValueError where that costs no device sync (CPU tensors, or debug mode);
    elsewhere on CUDA by a device-side assert queued before any kernel reads the result (no sync), so a bad
    id stops the stream instead of sending its row to no expert or past the weights.
    """
    check_expert_idxs(expert_idxs, num_experts)
    flat = expert_idxs.reshape(-1)
    if _use_fused_routing(flat, num_experts):
        from .backends.triton.routing import sort_by_expert

        ids_ok = torch.empty(1, dtype=torch.bool, device=flat.device)
        routing = sort_by_expert(flat.contiguous(), num_experts, ids_ok)
        if _needs_device_assert(flat):
            _assert_async(ids_ok, num_experts)  # the kernel's own verdict: one launch, the assert's
        return routing
    routing = _sort_count_torch(flat, num_experts)
    if _needs_device_assert(flat):
        assert_ids_in_range_async(routing[0], routing[2], num_experts)
    return routing


def _sort_count_torch(flat: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flatten_sort_count's result by torch.sort, ids unchecked (a stable sort, then the offsets)."""
    sorted_expert_idxs, sorted_scattered_idxs = torch.sort(flat, stable=True)
    # searchsorted instead of bincount: bincount syncs on CUDA to size its output.
    bounds = torch.arange(num_experts, device=flat.device, dtype=sorted_expert_idxs.dtype)
    expert_offsets = torch.searchsorted(sorted_expert_idxs, bounds, right=True)
    return sorted_expert_idxs.long(), sorted_scattered_idxs, expert_offsets


def _needs_device_assert(flat: torch.Tensor) -> bool:
    # Not where check_expert_idxs read the values already (CPU, debug mode), nor under torch.compile (its
    # graph would need the assert as a functional op: left out, as the value checks are there), nor when
    # switched off (set_device_asserts).
    return (flat.numel() > 0 and flat.device.type == "cuda" and device_asserts_enabled()
            and not torch.compiler.is_compiling() and not _values_checkable(flat))


def assert_ids_in_range_async(sorted_expert_idxs: torch.Tensor, expert_offsets: torch.Tensor,
                              num_experts: int) -> None:
    """Queue a device-side assert that every id sorted by torch.sort was in [0, num_experts): no host sync.

    Read off the sorted result: ids >= E sort after expert E-1's rows, so the last offset falls short of N;
    negative ids sort first. (The fused counting sort reports its own verdict instead.)
    """
    ok = expert_offsets[-1:] == sorted_expert_idxs.numel()
    ok &= sorted_expert_idxs[:1] >= 0
    _assert_async(ok, num_experts)


def _assert_async(ok: torch.Tensor, num_experts: int) -> None:
    # On CUDA a failure is "device-side assert triggered", this message printed by the kernel where torch's CUDA
    # build passes it on (older ones print a generic one); on the CPU (tests) a RuntimeError.
    torch._assert_async(ok.squeeze(0), f"scattermoe: expert ids must lie in [0, num_experts={num_experts}); "
                        "some do not (SCATTERMOE_DEBUG=1 raises a ValueError that names them)")


def _triton_routing_allowed(t: torch.Tensor) -> bool:
    """The one-launch routing kernels may run on t: CUDA, triton importable, the torch backend not selected,
    torch.compile not tracing (it lowers the torch path itself)."""
    return (t.is_cuda and not torch.compiler.is_compiling() and backends.get_backend() != "torch"
            and backends.triton_importable() and not backends.triton_half_interpreted())


def _use_fused_routing(flat: torch.Tensor, num_experts: int) -> bool:
    """One Triton launch instead of torch's four, for few rows on CUDA (decode)."""
    if not _triton_routing_allowed(flat):
        return False
    from .backends.triton.routing import fused_routing_fits

    return fused_routing_fits(flat.numel(), num_experts)


def _use_fused_topk(router_logits: torch.Tensor) -> bool:
    """One Triton launch instead of torch's three (cast, topk, softmax) on CUDA when no gradient is needed
    (inference, decode)."""
    if torch.is_grad_enabled() and router_logits.requires_grad:
        return False  # the kernel has no backward: training keeps the differentiable torch path
    if not _triton_routing_allowed(router_logits):
        return False
    from .backends.triton.routing import fused_topk_fits

    return fused_topk_fits(router_logits.size(1))


def _logits_rows(router_logits) -> torch.Tensor:
    """router_logits [..., E] checked and seen as rows [T, E] (T the product of the leading dims)."""
    check_tensor("router_logits", router_logits, dtypes=_FLOAT_DTYPES)
    if router_logits.dim() == 0 or router_logits.size(-1) == 0:
        raise ValueError(f"router_logits: expected [..., E] with E >= 1, got shape {tuple(router_logits.shape)}")
    return router_logits.reshape(-1, router_logits.size(-1))


def topk_gating(router_logits: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """JetMoE's router: top-k of the raw logits, then softmax over those k only (in float32).

    router_logits: [..., E] (e.g. [T, E] or [B, S, E]). Returns (gates [..., K] float32, expert_idxs [..., K]
    int64), the shapes the layers take beside x [..., D]. Cast the gates to the model dtype at the call site if
    needed. On CUDA, when no gradient is needed (inference), this is one Triton launch
    (backends/triton/routing.py) instead of three; it breaks ties between equal logits towards the lower expert
    id (torch.topk promises no order, so the two paths may pick different experts among exactly equal logits).
    """
    rows = _logits_rows(router_logits)
    top_k = positive_int("top_k", top_k)
    if top_k > rows.size(-1):
        raise ValueError(f"top_k: expected 1 <= top_k <= E={rows.size(-1)}, got {top_k}")
    out_shape = (*router_logits.shape[:-1], top_k)
    if _use_fused_topk(rows):
        from .backends.triton.routing import topk_softmax

        gates, expert_idxs = topk_softmax(rows if rows.stride(-1) == 1 else rows.contiguous(), top_k)
        return gates.view(out_shape), expert_idxs.view(out_shape)
    top_logits, expert_idxs = torch.topk(router_logits.float(), top_k, dim=-1)
    return torch.softmax(top_logits, dim=-1), expert_idxs


def load_balancing_loss(router_logits: torch.Tensor, expert_idxs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss, E * sum_e P_e * f_e (Fedus et al. 2021, eq. 4).

    P_e: mean over tokens of the full softmax probability of expert e;
    f_e: share of the T*K top-k assignments that went to expert e (normalised to sum to 1),
    as in JetMoE's training code. Equals 1 for a perfectly uniform router.
    router_logits: [..., E]; expert_idxs: [..., K], the same leading dims (the tokens).
    """
    rows = _logits_rows(router_logits)
    num_experts = positive_int("num_experts", num_experts)
    if rows.size(1) != num_experts:
        raise ValueError(f"router_logits: expected [..., E={num_experts}], got shape {tuple(router_logits.shape)}")
    check_expert_idxs(expert_idxs, num_experts)
    if expert_idxs.device != router_logits.device:
        raise ValueError(f"expert_idxs: expected a tensor on {router_logits.device} (router_logits' device), "
                         f"got one on {expert_idxs.device}")
    lead = tuple(router_logits.shape[:-1])
    if expert_idxs.dim() != router_logits.dim() or tuple(expert_idxs.shape[:-1]) != lead:
        raise ValueError(f"expert_idxs: expected [{', '.join(map(str, lead + ('K',)))}], router_logits' tokens, "
                         f"got shape {tuple(expert_idxs.shape)}")
    if expert_idxs.size(-1) == 0:  # f_e would be 0/0
        raise ValueError(f"expert_idxs: expected K >= 1 experts per token, got shape {tuple(expert_idxs.shape)}")
    router_logits = rows
    if router_logits.size(0) == 0:
        return router_logits.float().sum()  # no tokens, no imbalance: 0, still attached to the graph
    probs = torch.softmax(router_logits.float(), dim=-1)
    counts = torch.zeros(num_experts, device=router_logits.device, dtype=torch.float32)
    counts.scatter_add_(0, expert_idxs.reshape(-1), torch.ones_like(expert_idxs.reshape(-1), dtype=torch.float32))
    f = counts / expert_idxs.numel()
    return num_experts * (probs.mean(0) * f).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, mean_t logsumexp(logits_t)^2 (Zoph et al. 2022, eq. 5); 0 for no tokens.
    router_logits: [..., E], the mean taken over every token."""
    router_logits = _logits_rows(router_logits)
    if router_logits.size(0) == 0:
        return router_logits.float().sum()
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
