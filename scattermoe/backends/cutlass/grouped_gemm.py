"""The CUTLASS sm_90a grouped GEMM (csrc/grouped_gemm/) wrapped for torch tensors.

Legend: N routed rows (grouped by expert), E experts, K input features, F output features.

    y[rows of e] = x[rows of e] @ w[e] (+ bias[e])     for e in [0, E)

with expert e's rows [offsets[e-1], offsets[e]) read from ``expert_offsets`` on the
device (no host sync). This is scatter2scatter with ``grouped_in=True, grouped_out=True``
and no gates or GLU: the second MoE GEMM before its gate, and the dX GEMM of a grouped
output. ``plan`` decides from host metadata alone (dtype, strides, alignment) whether the
kernel can take the call; the caller falls back to Triton when it cannot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple, Union

import torch

from . import _extension

DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
ALIGN_ELEMENTS = 8  # TMA: 16-byte aligned rows and bases, i.e. 8 two-byte elements
ALIGN_BYTES = 16
INT32_MAX = 2**31 - 1
# The kernels take K and F as 32-bit ints (the bindings refuse more) and index columns in 32-bit ints up to a
# tile past them (the GLU backward's loop steps 1024 columns): wider goes to Triton, which has int64 columns.
FEATURES_MAX = INT32_MAX - 1024


@dataclasses.dataclass(frozen=True)
class GroupedGemmPlan:
    """Host-side arguments of ``scattermoe._C.grouped_gemm`` except pointers, stream and workspace."""

    dtype: str                # 'bfloat16' or 'float16'
    w_k_major: bool           # W[e] has unit stride along K (the permuted nn.Linear layout) or along F
    stride_we: int            # elements between experts in W (0 when E == 1)
    stride_w_ld: int          # W[e]'s non-unit stride: along F if k-major, along K if f-major
    num_experts: int
    num_rows: int
    k_in: int
    n_out: int


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN_BYTES == 0


def row_stride(t: torch.Tensor) -> int:
    """t's row stride as the kernels read it: with one row, torch may give any (autograd hands such gradients
    back with strides (1, 1), and .contiguous() keeps them); it is never used then, so the row's width stands in."""
    return t.stride(0) if t.size(0) > 1 else t.size(-1)


def rows_ok(t: torch.Tensor) -> bool:
    """[rows, cols] row-major, rows 16-byte aligned and not overlapping (an expanded x has row stride 0):
    what cp.async and TMA take, and what the kernels' own argument checks require."""
    ld = row_stride(t)
    return t.stride(-1) == 1 and ld % ALIGN_ELEMENTS == 0 and ld >= t.size(-1) and _aligned(t)


def sizes_reason(num_experts: int, k_in: int, cols: int) -> Optional[str]:
    """Why the kernels cannot take a weight [E, K, cols] by its sizes alone, else None: each needs E, K and F
    >= 1 (their argument checks refuse 0; Triton writes the bias, or nothing, there) and 32-bit feature dims."""
    if num_experts == 0:
        return "E=0: no experts (the kernels need at least one)"
    if k_in == 0 or cols == 0:
        return f"K={k_in}, F={cols}: an empty weight (the kernels need both >= 1)"
    if max(k_in, cols) > FEATURES_MAX:
        return f"K={k_in}, F={cols}: more than the kernels' 32-bit column indices take ({FEATURES_MAX})"
    return None


def int32_fan_out(fan_out: int, num_rows: int) -> int:
    """A gathered operand's fan-out as the kernels' 32-bit argument (the bindings refuse more): they read row
    slot // fan_out for slots in [0, num_rows), 0 for any fan_out >= num_rows, so num_rows reads the same rows."""
    return max(1, min(int(fan_out), num_rows))


def weight_layout(w: torch.Tensor) -> Union[Tuple[bool, int, int], str]:
    """(K-major?, the non-unit stride, the stride between experts or 0) of W [E, K, cols] as the kernels
    read it (16-byte aligned rows and experts, rows that do not overlap), or why they cannot."""
    if w.stride(1) == 1:
        k_major, ld = True, w.stride(2)
    elif w.stride(2) == 1:
        k_major, ld = False, w.stride(1)
    else:
        return f"w (strides {w.stride()}) has no unit stride along K or F"
    stride_we = w.stride(0) if w.size(0) > 1 else 0
    if ld % ALIGN_ELEMENTS or stride_we % ALIGN_ELEMENTS or not _aligned(w):
        return f"w (strides {w.stride()}) is not 16-byte aligned per row and per expert"
    if ld < (w.size(1) if k_major else w.size(2)):
        return f"w (strides {w.stride()}) has overlapping rows (an expanded tensor)"
    return k_major, ld, stride_we


def plan(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], expert_offsets: torch.Tensor,
         num_rows: int, out: Optional[torch.Tensor] = None) -> Union[GroupedGemmPlan, str]:
    """A plan, or a string naming why the grouped GEMM cannot take these tensors.

    x [N, K], w [E, K, F] (any strides), bias [E, F] or None, expert_offsets [E] int32/int64,
    out [N, F] or None. Shapes were checked by ops.py; this checks what the kernel adds:
    dtype, unit strides and 16-byte alignment for TMA, 32-bit problem sizes.
    """
    if x.dtype not in DTYPES:
        return f"dtype {str(x.dtype).replace('torch.', '')}: the csrc grouped GEMM is built for bfloat16 and float16"
    if w.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "mixed dtypes: x, w and bias must share one dtype"
    if out is not None and out.dtype != x.dtype:
        return "out has another dtype than x"
    num_experts, k_in, n_out = w.shape
    if num_rows > INT32_MAX:
        return f"{num_rows} rows: CUTLASS problem sizes are 32-bit"
    sizes = sizes_reason(num_experts, k_in, n_out)
    if sizes:
        return sizes
    if k_in % ALIGN_ELEMENTS or n_out % ALIGN_ELEMENTS:
        return f"K={k_in}, F={n_out}: TMA needs feature dims that are multiples of {ALIGN_ELEMENTS}"
    if not rows_ok(x):
        return f"x (strides {x.stride()}) is not row-major with 16-byte aligned, non-overlapping rows"
    if out is not None and not rows_ok(out):
        return f"out (strides {out.stride()}) is not row-major with 16-byte aligned rows"
    layout = weight_layout(w)
    if isinstance(layout, str):
        return layout
    w_k_major, ld, stride_we = layout
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        return f"expert_offsets dtype {expert_offsets.dtype}: expected int32 or int64"
    return GroupedGemmPlan(DTYPES[x.dtype], w_k_major, stride_we, ld, num_experts, num_rows, k_in, n_out)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _workspace_bytes(dtype: str, w_k_major: bool, num_experts: int, sm_count: int) -> int:
    module, _ = _extension.load()
    return module.grouped_gemm_workspace_bytes(dtype, w_k_major, num_experts, sm_count)


def _bias_for_kernel(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bias with unit column stride, 16-byte aligned rows and base (a copy of E*F elements if not)."""
    if bias is None:
        return None
    if bias.stride(-1) == 1 and (bias.size(0) == 1 or bias.stride(0) % ALIGN_ELEMENTS == 0) and _aligned(bias):
        return bias
    return bias.clone(memory_format=torch.contiguous_format)


def launch(p: GroupedGemmPlan, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
           expert_offsets: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Enqueue the grouped GEMM on the current stream of x's device, writing y [N, F]. No host sync."""
    module, error = _extension.load()
    if module is None:
        raise RuntimeError(f"scattermoe cutlass backend: {error}")
    bias = _bias_for_kernel(bias)
    expert_offsets = expert_offsets.contiguous()
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    sm_count = _sm_count(device)
    nbytes = _workspace_bytes(p.dtype, p.w_k_major, p.num_experts, sm_count)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=x.device)  # caching allocator: 512-byte aligned
    module.grouped_gemm(
        dtype=p.dtype, w_k_major=p.w_k_major,
        x=x.data_ptr(), stride_xm=row_stride(x),
        w=w.data_ptr(), stride_we=p.stride_we, stride_w_ld=p.stride_w_ld,
        bias=bias.data_ptr() if bias is not None else 0, stride_be=bias.stride(0) if bias is not None else 0,
        y=y.data_ptr(), stride_ym=row_stride(y),
        expert_offsets=expert_offsets.data_ptr(), offsets_int64=expert_offsets.dtype == torch.int64,
        num_experts=p.num_experts, num_rows=p.num_rows, k_in=p.k_in, n_out=p.n_out,
        workspace=workspace.data_ptr(), workspace_bytes=nbytes,
        device=device, sm_count=sm_count, stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
    return y


def _check_grouped_gemm_args(x, w, bias, expert_offsets) -> None:
    from ..._validate import _INDEX_DTYPES, check_tensor

    check_tensor("x", x, dim=2)
    check_tensor("w", w, dim=3, device=x.device)
    check_tensor("expert_offsets", expert_offsets, dim=1, dtypes=_INDEX_DTYPES, device=x.device)
    num_experts, k_in, n_out = w.shape
    if x.size(1) != k_in:
        raise ValueError(f"x: expected [N, {k_in}] (w is {tuple(w.shape)}), got {tuple(x.shape)}")
    if expert_offsets.numel() != num_experts:
        raise ValueError(f"expert_offsets: expected [E={num_experts}], got shape {tuple(expert_offsets.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=2, device=x.device)
        if tuple(bias.shape) != (num_experts, n_out):
            raise ValueError(f"bias: expected shape {(num_experts, n_out)}, got {tuple(bias.shape)}")


@torch.library.custom_op("scattermoe::cutlass_grouped_gemm", mutates_args=())
def grouped_gemm_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                    expert_offsets: torch.Tensor) -> torch.Tensor:
    """y [N, F] = x[rows of e] @ w[e] (+ bias[e]) per expert; x [N, K] grouped by expert, w [E, K, F],
    bias [E, F] or None, expert_offsets [E] cumulative counts. bf16/fp16 on sm_90; raises ValueError
    when the layout does not suit the kernel (see ``plan``). Called directly
    (``torch.ops.scattermoe.cutlass_grouped_gemm``), it checks the shapes and devices that
    scattermoe.parallel_linear checks before calling it (not the offsets' values)."""
    _check_grouped_gemm_args(x, w, bias, expert_offsets)
    p = plan(x, w, bias, expert_offsets, x.size(0))
    if isinstance(p, str):
        raise ValueError(f"cutlass grouped GEMM cannot take these tensors: {p}")
    return launch(p, x, w, bias, expert_offsets, x.new_empty(x.size(0), w.size(-1)))


@grouped_gemm_op.register_fake
def _(x, w, bias, expert_offsets):
    return x.new_empty(x.size(0), w.size(-1))
