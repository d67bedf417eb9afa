"""Benchmark: the GLU MoE MLP (JetMoE's MoE layer), forward and forward+backward.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D model dim,
F expert hidden dim (the first projection outputs 2F).

Providers, side by side in one run (DESIGN.md section 7; ratios within a run are the
figures that count):
  scattermoe[triton]   scattermoe.GLUMLP(activate_first=True, SiLU) on the Triton backend
  scattermoe[torch]    the same module on the "torch" backend (reference/: a loop over experts)
  torch._grouped_mm    the same layer written with torch's grouped GEMM (bench/grouped_mm_moe.py)
  dense (ceiling)      two plain bf16 matmuls, [N, D] x [D, 2F] and [N, F] x [F, D]: the same
                       useful FLOPs with no routing, gather or scatter -- the practical ceiling
All MoE providers share one set of weights and the same inputs. Gates come from JetMoE's
router (``scattermoe.topk_gating`` on fp32 logits, cast to bf16); the router itself is not
timed, the expert sort (flatten_sort_count or its equivalent) is, as part of each layer.

"fwd" is the training forward (inputs require grad, so what backward needs is kept);
"fwd+bwd" adds ``y.backward(dy)``, producing grads for x, the gates and both weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import scattermoe

from . import grouped_mm_moe
from .harness import Timer, TimingPlan, log, markdown_table

MODES = ("fwd", "fwd+bwd")
DENSE = "dense (ceiling)"
CHECK_TOL = 2e-2  # bf16 bound of DESIGN.md section 5


@dataclass(frozen=True)
class Case:
    """One problem: shape, routing and dtype."""
    T: int
    D: int = 2048
    F: int = 5632
    E: int = 8
    K: int = 2
    routing: str = "uniform"  # or "zipf": expert e drawn with probability ~ (e+1)^-zipf_s
    zipf_s: float = 1.2
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        r = self.routing if self.routing == "uniform" else f"zipf s={self.zipf_s:g}"
        return f"T={self.T} {r}"


def jetmoe_cases(quick: bool) -> List[Case]:
    """JetMoE-8B's MoE (d=2048, F=5632, E=8, k=2): uniform routing at T=4096 and 16384, Zipf at 16384."""
    if quick:
        return [Case(T=4096), Case(T=4096, routing="zipf")]
    return [Case(T=4096), Case(T=16384), Case(T=16384, routing="zipf")]


def smoke_cases() -> List[Case]:
    """Tiny shapes for --cpu-smoke (a code-path check, not a benchmark)."""
    return [Case(T=64, D=64, F=96, E=4), Case(T=128, D=64, F=96, E=4), Case(T=128, D=64, F=96, E=4, routing="zipf")]


def flops(case: Case, mode: str) -> int:
    """Useful FLOPs: the two expert GEMMs over the N = T*K routed rows; backward counts twice forward
    (dX and dW per GEMM). Routing, GLU and gate arithmetic are not counted."""
    n = case.T * case.K
    fwd = 2 * n * case.D * (2 * case.F) + 2 * n * case.F * case.D
    return fwd if mode == "fwd" else 3 * fwd


def compulsory_bytes(case: Case, mode: str, provider: str) -> int:
    """Bytes that any implementation must move through HBM at least (intermediates assumed to stay
    on chip), so GB/s = this / time is a lower bound on the bandwidth actually used.

    MoE: fwd reads the weights of all E experts, x, and writes y; backward reads dy, the weights and
    x again and writes dx, dW1, dW2. Dense: its own operands (no weights beyond one [D, 2F] and
    one [F, D]; its inputs are the N routed rows, and both GEMMs' outputs are written).
    """
    n, d, f, e = case.T * case.K, case.D, case.F, case.E
    if provider == DENSE:
        w = 3 * f * d
        fwd = n * d + n * f + w + n * 2 * f + n * d  # read a, g, W1, W2; write h, y
        bwd = (n * 2 * f + n * d) + (n * d + n * f) + w + (n * d + n * f) + w  # read dh, dy, a, g, W; write dA, dG, dW
        elems = fwd if mode == "fwd" else fwd + bwd
    else:
        w = 3 * e * f * d
        fwd = w + 2 * case.T * d
        elems = fwd if mode == "fwd" else fwd + (w + 3 * case.T * d + w)
    return 2 * elems  # bf16


# ---------------------------------------------------------------- inputs


@dataclass
class MoEInputs:
    x: torch.Tensor       # [T, D], requires grad
    gates: torch.Tensor   # [T, K], bf16, requires grad
    idx: torch.Tensor     # [T, K] int64
    dy: torch.Tensor      # [T, D]


@dataclass
class DenseInputs:
    a: torch.Tensor   # [N, D]
    g: torch.Tensor   # [N, F]
    dh: torch.Tensor  # [N, 2F]
    dy: torch.Tensor  # [N, D]


def router(case: Case, gen: torch.Generator, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gates [T, K] fp32, expert_idxs [T, K]) from JetMoE's router on random logits.

    logits = log p_e + Gumbel noise: top-k of such logits draws K distinct experts with
    probabilities p (the Gumbel-top-k trick), so "uniform" is uniform routing and "zipf"
    sends expert e a share ~ (e+1)^-s, while the gates stay a softmax over the top-k logits.
    """
    logp = torch.zeros(case.E)
    if case.routing == "zipf":
        logp = -case.zipf_s * torch.log(torch.arange(1, case.E + 1, dtype=torch.float32))
    elif case.routing != "uniform":
        raise ValueError(f"routing: expected 'uniform' or 'zipf', got {case.routing!r}")
    u = torch.rand(case.T, case.E, generator=gen).clamp_(1e-9, 1 - 1e-9)
    logits = (logp - torch.log(-torch.log(u))).to(device)
    return scattermoe.topk_gating(logits, case.K)


def make_inputs(case: Case, n_sets: int, device: torch.device, seed: int) -> List[MoEInputs]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        gates, idx = router(case, gen, device)
        x = torch.randn(case.T, case.D, generator=gen).to(device, dtype).requires_grad_()
        dy = torch.randn(case.T, case.D, generator=gen).to(device, dtype)
        sets.append(MoEInputs(x, gates.to(dtype).requires_grad_(), idx, dy))
    return sets


def make_dense_inputs(case: Case, n_sets: int, device: torch.device, seed: int) -> List[DenseInputs]:
    dtype = getattr(torch, case.dtype)
    n = case.T * case.K
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    return [DenseInputs(rand(n, case.D), rand(n, case.F), rand(n, 2 * case.F), rand(n, case.D)) for _ in range(n_sets)]


def expert_load(sets: List[MoEInputs], num_experts: int) -> Dict:
    """Rows per expert in the first input set, and max / mean (1.0 = balanced)."""
    counts = torch.bincount(sets[0].idx.reshape(-1).cpu(), minlength=num_experts).tolist()
    return {"rows_per_expert": counts, "max_over_mean": max(counts) / (sum(counts) / num_experts)}


# ---------------------------------------------------------------- providers


class Bench:
    """The shared weights and the providers' forward functions for one (D, F, E, K)."""

    def __init__(self, case: Case, device: torch.device, grouped_mm: Optional[grouped_mm_moe.GroupedMM],
                 grouped_mm_note: Optional[str], seed: int) -> None:
        torch.manual_seed(seed)
        dtype = getattr(torch, case.dtype)
        self.moe = scattermoe.GLUMLP(case.D, case.F, case.E, case.K, activation=torch.nn.SiLU(),
                                     activate_first=True).to(device, dtype)
        # One expert's worth of dense weights, [D, 2F] and [F, D], scaled like the experts'.
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.w1 = torch.randn(case.D, 2 * case.F, generator=gen, device=device, dtype=dtype) * 0.02
        self.w2 = torch.randn(case.F, case.D, generator=gen, device=device, dtype=dtype) * 0.02
        self.grouped_mm = grouped_mm
        self.grouped_mm_note = grouped_mm_note
        self.device = device

    def params(self) -> List[torch.Tensor]:
        return list(self.moe.parameters())

    def moe_forward(self, provider: str) -> Callable[[MoEInputs], torch.Tensor]:
        moe = self.moe
        if provider.startswith("scattermoe["):
            backend = provider[len("scattermoe["):-1]

            def run(inp: MoEInputs) -> torch.Tensor:
                with scattermoe.use_backend(backend):
                    return moe(inp.x, inp.gates, inp.idx)
            return run
        if provider == "torch._grouped_mm":
            return lambda inp: grouped_mm_moe.grouped_mm_glu_moe(
                inp.x, inp.gates, inp.idx, moe.experts.weight, moe.output_experts.weight,
                activate_first=True, mm=self.grouped_mm)
        raise KeyError(provider)

    def unavailable(self, provider: str, x: torch.Tensor) -> Optional[str]:
        """Why a provider cannot run here (None if it can)."""
        if provider == "scattermoe[triton]":
            return scattermoe.backends.triton_unsupported_reason(x)
        if provider == "torch._grouped_mm" and self.grouped_mm is None:
            return self.grouped_mm_note
        return None

    def dense_call(self, sets: List[DenseInputs], mode: str) -> Callable[[int], None]:
        w1, w2 = self.w1, self.w2

        def fwd(i: int) -> None:
            s = sets[i]
            torch.mm(s.a, w1)  # h [N, 2F]
            torch.mm(s.g, w2)  # y [N, D]

        def fwd_bwd(i: int) -> None:
            s = sets[i]
            torch.mm(s.a, w1)
            torch.mm(s.g, w2)
            torch.mm(s.dy, w2.t())   # dG  [N, F]
            torch.mm(s.g.t(), s.dy)  # dW2 [F, D]
            torch.mm(s.dh, w1.t())   # dA  [N, D]
            torch.mm(s.a.t(), s.dh)  # dW1 [D, 2F]
        return fwd if mode == "fwd" else fwd_bwd

    def moe_call(self, provider: str, sets: List[MoEInputs], mode: str
                 ) -> Tuple[Callable[[int], None], Callable[[], None]]:
        """(fn(i), prepare): one call on input set i, and a host-side reset of .grad between calls."""
        forward = self.moe_forward(provider)
        grads = self.params() + [t for s in sets for t in (s.x, s.gates)]

        def prepare() -> None:
            for t in grads:
                t.grad = None

        def fwd(i: int) -> None:
            forward(sets[i])

        def fwd_bwd(i: int) -> None:
            forward(sets[i]).backward(sets[i].dy)
        return (fwd if mode == "fwd" else fwd_bwd), prepare


# ---------------------------------------------------------------- correctness


def _rel_err(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if out is None:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else float("inf")


def check_providers(bench: Bench, providers: List[str], case: Case, seed: int) -> Dict[str, Dict]:
    """Each MoE provider's output and grads against the torch backend run in float32 on the same
    bf16 inputs (TF32 off). Returns per provider: errors per tensor, and pass/fail per mode."""
    inp = make_inputs(case, 1, bench.device, seed)[0]
    oracle = copy.deepcopy(bench.moe).float()
    x32 = inp.x.detach().float().requires_grad_()
    g32 = inp.gates.detach().float().requires_grad_()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with scattermoe.use_backend("torch"):
            y_ref = oracle(x32, g32, inp.idx)
        y_ref.backward(inp.dy.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    refs = {"y": y_ref, "dx": x32.grad, "dgates": g32.grad,
            "dw_in": oracle.experts.weight.grad, "dw_out": oracle.output_experts.weight.grad}

    results: Dict[str, Dict] = {}
    for provider in providers:
        reason = bench.unavailable(provider, inp.x)
        if reason is not None:
            results[provider] = {"unavailable": reason}
            continue
        _, prepare = bench.moe_call(provider, [inp], "fwd+bwd")
        prepare()
        try:
            y = bench.moe_forward(provider)(inp)
            y.backward(inp.dy)
        except Exception as exc:  # a provider that crashes is a finding, not the end of the run
            results[provider] = {"unavailable": f"{type(exc).__name__}: {_first_line(exc)}"}
            continue
        outs = {"y": y, "dx": inp.x.grad, "dgates": inp.gates.grad,
                "dw_in": bench.moe.experts.weight.grad, "dw_out": bench.moe.output_experts.weight.grad}
        errors = {name: _rel_err(outs[name], refs[name]) for name in refs}
        prepare()
        results[provider] = {
            "T": case.T, "tol": CHECK_TOL, "rel_err": errors,
            "fwd": errors["y"] < CHECK_TOL,
            "fwd+bwd": all(e < CHECK_TOL for e in errors.values()),
        }
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _check_summary(check: Optional[Dict], mode: str) -> str:
    if check is None:
        return "n/a"
    errs = check["rel_err"]
    names = ["y"] if mode == "fwd" else list(errs)
    worst = max(names, key=lambda n: errs[n])
    verdict = "ok" if check[mode] else "FAIL"
    return f"{verdict} ({worst} {errs[worst]:.1e})"


# ---------------------------------------------------------------- the run


@dataclass
class RunConfig:
    device: torch.device
    cases: List[Case]
    providers: List[str]
    modes: Tuple[str, ...]
    plan: TimingPlan
    n_sets: int
    check_case: Case
    max_call_ms: float
    time_budget_s: Optional[float]
    seed: int = 0


def setup_grouped_mm(device: torch.device, allow_loop: bool) -> Tuple[Optional[grouped_mm_moe.GroupedMM], Dict]:
    """The grouped GEMM the torch._grouped_mm provider uses, and a note for the results.

    On the GPU a failing torch._grouped_mm makes the provider 'unavailable: <reason>'. Only the
    CPU smoke run (allow_loop) swaps in the torch.mm loop, so that the code path still runs there.
    """
    reason = grouped_mm_moe.probe(device)
    if reason is None:
        return grouped_mm_moe.grouped_mm_torch, {"impl": "torch._grouped_mm"}
    if allow_loop:
        return grouped_mm_moe.grouped_mm_loop, {"impl": "per-expert torch.mm loop (fallback)", "probe": reason}
    return None, {"impl": None, "probe": reason, "unavailable": reason}


def run(cfg: RunConfig, on_update: Callable[[Dict], None]) -> Dict:
    """Run every (case, mode, provider); ``on_update(results)`` after each case, so a run cut
    short still leaves files. Returns {"cases": [...], "checks": {...}, "notes": [...]}."""
    start = time.perf_counter()
    timer = Timer(cfg.device)
    mm, mm_note = setup_grouped_mm(cfg.device, allow_loop=cfg.device.type == "cpu")
    results: Dict = {"cases": [], "checks": {}, "notes": [], "grouped_mm": mm_note}
    moe_providers = [p for p in cfg.providers if p != DENSE]
    benches: Dict[Tuple, Bench] = {}
    last_ms: Dict[Tuple[str, str], Tuple[int, float]] = {}  # (provider, mode) -> (T, median ms)

    def bench_for(case: Case) -> Bench:
        key = (case.D, case.F, case.E, case.K, case.dtype)
        if key not in benches:
            benches.clear()  # one set of weights resident at a time
            benches[key] = Bench(case, cfg.device, mm, mm_note.get("unavailable"), cfg.seed)
        return benches[key]

    check_bench = bench_for(cfg.check_case)
    log(f"[bench] checking providers against the torch backend (fp32) at {cfg.check_case.label} ...")
    checks = check_providers(check_bench, moe_providers, cfg.check_case, cfg.seed + 1000)
    results["checks"] = checks
    for provider, c in checks.items():
        log(f"[bench]   {provider}: " + (f"unavailable: {c['unavailable']}" if "unavailable" in c
                                          else _check_summary(c, "fwd+bwd")))
    on_update(results)

    for case in cfg.cases:
        bench = bench_for(case)
        sets = make_inputs(case, cfg.n_sets, cfg.device, cfg.seed + case.T)
        dense_sets = make_dense_inputs(case, cfg.n_sets, cfg.device, cfg.seed + 1) if DENSE in cfg.providers else []
        entry = {"case": asdict(case), "label": case.label, "load": expert_load(sets, case.E), "rows": []}
        results["cases"].append(entry)
        for mode in cfg.modes:
            dense_ms = None
            for provider in cfg.providers:
                row = {"provider": provider, "mode": mode, "flops": flops(case, mode),
                       "bytes": compulsory_bytes(case, mode, provider)}
                entry["rows"].append(row)
                check = checks.get(provider)
                if check is not None and "unavailable" in check:
                    row["status"] = f"unavailable: {check['unavailable']}"
                    continue
                prev = last_ms.get((provider, mode))
                if prev is not None and prev[1] * case.T / prev[0] > cfg.max_call_ms:
                    row["status"] = (f"skipped: too slow (~{prev[1] * case.T / prev[0]:.0f} ms/call predicted "
                                     f"from T={prev[0]}; --max-call-ms {cfg.max_call_ms:g})")
                    continue
                if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
                    row["status"] = f"skipped: time budget ({cfg.time_budget_s:.0f} s) spent"
                    continue
                log(f"[bench] {case.label:<22} {mode:<8} {provider} ...")
                if provider == DENSE:
                    fn, prepare = bench.dense_call(dense_sets, mode), (lambda: None)
                else:
                    fn, prepare = bench.moe_call(provider, sets, mode)
                try:
                    timing = timer.measure(fn, cfg.n_sets, cfg.plan, prepare)
                    memory = timer.peak_memory(fn, prepare)
                except Exception as exc:
                    prepare()
                    row["status"] = f"error: {type(exc).__name__}: {_first_line(exc)}"
                    log(f"[bench]   {row['status']}")
                    continue
                ms = timing["quantiles_ms"]["median"]
                row.update(status="ok", ms=ms, tflops=row["flops"] / ms / 1e9, gbps=row["bytes"] / ms / 1e6,
                           **memory, timing=timing)
                if check is not None:
                    row["check"] = "ok" if check[mode] else "FAIL"
                last_ms[(provider, mode)] = (case.T, ms)
                if provider == DENSE:
                    dense_ms = ms
                log(f"[bench]   {ms:8.3f} ms  {row['tflops']:7.1f} TFLOP/s  "
                    f"first call {timing['first_call_ms']:.0f} ms  x{timing['repeats']}")
            for row in entry["rows"]:
                if row["mode"] == mode and row.get("ms") and dense_ms:
                    row["vs_dense"] = dense_ms / row["ms"]  # share of the ceiling's throughput
        del sets, dense_sets
        on_update(results)
    results["elapsed_s"] = time.perf_counter() - start
    return results


# ---------------------------------------------------------------- reporting


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: Dict, checks_case: Case) -> str:
    """The result table (one row per case x mode x provider) and the correctness checks."""
    header = ["case", "mode", "provider", "ms (median)", "p10–p90 ms", "TFLOP/s", "GB/s*", "vs dense",
              "peak MiB", "extra MiB", "check"]
    align = ["l", "l", "l", "r", "r", "r", "r", "r", "r", "r", "l"]
    rows = []
    for entry in results["cases"]:
        for row in entry["rows"]:
            if row.get("status") != "ok":
                rows.append([entry["label"], row["mode"], row["provider"], row.get("status", "not run"),
                             "", "", "", "", "", "", ""])
                continue
            q = row["timing"]["quantiles_ms"]
            check = results["checks"].get(row["provider"])
            rows.append([
                entry["label"], row["mode"], row["provider"], f"{row['ms']:.3f}",
                f"{q['p10']:.3f}–{q['p90']:.3f}", f"{row['tflops']:.1f}", f"{row['gbps']:.0f}",
                _fmt(row.get("vs_dense"), ".2f"), _fmt(row.get("peak_mib"), ".0f"), _fmt(row.get("extra_mib"), ".0f"),
                _check_summary(check, row["mode"]) if check and "rel_err" in check else "n/a",
            ])
    parts = [markdown_table(header, rows, align)]
    loads = [f"{e['label']}: rows per expert {e['load']['rows_per_expert']} (max/mean "
             f"{e['load']['max_over_mean']:.2f})" for e in results["cases"] if "zipf" in e["label"]]
    if loads:
        parts.append("Skewed routing, " + "; ".join(loads) + ".")
    check_rows = []
    for provider, c in results["checks"].items():
        if "unavailable" in c:
            check_rows.append([provider, f"unavailable: {c['unavailable']}", "", "", "", "", ""])
        else:
            e = c["rel_err"]
            check_rows.append([provider] + [f"{e[n]:.2e}" for n in ("y", "dx", "dgates", "dw_in", "dw_out")]
                              + ["ok" if c["fwd+bwd"] else "FAIL"])
    if check_rows:
        parts.append(f"Correctness at {checks_case.label} (D={checks_case.D}, F={checks_case.F}, E={checks_case.E}, "
                     f"K={checks_case.K}): ||out - ref|| / ||ref|| against the torch backend in float32 on the "
                     f"same {checks_case.dtype} inputs (TF32 off); pass below {CHECK_TOL:g}.\n\n"
                     + markdown_table(["provider", "y", "dx", "dgates", "dW_in", "dW_out", "verdict"], check_rows))
    return "\n\n".join(parts)
