"""Run the kernel suite: check every implementation, then time every (group, mode, impl) into flat rows.

A row (the result file's schema, issue 5): ``case`` (e.g. jetmoe_moe_fwd_bwd, routing),
``tokens``, ``routing`` (uniform/zipf), ``dtype``, ``impl``, ``ms`` (median), ``tflops``,
``peak_mem_gb``; and beside them ``status`` (ok / unavailable: why / skipped: why / error: what),
``check``, ``flops``, ``held_gb`` and ``extra_gb`` (see harness.Timer.peak_memory), ``triton_fallbacks``
(scattermoe_cutlass rows: the pieces the cutlass backend ran on Triton), ``vs_dense``
(dense_same_flops time / this time), ``hbm_floor_ms`` (fwd rows: the active experts' weights read
once at the device's datasheet bandwidth), ``bytes`` (kernels.useful_bytes: compulsory HBM traffic) and
``gb_s`` (bytes / ms), ``roofline_ms`` (max(FLOPs / datasheet peak, bytes / datasheet bandwidth)) and
``roofline_frac`` (roofline_ms / ms: the fraction of the device's limit reached), ``first_call_ms`` and
``timing`` (every repeat).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import scattermoe

from . import grouped_mm_moe
from .harness import HangWatch, Timer, TimingPlan, cutlass_fallbacks, fallbacks_since, log
from .kernels import (INFER_MAX_TOKENS, INFER_MODES, Group, Shape, Workload, check, expert_load, first_line, flops,
                      impls_for, make_inputs, useful_bytes, weight_bytes)


@dataclass
class RunConfig:
    device: torch.device
    groups: List[Group]
    impls: List[str]
    plan: TimingPlan
    n_sets: int
    check_tokens: int
    max_call_ms: float
    time_budget_s: Optional[float]
    limits: Optional[Dict] = None
    seed: int = 0
    hang_s: Optional[float] = None  # a check or timing step running longer ends the run (harness.HangWatch)
    skip_impls: Dict[str, str] = field(default_factory=dict)  # impl -> why its rows read unavailable


def setup_grouped_mm(device: torch.device, allow_loop: bool) -> Tuple[Optional[grouped_mm_moe.GroupedMM], Dict]:
    """torch._grouped_mm if it runs here; only the CPU smoke run (allow_loop) swaps in a torch.mm loop."""
    reason = grouped_mm_moe.probe(device)
    if reason is None:
        return grouped_mm_moe.grouped_mm_torch, {"impl": "torch._grouped_mm"}
    if allow_loop:
        return grouped_mm_moe.grouped_mm_loop, {"impl": "per-expert torch.mm loop (CPU stand-in)", "probe": reason}
    return None, {"impl": None, "probe": reason, "unavailable": reason}


def modes_for(group: Group) -> List[str]:
    """The shape's modes at this T: the inference forward only at decode and small-batch sizes."""
    return [m for m in group.shape.modes if m not in INFER_MODES or group.T <= INFER_MAX_TOKENS]


def empty_row(group: Group, mode: str, impl: str) -> Dict:
    """A result row before it is timed: the case and its FLOPs, no measurement yet."""
    return {"case": group.case(mode), "tokens": group.T, "routing": group.routing, "dtype": group.dtype,
            "impl": impl, "ms": None, "tflops": None, "peak_mem_gb": None, "flops": flops(group, mode)}


def predicted_ms(timed: Dict[int, float], tokens: int) -> Optional[Tuple[int, float]]:
    """(T', ms scaled linearly from T' to ``tokens``) from the largest size T' < tokens already timed, or None when
    there is none or a size >= tokens was timed (the suite is not in size order: the headline T comes first, and a
    T=1 time, all latency, says nothing of T=4096's)."""
    if not timed or max(timed) >= tokens:
        return None
    below = max(t for t in timed if t < tokens)
    return below, timed[below] * tokens / below


def merge_checks(by_group: Dict[str, Dict[str, Dict]]) -> Dict[str, Dict]:
    """One verdict per impl over several check groups: the first error or unavailability, else ok only if every
    group was; the per-group results kept under "groups"."""
    merged: Dict[str, Dict] = {}
    for label, checks in by_group.items():
        for impl, c in checks.items():
            m = merged.setdefault(impl, {"ok": True, "groups": {}})
            m["groups"][label] = c
            for key in ("unavailable", "not_compared", "error"):
                if key in c and key not in m:
                    m[key] = c[key]
            m["ok"] = m["ok"] and bool(c.get("ok", "not_compared" in c or "unavailable" in c))
    return merged


def run(cfg: RunConfig, on_update: Callable[[Dict], None],
        on_hang: Callable[[Dict], None] = lambda results: None) -> Dict:
    """Checks, then rows. ``on_update(results)`` after each group so a run cut short leaves files. With
    ``cfg.hang_s``, a step that hangs is recorded (its row's or check's status, ``results["hung"]``), passed to
    ``on_update`` and ``on_hang``, and the process ends (harness.HangWatch).
    The library's plain rows run the scatter top-k combine whatever SCATTERMOE_TOPK_COMBINE says; the *_gather
    rows the gather one (kernels.GATHER_IMPLS)."""
    with scattermoe.use_topk_combine("scatter"):
        return _run(cfg, on_update, on_hang)


def _run(cfg: RunConfig, on_update: Callable[[Dict], None], on_hang: Callable[[Dict], None]) -> Dict:
    start = time.perf_counter()
    timer = Timer(cfg.device)
    mm, mm_note = setup_grouped_mm(cfg.device, allow_loop=cfg.device.type == "cpu")
    results: Dict = {"checks": {}, "loads": [], "rows": [], "notes": [], "grouped_mm": mm_note}
    workloads: Dict[Tuple[Shape, str], Workload] = {}
    timed_ms: Dict[Tuple, Dict[int, float]] = {}  # (case, routing, impl) -> {T: ms} of the sizes timed so far
    under_way: Dict = {"shape": None, "row": None}  # what a hang is recorded against

    def record_hang(impl: str, what: str) -> None:
        why = f"hung: no result after {cfg.hang_s:g} s ({what}); the run was ended there"
        if under_way["row"] is not None:
            under_way["row"]["status"] = f"error: {why}"
        else:
            results["checks"].setdefault(under_way["shape"], {})[impl] = {"error": why, "ok": False}
        results["hung"] = {"impl": impl, "what": what, "after_s": cfg.hang_s}
        results["elapsed_s"] = time.perf_counter() - start
        try:
            on_update(results)
        finally:  # the hang file, which the caller's rerun reads, whatever writing the results did
            on_hang(results)

    hang_watch = HangWatch(cfg.hang_s, record_hang) if cfg.hang_s else None
    watch = hang_watch.watch if hang_watch else lambda impl, what: contextlib.nullcontext()

    def workload(shape: Shape, dtype: str) -> Workload:
        if (shape, dtype) not in workloads:
            workloads.clear()  # one shape's weights resident at a time
            workloads[shape, dtype] = Workload(shape, cfg.device, getattr(torch, dtype), cfg.seed, mm,
                                               mm_note.get("unavailable"), skipped=cfg.skip_impls)
        return workloads[shape, dtype]

    for group in cfg.groups:
        shape = group.shape
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            # Spent: record the group's rows as skipped without building weights, checks or inputs.
            for mode in modes_for(group):
                for impl in impls_for(shape, cfg.impls):
                    results["rows"].append(dict(empty_row(group, mode, impl),
                                                status=f"skipped: time budget ({cfg.time_budget_s:.0f} s) spent"))
            continue
        work = workload(shape, group.dtype)
        under_way.update(shape=shape.name, row=None)
        if shape.name not in results["checks"]:
            max_t = max(g.T for g in cfg.groups if g.shape == shape)
            check_t = min(cfg.check_tokens, max_t)
            # Decode (T=1: the small-row kernel configs), a mid size, and skewed routing at that size; on a GPU also
            # the largest size timed, whose autotuned configs (keyed on the row count's bucket) and routing path
            # (torch.sort past a size) the smaller checks do not reach.
            sizes = [(1, "uniform"), (check_t, "uniform"), (check_t, "zipf")]
            sizes += [(max_t, "uniform")] if cfg.device.type == "cuda" else []
            check_groups = [Group(shape, t, r, dtype=group.dtype) for t, r in dict.fromkeys(sizes)]
            log(f"[bench] {shape.name}: checking every implementation against the torch backend (fp32) at "
                + ", ".join(f"T={g.T} {g.routing}" for g in check_groups) + " ...")
            checks = merge_checks({g.label: check(work, impls_for(shape, cfg.impls), g, cfg.seed + 1000 + i, watch)
                                   for i, g in enumerate(check_groups)})
            results["checks"][shape.name] = checks
            for impl, c in checks.items():
                verdict = (c.get("unavailable") or c.get("not_compared") or
                           (f"ERROR: {c['error']}" if "error" in c else "ok" if c["ok"] else "FAIL"))
                log(f"[bench]   {impl}: {verdict}")
        checks = results["checks"][shape.name]
        sets = make_inputs(group, cfg.n_sets, cfg.device, cfg.seed + group.T,
                           dense="dense_same_flops" in cfg.impls)
        load = expert_load(sets[0].idx, shape.E)
        # The time is a median over the rotated sets: their mean count of experts used sizes the bytes (at small T
        # the sets differ: ~82 +- 5 of 128 experts at T=16).
        experts_used = sum(expert_load(s.idx, shape.E)["experts_used"] for s in sets) / len(sets)
        results["loads"].append({"shape": shape.name, "tokens": group.T, "routing": group.routing, **load,
                                 "experts_used_mean": experts_used})
        for mode in modes_for(group):
            case, n_flops = group.case(mode), flops(group, mode)
            mode_rows = []
            floor_ms = None
            itemsize = torch.empty((), dtype=getattr(torch, group.dtype)).element_size()
            if mode in ("fwd", *INFER_MODES) and cfg.limits and shape.kind != "routing":
                floor_ms = weight_bytes(shape, experts_used, itemsize) / cfg.limits["hbm_bytes_s"] * 1e3
            n_bytes = useful_bytes(group, mode, experts_used, itemsize)
            roofline_ms = None
            if n_bytes is not None and cfg.limits:  # the datasheet bound: compute or memory, whichever is slower
                roofline_ms = max(n_flops / cfg.limits["bf16_flops"], n_bytes / cfg.limits["hbm_bytes_s"]) * 1e3
            for impl in impls_for(shape, cfg.impls):
                row = empty_row(group, mode, impl)
                if floor_ms is not None:
                    row["hbm_floor_ms"] = floor_ms
                if n_bytes is not None and impl != "dense_same_flops":  # it reads one weight, not the experts'
                    row["bytes"] = n_bytes
                if roofline_ms is not None:
                    row["roofline_ms"] = roofline_ms  # the case's bound, for every row
                results["rows"].append(row)
                mode_rows.append(row)
                c = checks.get(impl, {})
                why = c.get("unavailable")
                if impl == "dense_same_flops":  # not in the checks: nothing to compare
                    why = work.unavailable(impl, sets[0].x)
                why = why or work.mode_unavailable(impl, mode, group.routing)
                if why:
                    row["status"] = f"unavailable: {why}"
                    continue
                if "error" in c:  # it raised in the check: not timed (a GPU fault there could poison the rest)
                    row.update(status=f"error: in the check: {c['error']}", check="FAIL")
                    continue
                row["check"] = "n/a" if (not c or "not_compared" in c) else ("ok" if c["ok"] else "FAIL")
                predicted = predicted_ms(timed_ms.get((case, group.routing, impl), {}), group.T)
                if predicted is not None and predicted[1] > cfg.max_call_ms:
                    row["status"] = (f"skipped: too slow (~{predicted[1]:.0f} ms/call predicted "
                                     f"from T={predicted[0]}; --max-call-ms {cfg.max_call_ms:g})")
                    continue
                if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
                    row["status"] = f"skipped: time budget ({cfg.time_budget_s:.0f} s) spent"
                    continue
                log(f"[bench] {group.label:<34} {mode:<8} {impl} ...")
                fallbacks_before = cutlass_fallbacks() if impl.startswith("scattermoe_cutlass") else None
                under_way["row"] = row
                try:
                    with watch(impl, f"{group.label} {mode}"):
                        fn, prepare = work.call(impl, sets, mode)
                        timing = timer.measure(fn, cfg.n_sets, cfg.plan, prepare)
                        # measure() ends with prepare(0): for a timed backward that is a forward, whose activations
                        # must count as the row's (prepared_gb), not as the baseline before it.
                        work.reset()
                        memory = timer.peak_memory(fn, prepare)
                except Exception as exc:  # recorded in the row; the run goes on with the next one
                    row["status"] = f"error: {type(exc).__name__}: {first_line(exc)}"
                    log(f"[bench]   {row['status']}")
                    work.release()
                    continue
                finally:
                    under_way["row"] = None
                if memory["extra_gb"] is not None:
                    # The harness holds every implementation's weights and operands at once; a row's peak is its
                    # own: its weights and inputs, what prepare left for it (a timed backward's activations) and what
                    # the call allocated on top (device_peak_gb: the raw one).
                    memory["device_peak_gb"] = memory["peak_mem_gb"]
                    memory["peak_mem_gb"] = (work.own_bytes(impl, sets[0], mode) / 1e9 + memory["prepared_gb"]
                                             + memory["extra_gb"])
                ms = timing["quantiles_ms"]["median"]
                row.update(status="ok", ms=ms, first_call_ms=timing["first_call_ms"], **memory, timing=timing)
                if fallbacks_before is not None:
                    # What of this row ran on Triton, not csrc: the row is only as "cutlass" as this says.
                    row["triton_fallbacks"] = fallbacks_since(fallbacks_before)
                if n_flops:
                    row["tflops"] = n_flops / ms / 1e9
                if row.get("bytes"):
                    row["gb_s"] = row["bytes"] / ms / 1e6
                if roofline_ms and impl != "dense_same_flops":  # the MoE's roofline is not the dense GEMM's
                    row["roofline_frac"] = roofline_ms / ms
                timed_ms.setdefault((case, group.routing, impl), {})[group.T] = ms
                log(f"[bench]   {ms:9.4f} ms" + (f"  {row['tflops']:7.1f} TFLOP/s" if row["tflops"] else "")
                    + f"  first call {timing['first_call_ms']:.0f} ms  x{timing['repeats']}")
            dense_ms = next((r["ms"] for r in mode_rows if r["impl"] == "dense_same_flops" and r["ms"]), None)
            for row in mode_rows:
                if row["ms"] and dense_ms:
                    row["vs_dense"] = dense_ms / row["ms"]
        del sets
        on_update(results)
    if hang_watch is not None:
        hang_watch.stop()
    results["elapsed_s"] = time.perf_counter() - start
    return results
