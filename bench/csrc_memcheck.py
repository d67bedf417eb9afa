"""Every csrc kernel once on small, awkward shapes: the workload that gpu_check.sh runs under
``compute-sanitizer --tool memcheck`` (issue 3). Also a quick correctness check of its own, so a
run that is clean under memcheck but wrong still fails.

    compute-sanitizer --tool memcheck --error-exitcode 99 python -m bench.csrc_memcheck

Exit status 0: every kernel ran and matched float64 within the bf16 tolerance.
``--build-only`` prints the path of the extension module, for gpu_check.sh to export as
SCATTERMOE_CSRC_MODULE: the one in third_party/csrc-prebuilt/ when it was built for these sources
and this Python (bench/prepare_gpu_carry.sh, run off the GPU machine), else a build into
build/csrc-cache (cached by source hash).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

import reference


def _routing(counts, device):
    sorted_expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    g = torch.Generator().manual_seed(0)
    scattered = torch.randperm(int(sum(counts)), generator=g)
    return sorted_expert.to(device), scattered.to(device), torch.tensor(counts).cumsum(0).to(device)


class _Progress(dict):
    """The results, each said as it lands (its error needed the device's result, so the kernel finished): if a
    kernel never finishes, the log names the last case before it."""

    def __setitem__(self, name, err):
        super().__setitem__(name, err)
        print(f"csrc_memcheck: finished {name}", flush=True)


def _rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return float("inf") if torch.isnan(out).any() else ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where bench/prepare_gpu_carry.sh leaves modules compiled off the GPU machine.
PREBUILT = os.environ.get("SCATTERMOE_CSRC_PREBUILT", os.path.join(REPO, "third_party", "csrc-prebuilt"))


def build() -> int:
    """Build (or find cached) scattermoe._C; print its path. Nothing else goes to stdout."""
    spec = importlib.util.spec_from_file_location("scattermoe_csrc_build", os.path.join(REPO, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = module.missing_tools()
    if missing:
        print("csrc: cannot build: " + "; ".join(missing), file=sys.stderr)
        return 1
    prebuilt = module.prebuilt_module(PREBUILT)
    if prebuilt:  # built off the GPU machine for these very sources (bench/prepare_gpu_carry.sh)
        print(f"csrc: using the prebuilt {prebuilt}", file=sys.stderr)
        print(prebuilt)
        return 0
    info = module.cached_build(os.path.join(REPO, "build", "csrc-cache"), verbose=False)
    print(os.path.join(REPO, info["module"]))  # a cache written by a build run from the repo root is relative
    return 0


def main() -> int:
    if "--build-only" in sys.argv[1:]:
        return build()
    if not torch.cuda.is_available():
        print("csrc_memcheck: needs a CUDA device (an H100/H200); torch.cuda.is_available() is False")
        return 2
    from scattermoe.backends import cutlass

    reason = cutlass.unsupported_reason(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    if reason is not None:
        print(f"csrc_memcheck: the cutlass backend cannot run here: {reason}")
        return 2
    cutlass.set_strict(True)  # a silent fallback to Triton would check nothing
    dev, dt, k = "cuda", torch.bfloat16, 2
    counts = [70, 0, 131, 9]  # an empty expert, rows off the 128-row tile
    n = sum(counts)
    sorted_expert, scattered, offsets = _routing(counts, dev)
    g = torch.Generator().manual_seed(1)
    x_tok = torch.randn(n // k, 72, generator=g).to(dev, dt)              # K = 72: not a multiple of 64
    w = (torch.randn(len(counts), 200, 72, generator=g) / 8).to(dev, dt).permute(0, 2, 1)  # F = 200
    w_glu = (torch.randn(len(counts), 2 * 40, 72, generator=g) / 8).to(dev, dt).permute(0, 2, 1)
    b = torch.randn(len(counts), 200, generator=g).to(dev, dt)
    gates = torch.rand(n // k, k, generator=g).to(dev)
    rows = scattered.cpu() // k
    results = _Progress()

    # Scatter GEMM: gathered in, scattered out, gated, with bias.
    y = cutlass.scatter2scatter(x_tok, w, b, scattered, offsets, k, False, False, row_scale=gates)
    ref = (x_tok.double().cpu()[rows].unsqueeze(1) @ w.double().cpu()[sorted_expert.cpu()]).squeeze(1)
    ref = (ref + b.double().cpu()[sorted_expert.cpu()]) * gates.double().cpu().reshape(-1)[scattered.cpu()][:, None]
    want = torch.empty_like(ref)
    want[scattered.cpu()] = ref
    results["scatter_gemm (gather, scatter, gates, bias)"] = _rel(y, want)
    with cutlass.persistent(2):  # the persistent kernel on 2 CTAs: each loops over several tiles
        y = cutlass.scatter2scatter(x_tok, w, b, scattered, offsets, k, False, False, row_scale=gates)
    results["scatter_gemm, persistent (gather, scatter, gates, bias)"] = _rel(y, want)
    with cutlass.weight_tma(True):  # W by TMA: boxes past F (200 = 128 + 72) and K (72) are zero-filled by TMA
        y = cutlass.scatter2scatter(x_tok, w, b, scattered, offsets, k, False, False, row_scale=gates)
        results["scatter_gemm, W by TMA (gather, scatter, gates, bias)"] = _rel(y, want)
        with cutlass.persistent(2):
            y = cutlass.scatter2scatter(x_tok, w, b, scattered, offsets, k, False, False, row_scale=gates)
        results["scatter_gemm, persistent, W by TMA (gather, scatter, gates, bias)"] = _rel(y, want)

    # Scatter GEMM with the GLU epilogue and the kept pre-activation, grouped out.
    pre = torch.empty(n, 80, device=dev, dtype=dt)
    y = cutlass.scatter2scatter(x_tok, w_glu, None, scattered, offsets, k, False, True, glu=1, pre_activation=pre)
    h = (x_tok.double().cpu()[rows].unsqueeze(1) @ w_glu.double().cpu()[sorted_expert.cpu()]).squeeze(1)
    results["scatter_gemm (GLU)"] = _rel(y, reference.glu(h, torch.nn.functional.silu, True))
    results["scatter_gemm (GLU pre-activation)"] = _rel(pre, h)
    pre_persistent = torch.empty_like(pre)
    with cutlass.persistent(True):  # one CTA per SM: here 6 CTAs, 2 of them with only tiles past the last row
        y = cutlass.scatter2scatter(x_tok, w_glu, None, scattered, offsets, k, False, True, glu=1,
                                    pre_activation=pre_persistent)
    results["scatter_gemm, persistent (GLU)"] = _rel(y, reference.glu(h, torch.nn.functional.silu, True))
    results["scatter_gemm, persistent (GLU pre-activation)"] = _rel(pre_persistent, h)
    with cutlass.weight_tma(True):  # F = 40: each tile's first-half box reads second-half columns past F
        y = cutlass.scatter2scatter(x_tok, w_glu, None, scattered, offsets, k, False, True, glu=1)
    results["scatter_gemm, W by TMA (GLU)"] = _rel(y, reference.glu(h, torch.nn.functional.silu, True))

    # TMA grouped GEMM: grouped in and out, ungated.
    x_rows = torch.randn(n, 72, generator=g).to(dev, dt)
    y = cutlass.scatter2scatter(x_rows, w, b, scattered, offsets, 1, True, True)
    ref = reference.parallel_linear(x_rows.double().cpu(), w.double().cpu(), 1, sorted_expert.cpu(), scattered.cpu(),
                                    offsets.cpu(), b.double().cpu(), None, True, True)
    results["grouped_gemm"] = _rel(y, ref)

    # dW: x gathered from tokens, dy grouped; dW strided like the weight (k-major).
    dy = torch.randn(n, 200, generator=g).to(dev, dt)
    dw, _ = cutlass.group_bwd_w(x_tok, dy, scattered, offsets, w, k, 1, False, True)
    ref = torch.zeros(len(counts), 72, 200, dtype=torch.float64)  # small: the [N, K, F] outer products fit
    ref.index_add_(0, sorted_expert.cpu(), x_tok.double().cpu()[rows].unsqueeze(2) * dy.double().cpu().unsqueeze(1))
    results["group_bwd_w"] = _rel(dw, ref)

    # Gated dW and db (the row scale applied to dY rows once they land, their column sums), x gathered, dy
    # gathered from tokens.
    dy_tok = torch.randn(n // k, 200, generator=g).to(dev, dt)
    gates_flat = gates.reshape(-1)
    dw, db = cutlass.group_bwd_w(x_tok, dy_tok, scattered, offsets, w, k, k, False, False, gates_flat, True)
    scaled = dy_tok.double().cpu()[rows] * gates_flat.double().cpu()[scattered.cpu()].unsqueeze(1)
    ref = torch.zeros(len(counts), 72, 200, dtype=torch.float64)
    ref.index_add_(0, sorted_expert.cpu(), x_tok.double().cpu()[rows].unsqueeze(2) * scaled.unsqueeze(1))
    results["group_bwd_w (row scale)"] = _rel(dw, ref)
    results["group_bwd_w (db)"] = _rel(db, torch.zeros(len(counts), 200, dtype=torch.float64).index_add_(
        0, sorted_expert.cpu(), scaled))

    # The GLU backward pass: rows of 2F = 80 (F not a multiple of 8 would take the element path; 40 is).
    dg = torch.randn(n, 40, generator=g).to(dev, dt)
    scale = torch.rand(n, generator=g).to(dev)
    dh, gs, dot = cutlass.glu_backward(pre, dg, True, scale, True, True)
    h64 = pre.double().cpu().requires_grad_()
    glu = reference.glu(h64, torch.nn.functional.silu, True)
    (dh_ref,) = torch.autograd.grad(glu, h64, dg.double().cpu() * scale.double().cpu()[:, None])
    results["glu_backward (dH)"] = _rel(dh, dh_ref)
    results["glu_backward (s * G)"] = _rel(gs, glu.detach() * scale.double().cpu()[:, None])
    results["glu_backward (<dG, G>)"] = _rel(dot, (dg.double().cpu() * glu.detach()).sum(-1))

    torch.cuda.synchronize()
    failed = [name for name, err in results.items() if not err < 2e-2]
    for name, err in results.items():
        print(f"csrc_memcheck: {name}: rel err {err:.2e}{'  FAILED' if name in failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
