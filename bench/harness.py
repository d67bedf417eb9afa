"""What every benchmark here shares: timing, memory, the run's environment, and result files.

Timing (DESIGN.md section 7): CUDA events around each call, a warm-up first, the L2
flushed before every timed call (a read of a buffer of max(256 MB, 4 x L2)), inputs
rotated over several sets, every repeat kept. The number of repeats adapts to the
time one call takes, within [min_rep, max_rep], so a slow provider does not eat
the run's time budget.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the result table."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- hangs

HANG_EXIT = 3  # python -m bench's exit status when HangWatch ended it


class HangWatch:
    """Ends the process when one watched step has run longer than ``limit_s``.

    A kernel that never finishes (a never-run csrc kernel waiting on a barrier that never completes) leaves the
    host in a CUDA synchronize forever, and nothing in the process can stop it: the GPU protocol's hard timeout
    would then kill the run with nothing written for the group under way or any after it. A thread polls the
    step under way; past the limit it calls ``on_hang(impl, what)`` (write what there is) and ends the process
    with HANG_EXIT, so the caller can run again without that implementation (``--skip-impls``). The synchronize
    calls release the GIL, so the thread runs while the main thread waits on the device. One lock orders the two:
    a step that ends while the thread is deciding waits (and the process ends) before the main thread goes on to
    change the results the thread is writing, or starts another step the hang would be blamed on.
    """

    def __init__(self, limit_s: float, on_hang: Callable[[str, str], None], exit: Callable[[int], None] = os._exit):
        self.limit_s, self.on_hang, self._exit = limit_s, on_hang, exit
        self._step: Optional[tuple] = None  # (impl, what, started)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @contextlib.contextmanager
    def watch(self, impl: str, what: str):
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="bench-hang-watch", daemon=True)
            self._thread.start()
        with self._lock:
            self._step = (impl, what, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._step = None

    def stop(self) -> None:
        """End the thread (the run is over: nothing more to watch)."""
        self._stopped.set()

    def _poll(self) -> None:
        period = min(0.5, self.limit_s / 5)
        while not self._stopped.wait(period):
            with self._lock:
                step = self._step
                if step is None or time.monotonic() - step[2] <= self.limit_s:
                    continue
                impl, what, _ = step
                log(f"[bench] HUNG: {impl}: {what} has not finished after {self.limit_s:g} s (--hang-s); "
                    f"writing the results so far and ending the run (exit status {HANG_EXIT})")
                try:
                    self.on_hang(impl, what)
                except BaseException as exc:  # the exit below must happen whatever the writing does
                    log(f"[bench] writing the results after the hang failed: {type(exc).__name__}: {exc}")
                sys.stdout.flush()
                self._exit(HANG_EXIT)
                return


# ---------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one (case, provider): repeats = target_s / (ms per call), clamped."""
    warmup: int = 3  # calls after the first (which compiles / autotunes and is timed apart)
    target_s: float = 0.75
    min_rep: int = 5
    max_rep: int = 100


def quantiles(times_ms: List[float]) -> Dict[str, float]:
    xs = sorted(times_ms)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"min": xs[0], "p10": q(0.1), "p20": q(0.2), "median": q(0.5), "p80": q(0.8), "p90": q(0.9),
            "max": xs[-1], "mean": sum(xs) / len(xs)}


class Timer:
    """Times ``fn(i)`` (i = index of the input set to use) on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = None
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 0)
            # 256 MB as triton.testing.do_bench uses, or more on a GPU with a larger L2.
            self._flush = torch.zeros(max(256 << 20, 4 * l2), dtype=torch.int8, device=device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        # Read, not write (triton's do_bench zeroes its buffer): a write leaves up to an L2 of dirty lines that
        # the timed call would then write back to HBM, ~10 us at T=1, where the decode target's floor is ~40 us.
        if self._flush is not None:
            torch.amax(self._flush, dim=0)  # a full read of the buffer; the 1-element result is dropped

    def measure(self, fn: Callable[[int], object], n_sets: int, plan: TimingPlan,
                prepare: Callable[[int], None] = lambda i: None) -> Dict:
        """Raw per-call times in ms plus the first call's time (compile, autotune) and the plan used.

        ``prepare(i)`` runs on the host before the call on input set i, outside the timed window
        (e.g. dropping .grad so backward allocates instead of accumulating, or running the
        forward whose backward is timed).
        """
        prepare(0)
        self.sync()
        t0 = time.perf_counter()
        fn(0)
        self.sync()
        first_ms = (time.perf_counter() - t0) * 1e3

        t0 = time.perf_counter()
        for w in range(plan.warmup):
            i = (w + 1) % n_sets
            prepare(i)
            fn(i)
        self.sync()
        est_ms = (time.perf_counter() - t0) * 1e3 / plan.warmup if plan.warmup else first_ms
        n_rep = int(min(plan.max_rep, max(plan.min_rep, math.ceil(plan.target_s * 1e3 / max(est_ms, 1e-3)))))

        times: List[float] = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(n_rep)]
            for r, (start, end) in enumerate(events):
                prepare(r % n_sets)
                self.flush_l2()
                # The host waits out the flush: else it queues fn's launches while the GPU still flushes, and an
                # eager call's host cost (launch-bound at small T) hides behind the flush instead of being timed.
                self.sync()
                start.record()
                fn(r % n_sets)
                end.record()
            self.sync()
            times = [start.elapsed_time(end) for start, end in events]
        else:  # CPU smoke run only: wall clock, meaningless as a benchmark
            for r in range(n_rep):
                prepare(r % n_sets)
                t0 = time.perf_counter()
                fn(r % n_sets)
                times.append((time.perf_counter() - t0) * 1e3)
        prepare(0)
        return {"times_ms": times, "quantiles_ms": quantiles(times), "first_call_ms": first_ms,
                "warmup": plan.warmup, "repeats": n_rep, "input_sets": n_sets}

    def peak_memory(self, fn: Callable[[int], object], prepare: Callable[[int], None] = lambda i: None) -> Dict:
        """One call's memory, in GB (10^9 bytes): ``peak_mem_gb`` the peak allocated during it (weights,
        inputs and what a forward kept included), ``extra_gb`` that peak above what was allocated
        before it, ``held_gb`` what stays allocated while its result is alive (for a training
        forward: the activations kept for backward, plus the output), ``prepared_gb`` what
        ``prepare`` allocated for it (a timed backward's forward activations)."""
        if not self.cuda:
            return {"peak_mem_gb": None, "extra_gb": None, "held_gb": None, "prepared_gb": None}
        gc.collect()
        self.sync()
        before_prepare = torch.cuda.memory_allocated(self.device)
        prepare(0)
        gc.collect()
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        # What prepare left allocated for the call: a timed backward's forward activations (for other modes ~0,
        # or below 0 where it dropped the last call's gradients).
        prepared = max(base - before_prepare, 0)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn(0)
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        held = torch.cuda.memory_allocated(self.device) - base
        # A call that returns nothing (a timed backward) keeps no result: what it frees (the forward's
        # saved activations) would read as a negative "held", so there is no held figure for it.
        held_gb = held / 1e9 if out is not None else None
        del out
        prepare(0)
        return {"peak_mem_gb": peak / 1e9, "extra_gb": (peak - base) / 1e9, "held_gb": held_gb,
                "prepared_gb": prepared / 1e9}


# ---------------------------------------------------------------- environment


def _run(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Dict:
    """The checkout's commit, or 'unknown' where the copy has no .git (the GPU image may not)."""
    full = os.environ.get("BENCH_COMMIT") or _run(["git", "rev-parse", "HEAD"])
    if not full:
        return {"commit": "unknown", "short": "unknown", "dirty": None}
    if os.environ.get("BENCH_DIRTY") in ("dirty", "clean"):  # recorded with BENCH_COMMIT where there is no .git
        return {"commit": full, "short": full[:7], "dirty": os.environ["BENCH_DIRTY"] == "dirty"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": full, "short": full[:7], "dirty": bool(status) if status is not None else None}


def _nvidia_smi() -> Dict:
    fields = ["driver_version", "name", "clocks.max.sm", "clocks.max.mem", "power.limit", "persistence_mode"]
    if not shutil.which("nvidia-smi"):
        return {}
    out = _run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
    if not out:
        return {}
    first = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(fields, first, strict=False))  # a short answer leaves fields out


def _nvcc_version() -> Optional[str]:
    if not shutil.which("nvcc"):
        return None
    out = _run(["nvcc", "--version"])
    return out.splitlines()[-1] if out else None


def environment(device: torch.device) -> Dict:
    """Device, driver and software versions, commit, date and the env vars that change what runs."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import scattermoe

    env = {
        "date": _dt.date.today().isoformat(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvcc": _nvcc_version(),
        "scattermoe": getattr(scattermoe, "__version__", None),
        "git": git_commit(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("SCATTERMOE_", "TRITON_", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF"))},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _nvidia_smi()
        env["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(int(getattr(props, "L2_cache_size", 0) or 0) / 2**20, 1) or None,
            "driver": smi.pop("driver_version", None),
            "nvidia_smi": smi,
        }
        env["matmul"] = {
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "allow_bf16_reduced_precision_reduction":
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        }
    else:
        env["device"] = {"name": "cpu", "processor": platform.processor() or platform.machine(),
                         "threads": torch.get_num_threads()}
    return env


# Datasheet peaks per device: dense bf16 tensor-core FLOP/s (no sparsity) and HBM bytes/s. Matched on whole words
# of torch.cuda.get_device_name, first match wins ("GH200" is not an "H200": its variants differ, so no roofline).
DEVICE_LIMITS = (
    ("gh200", None),
    ("h200 nvl", {"label": "H200 NVL (datasheet)", "bf16_flops": 835e12, "hbm_bytes_s": 4.8e12}),
    ("h200", {"label": "H200 (datasheet)", "bf16_flops": 989e12, "hbm_bytes_s": 4.8e12}),
    ("h100 nvl", {"label": "H100 NVL (datasheet)", "bf16_flops": 835e12, "hbm_bytes_s": 3.9e12}),
    ("h100 pcie", {"label": "H100 PCIe (datasheet)", "bf16_flops": 756e12, "hbm_bytes_s": 2.0e12}),
    ("h100", {"label": "H100 SXM (datasheet)", "bf16_flops": 989e12, "hbm_bytes_s": 3.35e12}),
)


def device_limits(name: str) -> Optional[Dict]:
    """The datasheet limits of a device named like torch.cuda.get_device_name, or None if unknown."""
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    for key, limits in DEVICE_LIMITS:
        if all(part in words for part in key.split()):
            return dict(limits) if limits is not None else None
    return None


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------- result files


def result_basename(env: Dict, suffix: str = "") -> str:
    """<YYYY-MM-DD>_<device-slug>_<short-commit>[suffix], as DESIGN.md section 6 names result files."""
    return f"{env['date']}_{device_slug(env['device']['name'])}_{env['git']['short']}{suffix}"


def unique_basename(out_dir: Path, base: str) -> str:
    """base, or base-2, base-3, ... so a second run the same day does not overwrite the first."""
    name, n = base, 2
    while (out_dir / f"{name}.json").exists():
        name, n = f"{base}-{n}", n + 1
    return name


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a run killed mid-write leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, payload: Dict) -> None:
    write_text(path, json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def markdown_table(header: List[str], rows: List[List[str]], align: Optional[List[str]] = None) -> str:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cutlass_fallbacks() -> Dict[str, int]:
    """The cutlass backend's per-piece count of calls routed to Triton so far (empty without it)."""
    try:
        from scattermoe.backends.cutlass import FALLBACKS
    except Exception:
        return {}
    return dict(FALLBACKS)


def fallbacks_since(before: Dict[str, int]) -> List[str]:
    """The pieces routed to Triton since ``before = cutlass_fallbacks()`` (what a cutlass row did not run on csrc)."""
    after = cutlass_fallbacks()
    return sorted(k for k in after if after[k] > before.get(k, 0))


# Model-level logits checks (bench --e2e, bench.bench_hf_patch). A random model at full width is chaotic in
# bf16: top-k routing flips on near-ties and attention spreads the flipped tokens, so transformers' own bf16
# logits are far from its float32 ones (JetMoE, 4 blocks, 256 tokens: 0.31 relative on the CPU; two bf16
# implementations 0.19-0.24 apart on the H200, 2026-12-04). A fixed bf16 bound between two bf16 runs fails
# correct code. So the reference is the float32 model on the same weights (bf16 -> float32 is exact), and a
# low-precision implementation passes when it is no further from it than transformers' own low-precision run,
# with margin: a real bug (wrong expert, wrong gate) lands near 1.0 or beyond.
LOGITS_TOL = 2e-2
LOGITS_RATIO = 1.5
LOGITS_TOL_FP32 = 1e-3  # float32 against float32 (no chaos to speak of at that precision)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32 (NaN anywhere gives NaN, which fails every bound)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def logits_bound(own_err: float) -> float:
    """The bound for a low-precision implementation's logits against the float32 model's, given the reference
    implementation's own error in that precision (0 in float32)."""
    return LOGITS_TOL + LOGITS_RATIO * own_err
