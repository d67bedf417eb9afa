"""The original ScatterMoE import path: ``from scattermoe.parallel_experts import ParallelExperts, ...``."""

from .layers import ParallelExperts
from .ops import ParallelLinear, parallel_linear
from .routing import flatten_sort_count

__all__ = ["ParallelExperts", "ParallelLinear", "flatten_sort_count", "parallel_linear"]
