"""The report's loss plots, drawn with matplotlib's Agg renderer (no pyplot, no global state):
training curves per cell (``plot_loss_curves``), final eval losses per group
(``plot_final_losses``) and gaps to the baseline norm (``plot_gaps``). The diagnostics plots
are :mod:`normopt.report.plots.diagnostics`.

Rules every plot keeps so that it cannot mislead: one color and one marker per variant (in the
summary's variant order), so overlapping lines stay apart; units on the axes; smoothing only
with a centred window, named in the title; no error bar where no interval exists (a group of
one seed says "1 seed: no interval" instead). The figure and the styles are
:mod:`normopt.report.plots.style`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.report.cells.cell_reading import Cell
from normopt.report.plots.style import figure, seed_styles, variant_styles
from normopt.report.stats.smoothing import centred_half_width, centred_smooth


def _tick_label(variant: str) -> str:
    """An arm's label on several lines (one setting a line) so long arms stay readable."""
    return variant.replace("[", "\n[").replace(",", ",\n")


def _finite(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    points = [(s, v) for s, v in series if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def _every(n: int, marks: int = 8) -> int:
    """Marker spacing that puts about ``marks`` markers on a line of n points."""
    return max(1, n // marks)


def smoothing_label(smoothing: float) -> str:
    half = centred_half_width(smoothing)
    return (
        "logged values, unsmoothed"
        if half == 0
        else f"centred mean over up to {2 * half + 1} logged points (at most 1/10 of a curve)"
    )


def plot_loss_curves(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path, smoothing: float) -> None:
    """One panel per optimizer. Per cell: the logged train losses (faint line with dots), their
    centred moving mean (:func:`centred_smooth`, a window of about (1 + s) / (1 - s) logged
    points for smoothing s: no lag, so a falling curve is not drawn above its logged values),
    and the eval losses (large markers). Color and marker = variant, line style = seed; left-out
    cells dotted and faint. A thick line = the mean of the included cells' smoothed curves at
    the steps they share."""
    from matplotlib.lines import Line2D

    records = {r["path"]: r for r in summary["cells"]}
    styles = variant_styles(summary)
    dashes = seed_styles(cells)
    half = centred_half_width(smoothing)
    optims = summary["optims"]
    fig = figure(figsize=(5.5 * max(1, len(optims)), 4.6))
    axes = fig.subplots(1, max(1, len(optims)), sharey=True, squeeze=False)[0]
    focus: list[float] = []  # included values past the first 10% of training set the y range
    for ax, optim in zip(axes, optims):
        for variant in summary["variants"]:
            color, marker = styles[variant]
            # the summary holds the inferred arms; the cells as read may not
            members = [
                c for c in cells if c.optim == optim and c.metrics and records[str(c.path)]["variant"] == variant
            ]
            curves = []
            for cell in members:
                included = records[str(cell.path)]["included"]
                steps, losses = _finite(cell.metrics.train)
                smooth = centred_smooth(losses, half)
                if half:
                    ax.plot(steps, losses, color=color, lw=0.4, marker=".", ms=2, alpha=0.25 if included else 0.12)
                ax.plot(
                    steps,
                    smooth,
                    color=color,
                    lw=1.0,
                    alpha=0.75 if included else 0.4,
                    ls=dashes[cell.seed] if included else ":",
                    marker=marker,
                    ms=3,
                    markevery=_every(len(steps)),
                    fillstyle="none",
                )
                eval_steps, eval_losses = _finite(cell.metrics.evals)
                ax.plot(
                    eval_steps,
                    eval_losses,
                    marker,
                    ms=5,
                    color=color,
                    mec="black",
                    mew=0.4,
                    alpha=0.9 if included else 0.3,
                )
                if included and steps:
                    curves.append(dict(zip(steps, smooth)))
                    cut = 0.1 * steps[-1]
                    focus += [v for s, v in zip(steps, smooth) if s >= cut]
                    focus += [v for s, v in zip(eval_steps, eval_losses) if s >= cut]
            if curves:
                common = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(
                    common,
                    [statistics.fmean(c[s] for c in curves) for s in common],
                    color=color,
                    lw=2.2,
                    marker=marker,
                    ms=5,
                    markevery=_every(len(common)),
                    label=f"{variant}: mean of {len(curves)} seed{'s' if len(curves) > 1 else ''}",
                )
        ax.set_title(optim)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    key = [Line2D([], [], color="grey", ls=ls, label=f"seed {seed}") for seed, ls in dashes.items()]
    key += [
        Line2D([], [], color="grey", ls=":", label="left out"),
        Line2D([], [], color="grey", lw=0.4, marker=".", ms=2, label="train loss, logged"),
        Line2D([], [], color="grey", ls="none", marker="o", mec="black", mew=0.4, label="eval loss"),
    ]
    fig.legend(handles=key, loc="outside lower center", ncols=len(key), fontsize=7)
    axes[0].set_ylabel("loss (nats)")
    if focus:
        low, high = min(focus), max(focus)
        margin = 0.05 * (high - low) or 0.05
        axes[0].set_ylim(low - margin, high + margin)
    fig.suptitle(
        f"loss curves; train: {smoothing_label(smoothing)}, no lag\n"
        "color + marker: variant; thick: mean of the included seeds",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)


def plot_final_losses(summary: Mapping[str, Any], path: Path) -> None:
    """Per optimizer panel: each cell's final eval loss (dots; left-out cells as grey x) and each
    group's mean with an error bar of ± one sample std; a group of one seed has no spread to
    show, so its square has no bar and says "1 seed: no interval"."""
    variants, optims = summary["variants"], summary["optims"]
    groups = {(g["variant"], g["optim"]): g for g in summary["groups"]}
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig = figure(figsize=(max(4.0, 1.1 * len(variants)) * max(1, len(optims)), 4.2))
    axes = fig.subplots(1, max(1, len(optims)), sharey=True, squeeze=False)[0]
    for ax, optim in zip(axes, optims):
        for x, variant in enumerate(variants):
            cells = [
                c
                for c in summary["cells"]
                if c["optim"] == optim
                and c["variant"] == variant
                and c["final_eval_loss"] is not None
                and math.isfinite(c["final_eval_loss"])
            ]
            for j, cell in enumerate(cells):
                offset = 0.08 * (j - (len(cells) - 1) / 2)  # spread seeds so equal values stay visible
                if cell["included"]:
                    ax.plot(x + offset, cell["final_eval_loss"], "o", ms=4, color=colors[variant], alpha=0.6)
                else:
                    ax.plot(x + offset, cell["final_eval_loss"], "x", ms=6, color="grey")
            g = groups.get((variant, optim))
            if g and g["n"] and g["std"] is not None:
                ax.errorbar(x + 0.3, g["mean"], yerr=g["std"], fmt="s", ms=6, capsize=4, color=colors[variant])
            elif g and g["n"]:
                ax.plot(x + 0.3, g["mean"], "s", ms=6, color=colors[variant])
                ax.annotate(
                    "1 seed:\nno interval",
                    (x + 0.3, g["mean"]),
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                    fontsize=6,
                )
        ax.set_xticks(range(len(variants)), [_tick_label(v) for v in variants], fontsize=7)
        ax.set_title(optim)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("final eval loss (nats)")
    kept = [g["mean"] + sign * (g["std"] or 0.0) for g in summary["groups"] if g["n"] for sign in (-1, 1)]
    kept += [c["final_eval_loss"] for c in summary["cells"] if c["included"]]
    if kept:  # scale to the included cells: one blown-up left-out cell would flatten the rest
        margin = 0.15 * (max(kept) - min(kept)) or 0.05
        axes[0].set_ylim(min(kept) - margin, max(kept) + margin)
    fig.suptitle("final eval loss per cell (dots), group mean ± sample std (squares), left out (x, if in range)")
    fig.savefig(path, dpi=110)


def plot_gaps(summary: Mapping[str, Any], path: Path) -> None:
    """Gap to the baseline per variant, one bar per optimizer, error bars = the gap's 95% t
    interval; a bar without an interval (a group with one seed) has no error bar and says so."""
    variants = [v for v in summary["variants"] if v != summary["settings"]["baseline_norm"]]
    optims = summary["optims"]
    gaps = {(g["variant"], g["optim"]): g for g in summary["gaps"]}
    fig = figure(figsize=(max(4.5, 1.2 * len(variants) * len(optims)), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(optims))
    without_interval = 0
    for k, optim in enumerate(optims):
        xs, values = [], []
        for x, variant in enumerate(variants):
            gap = gaps.get((variant, optim))
            if gap is None:
                continue
            xs.append(x + (k - (len(optims) - 1) / 2) * width)
            values.append(gap["value"])
            if gap["ci95"] is not None:
                lo, hi = gap["ci95"]
                ax.errorbar(
                    xs[-1],
                    gap["value"],
                    yerr=[[gap["value"] - lo], [hi - gap["value"]]],
                    color="black",
                    capsize=3,
                    lw=0.9,
                )
            else:
                without_interval += 1
                ax.annotate(
                    "1 seed:\nno interval",
                    (xs[-1], gap["value"]),
                    textcoords="offset points",
                    xytext=(0, 3 if gap["value"] >= 0 else -14),
                    ha="center",
                    fontsize=6,
                )
        ax.bar(xs, values, width, label=optim, color=f"C{k % 10}", alpha=0.8)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(variants)), [_tick_label(v) for v in variants], fontsize=7)
    ax.set_ylabel(f"gap to {summary['settings']['baseline_norm']} (nats)")
    s = summary["settings"]
    ax.set_title(
        f"gap to the baseline {s.get('compare_noun', 'norm')}"
        f"{' per ' + s['across_noun'] if s.get('across_noun', 'optimizer') else ''}"
        + (" (95% t interval)" if without_interval < len(gaps) else " (1 seed: no intervals)")
    )
    ax.grid(alpha=0.3, axis="y")
    if optims:
        ax.legend()
    fig.savefig(path, dpi=110)
