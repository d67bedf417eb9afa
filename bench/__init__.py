"""Benchmark harness for scattermoe (DESIGN.md sections 6 and 7).

    python -m bench [--out DIR] [--quick]     # needs CUDA; see bench/README.md
    bash bench/gpu_check.sh OUTDIR            # install, all tests on CUDA, then the benchmarks

One file per op (bench_glu_moe.py: the GLU MoE MLP), shared timing and result
writing in harness.py, the torch._grouped_mm baseline in grouped_mm_moe.py.
"""
