"""The 2024 ScatterMoE ``padded_block_idxs`` argument, accepted and dropped.

Imports nothing from scattermoe, so ``scattermoe.ops`` and ``scattermoe.layers`` can use the
decorator without an import cycle (``scattermoe.kernels.ops`` imports ``scattermoe.ops``).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch


def _is_index_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def accepts_padded_block_idxs(offsets_position: int, legacy_tail: Sequence[str] = ()) -> Callable:
    """Decorator: also accept ScatterMoE 2024's extra ``padded_block_idxs`` argument, and drop it.

    The 2024 calls put it just before ``expert_offsets``: ``f(..., padded_block_idxs, expert_offsets,
    *tail)``. When the positional arguments at ``offsets_position`` and the next are both integer
    tensors, the first is dropped and the ``tail`` is passed by the names ``legacy_tail`` (the
    2024 order of what followed). A ``padded_block_idxs=`` keyword is dropped too.
    ``offsets_position`` counts ``self`` for methods.
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            kwargs.pop("padded_block_idxs", None)
            p = offsets_position
            if (len(args) > p + 1 and _is_index_tensor(args[p]) and _is_index_tensor(args[p + 1])
                    and args[p].dim() == 1 and args[p + 1].dim() == 1):  # both 1-d: not, say, integer gates
                tail = args[p + 2:]
                if len(tail) > len(legacy_tail):
                    raise TypeError(f"{fn.__name__}: too many positional arguments for the padded_block_idxs form")
                args = args[:p] + (args[p + 1],)
                for name, value in zip(legacy_tail, tail):
                    if name in kwargs:
                        raise TypeError(f"{fn.__name__}: got multiple values for argument {name!r}")
                    kwargs[name] = value
            return fn(*args, **kwargs)
        return wrapper
    return wrap
