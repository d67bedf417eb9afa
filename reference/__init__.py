"""Pure-PyTorch oracle for every scattermoe op.

Written to be obviously correct (loops over experts and tokens, no fused
kernels), float64-capable, with the same signatures as the fast ops. Every test
compares against it and the ``torch`` backend runs it.
"""

from .ops import (
    flatten_sort_count,
    glu,
    moe_mlp_per_token,
    parallel_linear,
)

__all__ = ["flatten_sort_count", "glu", "moe_mlp_per_token", "parallel_linear"]

IS_SCATTERMOE_REFERENCE = True  # scattermoe checks this: a user's own reference.py on sys.path would shadow us
