"""scatter2scatter: Y = X W_e (+ b_e) (* s) over routed rows, gathering on load and scattering on store.

Legend: N routed rows (T*K), E experts, K_IN input features, N_OUT output features.
Rows are processed in expert order (the order of ``sorted_scattered_idxs``); a row
tile never straddles two experts, so no work is masked away at expert borders.
X rows are read either in that order (grouped) or gathered from token
``slot // FAN_OUT``; Y rows are written in that order (grouped) or scattered to
``slot``. No padded copy of X or Y is ever made.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._validate import check_scatter2scatter_args
from .config import (FP32, autotune_configs, input_precision, int64_columns, num_row_tiles_bound, on_tensor_device,
                     pow2_bucket, pruner)


@triton.jit
def locate_row_tile(pid_m, expert_offsets_ptr, num_rows, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map the pid_m-th row tile to (expert, first row, end row) from the expert offsets alone.

    Each expert owns cdiv(count_e, BLOCK_M) consecutive tiles; tiles past the last
    get expert >= E. Offsets are clamped to [0, num_rows] so inconsistent routing
    tensors can never make a program read or write out of bounds.
    """
    offs_e = tl.arange(0, E_POW2)
    in_range = offs_e < E
    ends = tl.load(expert_offsets_ptr + offs_e, mask=in_range, other=0).to(tl.int32)
    starts = tl.load(expert_offsets_ptr + offs_e - 1, mask=in_range & (offs_e > 0), other=0).to(tl.int32)
    ends = tl.minimum(tl.maximum(ends, 0), num_rows)
    starts = tl.minimum(tl.maximum(starts, 0), ends)
    tiles = tl.where(in_range, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
    is_mine = offs_e == expert
    first_tile = tl.sum(tl.where(is_mine, tile_ends - tiles, 0), 0)
    row_start = tl.sum(tl.where(is_mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(is_mine, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _scatter2scatter(
    X_ptr, stride_xm, stride_xk,            # X [T or N, K_IN]
    W_ptr, stride_we, stride_wk, stride_wn,  # W [E, K_IN, N_OUT], any strides
    B_ptr, stride_be, stride_bn,            # bias [E, N_OUT] (unused without HAS_BIAS)
    Y_ptr, stride_ym, stride_yn,            # Y [N, N_OUT]
    P_ptr, stride_pm, stride_pn,            # GLU pre-activation [N, 2*N_OUT] (only with STORE_PRE)
    scale_ptr,                              # [N] per-slot row scale (gates), indexed by slot
    sorted_scattered_ptr,                   # [N] slot of each row in expert order
    expert_offsets_ptr,                     # [E] end of each expert's rows
    num_rows, E, K_IN, N_OUT, FAN_OUT,
    M_BUCKET,                               # autotune key only: num_rows rounded to a power of 2
    E_POW2: tl.constexpr,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    GLU: tl.constexpr,                      # 0: plain; 1: silu(first half) * second; 2: first * silu(second)
    STORE_PRE: tl.constexpr,                # GLU: also write both halves before the activation (for backward)
    GLU_PAIRED: tl.constexpr,               # GLU in one accumulator: tile columns interleave the halves (below)
    INPUT_PRECISION: tl.constexpr,
    INT64_COLS: tl.constexpr,               # column offsets in int64 (config.int64_columns)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # With GLU, W has 2*N_OUT columns: this program computes columns offs_n of both halves,
    # so the activation happens in registers and Y is written once at its final width.
    # Grouped launch order (Triton matmul tutorial) so neighbouring programs share W tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + E  # upper bound on the row tiles over all experts
    OUT_N: tl.constexpr = BLOCK_N // 2 if GLU_PAIRED else BLOCK_N  # output columns per program
    num_pid_n = tl.cdiv(N_OUT, OUT_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    expert, row_start, row_end = locate_row_tile(pid_m, expert_offsets_ptr, num_rows, E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(sorted_scattered_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    if (not X_GROUPED) or (not Y_GROUPED) or HAS_SCALE:
        # A row whose slot lies outside [0, N) (hand-made routing, unchecked on CUDA outside debug mode) is
        # neither read nor written: wrong rows at worst, never memory outside the tensors.
        row_mask = row_mask & (slots >= 0) & (slots < num_rows)
    if X_GROUPED:
        x_rows = rows.to(tl.int64)
    else:
        x_rows = slots // FAN_OUT
    if Y_GROUPED:
        y_rows = rows.to(tl.int64)
    else:
        y_rows = slots

    if GLU_PAIRED:
        # One BLOCK_N-wide accumulator for BLOCK_N / 2 output columns: tile column c holds W column
        # j = c // 2 of the first half (c even) or of the second (c odd), so each GLU pair sits in two
        # adjacent accumulator columns, which the wgmma layout keeps in one thread: the split below is
        # free, and the dot is one BLOCK_N-wide wgmma instead of two half-width ones.
        offs_c = tl.arange(0, BLOCK_N)
        offs_n = pid_n * OUT_N + offs_c // 2
        w_cols = offs_n + (offs_c % 2) * N_OUT
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = offs_n
    n_mask = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    if INT64_COLS:  # an operand's columns span 2^31 elements: int32 column offsets and K steps would wrap
        cols_k = offs_k.to(tl.int64)
        cols_w = w_cols.to(tl.int64)
        step_xk = tl.cast(stride_xk, tl.int64)  # so that the K steps below are int64 products
        step_wk = tl.cast(stride_wk, tl.int64)
        n_half = tl.cast(N_OUT, tl.int64)  # the second GLU half's first column
    else:
        cols_k = offs_k
        cols_w = w_cols
        step_xk = stride_xk
        step_wk = stride_wk
        n_half = N_OUT
    x_ptrs = X_ptr + x_rows[:, None] * stride_xm + cols_k[None, :] * stride_xk
    w_ptrs = W_ptr + expert.to(tl.int64) * stride_we + cols_k[:, None] * stride_wk + cols_w[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # second GLU half; dead code without GLU
    for k0 in range(0, K_IN, BLOCK_K):
        k_mask = offs_k < K_IN - k0
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if GLU and not GLU_PAIRED:
            b2 = tl.load(w_ptrs + n_half * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * step_xk
        w_ptrs += BLOCK_K * step_wk

    if GLU_PAIRED:
        if HAS_BIAS:
            acc += tl.load(B_ptr + expert.to(tl.int64) * stride_be + cols_w * stride_bn, mask=n_mask,
                           other=0.0)[None, :].to(tl.float32)
        acc, acc2 = tl.split(tl.reshape(acc, (BLOCK_M, OUT_N, 2)))  # (first half, second half)
        offs_n = pid_n * OUT_N + tl.arange(0, OUT_N)
        n_mask = offs_n < N_OUT
    cols_n = offs_n.to(tl.int64) if INT64_COLS else offs_n
    out_mask = row_mask[:, None] & n_mask[None, :]
    if HAS_BIAS and not GLU_PAIRED:
        b_ptrs = B_ptr + expert.to(tl.int64) * stride_be + cols_n * stride_bn
        acc += tl.load(b_ptrs, mask=n_mask, other=0.0)[None, :].to(tl.float32)
        if GLU:
            acc2 += tl.load(b_ptrs + n_half * stride_bn, mask=n_mask, other=0.0)[None, :].to(tl.float32)
    if GLU:
        if STORE_PRE:
            p_ptrs = P_ptr + y_rows[:, None] * stride_pm + cols_n[None, :] * stride_pn
            tl.store(p_ptrs, acc.to(P_ptr.dtype.element_ty), mask=out_mask)
            tl.store(p_ptrs + n_half * stride_pn, acc2.to(P_ptr.dtype.element_ty), mask=out_mask)
        if GLU == 1:
            acc = _silu(acc) * acc2
        else:
            acc = acc * _silu(acc2)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + slots, mask=row_mask, other=0.0)
        acc *= scale[:, None].to(tl.float32)
    y_ptrs = Y_ptr + y_rows[:, None] * stride_ym + cols_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=out_mask)


# One jit function, three autotuned launchers with their own tile spaces: plain; GLU with paired columns
# (W K-major: its columns are contiguous along K however they interleave); GLU with two accumulators
# (W F-major, where interleaved columns would break the 16-byte loads along F). Each twice: for 16-bit operands
# and for float32 ones (config.py: the 16-bit tiles spill in float32).
# INPUT_PRECISION and INT64_COLS are keys: each compiles to a different kernel (see group_bwd_w.py).
def _autotuned(space: str):
    return triton.autotune(configs=autotune_configs(space),
                           key=["K_IN", "N_OUT", "M_BUCKET", "INPUT_PRECISION", "INT64_COLS"],
                           prune_configs_by={"early_config_prune": pruner(space)})(_scatter2scatter)


_scatter2scatter_kernel = _autotuned("scatter2scatter")
_scatter2scatter_glu_paired_kernel = _autotuned("scatter2scatter_glu_paired")
_scatter2scatter_glu_kernel = _autotuned("scatter2scatter_glu")
_scatter2scatter_fp32_kernel = _autotuned("scatter2scatter" + FP32)
_scatter2scatter_glu_paired_fp32_kernel = _autotuned("scatter2scatter_glu_paired" + FP32)
_scatter2scatter_glu_fp32_kernel = _autotuned("scatter2scatter_glu" + FP32)
_KERNELS = {
    "scatter2scatter": _scatter2scatter_kernel,
    "scatter2scatter_glu_paired": _scatter2scatter_glu_paired_kernel,
    "scatter2scatter_glu": _scatter2scatter_glu_kernel,
    "scatter2scatter" + FP32: _scatter2scatter_fp32_kernel,
    "scatter2scatter_glu_paired" + FP32: _scatter2scatter_glu_paired_fp32_kernel,
    "scatter2scatter_glu" + FP32: _scatter2scatter_glu_fp32_kernel,
}


@on_tensor_device
def scatter2scatter(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor],
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    fan_out: int,
    grouped_in: bool,
    grouped_out: bool,
    row_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    glu: int = 0,
    pre_activation: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the kernel (the shapes checked here, the routing's values by the caller: ops.py).

    x [T or N, K_IN]; w [E, K_IN, W_OUT] (a permuted view is fine); bias [E, W_OUT] or None;
    row_scale [N] (per slot) or None. Returns Y [N, N_OUT] in x's dtype, grouped or in slot
    order, where N_OUT = W_OUT, or W_OUT / 2 with ``glu`` (1: silu(first half) * second half,
    2: first * silu(second)); with ``glu``, ``pre_activation`` [N, W_OUT], if given, receives
    both halves before the activation, rows ordered like Y.
    """
    # torch.ops.scattermoe.* and kernels.ops reach here without parallel_linear's checks: what the kernel would
    # read or write past is checked (shapes; the values of the indices are the caller's).
    check_scatter2scatter_args(x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, row_scale, out,
                               glu, pre_activation)
    num_rows = sorted_scattered_idxs.numel()
    num_experts, k_in, w_out = w.shape
    n_out = w_out // 2 if glu else w_out
    # The kernel reads these 1-D tensors as contiguous (no copy when they are): torch.ops.scattermoe.* reach here
    # without the public functions' checks.
    sorted_scattered_idxs, expert_offsets = sorted_scattered_idxs.contiguous(), expert_offsets.contiguous()
    row_scale = row_scale.contiguous() if row_scale is not None else None
    y = out if out is not None else x.new_empty(num_rows, n_out)
    if num_rows == 0:
        return y
    bias_arg = bias if bias is not None else y
    scale_arg = row_scale if row_scale is not None else y
    pre_arg = pre_activation if pre_activation is not None else y
    paired = bool(glu) and w.stride(1) == 1  # K-major W (the layers' permuted weight)
    space = "scatter2scatter_glu_paired" if paired else ("scatter2scatter_glu" if glu else "scatter2scatter")
    kernel = _KERNELS[space + (FP32 if x.dtype == torch.float32 else "")]

    def grid(meta):
        out_cols = meta["BLOCK_N"] // 2 if paired else meta["BLOCK_N"]  # output columns per program
        return (num_row_tiles_bound(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(n_out, out_cols),)

    kernel[grid](
        x, x.stride(0), x.stride(1),
        w, w.stride(0), w.stride(1), w.stride(2),
        bias_arg, bias_arg.stride(0), bias_arg.stride(-1),
        y, y.stride(0), y.stride(1),
        pre_arg, pre_arg.stride(0), pre_arg.stride(1),
        scale_arg,
        sorted_scattered_idxs,
        expert_offsets,
        num_rows, num_experts, k_in, n_out, fan_out,
        pow2_bucket(num_rows),
        E_POW2=triton.next_power_of_2(max(num_experts, 2)),
        X_GROUPED=grouped_in, Y_GROUPED=grouped_out,
        HAS_BIAS=bias is not None, HAS_SCALE=row_scale is not None,
        GLU=glu, STORE_PRE=pre_activation is not None, GLU_PAIRED=paired,
        INPUT_PRECISION=input_precision(x.dtype),
        INT64_COLS=int64_columns((k_in, x.stride(1)), (k_in, w.stride(1)), (w_out, w.stride(2)), (n_out, y.stride(1)),
                                 (w_out, bias_arg.stride(-1)), (w_out, pre_arg.stride(1))),
    )
    return y
