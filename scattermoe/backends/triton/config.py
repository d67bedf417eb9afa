"""Launch configurations of the Triton kernels, in the open.

On the GPU each kernel autotunes over a small space aimed at the H100 (num_warps 4
or 8 so dots lower to wgmma; 128x128x64 at 4 warps spills, so big tiles get 8
warps). ``SCATTERMOE_AUTOTUNE=0`` pins the first (default) config for
reproducible runs. Under ``TRITON_INTERPRET=1`` a single small config is used:
the interpreter runs every program in Python, and autotuning there would only
multiply the time.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("SCATTERMOE_AUTOTUNE", "1") != "0"

# Honoured by every kernel for float32 inputs (ScatterMoE's switch; kernels.ops.ALLOW_TF32 forwards here).
ALLOW_TF32 = False

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first entry is the default.
_SPACES = {
    "scatter2scatter": [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ],
    # GLU: two accumulators per program, so half-width tiles (BLOCK_N columns of each half).
    # (128, 128, 64, 8, 3) spills here (255 registers, checked by tests/test_aot_sm90.py).
    "scatter2scatter_glu": [
        (128, 64, 64, 8, 3),
        (128, 64, 64, 8, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 8, 3),
    ],
    # group_bwd_w tiles the [K_IN, N_OUT] weight gradient; BLOCK_M is the reduction step over rows.
    "group_bwd_w": [
        (64, 128, 128, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 4),
        (128, 128, 128, 8, 3),
    ],
}
_INTERPRETER_CONFIG = (32, 32, 32, 4, 1)


def autotune_configs(kernel: str) -> list:
    if INTERPRET:
        space = [_INTERPRETER_CONFIG]
    elif AUTOTUNE:
        space = _SPACES[kernel]
    else:
        space = _SPACES[kernel][:1]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in space
    ]


def input_precision(dtype: torch.dtype) -> str:
    # Only float32 operands look at this; IEEE by default so fp32 results meet the 1e-5 bound.
    return "tf32" if ALLOW_TF32 and dtype == torch.float32 else "ieee"


def pow2_bucket(n: int) -> int:
    """Autotune key for the row count: a new T reuses the tuning of its power-of-two bucket."""
    return triton.next_power_of_2(max(int(n), 1))


def num_row_tiles_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """sum_e cdiv(count_e, BLOCK_M) <= cdiv(N, BLOCK_M) + E: the grid, known without reading counts.

    The kernel recomputes this same bound for its launch order: keep the two equal.
    """
    return triton.cdiv(num_rows, block_m) + num_experts
