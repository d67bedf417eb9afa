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

os.environ.setdefault("TRITON_INTERPRET", "1")  # before scattermoe imports Triton

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
