"""The CPU story of the test suite (STYLE.md item 5), and the GPU one.

- Without CUDA, ``TRITON_INTERPRET=1`` is set here (setdefault: an explicit value wins), before anything
  imports scattermoe: Triton fixes interpreter mode when the kernels are defined, so setting it later has
  no effect. The Triton kernels then run on the CPU (slowly: keep their shapes small).
  With CUDA it is left unset: the GPU tests must run the compiled kernels (the interpreter would run them
  on the host, very slowly, and its bf16 dot is wrong), and then the ``interpreter`` cases are skipped.
- Markers: ``gpu`` (skipped, with a reason, when CUDA is absent), ``interpreter`` (small Triton cases
  run on the CPU under TRITON_INTERPRET=1; skipped, with a reason, when the interpreter is off) and
  ``csrc_build`` (needs the compiled csrc module: run last, see ``pytest_collection_modifyitems``).
- Every test is seeded from its node id, so a failure reproduces with the same inputs.
- Shared helpers (tolerances, ``rel_err``, routing generators) live in ``tests/helpers.py``.
"""

import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of scattermoe (see module docstring)
elif os.environ.get("TRITON_INTERPRET", "0") != "1":
    # Pin each kernel's default config on the GPU: the tests check correctness, and autotuning every
    # dtype x flag specialisation would spend minutes compiling. Every config of the autotune space is
    # compiled for sm_90 by test_aot_sm90.py, and the benchmark autotunes. (An explicit value wins.)
    os.environ.setdefault("SCATTERMOE_AUTOTUNE", "0")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from helpers import ...` in every test module

import scattermoe  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason when none is present")
    config.addinivalue_line("markers", "interpreter: small Triton cases run on the CPU under TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "csrc_build: needs the compiled csrc extension; run after every other test")


def pytest_collection_modifyitems(config, items):
    from scattermoe.backends.triton.config import INTERPRET  # the mode the kernels were defined in

    if scattermoe.backends.triton_half_interpreted():
        # A test module set TRITON_INTERPRET at import, after triton was: on a GPU machine every Triton test then
        # failed with "Cannot call @triton.jit'd outside of the scope of a kernel" (the 2026-12-04 H200 run).
        raise pytest.UsageError("TRITON_INTERPRET was set after triton was imported (by a test module?): the "
                                "kernels are interpreted and Triton's own library is not; set it only here")

    # The tests that need the csrc module last (a stable sort: the rest keep their order). Its first build
    # takes minutes, so CI runs it in the background beside the other tests and these wait for it (on the
    # build cache's lock) only at the end; run alone, they build it themselves.
    items.sort(key=lambda item: item.get_closest_marker("csrc_build") is not None)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    skip_interpreter = pytest.mark.skip(reason="Triton interpreter cases: TRITON_INTERPRET=1 is not set")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("interpreter") is not None and not INTERPRET:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seed torch from the test's node id: fresh inputs per test, reproducible per test (crc32, not hash())."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture(autouse=True)
def _restore_backend():
    """A test that changes the backend (or fails inside use_backend) must not leak it into the next test."""
    previous = scattermoe.get_backend()
    yield
    scattermoe.set_backend(previous)


@pytest.fixture
def device(request) -> torch.device:
    """CUDA for tests marked ``gpu`` (skipped without it), the CPU otherwise."""
    if request.node.get_closest_marker("gpu") is not None:
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def plotted_lines(monkeypatch) -> list:
    """The matplotlib lines (Line2D) every Axes.plot call of the test draws, on the Agg backend; skips without
    matplotlib."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    lines = []
    real = Axes.plot

    def spy(self, *args, **kwargs):
        drawn = real(self, *args, **kwargs)
        lines.extend(drawn)
        return drawn

    monkeypatch.setattr(Axes, "plot", spy)
    return lines
