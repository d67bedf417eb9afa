"""Draw a results JSON as a bar chart (TFLOP/s per case, mode and provider).

    python -m bench.plot bench/results/<name>.json   # writes <name>.png beside it

matplotlib is optional (the GPU image need not have it): without it nothing is drawn
and ``plot`` returns the reason, which the run records as a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, Optional


def plot(payload: Dict, path: Path) -> Optional[str]:
    """Write the chart to ``path``; None on success, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot drawn (python -m bench.plot <json> draws it later)"

    groups, providers = [], []
    values: Dict = {}
    for entry in payload["results"]["cases"]:
        for row in entry["rows"]:
            group = f"{entry['label']}\n{row['mode']}"
            if group not in groups:
                groups.append(group)
            if row["provider"] not in providers:
                providers.append(row["provider"])
            values[(group, row["provider"])] = row.get("tflops") or 0.0
    if not groups:
        return "no results to plot"

    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.5))
    for i, provider in enumerate(providers):
        xs = [g + (i - (len(providers) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get((g, provider), 0.0) for g in groups], width, label=provider)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("useful TFLOP/s")
    env = payload["environment"]
    smoke = " (CPU SMOKE RUN: timings mean nothing)" if payload.get("smoke_only") else ""
    ax.set_title(f"{payload['benchmark']} — {env['device']['name']}, commit {env['git']['short']}{smoke}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.plot RESULTS.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    note = plot(json.loads(src.read_text()), src.with_suffix(".png"))
    print(note or f"wrote {src.with_suffix('.png')}", file=sys.stderr)
    return 0 if note is None else 1


if __name__ == "__main__":
    sys.exit(main())
