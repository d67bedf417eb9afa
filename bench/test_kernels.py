"""pytest-benchmark view of the kernel suite: ``pytest bench --benchmark-only`` (CUDA only).

The same workloads as ``python -m bench`` (bench/kernels.py) at T=4096 and 16384, uniform routing,
bf16, for every implementation that runs here; pytest-benchmark's wall-clock timing around a
synchronised call (no L2 flush), so prefer ``python -m bench`` for the committed numbers.
"""

from __future__ import annotations

import pytest
import torch

from bench import kernels, run

pytest.importorskip("pytest_benchmark")

CASES = [(shape, mode, T) for T in (4096, 16384) for shape in ("jetmoe_moe", "jetmoe_moa", "finegrained_e64",
                                                                "finegrained_e128", "routing")
         for mode in run.modes_for(kernels.Group(kernels.SHAPES[shape], T))]
_resident: dict = {}


def _workload(shape: kernels.Shape) -> kernels.Workload:
    if shape not in _resident:
        _resident.clear()  # one shape's weights on the GPU at a time
        mm, note = run.setup_grouped_mm(torch.device("cuda"), allow_loop=False)
        _resident[shape] = kernels.Workload(shape, torch.device("cuda"), torch.bfloat16, 0, mm, note.get("unavailable"))
    return _resident[shape]


@pytest.mark.parametrize("impl", kernels.IMPLS + kernels.ROUTING_IMPLS)
@pytest.mark.parametrize("shape_name,mode,T", CASES, ids=[f"{s}_{m}_T{t}" for s, m, t in CASES])
def test_kernel(benchmark, shape_name, mode, T, impl):
    shape = kernels.SHAPES[shape_name]
    if impl not in kernels.impls_for(shape, list(kernels.IMPLS)):
        pytest.skip(f"{impl} does not run {shape_name}")
    group = kernels.Group(shape, T)
    work = _workload(shape)
    sets = kernels.make_inputs(group, 2, torch.device("cuda"), T, dense=impl == "dense_same_flops")
    why = work.unavailable(impl, sets[0].x) or work.mode_unavailable(impl, mode, group.routing)
    if why:
        pytest.skip(why)
    fn, prepare = work.call(impl, sets, mode)
    counter = iter(range(10**9))

    def setup():
        i = next(counter) % len(sets)
        prepare(i)
        torch.cuda.synchronize()  # a backward's forward (prepare) runs outside the timed target
        return (i,), {}

    def target(i):
        fn(i)
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=group.case(mode), tokens=T, impl=impl, flops=kernels.flops(group, mode))
    benchmark.pedantic(target, setup=setup, rounds=10, warmup_rounds=2)
