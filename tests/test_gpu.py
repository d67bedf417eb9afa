"""The main comparisons on CUDA: Triton compiled for the GPU, every dtype (bf16 included), larger shapes.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D input features, F output features;
B batch, L sequence length, H heads per expert, Dh head dim.
Skipped with a reason without CUDA (conftest). The oracle is the same float64 CPU reference as the CPU tests;
the checks are the CPU tests' own functions, so the two suites test the same things.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_close, make_expert_idxs
from test_layers import LAYERS, check_mlp_layer, check_moa
from test_parallel_linear import MODES, check_against_reference, check_poisoned_scatter2scatter
from torch.nn.attention import SDPBackend, sdpa_kernel

import reference
import scattermoe
from scattermoe.backends.triton import scatter2scatter

pytestmark = pytest.mark.gpu

GPU_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
              pytest.param(torch.float32, id="fp32")]

GPU_SHAPES = [
    # (T, E, K, D, F, routing case)
    pytest.param(1000, 8, 2, 256, 384, "random", id="T1000-E8-k2-empty_expert"),  # JetMoE's ratios; expert 7 empty
    pytest.param(1, 8, 2, 256, 384, "random", id="decode_T1"),                     # one token
    pytest.param(1000, 8, 1, 256, 384, "all_on_one", id="all_on_one-k1"),          # 1000 rows on expert 4: many
                                                                                   # row tiles of one expert
    pytest.param(777, 64, 8, 128, 200, "random", id="fine_grained-E64-k8"),        # F not a multiple of 64 or 128
    pytest.param(257, 5, 2, 100, 150, "same_set", id="unaligned_D100-F150"),       # D, F not multiples of 16
]
# Each dtype x flag x alignment specialisation compiles anew on the GPU (the suite's main cost there), so the
# shapes are few and each one adds something the others do not.


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T, E, K, D, F_, case", GPU_SHAPES)
def test_parallel_linear_cuda(T, E, K, D, F_, case, mode, bias, dtype, device):
    check_against_reference("triton", T, E, K, D, F_, case, mode, bias, dtype, device=device)


@pytest.mark.parametrize("mode", ["gated_from_tokens", "gated_from_grouped", "gated_from_slot_rows"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_parallel_linear_cuda_fp32_gates(mode, dtype, device):
    """JetMoE's float32 router gates beside a half-precision layer."""
    check_against_reference("triton", 1000, 8, 2, 256, 384, "random", mode, True, dtype, device=device,
                            gates_dtype=torch.float32)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_bias_and_scale", [False, True], ids=["plain", "bias_and_row_scale"])
@pytest.mark.parametrize("grouped_in, grouped_out", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("T, E, K, D, F_, case", GPU_SHAPES)
def test_scatter2scatter_cuda_poisoned_output(T, E, K, D, F_, case, grouped_in, grouped_out, with_bias_and_scale,
                                              dtype, device):
    check_poisoned_scatter2scatter(T, E, K, D, F_, case, grouped_in, grouped_out, with_bias_and_scale, dtype,
                                   device=device)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("glu", [1, 2], ids=["activate_first", "activate_second"])
def test_scatter2scatter_glu_cuda_poisoned_output(glu, dtype, device):
    """The GLU epilogue writes every element of the output and of the kept pre-activation."""
    T, E, K, D, F_ = 1000, 8, 2, 256, 384
    idx = make_expert_idxs(T, E, K, device=device)
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = scattermoe.flatten_sort_count(idx, E)
    x = torch.randn(T, D, device=device).to(dtype)
    w = (torch.randn(E, 2 * F_, D, device=device) / D**0.5).to(dtype).permute(0, 2, 1)
    out = torch.full((T * K, F_), float("nan"), device=device, dtype=dtype)
    pre = torch.full((T * K, 2 * F_), float("nan"), device=device, dtype=dtype)
    scatter2scatter(x, w, None, sorted_scattered_idxs, expert_offsets, K, False, True, out=out, glu=glu,
                    pre_activation=pre)
    assert not out.isnan().any() and not pre.isnan().any(), "kernel left poisoned elements unwritten"
    routing = [t.cpu() for t in (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)]
    h = reference.parallel_linear(x.double().cpu(), w.double().cpu(), K, *routing, None, None, False, True)
    assert_close(pre, h, TOL[dtype], "pre-activation")
    assert_close(out, reference.glu(h, F.silu, glu == 1), TOL[dtype], "glu output")


LAYER_SHAPES = [
    # (B, L, D, F, E, K, reference): the per-token loop for small T, the expert-loop reference for large T
    pytest.param(4, 250, 256, 384, 8, 2, False, id="T1000"),
    pytest.param(2, 7, 24, 40, 5, 2, True, id="small_odd"),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("B, L, D, F_, E, K, per_token", LAYER_SHAPES)
def test_mlp_layers_cuda(B, L, D, F_, E, K, per_token, layer_name, dtype, device):
    check_mlp_layer(layer_name, B, L, D, F_, E, K, True, "triton", dtype=dtype, device=device, per_token=per_token)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B, L, D, H, Dh, E, K", [
    pytest.param(2, 32, 128, 4, 32, 8, 2, id="B2-L32-E8-k2"),
    pytest.param(2, 6, 24, 2, 8, 5, 2, id="small_odd"),
])
def test_moa_cuda(B, L, D, H, Dh, E, K, dtype, device):
    # SDPA's math backend: the attention kernel is not under test, and the fused fp32 ones need not be IEEE.
    with sdpa_kernel([SDPBackend.MATH]):
        check_moa(B, L, D, H, Dh, E, K, True, "triton", dtype=dtype, device=device)


def test_auto_picks_triton_on_cuda(device):
    with scattermoe.use_backend("auto"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert scattermoe.backends.resolve(torch.empty(1, device=device, dtype=dtype)) == "triton"


@pytest.mark.parametrize("T, E, K", [(1, 8, 2), (100, 8, 2), (1024, 8, 2), (31, 64, 8), (1025, 8, 2), (4096, 128, 8)])
def test_flatten_sort_count_cuda(T, E, K, device, monkeypatch):
    # Few rows take the one-launch Triton counting sort, more take torch.sort; both give the reference's tensors.
    from scattermoe.backends.triton import routing as triton_routing

    launches = []
    real = triton_routing.sort_by_expert
    monkeypatch.setattr(triton_routing, "sort_by_expert", lambda *a: launches.append(1) or real(*a))
    idx = make_expert_idxs(T, E, K, "random")
    got = scattermoe.flatten_sort_count(idx.to(device), E)
    assert len(launches) == int(triton_routing.fused_routing_fits(T * K, E))
    for name, g, w in zip(("sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets"), got,
                          reference.flatten_sort_count(idx, E)):
        assert torch.equal(g.cpu(), w), f"{name} differs from the reference"
    with scattermoe.use_backend("torch"):
        scattermoe.flatten_sort_count(idx.to(device), E)
    assert len(launches) == int(triton_routing.fused_routing_fits(T * K, E)), "the torch backend must not launch Triton"


@pytest.mark.parametrize("T, bad", [(1, 8), (2048, -1)], ids=["fused_routing-id_E", "torch_sort-negative_id"])
def test_out_of_range_expert_id_stops_the_stream_without_debug_mode(T, bad):
    # Outside debug mode the ids are not read on the host; a device-side assert must stop the layer instead of
    # a silently wrong output (or a read past the weights). It poisons the CUDA context: a subprocess (two cases
    # only, each a fresh process; the CPU tests cover both kinds of bad id on both routings).
    import os
    import subprocess
    import sys

    code = f"""
import torch, scattermoe
layer = scattermoe.GLUMLP(64, 128, num_experts=8, top_k=2).cuda()
x = torch.randn({T}, 64, device="cuda")
gates = torch.full(({T}, 2), 0.5, device="cuda")
ids = torch.randint(0, 8, ({T}, 2), device="cuda")
y = layer(x, gates, ids)
torch.cuda.synchronize()
print("valid ids: ok", flush=True)
ids[{T} - 1, 1] = {bad}
y = layer(x, gates, ids)
torch.cuda.synchronize()
print("bad ids: no error", flush=True)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("SCATTERMOE_DEBUG", "SCATTERMOE_DEVICE_ASSERTS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "valid ids: ok" in result.stdout, result.stderr[-3000:]
    assert result.returncode != 0 and "bad ids: no error" not in result.stdout, result.stdout
    assert "device-side assert" in result.stderr or "expert ids must lie" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("T, E, K", [(1, 8, 2), (4096, 8, 2), (77, 128, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_topk_gating_cuda(T, E, K, dtype, device, monkeypatch):
    # Without a gradient, one Triton launch; with one, the differentiable torch path. Both as torch computes it.
    from scattermoe.backends.triton import routing as triton_routing

    launches = []
    real = triton_routing.topk_softmax
    monkeypatch.setattr(triton_routing, "topk_softmax", lambda *a: launches.append(1) or real(*a))
    logits = torch.randn(T, E, device=device).to(dtype)
    values = torch.topk(logits.float(), K, dim=-1).values
    with torch.no_grad():
        gates, idx = scattermoe.topk_gating(logits, K)
    assert launches == [1]
    assert torch.equal(logits.float().gather(1, idx), values)  # ties may be ordered differently
    torch.testing.assert_close(gates, torch.softmax(values, -1), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # leading dims [2, T, E]: the one launch on the rows, its results shaped back
        gates2, idx2 = scattermoe.topk_gating(torch.stack([logits, logits]), K)
    assert launches == [1, 1] and gates2.shape == idx2.shape == (2, T, K)
    assert torch.equal(idx2[1], idx) and torch.equal(gates2[1], gates)
    gates, idx = scattermoe.topk_gating(logits.requires_grad_(), K)
    assert launches == [1, 1] and gates.requires_grad, "a gradient must take the torch path"


def _decode_step(layer, x, logits):
    """A serving forward after the router's linear layer: one-launch top-k gating, the layer; no gradient.
    (The logits are an input: cuBLAS may pick another algorithm inside a capture, and the test compares bits.)"""
    gates, idx = scattermoe.topk_gating(logits, layer.top_k)
    return layer(x, gates.to(x.dtype), idx)


@pytest.mark.parametrize("T", [1, 16, 1100])  # 1100 x 2 rows x 8 experts: past the one-launch sort (torch.sort
                                               # and searchsorted inside the graph)
def test_decode_forward_replays_in_a_cuda_graph(T, device):
    """Serving stacks run decode as CUDA-graph replays (launch overhead would otherwise dominate at T=1). The
    routing and the layer must be capturable: no host sync, no allocation outside the graph's pool, and a
    replay on new inputs copied into the captured buffers must give the eager forward's output bit for bit
    (same kernels, same configs: the warm-up runs the autotuner before the capture)."""
    torch.manual_seed(0)
    D, F_, E, K = 256, 384, 8, 2
    layer = scattermoe.GLUMLP(D, F_, E, K, activate_first=True).to(device, torch.bfloat16)
    static_x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    static_logits = torch.randn(T, E, device=device)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graphs asks
            for _ in range(2):
                _decode_step(layer, static_x, static_logits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = _decode_step(layer, static_x, static_logits)
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            x, logits = torch.randn(T, D, generator=g).to(device, torch.bfloat16), torch.randn(T, E, generator=g)
            static_x.copy_(x)
            static_logits.copy_(logits)
            static_y.fill_(float("nan"))  # poison: the replay must rewrite every element
            graph.replay()
            torch.cuda.synchronize()
            eager = _decode_step(layer, x, logits.to(device))
            assert torch.equal(static_y, eager), f"T={T}: the graph replay differs from the eager forward"
            gates, idx = scattermoe.topk_gating(logits.to(device), K)
            with scattermoe.use_backend("torch"):
                ref = layer(x, gates.to(x.dtype), idx)
            assert_close(static_y, ref, TOL[torch.bfloat16])


@pytest.mark.parametrize("layer_name", ["glumlp", "mlp", "moa"])
def test_layer_backward_repeats_bit_for_bit(layer_name, device):
    """Training reruns must be reproducible: the same inputs give the same output and gradients, bit for bit, on
    every run (the kernels reduce each tile in one program; GLUMoE's output-bias gradient was an index_add_,
    whose CUDA atomics add in a varying order). Biases on, so every gradient is exercised."""
    torch.manual_seed(0)
    T, D, F_, E, K = 2048, 256, 384, 8, 2
    if layer_name == "moa":
        layer = scattermoe.MoA(D, 64, 4, E, K, bias=True).to(device, torch.bfloat16)
    else:
        cls = scattermoe.GLUMLP if layer_name == "glumlp" else scattermoe.MLP
        layer = cls(D, F_, E, K, bias=True).to(device, torch.bfloat16)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    gates, idx = scattermoe.topk_gating(torch.randn(T, E, device=device), K)
    dy = torch.randn(T, D, device=device, dtype=torch.bfloat16)

    def run():
        layer.zero_grad(set_to_none=True)
        xr, gr = x.clone().requires_grad_(), gates.clone().requires_grad_()
        with scattermoe.use_backend("triton"):
            if layer_name == "moa":
                q, routing = layer.map(xr, gr, idx)
                y = layer.reduce(q.flip(-1), routing)  # any attention stand-in
            else:
                y = layer(xr, gr, idx)
            y.backward(dy)
        return [y, xr.grad, gr.grad] + [p.grad for p in layer.parameters()]

    first = run()
    for _ in range(3):
        for a, b in zip(first, run(), strict=True):
            assert torch.equal(a, b), f"{layer_name}: a repeat differs (shape {tuple(a.shape)})"
