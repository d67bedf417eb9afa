"""python -m bench.ingest on hand-made GPU-run archives: what is copied, what is refused, what is reported."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from helpers import write_kernel_result

from bench import ingest

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="2" failures="1">
<testcase classname="tests.test_gpu" name="test_ok[bf16]"/>
<testcase classname="tests.test_gpu" name="test_broken[bf16]">
<failure message="AssertionError: rel err 3e-1 &gt; 2e-2&#10;second line">trace</failure></testcase>
</testsuite></testsuites>"""


def _run_folder(root: Path, ms: dict, name: str = "2026-12-01_h100_abcdef0") -> Path:
    """The files of one gpu_check.sh run, as its archive holds them."""
    run = root / "run"
    run.mkdir()
    write_kernel_result(run, f"{name}.json", "2026-12-01T10:00:00+00:00", ms)
    (run / f"{name}.md").write_text("# kernel table\n")
    (run / f"{name}.png").write_bytes(b"\x89PNG fake")
    (run / f"{name}_e2e.json").write_text(json.dumps({"benchmark": "e2e", "device": "H100", "rows": []}))
    (run / f"{name}_e2e.md").write_text("# e2e\n")
    profile = {"benchmark": "profile", "device": "H100", "cases": [{"case": "jetmoe_moe_fwd_bwd", "tokens": 16384,
                                                                    "impls": [
        {"impl": "scattermoe_cutlass", "status": "ok", "wall_us_per_call": 41000.0, "kernel_us_per_call": 40000.0,
         "kernels": [{"kernel": "dw_kernel", "us_per_call": 30000.0, "launches_per_call": 2, "share": 0.75},
                     {"kernel": "glu_kernel", "us_per_call": 10000.0, "launches_per_call": 1, "share": 0.25}]},
        {"impl": "scattermoe_original", "status": "unavailable: not found"}]}]}
    (run / f"{name}_profile.json").write_text(json.dumps(profile))
    (run / f"{name}_profile.md").write_text("# profile\n")
    (run / "2026-12-01_cpu_abcdef0_profile-cpu-smoke.json").write_text(json.dumps(dict(profile, smoke_only=True)))
    write_kernel_result(run, "2026-12-01_cpu_abcdef0_cpu-smoke.json", "2026-12-01T09:00:00+00:00", ms, smoke=True)
    (run / "hf_patch.json").write_text(json.dumps({"device": "H100", "rows": [{"impl": "x"}]}))
    (run / "junit_gpu.xml").write_text(JUNIT)
    (run / "junit_cpu.xml").write_text("<testsuites><testsuite")  # a part killed while writing
    (run / "gpu_check_summary.txt").write_text("pytest_gpu_rc=1\nbench_rc=0\n")
    return run


def _archive(run: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(run, arcname=".")
    return path


def _layout(tmp_path):
    results, runs, readme = tmp_path / "results", tmp_path / "runs", tmp_path / "README.md"
    results.mkdir()
    readme.write_text("intro\n<!-- bench:start -->\nold section\n<!-- bench:end -->\n")
    return results, runs, readme


def _ingest(archive, results, runs, readme):
    return ingest.main([str(archive), "--results-dir", str(results), "--runs-dir", str(runs), "--readme", str(readme)])


def test_copies_the_suites_results_and_reports_failures_and_the_csrc_verdict(tmp_path, capsys):
    results, runs, readme = _layout(tmp_path)
    ms = {"scattermoe_triton": 10.0, "scattermoe_cutlass": 8.0, "torch_grouped_mm": 15.0, "dense_same_flops": 9.0}
    archive = _archive(_run_folder(tmp_path, ms), tmp_path / "gpu_check.tgz")
    assert _ingest(archive, results, runs, readme) == 0
    out = capsys.readouterr().out
    assert sorted(f.name for f in results.iterdir()) == sorted([
        "2026-12-01_h100_abcdef0.json", "2026-12-01_h100_abcdef0.md", "2026-12-01_h100_abcdef0.png",
        "2026-12-01_h100_abcdef0_e2e.json", "2026-12-01_h100_abcdef0_e2e.md",
        "2026-12-01_h100_abcdef0_profile.json", "2026-12-01_h100_abcdef0_profile.md"])  # no smoke run, no hf_patch
    assert ("jetmoe_moe_fwd_bwd T=16384 scattermoe_cutlass: wall 41.00 ms, kernels 40.00 ms: dw_kernel 30.00 ms "
            "(75%), glu_kernel 10.00 ms (25%)") in out  # the profile's top kernels
    assert "jetmoe_moe_fwd_bwd T=16384 scattermoe_original: unavailable: not found" in out
    assert (runs / "gpu_check" / "hf_patch.json").exists()  # the whole archive stays unpacked beside
    assert "pytest_gpu_rc=1" in out
    assert "failed or errored tests: 2" in out
    assert "gpu: failure: tests.test_gpu::test_broken[bf16]: AssertionError: rel err 3e-1 > 2e-2" in out
    assert "second line" not in out and "cpu: junit_cpu.xml is not readable XML" in out
    assert ("scattermoe_cutlass 8.000 ms vs scattermoe_triton 10.000 ms: add 'NVIDIA H100 80GB HBM3' to "
            "scattermoe.backends.CUTLASS_PREFERRED_DEVICES, citing 2026-12-01_h100_abcdef0.json") in out
    text = readme.read_text()
    assert "old section" not in text and "2026-12-01_h100_abcdef0.json" in text


def test_a_taken_name_gets_a_suffix_and_the_same_file_is_not_copied_twice(tmp_path, capsys):
    results, runs, readme = _layout(tmp_path)
    write_kernel_result(results, "2026-12-01_h100_abcdef0.json", "2026-12-01T08:00:00+00:00",
                        {"scattermoe_triton": 1.0})
    ms = {"scattermoe_triton": 10.0, "scattermoe_cutlass": 12.0}
    archive = _archive(_run_folder(tmp_path, ms), tmp_path / "gpu_check.tgz")
    assert _ingest(archive, results, runs, readme) == 0
    assert json.loads((results / "2026-12-01_h100_abcdef0.json").read_text())["rows"][0]["ms"] == 1.0  # kept
    assert json.loads((results / "2026-12-01_h100_abcdef0-2.json").read_text())["rows"][0]["ms"] == 10.0
    assert (results / "2026-12-01_h100_abcdef0-2.md").exists() and (results / "2026-12-01_h100_abcdef0-2.png").exists()
    assert "Triton stays the default there" in capsys.readouterr().out
    before = sorted(f.name for f in results.iterdir())
    assert _ingest(archive, results, runs, readme) == 0  # the same archive again: nothing new
    assert sorted(f.name for f in results.iterdir()) == before
    assert "already in the results folder" in capsys.readouterr().out
    assert sorted(d.name for d in runs.iterdir()) == ["gpu_check", "gpu_check-2"]  # each unpacking kept apart


def test_refuses_archives_that_escape_or_hold_no_result(tmp_path, capsys):
    results, runs, readme = _layout(tmp_path)
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.json")
        data = b"{}"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert _ingest(evil, results, runs, readme) == 2
    assert "'../outside.json' is not a plain file inside the archive" in capsys.readouterr().err
    assert not (tmp_path / "outside.json").exists()

    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "gpu_check_summary.txt").write_text("csrc_build_rc=1\n")
    assert _ingest(_archive(empty_run, tmp_path / "empty.tgz"), results, runs, readme) == 1
    assert "no kernel, e2e or profile result file" in capsys.readouterr().err
    assert list(results.iterdir()) == []

    (tmp_path / "junk.tgz").write_bytes(b"not a tar")
    assert _ingest(tmp_path / "junk.tgz", results, runs, readme) == 2
    assert "not a readable .tgz" in capsys.readouterr().err


def test_the_csrc_verdict_needs_its_fastest_variant_strictly_faster_than_triton():
    """Only a csrc variant faster than Triton on the headline case makes the device prefer cutlass; the verdict
    names the fastest variant, and a tie keeps Triton the default."""
    from bench import report

    def row(impl, ms):
        return {"case": "jetmoe_moe_fwd_bwd", "impl": impl, "tokens": report.HEADLINE_T, "routing": "uniform",
                "ms": ms, "check": "ok", "status": "ok"}

    tie = ingest.cutlass_verdict({"device": "NVIDIA H100", "rows": [row("scattermoe_triton", 5.0),
                                                                      row("scattermoe_cutlass", 5.0)]}, "f.json")
    assert "Triton stays the default" in tie, tie
    rows = [row("scattermoe_triton", 5.0), row("scattermoe_cutlass", 4.0), row("scattermoe_cutlass_persistent", 6.0)]
    faster = ingest.cutlass_verdict({"device": "NVIDIA H100", "rows": rows}, "f.json")
    assert "scattermoe_cutlass 4.000 ms" in faster and "CUTLASS_PREFERRED_DEVICES" in faster, faster


def test_a_csrc_row_that_failed_its_check_never_wins_the_verdict():
    """A csrc variant faster than Triton but with a wrong output must not put the device in
    CUTLASS_PREFERRED_DEVICES; the verdict is the fastest among those that passed (or none)."""
    from bench import report

    def row(impl, ms, check="ok"):
        return {"case": "jetmoe_moe_fwd_bwd", "impl": impl, "tokens": report.HEADLINE_T, "routing": "uniform",
                "ms": ms, "check": check, "status": "ok"}

    rows = [row("scattermoe_triton", 5.0), row("scattermoe_cutlass", 4.0, "FAIL"),
            row("scattermoe_cutlass_persistent", 6.0)]
    verdict = ingest.cutlass_verdict({"device": "NVIDIA H100", "rows": rows}, "f.json")
    assert "scattermoe_cutlass_persistent 6.000 ms" in verdict and "Triton stays the default" in verdict, verdict
    verdict = ingest.cutlass_verdict({"device": "NVIDIA H100", "rows": rows[:2]}, "f.json")
    assert "no csrc implementation has a valid headline time" in verdict, verdict
    rows = [row("scattermoe_triton", 5.0, "FAIL"), row("scattermoe_cutlass", 6.0)]
    verdict = ingest.cutlass_verdict({"device": "NVIDIA H100", "rows": rows}, "f.json")
    assert "no valid scattermoe_triton time" in verdict, verdict


def test_errored_tests_are_listed_beside_failed_ones(tmp_path):
    """pytest writes a test that raised outside its body (a fixture, a crashed xdist worker) as <error>, not
    <failure>: those are failures of the GPU run too."""
    (tmp_path / "junit_csrc.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="2" errors="1">'
        '<testcase classname="tests.test_cutlass_gpu" name="test_a"/>'
        '<testcase classname="tests.test_cutlass_gpu" name="test_b">'
        '<error message="worker \'gw3\' crashed while running \'test_b\'"/></testcase></testsuite></testsuites>')
    assert ingest.failed_tests(tmp_path) == [
        "csrc: error: tests.test_cutlass_gpu::test_b: worker 'gw3' crashed while running 'test_b'"]


def test_exit_status_is_2_when_the_readme_cannot_be_rewritten(tmp_path, capsys):
    """The files are copied, but a README without its markers is not rewritten: the run says so (status 2)."""
    results, runs, readme = _layout(tmp_path)
    readme.write_text("no markers here\n")
    archive = _archive(_run_folder(tmp_path, {"scattermoe_triton": 10.0}), tmp_path / "gpu_check.tgz")
    assert _ingest(archive, results, runs, readme) == 2
    assert "expected the markers" in capsys.readouterr().err
    assert (results / "2026-12-01_h100_abcdef0.json").exists()


def test_a_cut_off_archive_keeps_the_files_before_the_cut_and_a_malformed_result_is_skipped_by_name(tmp_path, capsys):
    """A transfer cut short (the device tool's limits, a killed copy) loses only what came after the cut; a result
    file the report could not read is named and skipped (both were tracebacks)."""
    results, runs, readme = _layout(tmp_path)
    run = _run_folder(tmp_path, {"scattermoe_triton": 10.0, "torch_grouped_mm": 15.0})
    bad = json.loads((run / "2026-12-01_h100_abcdef0.json").read_text())
    bad["rows"][0].pop("case")
    (run / "2026-12-01_h100_bad0000.json").write_text(json.dumps(bad))
    (run / "zz_trace.bin").write_bytes(np.random.default_rng(0).bytes(200_000))  # last (members are sorted)
    whole = _archive(run, tmp_path / "whole.tgz").read_bytes()
    archive = tmp_path / "gpu_check.tgz"
    archive.write_bytes(whole[: len(whole) - 50_000])  # the cut falls inside zz_trace.bin
    assert _ingest(archive, results, runs, readme) == 0
    captured = capsys.readouterr()
    assert "is cut off" in captured.err and "kept the" in captured.err, captured.err
    assert "skipping" in captured.err and "bad0000.json: row 0 lacks case" in captured.err, captured.err
    assert sorted(p.name for p in results.glob("*.json")) == ["2026-12-01_h100_abcdef0.json",
                                                              "2026-12-01_h100_abcdef0_e2e.json",
                                                              "2026-12-01_h100_abcdef0_profile.json"]
    assert not list(runs.rglob("zz_trace.bin"))  # not kept half-written
