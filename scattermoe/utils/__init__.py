"""The original ScatterMoE's ``scattermoe.utils``: ``import scattermoe.utils.replace_moe`` patches transformers.

Nothing is patched until ``replace_moe`` itself is imported (the original patched on ``import scattermoe``).
"""
