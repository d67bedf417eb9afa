"""parallel_linear_glu (SiLU GLU fused into the GEMM epilogue) against the reference, forward and backward.

Every test runs on the CPU through the Triton interpreter (fp32, fp16) and on CUDA (fp32, fp16, bf16).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_DTYPES, TOL

import reference
import scattermoe
from scattermoe.backends.triton import scatter2scatter

DEVICE_DTYPES = [pytest.param("cpu", dtype, marks=pytest.mark.interpreter, id=f"cpu-{str(dtype)[6:]}")
                 for dtype in CPU_DTYPES]
DEVICE_DTYPES += [pytest.param("cuda", dtype, marks=pytest.mark.gpu, id=f"cuda-{str(dtype)[6:]}")
                  for dtype in (torch.float32, torch.float16, torch.bfloat16)]
DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]


def _rel(out, ref, name):
    out, ref = out.double(), ref.double()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err == err, f"{name}: NaN in output"
    return err


def _routing(T, E, K, case):
    if case == "all_on_one":  # every token's first choice is expert 0
        idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(E - 1)[: K - 1] + 1])
                           for _ in range(T)])
    else:  # random distinct experts, expert E-1 left empty when possible
        pool = E - 1 if E > K else E
        idx = torch.stack([torch.randperm(pool)[:K] for _ in range(T)])
    return idx


SHAPES = [
    # (T, E, K, D, F, routing)
    (37, 5, 2, 24, 20, "random"),      # sizes not multiples of the 32 block; expert 4 empty
    (1, 4, 2, 16, 16, "random"),       # T=1
    (19, 3, 3, 40, 36, "random"),      # k=E
    (25, 6, 1, 24, 20, "all_on_one"),  # k=1, all tokens on one expert
    (21, 1, 1, 24, 20, "random"),      # E=1
]


@pytest.mark.parametrize("T, E, K, D, F_, case", SHAPES)
@pytest.mark.parametrize("grouped_in, grouped_out", [(False, True), (False, False), (True, True), (True, False)])
@pytest.mark.parametrize("dev, dtype", DEVICE_DTYPES)
def test_parallel_linear_glu_matches_reference(T, E, K, D, F_, case, grouped_in, grouped_out, dev, dtype):
    idx = _routing(T, E, K, case).to(dev)
    se, ss, off = scattermoe.flatten_sort_count(idx, E)
    fan = 1 if grouped_in else K
    x = torch.randn(T * K if grouped_in else T, D, dtype=dtype, device=dev, requires_grad=True)
    w = (torch.randn(E, 2 * F_, D, dtype=dtype, device=dev) / D**0.5).permute(0, 2, 1).requires_grad_()
    b = torch.randn(E, 2 * F_, dtype=dtype, device=dev, requires_grad=True)
    for activate_first in (True, False):
        with scattermoe.use_backend("triton"):
            y = scattermoe.parallel_linear_glu(x, w, fan, se, ss, off, b, grouped_in, grouped_out, activate_first)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        ref_in = [t.detach().double().requires_grad_() for t in (x, w, b)]
        h = reference.parallel_linear(ref_in[0], ref_in[1], fan, se, ss, off, ref_in[2], None, grouped_in, grouped_out)
        y_ref = reference.glu(h, F.silu, activate_first)
        ref_grads = torch.autograd.grad(y_ref, ref_in, dy.double())
        assert y.dtype == dtype and y.shape == y_ref.shape
        for name, out, ref in zip(("y", "dx", "dw", "db"), (y,) + grads, (y_ref,) + ref_grads):
            err = _rel(out, ref, name)
            assert err < TOL[dtype], f"{name} (activate_first={activate_first}): rel err {err:.2e}"


@pytest.mark.parametrize("dev", DEVICES)
def test_glu_inference_skips_pre_activation_and_matches_training_output(dev):
    T, E, K, D, F_ = 17, 4, 2, 24, 20
    se, ss, off = scattermoe.flatten_sort_count(torch.randint(0, E, (T, K), device=dev), E)
    x, w = torch.randn(T, D, device=dev), torch.randn(E, D, 2 * F_, device=dev)
    with scattermoe.use_backend("triton"):
        with torch.no_grad():
            y_infer = scattermoe.parallel_linear_glu(x, w, K, se, ss, off)
        y_train = scattermoe.parallel_linear_glu(x, w.requires_grad_(), K, se, ss, off)
    assert torch.equal(y_infer, y_train.detach())


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("glu", [1, 2])
@pytest.mark.parametrize("w_layout", ["n_major", "k_major"])  # two accumulators, or one [a | b] tile
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_glu_kernel_writes_every_output_and_pre_activation_element(glu, dev, w_layout, bias):
    T, E, K, D, F_ = 29, 5, 2, 24, 36
    se, ss, off = scattermoe.flatten_sort_count(torch.randint(0, E - 1, (T, K), device=dev), E)  # expert E-1 empty
    x = torch.randn(T, D, device=dev)
    w = (torch.randn(E, D, 2 * F_, device=dev) if w_layout == "n_major"
         else torch.randn(E, 2 * F_, D, device=dev).permute(0, 2, 1))
    b = torch.randn(E, 2 * F_, device=dev) if bias else None
    out = torch.full((T * K, F_), float("nan"), device=dev)
    pre = torch.full((T * K, 2 * F_), float("nan"), device=dev)
    scatter2scatter(x, w, b, ss, off, K, False, False, out=out, glu=glu, pre_activation=pre)
    assert not out.isnan().any() and not pre.isnan().any(), "kernel left poisoned elements unwritten"
    h = reference.parallel_linear(x.double(), w.double(), K, se, ss, off, b.double() if bias else None)
    assert _rel(pre, h, "pre-activation") < 1e-5
    assert _rel(out, reference.glu(h, F.silu, glu == 1), "glu output") < 1e-5


def test_glu_rejects_odd_width():
    se, ss, off = scattermoe.flatten_sort_count(torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="expert_weights"):
        scattermoe.parallel_linear_glu(torch.randn(3, 8), torch.randn(2, 8, 7), 1, se, ss, off)


GLU_MOE_SHAPES = [
    # (T, E, K, D, F, biases, activate_first); biases: both, none, or one alone (b_in and b_out are independent)
    (23, 5, 2, 24, 20, "both", True),   # odd sizes, with biases, JetMoE's half order
    (1, 4, 2, 16, 16, "none", False),   # T=1, ScatterMoE's half order
    (19, 3, 3, 40, 36, "both", False),  # k=E
    (25, 6, 1, 24, 20, "both", True),   # k=1
    (21, 1, 1, 24, 20, "none", True),   # E=1
    (23, 5, 2, 24, 20, "in", True),     # the first GEMM's bias alone
    (19, 3, 3, 40, 36, "out", False),   # the second GEMM's bias alone
]


@pytest.mark.parametrize("combine", ["scatter", "gather"])
@pytest.mark.parametrize("T, E, K, D, F_, biases, activate_first", GLU_MOE_SHAPES)
@pytest.mark.parametrize("dev, dtype", DEVICE_DTYPES)
def test_glu_moe_layer_matches_per_token_reference(T, E, K, D, F_, biases, activate_first, dev, dtype, combine):
    """GLUMLP with SiLU runs ops.glu_moe (fused GLU, G recomputed in backward): every gradient, gates included,
    with either top-k combine (scattermoe.set_topk_combine)."""
    layer = scattermoe.GLUMLP(D, F_, E, K, bias=biases != "none", activate_first=activate_first).to(dev, dtype)
    if biases != "none":
        with torch.no_grad():
            for b in (layer.experts.bias, layer.output_experts.bias):
                b.normal_()
        if biases != "both":
            (layer.output_experts if biases == "in" else layer.experts).bias = None
    x = torch.randn(T, D, dtype=dtype, device=dev, requires_grad=True)
    p, idx = scattermoe.topk_gating(torch.randn(T, E, device=dev), K)
    p = p.to(dtype).requires_grad_()
    with scattermoe.use_backend("triton"), scattermoe.use_topk_combine(combine):
        y = layer(x, p, idx)
    dy = torch.randn_like(y)
    inputs = [x, p] + list(layer.parameters())
    grads = torch.autograd.grad(y, inputs, dy)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    params = dict(zip([n for n, _ in layer.named_parameters()], ref[2:]))
    w_in, w_out = params["experts.weight"], params["output_experts.weight"]
    b_in, b_out = params.get("experts.bias"), params.get("output_experts.bias")
    y_ref = reference.moe_mlp_per_token(ref[0], ref[1], idx.cpu(), w_in, w_out, b_in, b_out, F.silu, activate_first)
    ref_grads = torch.autograd.grad(y_ref, ref, dy.double())
    names = ["y", "dx", "dgates"] + [f"d{n}" for n, _ in layer.named_parameters()]
    for name, out, want in zip(names, (y,) + grads, (y_ref,) + ref_grads):
        err = _rel(out, want, name)
        assert err < TOL[dtype], f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("dev", DEVICES)
def test_glu_backward_kernel_writes_every_element(dev):
    from scattermoe.backends.triton import glu_backward

    N, F_ = 37, 45  # neither a multiple of the row nor the column block
    pre, dg, scale = torch.randn(N, 2 * F_, device=dev), torch.randn(N, F_, device=dev), torch.rand(N, device=dev)
    dh, g, dot = glu_backward(pre, dg, True, scale, store_g=True, store_dot=True)
    assert not (dh.isnan().any() or g.isnan().any() or dot.isnan().any())
    pre_ref = pre.double().requires_grad_()
    g_ref = reference.glu(pre_ref, F.silu, True)
    (dh_ref,) = torch.autograd.grad(g_ref, pre_ref, dg.double() * scale.double()[:, None])
    assert _rel(dh, dh_ref, "dh") < 1e-5
    assert _rel(g, g_ref * scale.double()[:, None], "g") < 1e-5  # stored gate-scaled: the dW2 GEMM's operand
    assert _rel(dot, (dg.double() * g_ref).sum(-1), "dot") < 1e-5


GRAD_ALONE = [  # (op, the one input that requires grad): a router-only or bias-only fine-tune
    ("parallel_linear_glu", "x"), ("parallel_linear_glu", "w"), ("parallel_linear_glu", "b"),
    ("glu_moe", "x"), ("glu_moe", "w_in"), ("glu_moe", "b_in"), ("glu_moe", "w_out"), ("glu_moe", "b_out"),
    ("glu_moe", "gates"),
]


@pytest.mark.parametrize("op, alone", GRAD_ALONE, ids=[f"{op}-{name}" for op, name in GRAD_ALONE])
@pytest.mark.parametrize("dev", DEVICES)
def test_grad_of_one_input_alone_matches_reference(op, alone, dev):
    """Only one input requires grad (frozen experts, trainable router; or only a bias): the kernel op must
    still keep the pre-activation its backward needs, and that one gradient must match the reference."""
    T, E, K, D, F_ = 13, 4, 2, 24, 20
    logits = torch.randn(T, E, device=dev)
    gates, idx = scattermoe.topk_gating(logits, K)
    routing = scattermoe.flatten_sort_count(idx, E)
    if op == "parallel_linear_glu":
        t = {"x": torch.randn(T, D, device=dev), "w": torch.randn(E, D, 2 * F_, device=dev) / D**0.5,
             "b": torch.randn(E, 2 * F_, device=dev)}
    else:
        t = {"x": torch.randn(T, D, device=dev), "w_in": torch.randn(E, D, 2 * F_, device=dev) / D**0.5,
             "w_out": torch.randn(E, F_, D, device=dev) / F_**0.5, "gates": gates,
             "b_in": torch.randn(E, 2 * F_, device=dev), "b_out": torch.randn(E, D, device=dev)}
    t[alone] = t[alone].clone().requires_grad_()

    def run(tensors, backend):
        with scattermoe.use_backend(backend):
            if op == "parallel_linear_glu":
                return scattermoe.parallel_linear_glu(tensors["x"], tensors["w"], K, *routing, tensors["b"])
            return scattermoe.glu_moe(tensors["x"], tensors["w_in"], tensors["w_out"], tensors["gates"], routing,
                                      tensors["b_in"], tensors["b_out"])

    y = run(t, "triton")
    dy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, t[alone], dy)
    ref = {name: v.detach().double().requires_grad_(name == alone) for name, v in t.items()}
    (want,) = torch.autograd.grad(run(ref, "torch"), ref[alone], dy.double())
    assert _rel(grad, want, f"d{alone}") < 1e-5
