"""MLP.from_linears / GLUMLP.from_linears: replacing a loop over an nn.ModuleList of experts.

The oracle is the loop a user would have written (float64, every expert's nn.Linear applied to the tokens
routed to it, outputs weighted by the gates and added). The fused layer built from the same modules must give
its output and every gradient: x's, the gates', and each expert's weights and biases (the layer's gradient
slices, mapped back to the modules').

Legend: T tokens, K experts per token, E experts, D model dim, F expert hidden dim.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_all_close, make_expert_idxs
from torch import nn

import scattermoe

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]


class SwiGLUExpert(nn.Module):
    """What Llama/Mixtral/Qwen-style MoE code holds per expert."""

    def __init__(self, d, f, bias):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainExpert(nn.Module):
    def __init__(self, d, f, bias):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f, bias=bias), nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def loop_moe(experts, x, p, idx):
    """The slow PyTorch loop the layer replaces."""
    y = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = (idx == e).nonzero(as_tuple=True)
        y = y.index_add(0, token, p[token, slot, None] * expert(x[token]))
    return y


def _randomised(experts):
    with torch.no_grad():
        for prm in experts.parameters():
            prm.normal_(0.0, prm.size(-1) ** -0.5 if prm.dim() > 1 else 0.5)
    return experts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("glu", [True, False], ids=["swiglu", "plain_relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("T,D,Fh,E,K", [(13, 24, 40, 5, 2), (1, 16, 24, 3, 3)], ids=["empty_expert", "T1_k_eq_E"])
def test_from_linears_matches_the_loop_it_replaces(backend, glu, bias, T, D, Fh, E, K):
    torch.manual_seed(T * 100 + E + 7 * glu + bias)
    cls = SwiGLUExpert if glu else PlainExpert
    experts = _randomised(nn.ModuleList(cls(D, Fh, bias) for _ in range(E)))
    if glu:
        layer = scattermoe.GLUMLP.from_linears([m.gate_proj for m in experts], [m.up_proj for m in experts],
                                               [m.down_proj for m in experts], top_k=K)
    else:
        layer = scattermoe.MLP.from_linears([m.fc1 for m in experts], [m.fc2 for m in experts], top_k=K,
                                            activation=nn.ReLU())
    assert all(prm.device.type == "cpu" and prm.dtype == torch.float32 for prm in layer.parameters())
    x = torch.randn(T, D, requires_grad=True)
    p = torch.softmax(torch.randn(T, K), -1).requires_grad_()
    idx = make_expert_idxs(T, E, K)  # the last expert gets no token when E > K
    dy = torch.randn(T, D)

    with scattermoe.use_backend(backend):
        y = layer(x, p, idx)
    y.backward(dy)

    experts64 = experts.double()
    x64, p64 = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    y64 = loop_moe(experts64, x64, p64, idx)
    y64.backward(dy.double())

    first = [(m.gate_proj, m.up_proj) if glu else (m.fc1,) for m in experts64]
    second = [m.down_proj if glu else m.fc2 for m in experts64]
    names = ["y", "dx", "dgates", "dW1", "dW2"]
    outs = [y, x.grad, p.grad, layer.experts.weight.grad, layer.output_experts.weight.grad]
    refs = [y64, x64.grad, p64.grad, torch.stack([torch.cat([lin.weight.grad for lin in lins]) for lins in first]),
            torch.stack([lin.weight.grad for lin in second])]
    if bias:
        names += ["db1", "db2"]
        outs += [layer.experts.bias.grad, layer.output_experts.bias.grad]
        refs += [torch.stack([torch.cat([lin.bias.grad for lin in lins]) for lins in first]),
                 torch.stack([lin.bias.grad for lin in second])]
    assert_all_close(names, outs, refs, TOL[torch.float32])
    if not bias:
        assert layer.experts.bias is None and layer.output_experts.bias is None


def test_from_linears_copies_and_takes_dtype_from_the_weights():
    experts = nn.ModuleList(SwiGLUExpert(8, 12, False) for _ in range(3)).to(torch.bfloat16)
    layer = scattermoe.GLUMLP.from_linears([m.gate_proj for m in experts], [m.up_proj for m in experts],
                                           [m.down_proj for m in experts], top_k=2)
    assert layer.experts.weight.dtype == torch.bfloat16 and layer.experts.weight.shape == (3, 24, 8)
    assert layer.output_experts.weight.shape == (3, 8, 12) and layer.activate_first
    assert torch.equal(layer.experts.weight[1, :12], experts[1].gate_proj.weight)
    assert torch.equal(layer.experts.weight[1, 12:], experts[1].up_proj.weight)
    with torch.no_grad():
        experts[0].down_proj.weight.zero_()  # a copy: the layer does not see later changes
    assert layer.output_experts.weight[0].abs().sum() > 0
    assert all(prm.requires_grad and prm.device.type == "cpu" for prm in layer.parameters())


def test_from_linears_keeps_frozen_experts_frozen():
    """A router-only fine-tune freezes the experts before converting: the layer must not train them. Each stack
    is trainable when any expert's tensor was (here: only the gates' weights train)."""
    experts = nn.ModuleList(SwiGLUExpert(8, 12, True) for _ in range(3)).requires_grad_(False)
    def build():
        return scattermoe.GLUMLP.from_linears([m.gate_proj for m in experts], [m.up_proj for m in experts],
                                              [m.down_proj for m in experts], top_k=2)
    assert not any(prm.requires_grad for prm in build().parameters())
    experts[1].gate_proj.weight.requires_grad_(True)
    layer = build()
    trainable = {name for name, prm in layer.named_parameters() if prm.requires_grad}
    assert trainable == {"experts.weight"}, trainable
    plain = nn.ModuleList(PlainExpert(8, 12, False) for _ in range(3)).requires_grad_(False)
    mlp = scattermoe.MLP.from_linears([m.fc1 for m in plain], [m.fc2 for m in plain], top_k=2)
    assert not any(prm.requires_grad for prm in mlp.parameters())
    # The frozen layer still differentiates x (an adapter upstream trains through it).
    x = torch.randn(5, 8, requires_grad=True)
    gates, idx = scattermoe.topk_gating(torch.randn(5, 3), 2)
    mlp(x, gates, idx).sum().backward()
    assert x.grad is not None and mlp.experts.weight.grad is None


def test_from_linears_takes_weight_tensors_or_a_stacked_one():
    torch.manual_seed(0)
    up, down = torch.randn(4, 10, 6), torch.randn(4, 6, 10)
    a = scattermoe.MLP.from_linears(up, down, top_k=2)
    b = scattermoe.MLP.from_linears(list(up), list(down), top_k=2)
    assert torch.equal(a.experts.weight, up) and torch.equal(b.output_experts.weight, down)


@pytest.mark.parametrize("make, message", [
    (lambda: scattermoe.MLP.from_linears(nn.Linear(4, 6), [nn.Linear(6, 4)], 1), "up: expected a sequence"),
    (lambda: scattermoe.MLP.from_linears([], [], 1), "up: expected one nn.Linear per expert, got none"),
    (lambda: scattermoe.MLP.from_linears([nn.Linear(4, 6), nn.Linear(4, 7)], [nn.Linear(6, 4)] * 2, 1),
     r"up\[1\]: expected a weight of shape \(6, 4\)"),
    (lambda: scattermoe.MLP.from_linears([nn.Linear(4, 6)] * 2, [nn.Linear(6, 4)] * 3, 1),
     "down: expected 2 experts"),
    (lambda: scattermoe.MLP.from_linears([nn.Linear(4, 6)] * 2, [nn.Linear(4, 6)] * 2, 1),
     r"down\[0\]: expected a weight of shape \(4, 6\)"),
    (lambda: scattermoe.MLP.from_linears([nn.Linear(4, 6), nn.Linear(4, 6, bias=False)], [nn.Linear(6, 4)] * 2, 1),
     r"up: experts \[0\] have a bias and the others do not"),
    (lambda: scattermoe.MLP.from_linears([nn.Linear(4, 6)], [nn.Linear(6, 4, bias=False)], 1),
     "either both have biases or neither"),
    (lambda: scattermoe.MLP.from_linears([nn.Linear(4, 6), nn.Linear(4, 6).double()], [nn.Linear(6, 4)] * 2, 1),
     r"up\[1\]: weight is torch.float64"),
    (lambda: scattermoe.GLUMLP.from_linears([nn.Linear(4, 6)], [nn.Linear(4, 6).half()], [nn.Linear(6, 4)], 1),
     "must share one dtype and device"),
    (lambda: scattermoe.GLUMLP.from_linears([nn.Linear(4, 6)], [nn.Linear(4, 6)], [nn.Linear(6, 4)], 0),
     "top_k: expected an int >= 1"),
    (lambda: scattermoe.GLUMLP.from_linears([nn.Linear(4, 6)], ["w"], [nn.Linear(6, 4)], 1),
     r"up\[0\]: expected an nn.Linear or a weight tensor"),
])
def test_from_linears_says_what_does_not_fit(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
