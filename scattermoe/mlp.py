"""The original ScatterMoE import path: ``from scattermoe.mlp import MLP, GLUMLP`` (and the names its mlp.py
imported, ``ParallelExperts`` and ``flatten_sort_count``)."""

from .layers import GLUMLP, MLP, ParallelExperts
from .routing import flatten_sort_count

__all__ = ["GLUMLP", "MLP", "ParallelExperts", "flatten_sort_count"]
