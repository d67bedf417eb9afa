"""The GLU backward pass of csrc/glu_backward/ wrapped for torch tensors.

Same contract as scattermoe.backends.triton.glu_backward: from the pre-activation H = [a | b]
[N, 2F] and dG [N, F], one pass writes dH [N, 2F] (the row scale s applied to dG), optionally
s * GLU(H) [N, F] and the per-row <dG, GLU(H)> in float32. bf16 and fp16; rows need a unit
column stride (any row stride: 16-byte accesses where aligned, element ones elsewhere).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _extension
from .grouped_gemm import DTYPES, FEATURES_MAX, INT32_MAX, row_stride


def plan(pre: torch.Tensor, dg: torch.Tensor) -> Union[str, None]:
    """None when the csrc kernel takes these tensors, else why not."""
    if pre.dtype not in DTYPES:
        return f"dtype {str(pre.dtype).replace('torch.', '')}: the csrc GLU backward is built for bfloat16 and float16"
    if dg.dtype != pre.dtype:
        return "mixed dtypes: pre and dg must share one dtype"
    if pre.stride(-1) != 1 or dg.stride(-1) != 1:
        return f"pre (strides {pre.stride()}) and dg (strides {dg.stride()}) need a unit column stride"
    if pre.size(-1) < 2:
        return f"pre [*, {pre.size(-1)}]: an empty GLU (the kernel needs F >= 1)"
    if pre.size(-1) // 2 > FEATURES_MAX:
        return f"pre [*, {pre.size(-1)}]: F more than the kernel's 32-bit column indices take ({FEATURES_MAX})"
    if row_stride(pre) < pre.size(-1) or row_stride(dg) < dg.size(-1):  # rows overlapping (e.g. expanded)
        return f"pre (strides {pre.stride()}) or dg (strides {dg.stride()}): rows overlap"
    if pre.size(0) > INT32_MAX:
        return f"{pre.size(0)} rows: more than the kernel's 32-bit row count"
    return None


def launch(pre: torch.Tensor, dg: torch.Tensor, activate_first: bool, row_scale: Optional[torch.Tensor],
           store_g: bool, store_dot: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Enqueue the kernel on the current stream of pre's device. No host sync."""
    module, error = _extension.load()
    if module is None:
        raise RuntimeError(f"scattermoe cutlass backend: {error}")
    num_rows, width = pre.shape
    f = width // 2
    dh = torch.empty_like(pre, memory_format=torch.contiguous_format)
    g = pre.new_empty(num_rows, f) if store_g else None
    dot = torch.empty(num_rows, device=pre.device, dtype=torch.float32) if store_dot else None
    if num_rows == 0:
        return dh, g, dot
    scale = row_scale.reshape(-1).to(torch.float32).contiguous() if row_scale is not None else None
    device = pre.device.index if pre.device.index is not None else torch.cuda.current_device()
    module.glu_backward(
        dtype=DTYPES[pre.dtype], pre=pre.data_ptr(), stride_pm=row_stride(pre), dg=dg.data_ptr(),
        stride_dgm=row_stride(dg), scale=scale.data_ptr() if scale is not None else 0,
        dh=dh.data_ptr(), stride_dhm=row_stride(dh), g=g.data_ptr() if g is not None else 0,
        stride_gm=row_stride(g) if g is not None else 0, dot=dot.data_ptr() if dot is not None else 0,
        num_rows=num_rows, f=f, activate_first=activate_first, device=device,
        stream=torch.cuda.current_stream(pre.device).cuda_stream,
    )
    return dh, g, dot
