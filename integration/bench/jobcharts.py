"""The job-start benchmark's chart (``bootseer bench job --png``): kept apart from the runs so that redrawing
a chart never touches the code that starts jobs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_png(result: dict[str, Any], path: Path, phases: Sequence[str]) -> None:
    """Stacked bars: the phases of each mode's median start, one group per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(phases, ("#c7c7c7", "#9467bd", "#1f77b4", "#8c564b", "#ff7f0e", "#2ca02c", "#7f7f7f"),
                      strict=True))
    bars = [(rk, mode, m) for rk, per in result.get("median", {}).items() for mode, m in per.items()]
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * max(1, len(bars))), dpi=110)
    for i, (_rk, _mode, m) in enumerate(bars):
        left = 0.0
        for p in phases:
            w = m["phases_s"][p]
            ax.barh(i, w, left=left, color=colors[p], label=p if i == 0 else None)
            left += w
        ax.text(left, i, f" {m['total_s']:.1f} s", va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), [f"{mode} @ {rk}" for rk, mode, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from launch to the first step's loss (median)")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
