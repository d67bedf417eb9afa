"""jetmoe on CUDA (skipped with a reason without it): the Triton kernels in bf16 against transformers, a
bf16-autocast training step, and, when JETMOE_8B points at a local jetmoe/jetmoe-8b copy, the real checkpoint.

Tolerance policy (STYLE.md item 3): jetmoe in bf16 may be at most a small multiple as far from the fp32
transformers model as transformers itself is when run in bf16.
"""

import json
import os

import pytest
import torch
from helpers import load_an_expert_weight_wrongly, rel_err
from test_jetmoe_parity import hf_model

import scattermoe
from jetmoe import JetMoEForCausalLM, KVCache
from jetmoe.model import StaticDecoder
from jetmoe.train import TrainConfig, make_optimizer, train_step

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_logits_and_generation_on_cuda(backend, tmp_path):
    hf = hf_model("k2_of_4")
    hf.save_pretrained(tmp_path)
    x = torch.randint(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits.double()
        hf_bf16 = hf.to("cuda", torch.bfloat16)(x.cuda()).logits
        ours = JetMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
        with scattermoe.use_backend(backend):
            out = ours(x.cuda()).logits
            tokens = ours.generate(x.cuda(), 8)
    theirs_err, our_err = rel_err(hf_bf16, ref), rel_err(out, ref)
    print(f"[{backend}] bf16 rel err: jetmoe {our_err:.2e}, transformers {theirs_err:.2e}")
    assert our_err <= 3 * theirs_err + 1e-3
    assert tokens.shape == (2, 32)


@pytest.mark.parametrize("backend", ["triton", "cutlass"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_generation_as_cuda_graph_replays_matches_eager(padded, backend, tmp_path):
    """generate(cuda_graph=True): the decode steps replay one captured graph (routing, both scattermoe layers and
    attention over the static cache); greedy tokens as the eager loop's, with and without left padding."""
    from scattermoe.backends import cutlass

    if backend == "cutlass" and cutlass.unsupported_reason(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip(cutlass.unsupported_reason(torch.empty(1, device="cuda", dtype=torch.bfloat16)))
    hf = hf_model("k2_of_4")
    hf.save_pretrained(tmp_path)
    dtype = torch.float32 if backend == "triton" else torch.bfloat16  # csrc: bf16/fp16 only
    ours = JetMoEForCausalLM.from_pretrained(tmp_path, dtype=dtype, device="cuda")
    x = torch.randint(3, hf.config.vocab_size, (2, 12), device="cuda")
    mask = torch.ones_like(x)
    if padded:
        mask[0, :5] = 0
    B, S, n = *x.shape, 10
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad(), scattermoe.use_backend(backend):
        # The replays against the same static step run eagerly, fed the same tokens: the logits at every step
        # (not bit for bit: cuBLAS may pick other algorithms inside a capture).
        decoders, logits = [], []
        for graph in (True, False):
            cache = KVCache(ours.config, B, S + n, "cuda", dtype)
            logits.append(ours(x, attention_mask=mask if padded else None, cache=cache).logits[:, -1])
            decoders.append(StaticDecoder(ours, cache, S, mask, graph=graph))
        for step in range(n - 1):
            tokens = logits[1].argmax(-1)
            logits = [decoder(tokens).clone() for decoder in decoders]
            assert rel_err(logits[0], logits[1]) < tol, f"step {step}: replay vs eager"
        stats = {}
        graphed = ours.generate(x, n, attention_mask=mask, cuda_graph=True, stats=stats)
        default = ours.generate(x, n, attention_mask=mask)
    assert stats["new_tokens"] == n and stats["capture_s"] > 0
    if dtype == torch.float32:  # rounding apart (~1e-6), the same tokens as the default path
        assert torch.equal(graphed, default), (graphed.tolist(), default.tolist())


def test_autocast_train_step_on_cuda(tmp_path):
    """bf16 autocast over fp32 master weights: the Triton kernels' backward tracks the torch backend's."""
    hf = hf_model("k2_of_4")
    hf.save_pretrained(tmp_path)
    x = torch.randint(0, hf.config.vocab_size, (4, 32), device="cuda")
    losses = {}
    for backend in ("torch", "triton"):
        model = JetMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
        opt = make_optimizer(model, TrainConfig(out_dir="unused", lr=1e-3))
        with scattermoe.use_backend(backend):
            losses[backend] = [train_step(model, opt, [x], 1.0, amp_dtype=torch.bfloat16) for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    print(losses)
    for (lt, _), (lk, _) in zip(losses["torch"], losses["triton"]):
        assert abs(lt - lk) <= 2e-2 * lt


@pytest.mark.parametrize("backend", ["triton", "cutlass"])
def test_compiled_decoder_layers_train_as_eager_ones_under_autocast_on_cuda(backend, tmp_path):
    """train --compile on the GPU: inductor's graph of the decoder layers, the scattermoe kernels opaque inside it,
    gives eager's bf16-autocast losses over three steps (within bf16 rounding: inductor fuses the norms)."""
    if backend == "cutlass":
        from scattermoe.backends import cutlass
        reason = cutlass.unsupported_reason(torch.empty(1, device="cuda", dtype=torch.bfloat16))
        if reason:
            pytest.skip(reason)
    hf = hf_model("k2_of_4")
    hf.save_pretrained(tmp_path)
    x = torch.randint(0, hf.config.vocab_size, (4, 32), device="cuda")
    losses = {}
    for compiled in (False, True):
        model = JetMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
        if compiled:
            model.compile_decoder_layers("inductor")
        opt = make_optimizer(model, TrainConfig(out_dir="unused", lr=1e-3))
        with scattermoe.use_backend(backend):
            losses[compiled] = [train_step(model, opt, [x], 1.0, amp_dtype=torch.bfloat16) for _ in range(3)]
    print(losses)
    for (le, ae), (lc, ac) in zip(losses[False], losses[True]):
        assert abs(le - lc) <= 2e-2 * le and abs(ae - ac) <= 5e-2 * ae


@pytest.mark.skipif(not os.environ.get("JETMOE_8B"), reason="set JETMOE_8B to a local jetmoe/jetmoe-8b directory")
def test_real_jetmoe_8b_matches_transformers_integration_values():
    """transformers' integration test values (DESIGN.md section 9), bf16."""
    model = JetMoEForCausalLM.from_pretrained(os.environ["JETMOE_8B"], dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338]], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, 0, :4].float().cpu()
    expected = torch.tensor([-3.4844, 6.0625, 5.8750, -1.6875])
    print("logits[0, 0, :4]:", logits.tolist())
    assert torch.allclose(logits, expected, atol=5e-2, rtol=1e-2)


@pytest.mark.skipif(not os.environ.get("JETMOE_8B"), reason="set JETMOE_8B to a local jetmoe/jetmoe-8b directory")
def test_real_jetmoe_8b_eval_agrees_with_transformers(tmp_path):
    """`python -m jetmoe eval --compare-transformers` on the real checkpoint, bf16: the same held-out loss as
    transformers' JetMoeForCausalLM to rounding, and a perplexity a trained model has on code (not a random one's
    ~32000)."""
    from jetmoe.__main__ import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", os.environ["JETMOE_8B"], "--windows", "8", "--seq-len", "256",
                 "--compare-transformers", "--no-progress", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    print(rep)
    assert rep["compare"]["agree"] and rep["jetmoe"]["perplexity"] < 20


def test_eval_cli_agrees_with_transformers_in_bf16_on_cuda(tmp_path, monkeypatch):
    """`eval --compare-transformers` on CUDA, bf16, the default backend: a small random model saved by
    transformers."""
    from jetmoe.__main__ import main
    from jetmoe.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    bytes_ = ByteTokenizer()
    hf_model("k2_of_4", vocab_size=bytes_.vocab_size, bos_token_id=bytes_.bos_token_id,
             eos_token_id=bytes_.eos_token_id).save_pretrained(tmp_path / "ckpt")
    bytes_.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "text.py").write_text("def f(x):\n    return x * 2 + 1\n\n" * 60)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "text.py"), "--dtype", "bfloat16",
            "--seq-len", "64", "--windows", "8", "--compare-transformers", "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    print(rep["compare"])
    assert rep["device"].startswith("cuda") and rep["dtype"] == "bfloat16" and rep["compare"]["agree"], rep

    load_an_expert_weight_wrongly(monkeypatch)  # one MoE weight loaded wrongly must be caught in bf16 too
    assert main(argv) == 1
