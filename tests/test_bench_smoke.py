"""The benchmark harness on the CPU: code paths, the result-file schema, the README generator.

Timings here mean nothing (the Triton kernels run in the interpreter); what is checked is that
every case and implementation is wired, that the files hold what issue 5's schema says, that the
numbers in a row agree with each other, and that the README's section comes from a result file.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_kernel_result

from bench import __main__ as bench_main
from bench import e2e, report, thirdparty

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = {"case": str, "tokens": int, "routing": str, "dtype": str, "impl": str}
SMOKE_IMPLS = "scattermoe_triton,reference,torch_grouped_mm,dense_same_flops"


def _only_json(folder: Path) -> dict:
    files = list(folder.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke run's result file, made once for the module by the first test that calls this. (Made in a
    test's body, not in the fixture's setup: in pytest 9's setup phase the interpreted kernels ran 1.6x
    slower, 130 s instead of 80 s, for a reason not found.)"""
    @functools.cache
    def payload() -> dict:
        out = tmp_path_factory.mktemp("bench-smoke")
        rc = bench_main.main(["--cpu-smoke", "--no-plot", "--out", str(out), "--impls", SMOKE_IMPLS])
        assert rc == 0
        assert len(list(out.glob("*.md"))) == 1
        return _only_json(out)
    return payload


@pytest.mark.interpreter
def test_result_file_has_the_issue_schema(smoke_run):
    p = smoke_run()
    for key in ("device", "commit", "torch", "triton", "cuda", "created", "rows"):
        assert key in p, key
    assert p["device"] == "cpu" and p["smoke_only"] is True and p["torch"] == torch.__version__
    for row in p["rows"]:
        for key, typ in ROW_KEYS.items():
            assert isinstance(row[key], typ), (key, row)
        for key in ("ms", "tflops", "peak_mem_gb"):
            assert key in row, (key, row)
        assert row["routing"] in ("uniform", "zipf")
    cases = {r["case"] for r in p["rows"]}
    assert cases == {"jetmoe_moe_fwd", "jetmoe_moe_bwd", "jetmoe_moe_fwd_bwd", "jetmoe_moe_infer",
                     "jetmoe_moe_infer_graph", "jetmoe_moa_fwd", "jetmoe_moa_fwd_bwd", "jetmoe_glu_gemm_fwd", "routing"}
    assert {r["impl"] for r in p["rows"] if r["case"] == "routing"} == {"scattermoe", "scattermoe_no_assert",
                                                                      "torch_sort", "reference"}
    assert {r["impl"] for r in p["rows"] if r["case"] == "jetmoe_moe_bwd"} == set(SMOKE_IMPLS.split(","))


@pytest.mark.interpreter
def test_every_wired_implementation_ran_and_passed_its_check(smoke_run):
    smoke_payload = smoke_run()
    rows = smoke_payload["rows"]
    # The GEMM-alone case has no torch._grouped_mm row: that baseline is a layer. CUDA-graph replay needs CUDA.
    unavailable = {("jetmoe_glu_gemm_fwd", "torch_grouped_mm")} | {
        ("jetmoe_moe_infer_graph", impl) for impl in SMOKE_IMPLS.split(",")}
    bad = [(r["case"], r["tokens"], r["impl"], r.get("status")) for r in rows if r.get("status") != "ok"
           and not ((r["case"], r["impl"]) in unavailable and r.get("status", "").startswith("unavailable"))]
    assert not bad, bad
    assert all(r.get("status", "").startswith("unavailable") for r in rows if (r["case"], r["impl"]) in unavailable)
    assert all("CUDA graphs need a CUDA device" in r["status"] for r in rows if r["case"] == "jetmoe_moe_infer_graph")
    for shape, impls in (("jetmoe_moe", ("scattermoe_triton", "reference", "torch_grouped_mm")),
                         ("jetmoe_moa", ("scattermoe_triton", "reference", "torch_grouped_mm")),
                         ("jetmoe_glu_gemm", ("scattermoe_triton", "reference"))):
        for impl in impls:
            c = smoke_payload["checks"][shape][impl]
            assert c["ok"], (shape, impl, c)
            # Checked at decode size (T=1, the small-row configs), at a larger T, and with skewed routing.
            assert {label.split()[-2] for label in c["groups"]} == {"T=1", "T=24"}, c["groups"].keys()
            assert any(label.endswith("zipf") for label in c["groups"])
            for label, g in c["groups"].items():
                assert g["ok"] and max(g["rel_err"].values()) < 2e-2, (shape, impl, label, g)
    for c in smoke_payload["checks"]["routing"].values():
        assert c["ok"] and all(g["exact"] for g in c["groups"].values()), c


def test_a_failed_check_never_meets_a_target():
    row = {"case": "jetmoe_moe_fwd_bwd", "tokens": 16384, "routing": "uniform", "ms": 1.0}
    rows = [dict(row, impl="scattermoe_triton", check="FAIL"), dict(row, impl="torch_grouped_mm", ms=10.0),
            dict(row, impl="dense_same_flops", ms=10.0, check="n/a")]
    verdicts = {t["target"]: t["met"] for t in report.targets({"rows": rows})}
    assert verdicts["GLUMLP fwd+bwd vs torch._grouped_mm"] is False
    assert verdicts["GLUMLP fwd+bwd vs dense matmul of the same FLOPs"] is False
    rows[0]["check"], rows[1]["check"] = "ok", "FAIL"  # a baseline that failed is no baseline
    verdicts = {t["target"]: t["met"] for t in report.targets({"rows": rows})}
    assert verdicts["GLUMLP fwd+bwd vs torch._grouped_mm"] is None
    assert verdicts["GLUMLP fwd+bwd vs dense matmul of the same FLOPs"] is True


def test_csrc_targets_are_judged_per_variant_from_the_rows():
    """Issue 3: each csrc variant's fused GLU first GEMM against dense_same_flops (>= 0.8x) and its GLUMLP
    fwd+bwd against Triton's (>= 1.0x); a variant without rows is not listed; a failed check is not met."""
    def row(case, impl, ms, **extra):
        return dict(case=case, impl=impl, ms=ms, tokens=16384, routing="uniform", **extra)
    rows = [row("jetmoe_glu_gemm_fwd", "dense_same_flops", 2.0), row("jetmoe_glu_gemm_fwd", "scattermoe_cutlass", 2.4),
            row("jetmoe_glu_gemm_fwd", "scattermoe_cutlass_persistent", 2.6),
            row("jetmoe_moe_fwd_bwd", "scattermoe_triton", 10.0), row("jetmoe_moe_fwd_bwd", "scattermoe_cutlass", 9.0),
            row("jetmoe_moe_fwd_bwd", "scattermoe_cutlass_persistent", 8.0, check="FAIL")]
    verdicts = {t["target"]: t["met"] for t in report.csrc_targets({"rows": rows})}
    assert verdicts == {
        "scattermoe_cutlass: first MoE GEMM, GLU fused, vs dense matmul of the same FLOPs": True,  # 2.0 / 2.4
        "scattermoe_cutlass: GLUMLP fwd+bwd vs the Triton backend": True,
        "scattermoe_cutlass_persistent: first MoE GEMM, GLU fused, vs dense matmul of the same FLOPs": False,
        "scattermoe_cutlass_persistent: GLUMLP fwd+bwd vs the Triton backend": False,  # faster, but wrong
    }
    assert report.csrc_targets({"rows": rows[:1] + rows[3:4]}) == []
    assert "Targets of the csrc kernels (issue 3)" in report.markdown(
        {"rows": rows, "device": "H100", "commit": "a" * 40, "torch": "2.11", "triton": "3.6", "cuda": "13.0",
         "created": "2026-11-30", "checks": {}})


def test_combine_table_pairs_each_gather_row_with_its_plain_row():
    """NOTES.md 23's readout: scatter ms, gather ms and their ratio per backend and case, only where both rows
    were timed; a failed check is flagged."""
    def row(case, impl, ms, tokens=16384, **extra):
        return dict(case=case, impl=impl, ms=ms, tokens=tokens, routing="uniform", **extra)
    rows = [row("jetmoe_moe_fwd", "scattermoe_triton", 3.0), row("jetmoe_moe_fwd", "scattermoe_triton_gather", 2.5),
            row("jetmoe_moe_fwd", "scattermoe_cutlass", 2.0), row("jetmoe_moe_fwd", "scattermoe_cutlass_gather", None),
            row("jetmoe_moe_infer", "scattermoe_triton", 0.09, tokens=1),
            row("jetmoe_moe_infer", "scattermoe_triton_gather", 0.1, tokens=1, check="FAIL")]
    table = report.combine_table({"rows": rows})
    lines = [line for line in table.splitlines() if line.startswith("| scattermoe")]
    assert lines == ["| scattermoe_triton | jetmoe_moe_fwd | 16384 | 3.000 | 2.500 | 1.20x |",
                     "| scattermoe_triton | jetmoe_moe_infer | 1 | 0.090 | 0.100 | 0.90x (a check FAILED) |"]
    assert report.combine_table({"rows": rows[2:4]}) is None  # the cutlass gather row has no time


@pytest.mark.interpreter
def test_row_numbers_agree(smoke_run):
    """tflops = useful FLOPs / ms, with the FLOPs counted here from the shapes (not by the harness)."""
    smoke_payload = smoke_run()
    cfg = {g["shape"]["name"]: g["shape"] for g in smoke_payload["config"]["groups"]}
    for row in smoke_payload["rows"]:
        if row["status"].startswith("unavailable"):  # GEMM alone: torch._grouped_mm; graph replay on the CPU
            assert row["ms"] is None and (row["impl"] == "torch_grouped_mm" or row["case"].endswith("graph")), row
            continue
        times = row["timing"]["times_ms"]
        assert min(times) <= row["ms"] <= max(times)
        if row["case"] == "routing":
            assert row["tflops"] is None
            continue
        mode = "fwd_bwd" if row["case"].endswith("_fwd_bwd") else row["case"].rsplit("_", 1)[1]
        shape = cfg[row["case"][:-len(mode) - 1]]
        mode = "fwd" if mode == "infer" else mode  # the inference forward does the forward's FLOPs
        n, d, f = row["tokens"] * shape["K"], shape["D"], shape["F"]
        first = 2 * f if shape["kind"] in ("glu", "glu_gemm") else f  # a GLU's first projection outputs 2F
        fwd = 2 * n * d * first + (0 if shape["kind"] == "glu_gemm" else 2 * n * f * d)  # GEMM alone: no second
        mult = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode]
        assert row["tflops"] == pytest.approx(mult * fwd / (row["ms"] * 1e-3) / 1e12, rel=1e-9)
        # Compulsory bytes: the used experts' weights once a pass, every expert's dW, X and Y (forward), X, dY, dX
        # (backward), and the activations between: a GLU's H [N, 2F] (saved, read back), MoA's q and attention
        # output [N, F] (written, read back; backward: 3 such), the GEMM alone's G and H.
        if row["impl"] == "dense_same_flops":  # one weight, not the experts': no MoE bytes
            assert "bytes" not in row and "gb_s" not in row and "roofline_frac" not in row
            continue
        load = next(ld for ld in smoke_payload["loads"] if (ld["shape"], ld["tokens"], ld["routing"]) ==
                    (shape["name"], row["tokens"], row["routing"]))
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[row["dtype"]]
        per_expert = (first * d + (0 if shape["kind"] == "glu_gemm" else f * d)) * size
        w, w_all = load["experts_used_mean"] * per_expert, shape["E"] * per_expert  # the mean over the input sets
        t = row["tokens"]
        if shape["kind"] == "glu_gemm":
            want = (t * d + n * f + n * 2 * f) * size + w
        else:
            fwd_b = (2 * t * d + (2 * n * f if shape["kind"] == "glu" else 2 * n * f)) * size + w
            infer_b = (2 * t * d + (0 if shape["kind"] == "glu" else 2 * n * f)) * size + w
            bwd_b = (3 * t * d + (2 * n * f if shape["kind"] == "glu" else 3 * n * f)) * size + w + w_all
            case_mode = "fwd_bwd" if row["case"].endswith("_fwd_bwd") else row["case"].rsplit("_", 1)[1]
            want = {"fwd": fwd_b, "infer": infer_b, "bwd": bwd_b, "fwd_bwd": fwd_b + bwd_b}[case_mode]
        assert row["bytes"] == pytest.approx(want, rel=1e-12), (row["case"], row["bytes"], want)
        assert row["gb_s"] == pytest.approx(want / (row["ms"] * 1e-3) / 1e9, rel=1e-9)
        assert "roofline_ms" not in row  # no datasheet limits for a CPU


def test_cells_give_the_rate_of_the_bound_that_applies_and_the_share_of_the_roofline():
    limits = {"bf16_flops": 1000e12, "hbm_bytes_s": 4e12}  # ridge point: 250 FLOPs per byte
    decode = {"ms": 0.05, "flops": 1e9, "bytes": 1.6e8, "tflops": 20.0, "gb_s": 3200.0, "roofline_frac": 0.8}
    big = {"ms": 4.0, "flops": 2.5e12, "bytes": 2e9, "tflops": 625.0, "gb_s": 500.0, "roofline_frac": 0.625}
    assert report._cell(decode, limits) == "50.0 us (3200 GB/s, 80%)"  # 6 FLOPs/byte: memory-bound
    assert report._cell(big, limits) == "4.000 (625, 62%)"  # 1250 FLOPs/byte: compute-bound
    cpu = {k: v for k, v in decode.items() if k != "roofline_frac"}
    assert report._cell(cpu) == "50.0 us (20)"  # no limits (a CPU smoke file): TFLOP/s as before
    rows = [dict(decode, case="c", tokens=1, routing="uniform", impl="a", roofline_ms=0.04),
            dict(big, case="c", tokens=16384, routing="uniform", impl="a", roofline_ms=2.5)]
    table = report.case_table(rows, "c", limits=limits)
    assert table.splitlines()[0].rstrip(" |").endswith("roofline")
    assert "40.0 us" in table and "2.500" in table


@pytest.mark.interpreter
def test_markdown_report_has_every_case_and_the_targets(smoke_run):
    smoke_payload = smoke_run()
    md = report.markdown(smoke_payload)
    assert "CPU SMOKE RUN" in md
    for case in ("jetmoe_moe_fwd_bwd", "jetmoe_moa_fwd", "jetmoe_glu_gemm_fwd", "routing", "Targets (issue 5)"):
        assert f"## {case}" in md
    # No GPU: the targets cannot be judged, and the report must not say they were met.
    assert all(t["met"] is None for t in report.targets(smoke_payload))


def test_readme_section_comes_from_the_newest_result(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n<!-- bench:start -->\nhand-typed 9000 TFLOP/s\n<!-- bench:end -->\n\noutro\n")
    assert report.main(["--readme", str(readme), "--results-dir", str(results), "--check"]) == 1
    assert report.main(["--readme", str(readme), "--results-dir", str(results)]) == 0
    text = readme.read_text()
    assert "9000" not in text and "No GPU result file" in text
    assert text.startswith("intro\n\n<!-- bench:start -->") and text.endswith("<!-- bench:end -->\n\noutro\n")

    write_kernel_result(tmp_path / "results", "old.json", "2026-01-01T00:00:00+00:00",
                        {"scattermoe_triton": 20.0, "torch_grouped_mm": 21.0})
    write_kernel_result(tmp_path / "results", "smoke.json", "2027-01-01T00:00:00+00:00",
                        {"scattermoe_triton": 1.0, "torch_grouped_mm": 99.0}, smoke=True)  # never used
    write_kernel_result(tmp_path / "results", "new.json", "2026-06-01T00:00:00+00:00",
                        {"scattermoe_triton": 10.0, "torch_grouped_mm": 15.0, "dense_same_flops": 7.0})
    assert report.main(["--readme", str(readme), "--results-dir", str(results)]) == 0
    text = readme.read_text()
    assert "bench/results/new.json" in text and "old.json" not in text and "99.000" not in text
    # 15 / 10 = 1.50x >= 1.3x: met; 7 / 10 = 0.70x < 0.8x: not met; no original ScatterMoE row: not measured.
    assert "| GLUMLP fwd+bwd vs torch._grouped_mm | >= 1.3x | 1.50x" in text
    assert "0.70x" in text and "NOT met" in text and "not measured" in text
    assert report.main(["--readme", str(readme), "--results-dir", str(results), "--check"]) == 0
    assert "scattermoe_cutlass" not in text  # no csrc rows: no csrc targets
    write_kernel_result(tmp_path / "results", "csrc.json", "2026-07-01T00:00:00+00:00",
                        {"scattermoe_triton": 10.0, "scattermoe_cutlass": 8.0, "torch_grouped_mm": 15.0})
    assert report.main(["--readme", str(readme), "--results-dir", str(results)]) == 0
    assert "scattermoe_cutlass: GLUMLP fwd+bwd vs the Triton backend" in readme.read_text()  # issue 3's targets


def test_repository_readme_section_is_generated():
    """README.md's performance section is exactly what bench.report writes from bench/results/."""
    assert report.main(["--check"]) == 0


def test_smoke_never_writes_into_results():
    assert bench_main.main(["--cpu-smoke", "--out", str(REPO / "bench" / "results")]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda():
    for args in ([], ["--e2e"]):
        proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "CUDA is not available" in proc.stderr


def test_bad_arguments_exit_2():
    assert bench_main.main(["--impls", "nope"]) == 2
    assert bench_main.main(["--shapes", "nope", "--cpu-smoke"]) == 2
    assert bench_main.main(["--tokens", "0", "--cpu-smoke"]) == 2
    assert bench_main.main(["--impls", ",", "--cpu-smoke"]) == 2  # names nothing: would time nothing
    assert bench_main.main(["--skip-impls", "nope:why", "--cpu-smoke"]) == 2
    for flag, value in (("--sets", "-1"), ("--sets", "0"), ("--max-call-ms", "-5"), ("--time-budget", "nan"),
                        ("--hang-s", "0")):
        with pytest.raises(SystemExit) as info:  # argparse's usage error
            bench_main.main([flag, value, "--cpu-smoke"])
        assert info.value.code == 2, (flag, value)


def test_device_limits_match_whole_words_and_know_what_they_do_not_know():
    from bench.harness import device_limits

    labels = {name: (device_limits(name) or {}).get("label") for name in (
        "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
        "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB")}
    assert labels == {"NVIDIA H200": "H200 (datasheet)", "NVIDIA H200 NVL": "H200 NVL (datasheet)",
                      "NVIDIA GH200 480GB": None, "NVIDIA H100 80GB HBM3": "H100 SXM (datasheet)",
                      "NVIDIA H100 PCIe": "H100 PCIe (datasheet)", "NVIDIA H100 NVL": "H100 NVL (datasheet)",
                      "NVIDIA A100-SXM4-80GB": None}


HANG = {"impl": "scattermoe_cutlass", "what": "jetmoe_moe T=16384 uniform fwd_bwd", "after_s": 150.0}


@pytest.mark.parametrize("partial", [{"suite": "full-subset"}, {"hung": HANG}, {"elapsed_s": None}],
                         ids=["subset", "ended_by_a_hang", "killed"])  # killed: its last per-group rewrite
def test_a_partial_run_never_feeds_the_readme_while_a_whole_suite_exists(tmp_path, partial):
    results = tmp_path / "results"
    results.mkdir()
    write_kernel_result(results, "whole.json", "2026-06-01T00:00:00+00:00",
                        {"scattermoe_triton": 10.0, "torch_grouped_mm": 15.0})
    newer = write_kernel_result(results, "newer.json", "2026-07-01T00:00:00+00:00", {"scattermoe_triton": 99.0})
    newer.write_text(json.dumps({**json.loads(newer.read_text()), **partial}))
    assert report.newest_result(results).name == "whole.json"
    (results / "whole.json").unlink()
    assert report.newest_result(results).name == "newer.json"  # with no whole suite, the newest partial one
    assert ("ENDED BY A HANG: scattermoe_cutlass" in report.readme_section(newer)) == ("hung" in partial)
    assert ("INCOMPLETE: the run ended before its last group" in report.readme_section(newer)) == (
        "elapsed_s" in partial)


@pytest.mark.interpreter
def test_a_hung_step_ends_the_run_with_its_files_and_a_rerun_leaves_it_out(tmp_path):
    """--hang-s that the first check cannot meet stands in for a kernel that never finishes: the process ends
    (status 3) from the watch thread, with the files written and the step marked; the rerun with --skip-impls
    from --hang-file keeps that implementation's rows, as unavailable with the reason given."""
    from bench.kernels import skipped_after_hang

    first, skip_file = tmp_path / "first", tmp_path / "skip.txt"
    args = ["--cpu-smoke", "--no-plot", "--impls", "scattermoe_triton,reference", "--shapes", "jetmoe_moe"]
    proc = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(first), "--hang-s", "0.05",
                           "--hang-file", str(skip_file)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "HUNG: scattermoe_triton" in proc.stderr
    payload = _only_json(first)
    assert payload["hung"]["impl"] == "scattermoe_triton"
    assert payload["checks"]["jetmoe_moe"]["scattermoe_triton"]["error"].startswith("hung: no result after 0.05 s")
    assert "ENDED BY A HANG" in next(first.glob("*.md")).read_text()
    assert skip_file.read_text().strip() == "scattermoe_triton,scattermoe_triton_gather"  # its gather row too

    second = tmp_path / "second"
    assert bench_main.main([*args, "--out", str(second),
                            "--skip-impls", skip_file.read_text().strip() + ":it hung in the first run"]) == 0
    payload = _only_json(second)
    assert payload["suite"] == "smoke" and payload["hung"] is None
    rows = [r for r in payload["rows"] if r["impl"] == "scattermoe_triton"]
    assert rows and all(r["status"] == "unavailable: it hung in the first run" for r in rows)
    assert all(r["status"] == "ok" for r in payload["rows"] if r["impl"] == "reference" and "graph" not in r["case"])

    # A routing row's own name (what the hang file holds if one of those hangs) is taken too.
    third = tmp_path / "third"
    assert bench_main.main(["--cpu-smoke", "--no-plot", "--impls", "scattermoe_triton,reference", "--shapes",
                            "routing", "--out", str(third), "--skip-impls", "torch_sort:hung before"]) == 0
    assert {r["status"] for r in _only_json(third)["rows"] if r["impl"] == "torch_sort"} == {"unavailable: hung before"}

    # A hang in one csrc variant leaves out those that build on its kernels; in a plain row, its gather row too.
    assert skipped_after_hang("scattermoe_cutlass") == [
        "scattermoe_cutlass", "scattermoe_cutlass_persistent", "scattermoe_cutlass_tma", "scattermoe_cutlass_gather"]
    assert skipped_after_hang("scattermoe_cutlass_persistent") == [
        "scattermoe_cutlass_persistent", "scattermoe_cutlass_tma"]
    assert skipped_after_hang("scattermoe_cutlass_gather") == ["scattermoe_cutlass_gather"]
    assert skipped_after_hang("torch_grouped_mm") == ["torch_grouped_mm"]


def _main_on_a_pretend_gpu(monkeypatch, out, args, checks=None, rows=()):
    """python -m bench's own logic (arguments, file name, suite, exit status) as on a GPU, with the environment and
    the run stood in for (no kernel runs): (exit status, the result file, its name, the run's config)."""
    import scattermoe.backends
    from bench import harness
    from bench import run as bench_run

    configs = []

    def fake_run(cfg, on_update, on_hang=None):
        configs.append(cfg)
        return {"checks": checks or {}, "loads": [], "rows": list(rows), "notes": [], "grouped_mm": {},
                "elapsed_s": 0.0}

    env = {"date": "2026-12-01", "timestamp_utc": "2026-12-01T10:00:00+00:00", "torch": "2.11", "torch_cuda": "13.0",
           "triton": "3.6", "device": {"name": "NVIDIA H100 80GB HBM3"},
           "git": {"commit": "abcdef0" + "1" * 33, "short": "abcdef0", "dirty": False}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(scattermoe.backends, "_triton_interpreting", lambda: False)
    monkeypatch.setattr(harness, "environment", lambda device: env)
    monkeypatch.setattr(bench_run, "run", fake_run)
    rc = bench_main.main(["--no-plot", "--out", str(out), *args])
    (path,) = out.glob("*.json")
    return rc, json.loads(path.read_text()), path.stem, configs[0]


@pytest.mark.parametrize("args, suite", [
    ([], "full"), (["--suite", "quick"], "quick"), (["--tokens", "1,16384"], "full-subset"),
    (["--shapes", "routing"], "full-subset"), (["--impls", "scattermoe_triton"], "full-subset"),
    (["--suite", "headline", "--tokens", "1"], "headline-subset")])
def test_a_narrowed_run_is_named_and_recorded_as_a_subset(tmp_path, monkeypatch, args, suite):
    """bench/README.md: a run narrowed by --impls, --shapes or --tokens is "<suite>-subset", its files named
    "..._<suite>-subset" (never fed to the README while a whole suite exists); a whole full suite has no suffix.
    On a GPU --hang-s defaults to 150 s."""
    rc, payload, stem, cfg = _main_on_a_pretend_gpu(monkeypatch, tmp_path, args)
    assert rc == 0 and payload["suite"] == suite and not payload["smoke_only"]
    assert stem == "2026-12-01_h100-80gb-hbm3_abcdef0" + ("" if suite == "full" else f"_{suite}")
    assert cfg.hang_s == 150 and payload["limits"]["label"] == "H100 SXM (datasheet)"


def test_exit_status_1_only_when_one_of_the_librarys_implementations_fails_its_check(tmp_path, monkeypatch):
    """A scattermoe implementation (any backend) failing its check is the run's failure (exit 1); a peer's failure
    is a finding, not one; an implementation left out by --skip-impls is not checked."""
    fail, ok = {"ok": False, "groups": {}}, {"ok": True, "groups": {}}
    for i, (impl, check, args, want) in enumerate((
            ("scattermoe_triton", ok, [], 0), ("scattermoe_triton", fail, [], 1), ("scattermoe_cutlass", fail, [], 1),
            ("scattermoe_triton_gather", fail, [], 1), ("scattermoe_original", fail, [], 0),
            ("scattermoe_cutlass", fail, ["--skip-impls", "scattermoe_cutlass:hung"], 0))):
        out = tmp_path / str(i)
        rc = _main_on_a_pretend_gpu(monkeypatch, out, args, {"jetmoe_moe": {impl: check}})[0]
        assert rc == want, (impl, check, args)

    # A row that raised (after its check passed) fails the run the same way; a peer's error does not.
    row = {"case": "jetmoe_moe_fwd", "tokens": 16384, "routing": "uniform", "dtype": "bfloat16", "ms": None,
           "status": "error: RuntimeError: CUDA error: an illegal memory access was encountered"}
    for i, (impl, want) in enumerate((("scattermoe_cutlass", 1), ("torch_grouped_mm", 0))):
        rc = _main_on_a_pretend_gpu(monkeypatch, tmp_path / f"row{i}", [], rows=[dict(row, impl=impl)])[0]
        assert rc == want, impl


def test_skip_impls_leaves_out_every_implementation_it_names_with_the_reason(tmp_path, monkeypatch):
    """gpu_check.sh reruns a hung suite with --skip-impls NAME,NAME,...:REASON (all the csrc variants after the
    one that hung): each of them must be left out, or the rerun hangs on the next one."""
    names = "scattermoe_cutlass,scattermoe_cutlass_persistent,scattermoe_cutlass_tma,scattermoe_cutlass_gather"
    cfg = _main_on_a_pretend_gpu(monkeypatch, tmp_path / "a", ["--skip-impls", f"{names}:hung before"])[3]
    assert cfg.skip_impls == dict.fromkeys(names.split(","), "hung before")
    cfg = _main_on_a_pretend_gpu(monkeypatch, tmp_path / "b", ["--skip-impls", "torch_sort"])[3]
    assert cfg.skip_impls == {"torch_sort": "left out by --skip-impls"}


@pytest.mark.parametrize("ms", [float("nan"), 0.0, -1.0, None], ids=["nan", "zero", "negative", "none"])
def test_a_row_without_a_valid_time_is_not_measured_anywhere(tmp_path, ms):
    path = write_kernel_result(tmp_path, "r.json", "2026-06-01T00:00:00+00:00",
                               {"scattermoe_triton": 10.0, "torch_grouped_mm": 15.0})
    payload = json.loads(path.read_text())
    payload["rows"][0]["ms"] = ms
    payload = json.loads(json.dumps(payload))
    target = report.targets(payload)[0]
    assert target["met"] is None and "not measured" in target["measured"]
    cell = report._cell(payload["rows"][0])
    assert cell == ("not run" if ms is None else f"no valid time ({ms})"), cell  # not a speed
    assert cell in report.markdown(payload)


def test_report_and_plot_refuse_malformed_files_in_one_line(tmp_path, capsys):
    from bench import plot

    good = json.loads(write_kernel_result(tmp_path, "g.json", "2026-06-01T00:00:00+00:00",
                                          {"scattermoe_triton": 10.0, "torch_grouped_mm": 15.0}).read_text())
    duplicate = {**good, "rows": good["rows"] + good["rows"][:1]}
    cases = {"dup.json": (duplicate, "two rows for"), "list.json": ([good], "no 'rows' list"),
             "nocreated.json": ({**good, "created": None}, "missing created"),
             "tokens.json": ({**good, "rows": [{**good["rows"][0], "tokens": "16384"}]}, "not an integer"),
             "memory.json": ({**good, "rows": [{**good["rows"][0], "peak_mem_gb": "10"}]}, "row 0 has peak_mem_gb of "
                             "the wrong type"),
             "fallbacks.json": ({**good, "rows": [{**good["rows"][0], "triton_fallbacks": "dW"}]},
                                "row 0 has triton_fallbacks of the wrong type"),
             "notes.json": ({**good, "notes": "one"}, "notes is not a list")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(content))
        for tool in (report.main, plot.main):
            assert tool([str(path)]) == 2, (name, tool)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and message in err, (name, err)
    assert plot.main([str(tmp_path / "missing.json")]) == 2
    assert "No such file" in capsys.readouterr().err
    # A malformed file among the results is skipped (said), not fatal, when the README is rewritten.
    results = tmp_path / "results"
    results.mkdir()
    (results / "dup.json").write_text(json.dumps({**duplicate, "benchmark": "kernels"}))
    assert report.newest_result(results) is None
    assert "skipping" in capsys.readouterr().err


def test_missing_peers_are_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("SCATTERMOE_THIRD_PARTY", str(tmp_path))
    monkeypatch.delitem(sys.modules, "scattermoe_original", raising=False)
    module, why = thirdparty.load_scattermoe_original()
    assert module is None and "not found" in why and str(tmp_path) in why


@pytest.mark.interpreter
def test_e2e_smoke(tmp_path, monkeypatch):
    from bench import harness

    written = []  # the result file is rewritten after each implementation, so a run cut short keeps rows
    real_write_json = harness.write_json
    monkeypatch.setattr(harness, "write_json", lambda path, payload: (written.append(
        (payload["complete"], len(payload["rows"]))), real_write_json(path, payload))[-1])
    rc = e2e.main(["--cpu-smoke", "--out", str(tmp_path), "--layers", "1", "--batch", "1", "--seq", "8",
                   "--prompt", "4", "--new-tokens", "2", "--repeats", "1"])
    assert rc == 0
    assert [c for c, _ in written] == [False] * 4 + [True], written  # 4 timed implementations, then the end
    assert [n for _, n in written] == sorted(n for _, n in written) and written[0][1] == 3, written
    p = _only_json(tmp_path)
    assert p["complete"]
    assert p["checks"]["ok"] and p["checks"]["jetmoe_vs_transformers_logits_rel_err"] < 1e-4  # float32
    assert p["checks"]["transformers_apply_scattermoe_vs_transformers_logits_rel_err"] < 1e-4  # the patched model
    got = {(r["case"], r["impl"]) for r in p["rows"] if r["status"] == "ok" and r["ms"] is not None}
    timed = [i for i in e2e.IMPLS if i not in ("jetmoe_scattermoe_cutlass", e2e.COMPILED)]  # csrc needs sm_90
    assert got == {(c, i) for c in ("e2e_prefill", "e2e_train_step", "e2e_decode") for i in timed} | {
        ("e2e_prefill", e2e.COMPILED), ("e2e_train_step", e2e.COMPILED)}  # compiled layers: their decode is eager
    # decode's GB/s: the same weight bytes per step for every implementation, over its own time; none elsewhere
    step_bytes = {round(r["gb_s"] * r["ms"] * 1e6) for r in p["rows"] if r["case"] == "e2e_decode" and r["ms"]}
    assert len(step_bytes) == 1 and step_bytes.pop() > 0
    assert all(r.get("gb_s") is None for r in p["rows"] if r["case"] in ("e2e_prefill", "e2e_train_step"))
    (cutlass,) = [r for r in p["rows"] if r["impl"] == "jetmoe_scattermoe_cutlass"]
    assert cutlass["status"].startswith("unavailable: ") and cutlass["ms"] is None, cutlass
    assert "jetmoe_vs_transformers_logits_rel_err_cutlass" not in p["checks"]  # not checked where it cannot run
    # The .md names both checks with their errors (the patched model's was left out before).
    (md,) = tmp_path.glob("*.md")
    ours, patched, compiled = (p["checks"][f"{k}_vs_transformers_logits_rel_err"]
                               for k in ("jetmoe", "transformers_apply_scattermoe", "jetmoe_compiled"))
    md = md.read_text()
    assert f"jetmoe (triton) {ours:.2e}" in md and f"transformers + apply_scattermoe {patched:.2e}" in md, md
    assert f"jetmoe (triton, compiled layers) {compiled:.2e}" in md and compiled < 1e-4, md


def test_e2e_reports_the_median_of_its_repeats():
    """An e2e row's ms is the median of its repeats (the middle one of an odd count), not the fastest or the mean."""
    assert e2e._median([30.0, 10.0, 20.0]) == 20.0
    assert e2e._median([5.0, 1.0, 100.0, 2.0, 3.0]) == 3.0


def test_e2e_refuses_fewer_than_two_new_tokens(tmp_path, capsys, monkeypatch):
    """Decode's ms per token is (n tokens - 1 token) / (n - 1): n = 1 has no step to time."""
    monkeypatch.setattr(e2e, "run", lambda *args, **kwargs: pytest.fail("the model was built and timed"))
    assert e2e.main(["--cpu-smoke", "--out", str(tmp_path), "--new-tokens", "1"]) == 2
    assert "--new-tokens >= 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_names_the_pieces_cutlass_rows_ran_on_triton():
    from bench import report

    rows = [
        {"case": "jetmoe_moe_fwd_bwd", "impl": "scattermoe_cutlass", "triton_fallbacks": ["GLU backward"]},
        {"case": "jetmoe_moe_fwd_bwd", "impl": "scattermoe_cutlass", "triton_fallbacks": ["dW with a row scale"]},
        {"case": "jetmoe_moe_fwd", "impl": "scattermoe_cutlass", "triton_fallbacks": []},
        {"case": "jetmoe_moa_fwd", "impl": "scattermoe_triton", "triton_fallbacks": ["not a cutlass row"]},
    ]
    text = report.fallback_summary(rows)
    assert "jetmoe_moe_fwd_bwd: GLU backward; dW with a row scale" in text
    assert "jetmoe_moe_fwd:" not in text and "not a cutlass row" not in text
    assert report.fallback_summary(rows[2:]) == ""


def test_report_refuses_a_missing_results_folder_and_a_broken_file(tmp_path, capsys):
    from bench import report

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    assert report.main(["--readme", str(readme), "--results-dir", str(tmp_path / "typo")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert "old" in readme.read_text(), "the README was rewritten from a folder that does not exist"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert report.main([str(broken)]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    assert report.main(["--readme", str(tmp_path / "nope.md"), "--results-dir", str(tmp_path)]) == 2


def test_e2e_help_lists_the_end_to_end_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main(["--e2e", "-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--layers" in out and "--suite" not in out, out


def test_decode_target_is_judged_on_the_inference_forward():
    row = {"tokens": 1, "routing": "uniform", "impl": "scattermoe_triton", "hbm_floor_ms": 0.04, "check": "ok"}
    rows = [dict(row, case="jetmoe_moe_fwd", ms=0.1), dict(row, case="jetmoe_moe_infer", ms=0.07)]
    (decode,) = [t for t in report.targets({"rows": rows}) if t["target"].startswith("decode")]
    assert decode["met"] is True and "infer forward" in decode["measured"], decode  # 0.07 / 0.04 <= 2
    (decode,) = [t for t in report.targets({"rows": rows[:1]}) if t["target"].startswith("decode")]
    assert decode["met"] is False and "fwd forward" in decode["measured"], decode  # an older file: 0.1 / 0.04


def test_decode_as_a_graph_replay_is_a_second_line_not_a_replacement():
    row = {"tokens": 1, "routing": "uniform", "impl": "scattermoe_triton", "hbm_floor_ms": 0.04, "check": "ok"}
    rows = [dict(row, case="jetmoe_moe_infer", ms=0.1), dict(row, case="jetmoe_moe_infer_graph", ms=0.06)]
    eager, graph = [t for t in report.targets({"rows": rows}) if t["target"].startswith("decode")]
    assert eager["met"] is False and "infer forward" in eager["measured"]  # 0.1 / 0.04 > 2
    at_two = [dict(row, case=case, ms=0.08) for case in ("jetmoe_moe_infer", "jetmoe_moe_infer_graph")]
    assert [t["met"] for t in report.targets({"rows": at_two}) if t["target"].startswith("decode")] == [True, True]
    assert graph["met"] is True and "CUDA-graph" in graph["target"] and graph["measured"].startswith("1.50x")
    rows[1]["check"] = "FAIL"
    assert [t["met"] for t in report.targets({"rows": rows}) if t["target"].startswith("decode")] == [False, False]


def test_plot_draws_each_implementation_and_the_roofline(tmp_path, plotted_lines):
    from bench.plot import plot

    rows = [dict(case="moe_fwd", tokens=t, routing="uniform", impl="scattermoe_triton", ms=1.0, tflops=t / 10.0,
                 flops=t * 1e8, roofline_ms=0.5) for t in (16, 1024)]
    assert plot({"rows": rows, "device": "test", "commit": "0" * 40}, tmp_path / "p.png") is None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    (roof,) = [ln for ln in plotted_lines if ln.get_label() == "roofline (datasheet)"]
    assert list(roof.get_xdata()) == [16, 1024]
    assert list(roof.get_ydata()) == pytest.approx([t * 1e8 / 0.5 / 1e9 for t in (16, 1024)])  # FLOPs / roofline
    assert "scattermoe_triton" in [ln.get_label() for ln in plotted_lines]


def test_checks_table_reads_the_merged_checks_of_each_group():
    """The .md's correctness table from checks as run.merge_checks stores them (per group under "groups"): each
    tensor's worst error over the groups, routing's exact match, a failure said (it read 'ok | differs' for all)."""
    from bench.run import merge_checks

    def group(y, dx, ok=True):
        return {"rel_err": {"y": y, "dx": dx}, "ok": ok, "tol": 2e-2}
    gemm = merge_checks({"T=1 uniform": {"scattermoe_triton": group(1e-3, 4e-3), "reference": group(2e-4, 1e-4)},
                         "T=512 zipf": {"scattermoe_triton": group(3e-3, 1e-3), "reference": group(5e-2, 1e-4, False)}})
    routing = merge_checks({"T=1 uniform": {"scattermoe": {"exact": True, "ok": True},
                                            "torch_sort": {"exact": True, "ok": True}},
                            "T=512 zipf": {"scattermoe": {"exact": True, "ok": True},
                                           "torch_sort": {"exact": False, "ok": False}}})
    lines = report.checks_table({"checks": {"jetmoe_moe": gemm, "routing": routing}}).splitlines()
    cells = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
             for line in lines[2:]}
    assert cells[("jetmoe_moe", "scattermoe_triton")][2:] == ["ok", "y 3.0e-03, dx 4.0e-03 (worst of 2 checks)"]
    assert cells[("jetmoe_moe", "reference")][2:] == ["FAIL", "y 5.0e-02, dx 1.0e-04 (worst of 2 checks)"]
    assert cells[("routing", "scattermoe")][2:] == ["ok", "exact match in all 2 checks"]
    assert cells[("routing", "torch_sort")][2:] == ["FAIL", "differs in 1 of 2 checks"]
    # A failure in an earlier group stays a failure whatever the later groups say.
    assert merge_checks({"T=1": {"x": group(5e-2, 1e-4, False)}, "T=512": {"x": group(1e-3, 1e-3)}})["x"]["ok"] is False


# ---------------------------------------------------------------- python -m bench.profile


@pytest.mark.interpreter
def test_profile_smoke_tables_each_implementations_ops(tmp_path):
    """bench.profile on the CPU: per case, one table per implementation, the scattermoe kernels' ops named in the
    Triton one, shares summing to 1, a wall time per call, an implementation that cannot run here recorded as
    unavailable (not a failure)."""
    from bench import profile

    rc = profile.main(["--cpu-smoke", "--out", str(tmp_path), "--cases", "fwd_bwd:8,infer:1", "--iters", "1",
                       "--impls", "scattermoe_triton,torch_grouped_mm,sonicmoe"])
    assert rc == 0
    p = _only_json(tmp_path)
    assert p["benchmark"] == "profile" and p["smoke_only"] and p["complete"]
    assert [(c["case"], c["tokens"]) for c in p["cases"]] == [("jetmoe_moe_fwd_bwd", 8), ("jetmoe_moe_infer", 1)]
    for case in p["cases"]:
        by_impl = {r["impl"]: r for r in case["impls"]}
        assert by_impl["sonicmoe"]["status"].startswith("unavailable: ")
        for impl in ("scattermoe_triton", "torch_grouped_mm"):
            res = by_impl[impl]
            assert res["status"] == "ok" and res["wall_us_per_call"] > 0 and res["kernels"] == []  # no device
            assert sum(k["share"] for k in res["host_ops"]) <= 1.0 + 1e-9 and res["host_ops"]
        names = {k["kernel"] for k in by_impl["scattermoe_triton"]["host_ops"]}
        assert "scattermoe::scatter2scatter_glu" in names, names
    train = {r["impl"]: r for r in p["cases"][0]["impls"]}["scattermoe_triton"]["host_ops"]
    assert {"scattermoe::group_bwd_w", "scattermoe::glu_backward"} <= {k["kernel"] for k in train}
    md = (tmp_path / f"{next(tmp_path.glob('*.json')).stem}.md").read_text()
    assert "CPU SMOKE RUN" in md and "## jetmoe_moe_infer, T=1" in md and "### scattermoe_triton: wall" in md
    assert "### sonicmoe\n\nunavailable" in md


def test_profile_refuses_a_smoke_run_into_the_results_folder_and_unknown_impls(capsys):
    from bench import profile

    for argv in (["--cpu-smoke"], ["--cpu-smoke", "--out", str(report.RESULTS_DIR)],
                 ["--impls", "scattermoe_triton,bogus"], ["--impls", "dense_same_flops"], ["--cases", "fwd:0"],
                 ["--cases", "sideways:16"], ["--cases", ","]):
        with pytest.raises(SystemExit) as exc:
            profile.main(argv)
        assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "never bench/results/" in err and "not profiled here: bogus" in err and "dense_same_flops" in err
    assert "'fwd:0' is not MODE:T" in err and "'sideways:16' is not MODE:T" in err and "--cases: none given" in err


def test_profile_table_sums_small_kernels_into_one_line():
    """kernel_table: per-call times (total over the profiled calls), largest first, and the kernels under
    --min-share summed into one line; CPU-side entries left out on the device."""
    from types import SimpleNamespace

    from bench.profile import kernel_table

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = lambda key, us, n, dev=cuda: SimpleNamespace(key=key, self_device_time_total=us, self_cpu_time_total=us,  # noqa: E731
                                                      count=n, device_type=dev)
    events = [ev("small_a", 10, 2), ev("big", 800, 2), ev("mid", 180, 4), ev("small_b", 10, 2),
              ev("aten::mm", 5000, 2, cpu)]
    rows = kernel_table(events, iters=2, on_device=True, min_share=0.05)
    assert [r["kernel"] for r in rows] == ["big", "mid", "(2 others, each under 5%)"]
    assert [r["us_per_call"] for r in rows] == [400, 90, 10]
    assert [r["launches_per_call"] for r in rows] == [1, 2, 2]
    assert [r["share"] for r in rows] == pytest.approx([0.8, 0.18, 0.02])
