"""Code written against the original ScatterMoE (shawntan/scattermoe) runs unchanged (DESIGN.md section 3).

Legend: T tokens, K experts per token, E experts, D model dim, F expert hidden dim.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_all_close, float64_leaves
from torch import nn

import reference


def test_original_import_paths():
    from scattermoe.mlp import GLUMLP, MLP
    from scattermoe.parallel_experts import ParallelExperts, flatten_sort_count, parallel_linear

    import scattermoe

    assert MLP is scattermoe.MLP and GLUMLP is scattermoe.GLUMLP
    assert ParallelExperts is scattermoe.ParallelExperts
    assert parallel_linear is scattermoe.parallel_linear and flatten_sort_count is scattermoe.flatten_sort_count
    for name in scattermoe.__all__:
        assert hasattr(scattermoe, name), f"scattermoe.__all__ names {name!r}, which is missing"


def test_original_signatures():
    from scattermoe.mlp import MLP
    from scattermoe.parallel_experts import ParallelExperts, parallel_linear

    assert list(inspect.signature(ParallelExperts.forward).parameters) == [
        "self", "inputs", "k", "sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets",
        "gates", "grouped_in", "grouped_out"]
    assert list(inspect.signature(ParallelExperts.__init__).parameters)[:5] == [
        "self", "num_experts", "input_size", "output_size", "bias"]
    assert list(inspect.signature(MLP.__init__).parameters)[:7] == [
        "self", "input_size", "hidden_size", "num_experts", "top_k", "bias", "activation"]
    assert list(inspect.signature(parallel_linear).parameters)[:7] == [
        "x", "expert_weights", "k", "sorted_expert_idxs", "sorted_scattered_idxs", "expert_offsets",
        "expert_biases"]


def test_original_state_dict_layout():
    """Checkpoints of the original load: same parameter names, weights [E, out, in], biases [E, out]."""
    from scattermoe.mlp import GLUMLP, MLP
    from scattermoe.parallel_experts import ParallelExperts

    pe = ParallelExperts(4, 8, 6, bias=True)
    assert {k: tuple(v.shape) for k, v in pe.state_dict().items()} == {"weight": (4, 6, 8), "bias": (4, 6)}
    assert ParallelExperts(4, 8, 6).bias is None
    mlp = MLP(8, 12, 4, 2, bias=False, activation=nn.GELU())
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "experts.weight": (4, 12, 8), "output_experts.weight": (4, 8, 12)}
    glu = GLUMLP(8, 12, 4, 2)
    assert {k: tuple(v.shape) for k, v in glu.state_dict().items()} == {
        "experts.weight": (4, 24, 8), "output_experts.weight": (4, 8, 12)}


class UserMoE(nn.Module):
    """A user's MoE block written against the original ScatterMoE API only (router, top-k, two ParallelExperts)."""

    def __init__(self, d_model, d_hidden, num_experts, top_k):
        super().__init__()
        from scattermoe.parallel_experts import ParallelExperts

        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = ParallelExperts(num_experts, d_model, d_hidden, bias=True)
        self.output_experts = ParallelExperts(num_experts, d_hidden, d_model, bias=True)
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x):
        from scattermoe.parallel_experts import flatten_sort_count

        x_shape = x.size()
        x = x.view(-1, x_shape[-1])
        logits = self.router(x)
        expert_p, expert_idxs = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
        sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = flatten_sort_count(
            expert_idxs, num_experts=self.num_experts)
        h = self.experts(x, self.top_k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                         grouped_out=True)
        h = F.gelu(h)
        y = self.output_experts(h, 1, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
                                gates=expert_p, grouped_in=True)
        return y.view(*x_shape[:-1], y.size(-1)), expert_p, expert_idxs


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_user_module_written_for_the_original_api_matches_reference(backend):
    import scattermoe

    B, L, D, F_, E, K = 2, 9, 24, 40, 6, 2
    block = UserMoE(D, F_, E, K)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
    x = torch.randn(B, L, D, requires_grad=True)
    with scattermoe.use_backend(backend):
        y, expert_p, expert_idxs = block(x)
    assert y.shape == (B, L, D)
    dy = torch.randn_like(y)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    leaves = [x] + list(block.parameters())
    grads = torch.autograd.grad(y, leaves, dy)

    # The reference, per token from the same weights: the router's gradient flows through expert_p.
    ref = dict(zip(names, float64_leaves(leaves)))
    x_ref = ref["x"].view(-1, D)
    p_ref = torch.softmax(x_ref @ ref["router.weight"].t(), -1).gather(1, expert_idxs)
    y_ref = reference.moe_mlp_per_token(x_ref, p_ref, expert_idxs, ref["experts.weight"],
                                        ref["output_experts.weight"], ref["experts.bias"],
                                        ref["output_experts.bias"], F.gelu).view(B, L, D)
    ref_grads = torch.autograd.grad(y_ref, [ref[n] for n in names], dy.double())
    assert_all_close(["y"] + [f"d{n}" for n in names], (y,) + grads, (y_ref,) + ref_grads, TOL[torch.float32])


def test_a_non_editable_install_ships_every_package(tmp_path):
    """setup.py's package list (what `pip install .` copies, unlike the editable install the tests run from): the
    original import paths above, the backends, the torch backend's oracle `reference` and `jetmoe`
    (`python -m jetmoe`), under the version scattermoe reports."""
    import os
    import subprocess
    import sys

    import scattermoe

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=repo, check=True,
                   capture_output=True, env=dict(os.environ, SCATTERMOE_BUILD_CUDA="0"))
    (info,) = tmp_path.glob("*.egg-info")
    assert (info / "top_level.txt").read_text().split() == ["jetmoe", "reference", "scattermoe"]
    shipped = set((info / "SOURCES.txt").read_text().split())
    for module in ("scattermoe/mlp.py", "scattermoe/parallel_experts.py", "scattermoe/kernels/__init__.py",
                   "scattermoe/backends/triton/__init__.py", "scattermoe/backends/cutlass/dispatch.py",
                   "scattermoe/integrations/transformers_moe.py", "reference/ops.py", "jetmoe/__main__.py"):
        assert module in shipped, module
    assert f"Version: {scattermoe.__version__}\n" in (info / "PKG-INFO").read_text()


def test_importing_the_packages_leaves_torch_dynamo_and_the_kernels_unimported():
    """`import scattermoe` (and jetmoe) costs torch and a probe of Triton, not Dynamo (~2 s more per process: a
    decorator from torch.compiler once imported it) nor the kernels, which load on first use."""
    import subprocess
    import sys

    code = ("import sys, scattermoe, jetmoe; "
            "print(sorted(m for m in ('torch._dynamo', 'scattermoe.backends.triton', 'transformers') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "[]", proc.stdout


def test_a_reference_module_that_shadows_ours_is_named_at_import(tmp_path):
    """`reference` is installed top level beside scattermoe: a user's reference.py beside their script came first on
    sys.path, and the torch backend failed later with "module 'reference' has no attribute 'parallel_linear'"."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "reference.py").write_text("answers = 42\n")
    code = "import sys; sys.path.insert(1, sys.argv[1]); import scattermoe"  # the script's folder first, as Python does
    proc = subprocess.run([sys.executable, "-c", code, repo], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: scattermoe: `import reference` found ") and "reference.py" in last, last
    assert "rename that one" in last
