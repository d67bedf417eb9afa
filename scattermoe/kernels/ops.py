"""ScatterMoE's kernel module, ``scattermoe.kernels.ops``, kept signature for signature.

Legend: T tokens, K experts per token (fan-out), N = T*K routed rows, E experts,
D input features, F output features. Weights are passed ``[E, D, F]`` here (the
original's convention: ``ParallelExperts.weight.permute(0, 2, 1)``).

Two generations of this module are in use (shawntan/scattermoe, 2024 and 0.3.0 of 2025):

- 2024: ``scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, k, padded_block_idxs,
  x_grouped=False, y_grouped=False, out=None)``; ``group_bwd_W(DY, X, expert_offsets, E)`` returns dW;
  routing from ``flatten_and_sort`` + ``padded_block_indices``.
- 0.3.0: ``scatter2scatter(X, W, sorted_expert_idxs, sorted_scattered_idxs, k, b=None,
  x_grouped=False, y_grouped=False, out=None)``; ``group_bwd_W(DY, X, expert_offsets, E, has_bias=False)``
  returns ``(dW, db)``.

Both are accepted: the sixth argument of ``scatter2scatter`` is told apart by dtype (an
integer tensor is the old block index list, which this library does not need; a float
tensor is the bias), and ``group_bwd_W`` returns the pair exactly when ``has_bias`` is
passed. Like the original kernels these functions are not differentiable; the
differentiable ops are ``scattermoe.parallel_linear`` and the layers.

``ALLOW_TF32`` is this module's attribute and the Triton kernels' switch at once:
``scattermoe.kernels.ops.ALLOW_TF32 = True`` sets
``scattermoe.backends.triton.config.ALLOW_TF32``, read at every launch. Its default is
this library's (False: IEEE fp32), not the original's (True since 0.3.0).
"""

from __future__ import annotations

import sys
import types
from typing import Optional, Tuple, Union

import torch

import reference

from .. import backends
from .. import ops as _ops  # may be partly initialised here (scattermoe.ops can import this module); used at call time
from .._validate import (_FLOAT_DTYPES, _INDEX_DTYPES, check_expert_idxs, check_expert_offsets_values,
                         check_index_range, check_not_meta, check_out, check_parallel_linear, check_tensor, flag,
                         positive_int)
from ._compat import _is_index_tensor, accepts_padded_block_idxs

__all__ = [  # noqa: F822 (ALLOW_TF32 is a property of the module class below)
    "ALLOW_TF32", "BLOCK_M", "accepts_padded_block_idxs", "flatten_and_sort", "group", "group_bwd_W",
    "padded_block_indices", "parallel_experts_forward", "parallel_linear", "scatter2scatter",
]

# The original's row-tile size; only ``padded_block_indices`` uses it (this library's kernels need no padding).
BLOCK_M = 128

_UNSET = object()


def _offsets_from_sorted(sorted_expert_idxs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """expert_offsets [E] (end of each expert's rows) from the sorted expert ids, without a host sync."""
    bounds = torch.arange(num_experts, device=sorted_expert_idxs.device, dtype=sorted_expert_idxs.dtype)
    return torch.searchsorted(sorted_expert_idxs, bounds, right=True)


# ----------------------------------------------------------------------------- routing (2024 API)

def flatten_and_sort(expert_idxs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """expert_idxs [T, K] -> (sorted_expert_idxs [N], sorted_scattered_idxs [N]), stable.

    ``sorted_scattered_idxs[i]`` is the slot t*K + j of the i-th row in expert order.
    """
    check_tensor("expert_idxs", expert_idxs, dtypes=_INDEX_DTYPES)
    return torch.sort(expert_idxs.flatten(), stable=True)


def padded_block_indices(sorted_experts_idxs: torch.Tensor, k: int,
                         N_BLOCK_SIZE: int = BLOCK_M) -> Tuple[torch.Tensor, torch.Tensor]:
    """(padded_block_idxs, expert_offsets) of the 2024 API; ``k`` is the number of experts there.

    padded_block_idxs [sum_e cdiv(count_e, N_BLOCK_SIZE)]: first row of every N_BLOCK_SIZE-row
    block of each expert's rows; expert_offsets [E]: end of each expert's rows. This library's
    kernels read only ``expert_offsets``; the block list is computed for code that inspects it.
    """
    k = positive_int("k (the number of experts)", k)
    N_BLOCK_SIZE = positive_int("N_BLOCK_SIZE", N_BLOCK_SIZE)
    check_expert_idxs(sorted_experts_idxs, k)
    counts = torch.bincount(sorted_experts_idxs.flatten(), minlength=k)
    expert_offsets = counts.cumsum(-1)
    blocks = (counts + N_BLOCK_SIZE - 1) // N_BLOCK_SIZE
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), blocks)
    first_block = blocks.cumsum(-1) - blocks
    block_in_expert = torch.arange(owner.numel(), device=counts.device) - first_block[owner]
    padded_block_idxs = (expert_offsets - counts)[owner] + N_BLOCK_SIZE * block_in_expert
    return padded_block_idxs, expert_offsets  # both int64 (bincount's), as the 2024 code returned them


# ----------------------------------------------------------------------------- kernels

def _shares_memory(out: torch.Tensor, *inputs: Optional[torch.Tensor]) -> bool:
    """Whether out lives in the same storage as any input (conservatively: any overlap of storages)."""
    ptr = out.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs)


def scatter2scatter(
    X: torch.Tensor,
    W: torch.Tensor,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    k: int,
    b: Optional[torch.Tensor] = None,
    x_grouped: bool = False,
    y_grouped: bool = False,
    out: Optional[torch.Tensor] = None,
    *,
    padded_block_idxs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Y = X W_e (+ b_e) over the N routed rows, on the current backend (not differentiable).

    X: [T, D] gathered by slot // k, or with ``x_grouped`` [N, D] in expert order (then k=1).
    W: [E, D, F]; b: [E, F] or None. In the 2024 signature the sixth argument is
    ``padded_block_idxs`` (an integer tensor): accepted and ignored, as is the keyword.
    Returns Y [N, F] in X's dtype (expert order if ``y_grouped``, else slot order), written
    into ``out`` when given.
    """
    del padded_block_idxs  # the 2024 block list: not needed, rows are located from the expert offsets
    if _is_index_tensor(b):  # 2024 positional layout: (..., k, padded_block_idxs, x_grouped, y_grouped, out)
        b = None
    # The offsets are computed before the full check below: what they read is checked first.
    check_tensor("W", W, dim=3)
    check_tensor("sorted_expert_idxs", sorted_expert_idxs, dim=1, dtypes=_INDEX_DTYPES, device=W.device)
    expert_offsets = _offsets_from_sorted(sorted_expert_idxs, W.size(0))
    check_parallel_linear(X, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, b, None,
                          x_grouped, y_grouped)
    if out is not None:
        check_out(out, (sorted_scattered_idxs.numel(), W.size(-1)), X)
    backend = backends.resolve(X)
    with torch.no_grad():
        if backend == "torch":
            y = reference.parallel_linear(X, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, b,
                                          None, x_grouped, y_grouped)
        elif out is not None and _shares_memory(out, X, W, b):
            # The kernels write rows while other programs still read X: an out over the inputs gets a
            # temporary, as the torch backend always does.
            y = backends.kernels(backend).scatter2scatter(X, W, b, sorted_scattered_idxs, expert_offsets, k,
                                                          x_grouped, y_grouped)
        else:
            return backends.kernels(backend).scatter2scatter(
                X, W, b, sorted_scattered_idxs, expert_offsets, k, x_grouped, y_grouped, out=out)
        return out.copy_(y) if out is not None else y


def group(A: torch.Tensor, sorted_expert_idxs: torch.Tensor, coeff: Optional[torch.Tensor] = None,
          fan_out: int = 1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of A gathered into expert order: Y[i] = A[idx[i] // fan_out] (* coeff[idx[i]]).

    A: [T, D]; ``sorted_expert_idxs`` is, despite the original's name, the [N] slot list
    (``sorted_scattered_idxs``); coeff: [N] per slot or None. Returns [N, D] (into ``out`` if given).
    This library never materialises grouped copies, so it has no kernel for this: one torch gather.
    """
    idxs = sorted_expert_idxs
    check_tensor("A", A, dim=2)
    check_tensor("sorted_expert_idxs", idxs, dim=1, dtypes=_INDEX_DTYPES, device=A.device)
    fan_out = positive_int("fan_out", fan_out)
    if A.size(0) * fan_out != idxs.numel():
        raise ValueError(f"A: expected {idxs.numel() // fan_out} rows (N / fan_out), got {A.size(0)}")
    check_index_range("sorted_expert_idxs", idxs, idxs.numel(), "slot ids")
    if coeff is not None:
        check_tensor("coeff", coeff, dtypes=_FLOAT_DTYPES, device=A.device)
        if coeff.numel() != idxs.numel():
            raise ValueError(f"coeff: expected one value per slot (N={idxs.numel()}), got shape {tuple(coeff.shape)}")
    if out is not None:
        check_out(out, (idxs.numel(), A.size(1)), A)
    with torch.no_grad():
        y = A.index_select(0, torch.div(idxs, fan_out, rounding_mode="floor"))
        if coeff is not None:
            y = y * coeff.reshape(-1)[idxs].unsqueeze(-1).to(y.dtype)
        return out.copy_(y) if out is not None else y


def group_bwd_W(DY: torch.Tensor, X: torch.Tensor, expert_offsets: torch.Tensor, E: int,
                has_bias=_UNSET) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Per-expert weight gradient dW_e = X_e^T DY_e over rows already in expert order.

    DY: [N, F], X: [N, D], expert_offsets: [E]. dW is [E, D, F], stored as [E, F, D]
    (``dW.permute(0, 2, 1)`` is contiguous, the ``ParallelExperts.weight`` layout), as the
    original. Returns dW (2024 signature, ``has_bias`` not passed) or ``(dW, db)`` with
    db [E, F] = per-expert row sums of DY, or None when ``has_bias`` is False (0.3.0).
    """
    with_bias = flag("has_bias", has_bias) if has_bias is not _UNSET else False
    check_tensor("X", X, dim=2, dtypes=_FLOAT_DTYPES)
    check_not_meta("X", X)  # (the torch backend reads the offsets' values)
    check_tensor("DY", DY, dim=2, dtypes=(X.dtype,), device=X.device)
    if DY.size(0) != X.size(0):
        raise ValueError(f"DY, X: expected [N, F] and [N, D] with the same N, "
                         f"got {tuple(DY.shape)} and {tuple(X.shape)}")
    E = positive_int("E", E)
    check_tensor("expert_offsets", expert_offsets, dim=1, dtypes=_INDEX_DTYPES, device=X.device)
    if expert_offsets.numel() != E:
        raise ValueError(f"expert_offsets: expected [E={E}], got shape {tuple(expert_offsets.shape)}")
    check_expert_offsets_values(expert_offsets, X.size(0))
    like_weight = DY.new_empty(E, DY.size(-1), X.size(-1)).permute(0, 2, 1)
    backend = backends.resolve(X)
    with torch.no_grad():
        if backend == "torch":
            dw, db = torch.zeros_like(like_weight), (DY.new_zeros(E, DY.size(-1)) if with_bias else None)
            start = 0
            for e, end in enumerate(expert_offsets.tolist()):
                dw[e] = X[start:end].t() @ DY[start:end]
                if db is not None:
                    db[e] = DY[start:end].sum(0)
                start = end
        else:
            rows = torch.arange(DY.size(0), device=DY.device)  # both operands grouped: slot i is row i
            dw, db = backends.kernels(backend).group_bwd_w(X, DY, rows, expert_offsets, like_weight, 1, 1, True, True,
                                                           None, with_bias)
    return dw if has_bias is _UNSET else (dw, db)


# ----------------------------------------------------------------------------- ALLOW_TF32

def _triton_config():
    try:
        from ..backends.triton import config
    except ImportError:  # no triton: keep the switch here, nothing reads it
        return None
    return config


_allow_tf32_without_triton = False


class _KernelOpsModule(types.ModuleType):
    """Makes ``ALLOW_TF32`` a live view of the Triton kernels' switch (read and written there)."""

    @property
    def ALLOW_TF32(self) -> bool:
        config = _triton_config()
        return bool(config.ALLOW_TF32) if config is not None else _allow_tf32_without_triton

    @ALLOW_TF32.setter
    def ALLOW_TF32(self, value: bool) -> None:
        global _allow_tf32_without_triton
        value = flag("ALLOW_TF32", value)  # "no" would otherwise turn TF32 on
        config = _triton_config()
        if config is not None:
            config.ALLOW_TF32 = value
        _allow_tf32_without_triton = value


sys.modules[__name__].__class__ = _KernelOpsModule


# ----------------------------------------------------------------------------- the 2024 padded_block_idxs argument

@accepts_padded_block_idxs(5, ("gates", "grouped_in", "grouped_out"))
def parallel_linear(*args, **kwargs) -> torch.Tensor:
    """``scattermoe.parallel_linear`` that also takes the 2024 form
    ``parallel_linear(inputs, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs,
    padded_block_idxs, expert_offsets, gates=None, grouped_in=False, grouped_out=False)``."""
    return _ops.parallel_linear(*args, **kwargs)


@accepts_padded_block_idxs(5, ("gates", "grouped_in", "grouped_out"))
def parallel_experts_forward(module, *args, **kwargs) -> torch.Tensor:
    """``module.forward`` of a ``scattermoe.ParallelExperts`` in either form, e.g. the 2024
    ``forward(inputs, k, sorted_expert_idxs, sorted_scattered_idxs, padded_block_idxs, expert_offsets,
    gates=None, grouped_in=False, grouped_out=False)``."""
    return module.forward(*args, **kwargs)
