"""Bad input raises ValueError/TypeError naming the argument (DESIGN.md section 3); backend selection.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D input features, F output features.
The checks run before any backend is chosen, so each case runs on the triton and torch backends alike:
neither may compute on bad input.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_expert_idxs

import scattermoe
from scattermoe import backends

T, E, K, D, F = 6, 3, 2, 8, 5
N = T * K


def _valid_args() -> dict:
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = scattermoe.flatten_sort_count(
        make_expert_idxs(T, E, K), E)
    return dict(x=torch.randn(T, D), expert_weights=torch.randn(E, D, F), k=K,
                sorted_expert_idxs=sorted_expert_idxs, sorted_scattered_idxs=sorted_scattered_idxs,
                expert_offsets=expert_offsets, expert_biases=None, gates=None, grouped_in=False, grouped_out=False)


def _with_value(name, index, value):
    """A copy of the routing tensor ``name`` with one entry replaced (keeps shape and dtype)."""
    def change(args):
        t = args[name].clone()
        t[index] = value
        return t
    return change


# id -> (overrides: {argument: value or function of the valid args}, exception type, regex the message must match)
BAD_INPUTS = {
    "x_3d": ({"x": torch.randn(T, 1, D)}, ValueError, r"^x: .*2-d"),
    "x_1d": ({"x": torch.randn(D)}, ValueError, r"^x: .*2-d"),
    "x_not_a_tensor": ({"x": [[0.0] * D] * T}, TypeError, r"^x: .*Tensor"),
    "x_wrong_feature_size": ({"x": torch.randn(T, D + 1)}, ValueError, rf"^x: expected {D} features"),
    "x_int": ({"x": torch.randint(0, 3, (T, D))}, TypeError, r"^x: .*dtype"),
    "x_transposed": ({"x": torch.randn(D, T).t()}, ValueError, r"^x: .*row-major"),
    "weights_dtype_mismatch": ({"expert_weights": torch.randn(E, D, F, dtype=torch.float64)}, TypeError,
                               r"^expert_weights: .*dtype"),
    "weights_2d": ({"expert_weights": torch.randn(D, F)}, ValueError, r"^expert_weights: .*3-d"),
    "weights_on_another_device": ({"expert_weights": torch.randn(E, D, F, device="meta")}, ValueError,
                                  r"^expert_weights: .*cpu"),
    "biases_wrong_shape": ({"expert_biases": torch.randn(E, F + 1)}, ValueError, r"^expert_biases: "),
    "biases_dtype_mismatch": ({"expert_biases": torch.randn(E, F, dtype=torch.float16)}, TypeError,
                              r"^expert_biases: .*dtype"),
    "k_zero": ({"k": 0}, ValueError, r"^k: "),
    "k_bool": ({"k": True}, ValueError, r"^k: "),  # not taken as k=1
    "k_float": ({"k": 2.0}, ValueError, r"^k: "),
    "grouped_out_a_string": ({"grouped_out": "no"}, ValueError, r"^grouped_out: expected True or False"),
    "grouped_in_none": ({"grouped_in": None}, ValueError, r"^grouped_in: expected True or False"),
    # A tensor where the flag goes (2024's positional order, plus expert_biases): named, not bool()'s error.
    "grouped_in_a_tensor": ({"grouped_in": torch.ones(T, K)}, ValueError,
                            rf"^grouped_in: expected True or False, got a Tensor of shape \({T}, {K}\)"),
    "routing_shorter_than_T_times_k": (
        {"sorted_expert_idxs": lambda a: a["sorted_expert_idxs"][:-2],
         "sorted_scattered_idxs": lambda a: a["sorted_scattered_idxs"][:-2]},
        ValueError, rf"^sorted_expert_idxs: expected T\*k = {T}\*{K} = {N}"),
    "routing_longer_than_T_times_k": (
        {"x": torch.randn(T - 1, D)}, ValueError, rf"^sorted_expert_idxs: expected T\*k = {T - 1}\*{K}"),
    "scattered_idxs_wrong_length": ({"sorted_scattered_idxs": lambda a: a["sorted_scattered_idxs"][:-1]},
                                    ValueError, r"^sorted_scattered_idxs: "),
    "routing_float": ({"sorted_expert_idxs": lambda a: a["sorted_expert_idxs"].float()}, TypeError,
                      r"^sorted_expert_idxs: .*dtype"),
    "routing_not_contiguous": (  # every other element of a twice-as-long tensor
        {"sorted_scattered_idxs": lambda a: a["sorted_scattered_idxs"].repeat_interleave(2)[::2]},
        ValueError, r"^sorted_scattered_idxs: expected a contiguous"),
    "routing_2d": ({"sorted_scattered_idxs": lambda a: a["sorted_scattered_idxs"].view(T, K)}, ValueError,
                   r"^sorted_scattered_idxs: .*1-d"),
    "expert_offsets_wrong_length": ({"expert_offsets": lambda a: a["expert_offsets"][:-1]}, ValueError,
                                    rf"^expert_offsets: expected \[E={E}\], one end per expert .* \(routing for "
                                    r"another number of experts\?\)$"),
    "expert_offsets_strided": ({"expert_offsets": lambda a: torch.stack([a["expert_offsets"]] * 2, 1)[:, 0]},
                               ValueError, r"^expert_offsets: expected a contiguous tensor$"),
    "expert_offsets_not_ending_at_N": ({"expert_offsets": _with_value("expert_offsets", -1, N - 1)}, ValueError,
                                       r"^expert_offsets: "),
    "expert_offsets_decreasing": ({"expert_offsets": lambda a: torch.tensor([3, 1, N])}, ValueError,
                                  r"^expert_offsets: "),
    "gates_with_grouped_out": ({"gates": torch.rand(T, K), "grouped_out": True}, ValueError, r"^gates: .*grouped_out"),
    "gates_wrong_width": ({"gates": torch.rand(T, K + 1)}, ValueError, r"^gates: "),
    "gates_wrong_length": ({"gates": torch.rand(T - 1, K)}, ValueError, r"^gates: "),
    # T*k entries in another [T', k'] shape: the count alone would pass, and slots of other tokens would be summed.
    "gates_T_times_k_entries_of_another_width": ({"gates": torch.rand(N // (K + 1), K + 1)}, ValueError,
                                                 rf"^gates: expected \[T, k={K}\]"),
    "gates_1d": ({"gates": torch.rand(N)}, ValueError, r"^gates: .*2-d"),
    "gates_int": ({"gates": torch.ones(T, K, dtype=torch.long)}, TypeError, r"^gates: .*dtype"),
    "grouped_in_with_T_rows": ({"grouped_in": True, "k": 1}, ValueError, rf"^x: .*N={N}"),
    "expert_id_too_large": ({"sorted_expert_idxs": _with_value("sorted_expert_idxs", -1, E)}, ValueError,
                            r"^sorted_expert_idxs: .*expert ids"),
    "expert_id_negative": ({"sorted_expert_idxs": _with_value("sorted_expert_idxs", 0, -1)}, ValueError,
                           r"^sorted_expert_idxs: .*expert ids"),
    "slot_id_out_of_range": ({"sorted_scattered_idxs": _with_value("sorted_scattered_idxs", 0, N)}, ValueError,
                             r"^sorted_scattered_idxs: .*slot ids"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_parallel_linear_rejects_bad_input(case, backend):
    overrides, error, pattern = BAD_INPUTS[case]
    args = _valid_args()
    for name, value in overrides.items():
        args[name] = value(args) if callable(value) else value
    with scattermoe.use_backend(backend):
        with pytest.raises(error, match=pattern):
            scattermoe.parallel_linear(**args)


# Routing tensors that are each in range but disagree: without a check the triton backend would leave rows
# unwritten or assign them to the wrong expert. Checked on the CPU (values are on the host) and in debug mode.
ROUTING_INCONSISTENT = {
    # id -> (sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, argument named); T=4, K=1, E=2
    "slot_ids_not_a_permutation": ([0, 0, 1, 1], [0, 0, 2, 3], [2, 4], "sorted_scattered_idxs"),
    "offsets_disagree_with_sorted_expert_idxs": ([0, 0, 1, 1], [0, 1, 2, 3], [1, 4], "expert_offsets"),
    # right counts and a permutation, but the ids not grouped: each expert's rows would be read from the wrong slots
    "expert_ids_not_sorted": ([0, 1, 0, 1], [0, 1, 2, 3], [2, 4], "sorted_expert_idxs"),
}



@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
@pytest.mark.parametrize("case", list(ROUTING_INCONSISTENT))
def test_parallel_linear_rejects_inconsistent_routing_on_the_cpu(case, backend):
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, name = ROUTING_INCONSISTENT[case]
    with scattermoe.use_backend(backend), pytest.raises(ValueError, match=rf"^{name}: "):
        scattermoe.parallel_linear(torch.randn(4, D), torch.randn(2, D, F), 1, torch.tensor(sorted_expert_idxs),
                                   torch.tensor(sorted_scattered_idxs), torch.tensor(expert_offsets))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_parallel_linear_rejects_offsets_past_zero_rows(backend):
    """No routed rows (T=0) but offsets that give an expert rows: refused, not read as rows that do not exist."""
    empty = torch.empty(0, dtype=torch.long)
    with scattermoe.use_backend(backend), pytest.raises(ValueError, match=r"^expert_offsets: expected all zeros"):
        scattermoe.parallel_linear(torch.randn(0, D), torch.randn(3, D, F), 1, empty, empty, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_valid_arguments_pass(backend):
    """The baseline of the cases above is itself valid (so each case fails for its own reason)."""
    args = _valid_args()
    with scattermoe.use_backend(backend):
        assert scattermoe.parallel_linear(**args).shape == (N, F)
        args["gates"] = torch.rand(T, K)
        assert scattermoe.parallel_linear(**args).shape == (T, F)


def test_parallel_linear_glu_rejects_odd_width():
    args = _valid_args()
    args.pop("gates")
    args["expert_weights"] = torch.randn(E, D, 7)
    with pytest.raises(ValueError, match=r"^expert_weights: .*even"):
        scattermoe.parallel_linear_glu(**args)


def test_glu_moe_rejects_mismatched_second_weight():
    x = torch.randn(T, D)
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    with pytest.raises(ValueError, match=r"^w_out: "):
        scattermoe.glu_moe(x, torch.randn(E, D, 2 * F), torch.randn(E, F + 1, D), torch.rand(T, K), routing)
    with pytest.raises(ValueError, match=r"^gates: "):
        scattermoe.glu_moe(x, torch.randn(E, D, 2 * F), torch.randn(E, F, D), torch.rand(T + 1, K), routing)


B, L = 2, 3

LAYER_FACTORIES = {
    "MLP": lambda: scattermoe.MLP(D, F, E, K),
    "GLUMLP": lambda: scattermoe.GLUMLP(D, F, E, K),
    "MoA.map": lambda: scattermoe.MoA(D, 4, 2, E, K).map,
}

LAYER_BAD_ROUTING = {
    # id -> (expert_p shape, expert_idxs shape, argument named)
    # [B*L, K] and flat [B*L*K] ids are taken (the original ScatterMoE's layers took them); [L, B, K] is not
    "expert_idxs_other_layout": ((B, L, K), (L, B, K), "expert_idxs"),
    "expert_p_flat": ((B * L * K,), (B, L, K), "expert_p"),
    "expert_idxs_too_many_slots": ((B, L, K), (B, L, K + 1), "expert_idxs"),
    "expert_idxs_no_slot_dim": ((B, L, K), (B, L), "expert_idxs"),
    "expert_p_wrong_shape": ((B, L, K + 1), (B, L, K), "expert_p"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", list(LAYER_BAD_ROUTING))
@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_layers_reject_routing_of_wrong_shape(layer, case, backend):
    p_shape, idx_shape, name = LAYER_BAD_ROUTING[case]
    forward = LAYER_FACTORIES[layer]()
    x = torch.randn(B, L, D)
    with scattermoe.use_backend(backend), pytest.raises(ValueError, match=rf"^{name}: "):
        forward(x, torch.rand(p_shape), torch.randint(0, E, idx_shape))


@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_layers_reject_out_of_range_expert_ids(layer):
    forward = LAYER_FACTORIES[layer]()
    idx = make_expert_idxs(B * L, E, K).view(B, L, K)
    idx[1, 2, 0] = E
    with pytest.raises(ValueError, match=r"^expert_idxs: "):
        forward(torch.randn(B, L, D), torch.rand(B, L, K), idx)


@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_layers_name_routing_of_another_device_or_dtype_by_their_own_arguments(layer):
    """Said with the layer's argument names (the ops below call them sorted_expert_idxs and gates)."""
    forward = LAYER_FACTORIES[layer]()
    x, p, idx = torch.randn(B, L, D), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K)
    for args, error, message in (((x, p, idx.to("meta")), ValueError, r"^expert_idxs: expected a tensor on cpu"),
                                 ((x, p.to("meta"), idx), ValueError, r"^expert_p: expected a tensor on cpu"),
                                 ((x, p, idx.float()), TypeError, r"^expert_idxs: expected dtype"),
                                 ((x, idx, idx), TypeError, r"^expert_p: expected dtype")):
        with pytest.raises(error, match=message):
            forward(*args)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_layers_take_x_transposed_as_a_loop_would(layer, backend):
    """A drop-in takes what the loop took: x [T, D] with its features not contiguous (a transpose) gives the result
    of x.contiguous() (the ops refuse it: a copy is the layer's to make)."""
    forward = LAYER_FACTORIES[layer]()
    x = torch.randn(D, B * L).t()
    assert x.stride(-1) != 1
    p, idx = torch.rand(B * L, K), make_expert_idxs(B * L, E, K)
    with scattermoe.use_backend(backend):
        got, want = forward(x, p, idx), forward(x.contiguous(), p, idx)
    for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        if isinstance(g, torch.Tensor):
            assert torch.equal(g, w)


def test_moa_reduce_rejects_attention_output_of_wrong_shape():
    moa = scattermoe.MoA(D, 4, 2, E, K)
    _, routing = moa.map(torch.randn(B, L, D), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))
    with pytest.raises(ValueError, match=r"^attn_out: "):
        moa.reduce(torch.randn(B, L, 2, 4), routing)  # H heads, not H*K


def test_moa_reduce_rejects_routing_made_for_other_tokens():
    moa = scattermoe.MoA(D, 4, 2, E, K)
    _, routing = moa.map(torch.randn(B, L, D), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))
    q_other, _ = moa.map(torch.randn(B, L - 1, D), torch.rand(B, L - 1, K),
                         make_expert_idxs(B * (L - 1), E, K).view(B, L - 1, K))
    with pytest.raises(ValueError, match=rf"^routing: made by map for {B * L} tokens, but attn_out holds "
                                         rf"{B * (L - 1)}"):
        moa.reduce(q_other, routing)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("layer", ["mlp", "glumlp", "moa_map", "moa_reduce"])
def test_layers_say_how_to_resolve_a_dtype_mismatch(layer, dtype):
    """x in another dtype than the layer's weights (no autocast): the error says the two dtypes and the ways out,
    autocast only where it would cast x (it leaves float64 alone). MoA.reduce names its own argument, attn_out.
    (Said where the weights are read, not by the layer beforehand: under FSDP a layer's weights are only in their
    compute dtype once its hooks have run.)"""
    p, idx = torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K)
    x = torch.randn(B, L, D, dtype=dtype)
    x_name = "x"
    if layer == "mlp":
        call = lambda: scattermoe.MLP(D, 6, E, K)(x, p, idx)  # noqa: E731
    elif layer == "glumlp":
        call = lambda: scattermoe.GLUMLP(D, 6, E, K)(x, p, idx)  # noqa: E731
    else:
        moa = scattermoe.MoA(D, 4, 2, E, K)
        q, routing = moa.map(x.float(), p, idx)
        call = (lambda: moa.map(x, p, idx)) if layer == "moa_map" else (lambda: moa.reduce(q.to(dtype), routing))
        x_name = "attn_out" if layer == "moa_reduce" else "x"
    name = str(dtype).replace("torch.", "")
    autocast = " or run under torch.autocast" if dtype != torch.float64 else ""
    with pytest.raises(TypeError, match=rf"dtype float32 differs from {x_name}'s dtype {name}: convert one to the "
                                        rf"other \(e.g. the layer with .to\(torch.{name}\)\){autocast}$"):
        call()


@pytest.mark.parametrize("float64", ["input", "layer"])
@pytest.mark.parametrize("layer", ["glumlp", "moa_reduce"])
def test_under_autocast_the_float64_side_is_said_to_be_left_alone(layer, float64):
    """torch.autocast casts float32/16 and bfloat16 and leaves float64 as it is (as torch does): the error says
    which side it left, and not "run under torch.autocast" to a caller who was."""
    p, idx = torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K)
    x = torch.randn(B, L, D, dtype=torch.float64 if float64 == "input" else torch.float32)
    if layer == "glumlp":
        module = scattermoe.GLUMLP(D, 6, E, K)
        call, x_name, w_name = (lambda: module(x, p, idx)), "x", "experts.weight"
    else:
        module = moa = scattermoe.MoA(D, 4, 2, E, K)
        q, routing = moa.map(x.float(), p, idx)
        call, x_name, w_name = (lambda: moa.reduce(q.to(x.dtype), routing)), "attn_out", "output_linear.weight"
    if float64 == "layer":
        module.double()
    kept = x_name if float64 == "input" else w_name
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(
            TypeError, match=rf"torch.autocast casts float32, float16 and bfloat16 to float16 but leaves "
                             rf"{re.escape(kept)} \(float64\) as it is"):
        call()
    # Outside autocast a float64 side is converted, autocast would not help: not offered.
    with pytest.raises(TypeError, match=r"differs from .*\)\)$"):
        call()


def test_moa_reduce_rejects_routing_that_map_did_not_return():
    moa = scattermoe.MoA(D, 4, 2, E, K)
    q, routing = moa.map(torch.randn(B, L, D), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))
    with pytest.raises(TypeError, match=r"^routing: "):
        moa.reduce(q, tuple(routing)[:2])


def test_glu_moe_names_the_argument_at_fault():
    x, gates = torch.randn(T, D), torch.rand(T, K)
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    with pytest.raises(ValueError, match=rf"^x: expected {D} features"):  # not blamed on w_out
        scattermoe.glu_moe(torch.randn(T, D + 1), torch.randn(E, D, 2 * F), torch.randn(E, F, D), gates, routing)
    with pytest.raises(ValueError, match=r"^w_in: .*even"):
        scattermoe.glu_moe(x, torch.randn(E, D, 2 * F + 1), torch.randn(E, F, D), gates, routing)
    with pytest.raises(ValueError, match=rf"^b_out: expected shape \({E}, {D}\)"):
        scattermoe.glu_moe(x, torch.randn(E, D, 2 * F), torch.randn(E, F, D), gates, routing, None,
                           torch.randn(E, D + 1))
    for bad in (routing[:2], routing[0]):
        with pytest.raises(TypeError, match=r"^expert_idxs_sorted: "):
            scattermoe.glu_moe(x, torch.randn(E, D, 2 * F), torch.randn(E, F, D), gates, bad)


LAYER_BAD_CONSTRUCTION = {
    # id -> (constructor, argument named)
    "experts_negative": (lambda: scattermoe.ParallelExperts(-1, D, F), "num_experts"),
    "experts_float": (lambda: scattermoe.ParallelExperts(2.5, D, F), "num_experts"),
    "output_size_zero": (lambda: scattermoe.ParallelExperts(E, D, 0), "output_size"),
    "mlp_top_k_zero": (lambda: scattermoe.MLP(D, F, E, 0), "top_k"),
    "glu_hidden_zero": (lambda: scattermoe.GLUMLP(D, 0, E, K), "hidden_size"),
    "glu_experts_zero": (lambda: scattermoe.GLUMLP(D, F, 0, K), "num_experts"),
    "glu_top_k_bool": (lambda: scattermoe.GLUMLP(D, F, E, True), "top_k"),
    "moa_heads_zero": (lambda: scattermoe.MoA(D, 4, 0, E, K), "num_heads"),
    "moa_input_negative": (lambda: scattermoe.MoA(-D, 4, 2, E, K), "input_size"),
}


@pytest.mark.parametrize("case", list(LAYER_BAD_CONSTRUCTION))
def test_layers_reject_bad_sizes_at_construction(case):
    make, name = LAYER_BAD_CONSTRUCTION[case]
    with pytest.raises(ValueError, match=rf"^{name}: expected an int >= 1"):
        make()


def test_layers_take_numpy_ints_and_clamp_top_k_to_the_experts_like_the_original():
    import numpy as np

    layer = scattermoe.GLUMLP(np.int64(D), np.int64(F), np.int64(E), np.int64(E + 2))
    assert layer.top_k == E and type(layer.top_k) is int
    for other in (scattermoe.MLP(D, F, E, np.int64(E + 2)), scattermoe.MoA(D, 4, 2, E, np.int64(E + 2))):
        assert other.top_k == E and type(other.top_k) is int, type(other).__name__


@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_layers_reject_0d_and_meta_inputs(layer):
    forward = LAYER_FACTORIES[layer]()
    with pytest.raises(ValueError, match=r"^x: .*0-d"):
        forward(torch.tensor(1.0), torch.rand(K), torch.zeros(K, dtype=torch.long))
    with pytest.raises(TypeError, match=r"^x: .*Tensor"):
        forward([[0.0] * D], torch.rand(1, K), torch.zeros(1, K, dtype=torch.long))
    meta = torch.device("meta")
    with pytest.raises(ValueError, match=r"meta device"):
        forward(torch.randn(B, L, D, device=meta), torch.rand(B, L, K, device=meta),
                torch.zeros(B, L, K, dtype=torch.long, device=meta))


def test_parallel_linear_refuses_meta_tensors_by_name():
    args = {name: (v.to("meta") if isinstance(v, torch.Tensor) else v) for name, v in _valid_args().items()}
    with pytest.raises(ValueError, match=r"^x: .*meta device"):
        scattermoe.parallel_linear(**args)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_original_group_bwd_w_refuses_meta_tensors_by_name(backend):
    """(The torch backend read the offsets' values: torch's "Cannot copy out of meta tensor".)"""
    from scattermoe.kernels import ops as kernel_ops

    dy, x, offsets = torch.randn(N, F, device="meta"), torch.randn(N, D, device="meta"), torch.tensor([2, 5, N])
    with scattermoe.use_backend(backend), pytest.raises(ValueError, match=r"^X: .*meta device"):
        kernel_ops.group_bwd_W(dy, x, offsets.to("meta"), E)


# ---- routing functions ----

def test_topk_gating_rejects_bad_arguments():
    logits = torch.randn(T, E)
    for top_k in (0, E + 1, 1.5, None, True):
        with pytest.raises(ValueError, match=r"^top_k: "):
            scattermoe.topk_gating(logits, top_k)
    with pytest.raises(TypeError, match=r"^router_logits: .*Tensor"):
        scattermoe.topk_gating(logits.tolist(), K)
    with pytest.raises(TypeError, match=r"^router_logits: .*dtype"):
        scattermoe.topk_gating(logits > 0, K)
    for no_experts in (torch.randn(()), torch.randn(T, 0)):
        with pytest.raises(ValueError, match=r"^router_logits: expected \[\.\.\., E\] with E >= 1"):
            scattermoe.topk_gating(no_experts, K)


def test_aux_losses_check_their_inputs_and_are_zero_without_tokens():
    logits = torch.randn(T, E)
    idx = scattermoe.topk_gating(logits, K)[1]
    bad = {
        "idx with other leading dims": ((logits.view(2, T // 2, E), idx, E), ValueError,
                                        rf"^expert_idxs: expected \[2, {T // 2}, K\]"),
        "fewer tokens in idx": ((logits, idx[:3], E), ValueError, r"^expert_idxs: "),
        "E mismatch": ((torch.randn(T, 1), torch.zeros(T, 1, dtype=torch.long), E), ValueError, r"^router_logits: "),
        "id out of range": ((logits, idx.clamp(max=E - 1).index_fill(0, torch.tensor([0]), E), E), ValueError,
                            r"^expert_idxs: "),
        "float ids": ((logits, idx.float(), E), TypeError, r"^expert_idxs: "),
        "float num_experts": ((logits, idx, float(E)), ValueError, r"^num_experts: "),
    }
    for what, (args, error, message) in bad.items():
        with pytest.raises(error, match=message):
            scattermoe.load_balancing_loss(*args)
    empty = torch.randn(0, E, requires_grad=True)
    for loss in (scattermoe.load_balancing_loss(empty, torch.zeros(0, K, dtype=torch.long), E),
                 scattermoe.router_z_loss(empty)):
        assert loss.item() == 0.0 and loss.requires_grad
    assert scattermoe.router_z_loss(logits).item() > 0


def test_load_balancing_loss_refuses_expert_idxs_on_another_device():
    with pytest.raises(ValueError, match=r"^expert_idxs: expected a tensor on cpu"):
        scattermoe.load_balancing_loss(torch.randn(T, E), make_expert_idxs(T, E, K).to("meta"), E)


def test_flatten_sort_count_rejects_a_bool_expert_count():
    with pytest.raises(ValueError, match=r"^num_experts: "):
        scattermoe.flatten_sort_count(torch.zeros(2, 1, dtype=torch.long), True)


@pytest.mark.parametrize("num_experts", [2**31, 2**40, 2**63, 2**64])
def test_flatten_sort_count_names_an_expert_count_past_32_bits(num_experts):
    # (it reached torch.arange: an allocation failure or an int64 overflow, naming no argument)
    with pytest.raises(ValueError, match=r"^num_experts: expected an int in \[1, 2147483647\]"):
        scattermoe.flatten_sort_count(torch.zeros(2, 1, dtype=torch.long), num_experts)


def test_moa_reduce_rejects_routing_made_by_a_layer_with_other_experts():
    other = scattermoe.MoA(D, 4, 2, E + 1, K)
    q, routing = other.map(torch.randn(B, L, D), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))
    with pytest.raises(ValueError, match=rf"^routing: made by a map over {E + 1} experts, but this layer has {E}"):
        scattermoe.MoA(D, 4, 2, E, K).reduce(q, routing)


@pytest.mark.parametrize("other_k, tokens", [(1, 2 * B * L), (3, B * L)], ids=["k1_twice_the_tokens", "k3"])
def test_moa_reduce_rejects_routing_made_by_a_layer_with_another_top_k(other_k, tokens):
    """k=1 routing over twice the tokens has as many gates as this k=2 layer's: accepted, it paired tokens with
    other tokens' experts. k=3 over as many tokens failed in a reshape."""
    other = scattermoe.MoA(D, 4, 2, E, other_k)
    _, routing = other.map(torch.randn(tokens, D), torch.rand(tokens, other_k), make_expert_idxs(tokens, E, other_k))
    q = torch.randn(B, L, 2 * K, 4)  # this layer: 2 heads of 4
    with pytest.raises(ValueError, match=rf"^routing: made by a map with top_k={other_k}, but this layer has top_k"):
        scattermoe.MoA(D, 4, 2, E, K).reduce(q, routing)


# ---- backend selection ----

def test_set_backend_rejects_unknown_names():
    before = scattermoe.get_backend()
    for bad in ("cuda", "Triton", ""):
        with pytest.raises(ValueError, match=r"^backend: "):
            scattermoe.set_backend(bad)
    with pytest.raises(ValueError, match=r"^backend: "):
        with scattermoe.use_backend("nope"):
            pass
    assert scattermoe.get_backend() == before


def test_cutlass_backend_is_refused_with_a_reason():
    """No csrc build is usable on this machine (no extension, or no CUDA): a RuntimeError saying why, never
    a silent fallback. (Today the message says the extension is not built; once the cutlass backend is wired
    in, a built extension without a GPU reports the missing CUDA instead.)"""
    args = _valid_args()
    with scattermoe.use_backend("cutlass"):
        with pytest.raises(RuntimeError, match=r"cutlass.*(not built|CUDA|cuda|driver)"):
            scattermoe.parallel_linear(**args)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_parallel_linear_takes_numpy_ints_and_bools(backend):
    """k as a numpy int and the flags as numpy bools (what indexing a config array gives) mean what they say."""
    np = pytest.importorskip("numpy")
    args = _valid_args()
    args["gates"] = torch.rand(T, K)
    with scattermoe.use_backend(backend):
        want = scattermoe.parallel_linear(**args)
        got = scattermoe.parallel_linear(**{**args, "k": np.int64(K), "grouped_in": np.bool_(False),
                                            "grouped_out": np.bool_(False)})
    assert torch.equal(got, want)


@pytest.mark.interpreter
@pytest.mark.parametrize("reentrant", [False, True])
def test_use_backend_holds_in_a_backward_run_on_another_thread(reentrant):
    """On CUDA autograd runs backward on its own thread, and activation checkpointing recomputes the forward there:
    it must run on the backend of the use_backend block the forward ran in (emulated: backward from a thread)."""
    import threading

    from torch.utils.checkpoint import checkpoint

    scattermoe.set_backend("triton")
    layer = scattermoe.MLP(D, F, E, K)
    x = torch.randn(T, D, requires_grad=True)
    gates, idx = scattermoe.topk_gating(torch.randn(T, E), K)
    seen, errors = [], []

    def forward(x):
        seen.append(scattermoe.get_backend())
        return layer(x, gates, idx)

    def backward(out):
        try:
            out.backward()
        except Exception as exc:  # reported below, with the backends seen
            errors.append(exc)

    with scattermoe.use_backend("torch"):
        out = checkpoint(forward, x, use_reentrant=reentrant).square().sum()
        thread = threading.Thread(target=backward, args=(out,))
        thread.start()
        thread.join(60)
    assert not errors and seen == ["torch", "torch"], (seen, errors)


@pytest.mark.interpreter
def test_a_backward_runs_on_the_backend_of_its_forward_after_the_block_has_ended(monkeypatch):
    """use_backend's docstring: the forward inside a triton block, the backward after it, with the torch backend in
    force by then: the backward's kernels are still Triton's (and its gradients those of the torch backend)."""
    scattermoe.set_backend("torch")
    layer = scattermoe.GLUMLP(D, F, E, K)
    x = torch.randn(T, D, requires_grad=True)
    gates, idx = scattermoe.topk_gating(torch.randn(T, E), K)
    with scattermoe.use_backend("triton"):
        out = layer(x, gates, idx).square().sum()
    asked, kernels = [], backends.kernels
    monkeypatch.setattr(backends, "kernels", lambda name: asked.append(name) or kernels(name))
    out.backward()
    assert scattermoe.get_backend() == "torch" and asked and set(asked) == {"triton"}, asked
    x2 = x.detach().clone().requires_grad_()
    layer(x2, gates, idx).square().sum().backward()  # the torch backend's
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_use_backend_restores_the_previous_backend_even_when_the_block_raises():
    scattermoe.set_backend("torch")
    with pytest.raises(KeyError):
        with scattermoe.use_backend("triton"):
            assert scattermoe.get_backend() == "triton"
            with scattermoe.use_backend("auto"):
                assert scattermoe.get_backend() == "auto"
                raise KeyError("boom")
    assert scattermoe.get_backend() == "torch"
    with scattermoe.use_backend("triton"):
        scattermoe.set_backend("auto")  # (the README says so: the block restores what it found)
    assert scattermoe.get_backend() == "torch"


@pytest.mark.interpreter
def test_auto_prefers_cutlass_only_on_gpus_measured_faster(monkeypatch):
    """'auto' runs bf16/fp16 CUDA calls on the csrc kernels only on a GPU named in CUTLASS_PREFERRED_DEVICES (from
    committed benchmark results) where the cutlass backend can run; Triton everywhere else."""
    from types import SimpleNamespace

    on_gpu = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)  # resolve reads these only
    monkeypatch.setattr(backends, "_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(backends, "cutlass_unsupported_reason", lambda x: None)
    with scattermoe.use_backend("auto"):
        assert backends.resolve(on_gpu) == "triton"  # nothing measured: no device is preferred
        monkeypatch.setattr(backends, "CUTLASS_PREFERRED_DEVICES", frozenset({"NVIDIA H100 80GB HBM3"}))
        assert backends.resolve(on_gpu) == "cutlass"
        assert backends.resolve(SimpleNamespace(device=on_gpu.device, dtype=torch.float32)) == "triton"
        monkeypatch.setattr(backends, "cutlass_unsupported_reason", lambda x: "the extension is not built")
        assert backends.resolve(on_gpu) == "triton"
        monkeypatch.setattr(backends, "cutlass_unsupported_reason", lambda x: None)
        monkeypatch.setattr(backends, "_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
        assert backends.resolve(on_gpu) == "triton"


def test_auto_resolves_per_dtype_on_the_cpu():
    """DESIGN.md: on the CPU 'auto' is the reference unless TRITON_INTERPRET=1 (set by conftest without CUDA;
    on a GPU machine it is off, and CPU tensors then always go to the reference); the interpreter's broken bf16
    and float64 (no Triton kernel) go to the reference."""
    from scattermoe.backends.triton.config import INTERPRET

    with scattermoe.use_backend("auto"):
        on_cpu = "triton" if INTERPRET else "torch"
        assert backends.resolve(torch.empty(1, dtype=torch.float32)) == on_cpu
        assert backends.resolve(torch.empty(1, dtype=torch.float16)) == on_cpu
        assert backends.resolve(torch.empty(1, dtype=torch.bfloat16)) == "torch"
        assert backends.resolve(torch.empty(1, dtype=torch.float64)) == "torch"
    with scattermoe.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64"):
            backends.resolve(torch.empty(1, dtype=torch.float64))


def test_backend_from_environment():
    env = dict(os.environ, SCATTERMOE_BACKEND="torch", PYTHONPATH=os.pathsep.join(sys.path))
    code = "import scattermoe; print(scattermoe.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_triton_launchers_run_on_their_tensors_gpu(monkeypatch):
    # Triton launches on the *current* device; a layer on cuda:1 while cuda:0 is current (a model split over
    # GPUs) must switch first. Checked with a stand-in CUDA tensor: no GPU is needed to see the switch.
    from unittest import mock

    from scattermoe.backends.triton.config import on_tensor_device

    entered = []

    class FakeDeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    launcher = on_tensor_device(lambda *args: "launched")
    on_gpu1 = mock.Mock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda", 1))
    on_gpu0 = mock.Mock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda", 0))
    assert launcher(3, on_gpu1) == "launched" and entered == [torch.device("cuda", 1)]
    assert launcher(on_gpu0) == "launched" and len(entered) == 1  # already current: no switch
    assert launcher(torch.zeros(1)) == "launched" and len(entered) == 1  # CPU (interpreter): nothing to switch


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ((3, 6), (2, 4), True),   # Triton 3.6's interpreter does int() of a 1-element array: an error from numpy 2.4
    ((3, 6), (2, 3), False),
    ((3, 7), (2, 4), False),  # fixed in 3.7
    ((3, 6), (3, 0), True),
])
def test_interpreter_problem_names_the_numpy_pin(monkeypatch, triton_version, numpy_version, broken):
    versions = {"triton": triton_version, "numpy": numpy_version}
    monkeypatch.setattr(backends, "_version_tuple", lambda dist: versions[dist])
    monkeypatch.setattr(backends.importlib.metadata, "version", lambda dist: ".".join(map(str, versions[dist])))
    problem = backends.interpreter_problem()
    if broken:
        assert problem is not None and 'numpy<2.4' in problem and "numpy %d.%d" % numpy_version in problem, problem
    else:
        assert problem is None


def test_version_tuple_reads_the_installed_distribution():
    """What interpreter_problem compares (the test above replaces it): (major, minor) of the installed numpy."""
    major, minor = importlib.metadata.version("numpy").split(".")[:2]
    assert backends._version_tuple("numpy") == (int(major), int(minor))
    assert backends._version_tuple("no-such-distribution-scattermoe") is None


# ---- found by an adversarial review of the public API (2026-12-01) ----

@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
@pytest.mark.parametrize("width", [0, D - 1])
def test_layers_name_x_of_the_wrong_width(layer, width):
    """Told by the layer, with its input_size: a width of 0 used to fail inside torch's reshape."""
    forward = LAYER_FACTORIES[layer]()
    with pytest.raises(ValueError, match=rf"^x: expected {D} features \(the layer's input_size\)"):
        forward(torch.randn(B, L, width), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))


@pytest.mark.parametrize("layer, weight", [("MLP", "experts.weight"), ("GLUMLP", "experts.weight"),
                                           ("MoA.map", "input_linear.weight")])
def test_layers_name_their_own_weight_of_another_dtype(layer, weight):
    """By the layer's names: MLP said "expert_weights" (parallel_linear's) and GLUMLP "w_in" (glu_moe's) for the
    same mistake."""
    forward = LAYER_FACTORIES[layer]()
    with pytest.raises(TypeError, match=rf"^{re.escape(weight)}: dtype float32 differs from x's dtype float16"):
        forward(torch.randn(B, L, D).half(), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))


def test_parallel_experts_names_its_own_arguments():
    """forward(inputs, ...) with the module's weight: not "x" and "expert_weights", parallel_linear's names."""
    experts = scattermoe.ParallelExperts(E, D, F)
    routing = scattermoe.flatten_sort_count(make_expert_idxs(B * L, E, K), E)
    with pytest.raises(ValueError, match=rf"^inputs: expected {D} features \(the layer's input_size\), got shape"):
        experts(torch.randn(B * L, D + 1), K, *routing)
    with pytest.raises(TypeError, match=r"^weight: dtype float32 differs from inputs's dtype float16"):
        experts(torch.randn(B * L, D).half(), K, *routing)
    with pytest.raises(ValueError, match=r"^inputs: expected a 2-d tensor"):
        experts(torch.randn(B, L, D), K, *routing)


@pytest.mark.parametrize("build, error, message", [
    (lambda: scattermoe.GLUMLP(D, F, E, K, activate_first="no"), ValueError, r"^activate_first: expected True or"),
    (lambda: scattermoe.GLUMLP(D, F, E, K, activation=torch.nn.GELU(), activate_first="no"), ValueError,
     r"^activate_first: expected True or"),
    (lambda: scattermoe.MLP(D, F, E, K, bias="no"), ValueError, r"^bias: expected True or False"),
    (lambda: scattermoe.GLUMLP(D, F, E, K, bias=1.5), ValueError, r"^bias: expected True or False"),
    (lambda: scattermoe.MLP(D, F, E, K, activation="gelu"), TypeError, r"^activation: expected a callable"),
    # (these two built a bias: a trainable shared output bias for MoA)
    (lambda: scattermoe.ParallelExperts(E, D, F, bias="no"), ValueError, r"^bias: expected True or False"),
    (lambda: scattermoe.MoA(D, 4, 2, E, K, bias="no"), ValueError, r"^bias: expected True or False"),
], ids=["glu_activate_first_string", "glu_gelu_activate_first_string", "mlp_bias_string", "glu_bias_float",
        "mlp_activation_string", "experts_bias_string", "moa_bias_string"])
def test_layers_check_their_flags_and_activation_when_built(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_bias_none_means_no_bias_as_nn_linear_takes_it():
    assert scattermoe.GLUMLP(D, F, E, K, bias=None).experts.bias is None
    assert scattermoe.ParallelExperts(E, D, F, bias=None).bias is None
    assert scattermoe.MoA(D, 4, 2, E, K, bias=None).bias is None


def test_from_linears_refuses_what_copying_the_weights_would_lose():
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    ups, downs = [torch.nn.Linear(D, F, bias=False) for _ in range(E)], [torch.nn.Linear(F, D, bias=False)
                                                                        for _ in range(E)]
    with pytest.raises(TypeError, match=r"^gate\[1\]: Doubled overrides nn.Linear.forward"):
        scattermoe.GLUMLP.from_linears([ups[0], Doubled(D, F, bias=False), ups[2]], ups, downs, K)
    with pytest.raises(TypeError, match=r"^up\[0\]: expected a floating-point weight, got int64"):
        scattermoe.MLP.from_linears([torch.ones(F, D, dtype=torch.long)] * E, downs, K)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_glu_layer_takes_an_in_place_activation(backend):
    """nn.ReLU(inplace=True), as the loop it replaces takes it: the same output and gradients as nn.ReLU()."""
    torch.manual_seed(0)
    layers = [scattermoe.GLUMLP(D, F, E, K, activation=act, activate_first=first)
              for first in (True, False) for act in (torch.nn.ReLU(inplace=True), torch.nn.ReLU())]
    for pair in (layers[:2], layers[2:]):
        pair[1].load_state_dict(pair[0].state_dict())
        x, p, idx = torch.randn(T, D), torch.rand(T, K), make_expert_idxs(T, E, K)
        results = []
        for layer in pair:
            xx = x.clone().requires_grad_()
            with scattermoe.use_backend(backend):
                y = layer(xx, p, idx)
                y.backward(torch.ones_like(y))
            results.append((y.detach(), xx.grad, layer.experts.weight.grad))
        for got, want in zip(*results):
            assert torch.equal(got, want)


def test_moa_reduce_refuses_attention_output_left_transposed():
    """Same token count, other layout ([L, B] for map's [B, L]): each token would take another's routing."""
    moa = scattermoe.MoA(D, 4, 2, E, K)
    q, routing = moa.map(torch.randn(B, L, D), torch.rand(B, L, K), make_expert_idxs(B * L, E, K).view(B, L, K))
    with pytest.raises(ValueError, match=rf"^attn_out: expected leading dims \({B}, {L}\)"):
        moa.reduce(q.transpose(0, 1), routing)
    # map given routing over the flattened tokens ([B*L, K]) keeps x's dims for this check all the same
    x = torch.randn(B, L, D)
    q_flat_routing, routing_flat = moa.map(x, torch.rand(B * L, K), make_expert_idxs(B * L, E, K))
    with pytest.raises(ValueError, match=rf"^attn_out: expected leading dims \({B}, {L}\)"):
        moa.reduce(q_flat_routing.transpose(0, 1), routing_flat)
    flat = moa.reduce(q.reshape(B * L, *q.shape[2:]), routing)  # one flat token dim: the same tokens, in order
    assert torch.equal(flat.view(B, L, D), moa.reduce(q, routing))
    # A batch of one, seq-first ([L, 1] for map's [1, L]): the same order, taken.
    q, routing = moa.map(torch.randn(1, L, D), torch.rand(1, L, K), make_expert_idxs(L, E, K).view(1, L, K))
    assert torch.equal(moa.reduce(q.transpose(0, 1), routing).transpose(0, 1), moa.reduce(q, routing))
    assert len(routing) == 4  # map's routing is still the 4-tuple it was (code unpacks it)


def test_load_balancing_loss_refuses_no_experts_per_token():
    with pytest.raises(ValueError, match=r"^expert_idxs: expected K >= 1"):
        scattermoe.load_balancing_loss(torch.randn(T, E), torch.zeros(T, 0, dtype=torch.long), E)


def test_glu_moe_names_its_own_arguments():
    x, gates = torch.randn(T, D), torch.rand(T, K)
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    routing = scattermoe.flatten_sort_count(make_expert_idxs(T, E, K), E)
    with pytest.raises(ValueError, match=rf"^b_in: expected shape \({E}, {2 * F}\)"):
        scattermoe.glu_moe(x, w_in, w_out, gates, routing, b_in=torch.randn(E, F))
    with pytest.raises(ValueError, match=rf"^gates: shape \({T}, {K + 1}\) gives {T * (K + 1)} routed rows, but "
                                         rf"expert_idxs_sorted holds {T * K}"):
        scattermoe.glu_moe(x, w_in, w_out, torch.rand(T, K + 1), routing)


@pytest.mark.parametrize("value, want", [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False),
                                         ("false", False), ("off", False), ("no", False), ("", "default"),
                                         (None, "default"), ("maybe", ValueError)])
def test_switches_from_the_environment_are_read_strictly(monkeypatch, value, want):
    from scattermoe._validate import env_flag

    if value is None:
        monkeypatch.delenv("SCATTERMOE_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("SCATTERMOE_TEST_SWITCH", value)
    if want is ValueError:  # "no" once read as on: a value neither on nor off is an error, not a guess
        with pytest.raises(ValueError, match=r"SCATTERMOE_TEST_SWITCH='maybe': expected 1 or 0"):
            env_flag("SCATTERMOE_TEST_SWITCH")
    elif want == "default":
        assert env_flag("SCATTERMOE_TEST_SWITCH") is False and env_flag("SCATTERMOE_TEST_SWITCH", True) is True
    else:
        assert env_flag("SCATTERMOE_TEST_SWITCH", default=not want) is want


def test_set_debug_takes_a_bool_only():
    with pytest.raises(ValueError, match=r"^enabled: expected True or False, got 'no'"):
        scattermoe.set_debug("no")
    assert not scattermoe._validate.debug_enabled()


def test_device_asserts_switch_is_read_from_the_environment_at_import():
    code = "import scattermoe; print(scattermoe._validate.device_asserts_enabled())"
    for value, want in (("0", "False"), ("", "True")):
        env = {**os.environ, "SCATTERMOE_DEVICE_ASSERTS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.split() == [want], (value, out.stdout, out.stderr[-2000:])


def test_triton_interpret_is_read_as_triton_reads_it():
    """TRITON_INTERPRET=true interprets the kernels (Triton's reading); scattermoe once required exactly "1" and
    sent such a run to the torch backend, saying the variable was not set."""
    code = ("import torch, scattermoe; from scattermoe.backends.triton.config import INTERPRET; "
            "print(INTERPRET, scattermoe.backends.resolve(torch.randn(2)))")
    env = {**os.environ, "TRITON_INTERPRET": "true"}
    env.pop("SCATTERMOE_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "triton" if backends.interpreter_problem() is None else "torch"]


def test_a_bad_triton_switch_does_not_fail_the_torch_backend():
    """Choosing `auto` on the CPU read the Triton backend's config, so a bad SCATTERMOE_AUTOTUNE failed every op
    even where the torch backend runs them; it is read when the Triton backend is used, and named there."""
    code = ("import torch, scattermoe\n"
            "r = scattermoe.flatten_sort_count(torch.tensor([[0, 2], [1, 2]]), 3)\n"
            "x, w = torch.randn(2, 4), torch.randn(3, 4, 5)\n"
            "y = scattermoe.parallel_linear(x, w, 2, *r)\n"
            "print(scattermoe.backends.resolve(x), torch.allclose(y[1], x[0] @ w[2]))\n"
            "import scattermoe.backends.triton\n")
    env = {**os.environ, "SCATTERMOE_AUTOTUNE": "bogus"}
    env.pop("SCATTERMOE_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["torch", "True"], out.stderr[-2000:]
    assert out.returncode == 1 and "SCATTERMOE_AUTOTUNE='bogus': expected 1 or 0" in out.stderr


def test_without_the_interpreter_cpu_tensors_go_to_the_reference():
    """Without TRITON_INTERPRET (a plain CPU install, or CPU tensors on a GPU machine) the Triton kernels cannot run
    on CPU tensors: 'auto' gives them to the reference, and asking for 'triton' says to set the variable."""
    code = ("import torch, scattermoe; from scattermoe import backends\n"
            "print(backends.resolve(torch.randn(2)))\n"
            "try:\n"
            "    with scattermoe.use_backend('triton'):\n"
            "        backends.resolve(torch.randn(2))\n"
            "except RuntimeError as e:\n"
            "    print('TRITON_INTERPRET=1' in str(e))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SCATTERMOE_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "True"], out.stdout


def test_switch_variables_set_but_empty_mean_their_defaults():
    """SCATTERMOE_BACKEND= (set, empty: as a shell line or a CI matrix writes an unset value) is the default, not an
    ImportError of the whole package."""
    code = "import scattermoe; from scattermoe import backends; print(backends.get_backend(), backends._combine)"
    env = {**os.environ, "SCATTERMOE_BACKEND": "", "SCATTERMOE_TOPK_COMBINE": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["auto", "scatter"], out.stdout
    # Read as the switches are (any case, spaces ignored), as a shell line or a CI matrix may write them.
    env.update(SCATTERMOE_BACKEND=" Torch ", SCATTERMOE_TOPK_COMBINE="GATHER")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["torch", "gather"], out.stderr[-2000:]

def test_the_original_kernel_api_checks_before_it_computes():
    from scattermoe.kernels import ops

    x, w = torch.randn(T, D), torch.randn(E, D, F)
    sorted_expert_idxs, sorted_scattered_idxs = ops.flatten_and_sort(make_expert_idxs(T, E, K))
    with pytest.raises(ValueError, match=r"^sorted_expert_idxs: expected a 1-d tensor, got shape \(6, 2\)"):
        ops.scatter2scatter(x, w, sorted_expert_idxs.view(T, K), sorted_scattered_idxs, K)
    with pytest.raises(TypeError, match=r"^W: expected a torch.Tensor, got list"):
        ops.scatter2scatter(x, [w], sorted_expert_idxs, sorted_scattered_idxs, K)
    with pytest.raises(TypeError, match=r"^expert_idxs: expected dtype in \(int32, int64\), got float32"):
        ops.flatten_and_sort(make_expert_idxs(T, E, K).float())
    offsets = torch.bincount(sorted_expert_idxs, minlength=E).cumsum(0)
    with pytest.raises(ValueError, match=r"^has_bias: expected True or False, got 'no'"):
        ops.group_bwd_W(torch.randn(T * K, F), torch.randn(T * K, D), offsets, E, has_bias="no")


def test_vmap_over_the_expert_ids_is_refused_by_name_and_over_x_and_the_gates_runs():
    """torch.func.vmap cannot batch the routing (each expert's row count depends on the expert ids' values): it
    failed deep inside, on an .item() or a boolean mask. It is refused at the first batched index tensor, under
    vmap(grad(f)) too; vmap over x and the gates, the routing shared, runs on the torch backend (README)."""
    layer = scattermoe.GLUMLP(D, F, E, K)
    x = torch.randn(3, T, D)
    expert_idxs = torch.stack([make_expert_idxs(T, E, K) for _ in range(3)])
    gates = torch.rand(3, T, K)
    with backends.use_backend("torch"):
        with pytest.raises(NotImplementedError, match=r"^expert_idxs: torch.func.vmap over the routing is not "
                           r"supported .* the layers take x of any shape \[\.\.\., D\]"):
            torch.func.vmap(layer)(x, gates, expert_idxs)
        with pytest.raises(NotImplementedError, match=r"^expert_idxs: torch.func.vmap"):
            torch.func.vmap(lambda idxs: scattermoe.flatten_sort_count(idxs, num_experts=E))(expert_idxs)
        sorted_idxs = torch.stack([torch.stack(scattermoe.flatten_sort_count(i, num_experts=E)[:2])
                                   for i in expert_idxs])
        offsets = scattermoe.flatten_sort_count(expert_idxs[0], num_experts=E)[2]
        with pytest.raises(NotImplementedError, match=r"^sorted_expert_idxs: torch.func.vmap"):
            torch.func.vmap(lambda s: scattermoe.parallel_linear(x[0], layer.experts.weight.permute(0, 2, 1), K,
                                                                 s[0], s[1], offsets))(sorted_idxs)
        with pytest.raises(NotImplementedError, match=r"^expert_idxs: torch.func.vmap"):  # a grad inside the vmap
            torch.func.vmap(lambda idxs: torch.func.grad(lambda rows: layer(rows, gates[0], idxs).sum())(x[0]))(
                expert_idxs)
        both = torch.func.vmap(lambda rows, g: layer(rows, g, expert_idxs[0]))(x, gates)
        torch.testing.assert_close(both, torch.stack([layer(x[i], gates[i], expert_idxs[0]) for i in range(3)]))


def test_triton_interpret_set_after_triton_is_named_and_auto_runs_the_reference():
    """TRITON_INTERPRET set after `import triton` leaves our kernels interpreted and Triton's own library not: every
    launch failed with "Cannot call @triton.jit'd outside of the scope of a kernel" (a test module's setdefault did
    this to the whole GPU test run). `auto` now runs the reference there, and asking for 'triton' says why."""
    code = ("import os, torch, triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import scattermoe; from scattermoe import backends\n"
            "r = scattermoe.flatten_sort_count(torch.tensor([[0, 2], [1, 2]]), 3)\n"
            "x, w = torch.randn(2, 4), torch.randn(3, 4, 5)\n"
            "y = scattermoe.parallel_linear(x, w, 2, *r)\n"
            "print(backends.triton_half_interpreted(), backends.resolve(x), torch.allclose(y[1], x[0] @ w[2]))\n"
            "try:\n"
            "    with scattermoe.use_backend('triton'):\n"
            "        scattermoe.parallel_linear(x, w, 2, *r)\n"
            "except RuntimeError as e:\n"
            "    print('set after triton was imported' in str(e))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SCATTERMOE_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "torch", "True", "True"], out.stdout


def test_no_test_module_sets_triton_interpret_at_import():
    """Only conftest may set TRITON_INTERPRET (before scattermoe is imported, and only without CUDA). A test module
    that set it at import, after triton was imported, turned every Triton test on the GPU into an interpreter
    error; on the CPU the same line does nothing, so only this check sees it."""
    import ast
    from pathlib import Path

    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name == "conftest.py":
            continue
        for stmt in ast.parse(path.read_text()).body:  # module level: what runs at import
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if any(isinstance(node, ast.Constant) and node.value == "TRITON_INTERPRET" for node in ast.walk(stmt)):
                offenders.append(f"{path.name}:{stmt.lineno}")
    assert offenders == [], f"module-level TRITON_INTERPRET in {offenders}: leave it to conftest.py"
