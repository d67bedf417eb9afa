"""Tables from a result file: the run's markdown, its performance targets (met or not), and the README's section.

    python -m bench.report                    # rewrite README.md's section from the newest result file
    python -m bench.report --check            # exit 1 if README.md's section is not what it would write
    python -m bench.report RESULT.json        # print that file's markdown report

The README's performance section sits between ``<!-- bench:start -->`` and ``<!-- bench:end -->``
and is only ever written by this module, from the newest kernel-suite file in bench/results/
(CPU smoke runs never count).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .harness import REPO_ROOT, RESULTS_DIR, markdown_table

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
HEADLINE_T = 16384


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value) -> bool:
    """A finite, positive number (NaN, 0, negative, missing or not a number: no measurement)."""
    return _number(value) and math.isfinite(value) and value > 0


def _measured(row: Dict) -> bool:
    """A row with a time: a finite, positive number of ms."""
    return _positive(row.get("ms"))


def _find(rows: List[Dict], case: str, impl: str, tokens: int, routing: str = "uniform") -> Optional[Dict]:
    for r in rows:
        if (r["case"], r["impl"], r["tokens"], r["routing"]) == (case, impl, tokens, routing) and _measured(r):
            return r
    return None


ROW_KEY = ("case", "tokens", "routing", "dtype", "impl")
# Row fields the report formats as numbers (absent or null: not measured).
NUMBER_FIELDS = ("ms", "tflops", "gb_s", "peak_mem_gb", "held_gb", "hbm_floor_ms", "hbm_bytes_s", "roofline_frac",
                 "max_over_mean", "vs_dense")


def check_payload(payload, name: str = "result") -> Dict:
    """The payload of a kernel-suite result file, or a ValueError saying what is wrong with it: not an object,
    a missing field the report reads, a row without its key fields, or two rows for the same measurement
    (which the targets and the tables would otherwise read differently)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise ValueError(f"{name}: not a result file of python -m bench (no 'rows' list)")
    missing = [k for k in ("device", "commit", "created", "torch", "triton") if not payload.get(k)]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)}")
    seen = set()
    for i, r in enumerate(payload["rows"]):
        if not isinstance(r, dict) or any(k not in r for k in ("case", "tokens", "routing", "impl")):
            raise ValueError(f"{name}: row {i} lacks case, tokens, routing or impl")
        if not (isinstance(r["tokens"], int) and not isinstance(r["tokens"], bool)
                and all(isinstance(r[k], str) for k in ("case", "routing", "impl"))):
            raise ValueError(f"{name}: row {i} has a case, routing or impl that is not a string, or tokens that are "
                             "not an integer")
        bad = [k for k in NUMBER_FIELDS if r.get(k) is not None and not _number(r[k])]
        if not isinstance(r.get("triton_fallbacks") or [], list):
            bad.append("triton_fallbacks")
        if bad:
            raise ValueError(f"{name}: row {i} has {', '.join(bad)} of the wrong type (numbers; a list of pieces)")
        key = tuple(r.get(k) for k in ROW_KEY)
        if key in seen:
            raise ValueError(f"{name}: two rows for {dict(zip(ROW_KEY, key))}")
        seen.add(key)
    if not isinstance(payload.get("notes") or [], list):
        raise ValueError(f"{name}: notes is not a list")
    return payload


def _failed(row: Dict) -> bool:
    return row.get("check") == "FAIL"


def _unless_failed(target: Dict, *rows: Dict) -> Dict:
    """A target measured on a row whose output failed its check is not met."""
    if any(_failed(r) for r in rows if r) and target["met"] is not None:
        target.update(measured=target["measured"] + "; FAILED its correctness check", met=False)
    return target


def _ratio_target(rows, name, impl, other, case, want, what) -> Dict:
    mine, theirs = _find(rows, case, impl, HEADLINE_T), _find(rows, case, other, HEADLINE_T)
    if mine is None or theirs is None:
        missing = impl if mine is None else other
        return {"target": name, "want": want, "measured": f"not measured ({missing} has no {case} row "
                f"at T={HEADLINE_T})", "met": None}
    ratio = theirs["ms"] / mine["ms"]
    measured = f"{ratio:.2f}x ({what}: {mine['ms']:.3f} ms vs {theirs['ms']:.3f} ms)"
    if _failed(mine):  # a wrong result is not fast, however quick
        return {"target": name, "want": want, "measured": measured + f"; {impl} FAILED its check", "met": False}
    if _failed(theirs):
        return {"target": name, "want": want, "measured": measured + f"; {other} FAILED its check, no baseline",
                "met": None}
    return {"target": name, "want": want, "measured": measured,
            "met": ratio >= float(want.split("x")[0].lstrip(">= "))}


def targets(payload: Dict, impl: str = "scattermoe_triton") -> List[Dict]:
    """Issue 5's targets, each {target, want, measured, met (True/False/None = not measured)}."""
    rows = payload["rows"]
    out = [
        _ratio_target(rows, "GLUMLP fwd+bwd vs torch._grouped_mm", impl, "torch_grouped_mm",
                      "jetmoe_moe_fwd_bwd", ">= 1.3x", "time"),
        _ratio_target(rows, "GLUMLP fwd+bwd vs dense matmul of the same FLOPs", impl, "dense_same_flops",
                      "jetmoe_moe_fwd_bwd", ">= 0.8x", "time"),
        _ratio_target(rows, "GLUMLP fwd+bwd vs the original ScatterMoE", impl, "scattermoe_original",
                      "jetmoe_moe_fwd_bwd", ">= 1.5x", "time"),
    ]
    mine, ref = _find(rows, "jetmoe_moe_fwd", impl, HEADLINE_T), _find(rows, "jetmoe_moe_fwd", "reference", HEADLINE_T)
    if mine and ref and _positive(mine.get("held_gb")) and _positive(ref.get("held_gb")):
        out.append(_unless_failed({"target": "memory kept by the forward for backward", "want": "<= reference",
                                   "measured": f"{mine['held_gb']:.2f} GB vs reference {ref['held_gb']:.2f} GB",
                                   "met": mine["held_gb"] <= ref["held_gb"] + 1e-3}, mine))
    else:
        out.append({"target": "memory kept by the forward for backward", "want": "<= reference",
                    "measured": "not measured", "met": None})
    shares = []
    for r in rows:
        if r["case"] == "routing" and r["impl"] == "scattermoe" and _measured(r) and r["tokens"] >= 4096:
            layer = _find(rows, "jetmoe_moe_fwd", impl, r["tokens"], r["routing"])
            if layer:
                shares.append((r["ms"] / layer["ms"], r["tokens"], r["routing"], _failed(r) or _failed(layer)))
    if shares:
        worst = max(shares)
        out.append({"target": "routing share of the layer's forward, T >= 4096", "want": "< 5%",
                    "measured": f"at most {100 * worst[0]:.1f}% (T={worst[1]} {worst[2]}; {len(shares)} sizes)"
                    + ("; FAILED its correctness check" if any(s[3] for s in shares) else ""),
                    "met": worst[0] < 0.05 and not any(s[3] for s in shares)})
    else:
        out.append({"target": "routing share of the layer's forward, T >= 4096", "want": "< 5%",
                    "measured": "not measured", "met": None})
    # Decode is inference: the no-grad forward where the run has it, else the training forward (older files).
    decode = _find(rows, "jetmoe_moe_infer", impl, 1) or _find(rows, "jetmoe_moe_fwd", impl, 1)
    if decode and _positive(decode.get("hbm_floor_ms")):
        x = decode["ms"] / decode["hbm_floor_ms"]
        out.append(_unless_failed({"target": "decode (T=1) forward vs reading the active experts' weights once",
                                   "want": "<= 2x", "measured": f"{x:.2f}x ({decode['ms'] * 1e3:.0f} us vs "
                                   f"{decode['hbm_floor_ms'] * 1e3:.0f} us at datasheet HBM bandwidth; "
                                   f"{decode['case'].rsplit('_', 1)[1]} forward)",
                                   "met": x <= 2.0}, decode))
    else:
        out.append({"target": "decode (T=1) forward vs reading the active experts' weights once",
                    "want": "<= 2x", "measured": "not measured", "met": None})
    # The same forward replayed as a CUDA graph (how serving stacks run decode): no launch overhead.
    graph = _find(rows, "jetmoe_moe_infer_graph", impl, 1)
    if graph and _positive(graph.get("hbm_floor_ms")):
        x = graph["ms"] / graph["hbm_floor_ms"]
        out.append(_unless_failed({"target": "decode (T=1) forward as a CUDA-graph replay vs reading the weights once",
                                   "want": "<= 2x", "measured": f"{x:.2f}x ({graph['ms'] * 1e3:.0f} us vs "
                                   f"{graph['hbm_floor_ms'] * 1e3:.0f} us)", "met": x <= 2.0}, graph))
    return out


CSRC_IMPLS = ("scattermoe_cutlass", "scattermoe_cutlass_persistent", "scattermoe_cutlass_tma")


def csrc_targets(payload: Dict) -> List[Dict]:
    """Issue 3's targets, for each csrc variant the file has rows of: its fused GLU first GEMM against a dense
    matmul of the same FLOPs, and its GLUMLP forward+backward against the Triton backend's, both at the headline."""
    rows, out = payload["rows"], []
    for impl in CSRC_IMPLS:
        if any(r["impl"] == impl for r in rows):
            out.append(_ratio_target(rows, f"{impl}: first MoE GEMM, GLU fused, vs dense matmul of the same FLOPs",
                                     impl, "dense_same_flops", "jetmoe_glu_gemm_fwd", ">= 0.8x", "time"))
            out.append(_ratio_target(rows, f"{impl}: GLUMLP fwd+bwd vs the Triton backend", impl,
                                     "scattermoe_triton", "jetmoe_moe_fwd_bwd", ">= 1.0x", "time"))
    return out


# The gather top-k combine's rows against their plain (scatter) rows (bench/kernels.py GATHER_IMPLS, NOTES.md 23).
COMBINE_PAIRS = (("scattermoe_triton", "scattermoe_triton_gather"), ("scattermoe_cutlass", "scattermoe_cutlass_gather"))
COMBINE_CASES = (("jetmoe_moe_fwd", HEADLINE_T), ("jetmoe_moe_fwd_bwd", HEADLINE_T), ("jetmoe_moe_infer", 1),
                 ("finegrained_e64_fwd_bwd", HEADLINE_T))


def combine_table(payload: Dict) -> Optional[str]:
    """Scatter against gather combine, per backend and case (uniform routing), where both rows were timed; None
    when no pair was. speedup > 1: gather is faster."""
    rows, out = payload["rows"], []
    for plain, gather in COMBINE_PAIRS:
        for case, tokens in COMBINE_CASES:
            a, b = _find(rows, case, plain, tokens), _find(rows, case, gather, tokens)
            if a and b:
                note = " (a check FAILED)" if _failed(a) or _failed(b) else ""
                out.append([plain, case, str(tokens), f"{a['ms']:.3f}", f"{b['ms']:.3f}",
                            f"{a['ms'] / b['ms']:.2f}x{note}"])
    if not out:
        return None
    return markdown_table(["backend", "case", "T", "scatter ms", "gather ms", "gather speedup"], out)


def _verdict(met: Optional[bool]) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def targets_table(payload: Dict, which: Callable[[Dict], List[Dict]] = targets) -> str:
    rows = [[t["target"], t["want"], t["measured"], _verdict(t["met"])] for t in which(payload)]
    return markdown_table(["target (JetMoE-8B MoE, bf16, uniform, T=16384 unless said)", "want", "measured",
                           "verdict"], rows)


def _memory_bound(r: Dict, limits: Optional[Dict]) -> bool:
    """Below the device's ridge point: its compulsory bytes take longer than its FLOPs at the datasheet rates."""
    return bool(limits and r.get("bytes") and r.get("flops")
                and r["bytes"] / limits["hbm_bytes_s"] > r["flops"] / limits["bf16_flops"])


def _cell(r: Dict, limits: Optional[Dict] = None) -> str:
    """'ms (TFLOP/s)', or '(GB/s)' where the case is memory-bound; ', N%' of the roofline when known."""
    if not _measured(r):
        status = str(r.get("status") or ("not run" if r.get("ms") is None else f"no valid time ({r['ms']})"))
        return "—" if status.startswith("unavailable") else status.split(":")[0]
    text = f"{r['ms']:.3f}" if r["ms"] >= 0.1 else f"{r['ms'] * 1e3:.1f} us"
    rate = ""
    if _memory_bound(r, limits) and r.get("gb_s"):
        rate = f"{r['gb_s']:.0f} GB/s"
    elif r.get("tflops"):
        rate = f"{r['tflops']:.0f}" if r["tflops"] >= 10 else f"{r['tflops']:.2g}"
    if rate and r.get("roofline_frac"):
        rate += f", {r['roofline_frac'] * 100:.0f}%"
    if rate:
        text += f" ({rate})"
    if r.get("check") == "FAIL":
        text += " FAIL"
    return text


def case_table(rows: List[Dict], case: str, routings: Tuple[str, ...] = ("uniform", "zipf"),
               limits: Optional[Dict] = None) -> str:
    """Tokens down, implementations across; cells 'ms (TFLOP/s or GB/s, % of the roofline)'; the roofline's time
    (or, in files without it, the forward's HBM floor) in the last column."""
    mine = [r for r in rows if r["case"] == case and r["routing"] in routings]
    impls = [i for i in dict.fromkeys(r["impl"] for r in mine)
             if any(r["impl"] == i and r.get("status") != "unavailable" and not
                    str(r.get("status", "")).startswith("unavailable") for r in mine)]
    keys = list(dict.fromkeys((r["tokens"], r["routing"]) for r in mine))
    keys.sort(key=lambda k: (routings.index(k[1]), k[0]))
    bound_key = "roofline_ms" if any(r.get("roofline_ms") for r in mine) else "hbm_floor_ms"
    floor = any(r.get(bound_key) for r in mine)
    body = []
    for t, routing in keys:
        cells = {r["impl"]: r for r in mine if (r["tokens"], r["routing"]) == (t, routing)}
        line = [str(t), routing] + [_cell(cells[i], limits) if i in cells else "" for i in impls]
        if floor:
            f = next((r.get(bound_key) for r in cells.values() if r.get(bound_key)), None)
            line.append("" if not f else f"{f:.3f}" if f >= 0.1 else f"{f * 1e3:.1f} us")
        body.append(line)
    header = ["T", "routing"] + impls + ([{"roofline_ms": "roofline", "hbm_floor_ms": "HBM floor"}[bound_key]]
                                         if floor else [])
    return markdown_table(header, body, ["r", "l"] + ["r"] * (len(header) - 2))


def memory_table(rows: List[Dict], tokens: int = HEADLINE_T) -> str:
    body = []
    for r in rows:
        if r["tokens"] == tokens and r["routing"] == "uniform" and r.get("peak_mem_gb") is not None:
            body.append([r["case"], r["impl"], f"{r['peak_mem_gb']:.2f}", f"{r.get('extra_gb') or 0:.2f}",
                         f"{r['held_gb']:.2f}" if r.get("held_gb") is not None else "—"])
    return markdown_table(["case", "impl", "peak GB", "extra GB", "held GB"], body, ["l", "l", "r", "r", "r"])


def _check_detail(groups: Dict[str, Dict]) -> str:
    """An implementation's check over its groups (run.merge_checks: T=1, larger T, Zipf): each tensor's worst
    relative error, or whether routing matched exactly in every group."""
    worst: Dict[str, float] = {}
    for g in groups.values():
        for name, err in (g.get("rel_err") or {}).items():
            worst[name] = max(worst.get(name, 0.0), err)
    over = f" (worst of {len(groups)} checks)" if len(groups) > 1 else ""
    if worst:
        return ", ".join(f"{name} {err:.1e}" for name, err in worst.items()) + over
    if all("exact" in g for g in groups.values()):
        differ = sum(not g["exact"] for g in groups.values())
        if differ:
            return f"differs in {differ} of {len(groups)} checks" if len(groups) > 1 else "differs"
        return f"exact match in all {len(groups)} checks" if len(groups) > 1 else "exact match"
    return "—"


def checks_table(payload: Dict) -> str:
    body = []
    for shape, per_impl in (payload.get("checks") or {}).items():
        for impl, c in per_impl.items():
            if "unavailable" in c:
                verdict, detail = "unavailable", c["unavailable"]
            elif "error" in c:
                verdict, detail = "ERROR", c["error"]
            elif "not_compared" in c:
                verdict, detail = "n/a", c["not_compared"]
            else:
                verdict, detail = ("ok" if c["ok"] else "FAIL"), _check_detail(c.get("groups") or {"": c})
            body.append([shape, impl, verdict, detail])
    return markdown_table(["shape", "impl", "check", "||out - ref|| / ||ref|| per tensor"], body)


def header(payload: Dict) -> str:
    env = payload.get("environment", {})
    lim = payload.get("limits") or {}
    dirty = " (uncommitted changes)" if env.get("git", {}).get("dirty") else ""
    text = (f"{payload['device']}, {payload['created'][:10]}, commit `{payload['commit'][:7]}`{dirty}; "
            f"torch {payload['torch']} (CUDA {payload['cuda']}), triton {payload['triton']}.")
    if lim:
        text += (f" Limits used: {lim['label']}, {lim['bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16, "
                 f"{lim['hbm_bytes_s'] / 1e12:.2f} TB/s HBM.")
    return text


def fallback_summary(rows: List[Dict]) -> str:
    """Which pieces of the scattermoe_cutlass rows ran on Triton (the rows' triton_fallbacks), per case."""
    per_case: Dict[str, set] = {}
    for r in rows:
        if r["impl"].startswith("scattermoe_cutlass") and r.get("triton_fallbacks"):
            per_case.setdefault(r["case"], set()).update(r["triton_fallbacks"])
    if not per_case:
        return ""
    return "scattermoe_cutlass rows that ran some pieces on Triton:\n" + "\n".join(
        f"- {case}: {'; '.join(sorted(pieces))}" for case, pieces in per_case.items())


def hang_note(payload: Dict) -> str:
    hung = payload.get("hung")
    if not hung:
        if payload.get("elapsed_s") is None and not payload.get("smoke_only"):  # written after each group
            return ("> INCOMPLETE: the run ended before its last group (no elapsed_s), so cases are missing "
                    "from this file.\n\n")
        return ""
    return (f"> ENDED BY A HANG: {hung['impl']} ({hung['what']}) had not finished after {hung['after_s']:g} s; the "
            "run stopped there, so the cases after it are missing from this file.\n\n")


def markdown(payload: Dict) -> str:
    """The whole report of one kernel-suite result file."""
    rows = payload["rows"]
    smoke = "> CPU SMOKE RUN: a code-path check at tiny shapes. Its timings mean nothing.\n\n" \
        if payload.get("smoke_only") else ""
    parts = [f"# scattermoe kernel benchmark — {payload['device']}", smoke + hang_note(payload) + header(payload),
             "Cells: median ms (useful TFLOP/s, or GB/s of compulsory traffic where the case is memory-bound at "
             "the datasheet rates; then the % of the roofline reached) over the repeats, L2 flushed before each "
             "call, input sets rotated. 'roofline' is the time of the slower of the useful FLOPs at the datasheet "
             "peak and the compulsory bytes (the used experts' weights read, every expert's dW written, the "
             "layer's inputs and outputs and the activations that must cross HBM, each once: bench/kernels.py "
             "useful_bytes) at the datasheet bandwidth. "
             "dense_same_flops reads one weight, not E: it is the ceiling only where the layer is compute-bound "
             "(large T); at small T the bytes are the bound. FAIL: the output failed its correctness check. "
             "— : not available here (reason in the JSON row). Protocol: bench/README.md.",
             "## Targets (issue 5)", targets_table(payload)]
    if csrc_targets(payload):
        parts += ["## Targets of the csrc kernels (issue 3)", targets_table(payload, csrc_targets)]
    combine = combine_table(payload)
    if combine:
        parts += ["## The top-k combine: scatter (default) or gather (NOTES.md 23)", combine]
    for case in dict.fromkeys(r["case"] for r in rows):
        parts += [f"## {case}", case_table(rows, case, limits=payload.get("limits"))]
    loads = [ld for ld in payload.get("loads", []) if ld["routing"] == "zipf" and ld["tokens"] >= 1024]
    if loads:
        parts.append("Zipf routing, rows per expert: " + "; ".join(
            f"{ld['shape']} T={ld['tokens']}: max/mean {ld['max_over_mean']:.2f}" for ld in loads) + ".")
    parts += [f"## Memory at T={HEADLINE_T}, uniform", memory_table(rows),
              "peak: allocated at the call's peak (weights and inputs included); extra: above what was "
              "allocated before the call; held: still allocated while the result lives (a forward's "
              "activations kept for backward, and its output).",
              "## Correctness checks", checks_table(payload)]
    fallbacks = fallback_summary(rows)
    if fallbacks:
        parts.append(fallbacks)
    if payload.get("notes"):
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in payload["notes"]))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- README


def newest_result(results_dir: Path = RESULTS_DIR) -> Optional[Path]:
    """The newest full kernel-suite result file by its 'created' time (else the newest partial one; never a
    smoke run)."""
    found = []
    for path in results_dir.glob("*.json"):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"python -m bench.report: skipping {path}: not a readable JSON file ({exc})", file=sys.stderr)
            continue
        if not isinstance(payload, dict):
            continue
        if payload.get("benchmark") == "kernels" and not payload.get("smoke_only") and payload.get("rows"):
            try:
                check_payload(payload, path.name)
            except ValueError as exc:
                print(f"python -m bench.report: skipping {exc}", file=sys.stderr)
                continue
            # A full suite before any partial one (quick, headline, a subset, one ended by a hang or killed: the
            # file is rewritten after each group, and elapsed_s is set at the end): the targets need every case.
            whole = (payload.get("suite", "full") == "full" and not payload.get("hung")
                     and payload.get("elapsed_s") is not None)
            found.append((whole, str(payload.get("created") or ""), path.name, path))
    return max(found)[-1] if found else None


def readme_section(result: Optional[Path]) -> str:
    if result is None:
        return ("No GPU result file is committed yet, so this section states no speed. It is written by "
                "`python -m bench.report` from the newest file in `bench/results/` after a GPU run "
                "(`bash bench/gpu_check.sh OUT`, see `bench/README.md`).")
    payload = json.loads(result.read_text())
    md = result.with_suffix(".md").name
    return "\n\n".join([
        hang_note(payload) + f"From [`bench/results/{result.name}`](bench/results/{result.name}) (full tables: "
        f"[`{md}`](bench/results/{md})): " + header(payload),
        targets_table(payload),
        *([targets_table(payload, csrc_targets)] if csrc_targets(payload) else []),
        "JetMoE-8B MoE layer (GLU, D=2048, F=5632, E=8, k=2), forward+backward, bf16; median ms (useful "
        "TFLOP/s, or GB/s where memory-bound; % of the datasheet roofline, whose time is the last column):",
        case_table(payload["rows"], "jetmoe_moe_fwd_bwd", limits=payload.get("limits")),
    ])


def update_readme(readme: Path, result: Optional[Path]) -> Tuple[str, str]:
    """(old text, new text) of the README with its section regenerated."""
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{readme}: expected the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return text, f"{head}{START}\n{readme_section(result)}\n{END}{tail}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n\n")[0],
        epilog="Without a result file: rewrites the performance section of --readme (between its bench:start "
               "and bench:end markers) from the newest kernel-suite file in --results-dir.")
    p.add_argument("result", nargs="?", type=Path, help="print this result file's markdown report and exit")
    p.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", help="the README to rewrite "
                   "(default: the repository's)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where result files are (default: "
                   "bench/results/)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README's section is stale")
    args = p.parse_args(argv)
    try:
        if args.result is not None:
            try:
                payload = json.loads(args.result.read_text())
            except ValueError as exc:
                raise ValueError(f"{args.result}: not valid JSON ({exc})") from None
            print(markdown(check_payload(payload, str(args.result))))
            return 0
        if not args.results_dir.is_dir():
            raise ValueError(f"--results-dir {args.results_dir}: not a directory")
        result = newest_result(args.results_dir)
        if result is None:
            print(f"python -m bench.report: no kernel-suite result file in {args.results_dir}; the section says "
                  "that no GPU result is committed", file=sys.stderr)
        old, new = update_readme(args.readme, result)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"python -m bench.report: error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as exc:  # a field of an unexpected type: one line, not a traceback
        print(f"python -m bench.report: error: a malformed result file ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    if args.check:
        if old != new:
            print(f"{args.readme}: the performance section is stale; run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    if old != new:
        args.readme.write_text(new)
    print(f"{args.readme}: performance section {'updated' if old != new else 'already up to date'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
