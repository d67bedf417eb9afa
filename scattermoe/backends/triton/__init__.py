"""Triton backend: kernels written with triton.jit (run on the CPU under TRITON_INTERPRET=1)."""

from .gather_sum import gather_sum
from .glu_backward import glu_backward
from .group_bwd_w import group_bwd_w
from .scatter2scatter import scatter2scatter

__all__ = ["gather_sum", "glu_backward", "group_bwd_w", "scatter2scatter"]
