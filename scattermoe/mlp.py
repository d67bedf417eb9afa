"""The original ScatterMoE import path: ``from scattermoe.mlp import MLP, GLUMLP``."""

from .layers import GLUMLP, MLP

__all__ = ["GLUMLP", "MLP"]
