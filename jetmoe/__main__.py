"""python -m jetmoe {demo,generate,train,eval}: the command line.

    python -m jetmoe demo                                  # ~2 min on a laptop CPU: train tiny, save, sample
    python -m jetmoe generate --model jetmoe/jetmoe-8b --prompt "My favourite condiment is"
    python -m jetmoe train --model tiny --data my_code/ --out runs/tiny --seconds 600
    python -m jetmoe eval --model jetmoe/jetmoe-8b --compare-transformers   # perplexity, beside transformers
    torchrun --nproc_per_node 8 -m jetmoe train ...        # DDP (nccl on CUDA, gloo on the CPU)
    torchrun --nproc_per_node 8 -m jetmoe train --fsdp --grad-checkpoint --model <jetmoe-8b dir> ...  # JetMoE-8B

User errors (missing checkpoint, unknown flag, CUDA asked for but absent) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

EXIT_USAGE = 2
DEMO_PROMPT = "import os\n\n\ndef "


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; one line is enough
        raise CLIError(message)


def _number(kind, name: str, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: kind(text) within [low, high] (open at either end with low_open, high_open), finite, or a
    usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is int and high is None and value > 2**63 - 1:  # int64: torch takes no larger size
            raise argparse.ArgumentTypeError(f"expected a value <= {2**63 - 1}, got {text}")
        bad = not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and (value >= high if high_open else value > high))
        if bad:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"expected a value {' and '.join(x for x in (lo, hi) if x)}, got {text}")
        return value
    parse.__name__ = name  # argparse names the type in its message
    return parse


def _user_path(text: str) -> Path:
    """An argparse type for a path: ~ expanded, as --model's is (the shell leaves --out=~/x as it is)."""
    return Path(text).expanduser()


def _nearest_existing(path: Path) -> Path:
    """path, or its nearest ancestor that exists: where making the missing folders would start."""
    while not path.exists():
        path = path.parent
    return path


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """--out must be (or become) a directory; an existing checkpoint there is continued or replaced, never by
    accident."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    parent = _nearest_existing(out)
    if not parent.is_dir():
        raise CLIError(f"--out {out}: {parent} is a file, so the directory cannot be made")
    from .train import TRAINER_STATE

    if resume and not (out / TRAINER_STATE).is_file():
        raise CLIError(f"--resume: nothing to resume in {out} (no {TRAINER_STATE}"
                       + (": a checkpoint whose save was cut short, or not a training run)"
                          if (out / "config.json").is_file() else ")"))
    if not resume and not overwrite and (out / TRAINER_STATE).is_file():
        raise CLIError(f"--out {out}: holds a training run already; pass --resume to continue it or --overwrite "
                       "to start over in its place")
    if not resume and not overwrite and out.is_dir():
        found = [p.name for p in sorted(out.iterdir()) if p.name == "config.json" or p.suffix == ".safetensors"]
        if found:  # e.g. a downloaded checkpoint: saving would replace its config and delete its shards
            listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise CLIError(f"--out {out}: holds a checkpoint ({listed}) that saving would replace; pass "
                           "--overwrite to replace it, or another --out (to fine-tune it, pass it as --model)")


def check_output_file(flag: str, path: Path) -> None:
    """A file the command will write at its end: refused now, not after the work, if it cannot be."""
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a directory")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: {parent} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{flag} {path}: {parent} is not writable")


def warn_past_context(what: str, length: int, config) -> None:
    """Positions past max_position_embeddings are beyond what the model was trained on: allowed (rotary positions
    extrapolate), but said."""
    if length > config.max_position_embeddings:
        print(f"warning: {what} {length} is longer than the model's context, max_position_embeddings = "
              f"{config.max_position_embeddings}: positions past it were never trained", file=sys.stderr)


def default_out_dir(name: str) -> Path:
    """Outside the working tree, so a demo run leaves nothing behind in a checkout."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "jetmoe" / name


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device(name)
    if name != "cpu":
        raise CLIError(f"--device: expected auto, cpu or cuda[:N], got {name!r}")
    return torch.device("cpu")


def pick_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' on the CPU means the torch backend: the Triton kernels would run in the (slow) interpreter."""
    import scattermoe
    from scattermoe.backends import cutlass_unsupported_reason, triton_unsupported_reason

    if name == "auto":
        name = "torch" if device.type == "cpu" else "auto"
    probe = torch.empty(0, device=device, dtype=dtype)
    check = {"triton": triton_unsupported_reason, "cutlass": cutlass_unsupported_reason}.get(name)
    reason = check(probe) if check is not None else None
    if reason is not None:
        raise CLIError(f"--backend {name}: {reason}")
    scattermoe.set_backend(name)
    return name


def backend_note(backend: str, device: torch.device) -> str:
    if backend == "torch" and device.type == "cpu":
        return "backend: torch (scattermoe's PyTorch path, the fastest correct one on a CPU: Triton runs there " \
               "only in its interpreter)"
    return f"backend: {backend} (scattermoe kernels on {device})"


def load_dtype(ckpt: Path, name: str, device: torch.device) -> torch.dtype:
    """The dtype to load a checkpoint in: --dtype, else as stored on CUDA (bf16 for JetMoE-8B), float32 on the
    CPU. Read from the files' headers, so that it is known (and checked against the backend) before loading."""
    from .checkpoint import _as_dtype, stored_dtype, weight_files

    return _as_dtype(name) or (stored_dtype(weight_files(ckpt)) if device.type == "cuda" else torch.float32)


def corpus_label(data: Optional[List[str]]) -> str:
    """What --data names, for the logs: the paths, or the default corpus."""
    return ", ".join(map(str, data)) if data else "the Python standard library's .py files"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux: the process's peak RSS


class Streamer:
    """Prints the text of row 0 as tokens arrive. Decodes prompt + new ids and prints what is new, so that
    SentencePiece's leading spaces survive, and holds back a half-received UTF-8 character."""

    def __init__(self, tokenizer, prompt_ids: List[int], enabled: bool) -> None:
        self.tokenizer, self.ids, self.enabled = tokenizer, list(prompt_ids), enabled
        self.shown = tokenizer.decode(self.ids)

    def __call__(self, tokens: torch.Tensor) -> None:
        if not self.enabled:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def run_generation(model, tokenizer, prompts: List[str], args, device: torch.device, stream: bool) -> None:
    """Generate for each prompt (a left-padded batch), stream row 0, and report like gpt-fast."""
    rows = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, rows))
    # Padding is masked out, so any id will do where the tokenizer has no pad (nor eos) token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):  # left padding: every row's last prompt token in the last column
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    warn_past_context("the prompt and --max-new-tokens,", width + args.max_new_tokens, model.config)
    eos = None if args.ignore_eos else tokenizer.eos_token_id
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, top_k=getattr(args, "top_k", 0), eos_token_id=eos,
                  attention_mask=mask, generator=gen, cuda_graph=getattr(args, "cuda_graph", False))
    warm_s = 0.0
    for _ in range(args.warmup):  # JIT compilation and allocator warm-up, timed apart
        t = time.perf_counter()
        model.generate(input_ids, min(8, args.max_new_tokens), **kwargs)
        warm_s += time.perf_counter() - t
    gen.manual_seed(args.seed)  # the same samples with or without warm-up runs (they drew from gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    streamer = Streamer(tokenizer, rows[0], stream and len(rows) == 1)
    stats: dict = {}
    if streamer.enabled:
        print(prompts[0], end="", flush=True)
    out = model.generate(input_ids, args.max_new_tokens, callback=streamer, stats=stats, **kwargs)
    if streamer.enabled:
        print()
    else:
        for i, row in enumerate(out.tolist()):  # the row's own tokens (no left padding) decoded whole
            print(f"--- [{i}]\n{tokenizer.decode(row[width - len(rows[i]):])}")
    steps = max(stats["new_tokens"] - 1, 0)
    tok_s = steps / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    gbs = model.decode_step_weight_bytes() * tok_s / 1e9
    graph = (f" (CUDA graph: its first step and capture took {stats['capture_s'] * 1e3:.0f} ms of it)"
             if "capture_s" in stats else "")
    warm = f" | {args.warmup} warm-up run{'s' * (args.warmup > 1)}: {warm_s:.2f} s, timed apart" if args.warmup else ""
    print(f"prefill {width} tokens x {len(rows)}: {stats['prefill_s'] * 1e3:.1f} ms | decode {steps} steps: "
          f"{tok_s:.1f} tokens/s per sequence{graph}, {gbs:.2f} GB/s of weights{warm} | "
          f"peak memory {peak_memory_gb(device):.2f} GB", file=sys.stderr)


def cmd_generate(args) -> None:
    from .checkpoint import load_config, load_pretrained, resolve
    from .tokenizer import load_tokenizer

    device = pick_device(args.device)
    if args.cuda_graph and device.type != "cuda":  # before loading a checkpoint that may be 17 GB
        raise CLIError(f"--cuda-graph: CUDA graphs need a CUDA device, and this run is on {device}")
    ckpt = resolve(args.model)
    dtype = load_dtype(ckpt, args.dtype, device)
    backend = pick_backend(args.backend, device, dtype)  # before loading what may be 17 GB
    tokenizer = load_tokenizer(ckpt, load_config(ckpt).vocab_size)  # before the weights: a missing package is said
    model = load_pretrained(ckpt, dtype=dtype, device=device)        # at once, not after loading 17 GB
    print(f"{ckpt}: {model.num_parameters() / 1e6:.1f}M parameters, {model.lm_head.weight.dtype} on {device}; "
          f"{backend_note(backend, device)}", file=sys.stderr)
    if args.warmup is None:
        args.warmup = 1 if device.type == "cuda" else 0
    run_generation(model, tokenizer, args.prompt or ["My favourite condiment is"], args, device, not args.no_stream)


# Bounds for `eval --compare-transformers`, (loss, logits): |our loss - theirs| / theirs, and ||our logits - theirs|| /
# ||theirs|| over the first batch (DESIGN.md's bounds for the dtype). The two compute the same function in another
# order (fused kernels, another attention), so they differ by rounding only.
COMPARE_RTOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (1e-2, 2e-2)}


def cmd_eval(args) -> int:
    """Held-out cross entropy and perplexity of a checkpoint; with --compare-transformers the same windows through
    transformers' JetMoeForCausalLM loaded from the same files. Exit status 1 when the two disagree."""
    import json

    from .checkpoint import config_to_dict, load_config, load_pretrained, resolve
    from .tokenizer import load_tokenizer
    from .train import eval_windows, evaluate, load_corpus, tokenize

    device = pick_device(args.device)
    if args.compare_transformers:  # before minutes of work on a large model
        try:
            from transformers import JetMoeConfig as TransformersJetMoeConfig
            from transformers import JetMoeForCausalLM as TransformersJetMoe
        except ImportError as exc:
            raise CLIError(f"--compare-transformers: needs transformers with JetMoE ({exc})") from None
    if args.json is not None:
        check_output_file("--json", args.json)
    ckpt = resolve(args.model)
    dtype = load_dtype(ckpt, args.dtype, device)
    if args.compare_transformers and dtype not in COMPARE_RTOL:
        raise CLIError(f"--compare-transformers: no bound for {dtype}; pass --dtype float32, bfloat16 or float16")
    backend = pick_backend(args.backend, device, dtype)  # before loading what may be 17 GB
    # The tokenizer, the text and its windows before the weights: a bad --data or --seq-len is told at once.
    config = load_config(ckpt)
    tokenizer = load_tokenizer(ckpt, config.vocab_size)
    t = time.perf_counter()
    docs = load_corpus(args.data)
    windows = eval_windows(tokenize(docs, tokenizer), args.seq_len, args.windows)
    warn_past_context("--seq-len", args.seq_len, config)
    model = load_pretrained(ckpt, dtype=dtype, device=device)
    what = corpus_label(args.data)
    print(f"{ckpt}: {model.num_parameters() / 1e6:.1f}M parameters, {dtype} on {device}; "
          f"{backend_note(backend, device)}", file=sys.stderr)
    print(f"text: {len(docs)} documents from {what} (read in {time.perf_counter() - t:.1f} s); {windows.shape[0]} "
          f"windows of {args.seq_len} tokens spread over it", file=sys.stderr)

    def run(name, m) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        r = evaluate(m, windows, args.batch_size, progress=not args.no_progress, per_window=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        r["seconds"] = time.perf_counter() - t0
        print(f"{name:<13} loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  over {r['tokens']:,} predicted "
              f"tokens in {r['seconds']:.1f} s")
        return r

    ours = run("jetmoe", model)
    report = {"model": str(ckpt), "dtype": str(dtype).removeprefix("torch."), "device": str(device),
              "backend": backend, "seq_len": args.seq_len, "windows": ours["windows"], "tokens": ours["tokens"],
              "data": [str(p) for p in args.data] if args.data else "python stdlib",
              "jetmoe": {k: ours[k] for k in ("loss", "perplexity", "seconds")}}
    status = 0
    if args.compare_transformers:
        del model  # one model at a time: JetMoE-8B is 17 GB in bfloat16
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # With accelerate, device_map puts the weights straight on the device (not through host memory first).
        import importlib.util
        placement = {"device_map": str(device)} if importlib.util.find_spec("accelerate") else {}
        # The config as jetmoe read it: transformers reads only its own key names, and would build its defaults
        # from a config.json in the original JetMoE spelling (ffn_hidden_size, num_layers, ...).
        hf_config = TransformersJetMoeConfig.from_dict(config_to_dict(config))
        hf = TransformersJetMoe.from_pretrained(str(ckpt), config=hf_config, dtype=dtype, **placement).to(device)
        theirs = run("transformers", hf)
        loss_rel = abs(ours["loss"] - theirs["loss"]) / max(abs(theirs["loss"]), 1e-12)
        window_diff = max(abs(a - b) for a, b in zip(ours["window_losses"], theirs["window_losses"]))
        a, b = ours["first_logits"].double(), theirs["first_logits"].double()
        logits_rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        loss_bound, logits_bound = COMPARE_RTOL[dtype]
        agree = loss_rel <= loss_bound and logits_rel <= logits_bound
        print(f"jetmoe vs transformers ({str(dtype).removeprefix('torch.')}): loss differs by {loss_rel:.2e} relative "
              f"(bound {loss_bound:g}), the first batch's logits by {logits_rel:.2e} (||diff|| / ||logits||, bound "
              f"{logits_bound:g}): {'agree' if agree else 'DISAGREE'}; largest per-window loss difference "
              f"{window_diff:.2e}")
        report["transformers"] = {k: theirs[k] for k in ("loss", "perplexity", "seconds")}
        report["compare"] = {"loss_rel_diff": loss_rel, "loss_bound": loss_bound,
                             "first_batch_logits_rel_diff": logits_rel, "logits_bound": logits_bound,
                             "max_window_loss_diff": window_diff, "agree": agree}
        status = 0 if agree else 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return status


def _training_setup(args, device: torch.device, rank0: bool = True):
    """(tokenizer, config, build) for train: the tokenizer and config are read now (cheap), the model only when
    build() is called, so that the corpus can be checked first."""
    from .checkpoint import load_config, load_pretrained, resolve
    from .model import PRESETS, JetMoEConfig, JetMoEForCausalLM
    from .tokenizer import ByteTokenizer, load_tokenizer

    if args.resume and (Path(args.out) / "config.json").is_file():  # continue the model that is there
        config = load_config(args.out)
        # Its weights are left unloaded: train() reloads them from the same files when it resumes.
        return load_tokenizer(args.out, config.vocab_size), config, lambda: load_pretrained(
            args.out, dtype=torch.float32, device=device, weights=False)
    checkpoint_here = (Path(args.model) / "config.json").is_file()  # which generate and eval would read
    if args.command == "train" and args.model in PRESETS and checkpoint_here:  # (demo has no --model)
        raise CLIError(f"--model {args.model}: both a preset and a checkpoint here; pass ./{args.model} to train "
                       "the checkpoint in the directory, or run from another folder to train the preset from scratch")
    if args.model in PRESETS:
        config = JetMoEConfig.preset(args.model)
        if config.vocab_size != ByteTokenizer().vocab_size:  # before building it: jetmoe-8b is 34 GB in fp32
            raise CLIError(f"--model {args.model}: this preset needs a {config.vocab_size}-token tokenizer, which "
                           "only a checkpoint has; pass a checkpoint directory (e.g. a download of "
                           "jetmoe/jetmoe-8b) to fine-tune it, or --model tiny to train from scratch")

        def build():
            torch.manual_seed(args.seed)
            return JetMoEForCausalLM(config).to(device)
        return ByteTokenizer(), config, build
    if not Path(args.model).expanduser().is_dir() and "/" not in args.model:
        raise CLIError(f"--model {args.model}: not a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    ckpt = resolve(args.model)
    config = load_config(ckpt)
    # fp32 master weights (autocast on GPU); one progress bar, not one per process
    return load_tokenizer(ckpt, config.vocab_size), config, lambda: load_pretrained(
        ckpt, dtype=torch.float32, device=device, progress=None if rank0 else False)


# On --resume, the options that shape the run take the run's own values (its saved TrainConfig) unless given
# again: the option's dest -> the TrainConfig field. Not the text (--data: only its fingerprint is saved, and a
# change is warned about), nor how it runs (device, amp, FSDP, recomputation, compile: a resume may change them).
RUN_SETTINGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "grad_accum": "grad_accum",
                "lr": "lr", "warmup": "warmup_steps", "seed": "seed", "val_fraction": "val_fraction",
                "eval_every": "eval_every", "eval_windows": "eval_windows", "save_every": "save_every",
                "log_every": "log_every"}


def given_options(argv: Optional[List[str]]) -> set:
    """The options (argparse dests) that argv gives, as opposed to those left at their defaults."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for sp in (parser, *subparsers.choices.values()):
        for action in sp._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def inherit_run_settings(args, saved: dict, given: set) -> List[str]:
    """--resume: each of RUN_SETTINGS that the command line does not give takes the saved run's value (a changed
    --seq-len, say, warned about but taken, made the resume another run). Returns "--option value" for each value
    taken that differs from the option's default."""
    taken = []
    for dest, field in RUN_SETTINGS.items():
        if dest in given or field not in saved or not hasattr(args, dest):
            continue
        value = saved[field]
        if value != getattr(args, dest) and value is not None:
            taken.append(f"--{dest.replace('_', '-')} {f'{value:g}' if isinstance(value, float) else value}")
        setattr(args, dest, value)
    return taken


def _train(args, demo: bool) -> None:
    from .model import unknown_compile_backend
    from .train import (TrainConfig, amp_dtype_for, init_distributed, load_corpus, saved_train_config, split_corpus,
                        tokenize, train)

    inherited = []
    if args.resume and not args.overwrite:  # (both: refused below)
        inherited = inherit_run_settings(args, saved_train_config(args.out), getattr(args, "given", set(vars(args))))
    if args.resume and args.overwrite:  # one continues the run in --out, the other replaces it
        raise CLIError("--resume and --overwrite: pass one, --resume to continue the run in --out or --overwrite to "
                       "start over in its place")
    if args.eval_every and not args.val_fraction:  # before any work
        raise CLIError("--eval-every: needs a held-out part, --val-fraction > 0")
    compile_backend = getattr(args, "compile", None)
    why = unknown_compile_backend(compile_backend) if compile_backend is not None else None
    if why:
        raise CLIError(f"--compile: {why}")
    if getattr(args, "sharded_optimizer_state", False) and not args.fsdp:
        raise CLIError("--sharded-optimizer-state: needs --fsdp (under DDP every process holds the whole optimizer "
                       "state, so there are no shards to write)")
    device = pick_device(args.device)
    amp_dtype = amp_dtype_for(args.amp, device)
    backend = pick_backend(args.backend, device, amp_dtype or torch.float32)
    # The demo's default folder is its cache, replaced by each run; any other --out is kept as train keeps it.
    replace = args.overwrite or (demo and Path(args.out) == default_out_dir("tiny"))
    check_out_dir(Path(args.out), args.resume, replace)
    rank, world = init_distributed(device)  # under torchrun: join the process group before anything else
    rank0 = rank == 0
    if inherited and rank0:
        print(f"--resume: the run's own {', '.join(inherited)} (give an option again to change it)", flush=True)
    tokenizer, config, build = _training_setup(args, device, rank0)
    t = time.perf_counter()
    docs = load_corpus(args.data)
    tokens = tokenize(docs, tokenizer)
    from .model import PRESETS
    lr = args.lr  # with --resume, the run's own (inherit_run_settings): a preset's 4e-3 would follow a fine-tune
    if lr is None:
        lr = 4e-3 if args.model in PRESETS else 2e-5
    cfg = TrainConfig(out_dir=str(args.out), steps=args.steps, seconds=args.seconds, batch_size=args.batch_size,
                      seq_len=args.seq_len, grad_accum=args.grad_accum, lr=lr, warmup_steps=args.warmup,
                      save_every=args.save_every, log_every=args.log_every, seed=args.seed, resume=args.resume,
                      progress=not args.no_progress, fsdp=getattr(args, "fsdp", False),
                      sharded_optimizer_state=getattr(args, "sharded_optimizer_state", False),
                      grad_checkpoint=getattr(args, "grad_checkpoint", False), val_fraction=args.val_fraction,
                      eval_every=args.eval_every, eval_windows=args.eval_windows, amp=amp_dtype is not None,
                      compile=compile_backend)
    if cfg.steps is None and cfg.seconds is None:
        raise CLIError("give --steps or --seconds")
    # A corpus too short for --seq-len / --val-fraction: told before the model is built.
    training_part, val_windows = split_corpus(tokens, cfg)
    held_out = tokens.numel() - training_part.numel()  # at least one window: more than --val-fraction of a short text
    if rank0:
        warn_past_context("--seq-len", cfg.seq_len, config)
    model = build()
    if rank0:
        c = model.config
        print(f"JetMoE {model.num_parameters() / 1e6:.2f}M parameters ({c.num_hidden_layers} layers, "
              f"d={c.hidden_size}, {c.num_local_experts} experts top-{c.num_experts_per_tok} in attention and MLP) "
              f"on {device}{' (bfloat16 autocast)' if amp_dtype else ''}; "
              f"{backend_note(backend, device)}")
        if world > 1:
            how = "FSDP2 (fully_shard, one unit per decoder layer)" if cfg.fsdp else "DistributedDataParallel"
            print(f"{how} over {world} processes ({torch.distributed.get_backend()})")
        elif cfg.fsdp:
            print("--fsdp: one process, nothing to shard over; training unsharded (run under torchrun to shard)")
        what = corpus_label(args.data)
        budget = " and ".join(x for x in (f"{cfg.steps} steps" if cfg.steps else "",
                                          f"{cfg.seconds:g} s" if cfg.seconds else "") if x)
        print(f"corpus: {len(docs)} documents from {what}, {tokens.numel() / 1e6:.1f}M tokens "
              f"(read in {time.perf_counter() - t:.1f} s); training for {budget}", flush=True)

    def log(rec: dict) -> None:
        from tqdm import tqdm
        val = f"  held-out {rec['val_loss']:.3f}" if "val_loss" in rec else ""
        tqdm.write(f"step {rec['step']:5d}  loss {rec['loss']:.3f}{val}  aux {rec['aux_loss']:.4f}  "
                   f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:.0f} tokens/s")

    records = train(model, tokens, cfg, tokenizer, log=log if rank0 else None)
    if not rank0:
        return
    if records:
        n = max(1, min(10, len(records) // 4))
        end = sum(r["loss"] for r in records[-n:]) / n
        print(f"loss {records[0]['loss']:.3f} at step {records[0]['step']} -> {end:.3f} (mean of the last {n} "
              f"step{'s' * (n > 1)}) after {len(records)} steps in {records[-1]['elapsed_s']:.0f} s")
        if "val_loss" in records[-1]:
            n = val_windows.shape[0] - val_windows.shape[0] % world  # evaluate's share over the processes
            print(f"held-out loss {records[-1]['val_loss']:.3f} (perplexity {records[-1]['val_perplexity']:.2f}) on "
                  f"{n} window{'s' * (n > 1)} of {cfg.seq_len} tokens spread over the corpus's last {held_out:,} "
                  f"tokens ({100 * held_out / tokens.numel():.2g}%), never trained on")
    if records:
        print(f"saved to {cfg.out_dir} (HF layout: transformers.JetMoeForCausalLM.from_pretrained loads it too)")
    else:  # a resume already at --steps
        print(f"nothing trained: {cfg.out_dir} is as it was (pass a larger --steps to train on)")
    from .train import TRAIN_LOG, TRAIN_PLOT, plot_train_log
    why_not = plot_train_log(cfg.out_dir)
    curve = f"loss curve: {Path(cfg.out_dir) / TRAIN_PLOT}" if why_not is None else why_not
    print(f"log: {Path(cfg.out_dir) / TRAIN_LOG}; {curve}")
    if demo:
        model.eval()
        args.temperature, args.top_p, args.ignore_eos, args.warmup = 0.8, 0.95, False, 0
        print("sample:\n" + "-" * 60)
        run_generation(model, tokenizer, [args.prompt], args, device, stream=True)


# What to lower when a command runs out of memory (its own options).
_LOWER_FOR_MEMORY = {
    "train": "a smaller --batch-size or --seq-len (--grad-accum keeps the batch per step), or a smaller model",
    "demo": "a smaller --batch-size or --seq-len (--grad-accum keeps the batch per step)",
    "eval": "a smaller --batch-size or --seq-len, or --dtype bfloat16",
    "generate": "fewer or shorter --prompt, fewer --max-new-tokens, or --dtype bfloat16",
    None: "smaller sizes",
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jetmoe", description="JetMoE on scattermoe: generate, train, eval, demo.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp, backend_help="scattermoe backend (auto: torch on a CPU, the fast kernels on CUDA)", seed=True):
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        sp.add_argument("--backend", default="auto", choices=["auto", "triton", "cutlass", "torch"], help=backend_help)
        if seed:  # eval draws nothing at random
            # Below 2**32: train mixes it into each step's 64-bit seed (seed * 1000003 + step).
            sp.add_argument("--seed", type=_number(int, "seed", 0, 2**32 - 1), default=0)

    def checkpoint(sp):
        sp.add_argument("--model", default="jetmoe/jetmoe-8b", help="checkpoint directory or Hub id")
        sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: as stored on CUDA, float32 on the CPU")

    def data(sp):
        sp.add_argument("--data", nargs="+", type=_user_path, help="text files or directories (directories: their "
                        ".py, .txt, .md and .rst files; default: the Python stdlib's .py files)")

    def sampling(sp, max_new: int):
        sp.add_argument("--max-new-tokens", type=_number(int, "max-new-tokens", 1), default=max_new)
        sp.add_argument("--temperature", type=_number(float, "temperature", 0), default=0.0,
                        help="0 = greedy; > 0 samples (--top-p and --top-k need it)")
        sp.add_argument("--top-p", type=_number(float, "top-p", 0, 1, low_open=True), default=1.0,
                        help="nucleus sampling: keep the smallest set of tokens with this much probability (0, 1]")
        sp.add_argument("--top-k", type=_number(int, "top-k", 0), default=0,
                        help="sample from the k most likely tokens only (0 = all; applied before --top-p)")
        sp.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")

    def training(sp, out: Path, seconds: Optional[float], batch: int, seq: int, lr: Optional[float],
                 log_every: int = 25, val_fraction: float = 0.0, fsdp: bool = False):
        data(sp)
        sp.add_argument("--out", type=_user_path, default=out, help=f"checkpoint directory (default {out})")
        sp.add_argument("--steps", type=_number(int, "steps", 1), default=None,
                        help="stop at this optimizer step (counting the steps of a resumed run)")
        sp.add_argument("--seconds", type=_number(float, "seconds", 0, low_open=True), default=seconds,
                        help="training time budget of this run")
        sp.add_argument("--batch-size", type=_number(int, "batch-size", 1), default=batch,
                        help="sequences per process per micro-step")
        sp.add_argument("--seq-len", type=_number(int, "seq-len", 2), default=seq,
                        help="tokens per training sequence (at least 2: one predicts the next)")
        sp.add_argument("--grad-accum", type=_number(int, "grad-accum", 1), default=1)
        sp.add_argument("--lr", type=_number(float, "lr", 0, low_open=True), default=lr,
                        help="peak learning rate (default: 4e-3 for a preset trained from scratch, 2e-5 to "
                        "fine-tune a checkpoint, the run's own with --resume)")
        sp.add_argument("--warmup", type=_number(int, "warmup", 0), default=20, help="warm-up steps")
        sp.add_argument("--save-every", type=_number(int, "save-every", 0), default=0,
                        help="steps between checkpoints (0: at the end)")
        sp.add_argument("--log-every", type=_number(int, "log-every", 1), default=log_every,
                        help="steps between loss lines")
        sp.add_argument("--resume", action="store_true", help="continue from --out (weights, optimizer, step)")
        sp.add_argument("--no-progress", action="store_true", help="no tqdm bar")
        sp.add_argument("--val-fraction", type=_number(float, "val-fraction", 0, 1, high_open=True),
                        default=val_fraction,
                        help=f"hold out the corpus's last fraction for a held-out loss (default {val_fraction:g}; "
                        "keep it the same when resuming)")
        sp.add_argument("--eval-every", type=_number(int, "eval-every", 0), default=0,
                        help="steps between held-out losses (0: at the end only)")
        sp.add_argument("--eval-windows", type=_number(int, "eval-windows", 1), default=32,
                        help="windows of --seq-len held-out tokens per evaluation")
        sp.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast over float32 weights (default: on CUDA, off on the CPU)"
                        + ("; with --fsdp the decoder layers' weights are also gathered in bfloat16" if fsdp else ""))

    g = sub.add_parser("generate", help="generate text from a checkpoint (directory or Hub id)")
    checkpoint(g)
    g.add_argument("--prompt", action="append", help="repeat for a batch (left-padded)")
    g.add_argument("--warmup", type=_number(int, "warmup", 0), default=None,
                   help="warm-up runs timed apart (default: 1 on CUDA)")
    g.add_argument("--no-stream", action="store_true")
    g.add_argument("--cuda-graph", action="store_true",
                   help="run the decode steps as replays of one CUDA graph (CUDA only; no per-kernel launch cost)")
    common(g)
    sampling(g, 64)

    t = sub.add_parser("train", help="train a preset from scratch or fine-tune a checkpoint")
    t.add_argument("--model", default="tiny", help="tiny (a preset, trained from scratch with a byte tokenizer) "
                   "or a checkpoint directory or Hub id to fine-tune")
    t.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run already")
    common(t)
    training(t, default_out_dir("train"), None, 16, 128, None, fsdp=True)
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) "
                   "instead of a whole replica on each (DDP); JetMoE-8B needs it (16 bytes a parameter, 136 GB); "
                   "under --amp the decoder layers are gathered in bfloat16")
    t.add_argument("--sharded-optimizer-state", action="store_true",
                   help="with --fsdp: each process writes its own shards of the optimizer state "
                   "(torch.distributed.checkpoint, in OUT/optimizer_dcp) instead of gathering it to rank 0 "
                   "(JetMoE-8B: 68 GB); the weights are still gathered into the HF layout. Any mode and process "
                   "count resumes from it. Over several nodes, OUT must be a filesystem they all share")
    t.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each decoder layer's activations in the backward instead of keeping them "
                   "(less memory for one more forward's compute)")
    t.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the decoder layers (one graph shared by all; the embedding, head and losses "
                   "stay eager): BACKEND inductor (the default) or another torch.compile backend, e.g. aot_eager")

    e = sub.add_parser("eval", help="cross entropy and perplexity of a checkpoint on text, optionally beside "
                       "transformers' implementation")
    checkpoint(e)
    data(e)
    e.add_argument("--seq-len", type=_number(int, "seq-len", 2), default=512)
    e.add_argument("--batch-size", type=_number(int, "batch-size", 1), default=4)
    e.add_argument("--windows", type=_number(int, "windows", 0), default=64,
                   help="windows of --seq-len tokens, spread evenly over the text (0: all of it)")
    e.add_argument("--compare-transformers", action="store_true",
                   help="run the same windows through transformers' JetMoeForCausalLM loaded from the same files; "
                   "exit status 1 when the losses or the first batch's logits differ by more than rounding "
                   "(float32: 1e-4 relative for both; 16 bits: 1e-2 for the loss, 2e-2 for the logits)")
    e.add_argument("--json", type=_user_path, help="write the numbers to this file")
    e.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    common(e, seed=False)

    d = sub.add_parser("demo", help="train the built-in tiny model for ~2 minutes, save it, sample from it")
    common(d)
    training(d, default_out_dir("tiny"), 100.0, 16, 128, None, log_every=5,  # a few seconds a step on a CPU
             val_fraction=0.005)
    d.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run or a checkpoint (the default --out is replaced "
                   "by each demo run)")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=_number(int, "max-new-tokens", 1), default=300)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .train import TrainingDiverged

    try:
        args = argparse.Namespace(command=None)
        args = build_parser().parse_args(argv)
        if getattr(args, "resume", False):  # it keeps the run's own values of the options not given
            args.given = given_options(argv)
        if getattr(args, "temperature", None) == 0 and (args.top_p < 1 or args.top_k > 0):
            raise CLIError("--top-p and --top-k choose among sampled tokens; with --temperature 0 (greedy, the "
                           "default) nothing is sampled: give --temperature > 0 too")
        if args.command == "generate":
            cmd_generate(args)
        elif args.command == "eval":
            return cmd_eval(args)
        else:
            if args.command == "demo":
                args.model = "tiny"
            _train(args, demo=args.command == "demo")
    except (CLIError, OSError, ValueError) as exc:  # CheckpointError is a ValueError; OSError: files, folders
        print(f"jetmoe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as exc:
        print(f"jetmoe: error: {exc}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, TypeError) as exc:
        # torch.OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError: one line, as the sizes were the cause;
        # sizes past int64 (options whose sum or product overflows) fail in torch's argument parser or allocator.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        too_large = ("can't allocate memory", "Storage size calculation overflowed", "Overflow when unpacking long")
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and not any(t in message for t in too_large):
            raise
        print(f"jetmoe: error: out of memory ({message}): {_LOWER_FOR_MEMORY[args.command]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        # Under torchrun: leave the process group before the interpreter exits. Gloo's worker threads that are
        # still alive at interpreter teardown abort the process ("terminate called without an active exception").
        # FSDP's modules hold the group through reference cycles (their hooks): collected first, so that no
        # group outlives destroy_process_group.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gc.collect()
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
