"""scattermoe: scatter-based Mixture-of-Experts and mixture-of-attention-heads kernels.

    import scattermoe
    moe = scattermoe.GLUMLP(input_size=2048, hidden_size=5632, num_experts=8, top_k=2)
    y = moe(x, expert_p, expert_idxs)          # x [..., D]; expert_p, expert_idxs [..., k]

Backends: ``scattermoe.set_backend("auto" | "triton" | "cutlass" | "torch")``.
"""

from . import backends, kernels, ops, routing
from . import mlp, parallel_experts, utils  # the original ScatterMoE's modules, as attributes as there
from ._validate import set_debug, set_device_asserts
from .backends import get_backend, get_topk_combine, set_backend, set_topk_combine, use_backend, use_topk_combine
from .layers import GLUMLP, MLP, MoA, MoARouting, ParallelExperts
from .ops import glu_moe, parallel_linear, parallel_linear_glu
from .routing import flatten_sort_count, load_balancing_loss, router_z_loss, topk_gating

__version__ = "0.1.0"

__all__ = [
    "GLUMLP", "MLP", "MoA", "MoARouting", "ParallelExperts",
    "backends", "kernels", "mlp", "ops", "parallel_experts", "routing", "utils",
    "flatten_sort_count", "get_backend", "get_topk_combine", "glu_moe", "load_balancing_loss", "parallel_linear",
    "parallel_linear_glu",
    "router_z_loss", "set_backend", "set_debug", "set_device_asserts", "set_topk_combine", "topk_gating",
    "use_backend", "use_topk_combine",
]
