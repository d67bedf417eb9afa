"""Launch configurations of the Triton kernels, in the open.

On the GPU each kernel autotunes over a small space aimed at the H100 (num_warps 4
or 8 so dots lower to wgmma; 128x128x64 at 4 warps spills, so big tiles get 8
warps). ``SCATTERMOE_AUTOTUNE=0`` pins the first (default) config for
reproducible runs. float32 operands get spaces of their own (the 16-bit tiles spill
there), pruned to the launch's input precision. Under ``TRITON_INTERPRET=1`` a single small config is used:
the interpreter runs every program in Python, and autotuning there would only
multiply the time.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..._validate import env_flag
from .. import triton_interpret_knob

# Whether the kernels, defined on import, are interpreted.
INTERPRET = triton_interpret_knob()
AUTOTUNE = env_flag("SCATTERMOE_AUTOTUNE", default=True)

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
    # GLU with W K-major (the layers' forward): one accumulator whose BLOCK_N columns interleave the two
    # halves, BLOCK_N / 2 output columns per program; one BLOCK_N-wide wgmma per k step (m64n128k16).
    "scatter2scatter_glu_paired": [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
        # (128, 256, 64, 8, 3) would issue m64n256k16 but needs 255 registers and spills (24 bytes of stack, fp16).
    ],
    # GLU with W F-major (interleaved columns would not vectorise): two accumulators per program, so
    # half-width tiles (BLOCK_N columns of each half), two half-width wgmmas per k step.
    # (128, 128, 64, 8, 3) is left out: 255 registers here (the cap; it spilled in an earlier version).
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
# float32 operands: the tiles above are sized for 16-bit ones and spill (AOT for sm_90: group_bwd_w 11-21 KB of stack
# per thread with bias and gates, scatter2scatter 255 registers; bench/NOTES.md). An ieee dot runs on FMA (no tensor
# core multiplies ieee fp32) and holds whole operand slices in registers: small BLOCK_K. A tf32 dot runs on wgmma with
# the operands staged in fp32, twice the shared memory of bf16 (128x256x64 at 3 stages no longer fits). Each config
# is tagged with the precisions it compiles for without spills; prune_by_precision keeps those of the launch's
# INPUT_PRECISION, and the first, the default SCATTERMOE_AUTOTUNE=0 pins, serves both. The launchers send float32
# to the "<kernel>_fp32" autotuners, so the 16-bit spaces and kernels are untouched.
_BOTH, _TF32 = ("ieee", "tf32"), ("tf32",)
_FP32_SPACES = {
    "scatter2scatter": [
        ((128, 64, 32, 8, 3), _BOTH),
        ((64, 64, 64, 4, 4), _BOTH),
        ((128, 128, 64, 8, 3), _TF32),  # ieee: 255 registers and a stack
    ],
    "scatter2scatter_glu_paired": [
        ((128, 64, 32, 8, 3), _BOTH),
        ((64, 64, 32, 4, 4), _BOTH),
        ((128, 128, 64, 8, 3), _TF32),
    ],
    "scatter2scatter_glu": [
        ((64, 64, 32, 8, 3), _BOTH),
        ((128, 64, 32, 8, 3), _BOTH),
        ((128, 64, 64, 8, 3), _TF32),
    ],
    # ieee with bias or gates spills from 32x64x64 up (the row sum and the scaling of dY in the FMA dot's layout).
    "group_bwd_w": [
        ((16, 64, 64, 8, 3), _BOTH),
        ((32, 32, 32, 8, 3), _BOTH),
        ((64, 128, 128, 8, 3), _TF32),
    ],
}
FP32 = "_fp32"  # suffix of the float32 autotuners' space names

# Decode (few routed rows) is bound by reading the weights, so what counts is enough programs to
# keep every SM streaming them: 16-row tiles (mma.sync: wgmma needs 64 rows per warpgroup) and
# narrow columns. JetMoE at T=1, k=2: the second GEMM gets 2 x cdiv(2048, 32) = 128 programs
# instead of 2 x 16 with 128-column tiles, the GLU first GEMM 2 x 176 instead of 2 x 88.
# They join the autotune space only for row counts up to DECODE_MAX_ROWS (prune_by_rows).
_DECODE_SPACES = {
    "scatter2scatter": [
        (16, 32, 128, 4, 4),
        (16, 64, 128, 4, 4),
    ],
    "scatter2scatter_glu": [
        (16, 32, 128, 4, 4),
    ],
    "scatter2scatter_glu_paired": [
        (16, 64, 128, 4, 4),  # 32 output columns, as the two-accumulator decode tile
    ],
    "group_bwd_w": [],
}
DECODE_MAX_ROWS = 256
_INTERPRETER_CONFIG = (32, 32, 32, 4, 1)


def gpu_space(kernel: str) -> list:
    """Every (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the GPU autotuner may pick for a kernel
    (``"<kernel>_fp32"``: for float32 operands, either precision)."""
    if kernel.endswith(FP32):
        base = kernel[:-len(FP32)]
        return [config for config, _ in _FP32_SPACES[base]] + list(_DECODE_SPACES[base])
    return list(_SPACES[kernel]) + list(_DECODE_SPACES[kernel])


def space_precisions(kernel: str) -> dict:
    """{config: the input precisions it is for} of a kernel's GPU space (16-bit spaces: "ieee", what they launch)."""
    if kernel.endswith(FP32):
        base = kernel[:-len(FP32)]
        return {**dict(_FP32_SPACES[base]), **{config: _BOTH for config in _DECODE_SPACES[base]}}
    return {config: ("ieee",) for config in gpu_space(kernel)}


def is_decode_config(config: tuple) -> bool:
    return any(config in space for space in _DECODE_SPACES.values())


def _as_tuple(config: "triton.Config") -> tuple:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)


def prune_by_rows(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune pruning: the decode configs only for up to DECODE_MAX_ROWS routed rows (M_BUCKET)."""
    rows = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
    if rows is None or rows <= DECODE_MAX_ROWS:
        return configs
    kept = [c for c in configs if not is_decode_config(_as_tuple(c))]
    return kept or configs


def pruner(kernel: str):
    """The autotuner's early_config_prune for a kernel's space: prune_by_rows, then, for float32, the configs of
    the launch's INPUT_PRECISION (a tf32-only config would spill under ieee)."""
    precisions = space_precisions(kernel)

    def prune(configs: list, named_args: dict, **kwargs) -> list:
        configs = prune_by_rows(configs, named_args, **kwargs)
        precision = named_args.get("INPUT_PRECISION", kwargs.get("INPUT_PRECISION"))
        kept = [c for c in configs if precision in precisions.get(_as_tuple(c), (precision,))]
        return kept or configs
    return prune


def autotune_configs(kernel: str) -> list:
    if INTERPRET:
        space = [_INTERPRETER_CONFIG]
    elif AUTOTUNE:
        space = gpu_space(kernel)
    else:
        space = gpu_space(kernel)[:1]
    return [make_config(c) for c in space]


def make_config(config: tuple) -> "triton.Config":
    m, n, k, w, s = config
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)


def on_tensor_device(launcher):
    """Run a launcher with its first tensor argument's GPU current. Triton launches on the current device and
    stream, not the tensors' (a model split over GPUs, e.g. device_map="auto", has layers on other devices)."""
    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is not None and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)
    return wrapper


def input_precision(dtype: torch.dtype) -> str:
    # Only float32 operands look at this; IEEE by default so fp32 results meet the 1e-5 bound.
    return "tf32" if ALLOW_TF32 and dtype == torch.float32 else "ieee"


def int64_columns(*columns: tuple) -> bool:
    """Whether a kernel must compute its column offsets (column index x column stride) in int64.

    They are int32 otherwise: row offsets are int64 already, and a unit column stride is the JIT's constant 1,
    so the int32 column offsets of the usual layouts are free, where int64 ones cost registers and instructions
    (up to 13 more registers, 255 at the 128x256 tile; bench/NOTES.md). But int32 wraps once an operand with a
    non-unit column stride spans 2^31 elements (a column-major `out` or X from kernels.ops). ``columns`` are
    (size, stride) of each operand's column dimensions; a tile's column offsets run up to 256 past the size
    (masked, still computed), hence the margin.
    """
    return any((size + 256) * abs(stride) >= 2**31 for size, stride in columns)


def pow2_bucket(n: int) -> int:
    """Autotune key for the row count: a new T reuses the tuning of its power-of-two bucket."""
    return triton.next_power_of_2(max(int(n), 1))


def num_row_tiles_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """sum_e cdiv(count_e, BLOCK_M) <= cdiv(N, BLOCK_M) + E: the grid, known without reading counts.

    The kernel recomputes this same bound for its launch order: keep the two equal.
    """
    return triton.cdiv(num_rows, block_m) + num_experts
