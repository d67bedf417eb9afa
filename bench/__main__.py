"""python -m bench [--suite full|quick|headline] [...]: the kernel suite on CUDA; --e2e: the JetMoE suite.

Kernel suite (bench/kernels.py): every case of issue 5 / DESIGN.md section 7 (MoE GLU fwd, bwd,
fwd+bwd; MoA projections; routing alone; fine-grained shapes; T from 1 to 32768, uniform and Zipf)
for every implementation present, side by side in one run. Writes
``<date>_<device>_<commit>.json`` (one object: device, commit, torch, triton, cuda, created,
rows, and the raw timings), ``.md`` (tables, targets) and ``.png`` (TFLOP/s against tokens) into
--out (default bench/results/), then prints the tables. Exit status: 0; 1 if a scattermoe
implementation failed its correctness check or errored; 2 if it cannot run here (no CUDA,
bad arguments); 3 if one implementation's step hung (--hang-s: the files hold what ran before it, and
that row marked hung; --hang-file names what a rerun should leave out with --skip-impls).

``--cpu-smoke`` (hidden) runs the same pipeline at tiny shapes on the CPU to exercise the code
paths and file writing. It is not a benchmark: its timings mean nothing and it never writes
into bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    from .kernels import IMPLS, SHAPES

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--e2e", action="store_true",
                   help="run the JetMoE end-to-end suite instead (python -m bench --e2e -h for its options)")
    p.add_argument("--out", type=Path, default=None, help="folder for the result files (default: bench/results/)")
    p.add_argument("--suite", default="full", choices=("full", "quick", "headline"),
                   help="full: every case (default); quick: a sanity run, the MoE layer at T=4096 (uniform, "
                        "Zipf) and T=1, routing, MoA and E=64 at T=4096 (files get _quick); headline: JetMoE MoE, "
                        "its first GEMM alone and routing at T=16384")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of: {','.join(IMPLS)}")
    p.add_argument("--shapes", default=None, help=f"comma-separated subset of: {','.join(SHAPES)}")
    p.add_argument("--tokens", default=None, help="comma-separated T values (replaces the suite's)")
    p.add_argument("--sets", type=_positive(int), default=None,
                   help="input sets rotated between calls (default 3, quick 2)")
    p.add_argument("--max-call-ms", type=_positive(float), default=1000.0,
                   help="skip an implementation at a larger T when its time per call, scaled from a smaller T, "
                        "would exceed this (default 1000)")
    p.add_argument("--time-budget", type=_positive(float), default=None,
                   help="seconds; once spent, the remaining measurements are skipped and recorded as such")
    p.add_argument("--hang-s", type=_positive(float), default=None,
                   help="seconds one implementation's check or timing at one size may take; past it the run "
                        "writes its files, with that row marked hung, and exits with status 3 (a kernel that "
                        "never finishes would otherwise block the process for good; default 150 on a GPU, off "
                        "for --cpu-smoke, whose interpreted steps are slow)")
    p.add_argument("--hang-file", type=Path, default=None,
                   help="on a hang, write there the implementations a rerun should leave out (for --skip-impls)")
    p.add_argument("--skip-impls", default=None, metavar="NAMES[:REASON]",
                   help="run these implementations nowhere; their rows stay in the files as unavailable, with "
                        "REASON (the run is still a whole suite)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the .png")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


DEFAULT_HANG_S = 150.0


def _positive(kind):
    """An argparse type: a number > 0 of ``kind`` (argparse turns the ValueError into a one-line usage error)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0 or value != value:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _names(arg: str, known, what: str) -> Optional[List[str]]:
    """The comma-separated names in ``arg``, or None (after saying why) if one is not in ``known``."""
    names = [n.strip() for n in arg.split(",") if n.strip()]
    if not names:
        print(f"python -m bench: no {what} named in {arg!r}; expected a subset of {list(known)}", file=sys.stderr)
        return None
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"python -m bench: unknown {what}(s) {unknown}; expected a subset of {list(known)}", file=sys.stderr)
        return None
    return names


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--e2e" in argv:  # the end-to-end suite parses its own options (-h included)
        from . import e2e
        return e2e.main([a for a in argv if a != "--e2e"])
    args, extra = _parse(argv)
    if extra:
        print(f"python -m bench: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    import torch

    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            print(f"python -m bench: CUDA is not available ({why}, torch {torch.__version__}); "
                  f"this benchmark times GPU kernels and does not run on the CPU.", file=sys.stderr)
            return 2
        from scattermoe.backends import _triton_interpreting  # as Triton reads it (1, true, on...)

        if _triton_interpreting():
            print("python -m bench: TRITON_INTERPRET is set: the Triton kernels would run in the interpreter; "
                  "unset it to benchmark.", file=sys.stderr)
            return 2

    from . import kernels, report
    from .harness import (RESULTS_DIR, TimingPlan, device_limits, environment, log, result_basename,
                          unique_basename, write_json, write_text)
    from .plot import plot
    from .run import RunConfig, run

    impls = _names(args.impls, kernels.IMPLS, "impl") if args.impls else list(kernels.IMPLS)
    if impls is None:
        return 2
    skip_impls = {}
    if args.skip_impls:
        names, _, reason = args.skip_impls.partition(":")
        skipped = _names(names, (*kernels.IMPLS, *kernels.ROUTING_IMPLS), "impl")  # a routing row's too
        if skipped is None:
            return 2
        skip_impls = dict.fromkeys(skipped, reason.strip() or "left out by --skip-impls")
    groups = kernels.suite("smoke" if args.cpu_smoke else args.suite)
    if args.shapes:
        names = _names(args.shapes, kernels.SHAPES, "shape")
        if names is None:
            return 2
        groups = [g for g in groups if g.shape.name in names]
    if args.tokens:
        try:
            tokens = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
        except ValueError:
            print(f"python -m bench: --tokens expects integers, got {args.tokens!r}", file=sys.stderr)
            return 2
        if not tokens or tokens[0] < 1:
            print(f"python -m bench: --tokens expects positive integers, got {args.tokens!r}", file=sys.stderr)
            return 2
        seen = list(dict.fromkeys((g.shape, g.routing) for g in groups))
        groups = [kernels.Group(shape, t, routing) for shape, routing in seen for t in tokens]

    # A run narrowed by --impls/--shapes/--tokens is a subset, whatever --suite says: its file is named so, and
    # the README's section (bench.report) never comes from it while a whole suite exists.
    subset = bool(args.impls or args.shapes or args.tokens)
    suite = f"{args.suite}-subset" if subset else args.suite
    suffix = ""
    if args.cpu_smoke:
        log("WARNING: --cpu-smoke checks code paths at tiny shapes on the CPU. It is NOT a benchmark: "
            "its timings mean nothing. It never writes into bench/results/.")
        device = torch.device("cpu")
        plan = TimingPlan(warmup=0, target_s=0.0, min_rep=2, max_rep=2)
        n_sets, check_tokens = args.sets or 2, 24
        args.max_call_ms = float("inf")  # CPU timings are noise: never skip on them
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="scattermoe-cpu-smoke-"))
        if out_dir.resolve().is_relative_to(RESULTS_DIR.resolve()):
            print("python -m bench: --cpu-smoke never writes into bench/results/", file=sys.stderr)
            return 2
        suffix = "_cpu-smoke"
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        quick = args.suite == "quick"
        plan = TimingPlan(warmup=1, target_s=0.1, min_rep=3, max_rep=10) if quick else \
            TimingPlan(warmup=1, target_s=0.15, min_rep=3, max_rep=25)
        n_sets, check_tokens = args.sets or (2 if quick else 3), 512
        out_dir = args.out or RESULTS_DIR
        suffix = "" if suite == "full" else f"_{suite}"

    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    limits = device_limits(env["device"]["name"]) if device.type == "cuda" else None
    base = unique_basename(out_dir, result_basename(env, suffix))
    json_path, md_path, png_path = (out_dir / f"{base}{ext}" for ext in (".json", ".md", ".png"))
    cfg = RunConfig(device=device, groups=groups, impls=impls, plan=plan, n_sets=n_sets, check_tokens=check_tokens,
                    max_call_ms=args.max_call_ms, time_budget_s=args.time_budget, limits=limits,
                    hang_s=args.hang_s if args.hang_s or args.cpu_smoke else DEFAULT_HANG_S, skip_impls=skip_impls)
    log(f"[bench] {env['device']['name']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['git']['short']}; {len(groups)} groups x modes x {len(impls)} impls; writing {json_path}")

    def payload(results) -> dict:
        return {
            "benchmark": "kernels",
            "device": env["device"]["name"],
            "commit": env["git"]["commit"],
            "torch": env["torch"],
            "triton": env["triton"],
            "cuda": env["torch_cuda"],
            "created": env["timestamp_utc"],
            "suite": "smoke" if args.cpu_smoke else suite,
            "smoke_only": bool(args.cpu_smoke),
            "limits": limits,
            "environment": env,
            "config": {"groups": [kernels.group_record(g) for g in groups], "impls": impls,
                       "timing": plan.__dict__, "input_sets": n_sets, "check_tokens": check_tokens,
                       "max_call_ms": args.max_call_ms, "time_budget_s": args.time_budget,
                       "hang_s": cfg.hang_s, "skip_impls": skip_impls,
                       "argv": sys.argv[1:] if argv is None else argv},
            "elapsed_s": results.get("elapsed_s"),
            "grouped_mm": results.get("grouped_mm"),
            "notes": results.get("notes", []),
            "hung": results.get("hung"),
            "checks": results.get("checks", {}),
            "loads": results.get("loads", []),
            "rows": results.get("rows", []),
        }

    def save(results) -> None:
        write_json(json_path, payload(results))
        write_text(md_path, report.markdown(payload(results)))

    def write_hang_file(results) -> None:
        if args.hang_file is not None:
            args.hang_file.write_text(",".join(kernels.skipped_after_hang(results["hung"]["impl"])) + "\n")

    results = run(cfg, save, on_hang=write_hang_file)
    if results["grouped_mm"].get("probe"):
        results["notes"].append(f"torch._grouped_mm probe: {results['grouped_mm']['probe']} "
                                f"(runs as: {results['grouped_mm'].get('impl') or 'unavailable'})")
    if not args.no_plot:
        note = plot(payload(results), png_path)
        if note:
            results["notes"].append(note)
            log(f"[bench] {note}")
    save(results)
    print(report.markdown(payload(results)))
    log(f"[bench] wrote {json_path} and {md_path} in {results['elapsed_s']:.0f} s")
    if args.cpu_smoke:
        log("WARNING: CPU smoke run: the timings above mean nothing.")

    # A scattermoe implementation that fails its check or errors is a failure; so is Triton being
    # unusable on a GPU (on the CPU smoke run it may be: no interpreter there).
    # (Only ours: scattermoe_original, the peer, starts with "scattermoe" too.)
    # Left out on purpose (--skip-impls: a rerun after a hang) is not a failure of this run.
    ours = tuple(i for i in ("scattermoe", "scattermoe_no_assert", "scattermoe_triton", *kernels.CSRC_VARIANTS,
                             *kernels.GATHER_IMPLS)
                 if i not in skip_impls)
    bad = sorted({f"{shape}:{impl}" for shape, per in results["checks"].items() for impl, c in per.items()
                  if impl in ours and (c.get("ok") is False or (
                      impl == "scattermoe_triton" and "unavailable" in c and not args.cpu_smoke))})
    bad += sorted({f"{r['case']}:{r['impl']}" for r in results["rows"]
                   if r["impl"] in ours and str(r.get("status", "")).startswith("error")})
    if bad:
        log(f"[bench] scattermoe implementation(s) failed the correctness check or errored: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
