"""Input checks at the public boundary.

Shapes, dtypes, devices and contiguity are always checked: they are host-side
metadata and cost nothing. Index *values* (expert ids in [0, E), slot ids in
[0, N)) live on the device; reading them would add a device sync on the hot
path, so they are checked only where the tensor is already on the host (CPU) or
in debug mode (``scattermoe.set_debug(True)`` or ``SCATTERMOE_DEBUG=1``). Outside it, on CUDA, the routing
queues a device-side assert on the expert ids instead (no sync; ``set_device_asserts``).
"""

from __future__ import annotations

import operator
import os
from typing import Optional

import torch

_ON, _OFF = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")


def env_flag(name: str, default: bool = False) -> bool:
    """A switch from the environment: 1/true/yes/on or 0/false/no/off (any case), ``default`` when unset or
    empty; anything else a ValueError naming the variable, rather than a guess ("no" once read as on)."""
    value = os.environ.get(name)
    word = (value or "").strip().lower()
    if not word:
        return default
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise ValueError(f"the environment variable {name}={value!r}: expected 1 or 0 (or true/false, yes/no, on/off)")


_DEBUG = env_flag("SCATTERMOE_DEBUG")
_DEVICE_ASSERTS = env_flag("SCATTERMOE_DEVICE_ASSERTS", default=True)

_INDEX_DTYPES = (torch.int32, torch.int64)
MAX_EXPERTS = 2**31 - 1  # expert ids and offsets are read as 32-bit ints by the kernels
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_debug(enabled: bool = True) -> None:
    """Check index values on the device too (costs a device sync per call)."""
    global _DEBUG
    _DEBUG = flag("enabled", enabled)


def debug_enabled() -> bool:
    return _DEBUG


def set_device_asserts(enabled: bool = True) -> None:
    """On CUDA outside debug mode, queue a device-side assert on the expert ids of each routing (the default:
    no sync, one tiny kernel per flatten_sort_count at decode sizes). Off, an id outside [0, E) goes unchecked
    there: for the last few percent of decode speed once the routing is known to be right."""
    global _DEVICE_ASSERTS
    _DEVICE_ASSERTS = flag("enabled", enabled)


def device_asserts_enabled() -> bool:
    return _DEVICE_ASSERTS


def _values_checkable(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False  # data-dependent checks would break the graph
    if t.device.type == "meta":
        return False  # no values to read
    return _DEBUG or t.device.type == "cpu"


def shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _batched_by_vmap(t: torch.Tensor) -> bool:
    """Whether t is batched by a torch.func.vmap, at any of the functorch levels that wrap it (vmap(grad(f)) too)."""
    if torch.compiler.is_compiling():  # traced: Dynamo cannot trace these calls (nor does it trace vmap's wrappers)
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def check_tensor(name: str, t, *, dim: Optional[int] = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is _INDEX_DTYPES and _batched_by_vmap(t):  # (vmap over x, the routing shared, runs on torch)
        raise NotImplementedError(
            f"{name}: torch.func.vmap over the routing is not supported (each expert's row count depends on the "
            "expert ids' values, which vmap cannot batch); fold the vmapped dimension into the tokens instead: the "
            "layers take x of any shape [..., D]")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def positive_int(name: str, value, *, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """value as an int (numpy ints too), or a ValueError naming the argument; bools and floats are refused."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an int {bounds}, got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name}: expected an int {bounds}, got {number}")
    return number


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to cast
        return False


AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # what torch.autocast casts (not float64)


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` computes in: the autocast dtype where autocast is on and casts t's dtype, else its own."""
    if t.dtype in AUTOCAST_ELIGIBLE and autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def check_dtype_like_x(name: str, t, x: torch.Tensor, x_name: str = "x") -> None:
    """A weight or bias that computes in x's dtype (under torch.autocast: once cast), or a TypeError that says
    which way out there is."""
    if not isinstance(t, torch.Tensor) or autocast_dtype(t) == autocast_dtype(x):
        return

    def short(d):
        return str(d).replace("torch.", "")
    if autocast_enabled(x.device.type):  # one of the two in a dtype autocast leaves alone (float64)
        kept = " and ".join(f"{n} ({short(d.dtype)})" for n, d in ((x_name, x), (name, t))
                            if d.dtype not in AUTOCAST_ELIGIBLE)
        raise TypeError(f"{name}: torch.autocast casts float32, float16 and bfloat16 to "
                        f"{short(torch.get_autocast_dtype(x.device.type))} but leaves {kept} as it is, as torch's "
                        "own ops do: convert it, or run outside autocast")
    autocast = " or run under torch.autocast" if {x.dtype, t.dtype} <= set(AUTOCAST_ELIGIBLE) else ""
    raise TypeError(f"{name}: dtype {short(t.dtype)} differs from {x_name}'s dtype {short(x.dtype)}: convert one "
                    f"to the other (e.g. the layer with .to(torch.{short(x.dtype)})){autocast}")


def flag(name: str, value) -> bool:
    """value as a bool (numpy and 0-d tensor bools, 0 and 1 too), or a ValueError naming the argument: a
    string such as "no" would otherwise count as True."""
    try:  # a tensor or array of several values raises on the comparison: caught, so the message names `name`
        ok = not isinstance(value, str) and value in (True, False)
    except (RuntimeError, ValueError, TypeError):
        ok = False
    if not ok:
        got = f"a {type(value).__name__} of shape {tuple(value.shape)}" if hasattr(value, "shape") else repr(value)
        raise ValueError(f"{name}: expected True or False, got {got}")
    return bool(value)


def check_features(name: str, x) -> None:
    """x is a tensor [..., D] with at least one dimension (the layers' inputs)."""
    check_tensor(name, x, dtypes=_FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a tensor [..., features], got a 0-d tensor")


def check_not_meta(name: str, t: torch.Tensor) -> None:
    # The kernels' work per expert depends on the routing values: there is no shape-only (meta) version.
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data (cpu or cuda), got one on the meta device; "
                         "how many rows each expert gets depends on the routing values, so these ops cannot "
                         "run on meta tensors")


def check_index_range(name: str, t: torch.Tensor, bound: int, what: str) -> None:
    """Every value of t in [0, bound), checked where that costs no device sync (or in debug mode)."""
    if t.numel() and _values_checkable(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name}: {what} must lie in [0, {bound}), got values in [{lo}, {hi}]")


def check_expert_idxs(expert_idxs: torch.Tensor, num_experts: int) -> None:
    check_tensor("expert_idxs", expert_idxs, dtypes=_INDEX_DTYPES)
    positive_int("num_experts", num_experts, maximum=MAX_EXPERTS)
    check_index_range("expert_idxs", expert_idxs, num_experts, "expert ids")


def check_parallel_linear(
    x, expert_weights, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
    expert_biases, gates, grouped_in, grouped_out,
) -> None:
    """Validate parallel_linear's arguments (see ops.parallel_linear for the contract)."""
    check_tensor("x", x, dim=2, dtypes=_FLOAT_DTYPES)
    check_not_meta("x", x)
    device = x.device
    check_dtype_like_x("expert_weights", expert_weights, x)
    check_tensor("expert_weights", expert_weights, dim=3, device=device)
    num_experts, d_in, d_out = expert_weights.shape
    if 0 in (num_experts, d_in, d_out):
        raise ValueError(f"expert_weights: expected non-empty [E, d_in, d_out], got shape {shape(expert_weights)}")
    if x.size(1) != d_in:
        raise ValueError(f"x: expected {d_in} features (expert_weights is [E={num_experts}, {d_in}, {d_out}]), "
                         f"got shape {shape(x)}")
    if x.size(-1) > 1 and x.stride(-1) != 1:  # one feature: any stride along it reads the same
        raise ValueError(f"x: expected a row-major tensor (stride 1 along features), got strides {x.stride()}; "
                         "call .contiguous()")
    positive_int("k", k)
    flag("grouped_in", grouped_in)
    flag("grouped_out", grouped_out)
    for name, t in (("sorted_expert_idxs", sorted_expert_idxs), ("sorted_scattered_idxs", sorted_scattered_idxs)):
        check_tensor(name, t, dim=1, dtypes=_INDEX_DTYPES, device=device)
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor")
    num_rows = sorted_expert_idxs.numel()
    if sorted_scattered_idxs.numel() != num_rows:
        raise ValueError(
            f"sorted_scattered_idxs: expected {num_rows} entries like sorted_expert_idxs, "
            f"got {sorted_scattered_idxs.numel()}")
    check_tensor("expert_offsets", expert_offsets, dim=1, dtypes=_INDEX_DTYPES, device=device)
    if expert_offsets.numel() != num_experts:
        raise ValueError(f"expert_offsets: expected [E={num_experts}], one end per expert of the weights, got shape "
                         f"{shape(expert_offsets)} (routing for another number of experts?)")
    if not expert_offsets.is_contiguous():
        raise ValueError("expert_offsets: expected a contiguous tensor")
    if expert_biases is not None:
        check_dtype_like_x("expert_biases", expert_biases, x)
        check_tensor("expert_biases", expert_biases, dim=2, device=device)
        if shape(expert_biases) != (num_experts, d_out):
            raise ValueError(f"expert_biases: expected shape ({num_experts}, {d_out}), got {shape(expert_biases)}")
    if grouped_in:
        if x.size(0) != num_rows:
            raise ValueError(f"x: with grouped_in=True expected the N={num_rows} routed rows, got {x.size(0)} rows")
    elif x.size(0) * k != num_rows:
        raise ValueError(
            f"sorted_expert_idxs: expected T*k = {x.size(0)}*{k} = {x.size(0) * k} routed rows "
            f"for x of shape {shape(x)}, got {num_rows}")
    if gates is not None:
        check_tensor("gates", gates, dim=2, dtypes=_FLOAT_DTYPES, device=device)
        if grouped_out:
            raise ValueError("gates: a gate-weighted sum returns token order, so grouped_out must be False")
        if gates.numel() != num_rows:
            raise ValueError(f"gates: expected [T, k] with T*k = {num_rows} entries, got shape {shape(gates)}")
        if not grouped_in and k != 1 and k != gates.size(1):  # (not `k not in (...)`: Dynamo misreads it, a dynamic k)
            raise ValueError(f"gates: expected [T, k={k}] (or k=1 with x holding the N slot rows), "
                             f"got shape {shape(gates)}")
    if num_rows and _values_checkable(sorted_expert_idxs):
        check_index_range("sorted_expert_idxs", sorted_expert_idxs, num_experts, "expert ids")
        check_index_range("sorted_scattered_idxs", sorted_scattered_idxs, num_rows, "slot ids")
        if bool((sorted_expert_idxs.diff() < 0).any()):
            raise ValueError("sorted_expert_idxs: expected expert ids in non-decreasing order (use flatten_sort_count)")
        # Each slot must appear once, and the offsets must be the cumulative counts of the sorted ids:
        # the kernels trust both (an unlisted slot is never written, a wrong offset mixes experts).
        if not bool((torch.bincount(sorted_scattered_idxs, minlength=num_rows) == 1).all()):
            raise ValueError(f"sorted_scattered_idxs: expected a permutation of [0, {num_rows}) (each slot once)")
        counts = torch.bincount(sorted_expert_idxs, minlength=num_experts).cumsum(0)
        if not torch.equal(counts, expert_offsets.to(counts.dtype)):
            raise ValueError(f"expert_offsets: expected the cumulative expert counts of sorted_expert_idxs "
                             f"{counts.tolist()}, got {expert_offsets.tolist()}")
    elif num_rows == 0 and expert_offsets.numel() and _values_checkable(expert_offsets):
        if bool((expert_offsets != 0).any()):
            raise ValueError("expert_offsets: expected all zeros for N=0 routed rows")


def check_expert_offsets_values(expert_offsets: torch.Tensor, num_rows: int) -> None:
    """expert_offsets [E] (shape and dtype checked by the caller): non-decreasing ends of each expert's rows, the
    last one N (checked where affordable)."""
    if expert_offsets.numel() and _values_checkable(expert_offsets):
        ends = expert_offsets.tolist()
        if ends[0] < 0 or any(b < a for a, b in zip(ends, ends[1:])) or ends[-1] != num_rows:
            raise ValueError(f"expert_offsets: expected the cumulative row counts of each expert (non-decreasing, "
                             f"from >= 0 up to N={num_rows}), got {ends}")


def _non_overlapping(t: torch.Tensor) -> bool:
    """No two elements of t share memory: each dimension, by increasing stride, steps past all the smaller ones.
    (Sufficient, not necessary: an exotic interleaved as_strided view can be refused; every slice, transpose
    and contiguous buffer passes.)"""
    if t.numel() == 0:
        return True
    reach = 0  # the furthest element offset the dimensions seen so far cover
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def check_out(out, shape_: tuple, like: torch.Tensor) -> None:
    """A caller's output buffer: right shape, dtype and device, and no two elements sharing memory."""
    check_tensor("out", out, dtypes=(like.dtype,), device=like.device)
    if shape(out) != tuple(shape_):
        raise ValueError(f"out: expected shape {tuple(shape_)}, got {shape(out)}")
    if not _non_overlapping(out):
        raise ValueError(f"out: expected a tensor whose elements do not share memory (e.g. not expanded), "
                         f"got strides {out.stride()}")


def check_glu_moe(x, w_in, w_out, gates, b_in, b_out, sorted_expert_idxs) -> None:
    """The second projection, the biases and the gates of ops.glu_moe, by glu_moe's names (the first projection
    is then checked like parallel_linear's)."""
    check_tensor("x", x, dim=2, dtypes=_FLOAT_DTYPES)
    check_not_meta("x", x)
    check_dtype_like_x("w_in", w_in, x)
    check_dtype_like_x("w_out", w_out, x)
    check_tensor("w_in", w_in, dim=3, device=x.device)
    check_tensor("w_out", w_out, dim=3, device=x.device)
    num_experts, d_in, width = w_in.shape
    if x.size(1) != d_in:
        raise ValueError(f"x: expected {d_in} features (w_in is {shape(w_in)}), got shape {shape(x)}")
    if width % 2:
        raise ValueError(f"w_in: expected an even output width (the GLU's two halves), got shape {shape(w_in)}")
    expected = (num_experts, width // 2, x.size(1))
    if shape(w_out) != expected:
        raise ValueError(f"w_out: expected shape {expected} to follow w_in {shape(w_in)} (half its width back to "
                         f"the input's), got {shape(w_out)}")
    for name, bias, width_ in (("b_in", b_in, width), ("b_out", b_out, x.size(1))):
        if bias is not None:
            check_dtype_like_x(name, bias, x)
            check_tensor(name, bias, dim=2, device=x.device)
            if shape(bias) != (num_experts, width_):
                raise ValueError(f"{name}: expected shape {(num_experts, width_)}, got {shape(bias)}")
    check_tensor("gates", gates, dim=2, dtypes=_FLOAT_DTYPES, device=x.device)
    if gates.size(0) != x.size(0):
        raise ValueError(f"gates: expected [T={x.size(0)}, k], got shape {shape(gates)}")
    if isinstance(sorted_expert_idxs, torch.Tensor) and sorted_expert_idxs.dim() == 1 \
            and sorted_expert_idxs.numel() != gates.numel():
        raise ValueError(f"gates: shape {shape(gates)} gives {gates.numel()} routed rows, but expert_idxs_sorted "
                         f"holds {sorted_expert_idxs.numel()}: the gates and the routing must come from the same "
                         "top-k")


def _check_rows(name: str, t: torch.Tensor, rows: int, cols: int, device: torch.device) -> None:
    """t [>= rows, cols] on device: what a kernel writes or reads row by row, cols wide, for `rows` rows."""
    check_tensor(name, t, dim=2, device=device)
    if t.size(0) < rows or t.size(1) != cols:
        raise ValueError(f"{name}: expected [>= {rows}, {cols}], got shape {tuple(t.shape)}")


def _check_read_rows(name: str, t: torch.Tensor, num_rows: int, fan_out, grouped: bool, fan_name: str) -> None:
    """t holds the rows a kernel reads for N routed rows: row i of the i-th one if grouped, else row slot // fan_out
    (so fan_out must be a positive int: the kernels divide by it)."""
    if grouped:
        rows = num_rows
    else:
        fan_out = positive_int(fan_name, fan_out)
        rows = -(-num_rows // fan_out)
    if t.size(0) < rows:
        raise ValueError(f"{name}: expected at least {rows} rows for N={num_rows} slots "
                         f"({'grouped' if grouped else f'{fan_name} {fan_out}'}), got {tuple(t.shape)}")


def _check_kernel_offsets(expert_offsets, num_experts: int, device: torch.device) -> None:
    """expert_offsets as the grouped kernels read it: an index vector on device with at least E ends."""
    check_tensor("expert_offsets", expert_offsets, dim=1, dtypes=_INDEX_DTYPES, device=device)
    if expert_offsets.numel() < num_experts:  # the kernels read E ends
        raise ValueError(f"expert_offsets: expected [E={num_experts}], got shape {tuple(expert_offsets.shape)}")


def _check_slot_scales(row_scale, num_rows: int, device: torch.device, dtypes=None) -> None:
    """row_scale (None, or at least one scale per slot, read by slot in [0, N)) on device."""
    if row_scale is None:
        return
    check_tensor("row_scale", row_scale, dtypes=dtypes, device=device)
    if row_scale.numel() < num_rows:
        raise ValueError(f"row_scale: expected one scale per slot (N={num_rows}), got shape {tuple(row_scale.shape)}")


def check_scatter2scatter_args(x, w, bias, sorted_scattered_idxs, expert_offsets, fan_out, grouped_in, row_scale,
                               out, glu, pre_activation) -> None:
    """What the scatter GEMM kernels (csrc and Triton alike) index without bounds checks, checked by each backend's
    launcher: torch.ops.scattermoe.scatter2scatter(_glu) and kernels.ops reach them without parallel_linear's
    checks, so a malformed call raises ValueError naming the argument instead of reading or writing past it."""
    check_tensor("x", x, dim=2)
    device = x.device
    check_tensor("w", w, dim=3, device=device)
    num_experts, k_in, w_cols = w.shape
    n_out = w_cols // 2 if glu else w_cols
    num_rows = sorted_scattered_idxs.numel()
    if x.size(1) != k_in:
        raise ValueError(f"x: expected [*, {k_in}] (w is {tuple(w.shape)}), got {tuple(x.shape)}")
    _check_read_rows("x", x, num_rows, fan_out, grouped_in, "fan_out")
    check_tensor("sorted_scattered_idxs", sorted_scattered_idxs, dtypes=_INDEX_DTYPES, device=device)
    _check_kernel_offsets(expert_offsets, num_experts, device)
    if bias is not None:
        check_tensor("bias", bias, dim=2, device=device)
        if tuple(bias.shape) != (num_experts, w_cols):
            raise ValueError(f"bias: expected shape {(num_experts, w_cols)}, got {tuple(bias.shape)}")
    _check_slot_scales(row_scale, num_rows, device)
    if out is not None:
        _check_rows("out", out, num_rows, n_out, device)
    if pre_activation is not None:
        _check_rows("pre_activation", pre_activation, num_rows, w_cols, device)


def check_glu_backward_args(pre, dg, row_scale) -> None:
    """pre [N, 2F], dg [N, F], row_scale [N] or None on one device: what the GLU backward kernels (csrc and Triton)
    read without bounds checks (torch.ops.scattermoe.glu_backward reaches their launchers unchecked), else
    ValueError."""
    check_tensor("pre", pre, dim=2)
    num_rows, width = pre.shape
    if width % 2:
        raise ValueError(f"pre: expected [N, 2F], an even width (the GLU's two halves), got shape {tuple(pre.shape)}")
    check_tensor("dg", dg, dim=2, device=pre.device)
    if tuple(dg.shape) != (num_rows, width // 2):
        raise ValueError(f"dg: expected shape {(num_rows, width // 2)} (pre is {tuple(pre.shape)}), "
                         f"got {tuple(dg.shape)}")
    if row_scale is not None:
        check_tensor("row_scale", row_scale, device=pre.device)
        if row_scale.numel() < num_rows:
            raise ValueError(f"row_scale: expected one scale per row (N={num_rows}), got shape "
                             f"{tuple(row_scale.shape)}")


def check_group_bwd_w_args(x, dy, sorted_scattered_idxs, expert_offsets, like_weight, x_fan_out, dy_fan_out,
                           x_grouped, dy_grouped, row_scale) -> None:
    """What the weight-gradient kernels (csrc and Triton) read without bounds checks, checked by each backend's
    launcher: torch.ops.scattermoe.group_bwd_w reaches them without parallel_linear's checks, so a malformed call
    raises ValueError (TypeError for a wrong dtype) naming the argument instead of reading past it."""
    check_tensor("like_weight", like_weight, dim=3, dtypes=_FLOAT_DTYPES)
    device = like_weight.device
    num_experts, k_in, n_out = like_weight.shape
    check_tensor("sorted_scattered_idxs", sorted_scattered_idxs, dtypes=_INDEX_DTYPES, device=device)
    num_rows = sorted_scattered_idxs.numel()
    for name, t, cols in (("x", x, k_in), ("dy", dy, n_out)):
        check_tensor(name, t, dim=2, dtypes=(like_weight.dtype,), device=device)
        if t.size(1) != cols:
            raise ValueError(f"{name}: expected [*, {cols}] (like_weight is {tuple(like_weight.shape)}), "
                             f"got {tuple(t.shape)}")
    _check_read_rows("x", x, num_rows, x_fan_out, x_grouped, "x_fan_out")
    _check_read_rows("dy", dy, num_rows, dy_fan_out, dy_grouped, "dy_fan_out")
    _check_kernel_offsets(expert_offsets, num_experts, device)
    _check_slot_scales(row_scale, num_rows, device, dtypes=_FLOAT_DTYPES)
