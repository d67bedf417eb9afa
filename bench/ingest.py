"""Bring a GPU run's files home: python -m bench.ingest gpu_check.tgz [...].

The device tool returns ``gpu_check.tgz`` (bench/device_call.sh). This unpacks each archive into an ignored
folder (``bench/gpu_runs/``), prints the steps' exit statuses and every failed or errored test from the JUnit
files, copies the result files of the kernel suite and of the e2e suite (``.json`` with its ``.md`` and
``.png``) into ``bench/results/``, rewrites the README's performance section from the newest kernel-suite
file, and prints the targets and whether a csrc row beat Triton's on the headline case (then the device
belongs in ``scattermoe.backends.CUTLASS_PREFERRED_DEVICES``: an edit left to the reader, with the file to
cite). CPU smoke runs and the hf step's fixed-name ``hf_patch.json`` are never copied; a file already in
``bench/results/`` under the same name is kept, and the new one gets a ``-2`` (``-3``...) suffix unless the
two are the same bytes. Nothing is committed.

Exit status: 0 done; 1 no result file found in any archive; 2 bad arguments or an unreadable archive.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Dict, List, Optional

from bench import report

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO_ROOT / "bench" / "gpu_runs"
COMPANIONS = (".md", ".png")  # written beside each result .json by the same run
MAX_FAILURES_SHOWN = 40
CUT_OFF = (EOFError, zlib.error, tarfile.ReadError)  # what reading a truncated .tgz raises


def unpack(archive: Path, runs_dir: Path) -> Path:
    """The archive's files in a new folder of runs_dir named after it; members that would land outside it
    (absolute paths, '..', links) are refused, as tarfile's 'data' filter does."""
    stem = archive.name.removesuffix(".tgz").removesuffix(".tar.gz")
    dest, n = runs_dir / stem, 1
    while dest.exists():
        n += 1
        dest = runs_dir / f"{stem}-{n}"
    data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive) as tar:
            try:
                members, cut = tar.getmembers(), None
            except CUT_OFF as exc:  # a transfer cut short: the members whose headers came before the cut
                members, cut = list(tar.members), exc
            for m in members:
                if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                    raise ValueError(f"{archive}: member {m.name!r} is not a plain file inside the archive")
            dest.mkdir(parents=True)
            kept = 0
            for m in members:
                try:
                    tar.extract(m, dest, **data_filter)
                    kept += 1
                except CUT_OFF as exc:  # this member's data runs past the cut: dropped, not kept half-written
                    (dest / m.name).unlink(missing_ok=True)
                    cut = exc
                    break
    except (tarfile.TarError, *CUT_OFF) as exc:
        raise ValueError(f"{archive}: not a readable .tgz ({type(exc).__name__}: {exc})") from None
    if cut is not None:
        print(f"python -m bench.ingest: warning: {archive} is cut off ({type(cut).__name__}: {cut}); kept the "
              f"{kept} members before the cut", file=sys.stderr)
    return dest


def failed_tests(run: Path) -> List[str]:
    """'part: test id: first line of the message' for each failed or errored test case of run's JUnit files."""
    out = []
    for xml in sorted(run.rglob("junit_*.xml")):
        part = xml.stem.removeprefix("junit_")
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            out.append(f"{part}: {xml.name} is not readable XML ({exc}); the part may have been killed")
            continue
        for case in root.iter("testcase"):
            for bad in (*case.findall("failure"), *case.findall("error")):
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                out.append(f"{part}: {bad.tag}: {name}: {message[0][:200] if message else ''}")
    return out


def result_files(run: Path) -> List[Path]:
    """The .json result files of the kernel and e2e suites and of bench.profile in run (never a CPU smoke run, nor
    hf_patch.json)."""
    found = []
    for path in sorted(run.rglob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"python -m bench.ingest: skipping {path}: not a readable JSON file ({exc})", file=sys.stderr)
            continue
        if not isinstance(payload, dict) or payload.get("smoke_only"):
            continue
        if payload.get("benchmark") == "profile" and isinstance(payload.get("cases"), list):
            found.append(path)  # python -m bench.profile: kernel tables, no rows
        elif payload.get("benchmark") in ("kernels", "e2e") and isinstance(payload.get("rows"), list):
            if payload["benchmark"] == "kernels":
                try:
                    report.check_payload(payload, str(path))
                except ValueError as exc:
                    print(f"python -m bench.ingest: skipping {exc}", file=sys.stderr)
                    continue
            found.append(path)
    return found


def copy_result(path: Path, results_dir: Path) -> Optional[Path]:
    """Copy path and its companions into results_dir; a name already taken by other bytes gets -2, -3...
    Returns the new .json's path, or None when the same file is already there."""
    stem, n = path.stem, 1
    while True:
        target = results_dir / f"{stem if n == 1 else f'{stem}-{n}'}.json"
        if not target.exists():
            break
        if target.read_bytes() == path.read_bytes():
            return None
        n += 1
    for suffix in (".json", *COMPANIONS):
        src = path.with_suffix(suffix)
        if src.exists():
            shutil.copyfile(src, target.with_suffix(suffix))
    return target


def cutlass_verdict(payload: Dict, name: str) -> str:
    """Whether a csrc implementation beat Triton on the headline (GLUMLP fwd+bwd, T=16384, uniform), from rows
    that ran and passed their checks."""
    def ms(impl: str) -> Optional[float]:
        r = report._find(payload["rows"], "jetmoe_moe_fwd_bwd", impl, report.HEADLINE_T)
        return r["ms"] if r and report._measured(r) and not report._failed(r) else None

    triton = ms("scattermoe_triton")
    if triton is None:
        return "the headline has no valid scattermoe_triton time: no csrc verdict"
    timed = {impl: ms(impl) for impl in report.CSRC_IMPLS if ms(impl) is not None}
    if not timed:
        return "no csrc implementation has a valid headline time: no csrc verdict"
    best = min(timed, key=timed.get)
    faster = timed[best] < triton
    return (f"headline GLUMLP fwd+bwd: {best} {timed[best]:.3f} ms vs scattermoe_triton {triton:.3f} ms: "
            + (f"add {payload['device']!r} to scattermoe.backends.CUTLASS_PREFERRED_DEVICES, citing {name}"
               if faster else "Triton stays the default there"))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("archives", nargs="+", type=Path, help="gpu_check.tgz files from bench/device_call.sh")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR, help="default: bench/results/")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where archives are unpacked (default: "
                   "bench/gpu_runs/, ignored by git)")
    p.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", help="the README whose performance "
                   "section is rewritten (default: the repository's)")
    args = p.parse_args(argv)
    try:
        for archive in args.archives:
            if not archive.is_file():
                raise ValueError(f"{archive}: no such file")
        if not args.results_dir.is_dir():
            raise ValueError(f"--results-dir {args.results_dir}: not a directory")
        runs = [unpack(a, args.runs_dir) for a in args.archives]
    except (OSError, ValueError) as exc:
        print(f"python -m bench.ingest: error: {exc}", file=sys.stderr)
        return 2

    copied, found = [], 0
    for run in runs:
        print(f"== {run}")
        for summary in sorted(run.rglob("gpu_check_summary.txt")):
            print(summary.read_text().rstrip())
        failures = failed_tests(run)
        print(f"failed or errored tests: {len(failures)}")
        for line in failures[:MAX_FAILURES_SHOWN]:
            print(f"  {line}")
        if len(failures) > MAX_FAILURES_SHOWN:
            print(f"  ... and {len(failures) - MAX_FAILURES_SHOWN} more (the JUnit files in {run})")
        for path in result_files(run):
            found += 1
            target = copy_result(path, args.results_dir)
            print(f"{path.name}: " + (f"copied to {target}" if target else "already in the results folder"))
            if target:
                copied.append(target)
    if not found:
        print("python -m bench.ingest: no kernel, e2e or profile result file in these archives", file=sys.stderr)
        return 1

    for target in copied:
        payload = json.loads(target.read_text())
        if payload["benchmark"] == "kernels":
            print(f"\n{target.name}: issue 5's targets\n{report.targets_table(payload)}")
            print(f"\n{target.name}: csrc\n{report.targets_table(payload, report.csrc_targets)}")
            print(cutlass_verdict(payload, target.name))
            combine = report.combine_table(payload)
            print(f"\n{target.name}: top-k combine (NOTES.md 23)\n{combine or 'no scatter/gather pair timed'}")
        elif payload["benchmark"] == "profile":
            print(f"\n{target.name}: the largest kernels per call (the .md beside it has the tables)")
            for case in payload["cases"]:
                for res in case["impls"]:
                    top = ", ".join(f"{k['kernel'][:60]} {k['us_per_call'] / 1e3:.2f} ms ({k['share']:.0%})"
                                    for k in res.get("kernels", [])[:3])
                    wall = (f"wall {res['wall_us_per_call'] / 1e3:.2f} ms, kernels "
                            f"{res['kernel_us_per_call'] / 1e3:.2f} ms: " if res["status"] == "ok" else "")
                    print(f"  {case['case']} T={case['tokens']} {res['impl']}: {wall}{top or res['status']}")
    print()
    rc = report.main(["--readme", str(args.readme), "--results-dir", str(args.results_dir)])
    print("review, then commit the results folder and the README (and NOTES.md's Outcomes)")
    return 2 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
