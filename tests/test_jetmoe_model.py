"""jetmoe on its own: config spellings and presets, KV-cache decoding, padded batches, checkpoint errors.

The static-cache decode must equal a full forward over the whole prefix at every step, never rerun the prompt,
and a left-padded batch must generate what each row generates alone.
"""

import dataclasses
import json
import re
import sys

import pytest
import torch
from helpers import assert_close

import scattermoe
from jetmoe import (CheckpointError, JetMoEConfig, JetMoEForCausalLM, KVCache, config_from_dict, load_pretrained,
                    router_aux_loss)
from jetmoe.checkpoint import config_to_dict
from jetmoe.model import StaticDecoder

TINY = JetMoEConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                    intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0, initializer_range=0.3)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
# Decode cases: both backends left-padded, the torch backend unpadded too. What padding changes (masks, positions,
# cache slots) is the model's, not the kernels', and a Triton case costs ~13 s of CI in the interpreter.
DECODE_CASES = [pytest.param("torch", False, id="torch-unpadded"), pytest.param("torch", True, id="torch-left_padded"),
                pytest.param("triton", True, id="triton-left_padded", marks=pytest.mark.interpreter)]


def random_model(cfg: JetMoEConfig = TINY) -> JetMoEForCausalLM:
    """Biases and norms randomised too (init leaves them at 0 and 1)."""
    model = JetMoEForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- config


ORIGINAL_8B_CONFIG = {  # jetmoe/jetmoe-8b's config.json: the original key names (DESIGN.md section 9)
    "activation_function": "silu", "architectures": ["JetMoEForCausalLM"], "aux_loss_coef": 0.01,
    "bos_token_id": 1, "eos_token_id": 2, "ffn_hidden_size": 5632, "glu": True, "hidden_size": 2048,
    "initializer_range": 0.01, "kv_channels": 128, "model_type": "jetmoe", "moe_num_experts": 8, "moe_top_k": 2,
    "n_positions": 4096, "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "num_layers": 24, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "vocab_size": 32000,
}


def test_original_spelling_reads_as_the_8b_preset():
    cfg = config_from_dict(ORIGINAL_8B_CONFIG)
    assert cfg == JetMoEConfig.preset("jetmoe-8b")
    assert cfg.num_attention_heads == 32


def test_both_spellings_and_round_trip():
    hf_spelling = config_to_dict(TINY)
    assert config_from_dict(hf_spelling) == TINY
    original = {k: v for k, v in hf_spelling.items() if k not in ("intermediate_size", "num_local_experts",
                                                                    "num_experts_per_tok", "num_hidden_layers",
                                                                    "max_position_embeddings", "rope_parameters")}
    original.update(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2, num_layers=2,
                    n_positions=TINY.max_position_embeddings, rope_theta=TINY.rope_theta)
    assert config_from_dict(original) == TINY
    assert config_from_dict({**original, "n_positions": 1024}).max_position_embeddings == 1024  # not the default
    # transformers' JetMoeConfig reads head_dim as kv_channels (attribute_map): so does this
    head_dim = {k: v for k, v in hf_spelling.items() if k != "kv_channels"}
    assert config_from_dict({**head_dim, "head_dim": TINY.kv_channels}) == TINY


def test_disagreeing_spellings_are_an_error():
    with pytest.raises(CheckpointError, match="intermediate_size=5632 and ffn_hidden_size=1024 disagree"):
        config_from_dict({"intermediate_size": 5632, "ffn_hidden_size": 1024})


def test_8b_preset_sizes():
    """8,522,237,952 parameters, ~2.2B active per token without the embedding table (DESIGN.md section 9)."""
    with torch.device("meta"):
        model = JetMoEForCausalLM(JetMoEConfig.preset("jetmoe-8b"))
    assert model.num_parameters() == 8_522_237_952
    active = model.num_parameters(active=True)
    print(f"active parameters per token: {active / 1e9:.3f}B")
    assert 2.1e9 < active < 2.3e9


# ---------------------------------------------------------------- forward


def test_rmsnorm_eps_quirk():
    """Per-layer norms use 1e-6 whatever rms_norm_eps says; the final norm uses rms_norm_eps."""
    model = JetMoEForCausalLM(dataclasses.replace(TINY, rms_norm_eps=1e-3))
    assert model.model.norm.eps == 1e-3
    assert {layer.input_layernorm.eps for layer in model.model.layers} == {1e-6}
    assert {layer.post_attention_layernorm.eps for layer in model.model.layers} == {1e-6}


def test_init_is_transformers_init():
    """N(0, initializer_range) matrices, zero biases, unit norms, and a zero padding row (nn.Embedding's padding_idx,
    which init_weights' redraw must not undo: a pad token would otherwise carry a random vector)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, vocab_size=4096, initializer_range=0.05)
    model = JetMoEForCausalLM(cfg)
    embed = model.model.embed_tokens.weight
    assert bool((embed[cfg.pad_token_id] == 0).all())
    others = torch.cat([embed[:cfg.pad_token_id], embed[cfg.pad_token_id + 1:]])
    assert abs(others.std().item() - 0.05) < 0.002 and abs(others.mean().item()) < 0.002
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert bool((p == 1).all()), name
        elif p.dim() == 1:
            assert bool((p == 0).all()), name


def test_aux_loss_drops_padding_tokens():
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with scattermoe.use_backend("torch"):
        out = model(x, attention_mask=mask)
    valid = mask.reshape(-1).bool()
    routers = [(lg[valid], lg[valid].topk(TINY.num_experts_per_tok, dim=-1).indices) for lg in out.router_logits]
    expected = TINY.aux_loss_coef * router_aux_loss(routers, TINY.num_local_experts)
    assert_close(out.aux_loss, expected, 1e-6, "aux loss over non-padding tokens")


# ---------------------------------------------------------------- KV cache and generation


def decode_prompt(B: int, S: int, steps: int, padded: bool):
    """Prompts [B, S] and the attention mask over S + steps positions; padded: row 0 starts with 2 pad tokens."""
    x = torch.randint(3, TINY.vocab_size, (B, S))
    mask = torch.ones(B, S + steps, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    return x, mask


@pytest.mark.parametrize("backend, padded", DECODE_CASES)
def test_cached_decode_equals_full_forward(backend, padded):
    model = random_model()
    B, S, steps = 2, 5, 4 if backend == "triton" else 6
    x, mask = decode_prompt(B, S, steps, padded)
    cache = KVCache(TINY, B, S + steps, "cpu", torch.float32)
    with torch.no_grad(), scattermoe.use_backend(backend):
        cached = model(x, attention_mask=mask[:, :S], cache=cache).logits[:, -1]
        seq = x
        for step in range(steps):
            full = model(seq, attention_mask=mask[:, :seq.size(1)]).logits[:, -1]
            print(f"step {step}: max abs diff {(cached - full).abs().max().item():.2e}")
            assert_close(cached, full, 1e-5, f"decode step {step}")
            nxt = cached.argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            cached = model(nxt[:, None], attention_mask=mask[:, :seq.size(1)], cache=cache).logits[:, -1]
    assert cache.length == S + steps


@pytest.mark.parametrize("backend, padded", DECODE_CASES)
def test_static_decode_steps_match_the_default_path(backend, padded):
    """StaticDecoder, the step generate(cuda_graph=True) captures (every Lmax key under a mask, position and cache
    slot as tensors), run eagerly here: the default decode path's logits at every step, and the same cache."""
    model = random_model()
    B, S, steps = 2, 5, 3 if backend == "triton" else 6
    x, mask = decode_prompt(B, S, steps, padded)
    prompt_mask = mask[:, :S] if padded else None
    default, static = (KVCache(TINY, B, S + steps, "cpu", torch.float32) for _ in range(2))
    with torch.no_grad(), scattermoe.use_backend(backend):
        want = model(x, attention_mask=prompt_mask, cache=default).logits[:, -1]
        model(x, attention_mask=prompt_mask, cache=static)
        decoder = StaticDecoder(model, static, S, prompt_mask, graph=False)
        for step in range(steps):
            tokens = want.argmax(-1)
            L = default.length + 1
            want = model(tokens[:, None], attention_mask=mask[:, :L] if padded else None, cache=default).logits[:, -1]
            got = decoder(tokens)
            assert_close(got, want, 1e-5, f"static decode step {step}")
    assert static.length == default.length == S + steps
    # Layer 0's keys and values depend on the embeddings alone; later ones on attention over Lmax keys (the
    # masked ones add exact zeros, but the sum may run in another order).
    assert torch.equal(static.k[0], default.k[0]) and torch.equal(static.v[0], default.v[0])
    assert_close(static.k, default.k, 1e-5, "cached keys")
    assert_close(static.v, default.v, 1e-5, "cached values")
    with pytest.raises(ValueError, match=f"all {S + steps} positions are filled"):
        decoder(tokens)


@pytest.mark.parametrize("n", [1, 2, 3, 9])
def test_generate_through_the_static_decoder_matches_the_default_path(n, monkeypatch):
    """generate(cuda_graph=True)'s plumbing (key mask and positions from the padding, the decoder's slots, eos,
    sampling, callback, stats) with the static step run eagerly, as the CPU allows: the default path's tokens."""
    import jetmoe.model as model_mod

    class Eager(StaticDecoder):
        def __init__(self, *args, graph):
            super().__init__(*args, graph=False)
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (3, 6))
    mask = torch.ones_like(x)
    mask[0, :2], mask[1, :4] = 0, 0
    with scattermoe.use_backend("torch"):
        for kwargs in (dict(), dict(eos_token_id=[5, 7, 11]), dict(temperature=1.0, top_p=0.9)):
            runs = []
            for graph in (False, True):
                monkeypatch.setattr(model_mod, "StaticDecoder", Eager if graph else StaticDecoder)
                seen, stats = [], {}
                gen = torch.Generator().manual_seed(0)
                out = model.generate(x, n, attention_mask=mask, cuda_graph=graph, callback=seen.append, stats=stats,
                                     generator=gen, **kwargs)
                runs.append((out, len(seen), stats["new_tokens"], "capture_s" in stats))
            (want, calls, count, no_capture), (got, calls2, count2, capture) = runs
            assert torch.equal(got, want), (kwargs, got.tolist(), want.tolist())
            assert (calls2, count2) == (calls, count) and capture and not no_capture


def test_cuda_graph_generation_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need CUDA tensors"):
        random_model().generate(torch.randint(3, TINY.vocab_size, (1, 4)), 2, cuda_graph=True)


def test_decode_step_does_not_rerun_the_prompt():
    model = random_model()
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with scattermoe.use_backend("torch"):
        model.generate(torch.randint(3, TINY.vocab_size, (2, 9)), max_new_tokens=5)
    assert seen == [(2, 9)] + [(2, 1)] * 4  # one prefill, then one position per step (the 5th token needs none)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_generates_like_one_by_one(backend):
    model = random_model()
    prompts = [torch.randint(3, TINY.vocab_size, (n,)) for n in (6, 2, 4)]
    steps = 3 if backend == "triton" else 8
    width = max(len(p) for p in prompts)
    x = torch.full((len(prompts), width), TINY.pad_token_id)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with scattermoe.use_backend(backend):
        batched = model.generate(x, steps, attention_mask=mask)[:, width:]
        alone = [model.generate(p[None], steps)[0, len(p):] for p in prompts]
    print("batched:", batched.tolist(), "alone:", [a.tolist() for a in alone])
    assert torch.equal(batched, torch.stack(alone))


def test_left_padding_leaves_every_query_a_key_to_attend(monkeypatch):
    """The masks SDPA gets for a left-padded batch, prefill and decode: real tokens never see padding keys, and
    every query row, a padding position's included, keeps at least one key (itself). A row with none is NaN on
    some SDPA backends (the CPU's gives zeros, so the generation tests could not tell)."""
    import jetmoe.model as jm

    masks = []
    sdpa = jm.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(jm.F, "scaled_dot_product_attention", spy)
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 5))
    x[0, :3] = TINY.pad_token_id
    pad = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with scattermoe.use_backend("torch"):
        model.generate(x, 3, attention_mask=pad)
    assert len(masks) == 3 * TINY.num_hidden_layers  # prefill, then 2 decode steps
    for mask in masks:
        assert mask is not None and mask.dtype == torch.bool
        keys = mask.size(-1)
        assert mask.any(-1).all(), "a query row with no key to attend"
        assert not mask[0, 0, -1, :3].any(), "a real token attends to padding"
        assert mask[1, 0, -1, :keys].all()  # the unpadded row's newest token sees every key so far


def test_eos_stops_rows_and_streams_to_the_callback():
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 4))
    with scattermoe.use_backend("torch"):
        free = model.generate(x, 6)[:, 4:]
        eos = int(free[0, 1])  # row 0 emits it at step 1
        streamed = []
        out = model.generate(x, 6, eos_token_id=eos, callback=lambda t: streamed.append(t.tolist()))[:, 4:]
    first = free[0].tolist().index(eos)  # row 0's first eos (step 0 or 1)
    # A finished row produces the pad id afterwards, as transformers' generate does.
    assert torch.equal(out[0, :first + 1], free[0, :first + 1]) and out[0, first] == eos, (out, free)
    assert (out[0, first + 1:] == TINY.pad_token_id).all(), out
    assert [list(col) for col in zip(*out.tolist())] == streamed
    # Without a pad id, the first eos id (here the one it produced); eos given as a tensor works too.
    model.config = dataclasses.replace(TINY, pad_token_id=None)
    with scattermoe.use_backend("torch"):
        out = model.generate(x, 6, eos_token_id=torch.tensor([eos, 47]))[:, 4:]
    model.config = TINY
    assert (out[0, first:] == eos).all(), out


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m.generate(x[:, :0], 3), "at least one token"),
    (lambda m, x: m.generate(x, 3, temperature=float("nan")), "temperature"),
    (lambda m, x: m.generate(x, 3, temperature=1.0, top_k=-1), "top_k"),
    (lambda m, x: m.generate(x, 3, temperature=1.0, top_k=2.5), "top_k"),
    (lambda m, x: m.generate(x, 3, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])),
     "pad prompts on the left"),
    (lambda m, x: m.generate(x, 3, eos_token_id="</s>"), "eos_token_id"),
    (lambda m, x: m.generate(x, 3, eos_token_id=2.5), r"eos_token_id: expected an id or a sequence of ids, got 2.5"),
    (lambda m, x: m.generate(x, 3, eos_token_id=[2, 48]), r"eos_token_id: expected ids in \[0, vocab_size=48\)"),
    (lambda m, x: m.generate(x, 3, temperature="1"), "temperature: expected a number, got '1'"),
    (lambda m, x: m(x, cache=KVCache(dataclasses.replace(TINY, kv_channels=4), 2, 8, "cpu", torch.float32)),
     r"cache: made for 2 layers of 2 heads x 4 on cpu; this model has 2 layers of 2 heads x 8"),
    (lambda m, x: m(x, cache=KVCache(TINY, 2, 3, "cpu", torch.float32)), "cache: holds 3 positions"),
    (lambda m, x: m(x, cache=KVCache(TINY, 1, 8, "cpu", torch.float32)), "of a batch of 1"),
    (lambda m, x: m(x.float()), "input_ids: expected integer token ids"),
    (lambda m, x: m(x > 5), "input_ids: expected integer token ids .*got torch.bool"),
    (lambda m, x: m(x, labels=x[:, :3]), r"labels: expected integer ids of shape \(2, 4\)"),
    (lambda m, x: m(x, labels=x.float()), r"labels: expected integer ids .*got torch.float32"),
    (lambda m, x: m(x, position_ids=torch.arange(3)[None]), r"position_ids: expected integer ids of shape \(2, 4\) "
     r"or \(1, 4\)"),
    # A mask of another shape than the prompt would be broadcast over the rows: refused, as forward refuses it.
    (lambda m, x: m.generate(x, 3, attention_mask=torch.tensor([0, 1, 1, 1])), r"attention_mask: expected input_ids' "
     r"shape \(2, 4\)"),
    (lambda m, x: m.generate(x, 3, attention_mask=torch.tensor([[0, 1, 1, 1]])), "attention_mask: expected"),
    (lambda m, x: m.generate(x, 3, attention_mask=torch.ones(2, 3, dtype=torch.long)), "attention_mask: expected"),
    (lambda m, x: m.generate(x[0], 3), r"input_ids: expected a \[batch, sequence\] tensor.*input_ids\[None\]"),
    (lambda m, x: m.generate(x, 2.0), "max_new_tokens: expected an int >= 1, got 2.0"),
], ids=["empty_prompt", "nan_temperature", "negative_top_k", "float_top_k", "right_padding", "eos_a_string",
        "eos_a_float", "eos_out_of_range", "temperature_a_string", "cache_of_another_config", "cache_too_short",
        "cache_batch", "float_ids", "bool_ids", "labels_shorter", "float_labels", "position_ids_shorter",
        "mask_1d", "mask_one_row", "mask_shorter", "ids_1d", "float_max_new_tokens"])
def test_generate_and_forward_refuse_bad_arguments_by_name(call, message):
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 4))
    with scattermoe.use_backend("torch"), pytest.raises((ValueError, TypeError), match=message):
        call(model, x)


def test_int32_labels_give_the_int64_loss():
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 6))
    with scattermoe.use_backend("torch"):
        assert model(x, labels=x.int()).loss.item() == model(x, labels=x).loss.item()


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (1, 4))
    with scattermoe.use_backend("torch"):
        a = model.generate(x, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
        b = model.generate(x, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
        greedy = model.generate(x, 6)
        tiny_p = model.generate(x, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(tiny_p, greedy)  # top_p -> 0 leaves only the most likely token


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_model()
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied after the meta-device build
    state = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.router.layer.weight"
    save_file({k: v for k, v in state.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        load_pretrained(tmp_path)
    state[name] = torch.zeros(5, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(5, 32\), the model expects \(4, 32\)"):
        load_pretrained(tmp_path)


def test_loading_shows_its_progress_in_bytes_only_when_large(tmp_path, capsys, monkeypatch):
    import jetmoe.checkpoint as ck

    model = JetMoEForCausalLM(TINY)
    model.save_pretrained(tmp_path)
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values()
                 ) - (model.lm_head.weight.numel() * 4 if TINY.tie_word_embeddings else 0)
    ck.load_weights(JetMoEForCausalLM(TINY), tmp_path)
    assert capsys.readouterr().err == "", "a small load should be quiet"
    monkeypatch.setattr(ck, "PROGRESS_MIN_BYTES", nbytes)  # as large as the threshold: shown
    ck.load_weights(JetMoEForCausalLM(TINY), tmp_path)
    err = capsys.readouterr().err
    assert f"loading {tmp_path.name}: 100%" in err, err
    ck.load_weights(JetMoEForCausalLM(TINY), tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_broken_shards_are_refused_before_any_weight_is_written(tmp_path):
    from jetmoe.checkpoint import load_weights

    model = random_model()
    model.save_pretrained(tmp_path, max_shard_size=4096)  # several shards and an index
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    target = random_model(dataclasses.replace(TINY, initializer_range=0.01))
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def refused(message):
        with pytest.raises(CheckpointError, match=message):
            load_weights(target, tmp_path)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "partly loaded"

    (tmp_path / shards[-1]).rename(tmp_path / "moved")
    refused(f"names shard {shards[-1]}, which is not in")
    (tmp_path / "moved").rename(tmp_path / shards[-1])
    name = next(n for n, f in index["weight_map"].items() if f == shards[-1])
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], name: shards[0]}}))
    refused(f"{shards[0]}: the index lists tensor {name}, which this file lacks")
    index_path.write_text(json.dumps(index))
    data = (tmp_path / shards[0]).read_bytes()
    (tmp_path / shards[0]).write_bytes(data[:20])  # truncated
    refused(f"{shards[0]}: cannot read it as safetensors")
    (tmp_path / shards[0]).write_bytes(data)
    index_path.write_text("{")
    refused("not a safetensors index with a weight_map")
    index_path.write_text(json.dumps(index))
    load_weights(target, tmp_path)  # intact again: loads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope type 'linear' is not supported"),
    ({"rope_theta": 500.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     "rope_theta=500.0 and rope_parameters.rope_theta=10000.0 disagree"),
    ({"hidden_size": "32"}, "hidden_size='32', expected int"),
    ({"rms_norm_eps": None}, "rms_norm_eps=None"),
    ({"pad_token_id": 48}, r"pad_token_id: expected None or an id in \[0, vocab_size=48\)"),
    ({"pad_token_id": True}, "pad_token_id: expected None or an id in"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false', expected bool"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps: expected a value >= 0, got -1e-06"),
    ({"rope_theta": 0.0, "rope_parameters": {"rope_type": "default", "rope_theta": 0.0}},
     "rope_theta: expected a value > 0, got 0.0"),
    ({"head_dim": 16}, "kv_channels=8 and head_dim=16 disagree"),
    ({"num_hidden_layers": 0}, "num_hidden_layers: expected a positive int"),
    ({"kv_channels": 5}, "kv_channels: expected an even head size"),
    ({"eos_token_id": "x"}, "eos_token_id: expected None or an id in"),
    ({"eos_token_id": [2, 48]}, r"eos_token_id: expected None or an id in \[0, vocab_size=48\)"),
    ({"bos_token_id": -1}, "bos_token_id: expected None or an id in"),
], ids=["legacy_rope_scaling", "rope_theta_disagrees", "string_size", "none_eps", "pad_out_of_range", "pad_a_bool",
        "tie_a_string", "negative_eps", "zero_theta", "head_dim_disagrees", "no_layers", "odd_head_size",
        "eos_a_string", "eos_out_of_range", "bos_negative"])
def test_bad_config_values_are_named(change, message):
    d = {**config_to_dict(TINY), **change}
    if "rope_scaling" in change:
        del d["rope_parameters"]  # (which would be read first)
    with pytest.raises(CheckpointError, match=message):
        config_from_dict(d)
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        config_from_dict([d])


def test_from_pretrained_takes_dtype_names(tmp_path):
    JetMoEForCausalLM(TINY).save_pretrained(tmp_path)
    for name, want in (("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("auto", torch.float32),
                       (None, torch.float32), (torch.float64, torch.float64), ("bf16", torch.bfloat16),
                       ("fp16", torch.float16), ("half", torch.float16), ("fp32", torch.float32),
                       ("float", torch.float32), ("fp64", torch.float64), ("double", torch.float64)):
        assert JetMoEForCausalLM.from_pretrained(tmp_path, dtype=name).lm_head.weight.dtype == want, name
    for bad in ("bfloat17", torch.int8, 3):
        with pytest.raises(ValueError, match="dtype: expected a floating torch.dtype"):
            JetMoEForCausalLM.from_pretrained(tmp_path, dtype=bad)


def test_from_pretrained_refuses_the_name_of_a_dtype_that_is_not_floating(tmp_path):
    """A dtype given by name ("int8", as a CLI passes it) must be a floating one, refused by name like torch.int8."""
    JetMoEForCausalLM(TINY).save_pretrained(tmp_path)
    for bad in ("int8", "torch.int64", "bool"):
        with pytest.raises(ValueError, match="dtype: expected a floating torch.dtype"):
            JetMoEForCausalLM.from_pretrained(tmp_path, dtype=bad)


def _assert_same_weights(loaded, saved):
    """Every tensor of the loaded model equal, bit for bit, to the saved model's, under the same names."""
    want = saved.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_a_bf16_checkpoint_says_so_and_loads_as_bf16(tmp_path):
    model = JetMoEForCausalLM(TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"  # what transformers reads
    loaded = JetMoEForCausalLM.from_pretrained(tmp_path)  # dtype None: the stored one
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    _assert_same_weights(loaded, model)


def test_tensors_the_model_lacks_are_ignored_with_a_warning_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    model = JetMoEForCausalLM(TINY)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"ignoring 1 tensors this model does not have: model\.layers\.0\.extra"):
        loaded = JetMoEForCausalLM.from_pretrained(tmp_path)
    _assert_same_weights(loaded, model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_checkpoint_loads_in_its_stored_dtype_bit_for_bit_and_its_index_counts_its_bytes(dtype, tmp_path):
    """dtype None keeps what the file stores (F16 as float16, not bf16; F64 as float64, not float32); a sharded save's
    index states the bytes of its tensors as transformers writes it (metadata.total_size)."""
    model = random_model().to(dtype)
    model.save_pretrained(tmp_path, max_shard_size=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    stored = {k: t for k, t in model.state_dict().items() if k in index["weight_map"]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    loaded = JetMoEForCausalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    _assert_same_weights(loaded, model)


def test_saving_again_into_a_folder_replaces_its_shards(tmp_path):
    """A sharded save, then a single-file save of other weights into the same folder: no shard or index of the
    first may remain (an index left behind would be read first, and load the old weights)."""
    first = JetMoEForCausalLM(TINY)
    first.save_pretrained(tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("model-0*"))) > 1
    torch.manual_seed(1)
    second = JetMoEForCausalLM(TINY)
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    loaded = JetMoEForCausalLM.from_pretrained(tmp_path)
    _assert_same_weights(loaded, second)


def test_missing_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config_to_dict(TINY)))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in CI: the hub path must fail in one line
    with pytest.raises(CheckpointError, match="could not download 'nobody/no-such-model'") as info:
        load_pretrained("nobody/no-such-model")
    assert "\n" not in str(info.value)


def test_tokenizers_bytes_and_autotokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jetmoe import ByteTokenizer, HFTokenizer, load_tokenizer

    byte = ByteTokenizer()
    ids = byte.encode("déf ∑")
    assert ids[0] == byte.bos_token_id and byte.decode(ids) == "déf ∑"
    assert isinstance(load_tokenizer(None, vocab_size=259), ByteTokenizer)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "def": 3, "f": 4, "(": 5, ")": 6, ":": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer)
    assert hf.encode("def f ( ) :") == [1, 3, 4, 5, 6, 7]  # BOS first, as JetMoE-8B's tokenizer adds it
    assert hf.pad_token_id == hf.eos_token_id == 2  # no pad token: padded with eos, as JetMoE-8B's config
    assert hf.decode([1, 3, 4, 2]) == "def f"  # special tokens dropped
    # A Llama-style tokenizer whose post-processor adds BOS itself (JetMoE-8B's does): still one BOS.
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>").save_pretrained(tmp_path / "llama_style")
    assert load_tokenizer(tmp_path / "llama_style").encode("def f ( ) :") == [1, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "nothing", vocab_size=32000)
    # More ids than the model's embedding: another checkpoint's tokenizer, said by name (it failed in the forward).
    with pytest.raises(ValueError, match=rf"^the tokenizer in {re.escape(str(tmp_path))} has 8 tokens, more than "
                                         r"the model's vocab_size 5: is it this checkpoint's\?"):
        load_tokenizer(tmp_path, vocab_size=5)
    assert isinstance(load_tokenizer(tmp_path, vocab_size=8), HFTokenizer)
    # A folder replaced by a run of the other tokenizer keeps only the new one's files (the HF ones were read first,
    # so a byte-level run saved over a checkpoint was read back with the checkpoint's tokenizer).
    byte.save_pretrained(tmp_path)
    assert not any((tmp_path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    assert isinstance(load_tokenizer(tmp_path, vocab_size=259), ByteTokenizer)
    hf.save_pretrained(tmp_path)
    assert not (tmp_path / "byte_tokenizer.json").exists() and isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_an_autotokenizer_without_bos_encodes_without_one(tmp_path):
    """Tokenizers with no BOS token (GPT-2 or Qwen style) exist: encode then starts with the text's first token, not
    with a missing id."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers  # a dependency of transformers

    from jetmoe import load_tokenizer

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "def": 2, "f": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path)
    hf = load_tokenizer(tmp_path)
    assert hf.bos_token_id is None
    assert hf.encode("def f") == [2, 3] and hf.encode("def f", add_bos=False) == [2, 3]


def test_a_checkpoint_tokenizer_without_transformers_says_what_to_install(tmp_path, monkeypatch):
    from jetmoe import load_tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when it is absent
    with pytest.raises(ValueError, match=rf"^the tokenizer in {re.escape(str(tmp_path))} .*pip install transformers"):
        load_tokenizer(tmp_path)


def test_position_ids_of_one_row_are_broadcast_over_the_batch():
    """transformers' convention, position_ids [1, S] for every row, is taken (forward checks its shape)."""
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 5))
    with scattermoe.use_backend("torch"):
        one_row = model(x, position_ids=torch.arange(2, 7)[None]).logits
        per_row = model(x, position_ids=torch.arange(2, 7).expand(2, 5)).logits
        default = model(x).logits
    assert torch.equal(one_row, per_row) and not torch.equal(one_row, default)


def test_compiled_decoder_layers_leave_generation_eager_and_pickle_as_eager():
    """After a compiled training step, generate (its decode steps eager: a changing `start` once made Dynamo's
    next graphs symbolic in it and SDPA refuse them) and a no-grad forward give the eager model's results; a
    pickled or deep-copied model comes back eager (a compiled function does not pickle); a callable backend is
    taken."""
    import copy
    import io

    torch.manual_seed(0)
    model = random_model()
    eager = copy.deepcopy(model)
    model.compile_decoder_layers("aot_eager")
    x = torch.randint(3, TINY.vocab_size, (2, 9))
    with scattermoe.use_backend("torch"):
        model.train()
        out = model(x, labels=x)
        (out.loss + out.aux_loss).backward()
        model.eval()
        assert torch.equal(model.generate(x[:, :4], 5), eager.generate(x[:, :4], 5))
        with torch.no_grad():
            want = eager(x).logits
            assert_close(model(x).logits, want, 1e-5, "no-grad forward after generate")
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for back in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            assert all(layer.compiled_layer_forward is None for layer in back.model.layers)
        assert all(layer.compiled_layer_forward is not None for layer in model.model.layers)
        calls = []
        model.compile_decoder_layers(lambda gm, example_inputs: calls.append(1) or gm.forward)
        with torch.no_grad():
            assert_close(model(x).logits, want, 1e-5, "callable backend")
        assert calls


def test_a_prompt_fed_in_chunks_through_the_cache_gives_the_full_forwards_logits():
    """A second multi-token chunk (cache filled, no attention_mask) needs a causal mask among its own tokens."""
    torch.manual_seed(0)
    model = random_model()
    x = torch.randint(3, TINY.vocab_size, (2, 9))
    with torch.no_grad(), scattermoe.use_backend("torch"):
        full = model(x).logits
        cache = KVCache(TINY, 2, 9, "cpu", torch.float32)
        chunks = torch.cat([model(x[:, :4], cache=cache).logits, model(x[:, 4:], cache=cache).logits], 1)
    assert_close(chunks, full, 1e-5, "logits of two chunks")


def test_a_bf16_model_gives_bf16_logits_and_the_float32_loss_of_those_logits():
    torch.manual_seed(0)
    model = random_model().to(torch.bfloat16)
    x = torch.randint(3, TINY.vocab_size, (2, 64))
    with torch.no_grad(), scattermoe.use_backend("torch"):
        out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, want)


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_weight_bytes_counts_what_one_step_reads(tied):
    """Every parameter once (the head's matrix too, tied or not), the experts' at K/E, no embedding table (one row
    per token is looked up)."""
    cfg = dataclasses.replace(TINY, tie_word_embeddings=tied)
    model = JetMoEForCausalLM(cfg)
    share = cfg.num_experts_per_tok / cfg.num_local_experts
    n = sum(p.numel() * (share if name.endswith("linear.weight") else 1)
            for name, p in model.named_parameters(remove_duplicate=False) if name != "model.embed_tokens.weight")
    assert model.decode_step_weight_bytes() == n * 4


@pytest.mark.parametrize("theta", [10000.0, 50.0])
def test_the_static_decoder_uses_the_configs_rope_theta(theta):
    cfg = dataclasses.replace(TINY, rope_theta=theta)
    torch.manual_seed(0)
    model = random_model(cfg)
    B, S, steps = 2, 5, 4
    x = torch.randint(3, cfg.vocab_size, (B, S))
    default, static = (KVCache(cfg, B, S + steps, "cpu", torch.float32) for _ in range(2))
    with torch.no_grad(), scattermoe.use_backend("torch"):
        want = model(x, cache=default).logits[:, -1]
        model(x, cache=static)
        decoder = StaticDecoder(model, static, S, None, graph=False)
        for step in range(steps):
            tokens = want.argmax(-1)
            want = model(tokens[:, None], cache=default).logits[:, -1]
            assert_close(decoder(tokens), want, 1e-5, f"step {step}")
