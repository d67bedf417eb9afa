"""Backend choice: which implementation runs the kernels of scattermoe.ops.

Names: ``auto`` (default), ``triton``, ``cutlass``, ``torch`` (the pure-PyTorch
reference). Set with ``set_backend(name)``, ``with use_backend(name):`` or the
``SCATTERMOE_BACKEND`` environment variable. ``auto`` picks, per call, the
fastest backend that supports the device and dtype: Triton on CUDA (the csrc
kernels instead, for bf16/fp16, on the GPUs in ``CUTLASS_PREFERRED_DEVICES``); on the
CPU the reference, or Triton when ``TRITON_INTERPRET=1`` was set before import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import sys
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "cutlass", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_name(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _env_word(name: str) -> str:
    """A word-valued environment variable read as the switches are (_validate.env_flag): any case, surrounding
    spaces ignored, set but empty as unset ("")."""
    return (os.environ.get(name) or "").strip().lower()


_current = _check_name(_env_word("SCATTERMOE_BACKEND") or "auto", "the environment variable SCATTERMOE_BACKEND")


def set_backend(name: str) -> None:
    """Select the backend for all later calls (see module docstring for names).

    The choice is process-wide, as is ``use_backend``'s: on CUDA, autograd runs backward (and the recompute of
    activation checkpointing) on its own threads, which must see the backend the forward ran on, so the
    choice is deliberately not per thread. Threads that need different backends at the same time should not
    share a process."""
    global _current
    _current = _check_name(name)


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block on another backend, then restore the previous one.

    Process-wide like ``set_backend`` (see there why): a generator that yields inside the block leaves the choice in
    force in its caller while it is suspended, as ``torch.no_grad`` does; choose the backend around the whole
    loop instead. A backward runs on the backend its forward ran on, wherever it is called."""
    global _current
    previous, _current = _current, _check_name(name)
    try:
        yield
    finally:
        _current = previous


# How the K rows of a token become its output on the kernel backends (DESIGN.md 4: try both; NOTES.md 19 and 23).
#   scatter: the GEMM applies the gates in its epilogue (fp32) and stores each row at its slot t*K + j; a sum
#            over K follows (the default).
#   gather:  the GEMM stores its rows grouped by expert and ungated (on the cutlass backend with grouped input,
#            GLUMLP's second GEMM and MoA's reduce, the grouped GEMM's TMA stores); one pass per token then
#            gathers its K rows, applies the gates in fp32 and sums them.
# The same bytes either way; which is faster is for the benchmark's *_gather rows to say. With K = 1 both are
# the scatter (there is nothing to sum). The torch backend ignores the choice.
TOPK_COMBINES = ("scatter", "gather")


def _check_combine(mode: str, what: str = "mode") -> str:
    if mode not in TOPK_COMBINES:
        raise ValueError(f"{what}: expected one of {', '.join(TOPK_COMBINES)}, got {mode!r}")
    return mode


_combine = _check_combine(_env_word("SCATTERMOE_TOPK_COMBINE") or "scatter",
                          "the environment variable SCATTERMOE_TOPK_COMBINE")


def set_topk_combine(mode: str) -> None:
    """How the kernel backends sum each token's K expert rows: "scatter" (default) or "gather" (see above).
    Process-wide, like ``set_backend``; also ``SCATTERMOE_TOPK_COMBINE``."""
    global _combine
    _combine = _check_combine(mode)


def get_topk_combine() -> str:
    return _combine


@contextlib.contextmanager
def use_topk_combine(mode: str) -> Iterator[None]:
    """Run the enclosed block with another top-k combine, then restore the previous one."""
    global _combine
    previous, _combine = _combine, _check_combine(mode)
    try:
        yield
    finally:
        _combine = previous


def _version_tuple(dist: str) -> Optional[tuple]:
    """(major, minor) of an installed distribution, read without importing it; None if absent."""
    try:
        return tuple(int(v) for v in importlib.metadata.version(dist).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run here (numpy missing or too new), or None."""
    if importlib.util.find_spec("numpy") is None:
        return "the Triton CPU interpreter needs numpy, which is not installed (pip install \"numpy<2.4\")"
    triton_version, numpy_version = _version_tuple("triton"), _version_tuple("numpy")
    # Triton 3.6's interpreter does int() of a 1-element array, an error from numpy 2.4 on (3.7.1 is fixed).
    if triton_version is not None and numpy_version is not None and triton_version < (3, 7) and numpy_version >= (2, 4):
        return (f"the Triton {importlib.metadata.version('triton')} CPU interpreter breaks with numpy "
                f"{importlib.metadata.version('numpy')} (pip install \"numpy<2.4\")")
    return None


# Found once at import (a few ms of metadata reads), so that compiled code only reads a constant.
_INTERPRETER_PROBLEM = interpreter_problem()


def triton_interpret_knob() -> bool:
    """TRITON_INTERPRET read as Triton reads it (its knob: 1, true, yes, on...); a stricter reading here once sent
    TRITON_INTERPRET=true to the torch backend."""
    import triton

    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else \
        os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter (False without Triton: nothing to interpret)."""
    if not triton_importable():
        return False
    # Triton fixes interpreter mode when the kernels are defined: once they are, their config's reading holds.
    # Before, the knob itself, so that choosing `auto` on the CPU reads none of the Triton backend's own
    # switches (a bad SCATTERMOE_AUTOTUNE must not fail the torch backend's ops).
    config = sys.modules.get(f"{__name__}.triton.config")
    return config.INTERPRET if config is not None else triton_interpret_knob()


def triton_half_interpreted() -> bool:
    """The kernels are (or would be) defined for the interpreter while Triton's own jitted library (tl.zeros,
    tl.sum...) was not: TRITON_INTERPRET was set after triton was imported (torch may import it). Such kernels
    fail at their first library call ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    if not _triton_interpreting():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(tl.zeros, InterpretedFunction)


def _probe_triton() -> bool:
    try:  # an import, not find_spec: a broken install must fall back to torch, not fail at the first launch
        import triton  # noqa: F401
    except Exception:
        return False
    return True


# Probed once, at import (~0.3 s, the import of Triton): a constant from then on, so torch.compile guards on a
# value that never changes. (A lazy probe needed torch.compiler.assume_constant_result, whose import of
# torch._dynamo cost every `import scattermoe` ~2 s.)
_TRITON_IMPORTABLE: bool = _probe_triton()


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_unsupported_reason(x: torch.Tensor):
    """Why the Triton kernels cannot run on x, or None if they can."""
    if not triton_importable():
        return "triton is not installed (pip install triton)"
    if x.dtype not in _TRITON_DTYPES:
        return f"the triton backend supports float16, bfloat16 and float32, not {x.dtype}"
    if triton_half_interpreted():
        return ("TRITON_INTERPRET was set after triton was imported: the kernels would be interpreted and Triton's "
                "own library would not, which cannot run (set it before anything imports triton or torch, or not "
                "at all)")
    if x.device.type == "cuda":
        return None
    if x.device.type != "cpu":
        return f"the triton backend runs on CUDA (or the CPU interpreter), not on {x.device.type}"
    if not _triton_interpreting():
        return "the triton backend on the CPU needs TRITON_INTERPRET=1 set before scattermoe is imported"
    if _INTERPRETER_PROBLEM is not None:
        return _INTERPRETER_PROBLEM
    if x.dtype == torch.bfloat16:
        # triton-lang/triton#11584: the interpreter's tl.dot multiplies bf16 bit patterns.
        return "bfloat16 under the Triton interpreter gives wrong results upstream (triton-lang/triton#11584)"
    return None


def cutlass_unsupported_reason(x: torch.Tensor):
    """Why the csrc (CUTLASS) kernels cannot run on x, or None if they can."""
    from .cutlass import unsupported_reason

    return unsupported_reason(x)


# The GPUs (torch.cuda.get_device_name) on which ``auto`` runs bf16/fp16 on the csrc kernels: those where a
# committed benchmark result (bench/results/) has scattermoe_cutlass faster than scattermoe_triton on the
# headline case (GLUMLP forward + backward at the JetMoE-8B shape, T=16384, bf16). None: on the H200 it was
# 0.37x Triton (bench/results/2026-12-04_h200_71ca4da.json, bench/NOTES.md Outcomes).
CUTLASS_PREFERRED_DEVICES: frozenset = frozenset()


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _auto_prefers_cutlass(x: torch.Tensor) -> bool:
    if not CUTLASS_PREFERRED_DEVICES or x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _device_name(index) in CUTLASS_PREFERRED_DEVICES and cutlass_unsupported_reason(x) is None


def resolve(x: torch.Tensor) -> str:
    """The concrete backend ('triton', 'cutlass' or 'torch') that runs an op on x now."""
    name = _current
    if name == "auto":
        if triton_unsupported_reason(x) is not None:
            return "torch"
        return "cutlass" if _auto_prefers_cutlass(x) else "triton"
    reason = {"triton": triton_unsupported_reason, "cutlass": cutlass_unsupported_reason}.get(name, lambda _: None)(x)
    if reason is not None:
        raise RuntimeError(f"scattermoe backend {name!r} cannot run here: {reason}")
    return name


def kernels(name: str):
    """The kernel module of a concrete backend: scatter2scatter and group_bwd_w launchers."""
    if name == "triton":
        from . import triton as module
    elif name == "cutlass":
        from . import cutlass as module
    else:
        raise RuntimeError(f"scattermoe backend {name!r} has no kernels")
    return module
