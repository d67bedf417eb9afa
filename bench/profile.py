"""python -m bench.profile: where one JetMoE MoE layer's time goes, kernel by kernel.

The kernel suite's medians say how fast each implementation is; this says which kernel to work on. The
first H200 run (2026-12-04) had the csrc GLUMLP backward at 41 ms against Triton's 13 ms, and Triton's at
13 ms against torch._grouped_mm's 9.4 ms, with nothing to say which kernels made the difference.

For each case (default: the suite's headline, ``jetmoe_moe`` forward+backward at T=16384, and decode's
no-grad forward at T=1; GLUMLP at JetMoE-8B's shape, bf16, uniform routing) and each implementation
(default: scattermoe_triton, scattermoe_cutlass, torch_grouped_mm): warm-up calls (Triton's compiles and
autotuning), then --iters calls under torch.profiler. The tables list each device kernel's time per call, its
launches per call and its share of the call's kernel time, largest first (kernels under --min-share summed in
one line), and the host's largest ops by CPU self time; beside them the wall time per call. Where the wall
time is far above the kernels' (decode), the host is what to work on.

    python -m bench.profile [--cases fwd_bwd:16384,infer:1] [--impls a,b] [--iters 3] [--out DIR]

Writes ``<date>_<device>_<commit>_profile.{json,md}`` (bench/results/ by default). Needs CUDA; the CPU smoke
run (tests) profiles a tiny float32 layer's host-side ops into the folder given, never into bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

DEFAULT_IMPLS = ("scattermoe_triton", "scattermoe_cutlass", "torch_grouped_mm")
# The headline case's training step, and decode's no-grad forward at one token (where the host, not the GPU, was
# the question: 1.18 ms against 29 us of weight reads on the H200).
DEFAULT_CASES = "fwd_bwd:16384,infer:1"
MODES = ("fwd", "bwd", "fwd_bwd", "infer")
HOST_ROWS = 15  # the host table's largest ops kept


def kernel_table(events, iters: int, on_device: bool, min_share: float) -> List[Dict]:
    """Rows {kernel, us_per_call, launches_per_call, share} from profiler key averages, largest first. On the
    device, kernels only (what the GPU ran: no CPU-side op wrappers counted twice); on the CPU, every op's
    self time."""
    rows = []
    for e in events:
        if on_device:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        rows.append({"kernel": e.key, "us_per_call": us / iters, "launches_per_call": e.count / iters})
    total = sum(r["us_per_call"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["us_per_call"] / total
    rows.sort(key=lambda r: -r["us_per_call"])
    kept = [r for r in rows if r["share"] >= min_share]
    rest = [r for r in rows if r["share"] < min_share]
    if rest:
        kept.append({"kernel": f"({len(rest)} others, each under {min_share:.0%})",
                     "us_per_call": sum(r["us_per_call"] for r in rest),
                     "launches_per_call": sum(r["launches_per_call"] for r in rest),
                     "share": sum(r["share"] for r in rest)})
    return kept


def profile_impl(work, impl: str, sets, mode: str, iters: int, on_device: bool, min_share: float) -> Dict:
    """``mode`` (the suite's: fwd_bwd, infer...) of ``impl`` on sets[0], warmed up, then profiled over ``iters``
    calls: the device kernels' table, the host's (CPU self time per op: where a small call's time goes when the
    GPU waits for the host) and the wall time per call."""
    from torch.profiler import ProfilerActivity, profile

    fn, prepare = work.call(impl, sets, mode)
    for _ in range(3):  # compiles, autotuning, the allocator's first blocks
        prepare(0)
        fn(0)
    if on_device:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        wall = 0.0
        for _ in range(iters):
            prepare(0)
            t0 = time.perf_counter()
            fn(0)
            if on_device:
                torch.cuda.synchronize()
            wall += time.perf_counter() - t0
    events = prof.key_averages()
    kernels = kernel_table(events, iters, on_device, min_share) if on_device else []
    host = kernel_table(events, iters, False, min_share)
    return {"impl": impl, "status": "ok", "kernels": kernels, "host_ops": host[:HOST_ROWS],
            "kernel_us_per_call": sum(k["us_per_call"] for k in kernels),
            "wall_us_per_call": wall / iters * 1e6}


def parse_cases(text: str) -> List[Tuple[str, int]]:
    """"fwd_bwd:16384,infer:1" -> [("fwd_bwd", 16384), ("infer", 1)]."""
    cases = []
    for item in filter(None, text.split(",")):
        mode, _, tokens = item.partition(":")
        if mode not in MODES or not tokens.isdigit() or int(tokens) < 1:
            raise ValueError(f"--cases: {item!r} is not MODE:T with MODE one of {', '.join(MODES)} and T >= 1")
        cases.append((mode, int(tokens)))
    if not cases:
        raise ValueError("--cases: none given")
    return cases


def run(cases: List[Tuple[str, int]], impls: List[str], iters: int, min_share: float, smoke: bool = False,
        log=print, on_update: Callable[[Dict], None] = lambda res: None) -> Dict:
    """The tables per (mode, T) case; ``on_update(results so far)`` after each implementation, so a run stopped
    by the clock keeps the tables it finished."""
    import scattermoe

    from .kernels import SHAPES, Group, Shape, Workload, make_inputs
    from .run import setup_grouped_mm

    if smoke:  # a tiny float32 layer on the CPU: the code path, not a measurement
        device, dtype, shape = torch.device("cpu"), "float32", Shape("jetmoe_moe", "glu", D=32, F=48, E=4, K=2)
    else:
        device, dtype, shape = torch.device("cuda"), "bfloat16", SHAPES["jetmoe_moe"]
    mm, mm_note = setup_grouped_mm(device, allow_loop=smoke)
    work = Workload(shape, device, getattr(torch, dtype), 0, mm, mm_note.get("unavailable"))
    done: List[Dict] = []

    def summary() -> Dict:
        return {"dtype": dtype, "routing": "uniform", "shape": {"D": shape.D, "F": shape.F, "E": shape.E,
                "K": shape.K}, "iters": iters, "min_share": min_share, "cases": [dict(c) for c in done],
                "complete": len(done) == len(cases) and all(len(c["impls"]) == len(impls) for c in done)}

    with scattermoe.use_topk_combine("scatter"):
        for mode, tokens in cases:
            group = Group(shape, tokens, "uniform", dtype=dtype)
            sets = make_inputs(group, 1, device, 0, dense=False)
            case = {"case": group.case(mode), "mode": mode, "tokens": tokens, "impls": []}
            done.append(case)
            for impl in impls:
                why = work.unavailable(impl, sets[0].x) or work.mode_unavailable(impl, mode)
                if why:
                    case["impls"].append({"impl": impl, "status": f"unavailable: {why}"})
                    log(f"[profile] {case['case']} T={tokens} {impl}: unavailable: {why}")
                    continue
                t0 = time.perf_counter()
                try:
                    res = profile_impl(work, impl, sets, mode, iters, device.type == "cuda", min_share)
                except Exception as exc:  # one implementation failing must not lose the others' tables
                    res = {"impl": impl, "status": f"error: {type(exc).__name__}: {str(exc).strip()[:300]}"}
                finally:
                    work.reset()
                case["impls"].append(res)
                log(f"[profile] {case['case']} T={tokens} {impl}: {res['status']} ({time.perf_counter() - t0:.0f} s)")
                on_update(summary())
    return summary()


def _table(rows: List[Dict], what: str) -> str:
    from .harness import markdown_table

    return markdown_table([what, "us per call", "launches", "share"],
                          [[k["kernel"][:110].replace("|", "\\|"), f"{k['us_per_call']:.0f}",
                            f"{k['launches_per_call']:g}", f"{k['share']:.1%}"] for k in rows])


def markdown(payload: Dict) -> str:
    smoke = "> CPU SMOKE RUN: a tiny float32 layer, host-side op times; they mean nothing.\n\n" \
        if payload["smoke_only"] else ""
    partial = "" if payload.get("complete") else "> PARTIAL: the run stopped before every implementation.\n\n"
    parts = [f"# Kernel profile — {payload['device']}\n\n{smoke}{partial}{payload['created'][:10]}, commit "
             f"`{payload['commit'][:7]}`; torch {payload['torch']}, triton {payload['triton']}. The JetMoE-8B MoE "
             f"layer (GLUMLP), {payload['routing']} routing, {payload['dtype']}; {payload['iters']} profiled calls "
             f"after 3 warm-up calls; times per call. Wall: the host's time per call, synchronized (under the "
             f"profiler, which adds host time); kernels: the device's; host ops: CPU self time, largest "
             f"{HOST_ROWS}.\n"]
    for case in payload["cases"]:
        parts.append(f"\n## {case['case']}, T={case['tokens']}\n")
        for res in case["impls"]:
            if res["status"] != "ok":
                parts.append(f"\n### {res['impl']}\n\n{res['status']}\n")
                continue
            parts.append(f"\n### {res['impl']}: wall {res['wall_us_per_call'] / 1e3:.3f} ms, kernels "
                         f"{res['kernel_us_per_call'] / 1e3:.3f} ms per call\n\n")
            if res["kernels"]:
                parts.append(_table(res["kernels"], "kernel") + "\n\n")
            parts.append(_table(res["host_ops"], "host op") + "\n")
    return "".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    from .harness import RESULTS_DIR, environment, result_basename, unique_basename, write_json, write_text
    from .kernels import IMPLS

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help=f"comma-separated MODE:T, MODE one of {', '.join(MODES)} (default {DEFAULT_CASES})")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--iters", type=int, default=3, help="profiled calls (default 3)")
    p.add_argument("--min-share", type=float, default=0.01, help="kernels under this share are summed (0.01)")
    p.add_argument("--out", type=Path, default=None, help="folder for the result files (default: bench/results/)")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS) - {"dense_same_flops"})
    if unknown or "dense_same_flops" in impls:
        p.error(f"--impls: not profiled here: {','.join(unknown or ['dense_same_flops'])} (choose from "
                f"{','.join(i for i in IMPLS if i != 'dense_same_flops')})")
    try:
        cases = parse_cases(args.cases)
    except ValueError as exc:
        p.error(str(exc))
    if args.iters < 1:
        p.error("--iters must be positive")
    if args.cpu_smoke:
        if args.out is None or args.out.resolve() == RESULTS_DIR.resolve():
            p.error("--cpu-smoke writes only into a folder given with --out, never bench/results/")
    elif not torch.cuda.is_available():
        print("python -m bench.profile: CUDA is not available; this profiles GPU kernels.", file=sys.stderr)
        return 1
    out_dir = args.out or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu" if args.cpu_smoke else "cuda"))
    base = unique_basename(out_dir, result_basename(env, "_profile-cpu-smoke" if args.cpu_smoke else "_profile"))

    def write(res: Dict) -> str:
        payload = {"benchmark": "profile", "smoke_only": args.cpu_smoke, "device": env["device"]["name"],
                   "commit": env["git"]["commit"], "torch": env["torch"], "triton": env["triton"],
                   "cuda": env["torch_cuda"], "created": env["timestamp_utc"], "environment": env, **res}
        write_json(out_dir / f"{base}.json", payload)
        md = markdown(payload)
        write_text(out_dir / f"{base}.md", md)
        return md

    res = run(cases, impls, args.iters, args.min_share, smoke=args.cpu_smoke, on_update=write)
    print(write(res))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("unavailable")
                    for c in res["cases"] for r in c["impls"]) else 1


if __name__ == "__main__":
    sys.exit(main())
