"""The cutlass backend's launchers: csrc kernels where written, Triton for the rest.

Same signatures as scattermoe.backends.triton (ops.py calls either through
``backends.kernels(name)``). Each call that the csrc kernels do not cover yet is routed
to the Triton launcher and counted in ``FALLBACKS`` under the name of the missing piece;
``SCATTERMOE_CUTLASS_STRICT=1`` (or ``set_strict(True)``) raises instead, so a GPU test can
prove it exercised the csrc path.

Covered by csrc now: scatter2scatter, bf16/fp16: grouped in and out without gates or GLU goes
to the TMA grouped GEMM (grouped_gemm.plan); every other combination (gathered rows, scattered
rows, gates, the GLU epilogue) to the cp.async scatter GEMM (scatter_gemm.plan).
group_bwd_w (with or without a row scale and a bias gradient) goes to the csrc dW kernel
(weight_grad.plan),
glu_backward to the csrc GLU backward pass (glu_grad.plan).
gather_sum (the "gather" top-k combine) is Triton's pass on both backends: it reads rows and sums, no GEMM, so
it is not a csrc piece missing and is not counted in FALLBACKS (nor refused in strict mode).
"""

from __future__ import annotations

import collections
from typing import Optional, Tuple

import torch

from ..._validate import check_glu_backward_args, check_group_bwd_w_args, check_scatter2scatter_args, env_flag, flag
from . import glu_grad, grouped_gemm, scatter_gemm
from . import weight_grad as wgrad

# Every fallback is counted under its reason: the plans' strings (e.g. "dtype float32: ...").

FALLBACKS: "collections.Counter[str]" = collections.Counter()
_strict = env_flag("SCATTERMOE_CUTLASS_STRICT")


def set_strict(enabled: bool = True) -> None:
    """Raise NotImplementedError instead of falling back to Triton."""
    global _strict
    _strict = flag("enabled", enabled)  # ("no" would otherwise mean True)


def _not_cuda(t: torch.Tensor) -> Optional[str]:
    """The csrc kernels run on CUDA tensors only: the reason for anything else."""
    return None if t.device.type == "cuda" else f"tensors on {t.device}, not CUDA"


def scatter2scatter_fallback_reason(
    x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], expert_offsets: torch.Tensor,
    num_rows: int, grouped_in: bool, grouped_out: bool, row_scale: Optional[torch.Tensor],
    out: Optional[torch.Tensor], glu: int, pre_activation: Optional[torch.Tensor],
) -> Optional[str]:
    """Why scatter2scatter must go to Triton for this call, or None when a csrc kernel takes it."""
    p = _plan(x, w, bias, expert_offsets, num_rows, grouped_in, grouped_out, row_scale, out, glu, pre_activation)
    return p if isinstance(p, str) else None


def _plan(x, w, bias, expert_offsets, num_rows, grouped_in, grouped_out, row_scale, out, glu, pre_activation):
    """The TMA grouped GEMM when rows are grouped both ways, ungated and without GLU, else the scatter GEMM."""
    not_cuda = _not_cuda(x)
    if not_cuda:
        return not_cuda
    if pre_activation is not None and not glu:
        return "pre_activation without glu"
    if grouped_in and grouped_out and row_scale is None and not glu:
        p = grouped_gemm.plan(x, w, bias, expert_offsets, num_rows, out)
        if not isinstance(p, str):
            return p
    return scatter_gemm.plan(x, w, bias, expert_offsets, num_rows, out, glu, pre_activation)


def _triton():
    from .. import triton as module

    return module


def _check_triton(x: torch.Tensor, reason: str) -> None:
    from .. import triton_unsupported_reason

    why_not = triton_unsupported_reason(x)
    if why_not is not None:
        raise RuntimeError(f"scattermoe cutlass backend: {reason}, and its Triton fallback cannot run: {why_not}")


def _to_triton(x: torch.Tensor, reason: str):
    if _strict:
        raise NotImplementedError(f"scattermoe cutlass backend (strict mode): {reason}")
    _check_triton(x, reason)
    FALLBACKS[reason] += 1  # counted once the fallback can run
    return _triton()


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
    """See scattermoe.backends.triton.scatter2scatter: same contract, same result; malformed arguments (shapes,
    devices) raise ValueError, before either kernel."""
    check_scatter2scatter_args(x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, row_scale, out,
                               glu, pre_activation)
    num_rows = sorted_scattered_idxs.numel()
    reason = scatter2scatter_fallback_reason(x, w, bias, expert_offsets, num_rows, grouped_in, grouped_out,
                                             row_scale, out, glu, pre_activation)
    if reason is not None:
        return _to_triton(x, reason).scatter2scatter(
            x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, grouped_out,
            row_scale=row_scale, out=out, glu=glu, pre_activation=pre_activation)
    y = out if out is not None else x.new_empty(num_rows, w.size(-1) // 2 if glu else w.size(-1))
    if num_rows == 0:
        return y
    p = _plan(x, w, bias, expert_offsets, num_rows, grouped_in, grouped_out, row_scale, y, glu, pre_activation)
    if isinstance(p, grouped_gemm.GroupedGemmPlan):
        # Grouped in and out: the slot permutation is not needed, expert_offsets alone place the rows.
        return grouped_gemm.launch(p, x, w, bias, expert_offsets, y)
    return scatter_gemm.launch(p, x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in,
                               grouped_out, row_scale, y, pre_activation)


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
    """See scattermoe.backends.triton.group_bwd_w: same contract, same result; malformed arguments raise
    ValueError (TypeError for a wrong dtype), before either kernel."""
    check_group_bwd_w_args(x, dy, sorted_scattered_idxs, expert_offsets, like_weight, x_fan_out, dy_fan_out,
                           x_grouped, dy_grouped, row_scale)
    num_rows = sorted_scattered_idxs.numel()
    p = _not_cuda(x) or wgrad.plan(x, dy, expert_offsets, like_weight, num_rows, row_scale)
    if isinstance(p, str):
        return _to_triton(x, p).group_bwd_w(
            x, dy, sorted_scattered_idxs, expert_offsets, like_weight, x_fan_out, dy_fan_out, x_grouped, dy_grouped,
            row_scale, with_bias)
    dw = torch.empty_like(like_weight)
    db = like_weight.new_empty(like_weight.size(0), like_weight.size(2)) if with_bias else None
    wgrad.launch(p, x, dy, sorted_scattered_idxs, expert_offsets, x_fan_out, dy_fan_out, x_grouped, dy_grouped, dw,
                 row_scale, db)
    return dw, db


def glu_backward(pre: torch.Tensor, dg: torch.Tensor, activate_first: bool, row_scale: Optional[torch.Tensor] = None,
                 store_g: bool = False, store_dot: bool = False):
    """See scattermoe.backends.triton.glu_backward: same contract, same result; malformed arguments raise
    ValueError."""
    check_glu_backward_args(pre, dg, row_scale)
    reason = _not_cuda(pre) or glu_grad.plan(pre, dg)
    if reason is not None:
        return _to_triton(pre, reason).glu_backward(pre, dg, activate_first, row_scale, store_g, store_dot)
    return glu_grad.launch(pre, dg, activate_first, row_scale, store_g, store_dot)


def gather_sum(rows: torch.Tensor, row_of_slot: torch.Tensor, gates: Optional[torch.Tensor], fan_out: int,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See scattermoe.backends.triton.gather_sum: that pass, on both backends (module docstring)."""
    _check_triton(rows, "gather_sum runs on Triton")
    return _triton().gather_sum(rows, row_of_slot, gates, fan_out, out)
