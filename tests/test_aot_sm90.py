"""The Triton kernels compile for the H100 (sm_90) under the installed Triton, with no GPU.

For every config of the GPU autotune space: dots lower to wgmma, loads are
pipelined through cp.async, shared memory fits in 227 KiB and nothing spills
(no stack frame, no local memory). A config that spills or falls back to mma
would still run, only slowly; this catches it before a GPU is at hand.
"""

import pytest

from scattermoe.backends.triton import aot
from scattermoe.backends.triton.config import FP32, is_decode_config, space_precisions

FLAG_SETS = {
    "scatter2scatter": [
        # first MoE GEMM: gather token rows, write grouped
        dict(X_GROUPED=False, Y_GROUPED=True, HAS_BIAS=False, HAS_SCALE=False),
        # second MoE GEMM: grouped rows in, gate-scaled scatter out, with bias
        dict(X_GROUPED=True, Y_GROUPED=False, HAS_BIAS=True, HAS_SCALE=True),
    ],
    "scatter2scatter_glu_paired": [
        # first MoE GEMM with the GLU in the epilogue (W K-major), training (pre-activation kept) and inference
        dict(X_GROUPED=False, Y_GROUPED=True, HAS_BIAS=False, HAS_SCALE=False, GLU=1, STORE_PRE=True),
        dict(X_GROUPED=False, Y_GROUPED=True, HAS_BIAS=True, HAS_SCALE=False, GLU=2, STORE_PRE=False),
    ],
    "scatter2scatter_glu": [
        # the same with W F-major (two accumulators), training (pre-activation kept) and inference
        dict(X_GROUPED=False, Y_GROUPED=True, HAS_BIAS=False, HAS_SCALE=False, GLU=1, STORE_PRE=True),
        dict(X_GROUPED=False, Y_GROUPED=True, HAS_BIAS=True, HAS_SCALE=False, GLU=2, STORE_PRE=False),
    ],
    "group_bwd_w": [
        # the first GEMM's dW in expert index order (JetMoE, E=8), the gated one largest expert first (E >= 16)
        dict(X_GROUPED=False, DY_GROUPED=True, HAS_BIAS=False, HAS_SCALE=False, EXPERT_ORDER=False),
        dict(X_GROUPED=True, DY_GROUPED=False, HAS_BIAS=True, HAS_SCALE=True, EXPERT_ORDER=True),
    ],
}

CASES = [
    (kernel, config, dtype, flags)
    for kernel in FLAG_SETS
    for config in aot.autotune_space(kernel)
    for dtype in ("bf16", "fp16")
    for flags in FLAG_SETS[kernel]
]


@pytest.fixture(scope="module")
def reports():
    return aot.compile_in_subprocess(CASES)  # one process for all cases: ~10 s


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{k}-{'x'.join(map(str, c))}-{d}-{i % 2}" for i, (k, c, d, _) in enumerate(CASES)])
def test_compiles_to_pipelined_wgmma_without_spills(reports, case):
    report = reports[case]
    assert (report.kernel, report.config) == CASES[case][:2]
    if not is_decode_config(report.config):  # 16-row decode tiles use mma.sync: wgmma needs 64 rows
        assert report.wgmma, f"dot did not lower to wgmma: {report}"
    assert report.pipelined, f"loads are not pipelined with cp.async: {report}"
    assert report.shared_bytes <= aot.H100_SHARED_BYTES, f"shared memory over the H100 limit: {report}"
    assert report.stack_bytes == 0 and report.local_bytes == 0, f"registers spill: {report}"


# float32 operands go to the "<kernel>_fp32" autotuners (config.py), whose configs are tagged with the input
# precisions they are for. Each is compiled at each of its precisions, with the flag set that needs the most
# registers in float32 (checked over both sets under Triton 3.6 and 3.9, 2026-12-03: bench/NOTES.md), to keep this
# to ~30 compiles. No wgmma is asserted: an ieee dot runs on FMA, and a tf32 one with fewer than 64 rows on mma.
FP32_FLAGS = {"scatter2scatter": 1, "scatter2scatter_glu_paired": 1, "scatter2scatter_glu": 1, "group_bwd_w": 1}
FP32_CASES = [
    (kernel + FP32, config, "fp32", dict(FLAG_SETS[kernel][FP32_FLAGS[kernel]], INPUT_PRECISION=precision))
    for kernel in FLAG_SETS
    for config, precisions in space_precisions(kernel + FP32).items()
    for precision in precisions
]


@pytest.fixture(scope="module")
def fp32_reports():
    return aot.compile_in_subprocess(FP32_CASES)


@pytest.mark.parametrize("case", range(len(FP32_CASES)), ids=[
    f"{k}-{'x'.join(map(str, c))}-{f['INPUT_PRECISION']}" for k, c, _, f in FP32_CASES])
def test_float32_configs_compile_without_spills(fp32_reports, case):
    report = fp32_reports[case]
    assert (report.kernel, report.config) == FP32_CASES[case][:2]
    assert report.pipelined, f"loads are not pipelined with cp.async: {report}"
    assert report.shared_bytes <= aot.H100_SHARED_BYTES, f"shared memory over the H100 limit: {report}"
    assert report.stack_bytes == 0 and report.local_bytes == 0, f"registers spill: {report}"


def test_float32_default_configs_serve_both_precisions():
    # SCATTERMOE_AUTOTUNE=0 pins the first config of a space, and a pinned config is never pruned: it must be one
    # that compiles without spills under ieee and tf32 alike.
    for kernel in FLAG_SETS:
        first = aot.autotune_space(kernel + FP32)[0]
        assert space_precisions(kernel + FP32)[first] == ("ieee", "tf32"), kernel


def test_routing_kernels_compile_without_spills():
    # The one-launch counting sort and top-k gating (backends/triton/routing.py), at their launch sizes.
    reports = aot.compile_in_subprocess("routing")
    assert len(reports) == 14
    for name, shared, registers, stack, local in reports:
        assert shared <= aot.H100_SHARED_BYTES, name
        assert stack == 0 and local == 0, f"{name}: registers spill ({registers} registers, stack {stack})"


def test_paired_glu_runs_one_full_width_wgmma_where_two_accumulators_run_two_half_width_ones(reports):
    """Why the K-major GLU kernel interleaves the halves' columns: its default tile (128 x 128 columns, 64 output
    columns) issues m64n128k16, reading the X tile from shared memory once per 128 columns; the two-accumulator
    default (128 x 64 columns of each half) issues m64n64k16 twice, reading it twice."""
    def default(kernel):
        return next(r for r, (k, c, d, _) in zip(reports, CASES) if k == kernel and c == aot.autotune_space(kernel)[0]
                    and d == "bf16")
    assert default("scatter2scatter_glu_paired").wgmma_shapes == ("m64n128k16",)
    assert default("scatter2scatter_glu").wgmma_shapes == ("m64n64k16",)


def test_gather_sum_reads_and_writes_16_byte_vectors_without_spills():
    # The "gather" top-k combine (backends/triton/gather_sum.py): its row loads are gathered by index, and still
    # must be 16-byte vectors (v4.b32 = 8 bf16) along D, or the pass would not run at the bandwidth it is counted at.
    reports = aot.compile_in_subprocess("gather_sum")
    assert len(reports) == 4
    for name, registers, stack, local, loads, stores in reports:
        assert stack == 0 and local == 0, f"{name}: registers spill ({registers} registers, stack {stack})"
        assert "ld.global.v4.b32" in loads, f"{name}: row loads are not 16-byte vectors: {loads}"
        assert stores == ["st.global.v4.b32"], f"{name}: stores are not 16-byte vectors: {stores}"


def test_int64_column_variant_compiles_to_wgmma_without_spills():
    # The variant for operands whose column offsets pass int32 (config.int64_columns: a column-major out or X),
    # at each kernel's default config: rare, but it must still compile and not spill.
    cases = [(kernel, aot.autotune_space(kernel)[0], "bf16", dict(flags[-1], INT64_COLS=True))
             for kernel, flags in FLAG_SETS.items()]
    for report in aot.compile_in_subprocess(cases):
        assert report.wgmma and report.pipelined, report
        assert report.stack_bytes == 0 and report.local_bytes == 0, f"registers spill: {report}"

