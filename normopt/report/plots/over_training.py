"""over_training.png: the gaps and interactions at every eval step (:mod:`normopt.report.stats.over_training`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normopt.report.plots.style import figure, variant_styles
from normopt.report.stats.over_training import WINDOW_FRACTION, curve_label


def plot_over_training(summary: Mapping[str, Any], path: Path) -> bool:
    """Top row: each variant's gap to the baseline over steps, one panel per across level (and
    stratum); bottom row: the interaction over steps per non-reference level. Shaded band =
    the 95% Welch t interval where seeds allow; the last quarter of training (the stability
    window) is shaded grey. False (nothing drawn) without curves."""
    curves = summary.get("over_training") or {}
    if not curves.get("gaps"):
        return False
    styles = variant_styles(summary)
    gap_panels = list(dict.fromkeys(curve_label(r) for r in curves["gaps"]))
    inter_panels = list(dict.fromkeys(curve_label(r) for r in curves["interactions"]))
    rows = 2 if inter_panels else 1
    cols = max(len(gap_panels), len(inter_panels))
    fig = figure(figsize=(4.6 * cols, 3.6 * rows))
    grid = fig.subplots(rows, cols, squeeze=False)
    s = summary["settings"]
    for row, (records, panels, what) in enumerate(
        [
            (curves["gaps"], gap_panels, f"gap to {s['baseline_norm']}"),
            (curves["interactions"], inter_panels, f"interaction (gap − gap under {s['reference_optim']})"),
        ][:rows]
    ):
        for col in range(cols):
            ax = grid[row][col]
            if col >= len(panels):
                ax.set_visible(False)
                continue
            last = 0
            for record in (r for r in records if curve_label(r) == panels[col]):
                color, marker = styles.get(record["variant"], ("C0", "o"))
                steps = [p["step"] for p in record["points"]]
                last = max(last, *steps)
                ax.plot(
                    steps,
                    [p["value"] for p in record["points"]],
                    marker=marker,
                    color=color,
                    ms=4,
                    label=record["variant"],
                )
                band = [p for p in record["points"] if p["ci95"] is not None]
                if band:
                    ax.fill_between(
                        [p["step"] for p in band],
                        [p["ci95"][0] for p in band],
                        [p["ci95"][1] for p in band],
                        color=color,
                        alpha=0.15,
                        lw=0,
                    )
            ax.axvspan((1 - WINDOW_FRACTION) * last, last, color="grey", alpha=0.08)
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_title(f"{what}: {panels[col]}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("nats")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        "over training: estimates at every eval step, 95% t interval bands where seeds allow; "
        "grey = the last quarter (stability window)",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return True
