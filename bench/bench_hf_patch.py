"""transformers MoE models, unpatched vs ``scattermoe.integrations.apply_scattermoe``: forward+backward tokens/s.

Issue 6's benchmark: Mixtral-style (D=4096, F=14336, E=8, k=2) and Qwen3-MoE-style (D=2048,
F=768, E=128, k=8) decoders with a few layers at full width, random bf16 weights, one model
timed first as transformers builds it (its default experts implementation) and then, the same
parameters, after ``apply_scattermoe(model)``. Before timing, the patched logits are checked
against the float32 model's on the same weights, within harness.logits_bound of the unpatched bf16 model's own
error (a random model is chaotic in bf16: two bf16 runs do not agree to a fixed bound).

The vocabulary is cut to 32000 for both (Qwen3's 151936 would make the fp32 logits of the loss,
not the MoE, the largest tensor of the step); say so when quoting the numbers. FLOPs are the
usual 6 * (active non-embedding parameters) * tokens, attention scores not counted.

    python -m bench.bench_hf_patch [--quick] [--out DIR]      # needs CUDA; rows in the bench JSON schema
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

VOCAB = 32000

# family -> (transformers config class name, config kwargs at full width, layers timed)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                      num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8), 2),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                         num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                                         head_dim=128, norm_topk_prob=True), 4),
}


def build(family: str, layers: int, device: torch.device, dtype: torch.dtype):
    import transformers

    config_name, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(vocab_size=VOCAB, num_hidden_layers=layers, **kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def active_params(model, family: str) -> int:
    """Non-embedding parameters a token touches: experts counted k/E of their total."""
    _, kwargs, _ = FAMILIES[family]
    E = kwargs.get("num_local_experts", kwargs.get("num_experts"))
    k = kwargs["num_experts_per_tok"]
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        total += p.numel() * k // E if ".experts." in name else p.numel()
    return total


def _float32_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a float32 copy of model (the same weights, upcast exactly), the copy freed after."""
    import copy

    with torch.no_grad():
        logits = copy.deepcopy(model).float()(input_ids=ids).logits.float()
    torch.cuda.empty_cache()
    return logits


def _time_step(model, batches: List[torch.Tensor], repeats: int) -> List[float]:
    """ms per forward+backward, CUDA events, rotating input sets; one warm-up per set."""
    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    for ids in batches:
        step(ids)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(batches[i % len(batches)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        model.zero_grad(set_to_none=True)
    return times


def run(quick: bool = False, batch: int = 4, seq: int = 2048, log=print,
        on_family: Callable[[List[Dict]], None] = lambda rows: None) -> List[Dict]:
    """The rows (bench JSON schema) for every family: impl 'transformers' and 'transformers_scattermoe'.
    ``on_family(rows so far)`` after each family."""
    from scattermoe.integrations import apply_scattermoe

    from .harness import logits_bound, rel_err

    device, dtype = torch.device("cuda"), torch.bfloat16
    repeats, sets = (5, 2) if quick else (10, 3)
    rows = []
    for family, (_, _, layers) in FAMILIES.items():
        base = {"case": f"hf_{family}_fwd_bwd", "tokens": batch * seq, "routing": "model", "dtype": "bfloat16",
                "layers": layers, "vocab": VOCAB}
        try:
            model = build(family, layers, device, dtype)
            flops = 6 * active_params(model, family) * batch * seq
            batches = [torch.randint(0, VOCAB, (batch, seq), device=device) for _ in range(sets)]
            probe = batches[0][:1, :256]
            ref_logits = _float32_logits(model, probe)  # the float32 model on the same weights (harness.logits_bound)
            with torch.no_grad():
                own_err = rel_err(model(input_ids=probe).logits, ref_logits)
            for impl in ("transformers", "transformers_scattermoe"):
                if impl == "transformers_scattermoe":
                    apply_scattermoe(model)
                    with torch.no_grad():
                        err = rel_err(model(input_ids=probe).logits, ref_logits)
                    if not err < logits_bound(own_err):  # (also catches NaN)
                        raise AssertionError(f"patched logits differ from the float32 model's: rel err {err:.3e}, "
                                             f"bound {logits_bound(own_err):.3e} (unpatched bf16: {own_err:.3e})")
                torch.cuda.reset_peak_memory_stats()
                times = _time_step(model, batches, repeats)
                ms = sorted(times)[len(times) // 2]
                row = dict(base, impl=impl, ms=ms, tflops=flops / ms / 1e9, tokens_per_s=batch * seq / ms * 1e3,
                           peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9, raw_ms=times, status="ok")
                if impl == "transformers_scattermoe":
                    row["max_rel_err_logits"] = err  # against the float32 model, as is the next one
                    row["unpatched_rel_err_logits"] = own_err
                rows.append(row)
                log(f"{base['case']:<28} {impl:<26} {ms:9.2f} ms {row['tokens_per_s']:10.0f} tok/s "
                    f"{row['peak_mem_gb']:6.1f} GB")
            del model
            torch.cuda.empty_cache()
        except Exception as exc:  # one family failing must not lose the others' rows
            rows.append(dict(base, impl="transformers_scattermoe", ms=None, tflops=None, peak_mem_gb=None,
                             status="error", error=f"{type(exc).__name__}: {exc}"))
            log(f"{base['case']:<28} error: {type(exc).__name__}: {exc}")
        on_family(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_hf_patch", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.bench_hf_patch: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    created = time.strftime("%Y-%m-%dT%H:%M:%S")

    def write(rows) -> None:  # after each family: a run stopped by the clock keeps the families it finished
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"device": torch.cuda.get_device_name(), "created": created, "rows": rows}
            args.out.write_text(json.dumps(payload, indent=1))

    rows = run(args.quick, on_family=write)  # written after each family, the last included
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
