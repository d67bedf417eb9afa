"""python -m bench [--out DIR] [--quick] [...]: the GLU MoE benchmark on CUDA.

Writes ``<date>_<device>_<commit>.json`` (raw timings, environment) and ``.md`` (the
table) into --out (default bench/results/), a ``.png`` if matplotlib is there, and
prints the table. Exit status: 0; 1 if a scattermoe provider failed its correctness
check or errored; 2 if it cannot run here (no CUDA, bad arguments).

``--cpu-smoke`` (hidden) runs the same pipeline at tiny shapes on the CPU to exercise
the code paths and file writing. It is not a benchmark: its timings mean nothing and
it never writes into bench/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for the result files (default: bench/results/)")
    p.add_argument("--quick", action="store_true",
                   help="T=4096 only (uniform and Zipf), 2 input sets, few repeats: a fast sanity run; "
                        "files get a _quick suffix")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of: scattermoe[triton],scattermoe[torch],torch._grouped_mm,dense")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--tokens", default=None,
                   help="comma-separated T values for uniform routing (Zipf runs at the largest); "
                        "default 4096,16384")
    p.add_argument("--sets", type=int, default=None, help="input sets rotated between calls (default 3, quick 2)")
    p.add_argument("--max-call-ms", type=float, default=1000.0,
                   help="skip a provider at a larger T when its time per call, scaled from a smaller T, "
                        "would exceed this (default 1000)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; once spent, the remaining measurements are skipped and recorded as such")
    p.add_argument("--no-plot", action="store_true", help="do not draw the .png")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    import torch

    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            print(f"python -m bench: CUDA is not available ({why}, torch {torch.__version__}); "
                  f"this benchmark times GPU kernels and does not run on the CPU.", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("python -m bench: TRITON_INTERPRET=1 is set: the Triton kernels would run in the interpreter; "
                  "unset it to benchmark.", file=sys.stderr)
            return 2

    from . import bench_glu_moe as op
    from .harness import (
        RESULTS_DIR,
        TimingPlan,
        environment,
        log,
        result_basename,
        unique_basename,
        write_json,
        write_text,
    )
    from .plot import plot

    all_providers = ["scattermoe[triton]", "scattermoe[torch]", "torch._grouped_mm", op.DENSE]
    if args.providers:
        names = {"dense": op.DENSE}
        providers = [names.get(p.strip(), p.strip()) for p in args.providers.split(",") if p.strip()]
        unknown = [p for p in providers if p not in all_providers]
        if unknown:
            print(f"python -m bench: unknown provider(s) {unknown}; expected {all_providers}", file=sys.stderr)
            return 2
    else:
        providers = all_providers
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in op.MODES for m in modes):
        print(f"python -m bench: --modes expects a subset of {','.join(op.MODES)}, got {args.modes!r}", file=sys.stderr)
        return 2

    suffix = ""
    if args.cpu_smoke:
        log("WARNING: --cpu-smoke checks code paths at tiny shapes on the CPU. It is NOT a benchmark: "
            "its timings mean nothing. It never writes into bench/results/.")
        device = torch.device("cpu")
        cases = op.smoke_cases()
        check_case = op.Case(T=32, D=64, F=96, E=4)
        plan = TimingPlan(warmup=1, target_s=0.05, min_rep=2, max_rep=3)
        n_sets = args.sets or 2
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="scattermoe-cpu-smoke-"))
        if out_dir.resolve().is_relative_to(RESULTS_DIR.resolve()):
            print("python -m bench: --cpu-smoke never writes into bench/results/", file=sys.stderr)
            return 2
        suffix = "_cpu-smoke"
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        if args.tokens:
            ts = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
            cases = [op.Case(T=t) for t in ts] + [op.Case(T=ts[-1], routing="zipf")]
        else:
            cases = op.jetmoe_cases(args.quick)
        check_case = op.Case(T=512)
        plan = TimingPlan(warmup=1, target_s=0.3, min_rep=3, max_rep=20) if args.quick else TimingPlan()
        n_sets = args.sets or (2 if args.quick else 3)
        out_dir = args.out or RESULTS_DIR
        suffix = "_quick" if args.quick else ""

    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    base = unique_basename(out_dir, result_basename(env, suffix))
    json_path, md_path, png_path = (out_dir / f"{base}{ext}" for ext in (".json", ".md", ".png"))
    cfg = op.RunConfig(device=device, cases=cases, providers=providers, modes=modes, plan=plan, n_sets=n_sets,
                       check_case=check_case, max_call_ms=args.max_call_ms, time_budget_s=args.time_budget)
    log(f"[bench] {env['device']['name']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['git']['short']}; writing {json_path}")

    def payload(results) -> dict:
        return {
            "benchmark": "glu_moe",
            "description": op.__doc__.strip().splitlines()[0],
            "smoke_only": bool(args.cpu_smoke),
            "environment": env,
            "config": {"cases": [c.__dict__ for c in cases], "check_case": check_case.__dict__,
                       "providers": providers, "modes": list(modes), "timing": plan.__dict__,
                       "input_sets": n_sets, "max_call_ms": args.max_call_ms, "time_budget_s": args.time_budget,
                       "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv},
            "results": results,
        }

    def render(results) -> str:
        dev = env["device"]
        if args.cpu_smoke:
            shapes = (f"> CPU SMOKE RUN: a code-path check at tiny shapes. Timings mean nothing.\n\n"
                      f"Smoke shapes: {[c.label for c in cases]}, D={cases[0].D}, F={cases[0].F}, "
                      f"E={cases[0].E}, K={cases[0].K}, bf16.")
        else:
            shapes = "Shapes: JetMoE-8B MoE, D=2048, F=5632 (W1 outputs 2F), E=8, K=2, bf16, SiLU GLU (activate_first)."
        head = [
            f"# GLU MoE benchmark — {dev['name']}", "",
            f"{env['date']}, commit `{env['git']['short']}`" + (" (uncommitted changes)" if env["git"]["dirty"] else "")
            + f"; torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, Python {env['python']}"
            + (f", driver {dev['driver']}" if dev.get("driver") else "") + ".", "",
            shapes + " Times are medians over the repeats (L2 flushed, inputs rotated); TFLOP/s counts useful "
            "FLOPs only; *GB/s is a compulsory-traffic lower bound; 'vs dense' = dense ceiling time / this time; "
            "'extra MiB' = peak allocated during one call above what was allocated before it. See bench/README.md.",
            "",
        ]
        notes = list(results.get("notes", []))
        gm = results.get("grouped_mm", {})
        if gm.get("probe"):
            notes.append(f"torch._grouped_mm probe: {gm['probe']} "
                         f"(provider runs as: {gm.get('impl') or 'unavailable'})")
        tail = ("\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)) if notes else ""
        return "\n".join(head) + "\n" + op.markdown(results, check_case) + tail + "\n"

    def save(results) -> None:
        write_json(json_path, payload(results))
        write_text(md_path, render(results))

    results = op.run(cfg, save)
    if "scattermoe[torch]" in providers and not args.cpu_smoke:
        slow = [r for c in results["cases"] for r in c["rows"]
                if r["provider"] == "scattermoe[torch]" and r.get("status", "").startswith("skipped: too slow")]
        if slow:
            results["notes"].append("scattermoe[torch] (the reference loop) was skipped where too slow; see the rows.")
    if not args.no_plot:
        note = plot(payload(results), png_path)
        if note:
            results["notes"].append(note)
            log(f"[bench] {note}")
    save(results)
    print(render(results))
    log(f"[bench] wrote {json_path} and {md_path} in {results['elapsed_s']:.0f} s")
    if args.cpu_smoke:
        log("WARNING: CPU smoke run: the timings above mean nothing.")

    # A scattermoe provider that cannot run on the GPU is a failure; on the CPU smoke run triton cannot.
    failed = [p for p, c in results["checks"].items() if p.startswith("scattermoe[")
              and (("unavailable" in c and not args.cpu_smoke) or c.get("fwd+bwd") is False)]
    errored = [r["provider"] for c in results["cases"] for r in c["rows"]
               if r["provider"].startswith("scattermoe[") and r.get("status", "").startswith("error")]
    if failed or errored:
        log(f"[bench] scattermoe provider(s) failed the correctness check or errored: {sorted(set(failed + errored))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
