"""Differentiable ops over the kernel backends.

Legend: T tokens, K experts per token (the gates' fan-out), N = T*K routed rows,
E experts, D input features, F output features.

The kernels are registered as ``torch.library.custom_op`` with fake impls, so an
autograd Function built on them traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

import reference

from . import backends
from ._validate import AUTOCAST_ELIGIBLE, autocast_enabled, check_glu_moe, check_parallel_linear, flag, positive_int
from .kernels._compat import accepts_padded_block_idxs


@torch.library.custom_op("scattermoe::scatter2scatter", mutates_args=())
def scatter2scatter_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor],
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    row_scale: Optional[torch.Tensor],
    fan_out: int,
    grouped_in: bool,
    grouped_out: bool,
    backend: str,
) -> torch.Tensor:
    """[N, F] = rows of x (grouped or gathered by slot // fan_out) times W_e (+ b_e) (* row_scale[slot])."""
    return backends.kernels(backend).scatter2scatter(
        x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, grouped_out, row_scale)


@scatter2scatter_op.register_fake
def _(x, w, bias, sorted_scattered_idxs, expert_offsets, row_scale, fan_out, grouped_in, grouped_out, backend):
    return x.new_empty(sorted_scattered_idxs.numel(), w.size(-1))


@torch.library.custom_op("scattermoe::scatter2scatter_glu", mutates_args=())
def scatter2scatter_glu_op(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor],
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    fan_out: int,
    grouped_in: bool,
    grouped_out: bool,
    activate_first: bool,
    keep_pre_activation: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(G [N, F], H [N, 2F] or [0]): H = rows of x times W_e (+ b_e), G = GLU(H) fused in the epilogue."""
    num_rows = sorted_scattered_idxs.numel()
    pre = x.new_empty(num_rows, w.size(-1)) if keep_pre_activation else None
    g = backends.kernels(backend).scatter2scatter(
        x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, grouped_out,
        glu=1 if activate_first else 2, pre_activation=pre)
    return g, pre if pre is not None else x.new_empty(0)


@scatter2scatter_glu_op.register_fake
def _(x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, grouped_out, activate_first,
      keep_pre_activation, backend):
    num_rows = sorted_scattered_idxs.numel()
    pre = x.new_empty(num_rows, w.size(-1)) if keep_pre_activation else x.new_empty(0)
    return x.new_empty(num_rows, w.size(-1) // 2), pre


@torch.library.custom_op("scattermoe::group_bwd_w", mutates_args=())
def group_bwd_w_op(
    x: torch.Tensor,
    dy: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    like_weight: torch.Tensor,
    row_scale: Optional[torch.Tensor],
    x_fan_out: int,
    dy_fan_out: int,
    x_grouped: bool,
    dy_grouped: bool,
    with_bias: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dW [E, D, F] strided like like_weight, db [E, F], or [0] without bias): per-expert X^T (s * dY)."""
    dw, db = backends.kernels(backend).group_bwd_w(
        x, dy, sorted_scattered_idxs, expert_offsets, like_weight,
        x_fan_out, dy_fan_out, x_grouped, dy_grouped, row_scale, with_bias)
    return dw, db if db is not None else dw.new_empty(0)


@group_bwd_w_op.register_fake
def _(x, dy, sorted_scattered_idxs, expert_offsets, like_weight, row_scale,
      x_fan_out, dy_fan_out, x_grouped, dy_grouped, with_bias, backend):
    db = like_weight.new_empty(like_weight.size(0), like_weight.size(-1)) if with_bias else like_weight.new_empty(0)
    return torch.empty_like(like_weight), db


@torch.library.custom_op("scattermoe::glu_backward", mutates_args=())
def glu_backward_op(
    pre: torch.Tensor,
    dg: torch.Tensor,
    row_scale: Optional[torch.Tensor],
    activate_first: bool,
    store_g: bool,
    store_dot: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dH [N, 2F], s*G [N, F] or [0], <dg, G> [N] fp32 or [0]) in one pass; see backends.triton.glu_backward."""
    dh, g, dot = backends.kernels(backend).glu_backward(pre, dg, activate_first, row_scale, store_g, store_dot)
    empty_dot = pre.new_empty(0, dtype=torch.float32)
    return dh, g if g is not None else pre.new_empty(0), dot if dot is not None else empty_dot


@glu_backward_op.register_fake
def _(pre, dg, row_scale, activate_first, store_g, store_dot, backend):
    num_rows, width = pre.shape
    g = pre.new_empty(num_rows, width // 2) if store_g else pre.new_empty(0)
    dot = pre.new_empty(num_rows if store_dot else 0, dtype=torch.float32)
    return torch.empty_like(pre), g, dot


@torch.library.custom_op("scattermoe::gather_sum", mutates_args=())
def gather_sum_op(
    rows: torch.Tensor,
    row_of_slot: torch.Tensor,
    gates_flat: Optional[torch.Tensor],
    fan_out: int,
    backend: str,
) -> torch.Tensor:
    """[T, F] = sum_j gates[t*K + j] * rows[row_of_slot[t*K + j]] in fp32 (a plain sum without gates): the "gather"
    top-k combine."""
    return backends.kernels(backend).gather_sum(rows, row_of_slot, gates_flat, fan_out)


@gather_sum_op.register_fake
def _(rows, row_of_slot, gates_flat, fan_out, backend):
    return rows.new_empty(rows.size(0) // fan_out, rows.size(1))


def _gather_combine(fan: int) -> bool:
    """Whether the K rows of each token are summed by a gather pass (``set_topk_combine("gather")``, K > 1)."""
    return fan > 1 and backends.get_topk_combine() == "gather"


def _gated_rows_combined(x, w, bias, gates_flat, fan, sorted_scattered_idxs, expert_offsets, x_fan_out, grouped_in,
                         backend):
    """[T, F] = sum_j gates[t, j] * (X W_e + b_e)[slot t*K + j], the gather way: the GEMM writes its rows grouped by
    expert and ungated, then one pass per token gathers, gates and sums them (fp32)."""
    rows = scatter2scatter_op(x, w, bias, sorted_scattered_idxs, expert_offsets, None, x_fan_out, grouped_in, True,
                              backend)
    row_of_slot = torch.empty_like(sorted_scattered_idxs)
    row_of_slot[sorted_scattered_idxs] = torch.arange(sorted_scattered_idxs.numel(), device=rows.device,
                                                      dtype=sorted_scattered_idxs.dtype)
    return gather_sum_op(rows, row_of_slot, gates_flat, fan, backend)


# aten::bmm.dtype (torch >= 2.8): half-precision operands, float32 product, on CUDA.
_BMM_FP32_OUT = "dtype" in torch.ops.aten.bmm.overloads()


def _gate_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, R] = sum_d a[m, r, d] * b[m, d] for a [M, R, D], b [M, D]: the gates' gradient, in float32 for half
    operands as the reference has it (the dot of two float16 rows in range can pass 65504), without an
    [M, R, D] float32 temporary on CUDA."""
    b = b.unsqueeze(-1)
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda and _BMM_FP32_OUT:
            return torch.bmm(a, b, out_dtype=torch.float32).squeeze(-1)
        a, b = a.float(), b.float()
    return torch.bmm(a, b).squeeze(-1)


def _ungated_backward(dy, x, w, has_bias, k, sorted_scattered_idxs, expert_offsets, grouped_in, grouped_out,
                      backend):
    """(dx, dW, db) of Y = X W_e + b_e without gates; dy is [N, F], grouped if grouped_out."""
    dx_rows = scatter2scatter_op(dy, w.transpose(1, 2), None, sorted_scattered_idxs, expert_offsets, None,
                                 1, grouped_out, grouped_in, backend)
    dx = dx_rows if grouped_in or k == 1 else dx_rows.view(x.size(0), k, dx_rows.size(-1)).sum(1)
    dw, db = group_bwd_w_op(x, dy, sorted_scattered_idxs, expert_offsets, w, None,
                            k, 1, grouped_in, grouped_out, has_bias, backend)
    return dx, dw, db if has_bias else None


def _add_gate_bias_term(dgates_flat, dy, bias, fan, sorted_expert_idxs, sorted_scattered_idxs):
    """d(gate of slot t*K + j) gets <dy[t], b_e> from the bias that the gate also scales (in place)."""
    bias_dots = dy.float() @ bias.float().t()  # [T, E]
    tokens = torch.div(sorted_scattered_idxs, fan, rounding_mode="floor")
    dgates_flat[sorted_scattered_idxs] += bias_dots[tokens, sorted_expert_idxs]


def _gated_bias_grad(dy, gates_flat, bias, fan, sorted_expert_idxs, sorted_scattered_idxs):
    """db_e = sum over expert e's slots t*K + j of gates[t, j] * dy[t], in float32 (bias [E, F]).

    As a GEMM, db = M^T dy with M [T, E] each token's gate mass per expert: deterministic on CUDA, where an
    index_add_ of the N gated rows into E rows adds with atomics in a varying order."""
    expert_of_slot = torch.empty_like(sorted_expert_idxs)
    expert_of_slot[sorted_scattered_idxs] = sorted_expert_idxs
    experts = torch.arange(bias.size(0), device=bias.device)
    chosen = expert_of_slot.view(-1, fan, 1) == experts  # [T, K, E] (a comparison: one_hot would sync to check)
    mass = (chosen * gates_flat.float().view(-1, fan, 1)).sum(1)  # [T, E]
    return (mass.t() @ dy.float()).to(bias.dtype)


def _under_autocast(x: torch.Tensor, *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """(x, *tensors) cast to the autocast dtype when autocast is on for x's device, else unchanged.

    The kernels take x, weights and biases in one dtype; under ``torch.autocast`` a model keeps
    float32 master weights, so they are cast here as autocast casts a matmul's operands
    (differentiably: the float32 weight receives the gradient). Gates keep their dtype (float32
    gates beside half-precision x are part of the contract).
    """
    if not isinstance(x, torch.Tensor) or not autocast_enabled(x.device.type):
        return (x,) + tensors  # (a non-tensor x is reported by the argument checks that follow)
    dtype = torch.get_autocast_dtype(x.device.type)
    # As torch.autocast: float64 (and integer) tensors are left alone, so float64 x stays float64.
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in AUTOCAST_ELIGIBLE else t
                 for t in (x,) + tensors)


def _outside_torch_func(backend: str) -> str:
    """The kernel backends' autograd Functions have no vmap or jvp rule: a torch.func transform (grad, vjp, vmap,
    jvp) around them is refused here by name, not by torch's message asking for a setup_context."""
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(f"scattermoe: the {backend} backend's ops do not support torch.func transforms (grad, "
                           "vjp, vmap, jvp); run them with scattermoe.use_backend('torch')")
    return backend


class _RefuseSecondOrder(torch.autograd.Function):
    """Identity on a kernel backward's results, whose own backward raises. Its inputs are what those results
    depend on (the forward's saved inputs and the incoming grads), so every path from a second-order quantity to
    them runs through it: an error node fed detached copies (torch's DelayedError) was pruned by
    ``torch.autograd.grad(..., inputs)``, which then dropped the op's second-order terms silently."""

    @staticmethod
    def forward(ctx, message, results, *depends_on):
        ctx.message = message
        return tuple(r.detach() for r in results)  # (not views: a caller may modify a result in place)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _first_order(backward):
    """A kernel backend's backward, which is not itself differentiable: run it without recording a graph and,
    when a graph was asked for (``create_graph=True``), hand back results whose own backward raises an error
    that says so and names the backend that can (like torch.autograd.function.once_differentiable, but also
    when the incoming grads are constants, and with a message a user can act on)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        # Grad mode is on in a backward only under create_graph=True: then the results depend, to second order,
        # on the saved inputs (x, W, gates) and on the incoming grads, through code that records no graph.
        depends_on = torch.is_grad_enabled() and [
            t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not depends_on:
            return outputs
        message = (f"scattermoe: the {ctx.backend} backend computes first derivatives only, so a second "
                   "backward through its ops (double backward, e.g. a gradient penalty built with "
                   "create_graph=True) is not supported; run that part with scattermoe.use_backend('torch')")
        results = _RefuseSecondOrder.apply(message, [o for o in outputs if o is not None], *depends_on)
        results = iter(results)
        return tuple(next(results) if o is not None else None for o in outputs)
    return wrapper


class ParallelLinear(torch.autograd.Function):
    """parallel_linear on a kernel backend; see ``parallel_linear`` for the contract.

    Saved for backward: x, the weights, biases, gates and the routing tensors only.
    With gates, the per-expert outputs Y [N, F] are *not* kept: d(gates) is
    recomputed as <dY W_e^T, x> + <dY, b_e> from the dX GEMM that backward runs
    anyway (SonicMoE, arXiv 2512.14080), which saves N*F activations per layer.
    """

    @staticmethod
    def forward(ctx, x, w, bias, gates, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                grouped_in, grouped_out, backend):
        gates_flat = gates.reshape(-1).contiguous() if gates is not None else None
        if gates is not None and _gather_combine(gates.size(1)):
            y = _gated_rows_combined(x, w, bias, gates_flat, gates.size(1), sorted_scattered_idxs, expert_offsets,
                                     k, grouped_in, backend)
        else:
            y = scatter2scatter_op(x, w, bias, sorted_scattered_idxs, expert_offsets, gates_flat,
                                   k, grouped_in, grouped_out and gates is None, backend)
            if gates is not None:
                num_tokens, fan = gates.shape
                y = y.view(num_tokens, fan, y.size(-1)).sum(1) if fan > 1 else y
        ctx.save_for_backward(x, w, bias, gates, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets)
        ctx.k, ctx.grouped_in, ctx.grouped_out, ctx.backend = k, grouped_in, grouped_out, backend
        return y

    @staticmethod
    @_first_order
    def backward(ctx, dy):
        x, w, bias, gates, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = ctx.saved_tensors
        k, grouped_in, grouped_out, backend = ctx.k, ctx.grouped_in, ctx.grouped_out, ctx.backend
        dy = dy.contiguous()
        has_bias = bias is not None
        if gates is None:
            dx, dw, db = _ungated_backward(dy, x, w, has_bias, k, sorted_scattered_idxs, expert_offsets,
                                           grouped_in, grouped_out, backend)
            return dx, dw, db, None, None, None, None, None, None, None, None

        # Gated: dy is [T, F]; slot t*K + j received gates[t, j] * dy[t].
        num_tokens, fan = gates.shape
        gates_flat = gates.reshape(-1).contiguous()
        dx_raw = scatter2scatter_op(dy, w.transpose(1, 2), None, sorted_scattered_idxs, expert_offsets, None,
                                    fan, False, grouped_in, backend)  # dY W_e^T, ungated
        if grouped_in or k == 1:  # x rows pair one-to-one with dx_raw rows
            dgate_rows = _gate_dots(dx_raw.unsqueeze(1), x).view(-1)
            row_gates = gates_flat[sorted_scattered_idxs] if grouped_in else gates_flat
            # With the gate as it is: computed in float32 (type promotion), rounded once; a float32 gate cast to
            # float16 first is 0 below ~3e-8 and inf above 65504. In place: dx_raw's last read is just above.
            dx = dx_raw.mul_(row_gates.unsqueeze(-1))
            dgates_flat = dgate_rows.new_empty(gates_flat.shape)
            if grouped_in:
                dgates_flat[sorted_scattered_idxs] = dgate_rows
            else:
                dgates_flat = dgate_rows
        else:  # x is [T, D], fanned out to the K slots of each token
            dx_raw = dx_raw.view(num_tokens, fan, dx_raw.size(-1))
            dgates_flat = _gate_dots(dx_raw, x).view(-1)
            # As above, summed over the K slots in one float32 [T, D] (not a float32 copy of dx_raw, K times
            # larger), in torch: the cutlass backend runs its backward without Triton.
            gates32 = gates.float()
            dx = dx_raw[:, 0] * gates32[:, :1]
            for j in range(1, fan):
                dx.addcmul_(dx_raw[:, j], gates32[:, j:j + 1])
            dx = dx.to(dx_raw.dtype)
        dgates_flat = dgates_flat.float()
        if has_bias:
            _add_gate_bias_term(dgates_flat, dy, bias, fan, sorted_expert_idxs, sorted_scattered_idxs)
        dw, db = group_bwd_w_op(x, dy, sorted_scattered_idxs, expert_offsets, w, gates_flat,
                                k, fan, grouped_in, False, has_bias, backend)
        dgates = dgates_flat.view_as(gates).to(gates.dtype)
        return dx, dw, db if has_bias else None, dgates, None, None, None, None, None, None, None


# ScatterMoE 2024 passed padded_block_idxs before expert_offsets; accepted and dropped.
@accepts_padded_block_idxs(5, ("gates", "grouped_in", "grouped_out"))
def parallel_linear(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    expert_biases: Optional[torch.Tensor] = None,
    gates: Optional[torch.Tensor] = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> torch.Tensor:
    """Y = X W_e (+ b_e) over the N = T*K routed rows, with no padded copy of X or Y.

    x: [T, D] in token order (each token feeds its K rows), or with ``grouped_in``
       [N, D] already in expert order (then pass k=1; ScatterMoE's convention).
       With ``k=1`` and not grouped, x may also hold the N slot rows [N, D].
    expert_weights: [E, D, F] (e.g. ``ParallelExperts.weight.permute(0, 2, 1)``; any strides).
    k: fan-out of x's rows. sorted_expert_idxs, sorted_scattered_idxs [N], expert_offsets [E]:
       from ``flatten_sort_count``.
    expert_biases: [E, F] or None. gates: [T, K] or None.
    Returns [N, F] (expert order if ``grouped_out``, else slot order t*K + j) without gates,
    or [T, F] = sum_j gates[t, j] * Y[t*K + j] with gates. x's dtype throughout (under
    ``torch.autocast``, x, weights and biases are first cast to the autocast dtype);
    differentiable in x, expert_weights, expert_biases and gates.
    """
    x, expert_weights, expert_biases = _under_autocast(x, expert_weights, expert_biases)
    k, grouped_in, grouped_out = positive_int("k", k), flag("grouped_in", grouped_in), flag("grouped_out", grouped_out)
    check_parallel_linear(x, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                          expert_biases, gates, grouped_in, grouped_out)
    backend = backends.resolve(x)
    if backend == "torch":
        return reference.parallel_linear(x, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs,
                                         expert_offsets, expert_biases, gates, grouped_in, grouped_out)
    return ParallelLinear.apply(x, expert_weights, expert_biases, gates, k, sorted_expert_idxs,
                                sorted_scattered_idxs, expert_offsets, grouped_in, grouped_out,
                                _outside_torch_func(backend))


class ParallelLinearGLU(torch.autograd.Function):
    """parallel_linear_glu on a kernel backend. Saved for backward: x, weights and the
    pre-activation H [N, 2F] (the GLU's derivative needs both halves); G is not kept."""

    @staticmethod
    def forward(ctx, x, w, bias, k, sorted_scattered_idxs, expert_offsets, grouped_in, grouped_out,
                activate_first, backend, keep):
        g, pre = scatter2scatter_glu_op(x, w, bias, sorted_scattered_idxs, expert_offsets, k, grouped_in,
                                        grouped_out, activate_first, keep, backend)
        ctx.save_for_backward(x, w, bias, pre, sorted_scattered_idxs, expert_offsets)
        ctx.k, ctx.grouped_in, ctx.grouped_out = k, grouped_in, grouped_out
        ctx.activate_first, ctx.backend = activate_first, backend
        return g

    @staticmethod
    @_first_order
    def backward(ctx, dg):
        x, w, bias, pre, sorted_scattered_idxs, expert_offsets = ctx.saved_tensors
        dpre, _, _ = glu_backward_op(pre, dg.contiguous(), None, ctx.activate_first, False, False, ctx.backend)
        dx, dw, db = _ungated_backward(dpre, x, w, bias is not None, ctx.k, sorted_scattered_idxs, expert_offsets,
                                       ctx.grouped_in, ctx.grouped_out, ctx.backend)
        return dx, dw, db, None, None, None, None, None, None, None, None


def parallel_linear_glu(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    expert_biases: Optional[torch.Tensor] = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
    activate_first: bool = True,
) -> torch.Tensor:
    """GLU(parallel_linear(...)) with the SiLU GLU fused into the GEMM's epilogue.

    expert_weights: [E, D, 2F]; expert_biases: [E, 2F] or None. With H = [a | b] the
    [N, 2F] projection, returns [N, F] = silu(a) * b if ``activate_first`` (JetMoE) else
    a * silu(b) (ScatterMoE's GLUMLP). Other arguments as in ``parallel_linear`` (no gates).
    """
    x, expert_weights, expert_biases = _under_autocast(x, expert_weights, expert_biases)
    k, grouped_in, grouped_out = positive_int("k", k), flag("grouped_in", grouped_in), flag("grouped_out", grouped_out)
    activate_first = flag("activate_first", activate_first)
    check_parallel_linear(x, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                          expert_biases, None, grouped_in, grouped_out)
    if expert_weights.size(-1) % 2:
        raise ValueError(f"expert_weights: a GLU needs an even output width, got shape {tuple(expert_weights.shape)}")
    backend = backends.resolve(x)
    if backend == "torch":
        h = reference.parallel_linear(x, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs,
                                      expert_offsets, expert_biases, None, grouped_in, grouped_out)
        return reference.glu(h, torch.nn.functional.silu, activate_first)
    # Keep the pre-activation only when a backward will need it (Function.forward runs under no_grad).
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, expert_weights, expert_biases))
    return ParallelLinearGLU.apply(x, expert_weights, expert_biases, k, sorted_scattered_idxs, expert_offsets,
                                   grouped_in, grouped_out, activate_first, _outside_torch_func(backend), keep)


class GLUMoE(torch.autograd.Function):
    """The whole GLU MoE MLP, y = sum_j p_j * (W2_e GLU(W1_e x) + b2_e), on a kernel backend.

    Saved for backward: x, the weights, the gates, the routing and the pre-activation
    H [N, 2F]. Neither G = GLU(H) [N, F] nor the expert outputs [N, D] are kept: the
    backward recomputes G in the same pass that differentiates the GLU, and gets
    d(gates) from <dG, G> (SonicMoE's recipe: activation memory independent of K*F/D).
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, gates, k, sorted_expert_idxs, sorted_scattered_idxs,
                expert_offsets, activate_first, backend, keep):
        g, pre = scatter2scatter_glu_op(x, w_in, b_in, sorted_scattered_idxs, expert_offsets, k, False, True,
                                        activate_first, keep, backend)
        gates_flat = gates.reshape(-1).contiguous()
        if _gather_combine(k):
            y = _gated_rows_combined(g, w_out, b_out, gates_flat, k, sorted_scattered_idxs, expert_offsets, 1, True,
                                     backend)
        else:
            y = scatter2scatter_op(g, w_out, b_out, sorted_scattered_idxs, expert_offsets, gates_flat,
                                   1, True, False, backend)
            y = y.view(gates.size(0), gates.size(1), y.size(-1)).sum(1) if gates.size(1) > 1 else y
        ctx.save_for_backward(x, w_in, b_in, w_out, b_out, gates, pre, sorted_expert_idxs, sorted_scattered_idxs,
                              expert_offsets)
        ctx.k, ctx.activate_first, ctx.backend = k, activate_first, backend
        return y

    @staticmethod
    @_first_order
    def backward(ctx, dy):
        (x, w_in, b_in, w_out, b_out, gates, pre, sorted_expert_idxs, sorted_scattered_idxs,
         expert_offsets) = ctx.saved_tensors
        k, backend = ctx.k, ctx.backend
        dy = dy.contiguous()
        gates_flat = gates.reshape(-1).contiguous()
        dg_raw = scatter2scatter_op(dy, w_out.transpose(1, 2), None, sorted_scattered_idxs, expert_offsets, None,
                                    k, False, True, backend)  # dY W2_e^T, grouped, before the gates
        # s*G comes back gate-scaled, so the dW2 GEMM needs no row scale: dW2_e = (s G_e)^T dY.
        dpre, g_scaled, dot = glu_backward_op(pre, dg_raw, gates_flat[sorted_scattered_idxs], ctx.activate_first,
                                              True, True, backend)
        dgates_flat = torch.empty_like(dot)
        dgates_flat[sorted_scattered_idxs] = dot
        db_out = None
        if b_out is not None:
            _add_gate_bias_term(dgates_flat, dy, b_out, k, sorted_expert_idxs, sorted_scattered_idxs)
            db_out = _gated_bias_grad(dy, gates_flat, b_out, k, sorted_expert_idxs, sorted_scattered_idxs)
        dw_out, _ = group_bwd_w_op(g_scaled, dy, sorted_scattered_idxs, expert_offsets, w_out, None,
                                   1, k, True, False, False, backend)
        dx, dw_in, db_in = _ungated_backward(dpre, x, w_in, b_in is not None, k, sorted_scattered_idxs,
                                             expert_offsets, False, True, backend)
        dgates = dgates_flat.view_as(gates).to(gates.dtype)
        return (dx, dw_in, db_in, dw_out, db_out, dgates,
                None, None, None, None, None, None, None)


def glu_moe(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    gates: torch.Tensor,
    expert_idxs_sorted: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b_in: Optional[torch.Tensor] = None,
    b_out: Optional[torch.Tensor] = None,
    activate_first: bool = True,
) -> torch.Tensor:
    """The SiLU-GLU MoE MLP in one differentiable op: sum_j gates[t, j] * (W2_e GLU(W1_e x_t + b1_e) + b2_e).

    x: [T, D]; w_in: [E, D, 2F] and w_out: [E, F, D] (``ParallelExperts.weight.permute(0, 2, 1)``);
    gates: [T, K]; expert_idxs_sorted: ``flatten_sort_count(expert_idxs, E)``; b_in [E, 2F], b_out [E, D].
    Returns [T, D] in x's dtype (the autocast dtype under ``torch.autocast``). The GLU activates the
    first half if ``activate_first`` (JetMoE).
    """
    if not (isinstance(expert_idxs_sorted, (tuple, list)) and len(expert_idxs_sorted) == 3):
        raise TypeError("expert_idxs_sorted: expected the 3 tensors of flatten_sort_count(expert_idxs, E), "
                        f"got {type(expert_idxs_sorted).__name__}"
                        + (f" of length {len(expert_idxs_sorted)}" if isinstance(expert_idxs_sorted, (tuple, list))
                           else ""))
    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = expert_idxs_sorted
    x, w_in, w_out, b_in, b_out = _under_autocast(x, w_in, w_out, b_in, b_out)
    activate_first = flag("activate_first", activate_first)
    check_glu_moe(x, w_in, w_out, gates, b_in, b_out, sorted_expert_idxs)
    k = gates.size(1)
    check_parallel_linear(x, w_in, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                          b_in, None, False, True)
    backend = backends.resolve(x)
    if backend == "torch":
        h = reference.parallel_linear(x, w_in, k, *expert_idxs_sorted, b_in, None, False, True)
        h = reference.glu(h, torch.nn.functional.silu, activate_first)
        return reference.parallel_linear(h, w_out, 1, *expert_idxs_sorted, b_out, gates, True, False)
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_in, b_in, w_out, b_out, gates))
    return GLUMoE.apply(x, w_in, b_in, w_out, b_out, gates, k, sorted_expert_idxs, sorted_scattered_idxs,
                        expert_offsets, activate_first, _outside_torch_func(backend), keep)
