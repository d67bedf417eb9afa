"""Training: corpus -> token stream -> AdamW steps through scattermoe's backward, DDP or FSDP2 under torchrun.

Legend: B sequences per process per micro-step, S sequence length, W processes (world size),
A gradient-accumulation micro-steps. One optimizer step sees B * A * W sequences.

Batches are a pure function of (seed, step): the global batch of a step is cut into A * W micro-batches,
micro-step a of rank r taking slice a * W + r. So W=2, A=1 and W=1, A=2 see the same sequences in the same
groups and give the same losses and gradients (DDP averages gradients exactly as accumulation does), and a
resumed run continues with the batches the uninterrupted run would have seen.

DDP keeps a whole replica per process: fp32 weights, gradients and two Adam moments, 16 bytes a parameter,
136 GB for JetMoE-8B, more than a GPU holds. ``fsdp=True`` shards all four over the processes instead
(FSDP2 ``fully_shard``, each decoder layer a unit: 17 GB per GPU over 8), with the same losses: FSDP's
reduce-scatter averages gradients as DDP's all-reduce does. Checkpoints are the same files either way (HF
layout and one full optimizer state, gathered to rank 0), so a run can resume in the other mode. FSDP
gathers the weights to rank 0 one file (at most 5 GB) at a time, but the optimizer state whole (JetMoE-8B: 68
GB of host memory). With ``sharded_optimizer_state`` each rank writes its own shards of it instead
(torch.distributed.checkpoint, in out_dir/optimizer_dcp), and any mode and process count resumes from them
(DCP reshards on load).

Under bf16 autocast, FSDP gathers each decoder layer's weights in bf16 (a MixedPrecisionPolicy; gradients are
reduce-scattered in fp32 into the fp32 shards): half the all-gather traffic of fp32, and, without recomputation,
the forward keeps no bf16 copy of every layer's weights for the backward, as autocast alone does (16.9 GB for
JetMoE-8B).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import numbers
import os
import shutil
import signal
import sys
import sysconfig
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_weights, save_pretrained
from .model import JetMoEForCausalLM
from .tokenizer import Tokenizer

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_DCP = "optimizer_dcp"  # with sharded_optimizer_state: the optimizer's shards (a DCP checkpoint directory)
TRAIN_LOG = "train_log.jsonl"
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


@dataclass
class TrainConfig:
    out_dir: str
    steps: Optional[int] = None  # stop at this optimizer step (counting resumed steps) ...
    seconds: Optional[float] = None  # ... or after this much training wall time in this run, whichever first
    batch_size: int = 16  # B: sequences per process per micro-step
    seq_len: int = 128  # S
    grad_accum: int = 1  # A
    lr: float = 4e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at `steps` (constant after warm-up without it)
    weight_decay: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    log_every: int = 10
    save_every: int = 0  # 0: save at the end only
    seed: int = 0
    resume: bool = False
    amp: Optional[bool] = None  # bf16 autocast; None: on for CUDA
    progress: bool = True  # tqdm bar on rank 0
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    sharded_optimizer_state: bool = False  # with fsdp: save the optimizer state shard by shard, not gathered to rank 0
    grad_checkpoint: bool = False  # recompute each decoder layer's activations in the backward
    compile: Optional[str] = None  # a torch.compile backend for the decoder layers (compile_decoder_layers)
    val_fraction: float = 0.0  # hold out the token stream's last fraction: a validation loss on text never trained on
    eval_every: int = 0  # steps between validation losses (0: at the end only); needs val_fraction
    eval_windows: int = 32  # windows of seq_len held-out tokens per validation, spread evenly over the held-out part
    # (under torchrun rounded down to a multiple of the process count, which shares them)


# What must stay as it was for a resumed run to continue the one it resumes (val_fraction and the sequences per
# step, batch_size x grad_accum x processes, which alone decide the batches: warned about apart). steps and
# min_lr_ratio shape the cosine schedule: a run extended to more steps decays on another curve.
RESUME_SETTINGS = ("lr", "warmup_steps", "min_lr_ratio", "steps", "seed", "seq_len", "grad_clip")


def saved_train_config(out_dir: Union[str, Path]) -> dict:
    """The TrainConfig (as a dict) of the checkpoint in out_dir, or {} without one. Memory-mapped: the optimizer
    state beside it (68 GB for JetMoE-8B) is not read."""
    path = Path(out_dir) / TRAINER_STATE
    if not path.is_file():
        return {}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("train_config", {})


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops there, and its last saved checkpoint stays as it was."""


def default_corpus_files() -> List[Path]:
    """The Python standard library's own .py sources (no tests, no site-packages): ~12 MB of code."""
    root = Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def load_corpus(paths: Optional[Sequence[Union[str, Path]]] = None) -> List[str]:
    """Documents from text files and directories (recursively: .py, .txt, .md, .rst); default: the stdlib."""
    files: List[Path] = []
    found_in_dirs = set()
    for p in map(Path, paths) if paths else []:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
            files += found
            found_in_dirs.update(found)
        elif p.is_file():
            with open(p, "rb") as f:
                if b"\0" in f.read(8192):  # a text corpus has no NUL bytes; an executable or archive does
                    raise ValueError(f"corpus file {p} looks binary (NUL bytes), not text")
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path not found: {p}")
    files = files if paths else default_corpus_files()
    unique: Dict[Path, Path] = {}
    for f in files:  # each file once, where paths overlap ("data data/a.py")
        unique.setdefault(f.resolve(), f)
    files = list(unique.values())
    docs, binary = [], []
    for f in files:
        data = f.read_bytes()
        if f in found_in_dirs and b"\0" in data:  # named by suffix only: a binary file among the text is skipped
            binary.append(f)
            continue
        # As read_text would: universal newlines (a CRLF file reads as LF).
        docs.append(data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n"))
    if binary:
        warnings.warn(f"corpus: skipped {len(binary)} file(s) with NUL bytes, binary, not text: "
                      f"{', '.join(map(str, binary[:3]))}{', ...' if len(binary) > 3 else ''}")
    if not any(docs):
        raise ValueError(f"the corpus is empty ({len(files)} files; in directories only "
                         f"{', '.join(TEXT_SUFFIXES)} files are read)")
    return docs


def tokenize(docs: Sequence[str], tokenizer: Tokenizer) -> torch.Tensor:
    """One stream [N] of every document's ids, BOS first and EOS last (so that a model learns where a text ends,
    and generation stops at EOS), int16/int32 to keep a big corpus small in memory."""
    dtype = torch.int16 if tokenizer.vocab_size <= 32767 else torch.int32
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return torch.cat([torch.tensor(tokenizer.encode(doc) + eos, dtype=dtype) for doc in docs])


def _check_corpus_length(tokens: torch.Tensor, seq_len: int) -> None:
    # One window is enough: the model predicts each of its tokens from those before (labels are the inputs,
    # shifted inside the loss), so a step needs seq_len tokens, not seq_len + 1.
    if tokens.numel() < seq_len:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one window of seq_len {seq_len}: "
                         "give more text (--data) or a shorter --seq-len")


def get_batch(tokens: torch.Tensor, step: int, micro: int, rank: int, world: int, cfg: TrainConfig) -> torch.Tensor:
    """input_ids [B, S] (int64) of micro-step `micro` on `rank` at `step`; a pure function of the arguments."""
    _check_corpus_length(tokens, cfg.seq_len)
    per_step = cfg.batch_size * cfg.grad_accum * world
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - cfg.seq_len + 1, (per_step,), generator=g)  # the last window too
    mine = starts[(micro * world + rank) * cfg.batch_size:][:cfg.batch_size]
    return torch.stack([tokens[s:s + cfg.seq_len] for s in mine.tolist()]).long()


def amp_dtype_for(amp: Optional[bool], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype training runs under: bf16 when ``amp`` (None: on CUDA, off elsewhere), else None."""
    return torch.bfloat16 if (amp if amp is not None else device.type == "cuda") else None


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """autocast to amp_dtype on the device's type, or nothing for None."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def split_validation(tokens: torch.Tensor, fraction: float, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out part): the stream's last ``fraction`` of tokens is held out, at least seq_len of them
    (one window). A ValueError when either part is too short to use."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {fraction}")
    n_val = max(round(tokens.numel() * fraction), seq_len)
    if tokens.numel() - n_val < seq_len:
        raise ValueError(f"the corpus has {tokens.numel()} tokens: holding out {n_val} for validation "
                         f"(val_fraction {fraction}, at least seq_len {seq_len}) leaves too few to train on; give "
                         "more text, a smaller val_fraction or a shorter seq_len")
    return tokens[:-n_val], tokens[-n_val:]


def split_corpus(tokens: torch.Tensor, cfg: TrainConfig) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the tokens training draws from, the held-out windows or None): what train() does first, and a caller can do
    before building a model, so that a corpus too short for cfg is a ValueError before any expensive work. The
    held-out tail is never drawn from by get_batch: it only sees the training part."""
    val_windows = None
    if cfg.val_fraction:
        tokens, held_out = split_validation(tokens, cfg.val_fraction, cfg.seq_len)
        val_windows = eval_windows(held_out, cfg.seq_len, cfg.eval_windows)
    _check_corpus_length(tokens, cfg.seq_len)
    return tokens, val_windows


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """int64 [n, seq_len]: non-overlapping windows of the stream, aligned to seq_len and spread evenly over it, so
    that a few windows sample the whole corpus; n = min(max_windows, tokens // seq_len) (all of them for None or 0)."""
    n_all = tokens.numel() // seq_len
    if n_all == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of seq_len {seq_len}: give "
                         "more text or a shorter seq_len")
    n = min(max_windows, n_all) if max_windows else n_all
    starts = [(i * n_all // n) * seq_len for i in range(n)]
    return torch.stack([tokens[s:s + seq_len] for s in starts]).long()


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, amp_dtype: Optional[torch.dtype] = None,
             progress: bool = False, per_window: bool = False) -> dict:
    """Next-token cross entropy of ``model`` (anything whose output has ``.logits [B, S, V]``: this package's model,
    sharded or not, or transformers') over ``windows`` [n, S], averaged over all n * (S - 1) predicted tokens.

    In eval mode (the model's mode is restored after). Under torchrun every rank calls it with the same windows:
    each takes every world-th of the first n - n % world (equal counts, since a sharded model's forward is a
    collective) and the sums are all-reduced. Returns loss, perplexity, tokens (predicted, all ranks), windows;
    with ``per_window`` also this process's per-window losses in its windows' order, and its first batch's logits.
    """
    world = _world_size()
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = windows.shape[0] - windows.shape[0] % world
    if n == 0:
        raise ValueError(f"evaluate: {windows.shape[0]} windows cannot be shared by {world} processes")
    if windows.shape[1] < 2:
        raise ValueError(f"evaluate: windows of {windows.shape[1]} token predict nothing; use seq_len >= 2")
    mine = windows[rank:n:world]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy sum, predicted tokens
    losses: List[float] = []
    first_logits = None
    batches = range(0, mine.shape[0], batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, unit="batch", dynamic_ncols=True, leave=False)
    for i in batches:
        x = mine[i:i + batch_size].to(device)
        with _autocast(device, amp_dtype):
            logits = model(x).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                               reduction="none").view(x.shape[0], -1)
        sums[0] += ce.sum(dtype=torch.float64)
        sums[1] += ce.numel()
        if per_window:
            losses += ce.mean(1).tolist()
            if first_logits is None:
                first_logits = logits.float().cpu()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(sums[1].item()), "windows": n}
    if per_window:
        out.update(window_losses=losses, first_logits=first_logits)
    return out


def lr_at(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine to lr * min_lr_ratio at cfg.steps; a run bounded only by cfg.seconds
    decays over ``time_fraction`` instead (the step count it will reach is unknown): train() passes the fraction
    spent of the time its budget has left after warm-up, so the cosine starts from its top, as with steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.steps:
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    else:
        t = time_fraction
    t = min(max(t, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer_param_names(model: torch.nn.Module) -> List[str]:
    """The parameters' names in the optimizer's order (make_optimizer's groups, one after the other)."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def make_optimizer(model: JetMoEForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (the 1-D parameters)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def shard_model(model: JetMoEForCausalLM, param_dtype: Optional[torch.dtype] = None) -> None:
    """FSDP2 in place: each decoder layer its own unit (its weights gathered just before it runs and freed
    after), the embeddings, final norm and head in the root's. Needs the default process group.

    ``param_dtype`` (the autocast dtype, or None): the layers' weights are gathered in it and their gradients
    reduce-scattered in fp32 into the fp32 shards. Autocast would cast the gathered fp32 weights to it anyway,
    and keep those copies for the backward (every layer's, all at once: the whole model in bf16); gathered in
    it, the weights the backward needs are FSDP's own, freed after the forward and gathered again. The layers'
    inputs are not cast (the residual stream stays fp32, as under autocast alone); the root keeps fp32. What
    changes against autocast alone: the norms' weights are rounded to bf16 (their products stay fp32), the
    MoE and MoA output biases are added in bf16, and the gradients of all of these are rounded to bf16. A model
    sharded so runs only under autocast to ``param_dtype``: outside it, fp32 activations meet bf16 weights.
    """
    policy = MixedPrecisionPolicy()
    if param_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model)


def _on_rank0() -> bool:
    """Whether this process is rank 0, or the only one."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _world_size() -> int:
    """The process count: 1 outside torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> Optional[dict]:
    """The optimizer's state as ``optimizer.state_dict()`` gives it unsharded (parameters numbered in
    make_optimizer's order), whether the model is sharded or not: on rank 0, None on the others. Sharded,
    it is gathered (a collective: every rank calls this)."""
    if not sharded:
        return optimizer.state_dict() if _on_rank0() else None
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return _rekeyed(full, {name: i for i, name in enumerate(_optimizer_param_names(model))})


def _rekeyed(state: dict, key: Union[dict, list]) -> dict:
    """An optimizer state dict with each parameter key k (in the state and the groups' lists) as key[k]:
    names to numbers or back."""
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Optional[dict],
                         sharded: bool) -> None:
    """Inverse of optimizer_state. Sharded, only rank 0 needs ``state`` (the others may pass None): it is
    broadcast from there, each rank keeping its shard (a collective)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    full = _rekeyed(state, _optimizer_param_names(model)) if dist.get_rank() == 0 else {}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def save_sharded_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its own part of the optimizer state (its shards under FSDP) to the directory ``path``
    (torch.distributed.checkpoint); nothing is gathered. A collective when distributed; a directory left there
    by a save cut short is replaced."""
    if _on_rank0():
        shutil.rmtree(path, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # no rank writes before the old files are gone
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)


def load_sharded_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Inverse of save_sharded_optimizer_state, in any mode and process count: each rank reads what its
    parameters hold (its shards under FSDP, the whole state otherwise). A collective when distributed."""
    # The current layout to fill in (an optimizer that has not stepped gets its Adam moments made, zero, first).
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)  # in place: into the optimizer's own tensors (or copies of them)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])  # and the param groups


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor],
               grad_clip: float, amp_dtype: Optional[torch.dtype] = None) -> Tuple[float, float]:
    """One optimizer step over A micro-batches [B, S] (loss + aux loss, averaged over them).

    ``model`` may be DDP-wrapped (gradients all-reduced in the last micro-step's backward) or FSDP-sharded
    (reduce-scattered in each). Returns (mean cross entropy, mean aux loss) of this process.
    """
    sums = []  # (cross entropy, aux) of each micro-step, read back once at the end: no host sync in between
    device = next(model.parameters()).device
    for i, x in enumerate(micro_batches):
        x = x.to(device, non_blocking=True)
        last = i == len(micro_batches) - 1
        # DDP: all-reduce in the last micro-step only. FSDP reduce-scatters every micro-step (its default): skipping
        # it would keep whole, unsharded gradients between micro-steps (34 GB more per GPU for JetMoE-8B).
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with _autocast(device, amp_dtype):
                out = model(x, labels=x)
                loss = (out.loss + out.aux_loss) / len(micro_batches)
            loss.backward()
        sums.append(torch.stack([out.loss.detach().float(), out.aux_loss.detach().float()]))
    # The gradients' norm (clipped to grad_clip, when > 0): a non-finite one would make every weight NaN (clipping
    # multiplies by 0), so the run stops before the update.
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    finite = bool(torch.isfinite(norm))  # the sync: the backward, and so every micro-step's loss, is done
    ce_sum, aux_sum = torch.stack(sums).sum(0).tolist()
    ce, aux = ce_sum / len(micro_batches), aux_sum / len(micro_batches)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"the loss is {ce} (aux loss {aux})" if not (math.isfinite(ce) and math.isfinite(aux))
                               else f"the gradients' norm is {norm.item()} (loss {ce})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce, aux


# Rank 0 writes a checkpoint (JetMoE-8B: 34 GB of weights, 68 GB of optimizer state) while the others wait at
# a barrier (under FSDP they first take part in gathering it): more than the default 10 minutes on slow storage.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def init_distributed(device: torch.device) -> Tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (nccl on CUDA, gloo on the CPU). On CUDA
    the process's current device becomes ``device`` first: collectives and FSDP's sharding use the current
    device, which is otherwise cuda:0 on every rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=PROCESS_GROUP_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def save_checkpoint(model: JetMoEForCausalLM, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    tokenizer: Optional[Tokenizer] = None, sharded: bool = False,
                    corpus: Optional[dict] = None, train_seconds: Optional[float] = None) -> None:
    """HF layout in out_dir (loadable by transformers) plus trainer_state.pt (optimizer, step; the config, with
    ``corpus``, the text's corpus_fingerprint, for --resume to compare; ``train_seconds``, the training time up to
    ``step``, all runs together) beside it, or,
    with cfg.sharded_optimizer_state, the optimizer state in out_dir/optimizer_dcp, written by every rank.
    Every rank calls it when ``sharded``: the weights are gathered to rank 0 one file (at most 5 GB) at a time,
    and the optimizer state, unless saved sharded, whole; rank 0 writes them. Otherwise only the rank that
    writes calls it."""
    out = Path(cfg.out_dir)
    rank0 = _on_rank0()
    if sharded:
        # FSDP keeps the root's parameters gathered after a forward without a backward (an evaluation just
        # before this save): the state dicts below need the shards, which the optimizer's state is keyed by.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    optimizer_sd = None
    if cfg.sharded_optimizer_state:  # beside the last checkpoint, which stays whole until this one is written
        save_sharded_optimizer_state(model, optimizer, out / (OPTIMIZER_DCP + ".tmp"))
    else:
        optimizer_sd = optimizer_state(model, optimizer, sharded)  # None off rank 0
    # The weights are replaced file by file: a save cut short (killed, out of disk) would leave new and old
    # shards beside the old step's optimizer state. Without trainer_state.pt until the end it is not resumable.
    if rank0:
        (out / TRAINER_STATE).unlink(missing_ok=True)
    if sharded:  # every rank gathers the weights, one file's worth at a time; rank 0 writes them
        save_pretrained(model, out, state_dict=model.state_dict(), write=rank0)
    elif rank0:
        model.save_pretrained(out)
    if not rank0:
        return
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    # The last checkpoint's sharded optimizer state, whichever format this one has, and the leftovers of a save
    # cut short: moved aside first, so that a directory rmtree cannot empty (e.g. NFS's .nfs files of a file
    # still open) never blocks the new one's rename.
    dcp_dir, new_dcp, old_dcp = (out / (OPTIMIZER_DCP + suffix) for suffix in ("", ".tmp", ".old"))
    shutil.rmtree(old_dcp, ignore_errors=True)
    if dcp_dir.exists():
        os.replace(dcp_dir, old_dcp)
    if cfg.sharded_optimizer_state:
        os.replace(new_dcp, dcp_dir)
    for leftover in (old_dcp, new_dcp):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = out / (TRAINER_STATE + ".tmp")
    torch.save({"step": step, "optimizer": optimizer_sd, "train_seconds": train_seconds,
                "optimizer_dir": OPTIMIZER_DCP if cfg.sharded_optimizer_state else None,
                "train_config": dict(dataclasses.asdict(cfg), corpus=corpus, world=_world_size())}, tmp)
    os.replace(tmp, out / TRAINER_STATE)


class _InterruptAfterStep:
    """Ctrl-C (SIGINT) during a one-process run: the step under way finishes, the run saves its checkpoint as at
    the end, and train() returns; a second Ctrl-C interrupts at once. (A step stopped half-way, e.g. inside
    optimizer.step(), would leave weights that no step produced.) Not under torchrun (``enabled=False``): there
    Ctrl-C reaches every worker and torchrun kills them 30 s later, mid-save for a large model, so they stop at
    once, as before, and the last saved checkpoint stays whole. Only in the main thread, where signal handlers
    live."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._installed = False
        self._previous = signal.default_int_handler

    def _restore(self) -> None:
        # (getsignal gives None for a handler not set from Python: then Python's default)
        signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C: the usual KeyboardInterrupt
        print("\nCtrl-C: finishing this step, then saving (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_InterruptAfterStep":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            self._restore()


def corpus_fingerprint(tokens: torch.Tensor) -> dict:
    """The token stream's length and a hash of its ids (saved with a checkpoint: a resume on other text is said)."""
    ids = tokens.detach().cpu().contiguous()  # no copy of a CPU stream: the hash reads its buffer as it is
    digest = hashlib.sha256(str(ids.dtype).encode())
    digest.update(ids.numpy())
    return {"tokens": ids.numel(), "sha256": digest.hexdigest()[:16]}


# TrainConfig's counts and their least values (the CLI's bounds, for callers of train() itself: 0 sequences gave
# an error from torch.stack, log_every=0 a ZeroDivisionError, seq_len=1 no predicted token, read as divergence).
_COUNT_MINIMUMS = {"steps": 1, "batch_size": 1, "seq_len": 2, "grad_accum": 1, "warmup_steps": 0, "log_every": 1,
                   "save_every": 0, "eval_every": 0, "eval_windows": 1}


def _check_counts(cfg: TrainConfig) -> None:
    for name, least in _COUNT_MINIMUMS.items():
        value = getattr(cfg, name)
        if name == "steps" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:  # numpy ints too
            raise ValueError(f"train: {name}={value!r}, expected an integer >= {least}")
    if cfg.seconds is not None and not (isinstance(cfg.seconds, numbers.Real) and 0 < cfg.seconds < math.inf):
        raise ValueError(f"train: seconds={cfg.seconds!r}, expected a positive number of seconds (or None)")


def train(model: JetMoEForCausalLM, tokens: torch.Tensor, cfg: TrainConfig, tokenizer: Optional[Tokenizer] = None,
          log: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Train in place until cfg.steps or cfg.seconds; save to cfg.out_dir; return the per-step records.

    Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, or sharded in place with
    FSDP2 (cfg.fsdp: the model stays sharded after this returns, and under amp runs only inside bf16 autocast,
    see shard_model; its checkpoint in out_dir is whole, fp32); every rank
    must call this with the same tokens and config. ``cfg.resume`` reloads weights, optimizer and step from
    out_dir. Ctrl-C in a one-process run ends it after the step under way, saved as at the end.
    Records: step, loss (cross entropy, mean over ranks), aux_loss, lr, tokens_per_s, elapsed_s (this run's
    training time), train_s (with the runs it resumes; absent after a checkpoint saved without it); with
    cfg.val_fraction also val_loss and val_perplexity at every cfg.eval_every-th step and the last (cross entropy
    on the held-out tail of ``tokens``, which training never draws from).
    """
    _check_counts(cfg)
    if cfg.steps is None and cfg.seconds is None:
        raise ValueError("train: give steps or seconds (or both)")
    if cfg.eval_every and not cfg.val_fraction:
        raise ValueError("train: eval_every needs a held-out part (val_fraction > 0)")
    if cfg.sharded_optimizer_state and not cfg.fsdp:  # under DDP every rank holds the whole state: nothing to shard
        raise ValueError("train: sharded_optimizer_state needs fsdp")
    if cfg.steps is not None and cfg.warmup_steps >= cfg.steps and _on_rank0():
        warnings.warn(f"--warmup {cfg.warmup_steps} >= --steps {cfg.steps}: the learning rate warms up over the whole "
                      "run, so it never decays" + (f" and never reaches its peak, --lr {cfg.lr:g}"
                                                   if cfg.warmup_steps > cfg.steps else ""))
    corpus = corpus_fingerprint(tokens)
    tokens, val_windows = split_corpus(tokens, cfg)  # before any output, not at the first step
    device = next(model.parameters()).device
    rank, world = init_distributed(device)
    if val_windows is not None and val_windows.shape[0] < world:  # now, not after the last step's training
        raise ValueError(f"the held-out part has {val_windows.shape[0]} windows of seq_len {cfg.seq_len}, fewer than "
                         f"the {world} processes that share them: give a larger val_fraction or more text")
    amp_dtype = amp_dtype_for(cfg.amp, device)
    sharded = cfg.fsdp and world > 1
    step = 0
    earlier_s: Optional[float] = 0.0  # the training time of the runs this one resumes (None: unknown)
    state_path = Path(cfg.out_dir) / TRAINER_STATE
    if cfg.resume and not state_path.is_file():  # before anything is made on disk
        raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a fresh run starts a fresh log, and no curve of the run it replaces stays beside it;
            # nor its trainer state: a run that died before its first save left it beside the new run's log, and
            # --resume continued the replaced run (its weights stay until the first save, not resumable, as after
            # a save cut short)
            for name in (TRAIN_LOG, TRAIN_PLOT, TRAINER_STATE):
                (Path(cfg.out_dir) / name).unlink(missing_ok=True)
    state = None
    if cfg.resume:
        load_weights(model, cfg.out_dir, progress=None if rank == 0 else False)  # every rank, before any sharding
        # Sharded: memory-mapped on the host, so that only rank 0, which broadcasts it, reads the optimizer
        # state (JetMoE-8B's is 68 GB); the others take the step.
        state = torch.load(state_path, map_location="cpu" if sharded else device, weights_only=True, mmap=sharded)
        step = state["step"]
        earlier_s = state.get("train_seconds")  # saved since 2026-12-03 (None before: unknown)
        if cfg.steps is None and rank == 0:
            warnings.warn(f"resuming at step {step} with a --seconds budget only: the learning-rate schedule (a "
                          "cosine over this run's seconds) starts again from its peak (after what is left of the "
                          "warm-up); give --steps (the whole run's step count) to continue one schedule across resumes")
        saved_cfg = state.get("train_config", {})
        changed = [f"{k} {saved_cfg[k]} -> {getattr(cfg, k)}" for k in RESUME_SETTINGS
                   if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)
                   # to a time budget: the --seconds warning above says it (from one: the schedule changes too)
                   and not (k == "steps" and cfg.steps is None)]
        if saved_cfg.get("corpus") not in (None, corpus):  # saved since 2026-12-03
            changed.append(f"the text: {saved_cfg['corpus']['tokens']} tokens -> {corpus['tokens']}, "
                           f"sha256 {saved_cfg['corpus']['sha256']} -> {corpus['sha256']}")
        if "batch_size" in saved_cfg:  # world: saved since 2026-12-03 (before, taken as unchanged)
            was = (saved_cfg["batch_size"], saved_cfg.get("grad_accum", 1), saved_cfg.get("world", world))
            now = (cfg.batch_size, cfg.grad_accum, world)
            if math.prod(was) != math.prod(now):
                changed.append("sequences per step (batch_size x grad_accum x processes) "
                               f"{' x '.join(map(str, was))} = {math.prod(was)} -> "
                               f"{' x '.join(map(str, now))} = {math.prod(now)}")
        if changed and rank == 0:
            warnings.warn(f"resuming a run trained with other settings ({', '.join(changed)}): its batches or its "
                          "learning-rate schedule differ from here on from an uninterrupted run's")
        saved_fraction = saved_cfg.get("val_fraction", 0.0)
        if saved_fraction != cfg.val_fraction and rank == 0:  # the training part moved: other batches from here on
            warnings.warn(f"resuming a run trained with val_fraction {saved_fraction} with val_fraction "
                          f"{cfg.val_fraction}: the held-out tail, and so the training batches, differ from the "
                          "first part's; pass the same --val-fraction to continue it exactly")
    if cfg.grad_checkpoint:
        model.gradient_checkpointing_enable()
    if sharded:
        shard_model(model, amp_dtype)  # before the optimizer: it must hold the shards, not the whole parameters
        if rank == 0:
            local = sum(p.to_local().numel() for p in model.parameters())
            gathered = f"; the decoder layers gathered in {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else ""
            print(f"fsdp: rank 0 holds {local:,} of the model's {sum(p.numel() for p in model.parameters()):,} "
                  f"parameter elements{gathered}", flush=True)
    if cfg.compile:
        model.compile_decoder_layers(cfg.compile)
        if rank == 0:
            print(f"torch.compile ({cfg.compile}): the decoder layers share one graph, compiled in the first step",
                  flush=True)
    optimizer = make_optimizer(model, cfg)
    if state is not None:
        if state.get("optimizer_dir"):  # saved shard by shard: each rank reads its part
            load_sharded_optimizer_state(model, optimizer, Path(cfg.out_dir) / state["optimizer_dir"])
        else:
            load_optimizer_state(model, optimizer, state["optimizer"], sharded)  # sharded: read on rank 0 only
        state = None
        if rank == 0:
            done = cfg.steps is not None and step >= cfg.steps
            print(f"resuming {cfg.out_dir} at step {step}" + (f": already at --steps {cfg.steps}, nothing to train"
                                                              if done else ""), flush=True)
        log_path = Path(cfg.out_dir) / TRAIN_LOG
        if rank == 0 and log_path.is_file():  # drop records of steps after the checkpoint: they run again
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            log_path.write_text("".join(line + "\n" for line in kept))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 and not sharded else model
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm
        if cfg.steps is not None:
            bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True)
        else:  # a time budget only: the bar counts seconds, so it shows how much is left
            bar = tqdm(total=round(cfg.seconds), unit="s", dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    records: List[dict] = []
    saved_step = step  # the step of the checkpoint on disk (resumed: the one read; fresh: none before step 1)
    start = last = time.perf_counter()
    elapsed = 0.0  # training time so far, the same on every rank (all-reduced below)
    # A --seconds-only schedule decays over the time left after warm-up: the budget's whole time would put the
    # cosine part-way down at the first step after warm-up (the demo: from 4e-3 to 2.9e-3 in one step). A resume
    # past warm-up starts its cosine at once (this run's time: the schedule restarts, as train() warns).
    warmup_end_s = 0.0 if step >= cfg.warmup_steps else None
    with _InterruptAfterStep(enabled=world == 1) as interrupt:
        while cfg.steps is None or step < cfg.steps:
            if warmup_end_s is None and step >= cfg.warmup_steps:
                warmup_end_s = elapsed
            time_fraction = 0.0
            if cfg.seconds and warmup_end_s is not None:
                time_fraction = (elapsed - warmup_end_s) / max(cfg.seconds - warmup_end_s, 1e-9)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, time_fraction)
            batches = [get_batch(tokens, step, a, rank, world, cfg) for a in range(cfg.grad_accum)]
            # Dropout (config.attention_dropout) draws from a seed of the step's own: a resumed run draws what an
            # uninterrupted one would.
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
            try:
                loss, aux = train_step(ddp, optimizer, batches, cfg.grad_clip, amp_dtype)
            except TrainingDiverged as exc:  # found before the update: the weights are the last step's
                if bar is not None:
                    bar.close()
                raise TrainingDiverged(f"step {step + 1}: {exc}: training diverged (a smaller --lr, a longer "
                                       f"--warmup?); stopped before this step's update, without saving; "
                                       f"{cfg.out_dir}'s last checkpoint is kept") from None
            step += 1
            now = time.perf_counter()
            elapsed = now - start
            if world > 1:  # mean losses for the log; one clock (the slowest rank's) for the schedule and the stop
                losses = torch.tensor([loss / world, aux / world], dtype=torch.float64, device=device)
                clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
                dist.all_reduce(losses)
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
                (loss, aux), elapsed = losses.tolist(), clock.item()
            if not (math.isfinite(loss) and math.isfinite(aux)):  # every rank: the losses are all-reduced above
                if bar is not None:
                    bar.close()
                raise TrainingDiverged(
                    f"step {step}: the loss is {loss} (aux loss {aux}): training diverged (a smaller --lr, a longer "
                    f"--warmup?); stopped without saving these weights, {cfg.out_dir}'s last checkpoint is kept")
            stop = (cfg.seconds is not None and elapsed >= cfg.seconds) or interrupt.requested
            rec = {"step": step, "loss": loss, "aux_loss": aux, "lr": optimizer.param_groups[0]["lr"],
                   "tokens_per_s": tokens_per_step / max(now - last, 1e-9), "elapsed_s": elapsed}
            if earlier_s is not None:
                rec["train_s"] = earlier_s + elapsed
            final = stop or (cfg.steps is not None and step >= cfg.steps)
            if val_windows is not None and (final or (cfg.eval_every and step % cfg.eval_every == 0)):
                val = evaluate(model, val_windows, cfg.batch_size, amp_dtype)  # every rank: a sharded forward
                rec.update(val_loss=val["loss"], val_perplexity=val["perplexity"])
                # Evaluation is not training time: off the clock of the --seconds budget, the schedule and tokens/s.
                start += time.perf_counter() - now
                now = time.perf_counter()
            last = now
            records.append(rec)
            if rank == 0:
                with open(Path(cfg.out_dir) / TRAIN_LOG, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.update(1 if cfg.steps is not None else min(elapsed, cfg.seconds) - bar.n)
                    bar.set_postfix(step=step, loss=f"{loss:.3f}", aux=f"{aux:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if log is not None and (step % cfg.log_every == 0 or step == 1 or "val_loss" in rec):
                    log(rec)
            if cfg.save_every and step % cfg.save_every == 0 and not final:  # the last step: saved below, once
                saving = time.perf_counter()
                _save(model, optimizer, step, cfg, tokenizer, rank, world, sharded, corpus,
                      None if earlier_s is None else earlier_s + elapsed)
                saved_step = step
                # Saving is not training time either (JetMoE-8B: minutes): off the clock, as evaluation is.
                start += time.perf_counter() - saving
                last = time.perf_counter()
            if stop or interrupt.requested:  # a Ctrl-C during the log, an evaluation or a save: no further step
                break
    if bar is not None:
        bar.close()
    if interrupt.requested and rank == 0:
        print(f"interrupted: saving step {step} to {cfg.out_dir} (--resume continues from there)", flush=True)
    # Once per step: not again after a Ctrl-C during the save of the step, nor on a resume already at --steps (it
    # trained nothing: the checkpoint, and the settings saved in it, stay).
    if step > saved_step:
        _save(model, optimizer, step, cfg, tokenizer, rank, world, sharded, corpus,
              None if earlier_s is None else earlier_s + elapsed)
    return records


TRAIN_PLOT = "train_log.png"


def plot_train_log(out_dir: Union[str, Path]) -> Optional[str]:
    """Draw out_dir's train_log.jsonl into train_log.png beside it: the training and held-out losses against the
    step (log scale) above, the learning rate below. Returns None when drawn, else why not (matplotlib is
    optional: the bench extra brings it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no loss curve drawn (pip install matplotlib)"
    log_path = Path(out_dir) / TRAIN_LOG
    recs = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    if not recs:
        return f"no records in {log_path}: no loss curve drawn"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in recs]
    losses = [r["loss"] for r in recs]
    top.plot(steps, losses, lw=0.8, alpha=0.5, label="training loss (per step)")
    n = max(1, len(recs) // 50)  # a running mean over ~2% of the run, to see the trend through the noise
    if n > 1:
        windows = (losses[max(0, i - n + 1):i + 1] for i in range(len(losses)))
        top.plot(steps, [sum(w) / len(w) for w in windows], lw=1.5, label=f"training loss (mean of {n} steps)")
    held = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if held:
        top.plot(*zip(*held), "o-", ms=4, label="held-out loss")
    top.set_yscale("log")
    for axis_formatter in (top.yaxis.set_major_formatter, top.yaxis.set_minor_formatter):
        axis_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 2, 3, 4 rather than 2x10^0
    top.set_ylabel("cross entropy (nats/token)")
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=8)
    # After a resume the log holds every run's steps, and elapsed_s is the last run's time only.
    took = (f"{recs[-1]['train_s']:.0f} s" if "train_s" in recs[-1]
            else f"a last run of {recs[-1]['elapsed_s']:.0f} s")  # a run resumed from a checkpoint without it
    top.set_title(f"{Path(out_dir).name}: {steps[-1]} steps in {took}", fontsize=10)
    bottom.plot(steps, [r["lr"] for r in recs], lw=1.0, color="gray")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / TRAIN_PLOT, dpi=120)
    plt.close(fig)
    return None


def _save(model, optimizer, step, cfg, tokenizer, rank, world, sharded, corpus, train_seconds) -> None:
    # An update can make the weights non-finite with a finite loss and gradients (an infinite learning rate):
    # such weights are never saved over the last checkpoint.
    finite = torch.stack([torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                          for p in model.parameters()]).all().float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise TrainingDiverged(f"step {step}: the weights are not finite after this step's update: training diverged "
                               f"(a smaller --lr?); not saved, {cfg.out_dir}'s last checkpoint is kept")
    if rank == 0 or sharded:  # sharded: every rank takes part in gathering the state to rank 0
        save_checkpoint(model, optimizer, step, cfg, tokenizer, sharded, corpus, train_seconds)
    if world > 1:
        dist.barrier()  # no rank runs ahead (or exits) before the checkpoint is complete
