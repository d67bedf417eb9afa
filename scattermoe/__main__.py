"""``python -m scattermoe``: run a GLU MoE layer on every backend that works here and check it.

A GLUMLP (SiLU GLU; small on the CPU, one JetMoE-8B layer on CUDA) is routed by a
random top-k router; forward and backward run on each backend that can run on this
machine, and the output and every gradient (x, both expert weights, the gates) are
compared with the same layer run by the torch backend (the pure-PyTorch reference)
in float64. The error is ``||out - ref|| / ||ref||`` against the per-dtype bound (float32
1e-5, float16 3e-3, bfloat16 2e-2: the bounds the test suite uses). In float16 and bfloat16,
where a small or cancelling shape's rounding exceeds the bound in every backend alike, a
kernel backend's bound on a tensor rises to twice the torch backend's error on it (the torch
backend's, to twice the smallest other), at most 10x (``_bounds``).

On the CPU the Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``
is set here, before the kernel modules are imported): a correctness check, not a
speed one, so no timings are printed on the CPU.

Exit status: 0 if every backend that ran passed, 1 if one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time
import traceback
from typing import Dict, List, Optional

PROG = "python -m scattermoe"
# The test suite's bounds on ||out - ref|| / ||ref|| (float32 is IEEE, no TF32).
TOLERANCES = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}
# Shapes: (tokens, hidden, ffn, experts, top_k).
CPU_DEFAULT = (64, 64, 128, 8, 2)  # small: the Triton interpreter runs every program in Python
CUDA_DEFAULT = (4096, 2048, 5632, 8, 2)  # one JetMoE-8B MoE layer at 4096 tokens
GRADS = ("x", "w_in", "w_out", "gates")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2; no usage dump
        _die(message)


def _die(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value < 2**63:  # a size torch takes (larger ones, too large for memory, are said so later)
        raise argparse.ArgumentTypeError(f"expected a positive integer below 2**63, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:  # what torch.Generator.manual_seed takes
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Run a GLU MoE layer forward and backward on every backend that works "
                                        "here and check it against the float64 reference.",
                epilog=f"defaults: CPU T,D,F,E,k = {CPU_DEFAULT} float32; "
                       f"CUDA {CUDA_DEFAULT} bfloat16 (a JetMoE-8B MoE layer).")
    p.add_argument("--tokens", type=_positive_int, help="T, tokens in the batch")
    p.add_argument("--hidden", type=_positive_int, help="D, model (input and output) width")
    p.add_argument("--ffn", type=_positive_int, help="F, expert hidden width (W1 has 2F rows: the GLU halves)")
    p.add_argument("--experts", type=_positive_int, help="E, number of experts")
    p.add_argument("--top-k", type=_positive_int, help="k, experts per token")
    p.add_argument("--dtype", choices=sorted(TOLERANCES), help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--device", help="cpu or cuda[:N]; CUDA when available by default")
    p.add_argument("--backend", choices=("all", "torch", "triton", "cutlass"), default="all",
                   help="check one backend (an error if it cannot run here) or all that can (default)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    return p.parse_args(argv)


def _rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    err = err / denom if denom > 0 else err
    return err if err == err else float("inf")  # NaN never passes


def _run_layer(model, x, gates, idx, dy, backend: str) -> Dict[str, object]:
    """Forward + backward of ``model`` on ``backend``; returns the output and the four grads."""
    import scattermoe

    x = x.detach().clone().requires_grad_()
    gates = gates.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    with scattermoe.use_backend(backend):
        y = model(x, gates, idx)
        y.backward(dy)
    return {"out": y.detach(), "x": x.grad, "w_in": model.experts.weight.grad,
            "w_out": model.output_experts.weight.grad, "gates": gates.grad}


def _time_cuda_ms(model, x, gates, idx, dy, backend: str, repeats: int = 10) -> float:
    import torch

    for _ in range(3):  # warm-up: compile and autotune
        _run_layer(model, x, gates, idx, dy, backend)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        _run_layer(model, x, gates, idx, dy, backend)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def _rerun_with_interpreter() -> None:
    """Replace this process by `python -m scattermoe <same arguments>` with TRITON_INTERPRET=1 set before any
    import; returns only where that cannot be done (then the caller reports why Triton's row cannot run)."""
    if os.environ.get("_SCATTERMOE_SELFCHECK_RERUN"):  # once only: never a loop
        return
    env = dict(os.environ, TRITON_INTERPRET="1", _SCATTERMOE_SELFCHECK_RERUN="1")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "scattermoe", *sys.argv[1:]], env)
    except OSError:
        return


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    # TRITON_INTERPRET must be set before the kernel modules (scattermoe.backends.triton) are imported.
    # `python -m scattermoe` has imported the scattermoe package (and torch) before this file runs; that
    # is early enough only because scattermoe imports its kernels lazily, on the first Triton call.
    import torch

    has_cuda = torch.cuda.is_available()
    try:
        device = torch.device(args.device if args.device else ("cuda" if has_cuda else "cpu"))
    except RuntimeError:
        _die(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        _die(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda":
        if not has_cuda:
            _die(f"--device {args.device}: no CUDA device is available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _die(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    interpreter_problem = None
    if device.type == "cpu":
        from scattermoe.backends import interpreter_problem as find_interpreter_problem  # no kernels imported

        interpreter_problem = find_interpreter_problem() if importlib.util.find_spec("triton") else None
        if interpreter_problem is None:
            # Triton fixes interpreter mode as its functions are defined, and `python -m scattermoe` has imported the
            # package, whose probe of Triton (scattermoe.backends, at import) imports Triton's language: too late
            # to set the variable here. As a command, run again with it set first.
            late = "TRITON_INTERPRET" not in os.environ and (
                "triton.language" in sys.modules or "scattermoe.backends.triton" in sys.modules)
            if late and argv is None:
                _rerun_with_interpreter()
            if late:
                interpreter_problem = "Triton was imported before TRITON_INTERPRET=1 could be set (set it first)"
            os.environ.setdefault("TRITON_INTERPRET", "1")

    import scattermoe

    defaults = CUDA_DEFAULT if device.type == "cuda" else CPU_DEFAULT
    T, D, F, E, K = (given if given is not None else default for given, default in
                     zip((args.tokens, args.hidden, args.ffn, args.experts, args.top_k), defaults))
    if K > E:
        _die(f"--top-k {K}: expected at most --experts ({E})")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    backends = ("torch", "triton", "cutlass") if args.backend == "all" else (args.backend,)

    # Inputs drawn on the CPU in float64, so a seed gives the same problem on any device.
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the layer's weight init
    try:
        x64 = torch.randn(T, D, generator=gen, dtype=torch.float64)
        router_DE = torch.randn(D, E, generator=gen, dtype=torch.float64) / D**0.5
        dy64 = torch.randn(T, D, generator=gen, dtype=torch.float64)
        # JetMoE's router: top-k of float32 logits, softmax over the k chosen.
        gates_TK, idx_TK = scattermoe.topk_gating((x64 @ router_DE).float(), K)
        ref_model = scattermoe.GLUMLP(D, F, E, K).to(device=device, dtype=torch.float64)
        x64, dy64, gates_TK, idx_TK = (t.to(device) for t in (x64, dy64, gates_TK, idx_TK))
        ref = _run_layer(ref_model, x64, gates_TK.double(), idx_TK, dy64, "torch")
    except (MemoryError, RuntimeError) as exc:  # RuntimeError: torch's allocators ("DefaultCPUAllocator: ...")
        if isinstance(exc, RuntimeError) and not any(
                word in str(exc).lower() for word in ("memory", "alloc", "storage size calculation overflowed")):
            raise
        _die(f"T={T}, D={D}, F={F}, E={E} is too large for this machine's memory "
             f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})")

    triton_version = "not installed"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    print(f"scattermoe {scattermoe.__version__} | torch {torch.__version__} | triton {triton_version} | "
          f"python {sys.version.split()[0]}")
    print(f"GLUMLP (SiLU GLU), forward + backward: T={T} tokens, D={D}, F={F}, E={E} experts, top-k={K}")
    print(f"reference: the torch backend in float64 on {device}; "
          "error = ||out - ref|| / ||ref|| per tensor, bound per dtype (float32 1e-5, float16 3e-3, bfloat16 2e-2)")
    if device.type == "cpu" and "triton" in backends and scattermoe.backends._triton_interpreting():
        print("Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1): correctness only, no timings")
        work, default_work = T * K * D * F, CPU_DEFAULT[0] * CPU_DEFAULT[4] * CPU_DEFAULT[1] * CPU_DEFAULT[2]
        if work > 8 * default_work:
            print(f"note: {work / default_work:.0f}x the default shape's work; the interpreter may take minutes",
                  file=sys.stderr)
    print()

    header = ["backend", "device", "dtype", "output"] + [f"grad {g}" for g in GRADS] + ["bound", "result"]
    if device.type == "cuda":
        header.insert(-1, "fwd+bwd ms")
    rows, failed, ran = [], False, 0
    tol = TOLERANCES[dtype_name]
    measured = {}  # backend -> (row, errors per tensor): verdicts come after every backend has run
    for name in backends:
        if name == "triton" and interpreter_problem is not None:
            if args.backend != "all":
                _die(f"--backend triton cannot run on the CPU here: {interpreter_problem}")
            rows.append([name, str(device), dtype_name, f"skipped: {interpreter_problem}"])
            continue
        print(f"[{name}] forward + backward ...", file=sys.stderr, flush=True)  # progress; the table is stdout
        started = time.perf_counter()
        model = scattermoe.GLUMLP(D, F, E, K).to(device=device, dtype=dtype)
        model.load_state_dict(ref_model.state_dict())  # same weights, cast to dtype
        x, dy, gates = x64.to(dtype), dy64.to(dtype), gates_TK.to(dtype)  # JetMoE casts gates to the model dtype
        try:
            got = _run_layer(model, x, gates, idx_TK, dy, name)
        except Exception as e:
            if isinstance(e, RuntimeError) and "cannot run here: " in str(e):
                # scattermoe's "scattermoe backend 'x' cannot run here: <reason>": not for this machine
                if args.backend != "all":
                    _die(f"--backend {name}: {e}")
                print(f"[{name}] skipped: it cannot run here (the table says why)", file=sys.stderr, flush=True)
                rows.append([name, str(device), dtype_name, f"skipped: {str(e).split('cannot run here: ', 1)[1]}"])
                continue
            sys.stdout.flush()
            traceback.print_exc()  # a bug, not a usage error: show it, go on with the other backends
            rows.append([name, str(device), dtype_name, "ERROR (traceback above)"])
            failed = True
            continue
        ran += 1
        print(f"[{name}] done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        row = [name, str(device), dtype_name]
        if device.type == "cuda":
            row.append(f"{_time_cuda_ms(model, x, gates, idx_TK, dy, name):.2f}")
        rows.append(row)
        measured[name] = (row, [_rel_err(got[key], ref[key]) for key in ("out",) + GRADS])

    notes, marked = [], False
    for name, (row, errs) in measured.items():
        # The kernel backends share code (ops.py; cutlass falls back to Triton in places): only the torch backend,
        # the reference in this dtype, vouches for them. The torch backend takes any other's.
        others = [e for other, (_, e) in measured.items() if other != name and (name == "torch" or other == "torch")]
        bounds = _bounds(tol, errs, others, dtype_name != "float32")
        ok = all(e <= b for e, b in zip(errs, bounds))
        failed |= not ok
        marked |= not ok
        timing = row[3:]
        cells = [f"{e:.1e}" + ("!" if e > b else "") for e, b in zip(errs, bounds)]  # ! marks what failed
        row[3:] = cells + [f"{tol:.0e}" + ("+" if max(bounds) > tol else "")] + timing + ["pass" if ok else "FAIL"]
        if max(bounds) > tol:
            notes.append(f"{name}: " + ", ".join(f"{label} {b:.1e}" for label, b in zip(header[3:], bounds) if b > tol))

    _print_table(header, rows)
    if notes:
        print(f"\nbound+: raised to twice the reference's error in this dtype (the torch backend's; for it, the "
              f"others') where that is above {tol:.0e} (the dtype's own rounding at this shape), at most 10x:\n  "
              + "\n  ".join(notes))
    if marked:
        print("\n!: above its bound")
    if device.type == "cuda":
        print("\nfwd+bwd ms: median of 10 after warm-up, routing included; indicative only, "
              "`python -m bench` is the real benchmark")
    if ran == 0 and not failed:
        print(f"\n{PROG}: no backend could run here", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _bounds(tol: float, errs: List[float], others: List[List[float]], half: bool) -> List[float]:
    """Per tensor: the dtype's bound, or in float16/bfloat16 twice the smallest error ``others`` show on it (for a
    kernel backend, the torch backend's), when larger, up to 10x the bound.

    At a small or cancelling shape (a few outputs, each a sum of many terms of both signs) half precision's
    rounding alone can exceed the bound, in every implementation alike (up to 8x in float16 at T <= 8, D <= 8,
    measured on the torch backend). As flash-attention's tests do, a kernel then passes within twice the error
    of the reference run in the same dtype. Where the reference is right, a wrong kernel still fails; the 10x
    cap keeps a bug in code every backend shares (the layer, the routing) from passing everywhere, and float32
    keeps its bound."""
    if not half or not others:
        return [tol] * len(errs)
    return [min(10 * tol, max(tol, 2 * min(other[i] for other in others))) for i in range(len(errs))]


def _print_table(header: List[str], rows: List[List[str]]) -> None:
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(r[i])) for r in [header] + full) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        if len(r) == len(header):
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        else:  # skipped or errored: the reason spans the error columns
            print("  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


if __name__ == "__main__":
    sys.exit(main())
