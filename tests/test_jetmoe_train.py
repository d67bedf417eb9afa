"""jetmoe training and CLI: a step through the kernels' backward, resume, DDP and FSDP2 (gloo, 2 processes), the
commands.

The DDP test runs the real entry point under torchrun (2 CPU processes, gloo) and compares its log and
weights with one process accumulating the same two micro-batches: DDP's gradient average and gradient
accumulation are the same sum, so the losses agree to float rounding.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers import assert_close, load_an_expert_weight_wrongly

import scattermoe
from jetmoe import ByteTokenizer, JetMoEConfig, JetMoEForCausalLM
from jetmoe.__main__ import main
from jetmoe.train import (
    OPTIMIZER_DCP,
    TRAIN_LOG,
    TRAIN_PLOT,
    TRAINER_STATE,
    TrainConfig,
    TrainingDiverged,
    eval_windows,
    evaluate,
    get_batch,
    load_corpus,
    make_optimizer,
    saved_train_config,
    split_validation,
    tokenize,
    train,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]
BYTES = JetMoEConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                     intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, bos_token_id=256,
                     eos_token_id=257, pad_token_id=258, initializer_range=0.05)
TEXT = "def f(x):\n    return x * 2 + 1\n\n" * 40


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    """A small byte-vocabulary checkpoint (HF layout + byte tokenizer) and a corpus file beside it."""
    ckpt = tmp_path / "ckpt"
    JetMoEForCausalLM(BYTES).save_pretrained(ckpt)
    ByteTokenizer().save_pretrained(ckpt)
    (tmp_path / "corpus.py").write_text(TEXT)
    return ckpt


def tokens() -> torch.Tensor:
    return torch.tensor(ByteTokenizer().encode(TEXT))


def test_batches_are_split_the_same_across_ranks_and_micro_steps():
    cfg1 = TrainConfig(out_dir="unused", batch_size=2, seq_len=8, grad_accum=2)
    cfg2 = TrainConfig(out_dir="unused", batch_size=2, seq_len=8, grad_accum=1)
    t = tokens()
    for step in range(3):
        one_process = [get_batch(t, step, a, 0, 1, cfg1) for a in range(2)]
        two_ranks = [get_batch(t, step, 0, r, 2, cfg2) for r in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(one_process, two_ranks))
    other_seed = dataclasses.replace(cfg1, seed=1)
    assert not torch.equal(get_batch(t, 0, 0, 0, 1, cfg1), get_batch(t, 0, 0, 0, 1, other_seed))


@pytest.mark.interpreter
def test_triton_train_step_matches_torch_backend():
    """One AdamW step through the Triton kernels' backward equals the same step on the torch backend."""
    x = get_batch(tokens(), 0, 0, 0, 1, TrainConfig(out_dir="unused", batch_size=2, seq_len=12))
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = JetMoEForCausalLM(BYTES)
        opt = make_optimizer(model, TrainConfig(out_dir="unused", lr=1e-2))
        with scattermoe.use_backend(backend):
            loss, aux = train_step(model, opt, [x], grad_clip=1.0)
        results[backend] = (loss, aux, {n: p.detach().clone() for n, p in model.named_parameters()})
    (lt, at, pt), (lk, ak, pk) = results["torch"], results["triton"]
    print(f"loss torch {lt:.6f} triton {lk:.6f}; aux {at:.6f} {ak:.6f}")
    assert abs(lt - lk) < 1e-4 * lt and abs(at - ak) < 1e-4 * at
    for name in pt:
        assert_close(pk[name], pt[name], 1e-4, f"{name} after one step")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(backend):
    """Each decoder layer recomputed in the backward (its routing too) gives the same loss, aux loss and every
    gradient as keeping its activations; and it does recompute: the layers run twice."""
    torch.manual_seed(0)
    model = JetMoEForCausalLM(BYTES)
    x = tokens()[:48].view(2, 24)
    calls = []
    for layer in model.model.layers:  # count the layers' runs (forward hooks do not see checkpoint's recompute)
        layer.forward = lambda *a, forward=layer.forward, **k: calls.append(1) or forward(*a, **k)

    def run():
        model.zero_grad(set_to_none=True)
        with scattermoe.use_backend(backend):
            out = model(x, labels=x)
            (out.loss + out.aux_loss).backward()
        return out.loss.detach(), out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, aux, grads = run()
    assert len(calls) == BYTES.num_hidden_layers
    model.gradient_checkpointing_enable()
    calls.clear()
    loss_ckpt, aux_ckpt, grads_ckpt = run()
    assert len(calls) == 2 * BYTES.num_hidden_layers  # forward, then again in the backward
    assert torch.equal(loss, loss_ckpt) and torch.equal(aux, aux_ckpt)
    for name, g in grads.items():
        assert_close(grads_ckpt[name], g, 1e-6, name)


def test_attention_dropout_trains_and_recomputes_the_same_mask():
    """config.attention_dropout drops attention weights in training only; a recomputed layer (gradient
    checkpointing) draws the same mask, so loss and gradients equal the stored-activation run's."""
    torch.manual_seed(0)
    model = JetMoEForCausalLM(dataclasses.replace(BYTES, attention_dropout=0.5))
    x = tokens()[:48].view(2, 24)

    def run(seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with scattermoe.use_backend("torch"):
            out = model(x, labels=x)
            out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = run(1)
    assert not torch.equal(loss, run(2)[0])  # another mask, another loss
    model.eval()
    with torch.no_grad(), scattermoe.use_backend("torch"):
        evaluated = model(x, labels=x).loss
        no_dropout = dataclasses.replace(BYTES, attention_dropout=0.0)
        plain = JetMoEForCausalLM(no_dropout).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.equal(evaluated, plain(x, labels=x).loss)  # eval: no dropout
    model.train()
    model.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = run(1)
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        assert_close(grads_ckpt[name], g, 1e-6, name)


def test_compiled_layers_train_as_eager_ones_do(tmp_path):
    """train(compile=...) with recomputation: the same losses and weights as eager, two steps on, and the same
    parameter names in the saved checkpoint (the layers are compiled in place, not wrapped)."""
    scattermoe.set_backend("torch")
    cfg = dict(steps=2, batch_size=2, seq_len=16, warmup_steps=1, progress=False, grad_checkpoint=True)
    models, records = [], []
    for name, backend in (("eager", None), ("compiled", "aot_eager")):
        torch.manual_seed(0)
        models.append(JetMoEForCausalLM(BYTES))
        records.append(train(models[-1], tokens(), TrainConfig(out_dir=str(tmp_path / name), compile=backend, **cfg)))
    assert models[0].model.layers[0].compiled_layer_forward is None
    assert models[1].model.layers[0].compiled_layer_forward is not None
    assert_close(torch.tensor([r["loss"] for r in records[1]]), torch.tensor([r["loss"] for r in records[0]]), 1e-6,
                 "losses")
    eager, compiled = models[0].state_dict(), models[1].state_dict()
    assert list(compiled) == list(eager)
    for name, p in compiled.items():
        assert_close(p, eager[name], 1e-6, name)
    saved = {name: sorted(k for f in (tmp_path / name).glob("*.safetensors") for k in load_file(f))
             for name in ("eager", "compiled")}
    assert saved["compiled"] == saved["eager"] and saved["eager"]


def test_a_diverged_run_stops_and_keeps_its_last_checkpoint(tmp_path, capsys):
    """A NaN loss stops training at that step (no NaN weights saved, no NaN in the log, whose JSON would not be
    strict); the checkpoint saved before stays as it was; the CLI exits 1 saying so."""
    scattermoe.set_backend("torch")
    torch.manual_seed(0)
    model = JetMoEForCausalLM(BYTES)
    out = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(out), steps=2, batch_size=2, seq_len=16, warmup_steps=0, progress=False)
    train(model, tokens(), cfg)
    saved = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(TrainingDiverged, match=r"^step 4: the loss is nan"), \
            pytest.warns(UserWarning, match=r"other settings \(lr 0.004 -> inf, steps 2 -> 6\)"):
        train(model, tokens(), dataclasses.replace(cfg, steps=6, lr=float("inf"), resume=True))  # step 3 made NaN
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != TRAIN_LOG} == \
        {name: data for name, data in saved.items() if name != TRAIN_LOG}
    log = (out / TRAIN_LOG).read_text()
    assert "NaN" not in log and [json.loads(line)["step"] for line in log.splitlines()] == [1, 2, 3]

    # An update that leaves the weights non-finite while its loss was finite (the run ends right after it): not
    # saved either.
    with pytest.raises(TrainingDiverged, match=r"^step 3: the weights are not finite"), pytest.warns(UserWarning):
        train(model, tokens(), dataclasses.replace(cfg, steps=3, lr=float("inf"), resume=True))
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != TRAIN_LOG} == \
        {name: data for name, data in saved.items() if name != TRAIN_LOG}
    # One infinite gradient element with a finite loss: clipping would turn every weight NaN (inf * 0); the step
    # stops before its update.
    model = JetMoEForCausalLM(BYTES)  # (its weights: the step-2 checkpoint's, which resume loads)
    first = next(model.parameters())
    first.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    with pytest.raises(TrainingDiverged, match=r"^step 3: the gradients' norm is inf \(loss [0-9.]+\)"):
        train(model, tokens(), dataclasses.replace(cfg, steps=4, resume=True))
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != TRAIN_LOG} == \
        {name: data for name, data in saved.items() if name != TRAIN_LOG}

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 40)
    argv = ["train", "--data", str(corpus), "--out", str(tmp_path / "cli"), "--steps", "4", "--lr", "1e30",
            "--warmup", "0", "--seq-len", "16", "--batch-size", "2", "--no-progress", "--device", "cpu",
            "--backend", "torch"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("jetmoe: error: step ") and "training diverged" in err, err


def test_overlapping_corpus_paths_read_each_file_once(tmp_path):
    """A folder named twice, or with one of its files (its held-out tail would copy its training part otherwise)."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "a.py").write_text("a = 1\n")
    (folder / "b.txt").write_text("b\n")
    assert load_corpus([folder, folder / "a.py", str(folder), tmp_path / "code" / ".." / "code" / "b.txt"]) == [
        "a = 1\n", "b\n"]


def test_a_binary_file_among_a_folders_text_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "a.py").write_text("x = 1\r\n")
    (folder / "blob.py").write_bytes(b"\x7fELF\0\0" + bytes(range(256)))  # a .py by name only
    with pytest.warns(UserWarning, match=r"corpus: skipped 1 file\(s\) with NUL bytes.*blob\.py"):
        docs = load_corpus([folder])
    assert docs == ["x = 1\n"]  # universal newlines, as read_text gives
    with pytest.raises(ValueError, match=r"looks binary"):  # named by the user: refused, not skipped
        load_corpus([folder / "blob.py"])


def test_training_lowers_the_loss_and_resume_continues_exactly(tmp_path):
    scattermoe.set_backend("torch")
    cfg = dict(batch_size=4, seq_len=16, warmup_steps=2, lr=1e-2, progress=False)
    torch.manual_seed(0)
    straight = JetMoEForCausalLM(BYTES)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    rec = train(straight, tokens(), TrainConfig(out_dir=str(tmp_path / "a"), steps=12, **cfg))
    losses = [r["loss"] for r in rec]
    print("losses:", [round(v, 3) for v in losses])
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.5

    class Crash(Exception):
        pass

    def crash_at_step_9(rec):
        if rec["step"] == 9:
            raise Crash

    part = JetMoEForCausalLM(BYTES)
    part.load_state_dict(init)
    out = str(tmp_path / "b")
    with pytest.raises(Crash):  # checkpoint at step 8 (save_every), then a crash after step 9
        train(part, tokens(), TrainConfig(out_dir=out, steps=12, save_every=4, log_every=9, **cfg), log=crash_at_step_9)
    resumed = JetMoEForCausalLM(BYTES)  # fresh weights: resume must reload them (and the optimizer, and step)
    rec2 = train(resumed, tokens(), TrainConfig(out_dir=out, steps=12, resume=True, **cfg))
    assert [r["step"] for r in rec2] == list(range(9, 13))
    assert_close(torch.tensor([r["loss"] for r in rec2]), torch.tensor(losses[8:]), 1e-6, "resumed losses")
    for name, p in resumed.state_dict().items():
        assert_close(p, straight.state_dict()[name], 1e-6, name)
    log = [json.loads(line) for line in (Path(out) / TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # the crashed run's step 9 is not kept twice


def test_resume_with_attention_dropout_continues_exactly(tmp_path):
    """Dropout draws from a seed of each step's own, so a resumed run draws the masks an uninterrupted one does."""
    scattermoe.set_backend("torch")
    cfg = dict(batch_size=2, seq_len=16, warmup_steps=1, lr=1e-2, progress=False, steps=4)
    config = dataclasses.replace(BYTES, attention_dropout=0.3)
    torch.manual_seed(0)
    straight = JetMoEForCausalLM(config)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    losses = [r["loss"] for r in train(straight, tokens(), TrainConfig(out_dir=str(tmp_path / "a"), **cfg))]
    part = JetMoEForCausalLM(config)
    part.load_state_dict(init)
    out = str(tmp_path / "b")
    train(part, tokens(), TrainConfig(out_dir=out, **{**cfg, "steps": 2}))
    torch.manual_seed(123)  # whatever the global RNG holds at the resume
    resumed = train(JetMoEForCausalLM(config), tokens(), TrainConfig(out_dir=out, resume=True, **cfg))
    assert [r["loss"] for r in resumed] == losses[2:]


def test_a_finetune_resumed_without_its_model_keeps_its_learning_rate(tiny_ckpt, capsys):
    """`train --model CKPT` (lr 2e-5 by default), then `train --resume` with the same --out and no --model: the
    run's own learning rate, not the tiny preset's 4e-3 (the --model default)."""
    out = tiny_ckpt.parent / "ft"
    common = ["--data", str(tiny_ckpt.parent / "corpus.py"), "--out", str(out), "--seq-len", "16", "--batch-size", "2",
              "--warmup", "1", "--no-progress", "--device", "cpu", "--backend", "torch"]
    assert main(["train", "--model", str(tiny_ckpt), "--steps", "2", *common]) == 0
    assert main(["train", "--resume", "--steps", "4", *common]) == 0
    lrs = [json.loads(line)["lr"] for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert len(lrs) == 4 and max(lrs) == 2e-5 and lrs[2] <= lrs[1], lrs  # one cosine from 2e-5 across the resume


def test_saves_are_off_the_clock_and_a_ctrl_c_during_one_stops_before_the_next_step(tmp_path, monkeypatch):
    """A periodic save (minutes for JetMoE-8B) counts neither as training time (the --seconds budget, the schedule,
    tokens/s) nor delays the stop a Ctrl-C asked for during it: no further step runs."""
    import signal

    from jetmoe import train as train_module

    scattermoe.set_backend("torch")
    real_save = train_module._save
    saves = []

    def slow_save(model, optimizer, step, *args):
        saves.append(step)
        time.sleep(0.6)
        if saves == [1, 2]:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while step 2's checkpoint is written
        return real_save(model, optimizer, step, *args)

    monkeypatch.setattr(train_module, "_save", slow_save)
    torch.manual_seed(0)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=6, save_every=1, batch_size=2, seq_len=16, progress=False)
    records = train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert [r["step"] for r in records] == [1, 2] and saves == [1, 2]  # step 2's save, finished, not repeated
    assert records[1]["elapsed_s"] - records[0]["elapsed_s"] < 0.5  # step 1's save (0.6 s) is not in step 2's time


def test_tokenize_ends_every_document_with_eos_and_batches_reach_the_last_window():
    tok = ByteTokenizer()
    stream = tokenize(["ab", "cd"], tok)
    assert stream.tolist() == [tok.bos_token_id, 97, 98, tok.eos_token_id, tok.bos_token_id, 99, 100,
                               tok.eos_token_id]
    cfg = TrainConfig(out_dir="unused", batch_size=64, seq_len=4)
    starts = {tuple(row.tolist()) for step in range(20) for row in get_batch(torch.arange(6), step, 0, 0, 1, cfg)}
    assert starts == {(0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5)}  # every window of 4 in 6 tokens, the last too
    # One window is a corpus: the labels are the inputs shifted inside the loss, so seq_len tokens make a step.
    assert get_batch(torch.arange(4), 0, 0, 0, 1, cfg).tolist() == [[0, 1, 2, 3]] * 64

    class BigVocab:  # ids past int16's 32767 (a 50k vocabulary) must survive the compact stream
        vocab_size, eos_token_id = 50000, 49999

        def encode(self, text):
            return [40000, 1, 32768]
    assert tokenize(["x"], BigVocab()).tolist() == [40000, 1, 32768, 49999]


def test_eval_windows_are_aligned_disjoint_and_spread_over_the_text():
    t = torch.arange(1000)
    w = eval_windows(t, 16, 5)  # 62 windows fit; 5 of them, spread
    starts = w[:, 0].tolist()
    assert w.shape == (5, 16) and w.dtype == torch.int64
    assert all(s % 16 == 0 for s in starts) and starts == sorted(set(starts))
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and starts[-1] >= 1000 * 4 // 5 - 16  # the first and the last fifth of the text
    assert max(gaps) - min(gaps) <= 16  # evenly spread, up to the alignment
    assert all(torch.equal(row, torch.arange(s, s + 16)) for row, s in zip(w, starts))
    assert eval_windows(t, 16, 0).shape == (62, 16) and eval_windows(t, 16, 100).shape == (62, 16)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(t[:10], 16)


def test_split_validation_holds_out_the_tail():
    t = torch.arange(1000)
    train_part, held = split_validation(t, 0.1, 16)
    assert torch.equal(train_part, t[:900]) and torch.equal(held, t[900:])
    assert split_validation(t, 0.001, 16)[1].numel() == 16  # at least one window
    assert split_validation(t[:32], 0.5, 16)[0].numel() == 16  # one window left to train on is enough
    with pytest.raises(ValueError, match="leaves too few to train on"):
        split_validation(t, 0.99, 16)
    with pytest.raises(ValueError, match=r"expected a value in \(0, 1\)"):
        split_validation(t, 1.0, 16)


def test_evaluate_is_the_token_mean_of_each_windows_own_loss():
    """evaluate's batching and token-weighted mean against the model's own loss, one window at a time."""
    scattermoe.set_backend("torch")
    torch.manual_seed(0)
    model = JetMoEForCausalLM(BYTES).train()
    w = eval_windows(tokens(), 24, 7)
    r = evaluate(model, w, batch_size=3, per_window=True)  # batches of 3, 3, 1
    assert model.training, "evaluate must restore the training mode"
    with torch.no_grad():
        model.eval()
        each = [model(x[None], labels=x[None]).loss.item() for x in w]
    assert r["windows"] == 7 and r["tokens"] == 7 * 23
    assert_close(torch.tensor(r["window_losses"]), torch.tensor(each), 1e-6, "per-window losses")
    assert abs(r["loss"] - sum(each) / 7) <= 1e-6 * r["loss"]
    assert abs(r["perplexity"] - torch.tensor(sum(each) / 7).exp().item()) <= 1e-5 * r["perplexity"]
    evaluate(model, w, batch_size=4)
    assert not model.training, "evaluate must restore the eval mode too"


def test_training_reports_a_held_out_loss_on_text_it_never_trains_on(tmp_path):
    scattermoe.set_backend("torch")
    torch.manual_seed(0)
    model = JetMoEForCausalLM(BYTES)
    t = tokens()
    cfg = TrainConfig(out_dir=str(tmp_path / "v"), steps=5, batch_size=4, seq_len=16, warmup_steps=1, lr=1e-2,
                      progress=False, val_fraction=0.25, eval_every=2, eval_windows=6)
    drawn = []
    import jetmoe.train as jt
    real_get_batch = jt.get_batch

    def spy(stream, *a):
        drawn.append(stream.numel())
        return real_get_batch(stream, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jt, "get_batch", spy)
        rec = train(model, t, cfg)
    assert set(drawn) == {t.numel() - round(t.numel() * 0.25)}, "training drew from the held-out tail"
    assert [r["step"] for r in rec if "val_loss" in r] == [2, 4, 5]  # every 2nd step and the last
    held = split_validation(t, 0.25, 16)[1]
    want = evaluate(model, eval_windows(held, 16, 6), batch_size=5)["loss"]  # the final weights, other batches
    assert abs(rec[-1]["val_loss"] - want) <= 1e-6 * want
    assert rec[-1]["val_perplexity"] == pytest.approx(torch.tensor(want).exp().item(), rel=1e-6)
    with pytest.raises(ValueError, match="eval_every needs a held-out part"):
        train(model, t, TrainConfig(out_dir=str(tmp_path / "w"), steps=1, eval_every=2))

    # Evaluating does not change training: the same run evaluated at the end only has the same losses.
    torch.manual_seed(0)
    once = train(JetMoEForCausalLM(BYTES), t, dataclasses.replace(cfg, out_dir=str(tmp_path / "once"), eval_every=0))
    assert [r["loss"] for r in once] == [r["loss"] for r in rec] and once[-1]["val_loss"] == rec[-1]["val_loss"]
    assert [r["step"] for r in once if "val_loss" in r] == [5]
    # Resuming with another held-out fraction moves the training part: said, not silent.
    with pytest.warns(UserWarning, match="val_fraction 0.25 with val_fraction 0.1"):
        train(JetMoEForCausalLM(BYTES), t, dataclasses.replace(cfg, out_dir=str(tmp_path / "once"), steps=6,
                                                              val_fraction=0.1, resume=True))


def test_training_refuses_fewer_held_out_windows_than_processes_before_training(tmp_path, monkeypatch):
    import jetmoe.train as jt
    monkeypatch.setattr(jt, "init_distributed", lambda device: (0, 64))  # as if under torchrun with 64 processes
    stepped = []
    monkeypatch.setattr(jt, "train_step", lambda *a, **kw: stepped.append(1) or (0.0, 0.0))
    cfg = TrainConfig(out_dir=str(tmp_path / "v"), steps=2, batch_size=2, seq_len=16, progress=False,
                      val_fraction=0.25, eval_windows=6)
    with pytest.raises(ValueError, match="6 windows of seq_len 16, fewer than the 64 processes"):
        jt.train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert not stepped


def _run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, **kw)


def test_ddp_two_processes_match_one_process(tiny_ckpt):
    common = ["train", "--model", str(tiny_ckpt), "--data", str(tiny_ckpt.parent / "corpus.py"), "--steps", "4",
              "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--warmup", "2", "--no-progress",
              "--device", "cpu"]  # gloo on the CPU, also where CUDA is present (2 ranks cannot share one GPU)
    one = tiny_ckpt.parent / "one"
    two = tiny_ckpt.parent / "two"
    r1 = _run([sys.executable, "-m", "jetmoe", *common, "--grad-accum", "2", "--out", str(one)])
    assert r1.returncode == 0, r1.stderr
    r2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "jetmoe", *common, "--grad-accum", "1", "--out", str(two)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "DistributedDataParallel over 2 processes (gloo)" in r2.stdout, r2.stdout
    log1 = [json.loads(line) for line in (one / TRAIN_LOG).read_text().splitlines()]
    log2 = [json.loads(line) for line in (two / TRAIN_LOG).read_text().splitlines()]
    print("1 process:", [round(r["loss"], 6) for r in log1], "\n2 processes:", [round(r["loss"], 6) for r in log2])
    assert len(log1) == len(log2) == 4
    for a, b in zip(log1, log2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["aux_loss"] - b["aux_loss"]) <= 1e-5 * a["aux_loss"], (a, b)
    w1, w2 = JetMoEForCausalLM.from_pretrained(one), JetMoEForCausalLM.from_pretrained(two)
    for name, p in w1.state_dict().items():
        assert_close(w2.state_dict()[name], p, 1e-5, name)


def test_fsdp_two_processes_match_one_process_and_resume_in_either_mode(tiny_ckpt):
    """FSDP2 over 2 processes (each decoder layer sharded; 2 micro-steps each, reduce-scattered every one) trains
    as one process accumulating the same four micro-batches, through a checkpoint and a resume: 2 steps, save,
    resume to 4 (the first FSDP part with the decoder layers compiled). The checkpoints are the same files either
    way (weights gathered into the HF layout, the optimizer state into the unsharded format), so each mode resumes
    the other's: one process from FSDP's step
    2, FSDP from one process's. Recomputation (--grad-checkpoint) on in the FSDP run, off in the cross resume.
    With --sharded-optimizer-state each rank writes its own shard of the optimizer state instead (DCP), and FSDP,
    DDP and one process resume from those files too. A held-out loss every 2 steps, the sharded model's windows split
    over the ranks, matches one process's."""
    common = ["train", "--model", str(tiny_ckpt), "--data", str(tiny_ckpt.parent / "corpus.py"),
              "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--warmup", "2", "--no-progress",
              "--device", "cpu", "--val-fraction", "0.2", "--eval-every", "2", "--eval-windows", "4"]
    one = [sys.executable, "-m", "jetmoe", *common, "--grad-accum", "4"]
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "jetmoe",
            *common, "--fsdp", "--grad-accum", "2"]
    root = tiny_ckpt.parent
    ddp = [a for a in fsdp if a != "--fsdp"]
    plain, sharded, fsdp_then_one, one_then_fsdp, dcp, dcp_then_one, dcp_then_ddp = (
        root / n for n in ("plain", "sharded", "fsdp_then_one", "one_then_fsdp", "dcp", "dcp_then_one",
                           "dcp_then_ddp"))

    def run(cmd, out, steps, *extra):
        r = _run([*cmd, "--steps", steps, "--out", str(out), *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    run(one, plain, "2")
    shutil.copytree(plain, one_then_fsdp)
    run(one, plain, "4", "--resume")
    # With the layers compiled too: FSDP's per-layer hooks and the recomputation stay outside the graph (aot_eager
    # here, for time; inductor checked by hand, 2026-12-01: the same losses to 6 digits).
    r = run(fsdp, sharded, "2", "--grad-checkpoint", "--compile", "aot_eager")
    assert "FSDP2 (fully_shard, one unit per decoder layer) over 2 processes (gloo)" in r.stdout, r.stdout
    assert "torch.compile (aot_eager): the decoder layers share one graph" in r.stdout, r.stdout
    held = re.search(r"fsdp: rank 0 holds ([\d,]+) of the model's ([\d,]+) parameter elements", r.stdout)
    assert held, r.stdout
    local, total = (int(v.replace(",", "")) for v in held.groups())
    assert total // 2 <= local < total  # really sharded: about half each
    shutil.copytree(sharded, fsdp_then_one)
    run(fsdp, sharded, "4", "--grad-checkpoint", "--resume")
    run(one, fsdp_then_one, "4", "--resume")
    run(fsdp, one_then_fsdp, "4", "--resume")

    run(fsdp, dcp, "2", "--sharded-optimizer-state")
    state = torch.load(dcp / TRAINER_STATE, weights_only=True)
    assert state["step"] == 2 and state["optimizer"] is None and state["optimizer_dir"] == OPTIMIZER_DCP, state
    shards = sorted(p.name for p in (dcp / OPTIMIZER_DCP).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    sizes = [(dcp / OPTIMIZER_DCP / n).stat().st_size for n in shards[1:]]
    assert max(sizes) < 0.7 * sum(sizes), sizes  # each rank wrote its own part, not the whole state
    assert not (dcp / (OPTIMIZER_DCP + ".tmp")).exists()
    shutil.copytree(dcp, dcp_then_one)
    shutil.copytree(dcp, dcp_then_ddp)
    (dcp_then_one / (OPTIMIZER_DCP + ".tmp")).mkdir()  # as a save cut short would leave it
    run(fsdp, dcp, "4", "--sharded-optimizer-state", "--resume")
    run(one, dcp_then_one, "4", "--resume")  # saved gathered this time: the sharded files go, leftovers too
    assert not any(p.name.startswith(OPTIMIZER_DCP) for p in dcp_then_one.iterdir())
    assert torch.load(dcp_then_one / TRAINER_STATE, weights_only=True)["optimizer_dir"] is None
    run(ddp, dcp_then_ddp, "4", "--resume")  # dcp.load under a process group, into whole (unsharded) tensors

    logs = {d.name: [json.loads(line) for line in (d / TRAIN_LOG).read_text().splitlines()]
            for d in (plain, sharded, fsdp_then_one, one_then_fsdp, dcp, dcp_then_one, dcp_then_ddp)}
    print({name: [round(r["loss"], 6) for r in log] for name, log in logs.items()})
    for name in ("sharded", "fsdp_then_one", "one_then_fsdp", "dcp", "dcp_then_one", "dcp_then_ddp"):
        assert [r["step"] for r in logs[name]] == [1, 2, 3, 4], (name, logs[name])
        for a, b in zip(logs["plain"], logs[name]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (name, a, b)
            assert abs(a["aux_loss"] - b["aux_loss"]) <= 1e-5 * a["aux_loss"], (name, a, b)
            # held-out loss at steps 2 and 4: sharded, each rank evaluates 2 of the 4 windows, the sums all-reduced
            assert ("val_loss" in a) == ("val_loss" in b) == (a["step"] in (2, 4)), (name, a, b)
            if "val_loss" in a:
                assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * a["val_loss"], (name, a, b)
    want = JetMoEForCausalLM.from_pretrained(plain).state_dict()
    for d in (sharded, fsdp_then_one, one_then_fsdp, dcp, dcp_then_one, dcp_then_ddp):
        got = JetMoEForCausalLM.from_pretrained(d).state_dict()
        for name, p in want.items():
            assert_close(got[name], p, 1e-5, f"{d.name}: {name}")


def test_fsdp_under_bf16_autocast_trains_as_one_process_does(tiny_ckpt):
    """--amp: FSDP over 2 processes gathers the decoder layers in bf16 and reduce-scatters fp32 gradients into fp32
    shards, and recomputes the layers from them in the backward; 2 steps agree with one process under autocast
    alone (which keeps fp32 weights throughout) to bf16 rounding: the norms' weights are rounded to bf16 there
    and the output biases added in it. The checkpoint is fp32."""
    common = ["train", "--model", str(tiny_ckpt), "--data", str(tiny_ckpt.parent / "corpus.py"), "--steps", "2",
              "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--warmup", "2", "--no-progress",
              "--device", "cpu", "--amp"]
    one, two = tiny_ckpt.parent / "one", tiny_ckpt.parent / "two"
    r = _run([sys.executable, "-m", "jetmoe", *common, "--grad-accum", "2", "--out", str(one)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(bfloat16 autocast)" in r.stdout, r.stdout
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "jetmoe",
              *common, "--fsdp", "--grad-checkpoint", "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parameter elements; the decoder layers gathered in bfloat16" in r.stdout, r.stdout
    logs = [[json.loads(line) for line in (d / TRAIN_LOG).read_text().splitlines()] for d in (one, two)]
    print([[round(rec["loss"], 6) for rec in log] for log in logs])
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * a["loss"], (a, b)
    want, got = (JetMoEForCausalLM.from_pretrained(d).state_dict() for d in (one, two))
    lr, steps = 1e-2, 2
    for name, p in want.items():
        assert got[name].dtype == torch.float32, name
        # Adam's first steps move each weight by about lr whatever its gradient's size, so where rounding flips a
        # small gradient's sign that weight lands up to 2 lr per step away: that bounds each element; and the whole
        # tensor stays close (measured: relative 2.2e-3 to 4.9e-2 after 2 steps, depending on the batches), against
        # ~1 for a shard saved in the wrong place.
        assert (got[name] - p).abs().max() <= 2 * lr * steps * 1.01, name
        assert_close(got[name], p, 0.15, name)


def _saved_bytes_and_grads(model: torch.nn.Module, x: torch.Tensor):
    """One bf16-autocast step: (bytes the autograd graph holds between forward and backward: every storage a saved
    tensor lives in, at its size after the forward; the loss; each parameter's whole gradient)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    held = sum(s.nbytes() for s in storages.values())  # FSDP's gathered weights are freed (size 0) by now
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}
    return held, out.loss.item(), grads


def test_fsdp_gathers_the_layers_in_bf16_and_keeps_no_copy_of_their_weights_for_the_backward(tmp_path):
    """shard_model(param_dtype=bf16), as train() does under autocast, on one process: the same loss and the same
    matrices' gradients as autocast alone (its bf16 copies are what the layers now gather), fp32 shards and
    gradients, and the forward keeps no bf16 copy of the layers' weights for the backward: FSDP's gathered
    weights are freed after each layer and gathered again in the backward. The vectors (norms' weights, output
    biases) are bf16 too: their gradients are rounded to it."""
    import copy

    import torch.distributed as dist

    from jetmoe.train import shard_model

    torch.manual_seed(0)
    base = JetMoEForCausalLM(BYTES)  # norms at 1 and biases at 0: the same forward in bf16 as in fp32
    x = torch.randint(0, 256, (2, 16))
    held_ref, loss_ref, grads_ref = _saved_bytes_and_grads(copy.deepcopy(base), x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fp32, bf16 = copy.deepcopy(base), copy.deepcopy(base)
        shard_model(fp32)
        shard_model(bf16, torch.bfloat16)
        held_fp32, loss_fp32, _ = _saved_bytes_and_grads(fp32, x)
        held_bf16, loss_bf16, grads = _saved_bytes_and_grads(bf16, x)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.parameters())
    finally:
        dist.destroy_process_group()
    assert loss_bf16 == loss_fp32 == loss_ref
    for name, g in grads.items():
        assert_close(g, grads_ref[name], 0 if g.dim() > 1 else 1e-2, name)
    layer_matrices = sum(2 * p.numel() for n, p in base.named_parameters() if n.startswith("model.layers.")
                         and p.dim() > 1)
    print(f"held between forward and backward: {held_ref} bytes unsharded, {held_fp32} fp32-gathered, "
          f"{held_bf16} bf16-gathered; the layers' matrices are {layer_matrices} bytes in bf16")
    assert abs(held_ref - held_fp32) < 0.05 * layer_matrices  # autocast's copies, gathered fp32 or not
    assert held_fp32 - held_bf16 == layer_matrices


SAVE_SHARDED = """
import gc
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from jetmoe import JetMoEForCausalLM
from jetmoe.checkpoint import save_pretrained
from jetmoe.train import shard_model

dist.init_process_group("gloo")
rank = dist.get_rank()
model = JetMoEForCausalLM.from_pretrained(sys.argv[1])
shard_model(model)
state = model.state_dict()
assert all(isinstance(state[n], DTensor) for n, _ in model.named_parameters())
save_pretrained(model, Path(sys.argv[2]) / f"rank{rank}", max_shard_size=40_000, state_dict=state, write=rank == 0)
# As jetmoe's CLI does: FSDP's hooks hold the group through reference cycles, and a gloo group still alive at
# interpreter teardown can abort the process ("terminate called without an active exception").
del model, state
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


def test_a_sharded_model_is_saved_one_file_at_a_time_as_the_unsharded_one_is(tiny_ckpt):
    """save_pretrained of an FSDP2-sharded model over 2 processes (its parameters DTensors, each gathered as its
    file is written, so the writing rank holds one file's tensors at a time) writes the same bytes, files and
    index as the unsharded model, here split into several files; the rank that does not write (write=False)
    takes part in the gathers and writes nothing."""
    from jetmoe.checkpoint import save_pretrained

    root = tiny_ckpt.parent
    save_pretrained(JetMoEForCausalLM.from_pretrained(tiny_ckpt), root / "plain", max_shard_size=40_000)
    (root / "save_sharded.py").write_text(SAVE_SHARDED)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(root / "save_sharded.py"), str(tiny_ckpt), str(root / "sharded")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (root / "sharded" / "rank1").exists()
    files = sorted(f.name for f in (root / "plain").iterdir())
    assert sum(f.endswith(".safetensors") for f in files) >= 4 and "model.safetensors.index.json" in files, files
    assert sorted(f.name for f in (root / "sharded" / "rank0").iterdir()) == files
    for f in files:
        assert (root / "sharded" / "rank0" / f).read_bytes() == (root / "plain" / f).read_bytes(), f


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/checkpoint"], "checkpoint not found"),
    (["generate", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--device", "cuda", "--steps", "1"], "CUDA is not available"),
    (["demo", "--device", "tpu"], "expected auto, cpu or cuda"),
], ids=["missing_checkpoint", "unknown_flag", "cuda_absent", "bad_device"])
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jetmoe: error:") and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "-3"], "argument --steps: expected a value >= 1, got -3"),
    (["train", "--seconds", "0"], "argument --seconds: expected a value > 0"),
    (["train", "--batch-size", "0", "--steps", "1"], "argument --batch-size: expected a value >= 1"),
    (["train", "--steps", "two"], "argument --steps: expected an integer"),
    (["train", "--data", "--steps", "1"], "argument --data: expected at least one argument"),
    (["generate", "--top-p", "1.5"], "argument --top-p: expected a value > 0 and <= 1"),
    (["generate", "--temperature", "nan"], "argument --temperature: expected a value >= 0"),
    (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: expected a value >= 1"),
    (["generate", "--top-p", "0.9"], "--top-p and --top-k choose among sampled tokens; with --temperature 0"),
    (["generate", "--top-k", "5", "--temperature", "0"], "give --temperature > 0 too"),
    (["train", "--seed", "20000000000000", "--steps", "1"], "argument --seed: expected a value >= 0 and <= 4294967295"),
    # Refused before a checkpoint is resolved or loaded (the path does not exist: that error would come later).
    (["generate", "--cuda-graph", "--device", "cpu", "--model", "/no/such/checkpoint"],
     "--cuda-graph: CUDA graphs need a CUDA device"),
    # Refused before the 8.5B-parameter model is built (34 GB in float32): it has no tokenizer without a checkpoint.
    (["train", "--model", "jetmoe-8b", "--steps", "1", "--device", "cpu"], "needs a 32000-token tokenizer"),
    (["train", "--model", "no_such_preset", "--steps", "1", "--device", "cpu"], "not a preset (jetmoe-8b, tiny)"),
    (["train", "--eval-every", "5", "--steps", "1", "--device", "cpu"], "--eval-every: needs a held-out part"),
    (["train", "--sharded-optimizer-state", "--steps", "1"], "--sharded-optimizer-state: needs --fsdp"),
    (["train", "--compile", "nope", "--steps", "1"], "--compile: unknown torch.compile backend 'nope'"),
    # --overwrite was ignored beside --resume (which continued the run it was meant to replace)
    (["train", "--resume", "--overwrite", "--out", "/no/such/run"], "--resume and --overwrite: pass one"),
    (["demo", "--resume", "--overwrite", "--out", "/no/such/run"], "--resume and --overwrite: pass one"),
    (["train", "--val-fraction", "1", "--steps", "1"], "argument --val-fraction: expected a value >= 0 and < 1"),
    (["eval", "--seq-len", "1"], "argument --seq-len: expected a value >= 2"),
    (["train", "--seq-len", "1", "--steps", "1"], "argument --seq-len: expected a value >= 2"),  # nothing to predict
    (["demo", "--seq-len", "1"], "argument --seq-len: expected a value >= 2"),
    (["eval", "--model", "/no/such/checkpoint"], "checkpoint not found"),
    # Above int64, which no torch size takes (a TypeError in the KV cache's torch.zeros, with a traceback).
    (["generate", "--max-new-tokens", str(2**64)], f"argument --max-new-tokens: expected a value <= {2**63 - 1}, got"),
    (["train", "--batch-size", str(2**63), "--steps", "1"], f"argument --batch-size: expected a value <= {2**63 - 1}"),
])
def test_cli_rejects_bad_values_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jetmoe: error:") and message in err, err


@pytest.mark.parametrize("argv, field", [(["train", "--out=~/run"], "out"), (["demo", "--out=~/run"], "out"),
                                         (["train", "--data=~/run"], "data"), (["eval", "--data=~/run"], "data"),
                                         (["eval", "--json=~/run"], "json")])
def test_cli_paths_expand_the_home_folder(argv, field, tmp_path, monkeypatch):
    """The shell leaves a ~ after = as it is: --out=~/run made a folder named ~ in the working directory (while
    --model expands it)."""
    from jetmoe.__main__ import build_parser

    monkeypatch.setenv("HOME", str(tmp_path))
    value = getattr(build_parser().parse_args(argv), field)
    assert (value[0] if field == "data" else value) == tmp_path / "run"


def test_cli_train_refuses_a_model_name_that_is_both_a_preset_and_a_checkpoint_here(tmp_path, capsys, monkeypatch):
    """generate and eval read ./tiny as a checkpoint; train took the preset and trained from scratch, silently."""
    monkeypatch.chdir(tmp_path)
    JetMoEForCausalLM(BYTES).save_pretrained(tmp_path / "tiny")
    assert main(["train", "--model", "tiny", "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model tiny: both a preset and a checkpoint here; pass ./tiny" in err, err
    assert not (tmp_path / "run").exists()
    # demo has no --model (it trains the preset); a folder named tiny without a checkpoint is no checkpoint.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["demo", "--seconds", "1", "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]) == 0
    (tmp_path / "tiny" / "config.json").unlink()
    assert main(["train", "--model", "tiny", "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu",
                 "--no-progress"]) == 0


def test_cli_train_guards_its_output_folder(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.pt").write_bytes(b"")  # what a finished run leaves
    for out, message in ((a_file, "exists and is not a directory"), (a_file / "sub", "is a file"),
                         (run, "holds a training run already; pass --resume")):
        assert main(["train", "--out", str(out), "--steps", "1", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jetmoe: error:") and message in err, err
    ckpt = tmp_path / "downloaded"  # a checkpoint someone pointed --out at (e.g. a download of jetmoe-8b)
    JetMoEForCausalLM(BYTES).save_pretrained(ckpt, max_shard_size=60_000)
    files = sorted(p.name for p in ckpt.iterdir())
    assert main(["train", "--out", str(ckpt), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint (config.json, model-00001-of-" in err and "--overwrite" in err, err
    assert sorted(p.name for p in ckpt.iterdir()) == files
    # The demo replaces its own default folder (its cache), but another --out only as train would.
    assert main(["demo", "--out", str(ckpt), "--seconds", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint (config.json, model-00001-of-" in err and "--overwrite" in err, err
    assert sorted(p.name for p in ckpt.iterdir()) == files
    assert (run / "trainer_state.pt").read_bytes() == b"", "the existing run was touched"
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--steps", "1", "--device", "cpu"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "none").exists()
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\0\0\1")
    assert main(["train", "--data", str(binary), "--out", str(tmp_path / "b"), "--steps", "1", "--device", "cpu"]) == 2
    assert "looks binary" in capsys.readouterr().err


def test_cli_generate_streams_and_reports(tiny_ckpt, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "def f", "--max-new-tokens", "6",
                 "--ignore-eos", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def f")
    assert "tokens/s" in err and "peak memory" in err and "backend: torch" in err
    assert "warm-up" not in err, err  # none on the CPU by default: not reported as if there had been
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "a", "--prompt", "def g(x):",
                 "--max-new-tokens", "4", "--temperature", "0.7", "--top-p", "0.9", "--device", "cpu",
                 "--warmup", "2"]) == 0
    out, err = capsys.readouterr()
    assert "--- [0]\na" in out and "--- [1]\ndef g(x):" in out
    assert re.search(r"\| 2 warm-up runs: \d+\.\d+ s, timed apart \|", err), err


def test_a_fresh_run_leaves_no_curve_of_the_run_it_replaces(tmp_path):
    """A fresh run deleted the old log but kept its train_log.png: where matplotlib is missing (nothing drawn anew),
    the folder held the new log beside the old run's curve."""
    out = tmp_path / "run"
    out.mkdir()
    (out / TRAIN_PLOT).write_bytes(b"the replaced run's curve")
    (out / TRAIN_LOG).write_text("{}\n")
    train(JetMoEForCausalLM(BYTES), tokens(), TrainConfig(out_dir=str(out), steps=1, batch_size=2, seq_len=16,
                                                         progress=False))
    assert not (out / TRAIN_PLOT).exists() and (out / TRAIN_LOG).read_text() != "{}\n"


def test_a_fresh_run_that_dies_before_its_first_save_leaves_nothing_to_resume(tmp_path, monkeypatch, capsys):
    """--overwrite deleted the old log at the start but kept the replaced run's trainer state until the first save:
    a run that died before it left the old run resumable, and --resume continued it silently."""
    import jetmoe.train as jt

    out = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(out), steps=1, batch_size=2, seq_len=16, progress=False)
    with scattermoe.use_backend("torch"):
        train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert (out / TRAINER_STATE).is_file()

    def dies(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(jt, "train_step", dies)
    with pytest.raises(RuntimeError, match="killed"):
        train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert not (out / TRAINER_STATE).exists()
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--device", "cpu"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_cli_says_how_much_text_it_held_out(tiny_ckpt, tmp_path, capsys):
    """At least one window is held out: on a short text that is more than --val-fraction, and the summary said the
    fraction asked for ("the last 1% of the corpus") where 64 of its 1282 tokens, 5%, were held out."""
    assert main(["train", "--model", str(tiny_ckpt), "--data", str(tiny_ckpt.parent / "corpus.py"), "--steps", "1",
                 "--warmup", "0", "--seq-len", "64", "--batch-size", "2", "--val-fraction", "0.01",
                 "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]) == 0
    assert tokens().numel() + 1 == 1282  # (the stream: BOS, the text, EOS)
    assert re.search(r"held-out loss \d+\.\d{3} \(perplexity \d+\.\d{2}\) on 1 window of 64 tokens spread over "
                     r"the corpus's last 64 tokens \(5%\), never trained on", capsys.readouterr().out)


def test_cli_generate_reads_the_tokenizer_before_the_weights(tiny_ckpt, capsys, monkeypatch):
    """A tokenizer that cannot load (here: transformers missing) is said before the weights are read, not after
    loading (for JetMoE-8B) 17 GB."""
    import jetmoe.checkpoint as ck

    (tiny_ckpt / "byte_tokenizer.json").unlink(missing_ok=True)
    (tiny_ckpt / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setattr(ck, "load_pretrained", lambda *a, **k: pytest.fail("loaded the weights first"))
    assert main(["generate", "--model", str(tiny_ckpt), "--device", "cpu"]) == 2
    assert "pip install transformers" in capsys.readouterr().err


def test_cli_generate_with_a_tokenizer_that_has_neither_pad_nor_eos(tiny_ckpt, capsys):
    """A Hugging Face tokenizer with only a BOS token: the prompts' left padding took pad_token_id (eos, None here),
    a TypeError in torch.full even for one prompt. Padding is masked, so the rows come out as each alone."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>").save_pretrained(
        tiny_ckpt)
    (tiny_ckpt / "byte_tokenizer.json").unlink(missing_ok=True)
    common = ["generate", "--model", str(tiny_ckpt), "--max-new-tokens", "4", "--device", "cpu"]
    outs = []
    for prompts in (["w5 w6 w7"], ["w9"], ["w5 w6 w7", "w9"]):
        assert main([*common, *(a for p in prompts for a in ("--prompt", p))]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0].startswith("w5 w6 w7") and outs[1].startswith("w9")
    assert outs[2] == f"--- [0]\n{outs[0].strip()}\n--- [1]\n{outs[1].strip()}\n", outs


def test_plot_train_log_says_why_when_there_is_nothing_to_draw(tmp_path):
    from jetmoe.train import plot_train_log
    why = plot_train_log(tmp_path)
    assert why is not None and ("no records" in why or "matplotlib is not installed" in why)
    assert not (tmp_path / "train_log.png").exists()


def test_cli_eval_matches_transformers_and_says_when_it_does_not(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """`eval --compare-transformers`: both losses against transformers' own loss computed here; then a checkpoint
    that jetmoe loads wrongly (one weight perturbed after loading) must exit 1 and say DISAGREE."""
    transformers = pytest.importorskip("transformers")
    corpus = tiny_ckpt.parent / "corpus.py"
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_ckpt), "--data", str(corpus), "--seq-len", "32", "--windows", "6",
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--compare-transformers"]
    assert main([*argv, "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "agree" in stdout and "DISAGREE" not in stdout
    rep = json.loads(out.read_text())
    w = eval_windows(tokens(), 32, 6)
    hf = transformers.JetMoeForCausalLM.from_pretrained(str(tiny_ckpt)).float().eval()
    with torch.no_grad():
        want = sum(hf(x[None], labels=x[None]).loss.item() for x in w) / len(w)
    assert rep["windows"] == 6 and rep["tokens"] == 6 * 31 and rep["compare"]["agree"] is True
    for side in ("jetmoe", "transformers"):
        assert abs(rep[side]["loss"] - want) <= 1e-5 * want, (side, rep[side], want)

    load_an_expert_weight_wrongly(monkeypatch)
    assert main(argv) == 1
    assert "DISAGREE" in capsys.readouterr().out

    def never(*a, **kw):
        raise AssertionError("loaded a checkpoint before refusing the backend")

    import jetmoe.checkpoint as ck
    monkeypatch.setattr(ck, "load_pretrained", never)  # a backend that cannot run here is refused before loading
    assert main(["eval", "--model", str(tiny_ckpt), "--backend", "cutlass", "--device", "cpu"]) == 2
    assert "--backend cutlass:" in capsys.readouterr().err


@pytest.mark.parametrize("original", [("num_hidden_layers",), ("intermediate_size", "num_local_experts",
                                                               "num_experts_per_tok", "num_hidden_layers")],
                         ids=["layers", "all_sizes"])
def test_cli_eval_compares_with_transformers_on_a_config_in_the_original_spelling(tiny_ckpt, capsys, original):
    """jetmoe reads config.json in JetMoE's original key names (num_layers, ffn_hidden_size, ...); transformers reads
    only its own and takes defaults for the rest. --compare-transformers built transformers' model from the file:
    with num_layers alone it ran 12 layers (10 random) and said DISAGREE; with the sizes it failed to load."""
    pytest.importorskip("transformers")
    from jetmoe.checkpoint import KEY_ALIASES

    path = tiny_ckpt / "config.json"
    config = json.loads(path.read_text())
    for key in original:
        config[KEY_ALIASES[key]] = config.pop(key)
    path.write_text(json.dumps(config))
    argv = ["eval", "--model", str(tiny_ckpt), "--data", str(tiny_ckpt.parent / "corpus.py"), "--seq-len", "32",
            "--windows", "4", "--device", "cpu", "--no-progress", "--compare-transformers"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ": agree;" in out, out


@pytest.mark.parametrize("loss_rel, logits_rel, status", [
    (0.9e-4, 0.9e-4, 0),  # both within float32's bounds (1e-4 each)
    (1.1e-4, 0.0, 1),  # the loss beyond its bound alone
    (0.0, 1.1e-4, 1),  # the logits beyond theirs alone
], ids=["both_within", "loss_beyond", "logits_beyond"])
def test_cli_eval_agrees_only_when_the_loss_and_the_logits_are_both_within_their_bounds(
        tiny_ckpt, capsys, monkeypatch, loss_rel, logits_rel, status):
    """The rule `eval --compare-transformers` exits by, at float32's bounds, on evaluations made up here: the two
    models' results replaced by ones apart by exactly the given relative differences."""
    pytest.importorskip("transformers")
    import jetmoe.train as jt

    logits = torch.randn(4, 31, 259, dtype=torch.float64)
    noise = torch.randn_like(logits)
    ours = logits + noise * (logits_rel * logits.norm() / noise.norm())
    results = iter([(2.0, ours), (2.0 / (1 + loss_rel), logits)])  # jetmoe's, then transformers'

    def made_up(model, windows, batch_size, **kwargs):
        loss, first_logits = next(results)
        return {"loss": loss, "perplexity": 2.718 ** loss, "tokens": 6 * 31, "windows": 6,
                "window_losses": [loss] * 6, "first_logits": first_logits}

    monkeypatch.setattr(jt, "evaluate", made_up)
    argv = ["eval", "--model", str(tiny_ckpt), "--data", str(tiny_ckpt.parent / "corpus.py"), "--seq-len", "32",
            "--windows", "6", "--device", "cpu", "--no-progress", "--compare-transformers"]
    assert main(argv) == status
    out = capsys.readouterr().out
    assert ("DISAGREE" in out) == bool(status), out


def test_peak_memory_is_in_gigabytes_on_cuda_and_on_the_cpu(monkeypatch):
    """generate's "peak memory ... GB": 10^9 bytes, from CUDA's allocator or the process's peak RSS (KiB on Linux)."""
    from jetmoe.__main__ import peak_memory_gb

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    assert peak_memory_gb(torch.device("cuda")) == pytest.approx(3 * 1.073741824)
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert kib * 1024 / 1e9 <= peak_memory_gb(torch.device("cpu")) <= kib * 1024 / 1e9 + 0.1  # the peak only grows


def test_cli_demo_smoke(tmp_path, capsys, monkeypatch):
    """The README's command with a 3-second budget: trains on the stdlib, saves the HF layout, samples; in its
    default folder (~/.cache/jetmoe/tiny), replacing the run an earlier demo left there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    demo = tmp_path / "jetmoe" / "tiny"
    demo.mkdir(parents=True)
    for stale in ("trainer_state.pt", "config.json"):
        (demo / stale).write_text("an earlier demo's")
    assert main(["demo", "--seconds", "3", "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "backend: torch" in out and "loss " in out and "sample:" in out
    assert re.search(r"held-out loss \d+\.\d+ \(perplexity \d+\.\d+\)", out), out
    try:
        import matplotlib  # noqa: F401  (optional: the loss curve is drawn only with it)
    except ImportError:
        assert "matplotlib is not installed: no loss curve drawn" in out
    else:
        png = demo / "train_log.png"
        assert f"loss curve: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.json", "model.safetensors", "byte_tokenizer.json", "trainer_state.pt", TRAIN_LOG} <= {
        p.name for p in demo.iterdir()}
    assert json.loads((demo / "config.json").read_text())["hidden_size"] > 0  # the earlier run's files replaced


def _cli_calls_to(monkeypatch, module, name):
    """Count the calls to module.name (the CLI imports it from there at call time)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_cli_checks_text_and_output_before_loading_weights(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A bad --data, a corpus shorter than a window, or an unwritable --json is told before the checkpoint's
    weights are read (JetMoE-8B: 17 GB), for eval and for train."""
    import jetmoe.checkpoint
    loads = _cli_calls_to(monkeypatch, jetmoe.checkpoint, "load_pretrained")
    empty, short = tmp_path / "empty", tmp_path / "short.py"
    empty.mkdir()
    short.write_text("x = 1\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    corpus = tiny_ckpt.parent / "corpus.py"
    for argv, message in (
            (["eval", "--data", str(empty)], "the corpus is empty"),
            (["eval", "--data", str(short), "--seq-len", "64"], "tokens"),
            (["eval", "--data", str(corpus), "--json", str(blocker / "x.json")], "is a file"),
            (["train", "--data", str(short), "--steps", "1", "--seq-len", "64", "--out", str(tmp_path / "o1")],
             "fewer than one window of seq_len 64"),
            (["train", "--data", str(corpus), "--steps", "1", "--seq-len", "64", "--val-fraction", "0.97",
              "--out", str(tmp_path / "o2")], "leaves too few to train on")):
        assert main([*argv, "--model", str(tiny_ckpt), "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("jetmoe: error:") and message in err, (argv, err)
    assert loads == [], "a checkpoint was loaded before the cheap checks"


def test_cli_generate_samples_do_not_depend_on_warmup(tiny_ckpt, capsys):
    def sample(seed, warmup):
        assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "def f", "--max-new-tokens", "12",
                     "--ignore-eos", "--temperature", "1.0", "--seed", seed, "--device", "cpu", "--no-stream",
                     "--warmup", warmup]) == 0
        return capsys.readouterr().out

    assert sample("3", "0") == sample("3", "2")
    assert sample("4", "2") != sample("3", "2")  # the seed does reach the sampler


def test_cli_warns_past_the_models_context(tmp_path, capsys):
    ckpt = tmp_path / "short_context"
    JetMoEForCausalLM(dataclasses.replace(BYTES, max_position_embeddings=48)).save_pretrained(ckpt)
    ByteTokenizer().save_pretrained(ckpt)
    (tmp_path / "corpus.py").write_text(TEXT)
    argv = ["eval", "--model", str(ckpt), "--data", str(tmp_path / "corpus.py"), "--windows", "1", "--device", "cpu",
            "--no-progress", "--seq-len"]
    assert main([*argv, "48"]) == 0
    assert "longer than the model's context" not in capsys.readouterr().err
    assert main([*argv, "49"]) == 0
    assert "--seq-len 49 is longer than the model's context, max_position_embeddings = 48" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--prompt", "def f", "--max-new-tokens", "44", "--device", "cpu",
                 "--ignore-eos", "--no-stream"]) == 0  # 6 prompt tokens (BOS + 5 bytes) + 44 > 48
    assert "longer than the model's context" in capsys.readouterr().err


def test_ctrl_c_finishes_the_step_and_saves(tmp_path):
    """SIGINT during `train`: the step under way completes, the checkpoint is saved as at the end (exit 0), and
    --resume continues from it."""
    import signal
    import time
    corpus = tmp_path / "corpus.py"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "jetmoe", "train", "--data", str(corpus), "--out", str(out), "--seconds", "300",
            "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--no-progress", "--log-every", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 240
        while not (out / TRAIN_LOG).is_file() or len((out / TRAIN_LOG).read_text().splitlines()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    logged = [json.loads(line)["step"] for line in (out / TRAIN_LOG).read_text().splitlines()]
    assert state["step"] == logged[-1] >= 2
    assert f"interrupted: saving step {state['step']}" in stdout and "Ctrl-C: finishing this step" in stderr
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--steps", str(state["step"] + 1),
                 "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == state["step"] + 1


def test_resuming_a_seconds_only_run_warns_that_the_schedule_restarts(tmp_path):
    corpus = tmp_path / "corpus.py"
    corpus.write_text(TEXT)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, seq_len=32, batch_size=2, warmup_steps=1,
                      progress=False)  # (a warm-up shorter than the run: no warning of its own)
    model = JetMoEForCausalLM(BYTES)
    with scattermoe.use_backend("torch"):  # (the schedule, not the kernels: no interpreter)
        train(model, tokens(), cfg)
        with pytest.warns(UserWarning, match="--seconds budget only: the learning-rate schedule"):
            train(model, tokens(), dataclasses.replace(cfg, steps=None, seconds=0.2, resume=True))
        # From the seconds-only checkpoint to a step budget: the schedule turns from time-based to step-based,
        # said as a change of steps (not as the seconds-only restart)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, tokens(), dataclasses.replace(cfg, steps=3, resume=True))
        said = [str(w.message) for w in caught]
        assert len(said) == 1 and "other settings (steps None -> 3)" in said[0]


def test_a_save_cut_short_is_not_resumable(tmp_path, monkeypatch, capsys):
    """Weights are replaced file by file: a save that dies half-way must not leave the old step's trainer state
    beside new weights (a resume would mix them silently); --resume then says why there is nothing to resume."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=1, seq_len=32, batch_size=2, progress=False)
    model = JetMoEForCausalLM(BYTES)
    scattermoe.set_backend("torch")  # (the checkpoint files, not the kernels: no interpreter)
    train(model, tokens(), cfg)
    assert (tmp_path / "run" / "trainer_state.pt").is_file()

    def dies(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(JetMoEForCausalLM, "save_pretrained", dies)
    with pytest.raises(OSError, match="No space left"):
        train(model, tokens(), dataclasses.replace(cfg, steps=2, resume=True))
    assert not (tmp_path / "run" / "trainer_state.pt").exists()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "3", "--device", "cpu"]) == 2
    assert "a checkpoint whose save was cut short" in capsys.readouterr().err


# ---- the numbers inside a step, the schedule and the CLI's flags (a mutation run found each unchecked: the
# tests above compare two runs of the same code, where a wrong scale, schedule or flag cancels out) ----

def test_learning_rate_schedule_warms_up_then_decays_to_its_floor():
    from jetmoe.train import lr_at

    cfg = TrainConfig(out_dir="unused", lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear, reaching lr at the last warm-up
    assert lr_at(4, cfg) == pytest.approx(1.0)  # cosine from its top ...
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # ... half way (t = 5/10) ...
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(20, cfg) == pytest.approx(0.1)  # ... to lr * min_lr_ratio
    timed = TrainConfig(out_dir="unused", lr=1.0, warmup_steps=0, steps=None, min_lr_ratio=0.1)
    assert lr_at(0, timed, 0.5) == pytest.approx(0.55)  # a run bounded by time decays over its time fraction
    assert lr_at(0, timed, 1.0) == pytest.approx(0.1)


@pytest.fixture
def one_second_steps(monkeypatch):
    """jetmoe.train with a clock of its own that moves 1 s a training step, the step itself replaced (loss 0)."""
    import jetmoe.train as jt

    clock = [100.0]
    monkeypatch.setattr(jt, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))  # train.py's clock only

    def one_second_step(*args, **kwargs):
        clock[0] += 1.0
        return 0.0, 0.0

    monkeypatch.setattr(jt, "train_step", one_second_step)
    return jt


def test_a_run_bounded_by_seconds_decays_over_the_time_it_has_spent(tmp_path, monkeypatch, one_second_steps):
    """train() with --seconds only hands lr_at the fraction of the budget spent before each step: on a clock that
    moves 1 s a step, a 4 s budget runs 4 steps at fractions 0, 1/4, 1/2, 3/4 (the training itself replaced)."""
    jt = one_second_steps
    monkeypatch.setattr(jt, "_save", lambda *args: None)
    cfg = TrainConfig(out_dir=str(tmp_path / "t"), seconds=4.0, lr=1.0, warmup_steps=0, min_lr_ratio=0.1,
                      batch_size=2, seq_len=16, progress=False)
    records = jt.train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert [r["elapsed_s"] for r in records] == [1.0, 2.0, 3.0, 4.0]
    assert [r["lr"] for r in records] == pytest.approx([jt.lr_at(0, cfg, f) for f in (0, 0.25, 0.5, 0.75)])
    assert records[1]["lr"] < records[0]["lr"]  # decaying, not the constant rate of a fraction stuck at 0


def test_a_run_bounded_by_seconds_starts_its_cosine_from_the_top_after_warm_up(tmp_path, one_second_steps):
    """With warm-up, a --seconds-only run decays over the time left after warm-up: the first step after it runs at
    the peak rate (as a steps-bounded run does), not part-way down a cosine over the whole budget (the demo's log
    went from 4e-3 at its last warm-up step to 2.9e-3 at the next). A resume that ends warm-up part-way through
    this run times its cosine from there too. (1 s a step; the training itself replaced.)"""
    jt = one_second_steps
    cfg = TrainConfig(out_dir=str(tmp_path / "t"), seconds=6.0, lr=1.0, warmup_steps=2, min_lr_ratio=0.1,
                      batch_size=2, seq_len=16, progress=False)
    model = JetMoEForCausalLM(BYTES)
    with scattermoe.use_backend("torch"):
        records = jt.train(model, tokens(), cfg)
        # warm-up at 0 s and 1 s; the cosine over the 4 s left, from 2 s
        assert [r["lr"] for r in records] == pytest.approx(
            [0.5, 1.0] + [jt.lr_at(2, cfg, f) for f in (0, 0.25, 0.5, 0.75)])
        assert records[2]["lr"] == pytest.approx(1.0)
        one_step = dataclasses.replace(cfg, out_dir=str(tmp_path / "r"), seconds=None, steps=1)
        jt.train(model, tokens(), one_step)
        with pytest.warns(UserWarning, match="--seconds budget only"):
            resumed = jt.train(model, tokens(), dataclasses.replace(one_step, steps=None, seconds=4.0, resume=True))
    # step 1 (the last of warm-up) at 0 s, then the cosine over the 3 s left
    assert [r["lr"] for r in resumed] == pytest.approx([1.0] + [jt.lr_at(2, cfg, f) for f in (0, 1 / 3, 2 / 3)])


@pytest.mark.parametrize("warmup, said", [(3, "never decays and never reaches its peak, --lr 1"),
                                          (2, "never decays"), (1, None)])
def test_a_warm_up_as_long_as_the_run_is_warned_about(warmup, said, tmp_path, monkeypatch):
    import jetmoe.train as jt

    monkeypatch.setattr(jt, "train_step", lambda *args, **kwargs: (0.0, 0.0))
    monkeypatch.setattr(jt, "_save", lambda *args: None)
    cfg = TrainConfig(out_dir=str(tmp_path / "t"), steps=2, lr=1.0, warmup_steps=warmup, batch_size=2, seq_len=16,
                      progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = jt.train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    warned = [str(w.message) for w in caught if "--warmup" in str(w.message)]
    assert warned == ([] if said is None else [f"--warmup {warmup} >= --steps 2: the learning rate warms up over the "
                                               f"whole run, so it {said}"])
    assert (max(r["lr"] for r in records) < 1.0) == (warmup > 2)  # what the warning says


def test_the_log_and_its_curve_count_the_training_time_of_every_run_resumed(tmp_path, monkeypatch,
                                                                           one_second_steps):
    """elapsed_s is this run's time: after a resume, the curve's title said "4 steps in 2 s" for two runs of 2 s.
    train_s and the title count both (1 s a step; the training itself replaced)."""
    matplotlib_axes = pytest.importorskip("matplotlib.axes")  # (optional: the test extra brings it)
    jt = one_second_steps
    titles = []
    monkeypatch.setattr(matplotlib_axes.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, warmup_steps=0, batch_size=2, seq_len=16,
                      progress=False)
    model = JetMoEForCausalLM(BYTES)
    with scattermoe.use_backend("torch"):
        jt.train(model, tokens(), cfg)
        jt.train(model, tokens(), dataclasses.replace(cfg, steps=4, resume=True))
    log = [json.loads(line) for line in (tmp_path / "run" / TRAIN_LOG).read_text().splitlines()]
    assert [(r["elapsed_s"], r["train_s"]) for r in log] == [(1, 1), (2, 2), (1, 3), (2, 4)]
    assert jt.plot_train_log(tmp_path / "run") is None and titles == ["run: 4 steps in 4 s"]


def test_weight_decay_spares_norms_and_biases():
    model = JetMoEForCausalLM(BYTES)
    opt = make_optimizer(model, TrainConfig(out_dir="unused", weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    spared = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert id(p) in (decay if p.dim() >= 2 else spared), name
    assert len(decay) + len(spared) == len(list(model.parameters()))
    opt = make_optimizer(model, TrainConfig(out_dir="unused", betas=(0.8, 0.9)))
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.9)] * len(opt.param_groups)


class _GradSpy(torch.optim.SGD):
    """SGD with lr 0 that keeps a copy of the gradients it was asked to apply."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = None

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


@scattermoe.use_backend("torch")  # what is checked is train_step's arithmetic, not a kernel (25 s interpreted)
def test_train_step_averages_loss_and_aux_over_micro_batches_and_clips():
    torch.manual_seed(0)
    model = JetMoEForCausalLM(BYTES)
    cfg = TrainConfig(out_dir="unused", batch_size=2, seq_len=12, grad_accum=2)
    micro = [get_batch(tokens(), 0, a, 0, 1, cfg) for a in range(2)]
    params = list(model.parameters())
    want = [torch.zeros_like(p) for p in params]
    for x in micro:  # the mean over micro-batches of d(loss + aux loss), each computed alone
        out = model(x, labels=x)
        for w, g in zip(want, torch.autograd.grad(out.loss + out.aux_loss, params, allow_unused=True)):
            if g is not None:
                w += g / len(micro)
    spy = _GradSpy(params)
    train_step(model, spy, micro, grad_clip=0.0)  # no clipping
    for name, got, w in zip([n for n, _ in model.named_parameters()], spy.seen, want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-8, msg=name)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in want]))
    assert total > 1e-3 * 10  # so that the clip below bites
    train_step(model, spy, micro, grad_clip=1e-3)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in spy.seen]))
    assert clipped == pytest.approx(1e-3, rel=1e-4)


def test_cli_generate_passes_its_flags_and_a_left_padded_batch(tiny_ckpt, capsys, monkeypatch):
    calls = []
    real = JetMoEForCausalLM.generate

    def spy(self, input_ids, max_new_tokens, **kwargs):
        calls.append((input_ids.clone(), max_new_tokens, kwargs))
        return real(self, input_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(JetMoEForCausalLM, "generate", spy)
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", "a", "--prompt", "def", "--max-new-tokens", "5",
            "--temperature", "0.7", "--top-p", "0.9", "--top-k", "12", "--device", "cpu"]
    assert main(argv) == 0
    ids, n, kwargs = calls[-1]
    tok = ByteTokenizer()
    bos, pad = tok.bos_token_id, tok.pad_token_id
    assert n == 5 and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9 and kwargs["top_k"] == 12
    assert kwargs["eos_token_id"] == tok.eos_token_id  # stops at the tokenizer's eos unless --ignore-eos
    assert ids.tolist() == [[pad, pad, bos, ord("a")], [bos, ord("d"), ord("e"), ord("f")]]  # left-padded
    assert kwargs["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert main(argv + ["--ignore-eos"]) == 0
    assert calls[-1][2]["eos_token_id"] is None
    capsys.readouterr()


def test_byte_tokenizer_adds_one_bos_and_round_trips_every_byte():
    tok = ByteTokenizer()
    assert tok.encode("ab") == [tok.bos_token_id, 97, 98]
    assert tok.encode("ab", add_bos=False) == [97, 98]
    assert tok.decode([tok.bos_token_id, 0, 97, tok.eos_token_id]) == "\x00a"  # specials dropped, NUL kept


def test_cli_train_passes_its_flags_to_the_training_config(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """What reaches TrainConfig from the command line (the training itself is replaced by a spy)."""
    import jetmoe.train as jt

    seen = []
    monkeypatch.setattr(jt, "train", lambda model, tokens, cfg, tokenizer, log=None: seen.append(cfg) or [])
    corpus = str(tiny_ckpt.parent / "corpus.py")
    common = ["--data", corpus, "--steps", "7", "--device", "cpu", "--seq-len", "16", "--batch-size", "2"]
    assert main(["train", "--out", str(tmp_path / "a"), "--warmup", "3", "--seed", "5", "--grad-accum", "2",
                 "--save-every", "4", *common]) == 0
    cfg = seen[-1]
    assert (cfg.steps, cfg.warmup_steps, cfg.seed, cfg.grad_accum, cfg.save_every) == (7, 3, 5, 2, 4)
    assert (cfg.seq_len, cfg.batch_size) == (16, 2)
    assert cfg.lr == 4e-3  # a preset trained from scratch
    assert main(["train", "--out", str(tmp_path / "s"), "--data", corpus, "--device", "cpu", "--seq-len", "16",
                 "--batch-size", "2", "--seconds", "7.5", "--log-every", "3", "--val-fraction", "0.3",
                 "--eval-windows", "5"]) == 0
    cfg = seen[-1]
    assert (cfg.seconds, cfg.steps, cfg.log_every, cfg.val_fraction, cfg.eval_windows) == (7.5, None, 3, 0.3, 5)
    assert main(["train", "--model", str(tiny_ckpt), "--out", str(tmp_path / "b"), *common]) == 0
    assert seen[-1].lr == 2e-5  # fine-tuning a checkpoint: a small default rate
    assert main(["train", "--model", str(tiny_ckpt), "--out", str(tmp_path / "c"), "--lr", "1e-3", *common]) == 0
    assert seen[-1].lr == 1e-3
    assert seen[-1].amp is False  # autocast: off by default on the CPU
    assert main(["train", "--out", str(tmp_path / "d"), "--amp", *common]) == 0
    assert seen[-1].amp is True
    assert "(bfloat16 autocast)" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "e"), "--no-amp", *common]) == 0
    assert seen[-1].amp is False
    capsys.readouterr()


@pytest.mark.parametrize("setting, value", [("lr", 1e-3), ("warmup_steps", 7), ("min_lr_ratio", 0.5), ("steps", 4),
                                            ("seed", 7), ("seq_len", 24), ("grad_clip", 0.5)])
def test_resuming_with_another_setting_says_which(setting, value, tmp_path, monkeypatch):
    """Each setting that decides the batches or the updates, changed on --resume, is named in a warning: steps
    too, since the cosine schedule runs to it (a run extended to more steps decays on another curve)."""
    import jetmoe.train as jt

    monkeypatch.setattr(jt, "train_step", lambda *args, **kwargs: (0.0, 0.0))  # the checks, not the training
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=16, progress=False)
    train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    changed = dataclasses.replace(cfg, resume=True, **{setting: value})  # warned before anything (or nothing) runs
    with pytest.warns(UserWarning, match=rf"other settings \({setting} {getattr(cfg, setting)} -> {value}\)"):
        train(JetMoEForCausalLM(BYTES), tokens(), changed)


@pytest.mark.parametrize("batch_size, grad_accum, warned", [(3, 1, "2 x 1 x 1 = 2 -> 3 x 1 x 1 = 3"),
                                                            (2, 2, "2 x 1 x 1 = 2 -> 2 x 2 x 1 = 4"),
                                                            (1, 2, None)])
def test_resuming_with_other_sequences_per_step_says_so(batch_size, grad_accum, warned, tmp_path, monkeypatch):
    """The batches are decided by the sequences per step (batch_size x grad_accum x processes) alone: another
    count is warned about; the same count split otherwise (1 x 2 for 2 x 1) draws the same sequences, no warning."""
    import jetmoe.train as jt

    monkeypatch.setattr(jt, "train_step", lambda *args, **kwargs: (0.0, 0.0))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=16, progress=False)
    train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert saved_train_config(cfg.out_dir)["world"] == 1
    changed = dataclasses.replace(cfg, resume=True, batch_size=batch_size, grad_accum=grad_accum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(JetMoEForCausalLM(BYTES), tokens(), changed)
    said = [str(w.message) for w in caught if "other settings" in str(w.message)]
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and f"sequences per step (batch_size x grad_accum x processes) {warned}" in said[0]
    # batches drawn: the same union of sequences at a step whenever the count is the same
    assert (sorted(map(tuple, torch.cat([get_batch(torch.arange(500), 5, a, 0, 1, changed)
                                         for a in range(grad_accum)]).tolist())) ==
            sorted(map(tuple, get_batch(torch.arange(500), 5, 0, 0, 1, cfg).tolist()))) == (warned is None)


def test_the_last_step_is_saved_once_and_a_resume_with_nothing_to_train_saves_nothing(tmp_path, monkeypatch):
    import jetmoe.train as jt

    saves = []
    real_save = jt._save
    monkeypatch.setattr(jt, "train_step", lambda *args, **kwargs: (0.0, 0.0))
    monkeypatch.setattr(jt, "_save", lambda model, opt, step, *args: (saves.append(step),
                                                                       real_save(model, opt, step, *args)))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=4, save_every=2, batch_size=2, seq_len=16,
                      progress=False)
    train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert saves == [2, 4]  # step 4 was written twice (the periodic save, then the final one)
    state = (Path(cfg.out_dir) / TRAINER_STATE).read_bytes()
    # already at --steps: nothing trained, and the checkpoint keeps the settings it was trained with
    assert train(JetMoEForCausalLM(BYTES), tokens(), dataclasses.replace(cfg, resume=True, batch_size=8)) == []
    assert saves == [2, 4] and (Path(cfg.out_dir) / TRAINER_STATE).read_bytes() == state


def test_tokens_per_second_count_every_micro_batch(tmp_path, monkeypatch, one_second_steps):
    """tokens_per_s = batch_size * seq_len * grad_accum per step over its time (here 1 s per step on a fake clock)."""
    jt = one_second_steps
    monkeypatch.setattr(jt, "_save", lambda *args, **kwargs: None)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=2, batch_size=2, seq_len=16, grad_accum=3, progress=False)
    records = jt.train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    assert [r["tokens_per_s"] for r in records] == [2 * 16 * 3] * 2


def test_perplexity_is_exp_of_the_loss_also_for_a_large_loss():
    """exp(loss) for a loss of ~20 (a model sure of the wrong token): no clamp below what a real loss reaches."""
    class SureOfTokenZero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate reads the device off a parameter

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, BYTES.vocab_size)
            logits[..., 0] = 20.0
            return types.SimpleNamespace(logits=logits)

    r = evaluate(SureOfTokenZero(), eval_windows(torch.arange(1, 200), 16, 4), batch_size=2)
    assert r["loss"] > 19
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)


EVALUATE_ON_TWO_RANKS = """
import sys
import torch, torch.distributed as dist
import scattermoe
from jetmoe import JetMoEForCausalLM
from jetmoe.train import evaluate

dist.init_process_group("gloo")
scattermoe.set_backend("torch")
model = JetMoEForCausalLM.from_pretrained(sys.argv[1])
windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
r = evaluate(model, windows, 2)
rank = dist.get_rank()
dist.destroy_process_group()
if rank == 0:
    one = evaluate(model, windows[:4], 2)
    print("RESULT", r["windows"], r["tokens"], r["loss"], one["loss"])
"""


def test_evaluate_over_two_processes_shares_an_odd_window_count_as_it_says(tiny_ckpt):
    """5 windows over 2 ranks: the first 4, two each; the all-reduced counts and loss are one process's on those 4."""
    script = tiny_ckpt.parent / "evaluate_two_ranks.py"
    script.write_text(EVALUATE_ON_TWO_RANKS)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              str(tiny_ckpt)])
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    _, windows, n_tokens, loss, one_loss = line.split()
    assert (int(windows), int(n_tokens)) == (4, 4 * 11)
    assert abs(float(loss) - float(one_loss)) <= 1e-5 * float(one_loss)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("grad_accum", 0), ("eval_windows", -1), ("log_every", 0),
                                          ("seq_len", 1), ("save_every", -1), ("warmup_steps", -3), ("steps", 0),
                                          ("batch_size", 2.0), ("grad_accum", True)])
def test_train_refuses_counts_out_of_range_by_name(field, value, tmp_path):
    """train() itself, not only the CLI: these failed later (torch.stack of no sequences, a ZeroDivisionError, a
    "diverged" loss of no predicted token) or ran something else (save_every=-1 saved every step)."""
    cfg = dataclasses.replace(TrainConfig(out_dir=str(tmp_path / "run"), steps=1, batch_size=2, seq_len=16,
                                          progress=False), **{field: value})
    with pytest.raises(ValueError, match=rf"^train: {field}={value!r}, expected an integer >= "):
        train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    for seconds in (-1, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^train: seconds=.*expected a positive number of seconds"):
            train(JetMoEForCausalLM(BYTES), tokens(), TrainConfig(out_dir=str(tmp_path / "run"), seconds=seconds))
    assert not (tmp_path / "run").exists()  # refused before anything was made on disk


def test_train_takes_numpy_numbers_as_counts(tmp_path):
    import numpy as np

    numpy_cfg = TrainConfig(out_dir=str(tmp_path / "np"), steps=np.int64(1), batch_size=np.int32(2),
                            seq_len=np.int64(16), seconds=np.float32(60), progress=False)
    assert [r["step"] for r in train(JetMoEForCausalLM(BYTES), tokens(), numpy_cfg)] == [1]


def test_resuming_on_other_text_says_so(tmp_path, monkeypatch):
    """The checkpoint keeps the text's length and hash: a resume on other text (another --data, or none, which is
    the stdlib) draws other batches than the run would have, and is warned about; on the same text it is not."""
    import jetmoe.train as jt

    monkeypatch.setattr(jt, "train_step", lambda *args, **kwargs: (0.0, 0.0))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=1, batch_size=2, seq_len=16, warmup_steps=0,
                      progress=False)  # (a warm-up shorter than the run: no warning of its own)
    train(JetMoEForCausalLM(BYTES), tokens(), cfg)
    saved = saved_train_config(cfg.out_dir)["corpus"]
    assert saved == jt.corpus_fingerprint(tokens()) and saved["tokens"] == tokens().numel()
    resume = dataclasses.replace(cfg, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(JetMoEForCausalLM(BYTES), tokens(), resume)  # the same text (already at steps: nothing trained)
    other = tokens().clone()
    other[5] += 1  # one token changed: the same length, another hash
    with pytest.warns(UserWarning, match=rf"other settings \(the text: {other.numel()} tokens -> {other.numel()}, "
                                         rf"sha256 {saved['sha256']} -> {jt.corpus_fingerprint(other)['sha256']}\)"):
        train(JetMoEForCausalLM(BYTES), other, resume)


@pytest.mark.parametrize("error, said", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "CUDA out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 5368709120 bytes"), "DefaultCPUAllocator: can't allocate memory"),
    (MemoryError(), "MemoryError"),
    # torch.zeros with more than int64 bytes (e.g. the KV cache of a --max-new-tokens near 2**62)
    (RuntimeError("Storage size calculation overflowed with sizes=[3, 1, 5, 4611686018427387907, 32]"),
     "Storage size calculation overflowed"),
    # a sum or product of options past int64 (prompt + --max-new-tokens, batch x grad-accum), in torch's arguments
    (TypeError("zeros(): argument 'size' failed to unpack the object at pos 3 with error \"Overflow when unpacking "
               "long long\""), "Overflow when unpacking long")],
    ids=["cuda", "cpu_allocator", "memory_error", "size_overflow", "int64_overflow"])
def test_cli_says_out_of_memory_in_one_line(error, said, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A batch too large for the device: one line naming the sizes to lower and exit 1, not a traceback; another
    RuntimeError (a bug) keeps its traceback."""
    import jetmoe.train as jt

    def raises(*args, **kwargs):
        raise error
    monkeypatch.setattr(jt, "train", raises)
    argv = ["train", "--out", str(tmp_path / "a"), "--data", str(tiny_ckpt.parent / "corpus.py"), "--steps", "1",
            "--device", "cpu", "--seq-len", "16", "--batch-size", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jetmoe: error: out of memory (") and said in err
    assert "--grad-accum" in err  # train's own options
    for command, cmd_name, advice in (("eval", "cmd_eval", "a smaller --batch-size or --seq-len, or --dtype bfloat16"),
                                      ("generate", "cmd_generate", "fewer --max-new-tokens")):
        monkeypatch.setattr(f"jetmoe.__main__.{cmd_name}", raises)
        assert main([command, "--model", str(tiny_ckpt)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("jetmoe: error: out of memory (") and advice in err and "--grad-accum" not in err
    for bug in (RuntimeError("a bug"), TypeError("a bug")):  # (TypeError: caught for torch's int64 overflow only)
        monkeypatch.setattr(jt, "train", lambda *args, **kwargs: (_ for _ in ()).throw(bug))
        with pytest.raises(type(bug), match="^a bug$"):
            main(argv[:2] + [str(tmp_path / "b")] + argv[3:])


def test_cli_resume_already_at_steps_says_nothing_was_trained(tiny_ckpt, tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(tiny_ckpt.parent / "corpus.py"), "--steps", "1",
            "--device", "cpu", "--seq-len", "16", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "already at --steps 1, nothing to train" in out and "nothing trained: " in out and "saved to" not in out


def test_cli_resume_keeps_the_runs_own_settings_unless_given_again(tiny_ckpt, tmp_path, capsys):
    """`train --resume` with only --steps continues the run as it was trained (--seq-len 16, --batch-size 2, its
    learning rate, warm-up, seed and held-out part), not with the options' defaults, which made another run (128
    tokens a sequence, 16 a batch) after a warning; an option given again is taken, and warned about."""
    from jetmoe.train import TRAINER_STATE, saved_train_config

    out = tmp_path / "run"
    first = ["train", "--out", str(out), "--data", str(tiny_ckpt.parent / "corpus.py"), "--device", "cpu",
             "--backend", "torch", "--no-progress", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
             "--grad-accum", "2", "--lr", "1e-3", "--warmup", "1", "--seed", "7", "--val-fraction", "0.2",
             "--eval-windows", "3", "--log-every", "1"]
    assert main(first) == 0
    trained = saved_train_config(out)
    capsys.readouterr()
    rest = ["train", "--out", str(out), "--data", str(tiny_ckpt.parent / "corpus.py"), "--device", "cpu",
            "--backend", "torch", "--no-progress", "--resume"]
    with pytest.warns(UserWarning) as seen:  # the longer schedule alone is named: nothing else changed
        assert main(rest + ["--steps", "3"]) == 0
    assert [str(w.message) for w in seen if "other settings" in str(w.message)] == [
        "resuming a run trained with other settings (steps 2 -> 3): its batches or its learning-rate schedule "
        "differ from here on from an uninterrupted run's"], [str(w.message) for w in seen]
    printed = capsys.readouterr().out
    assert "--resume: the run's own" in printed and "--seq-len 16" in printed and "--lr 0.001" in printed, printed
    resumed = saved_train_config(out)
    for field in ("seq_len", "batch_size", "grad_accum", "lr", "warmup_steps", "seed", "val_fraction",
                  "eval_windows", "log_every"):
        assert resumed[field] == trained[field], field
    assert resumed["steps"] == 3 and torch.load(out / TRAINER_STATE, weights_only=True)["step"] == 3
    with pytest.warns(UserWarning, match=r"other settings \(steps 3 -> 4, seq_len 16 -> 8\)"):
        assert main(rest + ["--steps", "4", "--seq-len", "8"]) == 0
    assert saved_train_config(out)["seq_len"] == 8 and saved_train_config(out)["batch_size"] == 2
    # --steps not given: the run's own (4, reached), so nothing is trained rather than a new schedule begun
    assert main(rest) == 0
    assert "nothing trained" in capsys.readouterr().out
