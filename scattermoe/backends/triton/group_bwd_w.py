"""group_bwd_w: per-expert weight gradient dW_e = X_e^T (s * dY_e), and db_e = sum_rows s * dY_e.

Legend: N routed rows, E experts, K_IN input features, N_OUT output features.
One program per (expert, K_IN tile, N_OUT tile) reduces over that expert's rows,
read in expert order; X and dY rows are read grouped or gathered from
``slot // fan_out``, so neither is ever copied into expert order. An empty
expert writes zeros.

Launch order: the expert is the slowest index, and within an expert the shorter
of the two tile dimensions the fastest, so the programs resident at once cover
it whole and read each slice of the larger operand together: that operand comes
from HBM about once. (With the expert fastest and N_OUT tiles next, JetMoE's
first dW re-read all of dY_e once per K_IN tile: ~12 GB at T=16384.) With many
experts and rows they are launched largest first (``_schedule.largest_experts_first``),
so that a large expert's long programs do not start last.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._validate import check_group_bwd_w_args
from .._schedule import largest_experts_first
from .config import FP32, autotune_configs, input_precision, int64_columns, on_tensor_device, pow2_bucket, pruner


@triton.jit
def _group_bwd_w(
    X_ptr, stride_xm, stride_xk,                  # X [T or N, K_IN]
    DY_ptr, stride_dym, stride_dyn,               # dY [T or N, N_OUT]
    DW_ptr, stride_dwe, stride_dwk, stride_dwn,   # dW [E, K_IN, N_OUT], any strides
    DB_ptr, stride_dbe, stride_dbn,               # db [E, N_OUT] (unused without HAS_BIAS)
    scale_ptr,                                    # [N] per-slot scale of dY rows (gates)
    sorted_scattered_ptr,                         # [N] slot of each row in expert order
    expert_offsets_ptr,                           # [E] end of each expert's rows
    expert_order_ptr,                             # [E] int32 expert of each program_id(1) (EXPERT_ORDER)
    num_rows, K_IN, N_OUT, X_FAN_OUT, DY_FAN_OUT,
    M_BUCKET,                                     # autotune key only
    X_GROUPED: tl.constexpr, DY_GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, EXPERT_ORDER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64_COLS: tl.constexpr,                     # column offsets in int64 (config.int64_columns)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    if EXPERT_ORDER:  # launched largest expert first
        expert = tl.load(expert_order_ptr + expert)
    num_pid_k = tl.cdiv(K_IN, BLOCK_K)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    if num_pid_k <= num_pid_n:
        pid_k = pid % num_pid_k
        pid_n = pid // num_pid_k
    else:
        pid_n = pid % num_pid_n
        pid_k = pid // num_pid_n
    end = tl.load(expert_offsets_ptr + expert).to(tl.int32)
    start = tl.load(expert_offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    end = tl.minimum(tl.maximum(end, 0), num_rows)  # clamp: bad offsets must not read out of bounds
    start = tl.minimum(tl.maximum(start, 0), end)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K_IN
    n_mask = offs_n < N_OUT
    if INT64_COLS:  # an operand's columns span 2^31 elements: int32 column offsets would wrap
        cols_k = offs_k.to(tl.int64)
        cols_n = offs_n.to(tl.int64)
    else:
        cols_k = offs_k
        cols_n = offs_n
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        slots = tl.load(sorted_scattered_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        if (not X_GROUPED) or (not DY_GROUPED) or HAS_SCALE:
            row_mask = row_mask & (slots >= 0) & (slots < num_rows)  # a slot outside [0, N) adds nothing
        if X_GROUPED:
            x_rows = rows.to(tl.int64)
        else:
            x_rows = slots // X_FAN_OUT
        if DY_GROUPED:
            dy_rows = rows.to(tl.int64)
        else:
            dy_rows = slots // DY_FAN_OUT
        x = tl.load(X_ptr + x_rows[:, None] * stride_xm + cols_k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        dy = tl.load(DY_ptr + dy_rows[:, None] * stride_dym + cols_n[None, :] * stride_dyn,
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * scale[:, None]).to(DY_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(x), dy, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            db_acc += tl.sum(dy.to(tl.float32), 0)

    dw_ptrs = DW_ptr + expert.to(tl.int64) * stride_dwe + cols_k[:, None] * stride_dwk + cols_n[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(DW_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB_ptr + expert.to(tl.int64) * stride_dbe + cols_n * stride_dbn,
                     db_acc.to(DB_ptr.dtype.element_ty), mask=n_mask)


# Autotuned twice: for 16-bit operands and for float32 ones (config.py: the 16-bit tiles spill in float32).
# INPUT_PRECISION is a key: ieee and tf32 are different kernels (a config that fits one can run out of shared
# memory in the other), and Triton keys a tuning only on the keys and the tensors' dtypes; so is INT64_COLS (the
# int64 column offsets need more registers: a tile tuned without them can spill with them).
def _autotuned(space: str):
    return triton.autotune(configs=autotune_configs(space),
                           key=["K_IN", "N_OUT", "M_BUCKET", "INPUT_PRECISION", "INT64_COLS"],
                           prune_configs_by={"early_config_prune": pruner(space)})(_group_bwd_w)


_group_bwd_w_kernel = _autotuned("group_bwd_w")
_group_bwd_w_fp32_kernel = _autotuned("group_bwd_w" + FP32)


def _empty_weight_grads(dy, sorted_scattered_idxs, expert_offsets, like_weight, dy_fan_out, dy_grouped, row_scale,
                        with_bias):
    """group_bwd_w for a weight with no elements (E, K_IN or N_OUT = 0), in torch: dW is empty, but with K_IN = 0
    db_e = sum over the expert's rows of s * dY still has N_OUT columns (the bias alone makes the output)."""
    num_experts, _, n_out = like_weight.shape
    dw = torch.empty_like(like_weight)
    if not with_bias:
        return dw, None
    db = torch.zeros(num_experts, n_out, dtype=torch.float32, device=like_weight.device)
    num_rows = sorted_scattered_idxs.numel()
    if num_experts and n_out and num_rows:
        rows = torch.arange(num_rows, device=dy.device)
        # Row i belongs to the first expert whose end (clamped to [0, N]) passes it.
        ends = expert_offsets[:num_experts].clamp(0, num_rows).cummax(0).values
        expert = torch.searchsorted(ends, rows, right=True)
        slots = sorted_scattered_idxs.long()
        keep = (expert < num_experts) & (slots >= 0) & (slots < num_rows)  # as the kernel: a bad slot adds nothing
        slots = slots.clamp(0, num_rows - 1)  # (read, then dropped by keep)
        dy_rows = dy[:num_rows] if dy_grouped else dy[slots // dy_fan_out]
        scale = row_scale.reshape(-1)[slots].float()[:, None] if row_scale is not None else 1.0
        db.index_add_(0, expert[keep], (dy_rows.float() * scale)[keep])
    return dw, db.to(like_weight.dtype)


@on_tensor_device
def group_bwd_w(
    x: torch.Tensor,
    dy: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    like_weight: torch.Tensor,
    x_fan_out: int,
    dy_fan_out: int,
    x_grouped: bool,
    dy_grouped: bool,
    row_scale: Optional[torch.Tensor] = None,
    with_bias: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (dW shaped and strided like ``like_weight`` [E, K_IN, N_OUT], db [E, N_OUT] or None); malformed
    arguments raise ValueError (TypeError for a wrong dtype) before the kernel."""
    check_group_bwd_w_args(x, dy, sorted_scattered_idxs, expert_offsets, like_weight, x_fan_out, dy_fan_out,
                           x_grouped, dy_grouped, row_scale)
    num_experts, k_in, n_out = like_weight.shape
    num_rows = sorted_scattered_idxs.numel()
    # Read as contiguous by the kernel (no copy when they are; see scatter2scatter).
    sorted_scattered_idxs, expert_offsets = sorted_scattered_idxs.contiguous(), expert_offsets.contiguous()
    row_scale = row_scale.contiguous() if row_scale is not None else None
    if num_experts == 0 or k_in == 0 or n_out == 0:  # an empty dW: no tile to launch (the grid would be empty)
        return _empty_weight_grads(dy, sorted_scattered_idxs, expert_offsets, like_weight, dy_fan_out, dy_grouped,
                                   row_scale, with_bias)
    dw = torch.empty_like(like_weight)
    db = like_weight.new_empty(num_experts, n_out) if with_bias else None
    db_arg = db if db is not None else dw[0]
    scale_arg = row_scale if row_scale is not None else dw
    order = largest_experts_first(expert_offsets, num_rows, num_experts)

    def grid(meta):
        return (triton.cdiv(k_in, meta["BLOCK_K"]) * triton.cdiv(n_out, meta["BLOCK_N"]), num_experts)

    kernel = _group_bwd_w_fp32_kernel if x.dtype == torch.float32 else _group_bwd_w_kernel
    kernel[grid](
        x, x.stride(0), x.stride(1),
        dy, dy.stride(0), dy.stride(1),
        dw, dw.stride(0), dw.stride(1), dw.stride(2),
        db_arg, db_arg.stride(0), db_arg.stride(-1),
        scale_arg,
        sorted_scattered_idxs,
        expert_offsets,
        order if order is not None else expert_offsets,
        num_rows, k_in, n_out, x_fan_out, dy_fan_out,
        pow2_bucket(num_rows),
        X_GROUPED=x_grouped, DY_GROUPED=dy_grouped,
        HAS_BIAS=with_bias, HAS_SCALE=row_scale is not None, EXPERT_ORDER=order is not None,
        INPUT_PRECISION=input_precision(x.dtype),
        INT64_COLS=int64_columns((k_in, x.stride(1)), (n_out, dy.stride(1)), (k_in, dw.stride(1)),
                                 (n_out, dw.stride(2)), (n_out, db_arg.stride(-1))),
    )
    return dw, db
