"""The original ScatterMoE test suite (shawntan/scattermoe tests/test_mlp.py), run against this library.

Same checks as the original: an MoE MLP (GELU, with and without expert biases) against a
token-by-token loop built from the module's own weights; Y and the gradients of X, the gates,
both expert weights and both biases, max abs error under 1e-4 in float32 with TF32 off.
Shapes are scaled down so the Triton kernels run on the CPU under the interpreter: the
original's x_dim in {128, 256, 512, 600, 100} x k in {2, 3, 4} becomes
three (x_dim, k) pairs with x_dim in {32, 40, 12} (a multiple of the 32
block, one not, one below it), its lengths {1, 256, 512} become {1, 37}; k and E as there.
Run on the 'torch' backend as well (the reference path).
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import scattermoe
import scattermoe.kernels.ops
from scattermoe.mlp import GLUMLP, MLP

scattermoe.kernels.ops.ALLOW_TF32 = False  # as the original suite does: IEEE fp32 so 1e-4 holds


def dumb_forward(m, x, expert_p, expert_idxs, glu=False):
    """y_t = sum_j p_tj * W2_e act(W1_e x_t + b1_e) + b2_e, one token and one expert at a time."""
    def hidden(i, j):
        e = expert_idxs[i, j]
        h = F.linear(x[i], m.experts.weight[e], m.experts.bias[e] if m.experts.bias is not None else None)
        if glu:  # the original GLUMLP: first half times act(second half)
            a, b = h.chunk(2, dim=-1)
            return a * m.activation(b)
        return m.activation(h)

    return torch.stack([
        sum(
            expert_p[i, j] * F.linear(
                hidden(i, j), m.output_experts.weight[expert_idxs[i, j]],
                m.output_experts.bias[expert_idxs[i, j]] if m.output_experts.bias is not None else None)
            for j in range(expert_idxs.size(1))
        ) for i in range(expert_idxs.size(0))
    ], dim=0)


def assert_diff(name, ref, new, tolerance):
    diff = (ref - new).abs()
    print(f"{name} diff: max {diff.max().item():.3g} mean {diff.mean().item():.3g}")
    assert not torch.isnan(new).any(), f"{name}: NaN"
    assert diff.max() < tolerance, f"{name} error too large: max {diff.max().item():.3g}"


def _check(mlp_cls, length, x_dim, h_dim, E, k, bias, backend, glu):
    torch.manual_seed(hash((mlp_cls.__name__, length, x_dim, k, bias, backend)) % 2**31)
    dtype = torch.float32
    logits = torch.randn(length, E, dtype=dtype)
    weights = torch.softmax(logits.float(), axis=-1).to(dtype)
    X = torch.randn(length, x_dim, dtype=dtype, requires_grad=True)
    DY = torch.randn(length, x_dim, dtype=dtype)
    k_weights, k_idxs = torch.topk(weights, k)
    k_weights.requires_grad_()

    kwargs = {} if glu else {"activation": nn.GELU()}
    mlp = mlp_cls(input_size=x_dim, hidden_size=h_dim, num_experts=E, top_k=k, bias=bias, **kwargs).to(dtype)
    if bias:
        nn.init.normal_(mlp.experts.bias, std=0.02)
        nn.init.normal_(mlp.output_experts.bias, std=0.02)

    with scattermoe.use_backend(backend):
        Y = mlp(X, k_weights, k_idxs)
    names = ("dX", "dg", "dW1", "dW2")
    inputs = (X, k_weights, mlp.experts.weight, mlp.output_experts.weight)
    if bias:
        names += ("db1", "db2")
        inputs += (mlp.experts.bias, mlp.output_experts.bias)
    with scattermoe.use_backend(backend):
        grads = torch.autograd.grad(outputs=(Y,), inputs=inputs, grad_outputs=(DY,))
    Y_ = dumb_forward(mlp, X, k_weights, k_idxs, glu=glu)
    ref_grads = torch.autograd.grad(outputs=(Y_,), inputs=inputs, grad_outputs=(DY,))
    tol = 1e-4
    assert_diff("Y", Y_, Y, tol)
    for name, ref, new in zip(names, ref_grads, grads):
        assert_diff(name, ref, new, tol)


# (x_dim, h_dim = 4 * x_dim // k, k), as the original builds them; one k per x_dim to keep the CPU run short.
SHAPES = [
    (32, 64, 2),   # a multiple of the interpreter's 32 block
    (40, 53, 3),   # neither dim a multiple of 32
    (12, 12, 4),   # dims below one block; k=4
]


@pytest.mark.interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("x_dim, h_dim, k", SHAPES)
def test_mlp_correctness(length, x_dim, h_dim, k, bias):
    _check(MLP, length, x_dim, h_dim, 8, k, bias, "triton", glu=False)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dim, h_dim, k", SHAPES)
def test_mlp_correctness_torch_backend(x_dim, h_dim, k, bias):
    _check(MLP, 37, x_dim, h_dim, 8, k, bias, "torch", glu=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dim, h_dim, k", [(40, 20, 2)])
def test_glu_mlp_correctness(x_dim, h_dim, k, bias):
    """The original GLUMLP (``h, g = W1 x``; ``h * silu(g)``), the same checks."""
    _check(GLUMLP, 37, x_dim, h_dim, 8, k, bias, "triton", glu=True)


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    """code run by a new interpreter that sees this one's imports; it must succeed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def test_the_originals_modules_are_attributes_of_the_package():
    """As the original's ``import scattermoe`` made them (its __init__ imported them all): checked in a fresh
    process, where nothing but ``import scattermoe`` has run (this file imports scattermoe.mlp itself)."""
    code = ("import scattermoe, sys\n"
            "m = scattermoe.mlp\n"
            "print(scattermoe.parallel_experts.__name__, scattermoe.utils.__name__, scattermoe.kernels.single.__name__,"
            " m.ParallelExperts is scattermoe.ParallelExperts, m.flatten_sort_count is scattermoe.flatten_sort_count,"
            " 'scattermoe.utils.replace_moe' in sys.modules)\n")  # replace_moe patches: only when imported itself
    out = _fresh_python(code)
    assert out.stdout.split() == ["scattermoe.parallel_experts", "scattermoe.utils", "scattermoe.kernels.single",
                                  "True", "True", "False"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cls", [MLP, GLUMLP])
def test_a_seed_gives_the_originals_initial_weights(cls, bias):
    """The original's layers draw W1 ([E, width, D]; GLU: both halves, 2F) and then W2 from the RNG, in
    that order; the same seed must give the same weights here (and one W1 draw, not a throw-away first)."""
    E, D, F = 4, 8, 6
    torch.manual_seed(0)
    layer = cls(D, F, E, 2, bias=bias)
    after = torch.rand(1)
    torch.manual_seed(0)
    w1 = scattermoe.ParallelExperts(E, D, (2 if cls is GLUMLP else 1) * F, bias=bias)
    w2 = scattermoe.ParallelExperts(E, F, D, bias=bias)
    assert torch.equal(torch.rand(1), after)  # the same number of draws
    for mine, theirs in ((layer.experts, w1), (layer.output_experts, w2)):
        for name, p in theirs.named_parameters():
            assert torch.equal(getattr(mine, name), p), name


@pytest.mark.parametrize("cls", [MLP, GLUMLP])
def test_the_2024_layers_positional_activation_is_the_activation(cls):
    """The 2024 layers were (input_size, hidden_size, num_experts, top_k, activation=...), with no bias: a
    positional activation, now in bias's slot, is taken as the activation (it was refused as a bad bias)."""
    torch.manual_seed(0)
    legacy = cls(8, 6, 4, 2, nn.Tanh())
    torch.manual_seed(0)
    keyword = cls(8, 6, 4, 2, activation=nn.Tanh())
    assert isinstance(legacy.activation, nn.Tanh) and legacy.experts.bias is None
    x, p = torch.randn(5, 8), torch.softmax(torch.randn(5, 2), -1)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    with scattermoe.use_backend("torch"):
        assert torch.equal(legacy(x, p, idx), keyword(x, p, idx))
    with pytest.raises(ValueError, match="^bias: expected True or False"):
        cls(8, 6, 4, 2, "yes")


@pytest.mark.parametrize("cls", [MLP, GLUMLP])
def test_routing_over_flattened_tokens_beside_a_3d_x(cls):
    """The original's layers took x [B, L, D] with routing [B*L, K] (a router over the flattened tokens) and
    expert ids of any shape: those calls give what x's own leading dims give."""
    B, L, D, F, E, K = 2, 3, 8, 6, 4, 2
    torch.manual_seed(1)
    layer = cls(D, F, E, K)
    x = torch.randn(B, L, D)
    p = torch.softmax(torch.randn(B, L, K), -1)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * L)]).view(B, L, K)
    with scattermoe.use_backend("torch"):
        expected = layer(x, p, idx)
        for p_given, idx_given in ((p.view(-1, K), idx.view(-1, K)), (p.view(-1, K), idx),
                                   (p, idx.reshape(-1)), (p.view(-1, K), idx.reshape(-1))):
            y = layer(x, p_given, idx_given)
            assert y.shape == x.shape and torch.equal(y, expected)
        with pytest.raises(ValueError, match=r"^expert_p: expected shape \(2, 3, 2\) or \(6, 2\) \(.*\), got "
                                             r"\(3, 2, 2\)$"):
            layer(x, p.view(L, B, K), idx)
        with pytest.raises(ValueError, match=r"^expert_idxs: expected shape \(2, 3, 2\) or \(6, 2\) or \(12,\) "
                                             r"\(.*\), got \(6,\)$"):
            layer(x, p, idx.reshape(-1)[:B * L])
        with pytest.raises(ValueError, match=r"^expert_p: expected shape \(6, 2\) \("):  # 2-D x: said once
            layer(x.view(-1, D), p.view(-1, K)[:5], idx.view(-1, K))


def test_import_replace_moe_patches_transformers_as_the_original_did():
    """``import scattermoe.utils.replace_moe`` (the original 0.3.0's README) patches GPT-OSS and GraniteMoeHybrid;
    run in a fresh process, since the import patches transformers for the rest of its life."""
    pytest.importorskip("transformers")
    code = ("import scattermoe.utils.replace_moe as r\n"
            "import transformers.models.gpt_oss.modeling_gpt_oss as g\n"
            "import transformers.models.granitemoehybrid.modeling_granitemoehybrid as h\n"
            "print(r.PATCHED, g.GptOssExperts.__module__, h.GraniteMoeHybridExperts.__module__)\n")
    out = _fresh_python(code)
    assert out.stdout.split() == ["['gpt_oss',", "'granitemoehybrid']", "scattermoe.integrations.transformers_moe",
                                  "scattermoe.integrations.transformers_moe"]
