"""cutlass backend: CUDA C++ / CUTLASS 3.x kernels for the H100 (sm_90a) from csrc/, bound
torch-free as ``scattermoe._C``; Triton runs what they do not cover yet.

Importing this package never fails: without the extension, a GPU or a driver,
``unsupported_reason`` says why and the backend is not selectable.

What runs on csrc now, bf16/fp16: every scatter2scatter call (a ptr-array TMA grouped GEMM
for grouped, ungated rows; a cp.async scatter GEMM with gather, scatter, gates and the GLU
epilogue for the rest), group_bwd_w (dW and db, gated or not), and the GLU backward pass:
MLP, GLUMLP, MoA and parallel_linear run forward and backward on csrc alone. What the kernels
cannot take (other dtypes, layouts cp.async or TMA cannot read) falls back to Triton, counted
in ``FALLBACKS`` by the reason (see dispatch.py and csrc/README.md). The scatter GEMM has a
persistent variant (one CTA per SM) and can load its weight tiles by TMA instead of cp.async, both off by
default until measured: ``set_persistent()``, ``set_weight_tma()``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from .dispatch import (FALLBACKS, gather_sum, glu_backward, group_bwd_w, scatter2scatter,
                       scatter2scatter_fallback_reason, set_strict)
from .grouped_gemm import grouped_gemm_op
from .scatter_gemm import persistent, set_persistent, set_weight_tma, weight_tma

CSRC_DTYPES = (torch.bfloat16, torch.float16)
SM90 = (9, 0)

__all__ = [
    "FALLBACKS", "extension", "gather_sum", "glu_backward", "group_bwd_w", "grouped_gemm_op", "persistent",
    "scatter2scatter",
    "scatter2scatter_fallback_reason", "set_persistent", "set_strict", "set_weight_tma", "unsupported_reason",
    "weight_tma",
]


def extension():
    """The loaded ``scattermoe._C`` module, or None when it is not built."""
    return _extension.load()[0]


def unsupported_reason(x: torch.Tensor) -> Optional[str]:
    """Why the cutlass backend cannot run on x, or None if it can.

    In order: the extension is missing; CUDA is unusable (on a CPU machine: cudaGetDeviceCount
    fails with cudaErrorInsufficientDriver, error 35); x is not a CUDA tensor; the GPU is not
    sm_90 (the cubins are sm_90a only); the dtype is neither bf16 nor fp16 and Triton, which
    would run it, cannot.
    """
    reason = _extension.unavailable_reason()
    if reason is not None:
        return reason
    if x.device.type != "cuda":
        return f"the cutlass backend runs on CUDA tensors, not on {x.device.type}"
    capability = torch.cuda.get_device_capability(x.device)
    if capability != SM90:
        return (f"the csrc kernels are built for sm_90a (H100/H200) only; {torch.cuda.get_device_name(x.device)} "
                f"is sm_{capability[0]}{capability[1]}")
    if x.dtype not in CSRC_DTYPES:
        from .. import triton_unsupported_reason

        why_not = triton_unsupported_reason(x)
        if why_not is not None:
            return f"{x.dtype} is not in the csrc kernels (bf16, fp16) and the Triton fallback cannot run: {why_not}"
    return None
