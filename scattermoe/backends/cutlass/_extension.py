"""Finding and probing the csrc extension ``scattermoe._C`` without ever failing an import.

The extension is optional: a pure-Python install has none, and a machine without a GPU
or driver has one whose CUDA calls all fail. Both are reported as a reason string that
``unsupported_reason`` passes on, never as an ImportError at ``import scattermoe``.

``SCATTERMOE_CSRC_MODULE=/path/to/_C<suffix>.so`` loads a module built outside the
package (``python csrc/build.py --out build/csrc``), for development and the tests.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Optional, Tuple

CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
# The README's steps; -e, as the README installs the package (a plain `.` would replace an editable install).
BUILD_HINT = (f"build it with `pip install pybind11 && pip install --no-deps {CUTLASS_PIN}`, then "
              "`SCATTERMOE_BUILD_CUDA=1 pip install --no-build-isolation -e .` (needs nvcc, CUDA >= 12.3)")


def _load_from_path(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("scattermoe._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"SCATTERMOE_CSRC_MODULE={path!r} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["scattermoe._C"] = module
    return module


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) or (None, why it is not available). Cached: one attempt per process."""
    path = os.environ.get("SCATTERMOE_CSRC_MODULE")
    try:
        module = _load_from_path(path) if path else importlib.import_module("scattermoe._C")
    except (ImportError, OSError) as e:  # not built, built for another Python, or a missing file
        where = f" (SCATTERMOE_CSRC_MODULE={path!r})" if path else ""
        return None, f"{type(e).__name__}: {e}{where}"
    if not hasattr(module, "cuda_probe"):  # another module, or an extension older than this package
        return None, f"{module.__file__} is not this version's csrc extension (it has no cuda_probe)"
    return module, None


@functools.lru_cache(maxsize=None)
def probe() -> dict:
    """The extension's view of CUDA: cudaGetDeviceCount's status and the device count (cached)."""
    module, _ = load()
    if module is None:
        return {"error": None, "device_count": 0}
    return dict(module.cuda_probe())


def cuda_error_code(message: str) -> Optional[int]:
    """The CUDA error number in a scattermoe._C.CudaError message ('... (CUDA error 35) ...')."""
    match = re.search(r"CUDA error (\d+)", message)
    return int(match.group(1)) if match else None


def unavailable_reason() -> Optional[str]:
    """Why no csrc kernel can run in this process at all (extension or CUDA missing), else None."""
    module, error = load()
    if module is None:
        return f"the csrc extension scattermoe._C is not built in this install ({error}); {BUILD_HINT}"
    status = probe()
    if status["error"]:
        return (f"CUDA is unusable: cudaGetDeviceCount failed with {status['error_name']} "
                f"(CUDA error {status['error']}: {status['error_string']}); no GPU or no NVIDIA driver here")
    if status["device_count"] == 0:
        return "no CUDA GPU is visible (cudaGetDeviceCount returned 0)"
    return None
