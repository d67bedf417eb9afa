"""gather_sum: the top-k combine as a gather (``set_topk_combine("gather")``; DESIGN.md 4, SonicMoE).

Legend: T tokens, K experts per token, N = T*K routed rows (expert order), D features.
The GEMM before this pass wrote its N rows grouped by expert and ungated; each program here
takes a block of tokens and a block of columns and, for every token t, reads its K rows
(slot t*K + j lives at row ``row_of_slot[t*K + j]``), applies the gates in fp32 and sums:
    y[t] = sum_j gates[t, j] * Y[row_of_slot[t*K + j]]          [T, D]
The bytes are those of a scattered store followed by a sum over K; what moves is the
scattered access, from the GEMM's stores to this pass's loads (row by row, 16-byte vectors
along D either way).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._validate import _FLOAT_DTYPES, _INDEX_DTYPES, check_out, check_tensor, positive_int
from .config import INTERPRET, on_tensor_device


@triton.jit
def _gather_sum_kernel(
    Y_ptr, stride_ym,        # [N, D] rows in expert order, unit column stride
    row_of_slot_ptr,         # [T*K] the row of slot t*K + j
    gates_ptr,               # [T*K] (only with HAS_GATES)
    OUT_ptr, stride_om,      # [T, D] out, unit column stride
    num_tokens, num_rows, D, K,
    HAS_GATES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (cols < D)[None, :]
    slots = tokens.to(tl.int64) * K
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, K):
        rows = tl.load(row_of_slot_ptr + slots + j, mask=token_mask, other=0).to(tl.int64)
        # Clamped: sorted ids passed by hand that are not a permutation (unchecked on CUDA outside debug mode)
        # may cost wrong rows, never reads outside Y.
        rows = tl.minimum(tl.maximum(rows, 0), num_rows - 1)
        vals = tl.load(Y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATES:
            gate = tl.load(gates_ptr + slots + j, mask=token_mask, other=0.0).to(tl.float32)
            vals = vals * gate[:, None]
        acc += vals
    out_ptrs = OUT_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT_ptr.dtype.element_ty), mask=mask)


def block_sizes(width: int) -> tuple:
    """(BLOCK_T, BLOCK_D, num_warps): on the GPU 4 tokens x up to 1024 columns, 8 elements (16 bytes of bf16) per
    thread and load; under the interpreter small blocks, so the tests cross block edges."""
    if INTERPRET:
        return 4, 32, 4
    return 4, min(1024, max(64, triton.next_power_of_2(width))), 4


def _check_inputs(rows, row_of_slot, gates, fan_out, out) -> None:
    """The layout the kernel assumes (it is reachable as torch.ops.scattermoe.gather_sum): a wrong one raises.
    The library's checks (_validate), plus the unit strides the kernel's pointer arithmetic takes for granted."""
    check_tensor("rows", rows, dim=2)
    if rows.size(1) > 1 and rows.stride(1) != 1:
        raise ValueError(f"rows: expected a unit column stride, got strides {rows.stride()}")
    fan_out = positive_int("fan_out", fan_out)
    num_rows = rows.size(0)
    if num_rows % fan_out:
        raise ValueError(f"rows: {num_rows} rows are not whole tokens of fan_out={fan_out}")
    for name, t, dtypes in (("row_of_slot", row_of_slot, _INDEX_DTYPES), ("gates", gates, _FLOAT_DTYPES)):
        if t is None and name == "gates":
            continue
        check_tensor(name, t, dim=1, dtypes=dtypes, device=rows.device)
        if t.numel() != num_rows or (num_rows > 1 and t.stride(0) != 1):
            raise ValueError(f"{name}: expected a contiguous [{num_rows}], got shape {tuple(t.shape)} "
                             f"strides {t.stride()}")
    if out is not None:
        check_out(out, (num_rows // fan_out, rows.size(1)), rows)
        if rows.size(1) > 1 and out.stride(1) != 1:
            raise ValueError(f"out: expected a unit column stride, got strides {out.stride()}")


@on_tensor_device
def gather_sum(
    rows: torch.Tensor,
    row_of_slot: torch.Tensor,
    gates: Optional[torch.Tensor],
    fan_out: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[T, D] in rows' dtype: y[t] = sum_j gates[t*K + j] * rows[row_of_slot[t*K + j]], K = fan_out, in fp32.

    rows: [N, D] with a unit column stride; row_of_slot: [N] (the inverse of sorted_scattered_idxs);
    gates: [N] flat (any float dtype) or None (a plain sum); out: [T, D] to write into, or None.
    """
    _check_inputs(rows, row_of_slot, gates, fan_out, out)
    num_rows, width = rows.shape
    num_tokens = num_rows // fan_out
    y = out if out is not None else rows.new_empty(num_tokens, width)
    if num_tokens == 0 or width == 0:
        return y
    block_t, block_d, warps = block_sizes(width)
    _gather_sum_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_d))](
        rows, rows.stride(0),
        row_of_slot,
        gates if gates is not None else rows,
        y, y.stride(0),
        num_tokens, num_rows, width, fan_out,
        HAS_GATES=gates is not None, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=warps,
    )
    return y
