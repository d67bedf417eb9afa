"""The GLU MoE MLP written with ``torch._grouped_mm``: the baseline a PyTorch user has today.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D model dim,
F expert hidden dim. Weights in the nn.Linear / JetMoE layout that scattermoe.GLUMLP
stores: ``w_in_EHD`` [E, 2F, D] (rows 0:F activated when ``activate_first``),
``w_out_EDF`` [E, D, F].

Unlike scattermoe, this path materialises the routed copies: it sorts the N slots
by expert, gathers x into an [N, D] expert-ordered copy, runs the two grouped GEMMs
(offsets = cumulative rows per expert, int32), applies the GLU as a separate pass
over [N, 2F], scales by the gates and un-permutes [N, D] back to slot order before
summing over K. Autograd runs through torch's own derivatives of each op.

``torch._grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None)`` (2-D x 3-D
with ``offs``: group g owns rows offs[g-1]:offs[g] of mat_a) needs bfloat16 and, on
CUDA, sm_90 or newer (torch 2.9+ also ships a CPU kernel that needs 16-byte aligned
strides). ``probe()`` says, per device, whether it runs and agrees with a loop of
torch.mm; ``grouped_mm_loop`` is that loop, used only by the CPU smoke test when
``torch._grouped_mm`` is missing there.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grouped_mm_torch(a_ND: torch.Tensor, b_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """[N, F] = rows offs[e-1]:offs[e] of a times b[e], via torch._grouped_mm (offs int32)."""
    return torch._grouped_mm(a_ND, b_EDF, offs=offs_E)


def grouped_mm_loop(a_ND: torch.Tensor, b_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Same contract as grouped_mm_torch, one torch.mm per expert (a CPU stand-in, syncs on offs)."""
    ends = offs_E.tolist()
    starts = [0] + ends[:-1]
    parts = [a_ND[s:e] @ b_EDF[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    return torch.cat(parts, 0)


def sort_by_expert(expert_idxs_TK: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(slot_N int64: the slot t*K + j of each row in expert order, offs_E int32: cumulative row ends).

    Written out here rather than borrowed from scattermoe.routing so the baseline
    shares no code with the library under test. searchsorted, not bincount: no host sync.
    """
    sorted_experts_N, slot_N = torch.sort(expert_idxs_TK.reshape(-1), stable=True)
    bounds_E = torch.arange(num_experts, device=expert_idxs_TK.device, dtype=sorted_experts_N.dtype)
    offs_E = torch.searchsorted(sorted_experts_N, bounds_E, right=True).to(torch.int32)
    return slot_N, offs_E


def grouped_mm_glu_moe(
    x_TD: torch.Tensor,
    gates_TK: torch.Tensor,
    expert_idxs_TK: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    activate_first: bool = True,
    mm: Optional[GroupedMM] = None,
) -> torch.Tensor:
    """y [T, D] = sum_j gates[t, j] * W2_e (GLU(W1_e x_t)), e = expert_idxs[t, j]; no biases.

    x_TD [T, D] bf16; gates_TK [T, K] (any float dtype, cast to x's); expert_idxs_TK [T, K] int64;
    w_in_EHD [E, 2F, D]; w_out_EDF [E, D, F]. SiLU GLU: silu(first half) * second half if
    ``activate_first`` (JetMoE), else first half * silu(second half). Differentiable in
    x, gates and both weights.
    """
    mm = grouped_mm_torch if mm is None else mm
    T, K = expert_idxs_TK.shape
    slot_N, offs_E = sort_by_expert(expert_idxs_TK, w_in_EHD.size(0))
    token_N = torch.div(slot_N, K, rounding_mode="floor")
    # index_select / index_add rather than advanced indexing: their backwards are index_add / index_select, not
    # the sort-based index_put(accumulate=True) that x[idx]'s backward is on CUDA (the fair baseline).
    x_ND = x_TD.index_select(0, token_N)  # the routed copy scattermoe avoids
    h_NH = mm(x_ND, w_in_EHD.transpose(1, 2), offs_E)  # [N, 2F]; weight read as a [D, 2F] view
    a, b = h_NH.chunk(2, dim=-1)
    g_NF = F.silu(a) * b if activate_first else a * F.silu(b)
    y_ND = mm(g_NF, w_out_EDF.transpose(1, 2), offs_E)  # [N, D]
    y_ND = y_ND * gates_TK.reshape(-1).index_select(0, slot_N).to(y_ND.dtype).unsqueeze(-1)
    # Back to token order and the sum over each token's K rows in one scatter-add (backward: a gather).
    return y_ND.new_zeros(T, y_ND.size(1)).index_add(0, token_N, y_ND)


def grouped_mm_moa(
    x_TD: torch.Tensor,
    gates_TK: torch.Tensor,
    expert_idxs_TK: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDH: torch.Tensor,
    num_heads: int,
    mm: Optional[GroupedMM] = None,
) -> torch.Tensor:
    """JetMoE's MoA projections with attention left out: map, then reduce of map's output.

    map: q = W_in_e x_t per slot, laid out [T, H*K, Dh] (kv head h, slot j) as scattermoe.MoA
    gives it to SDPA; reduce: y_t = sum_j gates[t, j] W_out_e o_(t, j). Here o = q (the attention
    between them is not what is measured), so backward runs through both projections.
    w_in_EHD [E, H*Dh, D], w_out_EDH [E, D, H*Dh].
    """
    mm = grouped_mm_torch if mm is None else mm
    T, K = expert_idxs_TK.shape
    HD = w_in_EHD.size(1)
    slot_N, offs_E = sort_by_expert(expert_idxs_TK, w_in_EHD.size(0))
    inverse_N = torch.empty_like(slot_N)
    inverse_N[slot_N] = torch.arange(slot_N.numel(), device=slot_N.device)
    token_N = torch.div(slot_N, K, rounding_mode="floor")
    x_ND = x_TD.index_select(0, token_N)  # (index_select / index_add: see grouped_mm_moe)
    q_NH = mm(x_ND, w_in_EHD.transpose(1, 2), offs_E).index_select(0, inverse_N)  # slot order [T*K, H*Dh]
    q = q_NH.view(T, K, num_heads, HD // num_heads).transpose(1, 2).reshape(T, num_heads * K, HD // num_heads)
    o_NH = q.view(T, num_heads, K, -1).transpose(1, 2).reshape(T * K, HD).index_select(0, slot_N)  # expert order
    y_ND = mm(o_NH, w_out_EDH.transpose(1, 2), offs_E)
    y_ND = y_ND * gates_TK.reshape(-1).index_select(0, slot_N).to(y_ND.dtype).unsqueeze(-1)
    return y_ND.new_zeros(T, y_ND.size(1)).index_add(0, token_N, y_ND)


def probe(device: torch.device) -> Optional[str]:
    """None if torch._grouped_mm runs (forward and backward) on ``device`` in bf16 and matches
    a torch.mm loop on uneven groups (one empty); otherwise the reason, for 'unavailable: ...'."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(80, 64, generator=gen).to(device, torch.bfloat16).requires_grad_()
        b = torch.randn(4, 48, 64, generator=gen).to(device, torch.bfloat16).transpose(1, 2).requires_grad_()
        offs = torch.tensor([24, 24, 56, 80], dtype=torch.int32, device=device)  # group 1 empty, odd sizes
        y = grouped_mm_torch(a, b, offs)
        y.backward(torch.ones_like(y))
        ref = grouped_mm_loop(a.detach().float(), b.detach().float(), offs)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            return f"torch._grouped_mm disagrees with a torch.mm loop (rel err {err:.3g})"
        if b.grad is None or not torch.isfinite(b.grad.float()).all():
            return "torch._grouped_mm backward gave no finite weight gradient"
    except Exception as exc:  # any failure is a finding to record, not a crash
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None
