"""Unit checks of the benchmark harness's pure pieces: statistics, repeat clamping, result-file names, markdown,
the targets' verdicts, the README's table and the plot's lines.

No GPU and no Triton kernel is involved: each test feeds hand-made numbers (or a trivial callable) and compares
against an expectation worked out by hand or with an independent tool (numpy), not against the code's own output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import write_kernel_result

from bench import harness, report

T = report.HEADLINE_T  # 16384: the size issue 5's targets are judged at


def _row(case, impl, tokens=T, routing="uniform", **extra):
    return {"case": case, "impl": impl, "tokens": tokens, "routing": routing, "dtype": "bfloat16", **extra}


def _target(payload, prefix):
    (t,) = [t for t in report.targets(payload) if t["target"].startswith(prefix)]
    return t


# ---------------------------------------------------------------- harness


def test_quantiles_interpolate_like_numpy_and_the_median_is_not_the_mean():
    # A skewed sample: the median (2.5) and the mean (26.5) differ, so a median computed as a mean shows.
    times = [100.0, 2.0, 1.0, 3.0]  # unsorted on purpose
    q = harness.quantiles(times)
    assert q["median"] == pytest.approx(2.5)
    want = {f"p{p}": float(np.percentile(times, p)) for p in (10, 20, 80, 90)}  # numpy's default: linear
    assert {k: q[k] for k in want} == pytest.approx(want)
    assert (q["min"], q["max"], q["mean"]) == pytest.approx((1.0, 100.0, 26.5))
    # An odd count: the median is the middle element, no interpolation.
    assert harness.quantiles([5.0, 1.0, 9.0, 7.0, 3.0])["median"] == 5.0


class _Counter:
    """A callable that only counts its calls (and the input sets it was given)."""

    def __init__(self):
        self.sets = []

    def __call__(self, i):
        self.sets.append(i)


def test_repeats_are_clamped_to_the_plans_bounds():
    timer = harness.Timer(torch.device("cpu"))
    # A near-free call with a long target would ask for ~10^6 repeats: capped at max_rep.
    fn = _Counter()
    plan = harness.TimingPlan(warmup=2, target_s=1.0, min_rep=2, max_rep=6)
    res = timer.measure(fn, n_sets=3, plan=plan)
    assert res["repeats"] == 6 and len(res["times_ms"]) == 6
    assert len(fn.sets) == 1 + 2 + 6  # first call, warm-up, timed repeats
    assert fn.sets[:3] == [0, 1, 2]  # the first call and the warm-up touch every input set before the timing
    # A target far shorter than one call would ask for 1 repeat: raised to min_rep.
    fn = _Counter()
    plan = harness.TimingPlan(warmup=1, target_s=1e-12, min_rep=4, max_rep=50)
    res = timer.measure(fn, n_sets=2, plan=plan)
    assert res["repeats"] == 4 and len(res["times_ms"]) == 4
    assert fn.sets[-4:] == [0, 1, 0, 1]  # the timed calls rotate over the input sets


def test_result_basename_is_date_device_commit_without_the_vendor_prefix():
    env = {"date": "2026-01-02", "device": {"name": "NVIDIA H100 80GB HBM3"},
           "git": {"commit": "abc1234" + "0" * 33, "short": "abc1234"}}
    # DESIGN.md section 6: <YYYY-MM-DD>_<device-slug>_<short-commit>[suffix]
    assert harness.result_basename(env) == "2026-01-02_h100-80gb-hbm3_abc1234"
    assert harness.result_basename(env, "_e2e") == "2026-01-02_h100-80gb-hbm3_abc1234_e2e"
    assert harness.result_basename({**env, "device": {"name": "cpu"}}) == "2026-01-02_cpu_abc1234"


def test_unique_basename_counts_up_from_2(tmp_path):
    assert harness.unique_basename(tmp_path, "x") == "x"
    (tmp_path / "x.json").write_text("{}")
    assert harness.unique_basename(tmp_path, "x") == "x-2"
    (tmp_path / "x-2.json").write_text("{}")
    assert harness.unique_basename(tmp_path, "x") == "x-3"
    (tmp_path / "y.md").write_text("")  # only a .json file counts as taken
    assert harness.unique_basename(tmp_path, "y") == "y"


def test_markdown_table_right_aligns_the_columns_asked():
    text = harness.markdown_table(["name", "ms"], [["a", "1.0"], ["b", "22.5"]], ["l", "r"])
    assert text.splitlines() == ["| name | ms |", "| --- | ---: |", "| a | 1.0 |", "| b | 22.5 |"]
    # Without an alignment every column is left-aligned.
    assert harness.markdown_table(["x", "y"], []) == "| x | y |\n| --- | --- |"


# ---------------------------------------------------------------- report: targets


@pytest.mark.parametrize("ours, met", [(1.0, True), (2.0, True), (3.0, False)], ids=["less", "equal", "more"])
def test_memory_target_is_met_when_the_forward_keeps_no_more_than_the_reference(ours, met):
    rows = [_row("jetmoe_moe_fwd", "scattermoe_triton", ms=1.0, held_gb=ours),
            _row("jetmoe_moe_fwd", "reference", ms=2.0, held_gb=2.0)]
    t = _target({"rows": rows}, "memory kept")
    assert t["met"] is met, t
    assert t["measured"] == f"{ours:.2f} GB vs reference 2.00 GB"


def _routing_rows(shares):
    """A routing row and the layer's forward row (10 ms) at each T, the routing taking ``share`` of it."""
    rows = []
    for tokens, share in shares.items():
        rows += [_row("routing", "scattermoe", tokens, ms=10.0 * share),
                 _row("jetmoe_moe_fwd", "scattermoe_triton", tokens, ms=10.0)]
    return {"rows": rows}


def test_routing_share_target_reads_only_t_from_4096_and_names_the_worst():
    # T=1024 is below the target's range: its 50% must not count.
    t = _target(_routing_rows({1024: 0.5, 4096: 0.03, 16384: 0.06}), "routing share")
    assert t["met"] is False, t
    assert "6.0%" in t["measured"] and "T=16384" in t["measured"] and "50.0%" not in t["measured"], t
    t = _target(_routing_rows({1024: 0.5, 4096: 0.03}), "routing share")
    assert t["met"] is True, t
    assert "3.0%" in t["measured"] and "T=4096" in t["measured"], t
    # "< 5%" is strict: exactly 5% is not met.
    assert _target(_routing_rows({4096: 0.05}), "routing share")["met"] is False
    # Nothing at T >= 4096: not measured (neither met nor failed).
    assert _target(_routing_rows({1024: 0.01}), "routing share")["met"] is None


@pytest.mark.parametrize("target, baseline, want_ms", [
    ("GLUMLP fwd+bwd vs torch._grouped_mm", "torch_grouped_mm", 13.0),  # 1.3x
    ("GLUMLP fwd+bwd vs dense matmul", "dense_same_flops", 8.0),  # 0.8x
    ("GLUMLP fwd+bwd vs the original ScatterMoE", "scattermoe_original", 15.0),  # 1.5x
])
def test_a_ratio_exactly_at_its_target_is_met(target, baseline, want_ms):
    # ours 10 ms; the baseline takes exactly the target ratio longer: ">=" means met, a hair less means not.
    for ms, met in ((want_ms, True), (want_ms * 0.999, False)):
        rows = [_row("jetmoe_moe_fwd_bwd", "scattermoe_triton", ms=10.0), _row("jetmoe_moe_fwd_bwd", baseline, ms=ms)]
        t = _target({"rows": rows}, target)
        assert t["met"] is met, (ms, t)


def test_readme_table_is_the_forward_backward_case(tmp_path):
    path = write_kernel_result(tmp_path, "r.json", "2026-06-01T00:00:00+00:00",
                      {"scattermoe_triton": 10.0, "torch_grouped_mm": 15.0})
    payload = json.loads(path.read_text())
    # A forward-only row with a time found nowhere else: the README's table must not be this case's.
    payload["rows"].append(_row("jetmoe_moe_fwd", "scattermoe_triton", ms=4.321, tflops=1.0))
    path.write_text(json.dumps(payload))
    section = report.readme_section(path)
    assert "4.321" not in section
    table = section.split("\n\n")[-1]  # the section ends with the layer's table
    assert table.splitlines()[0].startswith("| T | routing | scattermoe_triton | torch_grouped_mm")
    assert "| 16384 | uniform | 10.000" in table and "15.000" in table


# ---------------------------------------------------------------- plot


def test_plot_draws_zipf_dashed_beside_uniform_and_skips_a_row_without_a_time(tmp_path, plotted_lines):
    from bench.plot import plot

    # Routing has no FLOPs: drawn as ms. One implementation, both routings, one Zipf row without a valid time.
    rows = ([_row("routing", "scattermoe", t, "uniform", ms=t / 1000) for t in (16, 256, 4096)]
            + [_row("routing", "scattermoe", t, "zipf", ms=t / 500) for t in (16, 4096)]
            + [_row("routing", "scattermoe", 256, "zipf", ms=math.nan)])
    assert plot({"rows": rows, "device": "test", "commit": "0" * 40}, tmp_path / "p.png") is None
    by_style = {ln.get_linestyle(): ln for ln in plotted_lines}
    assert set(by_style) == {"-", "--"}, [ln.get_linestyle() for ln in plotted_lines]
    uniform, zipf = by_style["-"], by_style["--"]
    assert list(uniform.get_xdata()) == [16, 256, 4096]
    assert list(uniform.get_ydata()) == pytest.approx([0.016, 0.256, 4.096])
    assert list(zipf.get_xdata()) == [16, 4096]  # the NaN row at T=256 adds no point
    assert list(zipf.get_ydata()) == pytest.approx([0.032, 8.192])
    assert zipf.get_color() == uniform.get_color()  # one implementation, one colour


def test_hang_watch_fires_once_for_the_step_that_hangs_and_stops_when_told():
    import threading

    fired, exits, done = [], [], threading.Event()

    def exit_(code):
        exits.append(code)
        done.set()

    watch = harness.HangWatch(0.2, lambda impl, what: fired.append((impl, what)), exit=exit_)
    with watch.watch("fast", "a quick step"):
        pass
    with watch.watch("slow", "a step that hangs"):
        assert done.wait(5)  # the thread fires while the step is under way
    assert fired == [("slow", "a step that hangs")] and exits == [harness.HANG_EXIT]
    watch.stop()
    watch._thread.join(5)
    assert not watch._thread.is_alive()


@pytest.mark.parametrize("impl, want", [("scattermoe", True), ("scattermoe_no_assert", False)])
def test_routing_rows_time_the_library_with_and_without_its_device_assert(impl, want, monkeypatch):
    # The pair of rows measures the assert's cost: the switch must be set during the timed call, and put back.
    from bench import kernels
    from scattermoe import routing

    seen = []
    real = routing.flatten_sort_count
    monkeypatch.setattr(routing, "flatten_sort_count", lambda *a: seen.append(routing.device_asserts_enabled())
                        or real(*a))
    monkeypatch.setattr(kernels.scattermoe, "flatten_sort_count", routing.flatten_sort_count)
    shape = kernels.Shape("routing", "routing", modes=("fwd",), D=64, E=4, K=2)
    group = kernels.Group(shape, 8)
    work = kernels.Workload(shape, torch.device("cpu"), torch.float32, 0, None, None)
    inputs = kernels.make_inputs(group, 1, torch.device("cpu"), 0, dense=False)[0]
    before = routing.device_asserts_enabled()
    out = work.forward(impl)(inputs)
    assert seen == [want] and routing.device_asserts_enabled() == before
    assert torch.equal(out[2], torch.sort(out[1].reshape(-1), stable=True).values)


def test_a_size_is_skipped_only_on_a_prediction_from_a_smaller_size_timed():
    # The suite times T=16384 and T=1 before T=4096: T=1's latency, scaled by 4096, must not skip T=4096.
    from bench.run import predicted_ms

    assert predicted_ms({}, 4096) is None
    assert predicted_ms({16384: 10.0, 1: 0.3}, 4096) is None  # a larger size was timed: it fits
    assert predicted_ms({1: 0.3, 1024: 2.0}, 4096) == (1024, 8.0)  # from the largest smaller size
    assert predicted_ms({1: 0.3}, 4096) == (1, 0.3 * 4096)


class _Allocator:
    """torch.cuda's allocation counters, as a counter the test drives (bytes)."""

    def __init__(self):
        self.now = self.peak = 0

    def alloc(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n):
        self.now -= n


def test_a_timed_backward_counts_its_forwards_activations_in_its_peak(monkeypatch):
    """bwd rows: measure() ends with prepare(0), a forward; Workload.reset() drops it before peak_memory, so the
    forward's activations read as prepared for the call (not as the baseline) and count in peak_mem_gb."""
    from bench import kernels

    mem = _Allocator()
    for name, fn in (("memory_allocated", lambda device=None: mem.now),
                     ("max_memory_allocated", lambda device=None: mem.peak),
                     ("reset_peak_memory_stats", lambda device=None: setattr(mem, "peak", mem.now)),
                     ("synchronize", lambda device=None: None)):
        monkeypatch.setattr(torch.cuda, name, fn)
    timer = harness.Timer(torch.device("cpu"))
    timer.cuda, timer.sync = True, lambda: None
    pending = []

    def prepare(i):  # the bwd prepare: drop the last forward, run a new one (10 GB of activations)
        for n in pending:
            mem.free(n)
        pending.clear()
        mem.alloc(10e9)
        pending.append(10e9)

    def bwd(i):  # frees the activations, allocates 2 GB of gradients on the way
        mem.alloc(2e9)
        mem.free(2e9 + pending.pop())

    work = kernels.Workload.__new__(kernels.Workload)
    work._reset = lambda: [mem.free(pending.pop()) for _ in list(pending)]
    prepare(0)  # what measure() leaves
    before_reset = timer.peak_memory(bwd, prepare)
    assert before_reset["prepared_gb"] == 0  # the forward read as the baseline: the bug this guards against
    prepare(0)
    work.reset()
    memory = timer.peak_memory(bwd, prepare)
    assert memory["prepared_gb"] == pytest.approx(10) and memory["extra_gb"] == pytest.approx(2)


def test_dense_same_flops_rows_count_only_what_their_matmuls_read():
    from bench import kernels

    shape = kernels.Shape("glu", "glu", modes=("fwd", "bwd", "fwd_bwd"), D=16, F=24, E=4, K=2)
    group = kernels.Group(shape, 8)
    work = kernels.Workload(shape, torch.device("cpu"), torch.float32, 0, None, None)
    inp = kernels.make_inputs(group, 1, torch.device("cpu"), 0, dense=True)[0]
    nbytes = {name: t.numel() * t.element_size() for name, t in inp.dense.items()}
    weights = sum(w.numel() * w.element_size() for w in (work.w1, work.w2))
    assert work.own_bytes("dense_same_flops", inp, "fwd") == nbytes["a"] + nbytes["h"] + weights
    assert work.own_bytes("dense_same_flops", inp, "infer") == nbytes["a"] + nbytes["h"] + weights
    assert work.own_bytes("dense_same_flops", inp, "bwd") == sum(nbytes.values()) + weights


def test_sonicmoe_has_no_row_for_routing_it_does_not_follow():
    from bench import kernels

    shape = kernels.SHAPES["jetmoe_moe"]
    work = kernels.Workload.__new__(kernels.Workload)
    work.device = torch.device("cpu")
    assert "own router" in work.mode_unavailable("sonicmoe", "fwd", "zipf")
    assert work.mode_unavailable("sonicmoe", "fwd", "uniform") is None
    assert work.mode_unavailable("scattermoe_triton", "fwd", "zipf") is None
    assert shape.kind == "glu"


def test_bytes_and_the_decode_floor_count_the_experts_used_on_average_over_the_input_sets():
    """At small T the rotated input sets route to different numbers of experts; the time is a median over all of
    them, so the bytes (and the HBM floor) are sized by the mean, not by set 0's count."""
    from bench import kernels, run

    shape = kernels.Shape("tiny_moe", "glu", D=16, F=16, E=32, K=2, modes=("fwd",))
    group = kernels.Group(shape, 3, "uniform", "float32")
    cfg = run.RunConfig(device=torch.device("cpu"), groups=[group], impls=["reference"],
                        plan=harness.TimingPlan(warmup=0, target_s=0.0, min_rep=2, max_rep=2), n_sets=6,
                        check_tokens=3, max_call_ms=float("inf"), time_budget_s=None,
                        limits={"bf16_flops": 1e15, "hbm_bytes_s": 4e12})
    res = run.run(cfg, lambda r: None, lambda r: None)
    sets = kernels.make_inputs(group, cfg.n_sets, cfg.device, cfg.seed + group.T, dense=False)
    used = [kernels.expert_load(s.idx, shape.E)["experts_used"] for s in sets]
    assert len(set(used)) > 1, used  # the case is the one it claims: sets that differ
    mean = sum(used) / len(used)
    (row,) = [r for r in res["rows"] if r["impl"] == "reference"]
    assert row["bytes"] == kernels.useful_bytes(group, "fwd", mean, 4)
    assert row["hbm_floor_ms"] == kernels.weight_bytes(shape, mean, 4) / 4e12 * 1e3
