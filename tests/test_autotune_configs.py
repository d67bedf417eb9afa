"""Every config of the GPU autotune space computes the right result, not only the default one.

The GPU tests pin each kernel's default config (conftest: SCATTERMOE_AUTOTUNE=0), and the CPU tests
run the interpreter's one small config, so without this file the other configs the autotuner may
pick on an H100 (the decode tiles among them) would meet a correctness check only in the
benchmark. Each config is forced onto its kernel in turn and the launcher is checked against the
float64 reference at shapes that are not multiples of any block (so every mask matters), with an
empty expert and k=2. Interpreter (float32) on the CPU; compiled, in float16, on a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import TOL, assert_close, make_expert_idxs

import reference
import scattermoe
from scattermoe.backends import triton as triton_backend
from scattermoe.backends.triton import config as config_mod

# The modules, not the launchers of the same names that the package exports.
s2s_module = importlib.import_module("scattermoe.backends.triton.scatter2scatter")
gbw_module = importlib.import_module("scattermoe.backends.triton.group_bwd_w")

KERNELS = {  # "<kernel>_fp32": the autotuner the launchers send float32 operands to
    **{name: (lambda name=name: s2s_module._KERNELS[name]) for name in s2s_module._KERNELS},
    "group_bwd_w": lambda: gbw_module._group_bwd_w_kernel,
    "group_bwd_w" + config_mod.FP32: lambda: gbw_module._group_bwd_w_fp32_kernel,
}
# (kernel, config, input precision): the float32 configs under each precision they are tuned for (the 16-bit ones
# launch ieee).
CASES = [(kernel, cfg, precision) for kernel in KERNELS for cfg in config_mod.gpu_space(kernel)
         for precision in config_mod.space_precisions(kernel)[cfg]]
TF32_TOL = 5e-4  # DESIGN.md section 5
T, E, K, D, F = 37, 5, 2, 40, 72  # N = 74 routed rows; expert 4 gets none


@pytest.fixture
def device_dtype(request):
    """float32 for the float32 autotuners, float16 for the others (under the interpreter too: the launchers pick the
    autotuner by dtype, so a float32 run would not reach the config forced on a 16-bit one)."""
    kernel = request.node.callspec.params["kernel"]
    dtype = torch.float32 if kernel.endswith(config_mod.FP32) else torch.float16
    if torch.cuda.is_available():
        return "cuda", dtype
    if not config_mod.INTERPRET:
        pytest.skip("needs a GPU or the Triton interpreter (TRITON_INTERPRET=1)")
    return "cpu", dtype


@pytest.fixture
def forced(monkeypatch):
    """force(kernel, cfg): that autotuned kernel runs exactly cfg (no tuning, no cached choice)."""
    def force(kernel: str, cfg: tuple) -> None:
        monkeypatch.setattr(KERNELS[kernel](), "configs", [config_mod.make_config(cfg)])
        for other in KERNELS:  # and the launch must reach it (the launchers pick by layout and dtype)
            if other != kernel:
                monkeypatch.setattr(KERNELS[other](), "run",
                                    lambda *a, other=other, **kw: pytest.fail(f"launched {other}, not {kernel}"))
    return force


def _routing(device):
    idx = make_expert_idxs(T, E, K, "random", device=device)
    return scattermoe.flatten_sort_count(idx, num_experts=E)


@pytest.mark.parametrize("kernel,cfg,precision", CASES,
                         ids=[f"{k}-{'x'.join(map(str, c))}-{p}" for k, c, p in CASES])
def test_every_autotune_config_matches_the_reference(kernel, cfg, precision, forced, device_dtype, monkeypatch):
    device, dtype = device_dtype
    torch.manual_seed(hash(cfg) % 2**31)
    forced(kernel, cfg)
    monkeypatch.setattr(config_mod, "ALLOW_TF32", precision == "tf32")  # (read per launch)
    sorted_expert, scattered, offsets = _routing(device)
    x = torch.randn(T, D, device=device, dtype=dtype)
    tol = TF32_TOL if precision == "tf32" else TOL[dtype]
    if kernel.removesuffix(config_mod.FP32) == "scatter2scatter":  # tokens gathered, gate-scaled, scattered, with bias
        w = (torch.randn(E, D, F, device=device) / D**0.5).to(dtype)
        b = torch.randn(E, F, device=device, dtype=dtype)
        gates = torch.rand(T * K, device=device)
        out = torch.full((T * K, F), float("nan"), device=device, dtype=dtype)
        y = triton_backend.scatter2scatter(x, w, b, scattered, offsets, K, False, False, row_scale=gates, out=out)
        ref = reference.parallel_linear(x.double().cpu(), w.double().cpu(), K, sorted_expert.cpu(), scattered.cpu(),
                                        offsets.cpu(), b.double().cpu(), None, False, False)
        assert_close(y, ref * gates.double().cpu()[:, None], tol, "y")
    elif kernel.startswith("scatter2scatter_glu"):  # the fused first MoE GEMM, pre-activation kept
        paired = kernel.startswith("scatter2scatter_glu_paired")
        # The launcher sends a K-major W (the layers' [E, 2F, D] weight, permuted) to the paired kernel and an
        # F-major one to the two-accumulator kernel.
        w = (torch.randn(E, D, 2 * F, device=device) / D**0.5).to(dtype)
        if paired:
            w = w.transpose(1, 2).contiguous().transpose(1, 2)
        pre = torch.full((T * K, 2 * F), float("nan"), device=device, dtype=dtype)
        g = triton_backend.scatter2scatter(x, w, None, scattered, offsets, K, False, True, glu=1, pre_activation=pre)
        h = reference.parallel_linear(x.double().cpu(), w.double().cpu(), K, sorted_expert.cpu(), scattered.cpu(),
                                      offsets.cpu(), None, None, False, True)
        assert_close(pre, h, tol, "pre-activation")
        assert_close(g, reference.glu(h, torch.nn.functional.silu, True), tol, "glu")
        # The other order, with bias, an odd width (the last paired tile half full) and no pre-activation.
        f_odd = 37
        w = (torch.randn(E, D, 2 * f_odd, device=device) / D**0.5).to(dtype)
        if paired:
            w = w.transpose(1, 2).contiguous().transpose(1, 2)
        b = torch.randn(E, 2 * f_odd, device=device, dtype=dtype)
        g = triton_backend.scatter2scatter(x, w, b, scattered, offsets, K, False, True, glu=2)
        h = reference.parallel_linear(x.double().cpu(), w.double().cpu(), K, sorted_expert.cpu(), scattered.cpu(),
                                      offsets.cpu(), b.double().cpu(), None, False, True)
        assert_close(g, reference.glu(h, torch.nn.functional.silu, False), tol, "glu, second order, bias")
    else:  # dW of the first GEMM: tokens gathered, dY grouped, with db
        dy = torch.randn(T * K, F, device=device, dtype=dtype)
        like = torch.empty(E, D, F, device=device, dtype=dtype)
        dw, db = triton_backend.group_bwd_w(x, dy, scattered, offsets, like, K, 1, False, True, None, True)
        xs = x.double().cpu()[scattered.cpu() // K]
        want_dw = torch.zeros(E, D, F, dtype=torch.float64)
        want_db = torch.zeros(E, F, dtype=torch.float64)
        for e in range(E):
            rows = (sorted_expert.cpu() == e).nonzero().view(-1)
            want_dw[e] = xs[rows].t() @ dy.double().cpu()[rows]
            want_db[e] = dy.double().cpu()[rows].sum(0)
        assert_close(dw, want_dw, tol, "dW")
        assert_close(db, want_db, tol, "db")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_the_autotune_keys_hold_what_changes_the_compiled_kernel(kernel):
    """Beside the sizes, the input precision and the int64 column offsets: each compiles to another kernel, with
    other registers and shared memory, so a tuning under one must not be reused under the other."""
    assert {"K_IN", "N_OUT", "M_BUCKET", "INPUT_PRECISION", "INT64_COLS"} <= set(KERNELS[kernel]().keys)


def test_decode_configs_are_pruned_above_the_decode_row_count():
    configs = [config_mod.make_config(c) for c in config_mod.gpu_space("scatter2scatter")]
    decode = [c for c in configs if config_mod.is_decode_config(config_mod._as_tuple(c))]
    assert decode, "the scatter2scatter space has decode configs"
    small = config_mod.prune_by_rows(configs, {"M_BUCKET": 2})
    large = config_mod.prune_by_rows(configs, {"M_BUCKET": 32768})
    assert small == configs
    # the edge: M_BUCKET is a power-of-two bucket, so the next one up is the first without decode configs
    assert config_mod.prune_by_rows(configs, {"M_BUCKET": config_mod.DECODE_MAX_ROWS}) == configs
    assert config_mod.prune_by_rows(configs, {"M_BUCKET": 2 * config_mod.DECODE_MAX_ROWS}) == large
    assert large and not any(c in large for c in decode) and len(large) == len(configs) - len(decode)
    assert config_mod.prune_by_rows(decode, {"M_BUCKET": 32768}) == decode  # never an empty space


def test_autotune_off_pins_each_kernels_default_config(monkeypatch):
    """SCATTERMOE_AUTOTUNE=0 (what the GPU tests run) pins the default, the first config of each space; on, the
    whole GPU space is tuned over; the interpreter runs one config whatever the switch."""
    monkeypatch.setattr(config_mod, "INTERPRET", False)
    for kernel in KERNELS:
        space = config_mod.gpu_space(kernel)
        monkeypatch.setattr(config_mod, "AUTOTUNE", False)
        assert [config_mod._as_tuple(c) for c in config_mod.autotune_configs(kernel)] == space[:1], kernel
        monkeypatch.setattr(config_mod, "AUTOTUNE", True)
        assert [config_mod._as_tuple(c) for c in config_mod.autotune_configs(kernel)] == space, kernel
    monkeypatch.setattr(config_mod, "INTERPRET", True)
    assert len(config_mod.autotune_configs("scatter2scatter")) == 1


@pytest.mark.parametrize("kernel", ["scatter2scatter" + config_mod.FP32, "group_bwd_w" + config_mod.FP32])
def test_tuning_is_not_reused_across_input_precisions(kernel, monkeypatch):
    """A config tuned under IEEE float32 must not be reused after ALLOW_TF32=True (or back): the two compile to
    different kernels (tf32 stages its operands differently in shared memory), so one can run out of resources where
    the other fits. Here the first config is made to fail under tf32 (as an OutOfResources config times inf)."""
    if torch.cuda.is_available():
        device = "cuda"
    elif config_mod.INTERPRET:
        device = "cpu"
    else:
        pytest.skip("needs a GPU or the Triton interpreter (TRITON_INTERPRET=1)")
    fits_ieee_only, fits_both = (32, 32, 32, 4, 1), (16, 32, 32, 4, 1)
    autotuner = KERNELS[kernel]()
    monkeypatch.setattr(autotuner, "configs", [config_mod.make_config(c) for c in (fits_ieee_only, fits_both)])
    monkeypatch.setattr(autotuner, "cache", {})
    timed = []

    def bench(*args, config, **meta):
        timed.append(meta["INPUT_PRECISION"])
        if config_mod._as_tuple(config) == fits_ieee_only:
            return [float("inf")] * 3 if meta["INPUT_PRECISION"] == "tf32" else [1.0] * 3
        return [2.0] * 3
    monkeypatch.setattr(autotuner, "_bench", bench)
    monkeypatch.setattr(config_mod, "ALLOW_TF32", False)
    sorted_expert, scattered, offsets = _routing(device)
    x = torch.randn(T, D, device=device)
    w = torch.randn(E, D, F, device=device) / D**0.5
    dy = torch.randn(T * K, F, device=device)

    def launch():
        if kernel.startswith("scatter2scatter"):
            return triton_backend.scatter2scatter(x, w, None, scattered, offsets, K, False, True)
        return triton_backend.group_bwd_w(x, dy, scattered, offsets, w, K, 1, False, True)[0]
    launch()
    assert config_mod._as_tuple(autotuner.best_config) == fits_ieee_only
    monkeypatch.setattr(config_mod, "ALLOW_TF32", True)
    launch()
    assert timed == ["ieee"] * 2 + ["tf32"] * 2, "the tf32 launch was not tuned apart"
    assert config_mod._as_tuple(autotuner.best_config) == fits_both


def test_float32_configs_are_pruned_to_the_launch_precision():
    """A config tagged tf32-only (it spills under ieee: tests/test_aot_sm90.py) is never tuned for an ieee launch; the
    16-bit spaces are pruned by rows only, as before."""
    for kernel in ("scatter2scatter", "group_bwd_w"):
        space = config_mod.gpu_space(kernel + config_mod.FP32)
        configs = [config_mod.make_config(c) for c in space]
        prune = config_mod.pruner(kernel + config_mod.FP32)
        tf32_only = [c for c, p in config_mod.space_precisions(kernel + config_mod.FP32).items() if p == ("tf32",)]
        assert tf32_only, kernel
        ieee = [config_mod._as_tuple(c) for c in prune(configs, {"M_BUCKET": 2}, INPUT_PRECISION="ieee")]
        tf32 = [config_mod._as_tuple(c) for c in prune(configs, {"M_BUCKET": 2}, INPUT_PRECISION="tf32")]
        assert ieee == [c for c in space if c not in tf32_only] and tf32 == space, kernel
        sixteen = [config_mod.make_config(c) for c in config_mod.gpu_space(kernel)]
        assert config_mod.pruner(kernel)(sixteen, {"M_BUCKET": 32768}, INPUT_PRECISION="ieee") == \
            config_mod.prune_by_rows(sixteen, {"M_BUCKET": 32768}), kernel
