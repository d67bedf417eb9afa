"""The original ScatterMoE import path: ``from scattermoe.parallel_experts import ParallelExperts, ...``."""

from .kernels.ops import parallel_linear as _parallel_linear_any_form
from .layers import ParallelExperts
from .ops import parallel_linear
from .routing import flatten_sort_count

__all__ = ["ParallelExperts", "ParallelLinear", "flatten_sort_count", "parallel_linear"]


class ParallelLinear:
    """The original's autograd Function, called the way its users call it:
    ``ParallelLinear.apply(x, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
    expert_biases=None, gates=None, grouped_in=False, grouped_out=False)`` (0.3.0), or the 2024 form with
    ``padded_block_idxs`` before ``expert_offsets`` and no biases. Differentiable, like ``parallel_linear``
    (this library's Function is ``scattermoe.ops.ParallelLinear``, with its own argument order).
    """

    apply = staticmethod(_parallel_linear_any_form)
