"""glu_backward: one pass over the GLU's pre-activation for the MoE backward.

Legend: N routed rows (expert order), F expert hidden width; H = [a | b] the
[N, 2F] pre-activation, G = silu(a) * b (or a * silu(b)) the activation.
Given dG_raw = dY W2^T (not yet gate-scaled) and the per-row gate s, each
program reads a block of rows once and writes:
  dH   = GLU'(H) * (s * dG_raw)          [N, 2F]
  s*G  = s * GLU(H), recomputed          [N, F]   (optional: the dW2 GEMM's operand, gate applied
                                                   here so that GEMM needs no row scale)
  dot  = sum_f dG_raw * G                [N] fp32 (optional: d(gate) of the row, unscaled G)
so the forward never has to keep G, and no [N, 2F] fp32 temporaries are made.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._validate import check_glu_backward_args
from .config import INTERPRET, on_tensor_device


@triton.jit
def _glu_backward_kernel(
    H_ptr, stride_hm,            # [N, 2F] pre-activation, unit column stride
    DG_ptr, stride_dgm,          # [N, F] upstream gradient of G (before the row scale)
    scale_ptr,                   # [N] per-row gate (only with HAS_SCALE)
    DH_ptr, stride_dhm,          # [N, 2F] out
    G_ptr, stride_gm,            # [N, F] out (only with STORE_G): s * G with HAS_SCALE, else G
    DOT_ptr,                     # [N] fp32 out (only with STORE_DOT)
    num_rows, F,
    ACTIVATE_FIRST: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_G: tl.constexpr, STORE_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    rows = rows.to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_mask[:, None] & (cols < F)[None, :]
        h_ptrs = H_ptr + rows[:, None] * stride_hm + cols[None, :]
        first = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(DG_ptr + rows[:, None] * stride_dgm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ACTIVATE_FIRST:
            act_in, lin = first, second
        else:
            act_in, lin = second, first
        sig = tl.sigmoid(act_in)
        silu = act_in * sig
        if STORE_DOT:
            dot += tl.sum(dg * silu * lin, 1)
        if STORE_G:
            g = silu * lin
            if HAS_SCALE:
                g = g * scale[:, None]
            tl.store(G_ptr + rows[:, None] * stride_gm + cols[None, :], g.to(G_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            dg = dg * scale[:, None]
        d_act = dg * lin * sig * (1.0 + act_in * (1.0 - sig))  # silu'(x) = sig(x) * (1 + x * (1 - sig(x)))
        d_lin = dg * silu
        if ACTIVATE_FIRST:
            d_first, d_second = d_act, d_lin
        else:
            d_first, d_second = d_lin, d_act
        dh_ptrs = DH_ptr + rows[:, None] * stride_dhm + cols[None, :]
        tl.store(dh_ptrs, d_first.to(DH_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs + F, d_second.to(DH_ptr.dtype.element_ty), mask=mask)
    if STORE_DOT:
        tl.store(DOT_ptr + rows, dot, mask=row_mask)


@on_tensor_device
def glu_backward(
    pre: torch.Tensor,
    dg: torch.Tensor,
    activate_first: bool,
    row_scale: Optional[torch.Tensor] = None,
    store_g: bool = False,
    store_dot: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dH [N, 2F] in pre's dtype, G [N, F] or None, rowwise <dg, G> [N] fp32 or None).

    row_scale is [N] or None. With a row_scale, the stored G is scaled by it (row by row) and dot is not.
    """
    # torch.ops.scattermoe.glu_backward reaches here without the public functions' checks: the shapes, then the
    # layout the kernel reads (rows with a unit column stride, row_scale contiguous: a copy only where they are not).
    check_glu_backward_args(pre, dg, row_scale)
    pre = pre if pre.stride(-1) == 1 else pre.contiguous()
    dg = dg if dg.stride(-1) == 1 else dg.contiguous()
    row_scale = row_scale.contiguous() if row_scale is not None else None
    num_rows, width = pre.shape
    f = width // 2
    dh = torch.empty_like(pre)
    g = pre.new_empty(num_rows, f) if store_g else None
    dot = torch.empty(num_rows, device=pre.device, dtype=torch.float32) if store_dot else None
    if num_rows == 0:
        return dh, g, dot
    block_r, block_f = (16, 32) if INTERPRET else (4, 1024)
    dummy = dh
    _glu_backward_kernel[(triton.cdiv(num_rows, block_r),)](
        pre, pre.stride(0),
        dg, dg.stride(0),
        row_scale if row_scale is not None else dummy,
        dh, dh.stride(0),
        g if g is not None else dummy, g.stride(0) if g is not None else 0,
        dot if dot is not None else dummy,
        num_rows, f,
        ACTIVATE_FIRST=activate_first, HAS_SCALE=row_scale is not None,
        STORE_G=store_g, STORE_DOT=store_dot,
        BLOCK_R=block_r, BLOCK_F=block_f,
        num_warps=4,
    )
    return dh, g, dot
