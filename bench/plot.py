"""Draw a kernel-suite result file: TFLOP/s against tokens, one panel per case, one line per implementation,
and a dotted line for the device's datasheet roofline (min of peak FLOP/s and bandwidth x FLOPs per byte).

    python -m bench.plot bench/results/<name>.json   # writes <name>.png beside it

Uniform routing solid, Zipf dashed; routing (no FLOPs) is drawn as ms. matplotlib is optional
(the GPU image need not have it): without it nothing is drawn and ``plot`` returns the reason,
which the run records as a note.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple


def _segments(pts: List[Tuple[float, float]], attempted: Set) -> List[List[Tuple[float, float]]]:
    """pts (sorted by T) cut where a T the run tried between two of them has no point: a line is drawn only
    between neighbouring sizes both measured, never across one that was skipped or failed."""
    measured = {t for t, _ in pts}
    segments: List[List[Tuple[float, float]]] = []
    current: List[Tuple[float, float]] = []
    values = dict(pts)
    for t in sorted(attempted | measured):
        if t in measured:
            current.append((t, values[t]))
        elif current:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def plot(payload: Dict, path: Path) -> Optional[str]:
    """Write the chart to ``path``; None on success, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot drawn (python -m bench.plot <json> draws it later)"
    from .report import _measured

    rows = [r for r in payload["rows"] if _measured(r)]
    attempted: Dict = {}  # case -> every T the run tried (skipped and failed rows included)
    for r in payload["rows"]:
        attempted.setdefault(r["case"], set()).add(r["tokens"])
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return "no results to plot"
    cols = min(3, len(cases))
    nrows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    colors: Dict[str, str] = {}
    for ax, case in zip(axes.flat, cases):
        mine = [r for r in rows if r["case"] == case]
        metric = "tflops" if any(r.get("tflops") for r in mine) else "ms"
        for impl in dict.fromkeys(r["impl"] for r in mine):
            for routing, style in (("uniform", "-"), ("zipf", "--")):
                pts = sorted((r["tokens"], r[metric]) for r in mine if r["impl"] == impl and r["routing"] == routing
                             and isinstance(r.get(metric), (int, float)))
                label = impl if routing == "uniform" or impl not in colors else None
                for segment in _segments(pts, attempted[case]):
                    line, = ax.plot(*zip(*segment), style, marker="o", markersize=3, color=colors.get(impl),
                                    label=label)
                    colors.setdefault(impl, line.get_color())
                    label = None
        if metric == "tflops":  # the datasheet roofline: the most any implementation could reach at each T
            roof = sorted({(r["tokens"], r["flops"] / r["roofline_ms"] / 1e9) for r in mine
                           if r.get("roofline_ms") and r.get("flops") and r["routing"] == "uniform"})
            label = "roofline (datasheet)"
            for segment in _segments(roof, attempted[case]):
                ax.plot(*zip(*segment), ":", color="black", lw=1.2, marker="_" if len(segment) == 1 else None,
                        markersize=12, label=label)
                label = None
        ax.set_xscale("log", base=2)
        if metric == "ms":
            ax.set_yscale("log")
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("useful TFLOP/s" if metric == "tflops" else "ms (median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    smoke = " (CPU SMOKE RUN: timings mean nothing)" if payload.get("smoke_only") else ""
    fig.suptitle(f"scattermoe kernels — {payload['device']}, commit {payload['commit'][:7]}{smoke}; "
                 f"solid uniform, dashed Zipf routing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.plot RESULTS.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    from .report import check_payload

    try:
        payload = check_payload(json.loads(src.read_text()), str(src))
    except (OSError, ValueError) as exc:  # a missing file, not JSON, not a result file
        print(f"python -m bench.plot: error: {exc}", file=sys.stderr)
        return 2
    note = plot(payload, src.with_suffix(".png"))
    print(note or f"wrote {src.with_suffix('.png')}", file=sys.stderr)
    return 0 if note is None else 1


if __name__ == "__main__":
    sys.exit(main())
