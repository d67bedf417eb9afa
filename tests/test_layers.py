"""The layers (MLP, GLUMLP, MoA) against per-token references in float64: forward, every parameter and input gradient.

Legend: B batch, L sequence length, T = B*L tokens, K experts per token, E experts, D model dim,
F expert hidden dim, H heads per expert, Dh head dim. Layer weights are stored [E, out, in].
x has a leading shape [B, L] throughout (the layers flatten and restore it).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_all_close, float64_leaves, make_expert_idxs
from torch import nn

import reference
import scattermoe

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]

MLP_SHAPES = [
    # (B, L, D, F, E, K)
    pytest.param(2, 7, 24, 40, 5, 2, id="odd_sizes-empty_expert"),  # dims not multiples of 32; expert 4 gets no token
    pytest.param(1, 1, 16, 24, 4, 2, id="T1"),                      # a single token
    pytest.param(3, 5, 24, 20, 3, 3, id="k_eq_E"),                   # k=E
    pytest.param(2, 6, 24, 20, 1, 1, id="E1"),                       # one expert, k=1
]

# name -> (layer class, constructor kwargs, reference activation, reference glu_activate_first)
LAYERS = {
    "mlp_gelu": (scattermoe.MLP, {}, F.gelu, None),                                    # the default nn.GELU()
    "glu_silu_second": (scattermoe.GLUMLP, {"activate_first": False}, F.silu, False),  # ScatterMoE's half order, fused
    "glu_silu_first": (scattermoe.GLUMLP, {"activate_first": True}, F.silu, True),     # JetMoE's half order, fused
    "glu_gelu": (scattermoe.GLUMLP, {"activation": nn.GELU()}, F.gelu, False),         # not SiLU: the unfused path
}


def _reinit(module: nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in) and non-zero biases, so every term of the output and its gradients matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)) if p.dim() > 1 else 1.0)


def _routing(B, L, E, K, device="cpu", dtype=torch.float32):
    """expert_p [B, L, K] (a leaf requiring grad) and expert_idxs [B, L, K]; the last expert empty when E > K."""
    idx = make_expert_idxs(B * L, E, K, device=device).view(B, L, K)
    p = torch.softmax(torch.randn(B, L, K, device=device), -1).to(dtype).requires_grad_()
    return p, idx


def moe_mlp_vectorised(x, expert_p, expert_idxs, w_in, w_out, b_in, b_out, activation, glu_activate_first):
    """reference.moe_mlp_per_token's arguments and result, built from reference.parallel_linear (expert loops
    instead of token loops: fast enough for the GPU tests' large T). Checked against the per-token loop below."""
    E, K = w_in.size(0), expert_idxs.size(1)
    routing = reference.flatten_sort_count(expert_idxs, E)
    h = reference.parallel_linear(x, w_in.transpose(1, 2), K, *routing, b_in, None, False, True)
    h = activation(h) if glu_activate_first is None else reference.glu(h, activation, glu_activate_first)
    return reference.parallel_linear(h, w_out.transpose(1, 2), 1, *routing, b_out, expert_p, True, False)


def _routing_on_experts(*experts):
    """A _routing where every token is sent to the same K experts (all tokens on one expert, when K=1)."""
    def routing(B, L, E, K, device="cpu", dtype=torch.float32):
        assert len(experts) == K and max(experts) < E
        idx = torch.tensor(experts, device=device).expand(B, L, K).contiguous()
        return torch.softmax(torch.randn(B, L, K, device=device), -1).to(dtype).requires_grad_(), idx
    return routing


def check_mlp_layer(layer_name, B, L, D, F_, E, K, bias, backend, dtype=torch.float32, device="cpu",
                    per_token=True, tol=None, make_routing=_routing):
    """One of LAYERS on ``backend``: forward and the gradients of x, expert_p and every parameter, vs float64."""
    cls, kwargs, activation, glu_activate_first = LAYERS[layer_name]
    layer = cls(D, F_, E, K, bias=bias, **kwargs)
    _reinit(layer)
    layer.to(device=device, dtype=dtype)
    x = torch.randn(B, L, D, device=device).to(dtype).requires_grad_()
    p, idx = make_routing(B, L, E, K, device, dtype)
    with scattermoe.use_backend(backend):
        y = layer(x, p, idx)
    assert y.shape == (B, L, D) and y.dtype == dtype and y.device == x.device
    dy = torch.randn_like(y)
    names = ["x", "expert_p"] + [n for n, _ in layer.named_parameters()]
    leaves = [x, p] + list(layer.parameters())
    grads = torch.autograd.grad(y, leaves, dy)

    ref = dict(zip(names, float64_leaves(leaves)))
    ref_fn = reference.moe_mlp_per_token if per_token else moe_mlp_vectorised
    y_ref = ref_fn(ref["x"].view(-1, D), ref["expert_p"].view(-1, K), idx.view(-1, K).cpu(),
                   ref["experts.weight"], ref["output_experts.weight"],
                   ref.get("experts.bias"), ref.get("output_experts.bias"), activation, glu_activate_first)
    ref_grads = torch.autograd.grad(y_ref.view(B, L, D), [ref[n] for n in names], dy.double().cpu())
    assert_all_close(["y"] + [f"d{n}" for n in names], (y,) + grads, (y_ref.view(B, L, D),) + ref_grads,
                     tol or TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("B, L, D, F_, E, K", MLP_SHAPES)
def test_mlp_layers_match_per_token_reference(B, L, D, F_, E, K, layer_name, bias, backend):
    check_mlp_layer(layer_name, B, L, D, F_, E, K, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("experts", [(3,), (3, 1)], ids=["all_on_one_expert", "all_on_the_same_two"])
def test_mlp_layers_with_every_token_on_the_same_experts(experts, layer_name, backend):
    """DESIGN.md's "all tokens routed to one expert", at the layers: the other experts get no row."""
    check_mlp_layer(layer_name, 2, 5, 24, 20, 4, len(experts), True, backend,
                    make_routing=_routing_on_experts(*experts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_mlp_layers_in_float16(layer_name, backend):
    """The plain MLP, the unfused GLU and both fused orders in float16 on the CPU (the interpreter's dots are right
    in float16, not bfloat16), against the float64 reference."""
    check_mlp_layer(layer_name, 2, 7, 24, 40, 5, 2, True, backend, dtype=torch.float16)


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_vectorised_reference_matches_per_token_loop(layer_name):
    """The GPU tests' fast reference is the per-token loop's equal (so their oracle is checked here, on the CPU)."""
    T, D, F_, E, K = 23, 12, 10, 5, 2
    _, _, activation, glu_activate_first = LAYERS[layer_name]
    H = 2 * F_ if glu_activate_first is not None else F_
    x, p = torch.randn(T, D, dtype=torch.float64), torch.rand(T, K, dtype=torch.float64)
    idx = make_expert_idxs(T, E, K)
    weights = (torch.randn(E, H, D, dtype=torch.float64), torch.randn(E, D, F_, dtype=torch.float64),
               torch.randn(E, H, dtype=torch.float64), torch.randn(E, D, dtype=torch.float64))
    want = reference.moe_mlp_per_token(x, p, idx, *weights, activation, glu_activate_first)
    got = moe_mlp_vectorised(x, p, idx, *weights, activation, glu_activate_first)
    assert_all_close(["y"], [got], [want], 1e-12)


def moa_per_token(x, expert_p, expert_idxs, w_q, w_o, bias, w_kv, num_heads, head_dim):
    """The mixture of attention heads written token by token, slot by slot, head by head (causal attention).

    x [B, L, D]; expert_p, expert_idxs [B, L, K]; w_q [E, H*Dh, D]; w_o [E, D, H*Dh]; bias [D] or None;
    w_kv [2*H*Dh, D] the shared key/value projection (keys first).
    q(t, slot j, head h) = w_q[e_tj, h*Dh:(h+1)*Dh] @ x_t; query head h*K + j reads the shared KV head h;
    y_t = sum_j p_tj * w_o[e_tj] @ concat_h(o(t, j, h)) + bias.
    Returns (queries [B, L, H*K, Dh] in map's order, y [B, L, D]).
    """
    B, L, _ = x.shape
    K = expert_idxs.size(-1)
    H, Dh = num_heads, head_dim
    keys = [[w_kv[h * Dh:(h + 1) * Dh] @ x[b, s] for s in range(L)] for b in range(B) for h in range(H)]
    values = [[w_kv[(H + h) * Dh:(H + h + 1) * Dh] @ x[b, s] for s in range(L)] for b in range(B) for h in range(H)]
    queries, outputs = [], []
    for b in range(B):
        q_rows, y_rows = [], []
        for t in range(L):
            q_heads = [None] * (H * K)
            y_t = x.new_zeros(x.size(-1))
            for j in range(K):
                e = int(expert_idxs[b, t, j])
                o_heads = []
                for h in range(H):
                    q = w_q[e, h * Dh:(h + 1) * Dh] @ x[b, t]
                    q_heads[h * K + j] = q
                    ks = torch.stack(keys[b * H + h][: t + 1])    # causal: positions 0..t
                    vs = torch.stack(values[b * H + h][: t + 1])
                    scores = ks @ q / math.sqrt(Dh)
                    weights = torch.exp(scores - scores.max())
                    o_heads.append((weights / weights.sum()) @ vs)
                y_t = y_t + expert_p[b, t, j] * (w_o[e] @ torch.cat(o_heads))
            if bias is not None:
                y_t = y_t + bias
            q_rows.append(torch.stack(q_heads))
            y_rows.append(y_t)
        queries.append(torch.stack(q_rows))
        outputs.append(torch.stack(y_rows))
    return torch.stack(queries), torch.stack(outputs)


MOA_SHAPES = [
    # (B, L, D, H, Dh, E, K)
    pytest.param(2, 6, 24, 2, 8, 5, 2, id="odd_D-empty_expert"),  # D not a multiple of 32; expert 4 gets no token
    pytest.param(1, 5, 16, 2, 12, 3, 3, id="k_eq_E"),             # k=E, H*Dh = 24
    pytest.param(2, 4, 16, 3, 8, 1, 1, id="E1"),                  # one expert, k=1, 3 heads
    pytest.param(1, 1, 16, 2, 8, 4, 2, id="T1"),                  # a single token
]


def check_moa(B, L, D, H, Dh, E, K, bias, backend, dtype=torch.float32, device="cpu", tol=None,
              make_routing=_routing):
    """map -> SDPA(enable_gqa=True) against H shared K/V heads -> reduce, vs the per-token loop in float64."""
    moa = scattermoe.MoA(D, Dh, H, E, K, bias=bias)
    w_kv = nn.Parameter(torch.empty(2 * H * Dh, D))  # the caller's shared key/value projection
    _reinit(moa)
    _reinit(nn.ParameterList([w_kv]))
    moa.to(device=device, dtype=dtype)
    w_kv = nn.Parameter(w_kv.detach().to(device=device, dtype=dtype))
    x = torch.randn(B, L, D, device=device).to(dtype).requires_grad_()
    p, idx = make_routing(B, L, E, K, device, dtype)

    with scattermoe.use_backend(backend):
        q, routing = moa.map(x, p, idx)                               # [B, L, H*K, Dh]
        k_, v_ = (x @ w_kv.t()).view(B, L, 2, H, Dh).unbind(2)        # [B, L, H, Dh] each
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                              is_causal=True, enable_gqa=True)  # [B, H*K, L, Dh]
        y = moa.reduce(attn.transpose(1, 2), routing)
    assert q.shape == (B, L, H * K, Dh) and y.shape == (B, L, D) and y.dtype == dtype
    dy = torch.randn_like(y)
    names = ["x", "expert_p", "w_kv"] + [n for n, _ in moa.named_parameters()]
    leaves = [x, p, w_kv] + list(moa.parameters())
    grads = torch.autograd.grad(y, leaves, dy)

    ref = dict(zip(names, float64_leaves(leaves)))
    q_ref, y_ref = moa_per_token(ref["x"], ref["expert_p"], idx.cpu(), ref["input_linear.weight"],
                                 ref["output_linear.weight"], ref.get("bias"), ref["w_kv"], H, Dh)
    ref_grads = torch.autograd.grad(y_ref, [ref[n] for n in names], dy.double().cpu())
    assert_all_close(["queries", "y"] + [f"d{n}" for n in names], (q, y) + grads, (q_ref, y_ref) + ref_grads,
                     tol or TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("B, L, D, H, Dh, E, K", MOA_SHAPES)
def test_moa_with_sdpa_gqa_matches_per_token_reference(B, L, D, H, Dh, E, K, bias, backend):
    check_moa(B, L, D, H, Dh, E, K, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("experts", [(2,), (2, 0)], ids=["all_on_one_expert", "all_on_the_same_two"])
def test_moa_with_every_token_on_the_same_experts(experts, backend):
    check_moa(2, 5, 24, 2, 8, 4, len(experts), True, backend, make_routing=_routing_on_experts(*experts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moa_in_float16(backend):
    check_moa(2, 6, 24, 2, 8, 5, 2, True, backend, dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moa_reduce_inverts_the_map_order(backend):
    """reduce reads head h*K + j as (slot j, head h): feeding map's queries straight back must equal the
    per-slot projection chain W_o[e_tj] @ W_q[e_tj] x_t summed with the gates (attention as the identity)."""
    B, L, D, H, Dh, E, K = 2, 3, 16, 2, 8, 4, 2
    moa = scattermoe.MoA(D, Dh, H, E, K)
    _reinit(moa)
    x = torch.randn(B, L, D)
    p, idx = _routing(B, L, E, K)
    with scattermoe.use_backend(backend), torch.no_grad():
        q, routing = moa.map(x, p, idx)
        y = moa.reduce(q, routing)
    w_q, w_o = moa.input_linear.weight.double(), moa.output_linear.weight.double()
    want = torch.zeros(B, L, D, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            for j in range(K):
                e = int(idx[b, t, j])
                want[b, t] += p[b, t, j].double() * (w_o[e] @ (w_q[e] @ x[b, t].double()))
    assert_all_close(["y"], [y], [want], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_moa_reduce_of_one_token_with_one_channel_per_head(backend):
    """Decode (one token) with head_dim 1: reshaping attn_out to slot rows gives a column-major view there, not a
    copy; reduce makes it row-major (it was refused as a non-row-major x the caller never passed)."""
    D, H, Dh, E, K = 6, 3, 1, 5, 5
    moa = scattermoe.MoA(D, Dh, H, E, K, bias=True)
    _reinit(moa)
    x = torch.randn(1, 1, D)
    p, idx = _routing(1, 1, E, K)
    with scattermoe.use_backend(backend), torch.no_grad():
        q, routing = moa.map(x, p, idx)
        y = moa.reduce(q, routing)
    w_q, w_o = moa.input_linear.weight.double(), moa.output_linear.weight.double()
    want = moa.bias.detach().double().clone()
    for j in range(K):
        e = int(idx[0, 0, j])
        want += p[0, 0, j].double() * (w_o[e] @ (w_q[e] @ x[0, 0].double()))
    assert_all_close(["y"], [y.view(D)], [want], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_moa_follows_autocast_with_its_bias(backend):
    """Under torch.autocast MoA (with its output bias) computes in the autocast dtype, exactly as a cast copy of it:
    the bias is added in that dtype, as nn.Linear's is (float32 came out before)."""
    B, L, D, H, Dh, E, K = 2, 3, 16, 2, 8, 4, 2
    moa = scattermoe.MoA(D, Dh, H, E, K, bias=True)
    _reinit(moa)
    half = scattermoe.MoA(D, Dh, H, E, K, bias=True).half()
    half.load_state_dict(moa.state_dict())
    x = torch.randn(B, L, D)
    p, idx = _routing(B, L, E, K)
    with scattermoe.use_backend(backend), torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            q, routing = moa.map(x, p, idx)
            y = moa.reduce(q, routing)
        q_half, routing_half = half.map(x.half(), p, idx)
        y_half = half.reduce(q_half, routing_half)
    assert y.dtype == torch.float16
    assert torch.equal(y, y_half), f"max diff {(y.float() - y_half.float()).abs().max():.3e}"

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_layers_follow_autocast(layer_name, backend):
    """Under torch.autocast a float32 layer computes in the autocast dtype, exactly as a cast copy of it
    does, and the float32 master weights receive the gradients (fp16: the dtype the interpreter runs)."""
    T, D, F_, E, K = 11, 24, 20, 4, 2
    cls, kwargs = LAYERS[layer_name][:2]
    layer = cls(D, F_, E, K, **kwargs)
    x = torch.randn(T, D)
    gates, idxs = scattermoe.topk_gating(torch.randn(T, E), K)
    half = cls(D, F_, E, K, **kwargs).half()
    half.load_state_dict(layer.state_dict())
    with scattermoe.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(x, gates, idxs)
        y_half = half(x.half(), gates, idxs)
    assert y.dtype == torch.float16
    assert torch.equal(y, y_half), f"max diff {(y.float() - y_half.float()).abs().max():.3e}"
    y.float().square().sum().backward()
    y_half.float().square().sum().backward()
    for (name, p), p_half in zip(layer.named_parameters(), half.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, p_half.grad.float()), name


class _ScaledSiLU(nn.SiLU):
    """A SiLU subclass that computes something else: the layer must run it, not the fused plain-SiLU op."""

    def forward(self, x):
        return 2 * F.silu(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glumlp_runs_a_silu_subclass_as_written(backend):
    T, D, F_, E, K = 9, 16, 12, 4, 2
    torch.manual_seed(3)
    layer = scattermoe.GLUMLP(D, F_, E, K, activation=_ScaledSiLU(), activate_first=True)
    _reinit(layer)
    x, (p, idx) = torch.randn(T, D), _routing(1, T, E, K)
    with scattermoe.use_backend(backend):
        y = layer(x, p.view(T, K), idx.view(T, K))
    want = reference.moe_mlp_per_token(x.double(), p.view(T, K).double(), idx.view(T, K),
                                       layer.experts.weight.double(), layer.output_experts.weight.double(),
                                       None, None, lambda h: 2 * F.silu(h), True)
    assert_all_close(["y"], [y], [want], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_glumlp_with_silu_honours_hooks_and_subclassed_experts(backend):
    """The fused SiLU op reads both weights directly; a forward hook or pre-hook (FSDP2's unshard is one) on an
    expert module, or an expert module whose class has its own forward (an adapter), must still take effect: the
    layer then runs them as modules."""
    T, D, F_, E, K = 9, 16, 12, 4, 2
    torch.manual_seed(4)
    layer = scattermoe.GLUMLP(D, F_, E, K)
    _reinit(layer)
    x, (p, idx) = torch.randn(T, D), _routing(1, T, E, K)
    p, idx = p.view(T, K).detach(), idx.view(T, K)
    with scattermoe.use_backend(backend):
        plain = layer(x, p, idx)
        handle = layer.output_experts.register_forward_hook(lambda module, args, out: out * 0.5)
        hooked = layer(x, p, idx)
        handle.remove()
        handle = layer.output_experts.register_forward_pre_hook(lambda module, args: (0.5 * args[0],) + args[1:])
        pre_hooked = layer(x, p, idx)
        handle.remove()
        assert torch.equal(layer(x, p, idx), plain)  # hooks removed: the fused op again

        class Doubled(scattermoe.ParallelExperts):
            def forward(self, *args, **kwargs):
                return 2 * super().forward(*args, **kwargs)

        doubled = Doubled(E, D, 2 * F_)
        doubled.load_state_dict(layer.experts.state_dict())
        layer.experts = doubled
        subclassed = layer(x, p, idx)
    torch.testing.assert_close(hooked, 0.5 * plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre_hooked, 0.5 * plain, rtol=1e-5, atol=1e-6)  # the second GEMM is linear
    # GLU(2h) with silu(a) * b: silu(2a) * 2b, not 2 * GLU(h); so compare to the reference with doubled weights
    want = reference.moe_mlp_per_token(x.double(), p.double(), idx, 2 * layer.experts.weight.double(),
                                       layer.output_experts.weight.double(), None, None, F.silu, False)
    assert_all_close(["y (subclassed experts)"], [subclassed], [want], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_glumlp_with_silu_runs_backward_activation_and_global_hooks(backend):
    """Hooks the fused op would skip, silently, since it calls none of the modules: backward hooks on the expert
    modules, hooks on the activation module, global module hooks. Each fires, as in MLP, with the same output."""
    T, D, F_, E, K = 6, 16, 12, 4, 2
    torch.manual_seed(5)
    layer = scattermoe.GLUMLP(D, F_, E, K)
    _reinit(layer)
    x, (p, idx) = torch.randn(T, D, requires_grad=True), _routing(1, T, E, K)
    p, idx = p.view(T, K).detach(), idx.view(T, K)
    registrations = {
        "experts backward": lambda seen: layer.experts.register_full_backward_hook(
            lambda *args: seen.append(1)),
        "output_experts backward pre": lambda seen: layer.output_experts.register_full_backward_pre_hook(
            lambda *args: seen.append(1)),
        "activation forward": lambda seen: layer.activation.register_forward_hook(lambda *args: seen.append(1)),
        "global forward": lambda seen: nn.modules.module.register_module_forward_hook(
            lambda module, *args: seen.append(1) if module is layer.activation else None),
    }
    with scattermoe.use_backend(backend):
        plain = layer(x, p, idx)
        for name, register in registrations.items():
            seen = []
            handle = register(seen)
            try:
                y = layer(x, p, idx)
                y.sum().backward()
            finally:
                handle.remove()
            assert seen, f"{name} hook did not run"
            torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-6)


def test_torch_func_transforms_are_refused_by_name_on_a_kernel_backend():
    """The kernel backends' Functions have no vmap/jvp rule: torch.func.grad over a layer says so and names the
    backend that can; the torch backend runs it, equal to autograd."""
    T, D, F_, E, K = 5, 8, 6, 3, 2
    torch.manual_seed(6)
    layer = scattermoe.GLUMLP(D, F_, E, K)
    x, (p, idx) = torch.randn(T, D), _routing(1, T, E, K)
    p, idx = p.view(T, K).detach(), idx.view(T, K)

    def loss(x):
        return layer(x, p, idx).square().sum()
    with scattermoe.use_backend("triton"), pytest.raises(
            RuntimeError, match=r"^scattermoe: the triton backend's ops do not support torch.func transforms"):
        torch.func.grad(loss)(x)
    with scattermoe.use_backend("torch"):
        xg = x.clone().requires_grad_()
        loss(xg).backward()
        torch.testing.assert_close(torch.func.grad(loss)(x), xg.grad)
        # vmap over x, the routing shared (the README's claim): each batch member as its own call
        xs = torch.randn(3, T, D)
        torch.testing.assert_close(torch.func.vmap(lambda x: layer(x, p, idx))(xs),
                                   torch.stack([layer(x, p, idx) for x in xs]))


def test_the_layers_print_their_sizes_and_whether_they_have_biases():
    assert str(scattermoe.GLUMLP(8, 6, 4, 2, bias=True)).splitlines()[1:3] == [
        "  k=2, activate_first=False",
        "  (experts): ParallelExperts(num_experts=4, input_size=8, output_size=12, bias=True)"]
    assert repr(scattermoe.ParallelExperts(3, 8, 5)) == (
        "ParallelExperts(num_experts=3, input_size=8, output_size=5, bias=False)")
    assert str(scattermoe.MoA(8, 4, 2, 3, 2)).splitlines()[1] == "  k=2, num_heads=2, head_dim=4"
