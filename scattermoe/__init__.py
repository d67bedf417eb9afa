"""scattermoe: scatter-based Mixture-of-Experts and mixture-of-attention-heads kernels.

    import scattermoe
    moe = scattermoe.GLUMLP(input_size=2048, hidden_size=5632, num_experts=8, top_k=2)
    y = moe(x, expert_p, expert_idxs)          # x [..., D]; expert_p, expert_idxs [..., k]

Backends: ``scattermoe.set_backend("auto" | "triton" | "cutlass" | "torch")``.
"""

import reference as _reference

if not getattr(_reference, "IS_SCATTERMOE_REFERENCE", False):  # installed top level beside scattermoe, by that name
    raise ImportError(f"scattermoe: `import reference` found {getattr(_reference, '__file__', None) or _reference!r}, "
                      "not scattermoe's pure-PyTorch reference (the torch backend): another reference module earlier "
                      "on sys.path (e.g. a reference.py beside your script) shadows it; rename that one")

from . import backends, kernels, ops, routing  # (after the check: they import reference)
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
