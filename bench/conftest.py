"""``pytest bench --benchmark-only``: the kernel suite's cases through pytest-benchmark (needs CUDA).

Without CUDA every benchmark is skipped with the reason (they time GPU kernels); the library's
tests are in tests/, and the full suite with result files is ``python -m bench``.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="bench/ times GPU kernels and CUDA is not available")
        for item in items:
            item.add_marker(skip)
