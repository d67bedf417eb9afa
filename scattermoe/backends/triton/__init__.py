"""Triton backend: kernels written with triton.jit (run on the CPU under TRITON_INTERPRET=1)."""

from .group_bwd_w import group_bwd_w
from .scatter2scatter import scatter2scatter

__all__ = ["group_bwd_w", "scatter2scatter"]
