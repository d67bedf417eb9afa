"""Checkpoints in the Hugging Face layout: config.json + model.safetensors, or shards + model.safetensors.index.json.

Parameter names are transformers' JetMoe names (``model.layers.0.self_attention.experts.input_linear.weight``,
...), so transformers loads what ``save_pretrained`` writes, and the reverse. Loading is lazy: the model is
built on the meta device, materialised once in the target dtype and device, then filled one tensor at a time
from ``safe_open`` (an 8B bf16 checkpoint needs its size in memory once, not twice).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .model import JetMoEConfig, JetMoEForCausalLM

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# transformers' key -> the original JetMoE spelling (jetmoe/jetmoe-8b's config.json uses the original ones).
KEY_ALIASES = {
    "intermediate_size": "ffn_hidden_size",
    "num_local_experts": "moe_num_experts",
    "num_experts_per_tok": "moe_top_k",
    "num_hidden_layers": "num_layers",
    "max_position_embeddings": "n_positions",
    "kv_channels": "head_dim",  # transformers' JetMoeConfig reads head_dim as kv_channels (its attribute_map)
}

class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing files, tensors or keys, wrong shapes. Names what is wrong."""


def config_from_dict(d: dict) -> JetMoEConfig:
    """JetMoEConfig from a config.json dict in either spelling (missing keys: as transformers reads them).

    When both spellings are present they must agree: a transformers-saved copy of an original-spelling
    config carries the original key *and* transformers' default, and silently picking one could build
    the wrong shapes.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"config.json: expected a JSON object, got {type(d).__name__}")
    if d.get("model_type", "jetmoe") != "jetmoe":
        raise CheckpointError(f"config.json: model_type is {d['model_type']!r}, expected 'jetmoe'")
    if d.get("glu", True) is not True:
        raise CheckpointError("config.json: glu=false (plain MLP experts) is not supported; JetMoE uses GLU experts")
    values = {}
    for field in dataclasses.fields(JetMoEConfig):
        name, alias = field.name, KEY_ALIASES.get(field.name)
        if name in d and alias in d and d[name] != d[alias]:
            raise CheckpointError(f"config.json: {name}={d[name]} and {alias}={d[alias]} disagree")
        if name in d:
            values[name] = d[name]
        elif alias in d:
            values[name] = d[alias]
    # Missing keys take the jetmoe-8b values, which equal transformers' defaults but for this one: a file
    # without it gets transformers' 1e-6 (jetmoe-8b's own file states its 1e-5).
    values.setdefault("rms_norm_eps", 1e-6)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json: rope_parameters/rope_scaling: expected an object, got {rope!r}")
    if "rope_theta" in rope:
        if "rope_theta" in d and d["rope_theta"] != rope["rope_theta"]:
            raise CheckpointError(f"config.json: rope_theta={d['rope_theta']} and "
                                  f"rope_parameters.rope_theta={rope['rope_theta']} disagree")
        values["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the older transformers spelling
    if rope_type != "default":
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported (only 'default')")
    try:
        return JetMoEConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json: {exc}") from None


def config_to_dict(cfg: JetMoEConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """transformers' spelling, plus what it needs to pick the class (model_type, architectures)."""
    d = dataclasses.asdict(cfg)
    d.update(model_type="jetmoe", architectures=["JetMoeForCausalLM"], num_attention_heads=cfg.num_attention_heads,
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if dtype is not None:
        d["dtype"] = str(dtype).replace("torch.", "")
    return d


def resolve(path_or_hub_id: Union[str, os.PathLike]) -> Path:
    """A local checkpoint directory: the path itself, or a Hugging Face Hub snapshot of that repo id."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"checkpoint not found: {name!r} is not a directory "
                              "(nor a Hub id like 'jetmoe/jetmoe-8b')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"checkpoint not found: {name!r} is not a local directory, and huggingface_hub "
                              "is not installed to download it (pip install transformers: it brings huggingface_hub, "
                              "and reads the checkpoint's tokenizer)") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # offline, unknown repo, gated repo: one line, not the hub's traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not download {name!r} from the Hugging Face Hub ({first}); no local "
                              f"directory {str(path.absolute())!r} exists either: pass a local checkpoint "
                              "directory instead") from None


def load_config(path_or_hub_id: Union[str, os.PathLike]) -> JetMoEConfig:
    path = resolve(path_or_hub_id) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint has no {CONFIG_NAME}: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(data)


def weight_files(ckpt_dir: Path) -> Dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc!r})") from None
        missing = sorted({file for file in weight_map.values() if not (ckpt_dir / file).is_file()})
        if missing:
            raise CheckpointError(f"{index}: names shard {missing[0]}, which is not in {ckpt_dir}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return {name: ckpt_dir / file for name, file in weight_map.items()}
    single = ckpt_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in ckpt_dir.glob("*.bin"))
    hint = f" (found {', '.join(others)}: convert to safetensors first)" if others else ""
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}{hint}")


def stored_dtype(files: Dict[str, Path]) -> torch.dtype:
    from safetensors import safe_open

    name, file = next(iter(files.items()))
    with safe_open(str(file), framework="pt") as f:
        stored = f.get_slice(name).get_dtype()  # "BF16", "F32", ... read from the header, no data
    floating = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return floating.get(stored, torch.float32)


def _as_dtype(dtype) -> Optional[torch.dtype]:
    """A torch floating dtype, also given by name as transformers users write it ("bfloat16", "bf16",
    "torch.float16"); "auto" and None keep the stored dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name == "auto":
            return None
        named = {"bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16, "fp32": torch.float32,
                 "float": torch.float32, "fp64": torch.float64, "double": torch.float64}.get(name) or getattr(
                     torch, name, None)
        if isinstance(named, torch.dtype) and named.is_floating_point:
            return named
    raise ValueError(f"dtype: expected a floating torch.dtype (or its name, e.g. 'bfloat16'; 'auto' keeps the "
                     f"stored dtype), got {dtype!r}")


def load_pretrained(path_or_hub_id: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device] = "cpu", progress: Optional[bool] = None,
                    weights: bool = True) -> JetMoEForCausalLM:
    """Build JetMoEForCausalLM from a HF-layout checkpoint; dtype None keeps the stored dtype (bf16 for 8B).
    ``progress``: as in load_weights. ``weights=False`` builds the model without reading its weights, which are
    then uninitialised memory: for a caller that loads them next (train's resume)."""
    dtype = _as_dtype(dtype)
    ckpt_dir = resolve(path_or_hub_id)
    cfg = load_config(ckpt_dir)
    dtype = dtype or stored_dtype(weight_files(ckpt_dir))
    with torch.device("meta"):  # no memory until to_empty, and no init work for weights about to be overwritten
        model = JetMoEForCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    if weights:
        load_weights(model, ckpt_dir, progress)
    return model.eval()


# Loads of at least this many bytes (as stored) show a progress bar (JetMoE-8B: 17 GB), unless asked otherwise.
PROGRESS_MIN_BYTES = 1 << 30
_STORED_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@torch.no_grad()
def load_weights(model: JetMoEForCausalLM, ckpt_dir: Union[str, os.PathLike], progress: Optional[bool] = None) -> None:
    """Fill model's parameters in place from ckpt_dir's safetensors, one tensor at a time (cast to each
    parameter's dtype and device). A missing tensor or a shape mismatch is a CheckpointError naming it.
    ``progress``: a tqdm bar of the bytes read, as stored (None: only for PROGRESS_MIN_BYTES or more)."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    files = weight_files(ckpt_dir)
    params = dict(model.state_dict(keep_vars=True))
    stored_head = None  # a tied model's lm_head.weight, when the checkpoint holds one too
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight")  # tied: the checkpoint normally holds only model.embed_tokens.weight
        if "lm_head.weight" in files:
            stored_head = params["lm_head.weight"] = torch.empty_like(model.model.embed_tokens.weight)
    by_file = defaultdict(list)
    unexpected = []
    for name, file in files.items():
        (by_file[file] if name in params else unexpected).append(name)
    if unexpected:
        warnings.warn(f"{ckpt_dir}: ignoring {len(unexpected)} tensors this model does not have: "
                      f"{', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing = sorted(set(params) - {n for names in by_file.values() for n in names})
    if missing:
        raise CheckpointError(f"{ckpt_dir}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    # Every file opened and every tensor's shape read from the headers before any parameter is written, so a
    # bad checkpoint leaves the model as it was.
    total = 0  # bytes to read, as stored
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                stored = set(f.keys())
                for name in names:
                    if name not in stored:
                        raise CheckpointError(f"{file.name}: the index lists tensor {name}, which this file lacks")
                    header = f.get_slice(name)
                    shape = tuple(header.get_shape())
                    total += math.prod(shape) * _STORED_BYTES.get(header.get_dtype(), 4)
                    if shape != tuple(params[name].shape):
                        raise CheckpointError(f"{file.name}: tensor {name} has shape {shape}, "
                                              f"the model expects {tuple(params[name].shape)}")
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own errors (a truncated file, a bad header) name no file
            raise CheckpointError(f"{file}: cannot read it as safetensors ({exc})") from None
    bar = None
    if progress or (progress is None and total >= PROGRESS_MIN_BYTES):
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {ckpt_dir.name}", dynamic_ncols=True)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:  # one tensor in host memory at a time
                tensor = f.get_tensor(name)
                params[name].copy_(tensor)
                if bar is not None:
                    bar.update(tensor.numel() * tensor.element_size())
    if bar is not None:
        bar.close()
    embed = model.model.embed_tokens.weight
    if stored_head is not None and not torch.equal(stored_head, embed):
        # As transformers does: a stored head that differs from the embedding unties them.
        warnings.warn(f"{ckpt_dir}: config.json ties lm_head.weight to model.embed_tokens.weight, but the "
                      "checkpoint holds both with different values; loading them untied (as transformers "
                      "does). Set tie_word_embeddings=false in config.json to silence this.")
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        model.lm_head.weight = torch.nn.Parameter(stored_head, requires_grad=embed.requires_grad)


def save_pretrained(model: JetMoEForCausalLM, out_dir: Union[str, os.PathLike],
                    max_shard_size: int = 5 * 1024 ** 3, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                    write: bool = True) -> None:
    """Write config.json and the weights (shards of at most max_shard_size bytes + index when bigger).

    Tensors go to the host one shard at a time. Each file is written under a temporary name and renamed;
    then weight files of an earlier save in the same directory are removed (a stale index would win).
    state_dict: the weights to write (names as model.state_dict()'s); default: model.state_dict(). Those of
    an FSDP2-sharded model are DTensors: each is gathered whole as its file is written, so the writing rank
    holds one file's tensors at a time, not the whole model. Gathering is a collective: then every rank calls
    this, with ``write`` true on the one that writes.
    """
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    out = Path(out_dir)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    state = dict(state_dict) if state_dict is not None else model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers' layout: tied weights stored once
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard, file in zip(shards, names):
        host = {}
        for k, v in shard.items():
            whole = v.full_tensor() if isinstance(v, DTensor) else v  # a DTensor's: a collective, on every rank
            if write:
                host[k] = whole.detach().to("cpu").contiguous()
        if not write:
            continue
        save_file(host, str(out / (file + ".tmp")), metadata={"format": "pt"})
        os.replace(out / (file + ".tmp"), out / file)
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(v.numel() * v.element_size() for v in host.values())
        del host
    if not write:
        return
    if len(shards) > 1:
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:  # after the new files are in place
        if stale.name not in names and not (stale.name == INDEX_FILE and len(shards) > 1) and stale.exists():
            stale.unlink()
    dtype = next(iter(state.values())).dtype
    _write_json(out / CONFIG_NAME, config_to_dict(model.config, dtype))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
