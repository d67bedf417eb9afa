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

from ..._validate import _INDEX_DTYPES, check_tensor, env_flag, flag
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


def _check_rows(name: str, t: torch.Tensor, rows: int, cols: int, device: torch.device) -> None:
    """t [>= rows, cols] on device: what a kernel writes or reads row by row, cols wide, for `rows` rows."""
    check_tensor(name, t, dim=2, device=device)
    if t.size(0) < rows or t.size(1) != cols:
        raise ValueError(f"{name}: expected [>= {rows}, {cols}], got shape {tuple(t.shape)}")


def _check_scatter2scatter_args(x, w, bias, sorted_scattered_idxs, expert_offsets, row_scale, out, glu,
                                pre_activation) -> None:
    """What both backends' kernels index without bounds checks. torch.ops.scattermoe.scatter2scatter(_glu) reach
    here without parallel_linear's checks, and a Triton fallback would read and write past the tensors as the csrc
    kernels would, so a malformed call raises ValueError naming the argument instead of going to either."""
    check_tensor("x", x, dim=2)
    device = x.device
    check_tensor("w", w, dim=3, device=device)
    num_experts, k_in, w_cols = w.shape
    n_out = w_cols // 2 if glu else w_cols
    num_rows = sorted_scattered_idxs.numel()
    if x.size(1) != k_in:
        raise ValueError(f"x: expected [*, {k_in}] (w is {tuple(w.shape)}), got {tuple(x.shape)}")
    check_tensor("sorted_scattered_idxs", sorted_scattered_idxs, dtypes=_INDEX_DTYPES, device=device)
    check_tensor("expert_offsets", expert_offsets, dim=1, dtypes=_INDEX_DTYPES, device=device)
    if expert_offsets.numel() < num_experts:  # the kernels read E ends
        raise ValueError(f"expert_offsets: expected [E={num_experts}], got shape {tuple(expert_offsets.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dim=2, device=device)
        if tuple(bias.shape) != (num_experts, w_cols):
            raise ValueError(f"bias: expected shape {(num_experts, w_cols)}, got {tuple(bias.shape)}")
    if row_scale is not None:
        check_tensor("row_scale", row_scale, device=device)
        if row_scale.numel() < num_rows:  # read by slot, in [0, N)
            raise ValueError(f"row_scale: expected one scale per slot (N={num_rows}), got shape "
                             f"{tuple(row_scale.shape)}")
    if out is not None:
        _check_rows("out", out, num_rows, n_out, device)
    if pre_activation is not None:
        _check_rows("pre_activation", pre_activation, num_rows, w_cols, device)


def _check_glu_backward_args(pre, dg, row_scale) -> None:
    """pre [N, 2F], dg [N, F], row_scale [N] or None on one device: what both backends' GLU backward kernels read
    without bounds checks (torch.ops.scattermoe.glu_backward reaches here unchecked), else ValueError."""
    check_tensor("pre", pre, dim=2)
    num_rows, width = pre.shape
    if width % 2:
        raise ValueError(f"pre: expected [N, 2F], an even width (the GLU's two halves), got shape {tuple(pre.shape)}")
    check_tensor("dg", dg, dim=2, device=pre.device)
    if tuple(dg.shape) != (num_rows, width // 2):
        raise ValueError(f"dg: expected shape {(num_rows, width // 2)} (pre is {tuple(pre.shape)}), "
                         f"got {tuple(dg.shape)}")
    if row_scale is not None:
        check_tensor("row_scale", row_scale, device=pre.device)
        if row_scale.numel() < num_rows:
            raise ValueError(f"row_scale: expected one scale per row (N={num_rows}), got shape "
                             f"{tuple(row_scale.shape)}")


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
    devices) raise ValueError on this backend, before either kernel."""
    _check_scatter2scatter_args(x, w, bias, sorted_scattered_idxs, expert_offsets, row_scale, out, glu,
                                pre_activation)
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
    """See scattermoe.backends.triton.group_bwd_w: same contract, same result."""
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
    _check_glu_backward_args(pre, dg, row_scale)
    reason = _not_cuda(pre) or glu_grad.plan(pre, dg)
    if reason is not None:
        return _to_triton(pre, reason).glu_backward(pre, dg, activate_first, row_scale, store_g, store_dot)
    return glu_grad.launch(pre, dg, activate_first, row_scale, store_g, store_dot)


def gather_sum(rows: torch.Tensor, row_of_slot: torch.Tensor, gates: Optional[torch.Tensor], fan_out: int,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See scattermoe.backends.triton.gather_sum: that pass, on both backends (module docstring)."""
    _check_triton(rows, "gather_sum runs on Triton")
    return _triton().gather_sum(rows, row_of_slot, gates, fan_out, out)
