"""The README's Python examples run as printed and do what its bullets say.

Each ```python block of README.md is either run here (with only the names a reader must supply defined
first, and the drop-in example's sizes line shrunk) or listed in NOT_RUN with the reason; a new block
fails the inventory test until it is one or the other, so an example can not go stale unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import TOL, assert_close

import scattermoe
from reference import moe_mlp_per_token

README = Path(__file__).resolve().parent.parent / "README.md"
SIZES_LINE = "T, D, F, E, k = 512, 2048, 5632, 8, 2"
SMALL_SIZES = "T, D, F, E, k = 37, 24, 40, 5, 2"  # small and awkward: no size a multiple of a block

# The blocks that need what a test machine has not: a Hub download, or a GPU and JetMoE-8B.
NOT_RUN = {
    'AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B"': "downloads Qwen3-30B-A3B (the per-family "
    "tests in test_integrations_transformers.py patch small random models instead)",
    'JetMoEForCausalLM.from_pretrained("jetmoe/jetmoe-8b"': "downloads JetMoE-8B and needs a GPU "
    "(test_jetmoe_gpu.py, with JETMOE_8B set)",
}
RUN = ("scattermoe.GLUMLP(input_size=D", "scattermoe.GLUMLP.from_linears(", "scattermoe.parallel_linear(",
       'scattermoe.set_backend("torch")')


def python_blocks() -> list[str]:
    text = README.read_text()
    # Fenced blocks, indented or not (the from_linears example sits inside a bullet), without the indent.
    blocks = []
    for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M):
        indent = len(m.group(1))
        blocks.append("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return blocks


def block(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"README: expected one python block containing {marker!r}, found {len(found)}"
    return found[0]


def test_every_python_block_is_run_here_or_says_why_not():
    unaccounted = [b for b in python_blocks() if not any(m in b for m in (*RUN, *NOT_RUN))]
    assert not unaccounted, f"README python blocks neither run by this module nor listed in NOT_RUN: {unaccounted}"
    for marker in (*RUN, *NOT_RUN):
        block(marker)  # each marker still names exactly one block


def run_drop_in_example() -> dict:
    source = block(RUN[0])
    assert SIZES_LINE in source, "README: the drop-in example's sizes line changed; update SIZES_LINE"
    ns: dict = {}
    exec(compile(source.replace(SIZES_LINE, SMALL_SIZES), "README.md (drop-in example)", "exec"), ns)
    return ns


def test_drop_in_example_computes_the_glu_moe_the_bullets_describe():
    ns = run_drop_in_example()
    moe, x, y, gates, expert_idxs = ns["moe"], ns["x"], ns["y"], ns["gates"], ns["expert_idxs"]
    T, D, F, E, k = (ns[n] for n in "TDFEk")
    # The comments' shapes and dtypes, and the bullets' weight layout.
    assert gates.shape == (T, k) and gates.dtype == torch.float32
    assert expert_idxs.shape == (T, k) and expert_idxs.dtype == torch.int64
    assert y.shape == (T, D)
    assert moe.experts.weight.shape == (E, 2 * F, D) and moe.output_experts.weight.shape == (E, D, F)
    # y = sum_j p_j W2_e (a * silu(b)): ScatterMoE's GLU (activate_first=False), token by token in float64.
    ref = moe_mlp_per_token(x.double(), gates.double(), expert_idxs, moe.experts.weight.double(),
                            moe.output_experts.weight.double(), glu_activate_first=False)
    assert_close(y, ref, TOL[torch.float32])
    # The router's gates: softmax over the top-k raw logits.
    logits = ns["router"](x)
    top, idx = logits.topk(k, dim=-1)
    assert torch.equal(idx, expert_idxs)
    assert_close(gates, torch.softmax(top.double(), dim=-1), TOL[torch.float32], "gates")


def test_from_linears_example_replaces_the_loop_in_its_comment():
    T, D, F, E, k = 29, 16, 24, 4, 2
    experts = torch.nn.ModuleList()
    for _ in range(E):
        m = torch.nn.Module()
        m.gate_proj, m.up_proj = torch.nn.Linear(D, F, bias=False), torch.nn.Linear(D, F, bias=False)
        m.down_proj = torch.nn.Linear(F, D, bias=False)
        experts.append(m)
    x = torch.randn(T, D)
    gates, expert_idxs = scattermoe.topk_gating(torch.randn(T, E), k)
    ns = dict(scattermoe=scattermoe, experts=experts, x=x, gates=gates, expert_idxs=expert_idxs)
    exec(compile(block(RUN[1]), "README.md (from_linears example)", "exec"), ns)
    # The loop the comment stands for: down(silu(gate(x)) * up(x)) of each token's experts, gate-weighted.
    want = torch.zeros(T, D, dtype=torch.float64)
    with torch.no_grad():
        for t in range(T):
            for j in range(k):
                m = experts[int(expert_idxs[t, j])]
                xt = x[t].double()
                h = torch.nn.functional.silu(m.gate_proj.weight.double() @ xt) * (m.up_proj.weight.double() @ xt)
                want[t] += gates[t, j].double() * (m.down_proj.weight.double() @ h)
    assert_close(ns["y"], want, TOL[torch.float32])


def test_parallel_linear_example_gives_slot_order_rows():
    T, d_in, d_out, E, k = 23, 12, 20, 6, 3
    expert_idxs = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    expert_idxs[:, 0] = 1  # one expert with every token; with 23 * 3 slots over 6 experts
    x, expert_weights = torch.randn(T, d_in), torch.randn(E, d_in, d_out)
    ns = dict(scattermoe=scattermoe, x=x, expert_weights=expert_weights, k=k, E=E, expert_idxs=expert_idxs)
    exec(compile(block(RUN[2]), "README.md (parallel_linear example)", "exec"), ns)
    counts = torch.bincount(expert_idxs.view(-1), minlength=E)
    assert torch.equal(ns["expert_offsets"], counts.cumsum(0)), "expert_offsets: cumulative counts"
    assert torch.equal(ns["sorted_expert_idxs"], expert_idxs.view(-1).sort().values)
    # Slot t*k + j of each row in expert order.
    assert torch.equal(expert_idxs.view(-1)[ns["sorted_scattered_idxs"]], ns["sorted_expert_idxs"])
    # Without gates: N rows in slot order t*k + j, row t*k + j being x[t] @ W[expert_idxs[t, j]].
    want = torch.stack([x[t].double() @ expert_weights[expert_idxs[t, j]].double()
                        for t in range(T) for j in range(k)])
    assert_close(ns["y"], want, TOL[torch.float32])


@pytest.mark.interpreter
def test_backends_example_runs_the_block_on_triton_and_later_calls_on_torch():
    ns = run_drop_in_example()
    source = block(RUN[3])
    ran = []
    real = scattermoe.backends.resolve

    def spy(x):
        ran.append(real(x))
        return ran[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scattermoe.backends, "resolve", spy)
        exec(compile(source, "README.md (backends example)", "exec"), ns)
        y_block = ns["y"]
        assert ran and set(ran) == {"triton"}, ran  # the with-block's call ran on Triton
        assert scattermoe.get_backend() == "torch"  # set_backend holds after the block
        ran.clear()
        y_after = ns["moe"](ns["x"], ns["gates"], ns["expert_idxs"])
        assert ran and set(ran) == {"torch"}, ran
    assert_close(y_block, y_after.double(), TOL[torch.float32])

