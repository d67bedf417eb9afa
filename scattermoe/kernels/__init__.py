"""The original ScatterMoE kernel-level import path: ``from scattermoe.kernels import ops``.

``scattermoe.kernels.ops`` keeps every published signature of ScatterMoE's kernel module
(``scatter2scatter``, ``group``, ``group_bwd_W``, ``flatten_and_sort``,
``padded_block_indices``, the ``ALLOW_TF32`` switch) as thin wrappers over this library's
backends, and ``scattermoe.kernels.single`` 0.3.0's ``single2scatter``; nothing here holds a kernel of its own.
"""

from . import ops, single

__all__ = ["ops", "single"]
