"""Build of the csrc extension ``scattermoe._C`` (DESIGN.md section 3b), importable by setup.py.

Torch-free on purpose: the module is a plain pybind11 extension with the CUDA runtime
linked statically, compiled by nvcc (kernels, sm_90a) and the host C++ compiler
(bindings), so it builds on a machine with nvcc and no GPU, against no torch at all, and
imports there (its CUDA calls then raise ``CudaError``: cudaErrorInsufficientDriver).
``torch.utils.cpp_extension.CUDAExtension`` is not used: it does not build against the
CPU torch, and a build against a CUDA torch is tied to that torch's ABI.

Switches (environment):
  SCATTERMOE_BUILD_CUDA  1: build, fail if nvcc / CUTLASS / pybind11 are missing;
                         0: skip (pure-Python install);
                         unset or empty: build when nvcc, the CUTLASS headers and pybind11 are found.
  MAX_JOBS               parallel compiler processes (default: min(cores, free GiB / 4); each
                         CUTLASS translation unit peaks at ~3.4 GB).
  NVCC_THREADS           nvcc --threads (default 1: one gencode target, nothing to split).
  CUDA_HOME              CUDA toolkit root (default: from nvcc on PATH, else /usr/local/cuda).
  SCATTERMOE_CUTLASS_INCLUDE  CUTLASS include dir (default: the nvidia-cutlass wheel's).

setup.py hook::

    sys.path.insert(0, os.path.join(HERE, "csrc"))
    from build import cuda_cmdclass, cuda_extensions
    setup(..., ext_modules=cuda_extensions(), cmdclass=cuda_cmdclass())

Standalone (CI, tests, development): ``python csrc/build.py --out build/csrc`` writes
``build/csrc/scattermoe/_C<suffix>`` plus the ptxas logs (see ``build()``);
``python csrc/build.py --cache build/csrc-cache`` builds once per source version (what the
tests reuse). ``SCATTERMOE_CSRC_MODULE=<path to _C.so>`` makes the cutlass backend load it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Optional, Tuple

CSRC = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "scattermoe._C"
# The CUTLASS the kernels are written and checked against (its wheel ships the headers).
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
# sm_90a only: wgmma / TMA / setmaxnreg need the arch-specific target, and the cubin runs on
# H100 / H200 (sm_90) only. No PTX is embedded: sm_90a PTX cannot JIT to another arch anyway.
GENCODE = ["-gencode=arch=compute_90a,code=sm_90a"]

CUDA_SOURCES = [
    "build_info.cu",
    "grouped_gemm/grouped_gemm_bf16_wkmajor_sm90.cu",
    "grouped_gemm/grouped_gemm_bf16_wnmajor_sm90.cu",
    "grouped_gemm/grouped_gemm_fp16_wkmajor_sm90.cu",
    "grouped_gemm/grouped_gemm_fp16_wnmajor_sm90.cu",
    "scatter_gemm/scatter_gemm_bf16_wkmajor_sm90.cu",
    "scatter_gemm/scatter_gemm_bf16_wnmajor_sm90.cu",
    "scatter_gemm/scatter_gemm_fp16_wkmajor_sm90.cu",
    "scatter_gemm/scatter_gemm_fp16_wnmajor_sm90.cu",
    "group_bwd_w/group_bwd_w_bf16_sm90.cu",
    "group_bwd_w/group_bwd_w_fp16_sm90.cu",
    "glu_backward/glu_backward_sm90.cu",
]
CXX_SOURCES = ["bindings.cpp"]


# ----------------------------------------------------------------------------- discovery


def cuda_home() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where its toolkit lives.
        try:
            out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    top = os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"'))
                    if os.path.exists(os.path.join(top, "bin", "nvcc")):
                        return top
        except (OSError, subprocess.SubprocessError):
            pass
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def cutlass_include() -> Optional[str]:
    """The CUTLASS/CuTe headers of the nvidia-cutlass wheel, found without importing it."""
    explicit = os.environ.get("SCATTERMOE_CUTLASS_INCLUDE")
    if explicit:
        return explicit if os.path.exists(os.path.join(explicit, "cutlass", "cutlass.h")) else None
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "source", "include")
        if os.path.exists(os.path.join(path, "cutlass", "cutlass.h")):
            return path
    return None


def pybind11_include() -> Optional[str]:
    spec = importlib.util.find_spec("pybind11")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "include")
        if os.path.exists(os.path.join(path, "pybind11", "pybind11.h")):
            return path
    return None


def missing_tools() -> List[str]:
    """What the build lacks, as install hints; empty when it can build."""
    missing = []
    if cuda_home() is None:
        missing.append("nvcc (CUDA toolkit >= 12.3; set CUDA_HOME)")
    if cutlass_include() is None:
        missing.append(f"CUTLASS headers (pip install --no-deps {CUTLASS_PIN})")
    if pybind11_include() is None:
        missing.append("pybind11 (pip install pybind11)")
    return missing


def build_mode() -> str:
    """'on', 'off' or 'auto' from SCATTERMOE_BUILD_CUDA."""
    value = os.environ.get("SCATTERMOE_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    # The words of scattermoe._validate.env_flag (not imported: the build environment has no torch).
    if value in ("0", "false", "no", "off", "n"):
        return "off"
    if value in ("1", "true", "yes", "on", "y"):
        return "on"
    raise ValueError(f"SCATTERMOE_BUILD_CUDA: expected 1 or 0 (or true/false, yes/no, on/off), auto or unset, "
                     f"got {os.environ['SCATTERMOE_BUILD_CUDA']!r}")


def default_jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].split()[0]) / 2**20
        by_memory = max(1, int(avail_gib // 4))  # ~3.4 GB peak per CUTLASS TU, measured
    except (OSError, KeyError, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


# ----------------------------------------------------------------------------- build


def nvcc_flags(include_dirs: List[str], nvcc_threads: int) -> List[str]:
    return [
        "-std=c++17", "-O3", "-DNDEBUG",
        "--expt-relaxed-constexpr",
        *GENCODE,
        "-Xptxas", "-v",  # registers and spills per kernel, kept in the ptxas logs and checked by the tests
        "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
        f"--threads={nvcc_threads}",
        *[f"-I{d}" for d in include_dirs],
    ]


def cxx_flags(include_dirs: List[str]) -> List[str]:
    return ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", *[f"-I{d}" for d in include_dirs]]


def source_hash(extra: str = "") -> str:
    """Hash of every file under csrc/ plus the toolchain, to key a build cache."""
    h = hashlib.sha256(extra.encode())
    for root, dirs, files in os.walk(CSRC):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".cu", ".cuh", ".h", ".cpp", ".py")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, CSRC).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def cutlass_version() -> Optional[str]:
    """"major.minor.patch" from the CUTLASS headers' version.h, or None without headers."""
    include = cutlass_include()
    if include is None:
        return None
    names = ("CUTLASS_MAJOR", "CUTLASS_MINOR", "CUTLASS_PATCH")
    fields = {}
    with open(os.path.join(include, "cutlass", "version.h")) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "#define" and parts[1] in names:
                fields[parts[1]] = parts[2]
    return ".".join(fields.get(name, "?") for name in names)


def prebuilt_key(python: Tuple[int, int] = sys.version_info[:2]) -> str:
    """Key of a build another machine can reuse: the sources, the Python it is for, the target and
    the CUTLASS version, but no paths (cached_build's key has the paths of this machine's toolchain)."""
    return f"{source_hash(extra=f'{GENCODE}|{cutlass_version()}')}-py{python[0]}{python[1]}"


def prebuilt_module(root: str) -> Optional[str]:
    """The module ``prebuild(root)`` wrote for these sources and this Python, if it is there."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = os.path.join(root, prebuilt_key(), "scattermoe", "_C" + suffix)
    return path if os.path.isfile(path) else None


def prebuild(root: str) -> Dict:
    """Build into ``root/<prebuilt_key()>/`` for the Python running this, keeping only the module and
    build_info.json: for a GPU machine that has the same Python minor version but no time to compile."""
    key = prebuilt_key()
    out_dir = os.path.join(root, key)
    shutil.rmtree(out_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as objects:
        info = build(out_dir, temp_dir=objects)
    python_suffix = key[key.rindex("-"):]  # "-py312": this Python's builds of older sources are stale
    for name in os.listdir(root):
        if name != key and name.endswith(python_suffix):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return info


def _run(cmd: List[str], log_path: Optional[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if log_path:
        with open(log_path, "w") as f:
            f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"csrc build: command failed ({proc.returncode}):\n{' '.join(cmd)}\n"
                           f"{proc.stdout}{proc.stderr}")
    return time.perf_counter() - start


def build(out_dir: str, temp_dir: Optional[str] = None, jobs: Optional[int] = None,
          nvcc_threads: Optional[int] = None, verbose: bool = True) -> Dict:
    """Compile and link ``scattermoe._C`` into ``out_dir/scattermoe/_C<ext suffix>``.

    Object files and one ptxas log per .cu go to ``temp_dir`` (default ``out_dir/obj``).
    Returns (and writes to ``out_dir/build_info.json``) the module path, the per-file
    compile seconds, the wall time, the peak RSS of any compiler process and the logs.
    """
    missing = missing_tools()
    if missing:
        raise RuntimeError("csrc build: missing " + "; ".join(missing))
    home = cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc")
    jobs = jobs or default_jobs()
    nvcc_threads = nvcc_threads or int(os.environ.get("NVCC_THREADS", "1"))
    temp_dir = temp_dir or os.path.join(out_dir, "obj")
    os.makedirs(temp_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "scattermoe"), exist_ok=True)

    include_dirs = [os.path.join(CSRC, "include"), cutlass_include()]
    host_includes = [os.path.join(CSRC, "include"), pybind11_include(), sysconfig.get_paths()["include"],
                     os.path.join(home, "include")]

    def object_path(src: str) -> str:
        return os.path.join(temp_dir, src.replace("/", "__") + ".o")

    jobs_list = []
    for src in CUDA_SOURCES:
        cmd = [nvcc, *nvcc_flags(include_dirs, nvcc_threads), "-c", os.path.join(CSRC, src), "-o", object_path(src)]
        jobs_list.append((src, cmd, object_path(src) + ".ptxas.log"))
    cxx = os.environ.get("CXX", "c++")
    for src in CXX_SOURCES:
        cmd = [cxx, *cxx_flags(host_includes), "-c", os.path.join(CSRC, src), "-o", object_path(src)]
        jobs_list.append((src, cmd, object_path(src) + ".log"))

    start = time.perf_counter()
    seconds = {}
    if verbose:
        print(f"csrc build: {len(jobs_list)} sources, {jobs} jobs, nvcc {nvcc}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run, cmd, log): src for src, cmd, log in jobs_list}
        for future in concurrent.futures.as_completed(futures):
            src = futures[future]
            seconds[src] = round(future.result(), 1)
            if verbose:
                print(f"csrc build: {src} {seconds[src]} s", flush=True)

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    module_path = os.path.join(out_dir, "scattermoe", "_C" + suffix)
    link = [cxx, "-shared", "-o", module_path, *[object_path(s) for s, _, _ in jobs_list],
            f"-L{os.path.join(home, 'lib64')}", f"-L{os.path.join(home, 'lib')}",
            # cudart static: the module needs no libcudart.so at run time, only the driver.
            "-lcudart_static", "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,ALL"]
    seconds["link"] = round(_run(link, None), 1)
    wall = round(time.perf_counter() - start, 1)
    peak_rss_gib = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    info = {
        "module": module_path,
        "wall_seconds": wall,
        "compile_seconds": seconds,
        "jobs": jobs,
        "nvcc_threads": nvcc_threads,
        "peak_rss_gib_any_compiler_process": peak_rss_gib,
        "ptxas_logs": {s: object_path(s) + ".ptxas.log" for s in CUDA_SOURCES},
        "objects": [object_path(s) for s in CUDA_SOURCES],
        "gencode": GENCODE,
    }
    with open(os.path.join(out_dir, "build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if verbose:
        print(f"csrc build: {module_path} in {wall} s (peak compiler RSS {peak_rss_gib} GiB)", flush=True)
    return info


def cached_build(cache_root: str, verbose: bool = True) -> Dict:
    """``build()`` into ``cache_root/<hash of csrc and toolchain>/`` unless that build exists.

    For tests and CI: the first call of a session compiles (~150-200 s on 2 cores), later calls and
    later sessions with unchanged sources reuse the module. Returns build()'s info dict.
    """
    home = cuda_home()
    key = source_hash(extra=f"{home}|{cutlass_include()}|{sys.version_info[:2]}|{GENCODE}")
    os.makedirs(cache_root, exist_ok=True)
    # One build at a time per cache: a second caller (CI builds in the background while the tests run, and the
    # tests' fixture then asks for the same build) waits for the first and reuses its module.
    with _cache_lock(os.path.join(cache_root, ".lock"), verbose):
        return _cached_build_locked(cache_root, key, verbose)


@contextlib.contextmanager
def _cache_lock(path: str, verbose: bool):
    try:
        import fcntl
    except ImportError:  # not POSIX (the module is built for Linux only): no lock
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"csrc build: waiting for another process's build in {os.path.dirname(path)}", flush=True)
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            if verbose:
                print(f"csrc build: waited {time.monotonic() - start:.0f} s", flush=True)
        except OSError as error:  # a filesystem without flock (some network mounts): build unlocked
            print(f"csrc build: WARNING: cannot lock {path} ({error}); concurrent builds are not serialised",
                  flush=True)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _usable_record(info_path: str) -> Optional[Dict]:
    """The cached build's record, if it is there and so is the module it names (else None: build again)."""
    if not os.path.exists(info_path):
        return None
    with open(info_path) as f:
        info = json.load(f)
    return {**info, "cached": True} if os.path.exists(info["module"]) else None


def _cached_build_locked(cache_root: str, key: str, verbose: bool) -> Dict:
    out_dir = os.path.join(cache_root, key)
    info_path = os.path.join(out_dir, "build_info.json")
    cached = _usable_record(info_path)
    if cached is not None:
        return cached
    tmp_dir = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    info = build(tmp_dir, verbose=verbose)
    cached = _usable_record(info_path)  # without the lock, another process may have finished first: keep its build
    if cached is not None:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return cached
    shutil.rmtree(out_dir, ignore_errors=True)  # a build dir without its record (an interrupted copy)
    os.rename(tmp_dir, out_dir)
    for name in os.listdir(cache_root):  # drop builds of older sources (~2 MB module, ~10 MB objects each)
        stale = os.path.join(cache_root, name)
        if name != key and ".tmp" not in name and os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)
    # Paths recorded under the temporary name: rewrite them for the final directory.
    text = json.dumps(info).replace(tmp_dir, out_dir)
    info = json.loads(text)
    info["cached"] = False
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


# ----------------------------------------------------------------------------- setuptools


def cuda_extensions() -> list:
    """``[Extension('scattermoe._C')]`` when the switches and tools say build, else ``[]``."""
    from setuptools import Extension

    mode = build_mode()
    if mode == "off":
        return []
    missing = missing_tools()
    if missing:
        if mode == "on":
            raise RuntimeError("SCATTERMOE_BUILD_CUDA=1 but the csrc build lacks: " + "; ".join(missing))
        print("scattermoe: not building the csrc extension (cutlass backend) for want of: " + "; ".join(missing))
        return []
    return [Extension(EXT_NAME, sources=[])]  # sources are compiled by CsrcBuildExt, not by distutils


def cuda_cmdclass() -> dict:
    """``{'build_ext': CsrcBuildExt}``: builds ``scattermoe._C`` with ``build()``."""
    from setuptools.command.build_ext import build_ext

    class CsrcBuildExt(build_ext):
        def build_extension(self, ext):
            if ext.name != EXT_NAME:
                return super().build_extension(ext)
            target = self.get_ext_fullpath(ext.name)  # .../scattermoe/_C<suffix>, in place for editable installs
            out_dir = os.path.dirname(os.path.dirname(target))
            info = build(out_dir, temp_dir=os.path.join(self.build_temp, "csrc"), jobs=default_jobs())
            if os.path.abspath(info["module"]) != os.path.abspath(target):
                shutil.move(info["module"], target)
            os.remove(os.path.join(out_dir, "build_info.json"))

    return {"build_ext": CsrcBuildExt}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build scattermoe._C (sm_90a) without setup.py.")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(CSRC), "build", "csrc"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--cache", default=None,
                        help="build into CACHE/<source hash>/ unless that build exists (what the tests use)")
    parser.add_argument("--prebuild", metavar="ROOT", default=None,
                        help="build into ROOT/<sources, Python, CUTLASS key>/ for another machine with this "
                             "Python minor version (bench/prepare_gpu_carry.sh)")
    parser.add_argument("--check", action="store_true", help="print what is missing and exit 1 if anything is")
    args = parser.parse_args(argv)
    if args.check:
        missing = missing_tools()
        print("csrc build: ready" if not missing else "csrc build: missing " + "; ".join(missing))
        return 1 if missing else 0
    if args.prebuild:
        info = prebuild(args.prebuild)
        print(f"csrc build: {info['module']} (built in {info['wall_seconds']} s)")
        return 0
    if args.cache:
        info = cached_build(args.cache)
        print(f"csrc build: {info['module']} ({'cached' if info.get('cached') else 'built'} "
              f"in {info['wall_seconds']} s)")
        return 0
    build(args.out, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
