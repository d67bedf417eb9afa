"""Helpers shared by the test modules (imported as ``from helpers import ...``; conftest puts tests/ on sys.path).

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D input features, F output features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

# DESIGN.md section 5: ||out - ref|| / ||ref|| against a float64 reference computed from the same inputs.
# float32 is IEEE (no TF32). The half-precision bounds are a small multiple of the rounding error of one
# half-precision store (2^-11 for fp16, 2^-8 for bf16): the kernels accumulate in fp32 and round once or
# twice per output (forward, then the gate scale or the dX GEMM's output in backward).
TOL = {
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}

# The CPU tests run the Triton kernels under the interpreter, whose bf16 tl.dot is broken upstream
# (triton-lang/triton#11584; the backend refuses bf16 there), so the CPU dtypes are these two.
CPU_DTYPES = (torch.float32, torch.float16)


def _diff_summary(out64: torch.Tensor, ref64: torch.Tensor) -> str:
    diff = (out64 - ref64).abs()
    if diff.numel() == 0:
        return "empty"
    return f"max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}"


def per_expert_wgrad(xs: torch.Tensor, dys: torch.Tensor, sorted_expert: torch.Tensor, num_experts: int
                     ) -> torch.Tensor:
    """[E, K, F] float64: sum over expert e's rows of xs[r]^T dys[r] (rows in expert order; zeros for an
    expert with none), expert by expert (no [N, K, F] outer products)."""
    out = torch.zeros(num_experts, xs.size(1), dys.size(1), dtype=torch.float64)
    for e in sorted_expert.unique().tolist():
        idx = (sorted_expert == e).nonzero().view(-1)
        out[e] = xs.double()[idx].t() @ dys.double()[idx]
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is exactly zero).

    Fails (AssertionError) on a shape mismatch and on any NaN or inf in ``out``: NaN never passes.
    """
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    ref64 = ref.detach().to(device="cpu", dtype=torch.float64)
    assert torch.isfinite(ref64).all(), f"{name}: the reference itself is not finite"
    bad = (~torch.isfinite(out64)).sum().item()
    assert bad == 0, f"{name}: {bad} non-finite (NaN/inf) elements in the output"
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    return num / den if den > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """rel_err(out, ref) <= tol, with max and mean absolute differences in the failure message."""
    err = rel_err(out, ref, name)
    summary = _diff_summary(out.detach().double().cpu(), ref.detach().double().cpu())
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({summary})"


def assert_all_close(names: Sequence[str], outs: Iterable[torch.Tensor], refs: Iterable[torch.Tensor],
                     tol: float) -> None:
    """assert_close over parallel lists; reports every failing name at once."""
    failures = []
    for name, out, ref in zip(names, outs, refs, strict=True):
        try:
            assert_close(out, ref, tol, name)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


def float64_leaves(tensors: Sequence[torch.Tensor]) -> list:
    """Detached float64 copies (on the CPU) that require grad: the reference's inputs."""
    return [t.detach().to(device="cpu", dtype=torch.float64).requires_grad_() for t in tensors]


def make_expert_idxs(T: int, E: int, K: int, case: str = "random", device="cpu") -> torch.Tensor:
    """[T, K] int64 expert ids for a named routing case (uses the global torch RNG, seeded per test).

    random:     K distinct experts per token, drawn from the first E-1 experts when E > K, so the last
                expert gets zero tokens;
    all_on_one: every token's first slot on the middle expert E // 2 (with K=1: all tokens on one
                expert, empty experts on both sides of it);
    same_set:   every token picks the same K experts, in a per-token random order (duplicate experts
                across tokens; with T > 32 an expert spans more than one 32-row tile);
    repeat:     every slot of a token on the same expert (a token routed K times to one expert; allowed
                by the API even though top-k never produces it).
    """
    if case == "random":
        pool = E - 1 if E > K else E
        idx = torch.stack([torch.randperm(pool)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    elif case == "all_on_one":
        middle = E // 2
        others = [e for e in range(E) if e != middle]
        rows = []
        for _ in range(T):
            rest = [others[i] for i in torch.randperm(len(others))[: K - 1].tolist()]
            rows.append([middle] + rest)
        idx = torch.tensor(rows).view(T, K)
    elif case == "same_set":
        chosen = torch.randperm(E)[:K]
        idx = torch.stack([chosen[torch.randperm(K)] for _ in range(T)])
    elif case == "repeat":
        idx = torch.randint(0, E, (T, 1)).expand(T, K).contiguous()
    else:
        raise ValueError(f"unknown routing case {case!r}")
    return idx.to(device=device, dtype=torch.long)


def load_an_expert_weight_wrongly(monkeypatch) -> None:
    """From here on jetmoe's checkpoint loader scales layer 0's MoE output weights by 1.5 after loading: a
    model that a check against transformers must tell apart."""
    import jetmoe.checkpoint as ck

    real = ck.load_pretrained

    def wrong(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.output_linear.weight.mul_(1.5)
        return model

    monkeypatch.setattr(ck, "load_pretrained", wrong)


def write_kernel_result(folder: Path, name: str, created: str, ms: dict, smoke: bool = False) -> Path:
    """A kernel-suite result file with one jetmoe_moe_fwd_bwd row at T=16384 per implementation (ms: impl -> ms),
    as the README's performance section reads them."""
    rows = [{"case": "jetmoe_moe_fwd_bwd", "tokens": 16384, "routing": "uniform", "dtype": "bfloat16", "impl": impl,
             "ms": v, "tflops": 6.8e12 / v / 1e9, "peak_mem_gb": 10.0} for impl, v in ms.items()]
    payload = {"benchmark": "kernels", "smoke_only": smoke, "device": "NVIDIA H100 80GB HBM3", "commit": "a" * 40,
               "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "created": created, "rows": rows,
               "checks": {}, "limits": None, "elapsed_s": 60.0}  # a finished run
    path = folder / name
    path.write_text(json.dumps(payload))
    return path
