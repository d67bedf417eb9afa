"""The CUTLASS/CuTe sm_90a weight gradient (csrc/group_bwd_w/) wrapped for torch tensors.

Legend: N routed rows (T*k), E experts, K input features, F output features.

    for expert e with rows r in [offsets[e-1], offsets[e]) (slot s = sorted_scattered_idxs[r]):
        dw[e] = sum_r x[r if x_grouped else s // x_fan_out]^T (c_s dy[r if dy_grouped else s // dy_fan_out])
        db[e] = sum_r c_s dy[r if dy_grouped else s // dy_fan_out]             (with_bias)
    c_s = row_scale[s] (the gates; the scaled row rounded to dy's dtype, as in Triton), or 1

group_bwd_w whole: the dW (and db) of every GEMM, gated (MoA's and MLP's output projections) or
not. Both operands are gathered on load; an empty expert gets zeros; with many experts they are launched
largest first (``_schedule.largest_experts_first``). ``plan`` decides from host
metadata alone whether the kernel takes a call; the caller falls back to Triton when it cannot
(other dtypes, layouts cp.async cannot read).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .._schedule import largest_experts_first
from . import _extension
from .grouped_gemm import ALIGN_ELEMENTS, DTYPES, INT32_MAX, int32_fan_out, row_stride, rows_ok, sizes_reason


@dataclasses.dataclass(frozen=True)
class GroupBwdWPlan:
    """Host-side arguments of ``scattermoe._C.group_bwd_w`` except pointers, rows and stream."""

    dtype: str
    num_experts: int
    num_rows: int
    k_in: int
    n_out: int


def plan(x: torch.Tensor, dy: torch.Tensor, expert_offsets: torch.Tensor, like_weight: torch.Tensor,
         num_rows: int, row_scale: Optional[torch.Tensor]) -> Union[GroupBwdWPlan, str]:
    """A plan, or a string naming why the csrc dW kernel cannot take these tensors.

    x [*, K] and dy [*, F] row-major with 16-byte aligned rows (cp.async), K and F multiples of 8;
    like_weight [E, K, F] (dW is allocated like it, so with a unit stride along K or F).
    """
    if row_scale is not None and (row_scale.dim() != 1 or row_scale.numel() < num_rows):
        return f"row_scale of shape {tuple(row_scale.shape)}: expected [{num_rows}], one scale per slot"
    if x.dtype not in DTYPES:
        return f"dtype {str(x.dtype).replace('torch.', '')}: the csrc dW kernel is built for bfloat16 and float16"
    if dy.dtype != x.dtype or like_weight.dtype != x.dtype:
        return "mixed dtypes: x, dy and the weight must share one dtype"
    num_experts, k_in, n_out = like_weight.shape
    if num_rows > INT32_MAX:
        return f"{num_rows} rows: more than the kernel's 32-bit row count"
    if num_experts > 65535:
        return f"{num_experts} experts: more than the kernel's grid allows (65535)"
    sizes = sizes_reason(num_experts, k_in, n_out)
    if sizes:
        return sizes
    if k_in % ALIGN_ELEMENTS or n_out % ALIGN_ELEMENTS:
        return f"K={k_in}, F={n_out}: cp.async copies 16 bytes, so both must be multiples of {ALIGN_ELEMENTS}"
    if x.size(-1) != k_in or dy.size(-1) != n_out:
        return f"x [*, {x.size(-1)}] and dy [*, {dy.size(-1)}] do not match the weight [E, {k_in}, {n_out}]"
    if not rows_ok(x) or not rows_ok(dy):
        return f"x (strides {x.stride()}) or dy (strides {dy.stride()}) is not row-major with 16-byte aligned rows"
    if like_weight.stride(1) != 1 and like_weight.stride(2) != 1:
        return f"weight strides {like_weight.stride()}: no unit stride along K or F (dW is laid out like the weight)"
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        return f"expert_offsets dtype {expert_offsets.dtype}: expected int32 or int64"
    return GroupBwdWPlan(DTYPES[x.dtype], num_experts, num_rows, k_in, n_out)


def launch(p: GroupBwdWPlan, x: torch.Tensor, dy: torch.Tensor, sorted_scattered_idxs: torch.Tensor,
           expert_offsets: torch.Tensor, x_fan_out: int, dy_fan_out: int, x_grouped: bool, dy_grouped: bool,
           dw: torch.Tensor, row_scale: Optional[torch.Tensor] = None, db: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """Enqueue the kernel on the current stream of x's device, writing every element of dw (and of db
    [E, F], unit column stride, when given). No host sync."""
    module, error = _extension.load()
    if module is None:
        raise RuntimeError(f"scattermoe cutlass backend: {error}")
    if dw.stride(1) != 1 and dw.stride(2) != 1:
        raise ValueError(f"dw: expected a unit stride along K or F, got strides {dw.stride()}")
    if db is not None and (db.shape != (p.num_experts, p.n_out) or db.stride(1) != 1):
        raise ValueError(f"db: expected [{p.num_experts}, {p.n_out}] with unit column stride, got "
                         f"{tuple(db.shape)} strides {db.stride()}")
    idx = sorted_scattered_idxs.to(torch.int64).contiguous()
    offsets = expert_offsets.contiguous()
    scale = row_scale.to(torch.float32).contiguous() if row_scale is not None else None
    order = largest_experts_first(offsets, p.num_rows, p.num_experts)  # alive until the launch is enqueued
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    # expert_order only when there is one: an extension built before it existed still runs the rest.
    extra = {"expert_order": order.data_ptr()} if order is not None else {}
    module.group_bwd_w(
        dtype=p.dtype, x=x.data_ptr(), stride_xm=row_stride(x), x_rows=x.size(0),
        dy=dy.data_ptr(), stride_dym=row_stride(dy), dy_rows=dy.size(0),
        dw=dw.data_ptr(), stride_dwe=dw.stride(0), stride_dwk=dw.stride(1), stride_dwn=dw.stride(2),
        sorted_scattered_idxs=idx.data_ptr(), expert_offsets=offsets.data_ptr(),
        offsets_int64=offsets.dtype == torch.int64, x_grouped=x_grouped, dy_grouped=dy_grouped,
        x_fan_out=1 if x_grouped else int32_fan_out(x_fan_out, p.num_rows),
        dy_fan_out=1 if dy_grouped else int32_fan_out(dy_fan_out, p.num_rows),
        num_experts=p.num_experts, num_rows=p.num_rows, k_in=p.k_in, n_out=p.n_out,
        device=device, stream=torch.cuda.current_stream(x.device).cuda_stream,
        row_scale=scale.data_ptr() if scale is not None else 0,
        db=db.data_ptr() if db is not None else 0, stride_dbe=db.stride(0) if db is not None else 0,
        **extra,
    )
    return dw
