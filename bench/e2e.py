"""python -m bench --e2e: JetMoE end to end, jetmoe/ on scattermoe against transformers' JetMoeForCausalLM.

One model at JetMoE-8B's width (D=2048, 16 KV heads x 128, F=5632, E=8, k=2, vocab 32000) with
--layers of its 24 blocks (default 4: the whole model's time is about 24/L x these, the embedding
and head aside), random bf16 weights built by transformers, saved, and loaded by jetmoe, so both
hold the same weights. Before timing, jetmoe's logits are checked against transformers' float32 ones on the
same weights: within 1e-3 in float32, and in bf16 no further than transformers' own bf16 run with margin
(harness.logits_bound: a random model at this width is chaotic in bf16, so two bf16 runs do not agree).

Cases (``case``): ``e2e_prefill`` (forward over B x S tokens, no grad), ``e2e_train_step`` (forward
with labels, then backward of loss + aux loss; the optimizer step is not timed: it is the same
for every implementation), ``e2e_decode`` (greedy generation of --new-tokens after a --prompt
token prompt with each side's KV cache; ``ms`` per new token, the prefill excluded), and for jetmoe on
CUDA ``e2e_decode_graph`` (the same with ``generate(cuda_graph=True)``: ``ms`` per replayed step, the
prefill, the eager first step and the capture excluded by subtracting a 2-token generation).
Implementations (``impl``): ``jetmoe_scattermoe_triton`` (jetmoe/, Triton backend),
``jetmoe_scattermoe_cutlass`` (jetmoe/, the csrc kernels, Triton where they do not reach: the rows'
``triton_fallbacks`` name those pieces; ``unavailable: why`` without the extension or an sm_90 GPU,
which is not a failure), ``transformers`` (as it comes, SDPA attention), ``transformers_apply_scattermoe``
(the same transformers model after ``scattermoe.integrations.apply_scattermoe``),
``jetmoe_scattermoe_triton_compiled`` (jetmoe/ on Triton with ``compile_decoder_layers("inductor")``, what
``train --compile`` runs: prefill and train step only, its decode being eager; the compile happens in the
warm-up calls, outside the timing; ``aot_eager`` on the CPU smoke run). Each jetmoe backend's
logits are checked first, as are the patched model's. FLOPs are 2 (prefill) or 6 (train) x active
non-embedding parameters x tokens, attention scores not counted.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

JETMOE_BACKENDS = ("triton", "cutlass")
COMPILED = "jetmoe_scattermoe_triton_compiled"  # the Triton backend, decoder layers under torch.compile (inductor)
IMPLS = (*(f"jetmoe_scattermoe_{b}" for b in JETMOE_BACKENDS), COMPILED, "transformers",
         "transformers_apply_scattermoe")
WIDTH = dict(vocab_size=32000, hidden_size=2048, num_key_value_heads=16, kv_channels=128, intermediate_size=5632,
             num_local_experts=8, num_experts_per_tok=2)
SMOKE_WIDTH = dict(vocab_size=64, hidden_size=32, num_key_value_heads=2, kv_channels=8, intermediate_size=48,
                   num_local_experts=4, num_experts_per_tok=2)


def _median(xs: List[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _time(fn: Callable[[int], None], sets: int, repeats: int, prepare: Callable[[], None] = lambda: None
          ) -> List[float]:
    """ms per call with CUDA events (wall clock on the CPU smoke run), one warm-up per input set first."""
    cuda = torch.cuda.is_available()
    for i in range(sets):
        prepare()
        fn(i)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for r in range(repeats):
        prepare()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(r % sets)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(r % sets)
            times.append((time.perf_counter() - t0) * 1e3)
    prepare()
    return times


def _peak_gb() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _backend_unavailable(backend: str, x: torch.Tensor) -> Optional[str]:
    """Why a scattermoe backend cannot run the model on x's device, or None."""
    from scattermoe import backends

    probe = torch.empty(1, 8, dtype=torch.bfloat16 if x.is_cuda else torch.float32, device=x.device)
    check = backends.triton_unsupported_reason if backend == "triton" else backends.cutlass_unsupported_reason
    return check(probe)


def build(layers: int, dtype: torch.dtype, device: torch.device, workdir: Path, width: Dict):
    """(transformers model, jetmoe model) with the same random weights, both on device."""
    import transformers

    from jetmoe import JetMoEForCausalLM

    cfg = transformers.JetMoeConfig(**width, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.JetMoeForCausalLM(cfg).to(dtype)
    hf.save_pretrained(workdir)
    ours = JetMoEForCausalLM.from_pretrained(str(workdir), dtype=dtype, device=device)
    return hf, ours


def run(layers: int, batch: int, seq: int, prompt: int, new_tokens: int, repeats: int, impls: List[str],
        log: Callable[[str], None], smoke: bool = False, on_update: Callable[[Dict], None] = lambda res: None
        ) -> Dict:
    """The rows and the logits check. ``smoke``: tiny float32 model on the CPU (code paths only).
    ``on_update(results so far)`` after each implementation, so a run stopped by the clock keeps its files."""
    import scattermoe
    from scattermoe.integrations import apply_scattermoe

    from .harness import LOGITS_TOL_FP32, cutlass_fallbacks, fallbacks_since, logits_bound, rel_err

    if smoke:
        device, dtype, width = torch.device("cpu"), torch.float32, SMOKE_WIDTH
    else:
        device, dtype, width = torch.device("cuda"), torch.bfloat16, WIDTH
    with tempfile.TemporaryDirectory(prefix="scattermoe-e2e-") as tmp:
        log(f"[e2e] building a {layers}-layer JetMoE model (transformers), saving, loading into jetmoe ...")
        hf, ours = build(layers, dtype, device, Path(tmp), width)
    active = ours.num_parameters(active=True)
    vocab = width["vocab_size"]
    dtype_name = str(dtype).removeprefix("torch.")
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(3, vocab, (batch, seq), device=device, generator=gen) for _ in range(2)]
    prompts = [torch.randint(3, vocab, (1, prompt), device=device, generator=gen) for _ in range(2)]

    rows: List[Dict] = []
    unavailable = {b: _backend_unavailable(b, batches[0]) for b in JETMOE_BACKENDS}
    probe = batches[0][:1, :256]
    checks: Dict = {"ok": True}
    check_labels: Dict[str, str] = {}  # check key -> what was compared (the .md's words)

    def record(key: str, what: str, err: float, bound: float) -> None:
        checks[key] = err
        check_labels[key] = what
        checks["ok"] = checks["ok"] and err < bound
        log(f"[e2e] {what} vs transformers float32 logits: rel err {err:.2e}, bound {bound:.2e} "
            f"({'ok' if err < bound else 'FAIL'})")

    # The reference: transformers in float32 on the same weights (harness.logits_bound says why not its bf16 run).
    with torch.no_grad():
        own = hf(input_ids=probe).logits.float()
        hf32 = copy.deepcopy(hf).float() if dtype != torch.float32 else hf
        ref = hf32(input_ids=probe).logits.float()
    del hf32
    bound = LOGITS_TOL_FP32 if dtype == torch.float32 else logits_bound(rel_err(own, ref))
    if dtype != torch.float32:
        record("transformers_own_logits_rel_err", f"transformers itself in {dtype_name}", rel_err(own, ref),
               float("inf"))
        if not unavailable["triton"]:  # the model's own check at the reference's precision: a tight bound
            ours32 = copy.deepcopy(ours).float()
            with torch.no_grad(), scattermoe.use_backend("triton"):
                record("jetmoe_float32_vs_transformers_logits_rel_err", "jetmoe (triton) in float32",
                       rel_err(ours32(probe).logits, ref), LOGITS_TOL_FP32)
            del ours32
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def check_logits(key: str, what: str, model: Callable) -> None:
        """model(probe)'s logits against transformers' float32 ones, recorded under ``key``."""
        with torch.no_grad():
            record(key, what, rel_err(model(probe).logits, ref), bound)

    for backend in JETMOE_BACKENDS:  # triton's check always runs: it is the model's against transformers
        wanted = backend == "triton" or f"jetmoe_scattermoe_{backend}" in impls
        if not wanted or unavailable[backend]:
            continue
        with scattermoe.use_backend(backend):
            check_logits("jetmoe_vs_transformers_logits_rel_err" + ("" if backend == "triton" else f"_{backend}"),
                         f"jetmoe ({backend})", ours)

    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    other_bytes = 0  # the other model's weights, resident while one is timed: not this one's memory

    step_bytes = ours.decode_step_weight_bytes()  # one decode step's weight reads at batch 1, the same for both

    def add(case: str, impl: str, tokens: int, times: List[float], flops: Optional[int], per: int = 1) -> None:
        ms = _median(times) / per
        peak = _peak_gb()
        row = {"case": case, "tokens": tokens, "routing": "model", "dtype": dtype_name, "impl": impl, "ms": ms,
               "tflops": flops / ms / 1e9 if flops else None,
               # decode is memory-bound: the weights read per step over its time
               "gb_s": step_bytes / ms / 1e6 if case.startswith("e2e_decode") else None,
               "peak_mem_gb": None if peak is None else peak - other_bytes / 1e9, "status": "ok",
               "tokens_per_s": tokens / ms * 1e3 if not case.startswith("e2e_decode") else 1e3 / ms,
               "raw_ms": times, "layers": layers}
        rows.append(row)
        log(f"[e2e] {case:<16} {impl:<30} {ms:9.3f} ms" + (f"  {row['tflops']:6.1f} TFLOP/s" if flops else "")
            + (f"  {row['peak_mem_gb']:6.1f} GB" if row["peak_mem_gb"] is not None else ""))

    def untimed_row(impl: str, status: str) -> None:
        rows.append({"case": "e2e", "tokens": batch * seq, "routing": "model", "dtype": dtype_name, "impl": impl,
                     "ms": None, "tflops": None, "peak_mem_gb": None, "status": status})

    def measure(impl: str, model, forward: Callable, generate: Optional[Callable],
                graph_generate: Optional[Callable] = None) -> None:
        tokens = batch * seq
        first = len(rows)
        fallbacks_before = cutlass_fallbacks()
        try:
            model.eval()
            _reset_peak()
            with torch.no_grad():
                add("e2e_prefill", impl, tokens, _time(lambda i: forward(batches[i]), 2, repeats), 2 * active * tokens)
            model.train()

            def step(i: int) -> None:
                loss, aux = forward(batches[i], labels=True)
                (loss + aux).backward()
            _reset_peak()
            add("e2e_train_step", impl, tokens, _time(step, 2, repeats, lambda: model.zero_grad(set_to_none=True)),
                6 * active * tokens)
            model.eval()
            if generate is not None:  # (compiled layers: their decode is the eager one)
                _reset_peak()
                with torch.no_grad():
                    # ms per new token: (prompt + n tokens) - (prompt + 1 token), so the prefill cancels.
                    long = _time(lambda i: generate(prompts[i], new_tokens), 2, max(3, repeats // 2))
                    short = _time(lambda i: generate(prompts[i], 1), 2, max(3, repeats // 2))
                add("e2e_decode", impl, 1, [t - _median(short) for t in long], None, per=new_tokens - 1)
                if graph_generate is not None and new_tokens >= 3:
                    _reset_peak()
                    with torch.no_grad():  # two tokens: the prefill, the eager first step and the capture
                        long = _time(lambda i: graph_generate(prompts[i], new_tokens), 2, max(3, repeats // 2))
                        two = _time(lambda i: graph_generate(prompts[i], 2), 2, max(3, repeats // 2))
                    add("e2e_decode_graph", impl, 1, [t - _median(two) for t in long], None, per=new_tokens - 2)
        except Exception as exc:  # one implementation failing must not lose the others' rows
            untimed_row(impl, f"error: {type(exc).__name__}: {str(exc).strip()[:300]}")
            log(f"[e2e] {impl}: error: {type(exc).__name__}: {exc}")
        finally:
            model.zero_grad(set_to_none=True)
        if impl == "jetmoe_scattermoe_cutlass":
            for row in rows[first:]:
                row["triton_fallbacks"] = fallbacks_since(fallbacks_before)
        on_update({"rows": rows, "checks": checks, "active_params": active, "check_labels": check_labels})

    def ours_forward(ids, labels=False, backend="triton"):
        with scattermoe.use_backend(backend):
            out = ours(ids, labels=ids if labels else None)
        return (out.loss, out.aux_loss) if labels else out.logits

    def ours_generate(ids, n, backend="triton", cuda_graph=False):
        with scattermoe.use_backend(backend):
            return ours.generate(ids, max_new_tokens=n, cuda_graph=cuda_graph)

    other_bytes = hf_bytes  # transformers' model stays resident while jetmoe's backends are timed
    for backend in JETMOE_BACKENDS:
        impl = f"jetmoe_scattermoe_{backend}"
        if impl not in impls:
            continue
        if unavailable[backend]:
            untimed_row(impl, f"unavailable: {unavailable[backend]}")
            log(f"[e2e] {impl}: unavailable: {unavailable[backend]}")
            continue
        graphs = torch.cuda.is_available() and ours.lm_head.weight.is_cuda
        measure(impl, ours, functools.partial(ours_forward, backend=backend),
                functools.partial(ours_generate, backend=backend),
                functools.partial(ours_generate, backend=backend, cuda_graph=True) if graphs else None)
    # Free jetmoe's weights before transformers is timed, unless its compiled layers are still to be timed: last,
    # so that a slow compile (inductor's, in the warm-up) cannot cost the transformers rows under a time limit.
    ours_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    if COMPILED not in impls:
        ours = None
    other_bytes = ours_bytes if ours is not None else 0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def hf_forward(ids, labels=False):
        out = hf(input_ids=ids, labels=ids if labels else None, output_router_logits=labels)
        return (out.loss, out.aux_loss if out.aux_loss is not None else out.loss * 0) if labels else out.logits

    def hf_generate(ids, n):
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    if "transformers" in impls:
        measure("transformers", hf, hf_forward, hf_generate)
    if "transformers_apply_scattermoe" in impls:
        apply_scattermoe(hf)
        check_logits("transformers_apply_scattermoe_vs_transformers_logits_rel_err", "transformers + apply_scattermoe",
                     lambda ids: hf(input_ids=ids))
        measure("transformers_apply_scattermoe", hf, hf_forward, hf_generate)
    other_bytes = hf_bytes
    if COMPILED in impls:
        if unavailable["triton"]:
            untimed_row(COMPILED, f"unavailable: {unavailable['triton']}")
        else:
            ours.compile_decoder_layers("aot_eager" if smoke else "inductor")
            with scattermoe.use_backend("triton"):
                check_logits("jetmoe_compiled_vs_transformers_logits_rel_err", "jetmoe (triton, compiled layers)", ours)
            measure(COMPILED, ours, ours_forward, None)  # ours_forward: on the triton backend
    return {"rows": rows, "checks": checks, "active_params": active, "check_labels": check_labels}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for the result files (default: bench/results/)")
    p.add_argument("--layers", type=int, default=4, help="blocks of JetMoE-8B's 24 (default 4)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=128, help="decode: prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated (default 64)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if any(i not in IMPLS for i in impls) or min(args.layers, args.batch, args.seq, args.prompt) < 1 \
            or args.new_tokens < 2:
        print(f"python -m bench --e2e: bad arguments (impls from {IMPLS}; sizes >= 1, --new-tokens >= 2)",
              file=sys.stderr)
        return 2
    from .harness import (RESULTS_DIR, environment, log, markdown_table, result_basename, unique_basename,
                          write_json, write_text)

    if args.cpu_smoke:
        log("WARNING: --cpu-smoke: a tiny float32 model on the CPU, a code-path check. Its timings mean nothing.")
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="scattermoe-e2e-smoke-"))
        if out_dir.resolve().is_relative_to(RESULTS_DIR.resolve()):
            print("python -m bench --e2e: --cpu-smoke never writes into bench/results/", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("python -m bench --e2e: CUDA is not available; this benchmark times GPU runs.", file=sys.stderr)
        return 2
    else:
        out_dir = args.out or RESULTS_DIR
    env = environment(torch.device("cpu") if args.cpu_smoke else torch.device("cuda"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base = unique_basename(out_dir, result_basename(env, "_e2e-cpu-smoke" if args.cpu_smoke else "_e2e"))
    t0 = time.perf_counter()
    width = SMOKE_WIDTH if args.cpu_smoke else WIDTH

    def write(res: Dict, final: bool) -> None:
        """The .json and .md of the results so far (again after each implementation, then at the end)."""
        payload = {"benchmark": "e2e", "smoke_only": args.cpu_smoke, "device": env["device"]["name"],
                   "commit": env["git"]["commit"], "torch": env["torch"], "triton": env["triton"],
                   "cuda": env["torch_cuda"], "created": env["timestamp_utc"], "environment": env,
                   "config": vars(args) | {"out": str(out_dir)}, "model": dict(width, num_hidden_layers=args.layers),
                   "active_params": res["active_params"], "checks": res["checks"],
                   "check_labels": res.get("check_labels", {}), "complete": final,
                   "elapsed_s": time.perf_counter() - t0, "rows": res["rows"]}
        dtype = payload["rows"][0]["dtype"] if payload["rows"] else ""
        write_json(out_dir / f"{base}.json", payload)
        table = markdown_table(
            ["case", "impl", "tokens/call", "ms", "tokens/s", "TFLOP/s", "weights GB/s", "peak GB"],
            [[r["case"], r["impl"], str(r["tokens"]), f"{r['ms']:.3f}" if r["ms"] else r["status"],
              f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "",
              f"{r['tflops']:.0f}" if r.get("tflops") else "",
              f"{r['gb_s']:.0f}" if r.get("gb_s") else "",
              f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else ""] for r in res["rows"]])
        labels = res.get("check_labels", {})
        logits_errs = ", ".join(f"{labels.get(k, k)} {v:.2e}" for k, v in res["checks"].items()
                                if k != "ok"  # the rest are check_logits's errors
                                ) or "not checked (no implementation compared ran)"
        smoke = "> CPU SMOKE RUN: a tiny float32 model; timings mean nothing.\n\n" if args.cpu_smoke else ""
        partial = "" if final else "> PARTIAL: the run stopped before every implementation was timed.\n\n"
        md = (f"# JetMoE end to end — {payload['device']}\n\n{smoke}{partial}{payload['created'][:10]}, commit "
              f"`{payload['commit'][:7]}`; torch {payload['torch']}, triton {payload['triton']}. {args.layers} of "
              f"JetMoE-8B's 24 blocks{'' if args.cpu_smoke else ' at full width'}, random {dtype} "
              f"weights; prefill and train step at {args.batch} x {args.seq} tokens; decode: ms per new token "
              f"(batch 1, {args.prompt}-token prompt, {args.new_tokens} new). Logits against transformers' "
              f"JetMoeForCausalLM in float32 on the same weights, relative error: {logits_errs} (bounds: 1e-3 "
              f"in float32; else 2e-2 + 1.5 x transformers' own error in {dtype}).\n\n{table}\n")
        write_text(out_dir / f"{base}.md", md)
        if final:
            print(md)

    res = run(args.layers, args.batch, args.seq, args.prompt, args.new_tokens, args.repeats, impls, log,
              smoke=args.cpu_smoke, on_update=lambda partial_res: write(partial_res, final=False))
    write(res, final=True)
    failed = not res["checks"]["ok"] or any(r["status"] != "ok" and not r["status"].startswith("unavailable")
                                            for r in res["rows"])
    return 1 if failed else 0
