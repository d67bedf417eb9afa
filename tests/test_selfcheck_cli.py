"""`python -m scattermoe`, the self-check the README offers: exit 0 when every backend that ran passed, 1 when one
failed, 2 on a usage error (one line, no traceback). Run in-process at a small shape (the Triton interpreter)."""

import pytest
import torch

import scattermoe.__main__ as selfcheck

SMALL = ["--tokens", "9", "--hidden", "16", "--ffn", "24", "--experts", "4", "--top-k", "2", "--device", "cpu"]


@pytest.mark.interpreter
def test_every_backend_that_runs_passes_and_says_so(capsys):
    assert selfcheck.main(SMALL) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["torch"], ["triton"],
                                                                                      ["cutlass"])}
    assert rows["torch"].endswith("pass") and rows["triton"].endswith("pass"), out
    if not torch.cuda.is_available():
        assert "skipped" in rows["cutlass"], out


def _spoiled(monkeypatch, spoil, backends=("torch",)):
    """_run_layer with spoil(result) applied to these backends' results (not to the float64 reference's)."""
    real = selfcheck._run_layer

    def run(model, x, gates, idx, dy, backend):
        got = real(model, x, gates, idx, dy, backend)
        if backend in backends and x.dtype != torch.float64:
            spoil(got)
        return got

    monkeypatch.setattr(selfcheck, "_run_layer", run)


def test_a_wrong_backend_result_fails_with_exit_1(monkeypatch, capsys):
    _spoiled(monkeypatch, lambda got: got.update(w_out=got["w_out"] * (1 + 1e-3)))
    assert selfcheck.main([*SMALL, "--backend", "torch"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out or "fail" in out, out


def _nan_in_w_in(got):
    got["w_in"] = got["w_in"].clone()
    got["w_in"].view(-1)[0] = float("nan")


def _raise(got):
    raise IndexError("a bug in the backend")


@pytest.mark.interpreter  # --backend all: the triton row runs (and passes) after the failing torch row
@pytest.mark.parametrize("argv, spoil", [
    (["--backend", "all"], lambda got: got.update(w_out=got["w_out"] * (1 + 1e-3))),  # a later pass hides nothing
    (["--backend", "all"], _raise),  # a backend that crashes fails the run, and the others still run
    (["--backend", "torch"], _nan_in_w_in),  # NaN in one gradient (max() over errors would skip it)
    (["--backend", "torch", "--dtype", "bfloat16"], lambda got: got.update(x=got["x"] * 1.05)),  # 5% > bf16's 2e-2
], ids=["fail_then_pass", "crash", "nan_gradient", "bf16_bound"])
def test_any_failing_backend_makes_the_exit_status_1(argv, spoil, monkeypatch, capsys):
    _spoiled(monkeypatch, spoil)
    assert selfcheck.main([*SMALL, *argv]) == 1
    out = capsys.readouterr().out
    if argv[1] == "all":
        assert any(line.startswith("triton") for line in out.splitlines()), out


def _scale_out(factor):
    return lambda got: got.update(out=got["out"] * factor)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype, spoiled, factor, verdicts", [
    ("float16", ("torch", "triton"), 1.006, {"torch": "pass", "triton": "pass"}),  # both 6e-3: the dtype's floor
    ("float16", ("triton",), 1.006, {"torch": "pass", "triton": "FAIL"}),  # torch is right: triton alone is wrong
    ("float16", ("torch", "triton"), 1.04, {"torch": "FAIL", "triton": "FAIL"}),  # 4e-2 > 10x float16's 3e-3
    ("float32", ("torch", "triton"), 1 + 2e-5, {"torch": "FAIL", "triton": "FAIL"}),  # float32 keeps its 1e-5
], ids=["shared_floor", "one_wrong", "above_cap", "float32_strict"])
def test_half_precision_bound_rises_only_to_an_error_every_backend_shares(dtype, spoiled, factor, verdicts,
                                                                         monkeypatch, capsys):
    """At a small, cancelling shape half precision's rounding alone can exceed the dtype's bound in every backend
    alike; a backend then passes within twice the other's error (at most 10x the bound), and one wrong backend
    beside a right one still fails. Spoiling the output by a relative factor sets its error to about factor - 1."""
    _spoiled(monkeypatch, _scale_out(factor), spoiled)
    status = selfcheck.main([*SMALL, "--dtype", dtype, "--backend", "all"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["torch"], ["triton"])}
    assert {name: rows[name].split()[-1] for name in verdicts} == verdicts, out
    assert status == (1 if "FAIL" in verdicts.values() else 0), out
    for name, verdict in verdicts.items():
        assert ("!" in rows[name]) == (verdict == "FAIL"), out  # the failing error is marked
    if dtype == "float16" and factor < 1.01:
        assert "bound+:" in out and "3e-03+" in rows["torch"] + rows["triton"], out


@pytest.mark.interpreter
def test_two_kernel_backends_wrong_alike_do_not_vouch_for_each_other(monkeypatch, capsys):
    """triton and cutlass share code (ops.py; cutlass falls back to Triton in places): a bug they share must not raise
    their bounds, only the torch backend's error may; with no torch row (here it crashed), nothing raises them.
    cutlass is stood in for by triton here (no GPU)."""
    real = selfcheck._run_layer

    def run(model, x, gates, idx, dy, backend):
        if x.dtype == torch.float64:
            return real(model, x, gates, idx, dy, backend)  # the reference
        if backend == "torch":
            raise IndexError("a bug in the torch backend")
        got = real(model, x, gates, idx, dy, "triton")
        got.update(out=got["out"] * 1.006)  # the same 6e-3 error in both kernel backends
        return got

    monkeypatch.setattr(selfcheck, "_run_layer", run)
    assert selfcheck.main([*SMALL, "--dtype", "float16", "--backend", "all"]) == 1
    out = capsys.readouterr().out
    verdicts = {line.split()[0]: line.split()[-1] for line in out.splitlines()
                if line.split()[:1] in (["triton"], ["cutlass"])}
    assert verdicts == {"triton": "FAIL", "cutlass": "FAIL"}, out


def test_bfloat16_on_the_cpu_skips_triton_with_its_reason(capsys):
    assert selfcheck.main([*SMALL, "--dtype", "bfloat16", "--backend", "all"]) == 0
    out = capsys.readouterr().out
    triton = next(line for line in out.splitlines() if line.startswith("triton"))
    assert "skipped" in triton and "bfloat16" in triton, out


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "5", "--experts", "4"], "--top-k 5: expected at most --experts (4)"),
    (["--tokens", "0"], "argument --tokens: expected a positive integer"),
    (["--seed", "18446744073709551616"], "argument --seed: expected an integer in [0, 2**63)"),
    (["--device", "mps"], "--device: expected cpu or cuda[:N]"),
    (["--backend", "cutlass", "--device", "cpu", "--tokens", "4"], "--backend cutlass"),
    (["--tokens", "100000000000000", "--backend", "torch", "--device", "cpu"], "too large for this machine's memory"),
    (["--tokens", "4611686018427387904", "--backend", "torch", "--device", "cpu"], "too large for this machine's"),
    (["--tokens", "100000000000000000000"], "argument --tokens: expected a positive integer below 2**63"),
], ids=["k_above_E", "no_tokens", "seed_overflow", "bad_device", "cutlass_on_cpu", "too_large", "storage_overflow",
        "tokens_overflow"])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        selfcheck.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and message in err[-1] and "Traceback" not in "\n".join(err), err


def test_without_triton_the_check_runs_the_other_backends_and_says_why_not_triton():
    """A machine without Triton (macOS, Windows, a CPU-only install): the table, triton's row skipped with the reason,
    exit 0; not an ImportError (reading the interpreter flag once imported the Triton config)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['triton'] = None\n"  # as if not installed: `import triton` raises ImportError
            "from scattermoe.__main__ import main\n"
            "sys.exit(main(['--tokens', '8', '--hidden', '8', '--ffn', '8', '--experts', '2', '--top-k', '1']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped: triton is not installed" in proc.stdout
    assert any(line.startswith("torch ") and line.endswith("pass") for line in proc.stdout.splitlines())


def test_the_command_runs_triton_in_the_interpreter_without_the_variable_set():
    """`python -m scattermoe` as the README gives it, on a machine without a GPU and without TRITON_INTERPRET: the
    package's import has already imported Triton's language (compiled mode), so the command runs itself again with
    the variable set first. Before, the triton row failed ("Cannot call @triton.jit'd outside of the scope of a
    kernel") and the command exited 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with CUDA the command runs the compiled kernels on the GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "scattermoe", *SMALL], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert any(line.startswith("triton ") and line.endswith("pass") for line in proc.stdout.splitlines()), proc.stdout
