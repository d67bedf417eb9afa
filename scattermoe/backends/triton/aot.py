"""Ahead-of-time compilation of the kernels for the H100 (sm_90a), without a GPU.

Used by the CPU tests to prove that every autotune config compiles under the
installed Triton, that its dots lower to wgmma, that loads are pipelined
(cp.async), that shared memory fits and that no registers spill. Arguments are
specialised the way the JIT does at run time for JetMoE-like shapes: unit
strides become constants and every other size and stride is a multiple of 16
(without that hint Triton can neither vectorise nor pipeline the loads, and
the AOT result would not be the kernel that actually runs).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .config import FP32, gpu_space
from .group_bwd_w import _group_bwd_w_fp32_kernel, _group_bwd_w_kernel
from .scatter2scatter import _KERNELS as _S2S_KERNELS

H100_SHARED_BYTES = 232448  # 227 KiB of dynamic shared memory per block on sm_90

# Per kernel: the jit function, the strides that are 1 for row-major operands (and the weight layout the
# launcher sends it: the permuted [E, in, out] view, K-major, except to the two-accumulator GLU kernel), and
# the ints that are not multiples of 16.
_KERNELS = {
    "scatter2scatter": (_S2S_KERNELS["scatter2scatter"],
                        ("stride_xk", "stride_wk", "stride_yn", "stride_bn", "stride_pn"),
                        ("num_rows", "E", "FAN_OUT", "M_BUCKET")),
    "scatter2scatter_glu_paired": (_S2S_KERNELS["scatter2scatter_glu_paired"],
                                   ("stride_xk", "stride_wk", "stride_yn", "stride_bn", "stride_pn"),
                                   ("num_rows", "E", "FAN_OUT", "M_BUCKET")),
    "scatter2scatter_glu": (_S2S_KERNELS["scatter2scatter_glu"],  # the launcher's pick for an F-major W
                            ("stride_xk", "stride_wn", "stride_yn", "stride_bn", "stride_pn"),
                            ("num_rows", "E", "FAN_OUT", "M_BUCKET")),
    "group_bwd_w": (_group_bwd_w_kernel, ("stride_xk", "stride_dyn", "stride_dwk", "stride_dbn"),
                    ("num_rows", "X_FAN_OUT", "DY_FAN_OUT", "M_BUCKET")),
}
# "<kernel>_fp32": the float32 autotuner of the same jit function (config.py), launched with the same layouts.
_FP32_KERNELS = {**{name: _S2S_KERNELS[name + FP32] for name in _KERNELS if name in _S2S_KERNELS},
                 "group_bwd_w": _group_bwd_w_fp32_kernel}
_KERNELS.update({name + FP32: (fn,) + _KERNELS[name][1:] for name, fn in _FP32_KERNELS.items()})
_INDEX_POINTERS = ("sorted_scattered_ptr", "expert_offsets_ptr")


@dataclasses.dataclass
class CompileReport:
    kernel: str
    config: tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    wgmma: bool
    pipelined: bool
    shared_bytes: int
    registers: int
    stack_bytes: int
    local_bytes: int
    wgmma_shapes: tuple = ()  # e.g. ("m64n128k16",): the wgmma instructions the dots became


def _resource_usage(cubin: bytes) -> dict:
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def compile_sm90(kernel: str, config: tuple, dtype: str = "bf16", **flags) -> CompileReport:
    """Compile one kernel and config for sm_90 with the given constexpr flags (X_GROUPED=..., ...)."""
    fn, unit_strides, not_aligned = _KERNELS[kernel]
    block_m, block_n, block_k, num_warps, num_stages = config
    constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, INPUT_PRECISION="ieee",
                     INT64_COLS=False)
    constants.update(flags)
    base = kernel.removesuffix(FP32)  # "<kernel>_fp32": the float32 autotuner of the same jit function
    if base.startswith("scatter2scatter"):
        constants.setdefault("E_POW2", 8)
        constants.setdefault("GLU", 0)
        constants.setdefault("STORE_PRE", False)
        constants.setdefault("GLU_PAIRED", base == "scatter2scatter_glu_paired")
    if base == "group_bwd_w":
        constants.setdefault("EXPERT_ORDER", False)  # index order; True: largest expert first (E >= 16)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants or name in unit_strides:
            signature[name] = "constexpr"
            constants.setdefault(name, 1)
            continue
        if name.endswith("_ptr"):
            signature[name] = ("*i64" if name in _INDEX_POINTERS else "*i32" if name == "expert_order_ptr"
                               else "*fp32" if name == "scale_ptr" else f"*{dtype}")
        else:
            signature[name] = "i32"
        if name not in not_aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn.fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"])
    shapes = tuple(sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))))
    return CompileReport(kernel, config, "wgmma" in ptx, "cp.async" in ptx, compiled.metadata.shared,
                         usage.get("REG", 0), usage.get("STACK", 0), usage.get("LOCAL", 0), shapes)


def compile_routing_sm90() -> list:
    """The routing kernels (routing.py) for sm_90 at the sizes they are launched with, as
    [(name, shared_bytes, registers, stack_bytes, local_bytes)]: the counting sort at 2, 256 and 4096 rows
    (the block sizes of its 1- and 4-warp launches), top-k gating at JetMoE's and the fine-grained shapes'."""
    from .routing import TOPK_LOGITS_PER_PROGRAM, _sort_by_expert_kernel, _topk_softmax_kernel

    cases = []
    for ids in ("*i64", "*i32"):
        for block, warps in ((2, 1), (256, 1), (4096, 4)):
            signature = {"ids_ptr": ids, "sorted_expert_ptr": "*i64", "sorted_slot_ptr": "*i64",
                         "offsets_ptr": "*i64", "ids_ok_ptr": "*i1", "N": "i32", "E": "i32", "BLOCK": "constexpr"}
            cases.append((f"sort_by_expert-{ids[1:]}-{block}", _sort_by_expert_kernel, signature,
                          {"BLOCK": block}, warps))
    for logits in ("*bf16", "*fp32"):
        for experts, k in ((8, 2), (64, 8), (128, 8), (1024, 8)):
            block_t = min(64, TOPK_LOGITS_PER_PROGRAM // experts)  # as topk_softmax launches it
            signature = {"logits_ptr": logits, "stride_lt": "i32", "gates_ptr": "*fp32", "idx_ptr": "*i64",
                         "T": "i32", "E": "i32", "K": "constexpr", "K_POW2": "constexpr", "BLOCK_T": "constexpr",
                         "BLOCK_E": "constexpr"}
            constants = {"K": k, "K_POW2": triton.next_power_of_2(k), "BLOCK_T": block_t, "BLOCK_E": experts}
            cases.append((f"topk_softmax-{logits[1:]}-E{experts}-k{k}", _topk_softmax_kernel, signature, constants,
                          4))
    reports = []
    for name, fn, signature, constants, warps in cases:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        usage = _resource_usage(compiled.asm["cubin"])
        reports.append((name, compiled.metadata.shared, usage.get("REG", 0), usage.get("STACK", 0),
                        usage.get("LOCAL", 0)))
    return reports


def compile_gather_sum_sm90() -> list:
    """The gather-combine pass (gather_sum.py) for sm_90 as launched on the GPU (D = 2048), bf16 rows, int64 and int32
    row indices, with and without gates: [(name, registers, stack_bytes, local_bytes, ld.global forms,
    st.global forms)]. Its loads are gathered rows, so whether they stay 16-byte vectors is the point."""
    from .gather_sum import _gather_sum_kernel, block_sizes

    block_t, block_d, warps = block_sizes(2048)
    aligned = ("Y_ptr", "stride_ym", "row_of_slot_ptr", "gates_ptr", "OUT_ptr", "stride_om", "D")
    reports = []
    for ids in ("*i64", "*i32"):
        for gates in (True, False):
            signature = {"Y_ptr": "*bf16", "stride_ym": "i32", "row_of_slot_ptr": ids, "gates_ptr": "*fp32",
                         "OUT_ptr": "*bf16", "stride_om": "i32", "num_tokens": "i32", "num_rows": "i32", "D": "i32",
                         "K": "i32",
                         "HAS_GATES": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
            names = list(signature)
            attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
            source = ASTSource(fn=_gather_sum_kernel, signature=signature, attrs=attrs,
                               constexprs={"HAS_GATES": gates, "BLOCK_T": block_t, "BLOCK_D": block_d})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            ptx, usage = compiled.asm["ptx"], _resource_usage(compiled.asm["cubin"])
            reports.append((f"gather_sum-{ids[1:]}-{'gated' if gates else 'plain'}", usage.get("REG", 0),
                            usage.get("STACK", 0), usage.get("LOCAL", 0),
                            sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
                            sorted(set(re.findall(r"st\.global[.\w]*", ptx)))))
    return reports


def autotune_space(kernel: str) -> list:
    """The GPU autotune space of a kernel (what runs on the H100), whatever this process's mode."""
    return gpu_space(kernel)


def compile_in_subprocess(cases: list) -> list:
    """compile_sm90 over [(kernel, config, dtype, flags)], in a fresh process without TRITON_INTERPRET.

    Under the interpreter the kernels are not compilable JIT functions (their
    decorators chose the interpreter at import), so compile them elsewhere.
    """
    import json
    import os
    import sys

    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(cases), env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{result.stderr[-4000:]}")
    if cases in ("routing", "gather_sum"):
        return [tuple(report) for report in json.loads(result.stdout)]
    return [CompileReport(**{**report, "config": tuple(report["config"]),
                             "wgmma_shapes": tuple(report["wgmma_shapes"])}) for report in json.loads(result.stdout)]


if __name__ == "__main__":
    import json
    import sys

    cases = json.load(sys.stdin)
    if cases in ("routing", "gather_sum"):
        json.dump(compile_routing_sm90() if cases == "routing" else compile_gather_sum_sm90(), sys.stdout)
        sys.exit(0)
    reports = [compile_sm90(kernel, tuple(config), dtype, **flags) for kernel, config, dtype, flags in cases]
    json.dump([dataclasses.asdict(report) for report in reports], sys.stdout)
