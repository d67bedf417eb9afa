"""The CUTLASS/CuTe sm_90a scatter GEMM (csrc/scatter_gemm/) wrapped for torch tensors.

Legend: N routed rows (T*k), E experts, K input features, F output features.

    for row r in expert order (expert e, slot s = sorted_scattered_idxs[r]):
        h = x[r if grouped_in else s // fan_out] @ w[e] (+ bias[e])
        y[r if grouped_out else s] = act(h) (* gates[s])      act: identity, or the SiLU GLU of h = [a | b]
        pre[r if grouped_out else s] = h                        (GLU only, when pre is given)

scatter2scatter for every grouped_in / grouped_out combination: token rows gathered on load
(cp.async; W by cp.async too, or by TMA with ``set_weight_tma()``), result rows scattered on
store, bias, the GLU and gates in the epilogue. Expert boundaries come from ``expert_offsets`` on
the device (no host sync, no workspace). ``plan`` decides from host metadata alone whether the
kernel takes a call; the caller falls back to Triton when it cannot.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Iterator, Optional, Union

import torch

from ..._validate import env_flag
from . import _extension
from .grouped_gemm import (ALIGN_ELEMENTS, DTYPES, INT32_MAX, _sm_count, int32_fan_out, row_stride, rows_ok,
                           sizes_reason, weight_layout)

# Which scatter GEMM kernel runs: False, one CTA per tile (the default); True, the persistent kernel on
# one CTA per SM; an int, the persistent kernel on that many CTAs (tests use a few, so that each CTA
# loops over many tiles). Both are built; which is faster is for the first GPU benchmark to say
# (bench's scattermoe_cutlass_persistent rows), so the reviewed one-CTA-per-tile kernel stays the default.
_persistent: Union[bool, int] = env_flag("SCATTERMOE_CUTLASS_PERSISTENT")


def set_persistent(ctas: Union[bool, int] = True) -> None:
    """Run the csrc scatter GEMM as the persistent kernel (True: one CTA per SM; an int: that many CTAs)
    or, with False, as one CTA per tile. Also ``SCATTERMOE_CUTLASS_PERSISTENT=1`` (a switch, read as
    ``_validate.env_flag`` reads them: on means one CTA per SM; the variable does not take a count)."""
    global _persistent
    if isinstance(ctas, bool):
        _persistent = ctas
    elif isinstance(ctas, int) and ctas >= 1:
        _persistent = ctas
    else:
        raise ValueError(f"set_persistent: expected True, False or a positive CTA count, got {ctas!r}")


@contextlib.contextmanager
def _temporarily(setter: Callable[[object], None], current: Callable[[], object], value: object) -> Iterator[None]:
    """``setter(value)`` inside the block, the setting ``current()`` gave on entry after it."""
    previous = current()
    setter(value)
    try:
        yield
    finally:
        setter(previous)


def persistent(ctas: Union[bool, int] = True) -> ContextManager[None]:
    """``set_persistent(ctas)`` inside the block, the previous setting after it."""
    return _temporarily(set_persistent, lambda: _persistent, ctas)


# How the scatter GEMM loads W: False, by cp.async like the gathered X (the default); True, by TMA (one
# producer thread issues each stage's boxes; issue 3's "TMA for the weight operand"). Same values in the same
# shared memory either way, so the outputs are equal bit for bit; which is faster is for a GPU run to say
# (bench's scattermoe_cutlass_tma rows). Where the driver cannot describe W as a tensor map, the kernel
# falls back to cp.async by itself; last_weight_load says what the last launch did.
_weight_tma: bool = env_flag("SCATTERMOE_CUTLASS_WEIGHT_TMA")
last_weight_load: Optional[str] = None  # "tma" or "cp.async": the last scatter GEMM launch's W loads


def set_weight_tma(enabled: bool = True) -> None:
    """Load the csrc scatter GEMM's weight tiles by TMA (True) or by cp.async (False, the default). Also
    ``SCATTERMOE_CUTLASS_WEIGHT_TMA=1``."""
    global _weight_tma
    if not isinstance(enabled, bool):
        raise ValueError(f"set_weight_tma: expected True or False, got {enabled!r}")
    _weight_tma = enabled


def weight_tma(enabled: bool = True) -> ContextManager[None]:
    """``set_weight_tma(enabled)`` inside the block, the previous setting after it."""
    return _temporarily(set_weight_tma, lambda: _weight_tma, enabled)


def num_ctas(device_index: int) -> int:
    """The scatter GEMM's num_ctas argument: 0 (one CTA per tile) or the persistent kernel's CTA count."""
    if _persistent is False:
        return 0
    # The kernel runs min(num_ctas, tiles) CTAs with tiles < 2^31, so a larger count is the same launch.
    return _sm_count(device_index) if _persistent is True else min(int(_persistent), INT32_MAX)


@dataclasses.dataclass(frozen=True)
class ScatterGemmPlan:
    """Host-side arguments of ``scattermoe._C.scatter_gemm`` except pointers and stream."""

    dtype: str
    w_k_major: bool
    stride_we: int
    stride_w_ld: int
    num_experts: int
    num_rows: int
    k_in: int
    n_out: int  # columns of y: w's columns, or half of them with glu
    glu: int = 0


def plan(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], expert_offsets: torch.Tensor,
         num_rows: int, out: Optional[torch.Tensor] = None, glu: int = 0,
         pre_activation: Optional[torch.Tensor] = None) -> Union[ScatterGemmPlan, str]:
    """A plan, or a string naming why the scatter GEMM cannot take these tensors.

    x [T or N, K] row-major with 16-byte aligned rows (cp.async), K a multiple of 8; w [E, K, F]
    (with ``glu``, [E, K, 2F]) with a unit stride along K or F (F a multiple of 8 when along F);
    out [N or T*k, F] and pre_activation [N or T*k, 2F] with a unit column stride (any row stride:
    rows are stored with 16-byte stores where aligned, element by element where not).
    """
    if x.dtype not in DTYPES:
        return f"dtype {str(x.dtype).replace('torch.', '')}: the csrc scatter GEMM is built for bfloat16 and float16"
    if w.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "mixed dtypes: x, w and bias must share one dtype"
    if out is not None and (out.dtype != x.dtype or out.stride(-1) != 1):
        return "out must have x's dtype and a unit column stride"
    if pre_activation is not None and (pre_activation.dtype != x.dtype or pre_activation.stride(-1) != 1):
        return "pre_activation must have x's dtype and a unit column stride"
    num_experts, k_in, w_cols = w.shape
    if glu not in (0, 1, 2) or (glu and w_cols % 2):
        return f"glu={glu} with {w_cols} weight columns: expected glu 0, 1 or 2 and an even width"
    n_out = w_cols // 2 if glu else w_cols
    if num_rows > INT32_MAX:
        return f"{num_rows} rows: more than the kernel's 32-bit row count"
    sizes = sizes_reason(num_experts, k_in, w_cols)
    if sizes:
        return sizes
    if k_in % ALIGN_ELEMENTS:
        return f"K={k_in}: cp.async copies 16 bytes, so K must be a multiple of {ALIGN_ELEMENTS}"
    if not rows_ok(x):
        return f"x (strides {x.stride()}) is not row-major with 16-byte aligned, non-overlapping rows"
    if w.stride(1) != 1 and w.stride(2) == 1 and n_out % ALIGN_ELEMENTS:
        return f"F={n_out}: an F-major w is copied 16 bytes at a time along F, so F must be a multiple of 8"
    layout = weight_layout(w)
    if isinstance(layout, str):
        return layout
    w_k_major, ld, stride_we = layout
    if out is not None and row_stride(out) < n_out:
        return f"out (strides {out.stride()}) has overlapping rows (an expanded tensor)"
    if pre_activation is not None and row_stride(pre_activation) < w_cols:
        return f"pre_activation (strides {pre_activation.stride()}) has overlapping rows (an expanded tensor)"
    if bias is not None and bias.stride(-1) != 1:
        return "bias must have a unit column stride"
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        return f"expert_offsets dtype {expert_offsets.dtype}: expected int32 or int64"
    return ScatterGemmPlan(DTYPES[x.dtype], w_k_major, stride_we, ld, num_experts, num_rows, k_in, n_out, glu)


def launch(p: ScatterGemmPlan, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
           sorted_scattered_idxs: torch.Tensor, expert_offsets: torch.Tensor, fan_out: int,
           grouped_in: bool, grouped_out: bool, row_scale: Optional[torch.Tensor], y: torch.Tensor,
           pre_activation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Enqueue the scatter GEMM on the current stream of x's device, writing y (and pre_activation). No host sync."""
    module, error = _extension.load()
    if module is None:
        raise RuntimeError(f"scattermoe cutlass backend: {error}")
    idx = sorted_scattered_idxs.to(torch.int64).contiguous()
    offsets = expert_offsets.contiguous()
    gates = row_scale.reshape(-1).to(torch.float32).contiguous() if row_scale is not None else None
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    global last_weight_load
    used_tma = module.scatter_gemm(
        dtype=p.dtype, w_k_major=p.w_k_major,
        x=x.data_ptr(), stride_xm=row_stride(x), x_rows=x.size(0),
        w=w.data_ptr(), stride_we=p.stride_we, stride_w_ld=p.stride_w_ld,
        bias=bias.data_ptr() if bias is not None else 0, stride_be=bias.stride(0) if bias is not None else 0,
        y=y.data_ptr(), stride_ym=row_stride(y), y_rows=y.size(0),
        gates=gates.data_ptr() if gates is not None else 0,
        sorted_scattered_idxs=idx.data_ptr(), expert_offsets=offsets.data_ptr(),
        offsets_int64=offsets.dtype == torch.int64, x_grouped=grouped_in, y_grouped=grouped_out,
        fan_out=1 if grouped_in else int32_fan_out(fan_out, p.num_rows), num_experts=p.num_experts, num_rows=p.num_rows,
        k_in=p.k_in, n_out=p.n_out, glu=p.glu,
        pre=pre_activation.data_ptr() if pre_activation is not None else 0,
        stride_pm=row_stride(pre_activation) if pre_activation is not None else 0,
        pre_rows=pre_activation.size(0) if pre_activation is not None else 0, num_ctas=num_ctas(device),
        w_tma=_weight_tma, device=device, stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
    last_weight_load = "tma" if used_tma else "cp.async"
    return y
