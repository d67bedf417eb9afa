"""bench/gpu_check.sh's control flow on the CPU, with a stand-in for ``python -m bench`` (the real one needs CUDA).

What is checked is the shell logic that only a GPU session would otherwise exercise: after the kernel suite
hangs (exit status 3, --hang-file naming what to leave out) the script runs it once more with --skip-impls,
keeps csrc out of the later steps when the plain csrc implementation hung, records the hang in its summary and
exits 2 even though the rerun passed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Stands in for the interpreter: `-m bench` hangs the first time (writing HUNG into --hang-file) and passes
# after; `-m pip` succeeds at once; anything else goes to the real interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "bench" ]; then
    printf '%s\\n' "$*" >> "$FAKE_LOG"
    echo "SCATTERMOE_CSRC_MODULE=${SCATTERMOE_CSRC_MODULE:-}" >> "$FAKE_LOG"
    if [ ! -e "$FAKE_STATE" ]; then
        touch "$FAKE_STATE"
        while [ $# -gt 0 ]; do
            if [ "$1" = "--hang-file" ]; then echo "$HUNG" > "$2"; fi
            shift
        done
        exit 3
    fi
    exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


def _run_gpu_check(tmp_path, hung: str, budget_s: int):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log, out = tmp_path / "bench_calls.log", tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "FAKE_LOG": str(log),
           "FAKE_STATE": str(tmp_path / "hung_once"), "HUNG": hung, "GPU_CHECK_STEPS": "bench",
           "GPU_CHECK_BUDGET_S": str(budget_s)}
    env.pop("SCATTERMOE_CSRC_MODULE", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, log.read_text().splitlines(), (out / "gpu_check_summary.txt").read_text()


needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


@needs_bash
@pytest.mark.parametrize("hung", ["scattermoe_cutlass,scattermoe_cutlass_persistent,scattermoe_cutlass_tma",
                                  "torch_grouped_mm"])
def test_a_hung_benchmark_is_run_again_without_what_hung(tmp_path, hung):
    proc, calls, summary = _run_gpu_check(tmp_path, hung, 400)
    assert proc.returncode == 2, proc.stdout[-3000:]  # the rerun passed; the hang is still a failure
    assert len(calls) == 4, calls  # two runs: the arguments, then the csrc module each saw
    first, second = calls[0], calls[2]
    assert "--skip-impls" not in first and "--hang-file" in first
    assert re.search(r"--hang-s 13[0-3] ", first), first  # a third of the ~400 s left (120 to 150)
    assert f"--skip-impls {hung}:hung in this GPU check's first benchmark run" in second
    csrc_disabled = calls[3].endswith("csrc-disabled-after-a-bench-hang")
    assert csrc_disabled == hung.startswith("scattermoe_cutlass,"), calls[3]
    assert "bench_rc=0" in summary and f"bench_hung={hung}" in summary


@needs_bash
def test_the_benchmark_runs_even_when_the_budget_is_spent_but_is_not_rerun(tmp_path):
    """Earlier steps past the budget: the suite still gets its 90 s (the point of the run), with --hang-s at two
    thirds of it (the 120 s floor would outlast the window, and the hard timeout would end a hung run before its
    files were written); after a hang there is no time for a rerun, and the status says so (2), not 0."""
    proc, calls, summary = _run_gpu_check(tmp_path, "torch_grouped_mm", 10)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert len(calls) == 2 and "--hang-s 60 " in calls[0], calls
    assert "not run" in proc.stdout
    assert "bench_rc=3" in summary and "bench_hung=torch_grouped_mm" in summary


@needs_bash
def test_the_hang_limit_is_a_third_of_the_time_left_at_most_150_s(tmp_path):
    """With ~900 s left a third would be 300 s: capped at 150 s, so a hung kernel leaves time for the rerun."""
    proc, calls, summary = _run_gpu_check(tmp_path, "torch_grouped_mm", 900)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "--hang-s 150 " in calls[0], calls


# A stand-in interpreter whose `-m pip` (the install step, the first that runs python) never ends.
SLOW_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$$" > "${SLOW_PID:-/dev/null}"; exec sleep 120; fi
exec "$REAL_PYTHON" "$@"
"""


# One whose benchmark (run under a timeout of gpu_check.sh's own, in a process group of its own) never ends and
# says when it is interrupted.
HANGING_BENCH_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ] || { [ "$1" = "-m" ] && [ "$2" = "pip" ]; }; then exit 0; fi  # versions, install: at once
if [ "$1" = "-m" ] && [ "$2" = "bench" ]; then
    trap 'echo interrupted > "$INTERRUPTED"; exit 130' INT
    sleep 300 &
    wait $!
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _ended(pid: int, wait_s: float = 10.0) -> bool:
    """Whether process pid has ended within wait_s: gone, or a zombie (dead; its reaper, perhaps a container's
    init, may be slow to collect it)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X") or time.monotonic() > deadline:
            return state in ("Z", "X")
        time.sleep(0.1)


def _device_call(tmp_path, env_extra, budget="1", python=SLOW_PYTHON):
    fake = tmp_path / "python"
    fake.write_text(python)
    fake.chmod(0o755)
    out = tmp_path / "OUT"
    out.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "OUT": str(out), **env_extra}
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_call.sh"), "bench", budget], env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out


@needs_bash
def test_device_call_brings_files_back_from_a_run_that_overruns(tmp_path):
    """The device tool returns only what is in $OUT: a run past its budget is snapshotted there, then stopped and
    archived, instead of bringing nothing back."""
    import tarfile

    slow_pid = tmp_path / "slow_pid"
    proc, out = _device_call(tmp_path, {"DEVICE_CALL_WITHOUT_CARRY": "1", "DEVICE_CALL_SNAPSHOT_S": "2",
                                        "DEVICE_CALL_KILL_S": "6", "SLOW_PID": str(slow_pid)})
    assert proc.returncode == 124, proc.stderr[-2000:]
    assert "stopped after 6 s" in proc.stderr
    # The install step (no timeout of its own) was stopped too: it once outlived the call, SIGINT ignored.
    assert _ended(int(slow_pid.read_text()))
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers()}
    assert "gpu_check.log" in names, names  # what the run printed until it was stopped
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz"]  # the partial snapshot replaced


@needs_bash
def test_device_call_refuses_in_seconds_when_third_party_was_not_carried(tmp_path):
    if (REPO / "third_party" / "carried_commit").exists():
        pytest.skip("this checkout has third_party/ prepared")
    proc, out = _device_call(tmp_path, {})
    assert proc.returncode == 65, proc.stderr[-2000:]
    assert "third_party/ was not carried" in (out / "gpu_check_summary.txt").read_text()


@needs_bash
def test_device_call_stops_the_step_running_under_gpu_check_s_own_timeout(tmp_path):
    """The stop reaches the step's process (in a process group of its own under gpu_check.sh's `timeout`), which
    writes its files on SIGINT, and an archive still comes back: a signal to gpu_check.sh's group alone left the
    step running to its own, later, timeout (here 90 s) and cut the log."""
    import tarfile
    import time

    marker = tmp_path / "interrupted"
    start = time.monotonic()
    proc, out = _device_call(tmp_path, {"DEVICE_CALL_WITHOUT_CARRY": "1", "DEVICE_CALL_SNAPSHOT_S": "100",
                                        "DEVICE_CALL_KILL_S": "4", "INTERRUPTED": str(marker)},
                             python=HANGING_BENCH_PYTHON)
    assert time.monotonic() - start < 40, proc.stderr[-2000:]
    assert proc.returncode == 124, proc.stderr[-2000:]
    assert marker.read_text().strip() == "interrupted"
    with tarfile.open(out / "gpu_check.tgz") as tar:
        log = tar.extractfile("./gpu_check.log").read().decode()
    assert "kernel benchmark" in log and "benchmark exit status: 130" in log, log[-2000:]


def _fake_bin(tmp_path, **scripts) -> Path:
    """A folder of stand-in executables (name -> script text), to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        (bin_dir / name.replace("_", "-")).write_text(text)
        (bin_dir / name.replace("_", "-")).chmod(0o755)
    return bin_dir


@needs_bash
def test_device_call_keeps_an_archive_of_a_file_that_changed_while_it_was_read(tmp_path):
    """GNU tar exits 1 when a file changes as it reads it (the log, still written while the snapshot is taken):
    the archive is whole and is kept, and so is the snapshot if the final archive is missing."""
    import tarfile

    bin_dir = _fake_bin(tmp_path, tar=f'#!/usr/bin/env bash\n"{shutil.which("tar")}" "$@"\nexit 1\n')
    proc, out = _device_call(tmp_path, {"DEVICE_CALL_WITHOUT_CARRY": "1", "DEVICE_CALL_SNAPSHOT_S": "2",
                                        "DEVICE_CALL_KILL_S": "6", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 124, proc.stderr[-2000:]
    with tarfile.open(out / "gpu_check.tgz") as tar:
        assert "./gpu_check.log" in tar.getnames()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz"]


# Stands in for `timeout`: records the limit each step was given, then runs the step (which here ends at once).
RECORDING_TIMEOUT = """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do shift; done  # the options (--signal=INT --kill-after=20)
echo "$1 ${*:2}" >> "$LIMITS"
shift
exec "$@"
"""
QUICK_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ] || [ "$1" = "-m" ]; then exit 0; fi  # versions, install and every step: at once
exec "$REAL_PYTHON" "$@"
"""


def _step_limits(tmp_path, steps: str, budget: int):
    """gpu_check.sh with every step a stand-in that ends at once: (the run, {step: the timeout it was given})."""
    bin_dir = _fake_bin(tmp_path, timeout=RECORDING_TIMEOUT, python=QUICK_PYTHON)
    limits = tmp_path / "limits"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "REAL_PYTHON": sys.executable, "LIMITS": str(limits), "GPU_CHECK_STEPS": steps,
           "GPU_CHECK_BUDGET_S": str(budget)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]

    def name(line: str) -> str:
        return ("hf" if "bench_hf_patch" in line else "profile" if "bench.profile" in line
                else "e2e" if "--e2e" in line else "bench" if "-m bench " in line else line)
    return proc, {name(line): int(line.split()[0]) for line in limits.read_text().splitlines()}


@needs_bash
@pytest.mark.parametrize("budget, e2e_at_most", [(400, 310), (200, 200)])
def test_the_e2e_step_leaves_the_hf_step_its_time_where_it_keeps_two_minutes(tmp_path, budget, e2e_at_most):
    """e2e once took all the time left, so hf never ran; now hf's 90 s are kept where e2e still gets 120 (at a
    budget of 200 it gets them all)."""
    _, steps = _step_limits(tmp_path, "e2e hf", budget)
    assert e2e_at_most - 15 <= steps["e2e"] <= e2e_at_most, steps
    assert "hf" in steps, steps  # (the stand-in e2e ends at once)


CSRC_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ] || { [ "$1" = "-m" ] && [ "$2" = "pip" ]; }; then exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "bench.csrc_memcheck" ]; then echo /built/scattermoe_C.so; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "bench" ]; then
    echo "SCATTERMOE_CSRC_MODULE=$SCATTERMOE_CSRC_MODULE" >> "$FAKE_LOG"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""
SLOW_SANITIZER = """#!/usr/bin/env bash
exec sleep 60
"""


@needs_bash
def test_a_memcheck_out_of_time_keeps_csrc_in_the_later_steps(tmp_path):
    """Slow under the sanitizer is no fault: csrc once was disabled for every later step by a memcheck timeout."""
    bin_dir = _fake_bin(tmp_path, python=CSRC_PYTHON, compute_sanitizer=SLOW_SANITIZER)
    log = tmp_path / "bench_calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "REAL_PYTHON": sys.executable, "FAKE_LOG": str(log), "GPU_CHECK_STEPS": "csrc bench",
           "GPU_CHECK_BUDGET_S": "300", "GPU_CHECK_MEMCHECK_S": "2", "SCATTERMOE_CUTLASS_INCLUDE": "/headers"}
    env.pop("SCATTERMOE_CSRC_MODULE", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "memcheck exit status: 124" in proc.stdout, proc.stdout[-3000:]
    assert log.read_text().strip() == "SCATTERMOE_CSRC_MODULE=/built/scattermoe_C.so"
    assert proc.returncode == 1  # memcheck did not finish: not a pass


@needs_bash
@pytest.mark.parametrize("budget, profile_s", [(400, 120), (200, 110), (120, None)])
def test_the_profile_step_takes_at_most_two_minutes_and_leaves_the_suite_its_floor(tmp_path, budget, profile_s):
    """python -m bench.profile (which kernels the headline case spends its time in) runs before the kernel suite,
    for at most 120 s and never into the suite's 90 s floor; under 45 s it is skipped."""
    proc, steps = _step_limits(tmp_path, "profile bench", budget)
    if profile_s is None:
        assert "profile" not in steps and "profile_rc=skipped" in proc.stdout, steps
    else:
        assert profile_s - 10 <= steps["profile"] <= profile_s, steps
        assert "profile_rc=0" in proc.stdout
    assert steps["bench"] >= 90, steps
