"""The csrc extension builds for sm_90a on a machine with nvcc and no GPU, and behaves there.

What is checked in the machine code (DESIGN.md 3b: a CMake slip once built sm_75 stubs with
0 HGMMA and still "succeeded"):
  - every cubin is sm_90a (cuobjdump --list-elf / --dump-elf);
  - each grouped-GEMM instantiation holds HGMMA of its dtype, TMA loads and stores;
  - no kernel uses local memory or a stack (--dump-resource-usage), ptxas reports no spills.
And in Python, with no driver: the module imports, reports its build, raises CudaError
(cudaErrorInsufficientDriver, 35) from a CUDA call and ValueError for bad arguments,
never crashing the interpreter.

The build (~150-220 s, ~3.6 GB per compiler process, 2 processes on 2 cores) runs once per
source version into build/csrc-cache/ and is reused; these tests run after all others (marker
``csrc_build``), so that CI can build it beside them (.ci/run) and they wait on the cache's lock.
Without nvcc, CUTLASS headers or pybind11 the tests skip, unless SCATTERMOE_REQUIRE_CSRC_BUILD=1 (CI)
makes that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.csrc_build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "build", "csrc-cache")
REQUIRED = os.environ.get("SCATTERMOE_REQUIRE_CSRC_BUILD", "0") not in ("", "0")


def _load_build_module():
    spec = importlib.util.spec_from_file_location("scattermoe_csrc_build", os.path.join(REPO, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


csrc_build = _load_build_module()


def _skip_or_fail(reason: str):
    if REQUIRED:
        pytest.fail(f"SCATTERMOE_REQUIRE_CSRC_BUILD=1 but {reason}")
    pytest.skip(reason)


def find_cuobjdump():
    """cuobjdump from the CUDA toolkit, PATH, or Triton's wheel (triton/backends/nvidia/bin)."""
    home = csrc_build.cuda_home()
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    candidates.append(shutil.which("cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    for path in candidates:
        if path and os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="session")
def built():
    missing = csrc_build.missing_tools()
    if missing:
        _skip_or_fail("the csrc build lacks: " + "; ".join(missing))
    info = csrc_build.cached_build(CACHE)
    print(f"\ncsrc build ({'cached' if info.get('cached') else 'fresh'}): {info['wall_seconds']} s wall, "
          f"{info['jobs']} jobs, peak compiler RSS {info['peak_rss_gib_any_compiler_process']} GiB, "
          f"per file {json.dumps(info['compile_seconds'])}")
    return info


def _fake_build(calls: list, seconds: float = 0.0):
    """A stand-in for csrc_build.build: records its output folder, takes `seconds`, writes an empty module."""
    import time

    def build(out_dir, verbose=True, **_):
        calls.append(out_dir)
        time.sleep(seconds)
        os.makedirs(out_dir)
        module = os.path.join(out_dir, "_C.so")
        open(module, "w").close()
        return {"module": module, "wall_seconds": seconds}
    return build


def test_concurrent_cached_builds_compile_once_and_share_the_module(monkeypatch, tmp_path):
    """CI builds in the background while the tests run; the tests' fixture then asks for the same build. The
    second caller must wait for the first (the cache's lock) and reuse its module, not compile it again."""
    import threading
    import time

    calls = []
    monkeypatch.setattr(csrc_build, "build", _fake_build(calls, seconds=0.5))  # the other thread reaches the lock
    results = [None, None]

    def call(i):
        results[i] = csrc_build.cached_build(str(tmp_path), verbose=False)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1, f"compiled {len(calls)} times"
    assert results[0]["module"] == results[1]["module"] and os.path.exists(results[0]["module"])
    assert ".tmp" not in results[0]["module"]
    assert sorted(r["cached"] for r in results) == [False, True]


def test_a_filesystem_without_flock_builds_unlocked_with_a_warning(monkeypatch, tmp_path, capsys):
    import errno
    import fcntl

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(csrc_build, "build", _fake_build([]))
    info = csrc_build.cached_build(str(tmp_path))
    assert os.path.exists(info["module"]) and info["cached"] is False
    assert "cannot lock" in capsys.readouterr().out
    assert csrc_build.cached_build(str(tmp_path))["cached"] is True


def test_a_cached_record_whose_module_is_gone_is_built_again(monkeypatch, tmp_path):
    """A record (build_info.json) left beside a deleted module must not be returned as a cached build: the
    module it names does not exist. The cache builds again and returns the new module."""
    calls = []
    monkeypatch.setattr(csrc_build, "build", _fake_build(calls))
    first = csrc_build.cached_build(str(tmp_path), verbose=False)
    os.remove(first["module"])
    again = csrc_build.cached_build(str(tmp_path), verbose=False)
    assert len(calls) == 2 and again["cached"] is False and os.path.exists(again["module"])
    assert csrc_build.cached_build(str(tmp_path), verbose=False)["cached"] is True and len(calls) == 2


def test_the_build_switch_is_read_strictly_and_the_setuptools_hook_obeys_it(monkeypatch, capsys):
    """SCATTERMOE_BUILD_CUDA (module docstring): off skips the extension even where the tools are there, on with a
    tool missing is an error (not a silent pure-Python install), unset builds only when nothing is missing."""
    for value, mode in (("", "auto"), ("auto", "auto"), ("0", "off"), ("false", "off"), ("no", "off"), (" OFF ", "off"),
                        ("1", "on"), ("true", "on"), ("yes", "on"), ("On", "on")):
        monkeypatch.setenv("SCATTERMOE_BUILD_CUDA", value)
        assert csrc_build.build_mode() == mode, value
    from scattermoe._validate import _OFF, _ON, env_flag

    for words, mode in ((_ON, "on"), (_OFF, "off")):  # the library's switches' words, read alike
        for word in words:
            monkeypatch.setenv("SCATTERMOE_BUILD_CUDA", word.upper())
            assert csrc_build.build_mode() == mode and env_flag("SCATTERMOE_BUILD_CUDA") == (mode == "on"), word
    monkeypatch.setenv("SCATTERMOE_BUILD_CUDA", "2")
    with pytest.raises(ValueError, match="SCATTERMOE_BUILD_CUDA"):
        csrc_build.build_mode()
    for tools_missing in ([], ["nvcc (CUDA toolkit >= 12.3; set CUDA_HOME)"]):
        monkeypatch.setattr(csrc_build, "missing_tools", lambda: list(tools_missing))
        monkeypatch.setenv("SCATTERMOE_BUILD_CUDA", "off")
        assert csrc_build.cuda_extensions() == []
        monkeypatch.setenv("SCATTERMOE_BUILD_CUDA", "")
        assert [e.name for e in csrc_build.cuda_extensions()] == ([] if tools_missing else ["scattermoe._C"])
        monkeypatch.setenv("SCATTERMOE_BUILD_CUDA", "on")
        if tools_missing:
            with pytest.raises(RuntimeError, match="lacks: nvcc"):
                csrc_build.cuda_extensions()
        else:
            assert [e.name for e in csrc_build.cuda_extensions()] == ["scattermoe._C"]
    assert "for want of: nvcc" in capsys.readouterr().out


def test_default_jobs_leaves_each_compiler_4_gib_of_free_memory(monkeypatch):
    """One CUTLASS translation unit peaks at ~3.4 GB (module docstring): jobs = min(cores, free GiB // 4), at
    least 1; MAX_JOBS overrides it."""
    import io

    def meminfo(free_gib):
        return lambda path, *args, **kwargs: io.StringIO(f"MemTotal: {64 * 2**20} kB\nMemAvailable: "
                                                         f"{int(free_gib * 2**20)} kB\n")

    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.setattr(csrc_build.os, "cpu_count", lambda: 16)
    for free_gib, jobs in ((10, 2), (63.9, 15), (200, 16), (3, 1)):
        monkeypatch.setattr(csrc_build, "open", meminfo(free_gib), raising=False)
        assert csrc_build.default_jobs() == jobs, free_gib
    monkeypatch.setenv("MAX_JOBS", "5")
    assert csrc_build.default_jobs() == 5


def test_the_cache_key_covers_every_kind_of_source(monkeypatch, tmp_path):
    """A cached module is reused while source_hash is unchanged: an edit to any .cu, .cuh, .h, .cpp or .py under
    csrc/ must change it (a header edit reusing a stale module would test old kernels), other files must not."""
    for name in ("k.cu", "k.cuh", "include/k.h", "bindings.cpp", "build.py", "README.md", "__pycache__/build.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("// v1\n")
    monkeypatch.setattr(csrc_build, "CSRC", str(tmp_path))
    before = csrc_build.source_hash()
    for name, changes in (("k.cu", True), ("k.cuh", True), ("include/k.h", True), ("bindings.cpp", True),
                          ("build.py", True), ("README.md", False), ("__pycache__/build.py", False)):
        (tmp_path / name).write_text("// v2\n")
        assert (csrc_build.source_hash() != before) == changes, name
        (tmp_path / name).write_text("// v1\n")
    assert csrc_build.source_hash() == before


def test_prebuild_replaces_this_pythons_older_builds_only(monkeypatch, tmp_path):
    """bench/prepare_gpu_carry.sh keeps one prebuilt module per Python minor version: a new prebuild drops the
    older builds for its own Python and leaves another Python's alone."""
    monkeypatch.setattr(csrc_build, "prebuilt_key", lambda python=sys.version_info[:2]: "new-py312")
    monkeypatch.setattr(csrc_build, "build", _fake_build([]))
    for name in ("old-py312", "old-py311"):
        (tmp_path / name).mkdir()
    csrc_build.prebuild(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["new-py312", "old-py311"]


def test_a_new_cached_build_drops_older_sources_builds_but_not_one_in_progress(monkeypatch, tmp_path):
    """A fresh build drops the cache's builds of older sources, but not another process's build still in its
    .tmp folder (that process renames it into place next)."""
    monkeypatch.setattr(csrc_build, "build", _fake_build([]))
    (tmp_path / "0123456789abcdef").mkdir()  # a build of older sources
    (tmp_path / "fedcba9876543210.tmp4242").mkdir()  # another process's build in progress
    info = csrc_build.cached_build(str(tmp_path), verbose=False)
    assert info["cached"] is False and os.path.exists(info["module"])
    assert sorted(os.listdir(tmp_path)) == sorted([".lock", os.path.basename(os.path.dirname(info["module"])),
                                                   "fedcba9876543210.tmp4242"])


@pytest.fixture(scope="session")
def cuobjdump():
    path = find_cuobjdump()
    if path is None:
        _skip_or_fail("no cuobjdump (CUDA toolkit, or Triton's wheel: triton/backends/nvidia/bin)")
    return path


def _dump(cuobjdump: str, flag: str, path: str) -> str:
    proc = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True)
    assert proc.returncode == 0, f"cuobjdump {flag} {path} failed: {proc.stderr}"
    return proc.stdout


GEMM_OBJECTS = {  # source -> the HGMMA operand type its SASS must show
    "grouped_gemm/grouped_gemm_bf16_wkmajor_sm90.cu": "BF16",
    "grouped_gemm/grouped_gemm_bf16_wnmajor_sm90.cu": "BF16",
    "grouped_gemm/grouped_gemm_fp16_wkmajor_sm90.cu": "F16",
    "grouped_gemm/grouped_gemm_fp16_wnmajor_sm90.cu": "F16",
}


SCATTER_OBJECTS = {  # the cp.async kernels: HGMMA of their dtype, 16-byte cp.async (LDGSTS); the scatter GEMM
    # can also load W by TMA
    "scatter_gemm/scatter_gemm_bf16_wkmajor_sm90.cu": "BF16",
    "scatter_gemm/scatter_gemm_bf16_wnmajor_sm90.cu": "BF16",
    "scatter_gemm/scatter_gemm_fp16_wkmajor_sm90.cu": "F16",
    "scatter_gemm/scatter_gemm_fp16_wnmajor_sm90.cu": "F16",
    "group_bwd_w/group_bwd_w_bf16_sm90.cu": "BF16",
    "group_bwd_w/group_bwd_w_fp16_sm90.cu": "F16",
}


def _object(info, source):
    matches = [o for o in info["objects"] if o.endswith(source.replace("/", "__") + ".o")]
    assert len(matches) == 1, (source, info["objects"])
    return matches[0]


def test_every_cubin_is_sm90a(built, cuobjdump):
    listing = _dump(cuobjdump, "--list-elf", built["module"])
    cubins = re.findall(r"\S+\.cubin", listing)
    assert len(cubins) >= len(GEMM_OBJECTS) + len(SCATTER_OBJECTS), listing
    assert all(".sm_90." in name for name in cubins), listing
    arches = re.findall(r"arch = (sm_\w+)", _dump(cuobjdump, "--dump-elf", built["module"]))
    assert arches and set(arches) == {"sm_90a"}, f"cubin arches: {sorted(set(arches))}"
    assert "ptx" not in _dump(cuobjdump, "--list-ptx", built["module"]).lower(), "unexpected PTX in the fatbin"


@pytest.mark.parametrize("source", sorted(GEMM_OBJECTS))
def test_grouped_gemm_sass_holds_hgmma_and_tma(built, cuobjdump, source):
    sass = _dump(cuobjdump, "--dump-sass", _object(built, source))
    # fp16 operands are HGMMA's default type: no suffix after .F32 (seen: "HGMMA.64x128x16.F32").
    hgmma = [(shape, dtype or "F16") for shape, dtype in re.findall(r"HGMMA\.(\d+x\d+x\d+)\.F32(?:\.(\w+))?", sass)]
    print(f"\n{source}: {len(hgmma)} HGMMA {sorted(set(hgmma))}, "
          f"{sass.count('UTMALDG')} UTMALDG, {sass.count('UTMASTG')} UTMASTG")
    assert hgmma, f"{source}: no HGMMA in the SASS (sm90 kernel body compiled to a stub?)"
    assert {dtype for _, dtype in hgmma} == {GEMM_OBJECTS[source]}, hgmma
    assert "UTMALDG" in sass, f"{source}: operands are not loaded by TMA"
    assert "UTMASTG" in sass, f"{source}: the epilogue does not store by TMA"


@pytest.mark.parametrize("source", sorted(SCATTER_OBJECTS))
def test_scatter_gemm_sass_holds_hgmma_and_cp_async(built, cuobjdump, source):
    sass = _dump(cuobjdump, "--dump-sass", _object(built, source))
    hgmma = [(shape, dtype or "F16") for shape, dtype in re.findall(r"HGMMA\.(\d+x\d+x\d+)\.F32(?:\.(\w+))?", sass)]
    print(f"\n{source}: {len(hgmma)} HGMMA {sorted(set(hgmma))}, {sass.count('LDGSTS.E.BYPASS.128')} LDGSTS.128")
    assert hgmma, f"{source}: no HGMMA in the SASS (sm90 kernel body compiled to a stub?)"
    assert {dtype for _, dtype in hgmma} == {SCATTER_OBJECTS[source]}, hgmma
    # 8 copies of A and 8 of W per thread per stage, 16 bytes each, bypassing L1 (cp.async.cg).
    assert sass.count("LDGSTS.E.BYPASS.128") >= 16, f"{source}: the operands are not loaded by 16-byte cp.async"
    assert "LDGSTSBAR" in sass, f"{source}: cp.async completion is not tied to the pipeline's mbarrier"
    # The staged epilogues store 16 bytes at a time (the scatter GEMM: y and both halves of the GLU
    # pre-activation; dW: one store, along whichever dimension is unit-stride), in each of the two kernels
    # (int32 and int64 offsets), and nothing in them is a call (a 64-bit division or an IEEE fp32 divide
    # would be one, and a call between wgmma's serialises them: ptxas warning C7510).
    wgrad = source.startswith("group_bwd_w/")
    kernels = 2 if wgrad else 4  # int32 / int64 offsets; the scatter GEMM per tile and persistent
    assert sass.count("STG.E.128") >= (1 if wgrad else 3) * kernels, f"{source}: the epilogue lacks 16-byte stores"
    assert len(hgmma) == 8 * kernels, f"{source}: {len(hgmma)} HGMMA: not one 8-wgmma mainloop per kernel"
    if not wgrad:
        # Both kernels find their tiles' experts with a warp scan (shuffles and a ballot): the per-tile one's
        # thread 0 walked the experts one dependent load at a time until 2026-12-03 (bench/NOTES.md 25).
        names = {f.split("\n", 1)[0].strip(): f for f in sass.split("Function : ")[1:]}
        kinds = {name: "persistent" if "persistent" in name else "per tile" for name in names}
        assert sorted(kinds.values()) == ["per tile"] * 2 + ["persistent"] * 2, f"{source}: kernels {sorted(names)}"
        for name, body in names.items():
            assert "VOTE" in body and "SHFL.UP" in body, \
                f"{source}: the {kinds[name]} kernel {name} finds its tiles without the warp scan"
    assert "CALL" not in sass, f"{source}: the kernel calls a subroutine"
    if not wgrad:
        # W by TMA (params.w_tma): 3-D boxes, 2 per stage for a K-major W, 16 (64 x 8) for an F-major one, in
        # each of the 4 kernels; their bytes are expected on the stage's barrier.
        boxes = 2 if "wkmajor" in source else 16
        assert sass.count("UTMALDG.3D") == boxes * kernels, f"{source}: {sass.count('UTMALDG.3D')} TMA loads"
    else:
        assert "UTMALDG" not in sass, f"{source}: the dW kernel loads by cp.async only"
    if wgrad:  # dW = X^T dY: both operands arrive MN-major, so wgmma must read them transposed from smem
        assert "tnspA" in sass and "tnspB" in sass, f"{source}: HGMMA does not read MN-major operands"


WEIGHT_TMA_LAYOUT = """
import json
from scattermoe.backends.cutlass import _extension
m, _ = _extension.load()
print(json.dumps({f"{d}-{k}": m.scatter_gemm_w_tma_layout_mismatches(d, k)
                  for d in ("bfloat16", "float16") for k in (True, False)}))
"""


def test_scatter_gemm_weight_tma_boxes_land_where_the_mainloop_reads(built):
    """The TMA weight loads write a stage's W tile as 128-byte swizzled boxes (2 of 64 x 64 for a K-major W, 16 of
    64 x 8 for an F-major one); the wgmmas read it through CUTLASS's shared-memory layout. For every element of
    every box of every stage of both kernels, the address TMA's swizzle gives must be the address the layout
    gives (a host-only computation in the module, by the kernel's own box list)."""
    proc = _run_python(built["module"], WEIGHT_TMA_LAYOUT)
    assert proc.returncode == 0, proc.stderr
    mismatches = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mismatches == {name: 0 for name in mismatches} and len(mismatches) == 4, mismatches


ELEMENTWISE_OBJECTS = ["glu_backward/glu_backward_sm90.cu"]


@pytest.mark.parametrize("source", ELEMENTWISE_OBJECTS)
def test_elementwise_kernels_move_16_bytes_per_access_and_call_nothing(built, cuobjdump, source):
    sass = _dump(cuobjdump, "--dump-sass", _object(built, source))
    # bf16 and fp16 kernels: each reads H's two halves and dG, writes dH's halves and s * G, 16 bytes at a time.
    assert sass.count("LDG.E.128") >= 6 and sass.count("STG.E.128") >= 6, f"{source}: not vectorised"
    assert "CALL" not in sass, f"{source}: the kernel calls a subroutine (an IEEE divide?)"


@pytest.mark.parametrize("source", sorted(GEMM_OBJECTS) + sorted(SCATTER_OBJECTS) + ELEMENTWISE_OBJECTS)
def test_no_local_memory_and_no_spills(built, cuobjdump, source):
    usage = _dump(cuobjdump, "--dump-resource-usage", _object(built, source))
    rows = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    print(f"\n{source}: registers per kernel {[int(r) for r, _, _ in rows]}")
    assert rows, usage
    assert all(int(stack) == 0 and int(local) == 0 for _, stack, local in rows), usage
    with open(built["ptxas_logs"][source]) as f:
        log = f.read()
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills, f"no ptxas -v report in {built['ptxas_logs'][source]}"
    assert all(s == "0" and lo == "0" for s, lo in spills), log
    assert "Used" in log and "registers" in log


def _run_python(module_path: str, code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with the built module: a crash shows as a signal, not a dead pytest."""
    env = dict(os.environ, SCATTERMOE_CSRC_MODULE=module_path)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


CALL_WITH_FAKE_POINTERS = """
import json
from scattermoe.backends.cutlass import _extension
m, err = _extension.load()
assert m is not None, err
out = {"probe": m.cuda_probe(), "build": m.build_info(), "raised": None}
if out["probe"]["error"] != 0:  # no driver, as on CI; with a GPU, never launch on fake pointers
    try:
        m.grouped_gemm(dtype="bfloat16", w_k_major=True, x=4096, stride_xm=64, w=8192, stride_we=64 * 64,
                       stride_w_ld=64, bias=0, stride_be=0, y=16384, stride_ym=64, expert_offsets=32768,
                       offsets_int64=True, num_experts=4, num_rows=10, k_in=64, n_out=64, workspace=65536,
                       workspace_bytes=1 << 20, device=0, sm_count=132, stream=0)
    except Exception as e:
        out["raised"] = [type(e).__name__, [c.__name__ for c in type(e).__mro__], str(e)]
print(json.dumps(out))
"""


def test_module_imports_and_cuda_call_raises_cleanly_without_a_driver(built):
    proc = _run_python(built["module"], CALL_WITH_FAKE_POINTERS)
    assert proc.returncode == 0, f"interpreter died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["build"]["archs"] == ["sm_90a"]
    assert out["build"]["cutlass"] == "4.2.0"
    if out["probe"]["error"] == 0:
        pytest.skip("a CUDA driver is present: the no-driver path cannot be shown here")
    assert out["probe"]["error"] == 35 and out["probe"]["error_name"] == "cudaErrorInsufficientDriver", out["probe"]
    name, mro, message = out["raised"]
    assert name == "CudaError" and "RuntimeError" in mro, out["raised"]
    assert "cudaErrorInsufficientDriver" in message and "CUDA error 35" in message, message
    assert re.match(r"\w+\(.*\) failed", message), f"the message must name the CUDA call: {message}"


# Per entry point: arguments that pass every check (fake addresses: nothing is launched), and for each argument
# name, a change that breaks it. Every change must raise ValueError with a message that starts with that name.
BAD_ARGUMENT_CALLS = {
    "grouped_gemm": (
        dict(dtype="float16", w_k_major=False, x=4096, stride_xm=64, w=8192, stride_we=64 * 64, stride_w_ld=64,
             bias=0, stride_be=0, y=16384, stride_ym=64, expert_offsets=32768, offsets_int64=False, num_experts=4,
             num_rows=10, k_in=64, n_out=64, workspace=65536, workspace_bytes=1 << 20, device=0, sm_count=132,
             stream=0),
        {
            "dtype": dict(dtype="float32"),
            "k_in": dict(k_in=60, stride_xm=60),
            "n_out": dict(n_out=100),
            "stride_xm": dict(stride_xm=72 + 4),
            "x": dict(x=4096 + 2),
            "y": dict(y=0),
            "w": dict(w=8192 + 8),
            "num_experts": dict(num_experts=0),
            "num_rows": dict(num_rows=2**31),
            "workspace_bytes": dict(workspace_bytes=16),
            "workspace": dict(workspace=65536 + 16),
            "expert_offsets": dict(expert_offsets=0),
        },
    ),
    "scatter_gemm": (
        dict(dtype="bfloat16", w_k_major=True, x=4096, stride_xm=64, x_rows=5, w=8192, stride_we=64 * 64,
             stride_w_ld=64, bias=0, stride_be=0, y=16384, stride_ym=64, y_rows=10, gates=0,
             sorted_scattered_idxs=24576, expert_offsets=32768, offsets_int64=True, x_grouped=False, y_grouped=False,
             fan_out=2, num_experts=4, num_rows=10, k_in=64, n_out=64, device=0, stream=0),
        {
            "dtype": dict(dtype="float32"),
            "k_in": dict(k_in=60, stride_xm=60),
            "n_out": dict(n_out=0),
            "stride_xm": dict(stride_xm=64 + 4),
            "stride_w_ld": dict(stride_w_ld=60),
            "fan_out": dict(fan_out=0),
            "x_rows": dict(x_rows=4),
            "y_rows": dict(y_rows=9),
            "x": dict(x=4096 + 2),
            "y": dict(y=0),
            "sorted_scattered_idxs": dict(sorted_scattered_idxs=0),
            "expert_offsets": dict(expert_offsets=0),
            "num_experts": dict(num_experts=0),
            "glu": dict(glu=3),
            "pre": dict(pre=40960, stride_pm=128),
            "stride_pm": dict(glu=1, pre=40960, stride_pm=64, pre_rows=10),
            "pre_rows": dict(glu=1, pre=40960, stride_pm=128, pre_rows=9),
            "num_ctas": dict(num_ctas=-1),
        },
    ),
    "group_bwd_w": (
        dict(dtype="float16", x=4096, stride_xm=64, x_rows=5, dy=8192, stride_dym=32, dy_rows=10, dw=16384,
             stride_dwe=64 * 32, stride_dwk=1, stride_dwn=64, sorted_scattered_idxs=24576, expert_offsets=32768,
             offsets_int64=True, x_grouped=False, dy_grouped=True, x_fan_out=2, dy_fan_out=1, num_experts=4,
             num_rows=10, k_in=64, n_out=32, device=0, stream=0),
        {
            "dtype": dict(dtype="float32"),
            "k_in": dict(k_in=60, stride_xm=60),
            "n_out": dict(n_out=36, stride_dym=40),
            "stride_xm": dict(stride_xm=64 + 4),
            "stride_dym": dict(stride_dym=16),
            "stride_dwk": dict(stride_dwk=2),
            "x_fan_out": dict(x_fan_out=0),
            "x_rows": dict(x_rows=4),
            "dy_rows": dict(dy_rows=9),
            "x": dict(x=4096 + 2),
            "dy": dict(dy=0),
            "dw": dict(dw=0),
            "sorted_scattered_idxs": dict(sorted_scattered_idxs=0),
            "expert_offsets": dict(expert_offsets=0),
            "num_experts": dict(num_experts=0),
            "num_rows": dict(num_rows=2**31),
        },
    ),
    "glu_backward": (
        dict(dtype="bfloat16", pre=4096, stride_pm=128, dg=8192, stride_dgm=64, scale=0, dh=16384, stride_dhm=128,
             g=0, stride_gm=0, dot=0, num_rows=10, f=64, activate_first=True, device=0, stream=0),
        {
            "dtype": dict(dtype="float32"),
            "f": dict(f=0),
            "stride_pm": dict(stride_pm=100),
            "stride_dgm": dict(stride_dgm=32),
            "stride_dhm": dict(stride_dhm=64),
            "stride_gm": dict(g=24576, stride_gm=8),
            "num_rows": dict(num_rows=2**31),
            "pre": dict(pre=0),
        },
    ),
}

BAD_ARGUMENTS_SCRIPT = """
import json
from scattermoe.backends.cutlass import _extension
m, _ = _extension.load()
function, good, cases = json.loads(SPEC)
out = {}
for name, change in cases.items():
    try:
        getattr(m, function)(**{**good, **change})
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("function", sorted(BAD_ARGUMENT_CALLS))
def test_bad_arguments_raise_value_error_naming_the_argument(built, function):
    good, cases = BAD_ARGUMENT_CALLS[function]
    spec = json.dumps([function, good, cases])
    proc = _run_python(built["module"], f"SPEC = {spec!r}\n" + BAD_ARGUMENTS_SCRIPT)
    assert proc.returncode == 0, f"interpreter died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, raised in out.items():
        assert raised is not None, f"{name}: a bad value was accepted"
        kind, message = raised
        assert kind == "ValueError", (name, raised)
        assert message.startswith(name), (name, message)


TILE_ORDER = """
import json
from scattermoe.backends.cutlass import _extension
m, _ = _extension.load()
cases = {}
for num_rows, num_experts, n_out, glu in [(32768, 8, 11264, 1), (32768, 8, 2048, 0), (300, 3, 200, 0), (1, 1, 8, 1)]:
    cases[f"{num_rows}-{num_experts}-{n_out}-{glu}"] = m.scatter_gemm_tile_order(num_rows, num_experts, n_out, glu)
print(json.dumps(cases))
"""


def test_scatter_gemm_launch_order_is_a_grouped_raster(built):
    """Every (row tile, column tile) exactly once, and the CTAs resident together (132 on an H100, one per SM)
    share a few row tiles of X: each row tile's X rows are read from HBM about once, not once per column tile."""
    proc = _run_python(built["module"], TILE_ORDER)
    assert proc.returncode == 0, proc.stderr
    for name, order in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        num_rows, num_experts, n_out, glu = (int(v) for v in name.split("-"))
        row_tiles = -(-num_rows // 128) + num_experts
        col_tiles = -(-n_out // (64 if glu else 128))
        assert sorted(map(tuple, order)) == [(r, c) for r in range(row_tiles) for c in range(col_tiles)], name
        for start in range(0, len(order), 132):
            window = {r for r, _ in order[start:start + 132]}
            assert len(window) <= 2 * 8, (name, start, sorted(window))


def test_workspace_size_is_host_only_and_grows_with_experts(built):
    proc = _run_python(built["module"], (
        "from scattermoe.backends.cutlass import _extension\n"
        "m, _ = _extension.load()\n"
        "print([m.grouped_gemm_workspace_bytes(d, k, e, 132) for d in ('bfloat16', 'float16') "
        "for k in (True, False) for e in (1, 64, 1024)])\n"))
    assert proc.returncode == 0, proc.stderr
    sizes = eval(proc.stdout.strip().splitlines()[-1])
    assert all(s > 0 and s % 256 == 0 for s in sizes), sizes
    for i in range(0, len(sizes), 3):
        assert sizes[i] < sizes[i + 1] < sizes[i + 2], sizes


def test_backend_reports_why_it_cannot_run_without_a_driver(built):
    proc = _run_python(built["module"], (
        "import torch\n"
        "from scattermoe.backends import cutlass\n"
        "print(cutlass.unsupported_reason(torch.zeros(4, 8, dtype=torch.bfloat16)))\n"))
    assert proc.returncode == 0, proc.stderr
    reason = proc.stdout.strip().splitlines()[-1]
    if "CUDA error 35" not in reason:
        pytest.skip(f"this machine has a driver: {reason}")
    assert "cudaErrorInsufficientDriver" in reason


def test_gpu_protocol_build_step_prints_the_module_it_built(built):
    """gpu_check.sh's csrc step: ``python -m bench.csrc_memcheck --build-only`` prints the (cached) module's
    absolute path and nothing else on stdout; the workload itself refuses, by name, without CUDA."""
    proc = subprocess.run([sys.executable, "-m", "bench.csrc_memcheck", "--build-only"], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path) and path.endswith(".so"), proc.stdout
    if not torch_cuda_available():
        run = subprocess.run([sys.executable, "-m", "bench.csrc_memcheck"], capture_output=True, text=True, cwd=REPO,
                             timeout=300, env=dict(os.environ, SCATTERMOE_CSRC_MODULE=path))
        assert run.returncode == 2 and "needs a CUDA device" in run.stdout, (run.returncode, run.stdout, run.stderr)


def test_gpu_protocol_build_step_prefers_a_module_prebuilt_for_these_sources(built, tmp_path):
    """bench/prepare_gpu_carry.sh compiles the module off the GPU machine under a key of the sources, the
    Python and the CUTLASS version; the csrc step takes it only when the key is this machine's."""
    build = csrc_build
    key = build.prebuilt_key()
    module = os.path.join(REPO, built["module"])
    assert key.endswith("-py%d%d" % sys.version_info[:2])
    assert build.prebuilt_key((3, 12)) != build.prebuilt_key((3, 11))
    name = os.path.basename(module)
    other = tmp_path / build.prebuilt_key((2, 7)) / "scattermoe" / name  # another Python's: not taken
    other.parent.mkdir(parents=True)
    shutil.copy(module, other)

    def build_only():
        env = dict(os.environ, SCATTERMOE_CSRC_PREBUILT=str(tmp_path))
        proc = subprocess.run([sys.executable, "-m", "bench.csrc_memcheck", "--build-only"], capture_output=True,
                              text=True, cwd=REPO, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert build_only() != str(other)
    mine = tmp_path / key / "scattermoe" / name
    mine.parent.mkdir(parents=True)
    shutil.copy(module, mine)
    assert build_only() == str(mine)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
