"""Seeded random configurations of parallel_linear and glu_moe against the float64 reference: layouts and
routings the named-case tests do not combine.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D input features, F output features.

Each case draws (from its own seed) sizes around the interpreter's 32-wide tiles, a routing, a mode (grouped
in/out, gated from tokens, from grouped rows or from slot rows), and for every operand a memory layout: a row
slice, a column slice, a transposed buffer, or a stride-0 view (one expert's weights shared by all, one token
repeated: ``expand``). The routing may come with each expert's rows in a shuffled order (still valid: only the
experts' order is part of the contract) and in int32. Only some operands require grad, and the incoming
gradient may itself be a stride-0 view (that of ``y.sum()``). Forward and every gradient asked for are
compared with reference.parallel_linear / moe_mlp_per_token in float64 (DESIGN.md section 5 tolerances).
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_all_close

import reference
import scattermoe

LAYOUTS = ("contig", "row_slice", "col_slice", "transposed", "expand")
SIZES = (1, 3, 5, 17, 33, 40)  # around the interpreter's 32-wide tiles, none a multiple of 16


class Operand:
    """An input's value (what the reference reads) and the strided view the op is given instead of it."""

    def __init__(self, value: torch.Tensor, layout: str) -> None:
        if layout == "expand" and value.size(0) > 1:
            value = value[:1].expand_as(value).clone()  # equal along dim 0, so a stride-0 view can hold it
        self.value, self.layout = value, layout
        if layout == "row_slice":
            buf = value.new_zeros(*value.shape[:-2], 2 * value.size(-2), value.size(-1))
            buf[..., ::2, :] = value
            self.leaf, self.view = buf, lambda t: t[..., ::2, :]
        elif layout == "col_slice":
            buf = value.new_zeros(*value.shape[:-1], value.size(-1) + 3)
            buf[..., 1:-2] = value
            self.leaf, self.view = buf, lambda t: t[..., 1:-2]
        elif layout == "transposed":
            self.leaf, self.view = value.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2)
        elif layout == "expand":
            shape = value.shape
            self.leaf, self.view = value[:1].clone(), lambda t: t.expand(shape)
        else:
            self.leaf, self.view = value.clone(), lambda t: t

    def grad_of_value(self, grad_of_leaf: torch.Tensor) -> torch.Tensor:
        """The leaf's gradient read back as the value's ([1, ...] for expand: summed over dim 0)."""
        return grad_of_leaf if self.layout == "expand" else self.view(grad_of_leaf)

    def reference_grad(self, grad_of_value: torch.Tensor) -> torch.Tensor:
        return grad_of_value.sum(0, keepdim=True) if self.layout == "expand" else grad_of_value


def _routing(rng: random.Random, T: int, E: int, K: int):
    """flatten_sort_count of a random [T, K] routing (distinct, repeated or skewed ids), each expert's rows
    possibly shuffled among themselves, possibly int32; and the ids."""
    kind = rng.choice(["distinct", "repeat", "one_expert"])
    rows = []
    for _ in range(T):
        if kind == "repeat":          # a token routed K times to one expert
            rows.append([rng.randrange(E)] * K)
        elif kind == "one_expert":    # every token's first slot on expert 0: the others mostly empty
            rows.append([0] + rng.sample(range(1, E), K - 1))
        else:
            rows.append(rng.sample(range(E), K))
    idx_TK = torch.tensor(rows, dtype=torch.long).view(T, K)
    sorted_expert, sorted_scattered, offsets_E = scattermoe.flatten_sort_count(idx_TK, E)
    if rng.random() < 0.5:  # another valid order of the rows within each expert
        sorted_scattered = sorted_scattered.clone()
        start = 0
        for end in offsets_E.tolist():
            sorted_scattered[start:end] = sorted_scattered[start:end][torch.randperm(end - start)]
            start = end
    routing = (sorted_expert, sorted_scattered, offsets_E)
    if rng.random() < 0.3:
        routing = tuple(t.int() for t in routing)
    return idx_TK, routing


def _check(rng, backend, dtype, operands, ours, ref):
    """ours(views) on backend vs ref(float64 values): forward and the gradients of the operands drawn to need one."""
    names = [n for n, o in operands.items() if o is not None]
    wanted = [n for n in names if rng.random() < 0.75] or [rng.choice(names)]
    for n in wanted:
        operands[n].leaf.requires_grad_()
    with scattermoe.use_backend(backend):
        y = ours({n: (o.view(o.leaf) if o is not None else None) for n, o in operands.items()})
    dy = torch.ones((), dtype=y.dtype).expand(y.shape) if rng.random() < 0.3 else torch.randn(y.shape).to(y.dtype)
    grads = torch.autograd.grad(y, [operands[n].leaf for n in wanted], dy)

    values = {n: (o.value.double().requires_grad_() if o is not None else None) for n, o in operands.items()}
    y_ref = ref(values)
    ref_grads = torch.autograd.grad(y_ref, [values[n] for n in wanted], dy.double(), allow_unused=True)
    outs = [y] + [operands[n].grad_of_value(g) for n, g in zip(wanted, grads)]
    refs = [y_ref] + [operands[n].reference_grad(g if g is not None else torch.zeros_like(values[n]))
                      for n, g in zip(wanted, ref_grads)]
    layouts = {n: operands[n].layout for n in names}
    assert y.dtype == dtype, f"{layouts}: y is {y.dtype}"
    assert_all_close(["y"] + [f"d{n} ({layouts})" for n in wanted], outs, refs, TOL[dtype])


def _draw(rng, dtype):
    T, E = rng.randint(1, 7), rng.randint(1, 5)
    K = rng.randint(1, E)
    D, F_ = rng.choice(SIZES), rng.choice(SIZES)
    # float16: x never as a stride-0 view (its gradient is then a float16 sum over tokens, by torch's autograd)
    x_layouts = ("contig", "row_slice", "col_slice") + (("expand",) if dtype == torch.float32 else ())
    return T, E, K, D, F_, x_layouts


CASES = [pytest.param(seed, backend, combine, dtype, id=f"{backend}-{combine}-{str(dtype)[6:]}-{seed}")
         for backend in ("triton", "torch") for seed, combine, dtype in (
             (1, "scatter", torch.float32), (2, "gather", torch.float32), (3, "gather", torch.float16),
             (4, "scatter", torch.float16))]


@pytest.mark.interpreter
@pytest.mark.parametrize("seed, backend, combine, dtype", CASES)
def test_parallel_linear_random_configs(seed, backend, combine, dtype):
    rng = random.Random(seed)
    for _ in range(4):
        T, E, K, D, F_, x_layouts = _draw(rng, dtype)
        idx_TK, routing = _routing(rng, T, E, K)
        mode = rng.choice(["s2s", "s2g", "g2s", "g2g", "gated_tokens", "gated_grouped", "gated_slot_rows"])
        grouped_in, grouped_out = mode in ("g2s", "g2g", "gated_grouped"), mode in ("s2g", "g2g")
        k_arg = 1 if grouped_in or mode == "gated_slot_rows" else K
        rows = T * K if k_arg == 1 else T
        operands = {
            "x": Operand(torch.randn(rows, D).to(dtype), rng.choice(x_layouts)),
            "w": Operand((torch.randn(E, D, F_) / math.sqrt(D)).to(dtype), rng.choice(LAYOUTS)),
            "b": Operand(torch.randn(E, F_).to(dtype), rng.choice(LAYOUTS)) if rng.random() < 0.5 else None,
            "gates": (Operand(torch.softmax(torch.randn(T, K), -1).to(dtype), rng.choice(LAYOUTS))
                      if mode.startswith("gated") else None),
        }

        def ours(v):
            return scattermoe.parallel_linear(v["x"], v["w"], k_arg, *routing, v["b"], v["gates"], grouped_in,
                                              grouped_out)

        def ref(v):
            return reference.parallel_linear(v["x"], v["w"], k_arg, *routing, v["b"], v["gates"], grouped_in,
                                             grouped_out)

        with scattermoe.use_topk_combine(combine):
            _check(rng, backend, dtype, operands, ours, ref)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed, backend, combine, dtype", CASES)
def test_glu_moe_random_configs(seed, backend, combine, dtype):
    rng = random.Random(100 + seed)
    for _ in range(3):
        T, E, K, D, F_, x_layouts = _draw(rng, dtype)
        idx_TK, routing = _routing(rng, T, E, K)
        activate_first = rng.random() < 0.5
        operands = {
            "x": Operand(torch.randn(T, D).to(dtype), rng.choice(x_layouts)),
            "w_in": Operand((torch.randn(E, D, 2 * F_) / math.sqrt(D)).to(dtype), rng.choice(LAYOUTS)),
            "w_out": Operand((torch.randn(E, F_, D) / math.sqrt(F_)).to(dtype), rng.choice(LAYOUTS)),
            "gates": Operand(torch.softmax(torch.randn(T, K), -1).to(dtype), rng.choice(LAYOUTS)),
            "b_in": Operand(torch.randn(E, 2 * F_).to(dtype), rng.choice(LAYOUTS)) if rng.random() < 0.5 else None,
            "b_out": Operand(torch.randn(E, D).to(dtype), rng.choice(LAYOUTS)) if rng.random() < 0.5 else None,
        }

        def ours(v):
            return scattermoe.glu_moe(v["x"], v["w_in"], v["w_out"], v["gates"], routing, v["b_in"], v["b_out"],
                                      activate_first)

        def ref(v):
            return reference.moe_mlp_per_token(v["x"], v["gates"], idx_TK, v["w_in"].transpose(1, 2),
                                               v["w_out"].transpose(1, 2), v["b_in"], v["b_out"], F.silu,
                                               activate_first)

        with scattermoe.use_topk_combine(combine):
            _check(rng, backend, dtype, operands, ours, ref)
