"""jetmoe against transformers' JetMoeForCausalLM: logits, loss, every gradient, greedy generation, checkpoints.

Every weight (embeddings, norms, routers, expert weights, shared biases) is randomised so that routing is
non-trivial and a dropped bias or norm shows. The transformers model is built, saved by transformers, and
loaded here with ``JetMoEForCausalLM.from_pretrained``: each test also checks the HF -> jetmoe checkpoint path.

transformers 5.23 is the reference for everything but the aux loss: its load_balancing_loss_func has no
z-loss, normalises f to sum to K, records the MoA router twice and pools every router's P and f before
multiplying them (one product, not a sum of one per router), while JetMoE's training recipe
(DESIGN.md section 9) is what jetmoe implements. The recipe is recomputed here, independently, from the
router logits that transformers' own routers produce (captured with forward hooks).
Its MoA tiles K/V with ``repeat`` (query head i reads KV head i mod H), the fixed behaviour of PR #41423.
"""

import dataclasses
import json
import warnings

import pytest
import torch
from helpers import assert_close

import scattermoe

transformers = pytest.importorskip("transformers")
from jetmoe import JetMoEConfig, JetMoEForCausalLM, config_from_dict  # noqa: E402

TOL = 1e-4  # fp32 end to end; the two models sum experts and heads in different orders

# Tiny random configs, each named for what it exercises.
CONFIGS = {
    "k2_of_4": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    # K=1, odd E, 4 heads of 4 dims (rotary over 2 pairs), untied lm_head
    "k1_of_3_untied": dict(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_key_value_heads=4, kv_channels=4,
                           intermediate_size=20, num_local_experts=3, num_experts_per_tok=1,
                           tie_word_embeddings=False),
    # K=E (every expert on every token), one KV head of 16 dims, 3 layers, other rope theta; rms_norm_eps
    # 1e-5 and embeddings of rms ~3e-3, where the per-layer norms' hard-coded 1e-6 differs visibly from it
    "k_eq_e_one_head": dict(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_key_value_heads=1,
                            kv_channels=16, intermediate_size=24, num_local_experts=2, num_experts_per_tok=2,
                            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def hf_model(name: str, **overrides):
    """transformers' JetMoE at CONFIGS[name] (with ``overrides``), every weight randomised to matter."""
    cfg = transformers.JetMoeConfig(**{"bos_token_id": 1, "eos_token_id": 2, **CONFIGS[name], **overrides})
    cfg._attn_implementation = "eager"  # the reference path: explicit K/V repeat, not SDPA's GQA
    model = transformers.JetMoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith("router.layer.weight"):
                p.copy_(0.5 * torch.randn_like(p))  # spread router logits: top-k choices differ per token
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif pname == "model.embed_tokens.weight" and name == "k_eq_e_one_head":
                p.copy_(3e-3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    """(transformers model, jetmoe model loaded from the checkpoint transformers saved, its directory)."""
    hf = hf_model(request.param)
    hf.save_pretrained(tmp_path)
    ours = JetMoEForCausalLM.from_pretrained(tmp_path)
    return hf, ours, tmp_path


def capture_router_logits(hf):
    """Forward hooks on every transformers router: [T, E] logits, in call order (MoA then MoE per layer)."""
    captured = []
    for module in hf.modules():
        if type(module).__name__ == "JetMoeTopKGating":
            module.register_forward_hook(lambda m, args, out: captured.append(out[4].detach()))
    return captured


def recipe_aux_loss(router_logits, num_experts: int, top_k: int, coef: float) -> torch.Tensor:
    """JetMoE's training recipe, written out in float64 from the logits alone (no scattermoe code)."""
    total = torch.zeros((), dtype=torch.float64)
    for logits in router_logits:
        logits = logits.double()
        probs = torch.softmax(logits, dim=-1)
        chosen = logits.topk(top_k, dim=-1).indices
        freq = torch.zeros(num_experts, dtype=torch.float64)
        for e in chosen.flatten().tolist():
            freq[e] += 1
        switch = num_experts * (probs.sum(0) / probs.sum() * (freq / freq.sum())).sum()
        z = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
        total = total + switch + 0.1 * z
    return coef * total


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_loss_aux_and_gradients_match(pair, backend):
    hf, ours, _ = pair
    x = torch.randint(0, hf.config.vocab_size, (2, 11))
    captured = capture_router_logits(hf)
    ref = hf(x, labels=x)
    ref.loss.backward()
    with scattermoe.use_backend(backend):
        out = ours(x, labels=x)
        out.loss.backward()
    print(f"[{backend}] logits max abs diff {(out.logits - ref.logits).abs().max().item():.2e}")
    assert_close(out.logits, ref.logits, TOL, "logits")
    assert_close(out.loss, ref.loss, TOL, "loss")
    assert len(captured) == len(out.router_logits) == 2 * hf.config.num_hidden_layers
    for i, (mine, theirs) in enumerate(zip(out.router_logits, captured)):
        assert_close(mine, theirs, TOL, f"router logits {i}")
    cfg = hf.config
    expected_aux = recipe_aux_loss(captured, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.aux_loss_coef)
    print(f"aux loss {out.aux_loss.item():.6f} (recipe {expected_aux.item():.6f})")
    assert_close(out.aux_loss, expected_aux, TOL, "aux loss")
    ref_params = dict(hf.named_parameters())
    failures = []
    for name, p in ours.named_parameters():
        try:
            assert_close(p.grad, ref_params[name].grad, TOL, f"grad {name}")
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


def test_padded_batch_matches(pair):
    """Left-padded rows: position ids counted from the mask (transformers given the same ones explicitly)."""
    hf, ours, _ = pair
    x = torch.randint(3, hf.config.vocab_size, (3, 9))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[2, :1] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, position_ids=position_ids).logits
        with scattermoe.use_backend("torch"):
            out = ours(x, attention_mask=mask).logits
    valid = mask.bool()
    assert_close(out[valid], ref[valid], TOL, "logits at non-padding positions")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches(pair, backend):
    hf, ours, _ = pair
    hf.generation_config.eos_token_id = None  # both run all max_new_tokens steps
    hf.generation_config.pad_token_id = 0
    prompts = [torch.randint(3, hf.config.vocab_size, (n,)) for n in (7, 4)]
    steps = 4 if backend == "triton" else 8
    x = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):  # left padding
        x[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    with scattermoe.use_backend(backend):
        out = ours.generate(x, steps, attention_mask=mask)
    print("transformers:", ref[:, 7:].tolist(), "jetmoe:", out[:, 7:].tolist())
    assert torch.equal(out, ref)


def test_several_eos_ids_without_a_pad_id_match(pair):
    """A row stopped by the second of two eos ids is filled as transformers fills it: with the first id."""
    hf, ours, _ = pair
    x = torch.randint(3, hf.config.vocab_size, (3, 5))
    with torch.no_grad(), scattermoe.use_backend("torch"):
        free = ours.generate(x, 6)[:, 5:]
    stop = int(free[0, 1])  # row 0 stops at it (at step 1, or at 0 if it came then too)
    first = next(i for i in range(3, hf.config.vocab_size) if i not in free[0, :2].tolist())
    eos = [first, stop]
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = eos, None
    ours.config = dataclasses.replace(ours.config, pad_token_id=None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "Setting pad_token_id to eos_token_id"
        ref = hf.generate(x, max_new_tokens=6, do_sample=False)
    with torch.no_grad(), scattermoe.use_backend("torch"):
        out = ours.generate(x, 6, eos_token_id=eos)
    print("transformers:", ref[:, 5:].tolist(), "jetmoe:", out[:, 5:].tolist())
    assert (out[0, 5:] == first).any()  # the fill was exercised
    assert torch.equal(out, ref)


@pytest.mark.parametrize("same", [True, False], ids=["same_values", "different_values"])
def test_tied_config_with_a_stored_head_loads_as_transformers_does(tmp_path, same):
    """tie_word_embeddings=true and a stored lm_head.weight: equal to the embedding, the model stays tied; different,
    transformers unties them with a warning and uses the stored head, and so does jetmoe."""
    from safetensors.torch import load_file, save_file
    hf_model("k2_of_4").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed.clone() if same else 0.3 * torch.randn_like(embed)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.JetMoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = JetMoEForCausalLM.from_pretrained(tmp_path)
    untie_warnings = [w for w in caught if "untied" in str(w.message)]
    assert len(untie_warnings) == (0 if same else 1), [str(w.message) for w in caught]
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == same == ours.config.tie_word_embeddings
    assert tied == (theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr())
    x = torch.randint(0, theirs.config.vocab_size, (2, 6))
    with torch.no_grad(), scattermoe.use_backend("torch"):
        assert_close(ours(x).logits, theirs(x).logits, TOL, "logits")
    if not same:  # saved untied, it reloads the same
        ours.save_pretrained(tmp_path / "again")
        again = JetMoEForCausalLM.from_pretrained(tmp_path / "again")
        assert torch.equal(again.lm_head.weight, ours.lm_head.weight) and not again.config.tie_word_embeddings


def test_config_keys_missing_from_the_file_read_as_transformers_reads_them(tmp_path):
    hf_model("k2_of_4", attention_dropout=0.25, rms_norm_eps=1e-4).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert config_from_dict(saved).attention_dropout == 0.25
    checked = []
    for field in dataclasses.fields(JetMoEConfig):
        # (Without num_hidden_layers transformers builds its default 12 layers; jetmoe takes 24, whose tensors the
        # checkpoint then lacks: a CheckpointError, not a model of another depth.)
        if field.name not in saved or field.name == "num_hidden_layers":
            continue
        d = {k: v for k, v in saved.items() if k != field.name}
        want = getattr(transformers.JetMoeConfig.from_dict(d), field.name)
        assert getattr(config_from_dict(d), field.name) == want, field.name
        checked.append(field.name)
    assert {"rms_norm_eps", "attention_dropout", "intermediate_size", "tie_word_embeddings"} <= set(checked)


def test_sampling_keeps_the_tokens_transformers_warpers_keep(monkeypatch):
    """temperature, then top_k (ties with the k-th kept), then top_p: the tokens sample() can draw, and their
    probabilities, are those of transformers' Temperature, TopK and TopP warpers in that order."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from jetmoe import model as jetmoe_model
    drawn_from = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n, generator=None: drawn_from.append(p) or real(p, n))
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        logits = 3 * torch.randn(4, 40, generator=g)
        temperature = 0.2 + 1.5 * torch.rand(1, generator=g).item()
        top_p = 0.05 + 0.95 * torch.rand(1, generator=g).item()
        top_k = [0, 1, 5, 20, 40, 7][trial % 6]
        if trial % 6 == 5:  # ties at the k-th value (rounded logits), without top_p (whose ties either may break)
            logits, top_p = logits.round(), 1.0
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        warped = TopPLogitsWarper(top_p)(None, warped)
        jetmoe_model.sample(logits, temperature, top_p, top_k=top_k)
        ours = drawn_from[-1] / drawn_from[-1].sum(-1, keepdim=True)
        assert torch.equal(ours > 0, torch.isfinite(warped)), (trial, top_k, top_p)
        assert_close(ours, torch.softmax(warped, -1), 1e-5, f"trial {trial}")


def test_checkpoint_saved_here_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    x = torch.randint(0, hf.config.vocab_size, (2, 6))
    for name, shard in (("single", 1 << 30), ("sharded", 4096)):
        out_dir = tmp_path / name
        ours.save_pretrained(out_dir, max_shard_size=shard)
        files = sorted(p.name for p in out_dir.iterdir())
        if name == "sharded":
            index = json.loads((out_dir / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1, files
            assert "lm_head.weight" not in index["weight_map"] or not hf.config.tie_word_embeddings
        else:
            assert "model.safetensors" in files and "model.safetensors.index.json" not in files, files
        theirs = transformers.JetMoeForCausalLM.from_pretrained(out_dir, attn_implementation="eager").float().eval()
        mine_again = JetMoEForCausalLM.from_pretrained(out_dir)
        with torch.no_grad():
            ref = hf(x).logits
            assert_close(theirs(x).logits, ref, TOL, f"transformers loading jetmoe's {name} checkpoint")
            with scattermoe.use_backend("torch"):
                assert_close(mine_again(x).logits, ref, TOL, f"jetmoe reloading its {name} checkpoint")
        saved = set(theirs.state_dict()) - {"lm_head.weight"}
        assert saved == set(mine_again.state_dict()) - {"lm_head.weight"}


def test_other_activation_takes_the_unfused_path(tmp_path):
    """activation_function other than silu: the two-GEMM path (GLU outside the kernel) still matches."""
    cfg = transformers.JetMoeConfig(**{**CONFIGS["k2_of_4"], "activation_function": "gelu"})
    hf = transformers.JetMoeForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = JetMoEForCausalLM.from_pretrained(tmp_path)
    assert ours.config.activation_function == "gelu"
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad(), scattermoe.use_backend("torch"):
        assert_close(ours(x).logits, hf(x).logits, TOL, "logits with gelu experts")
