"""The report's PNG plots, drawn with matplotlib's Agg renderer (no pyplot, no global state).

Losses: training curves per cell (``plot_loss_curves``), final eval losses per group
(``plot_final_losses``) and gaps to the baseline norm (``plot_gaps``). Diagnostics, from the
cells' ``diagnostics.jsonl``: norm-layer saturation (``plot_saturation``), mean spectral norm
of the weight matrices (``plot_spectral_norm``) and loss by token-frequency bucket
(``plot_tail_tokens``). Every plot has one color per variant, in the summary's variant order.
``figure`` is how every experiment plot (the spectrum fit's too) gets its matplotlib Figure.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.experiments.cell_reading import Cell
from normopt.experiments.statistics import ema_smooth


def figure(**kwargs):
    """A matplotlib Figure without pyplot: no global backend state, PNGs drawn by Agg."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the plots need matplotlib: pip install matplotlib") from None
    return Figure(layout="constrained", **kwargs)


def _tick_label(variant: str) -> str:
    """An arm's label on several lines (one setting a line) so long arms stay readable."""
    return variant.replace("[", "\n[").replace(",", ",\n")


def _finite(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    points = [(s, v) for s, v in series if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss_curves(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path, smoothing: float) -> None:
    """One panel per optimizer; per cell a thin line of the EMA-smoothed train loss and its eval
    losses as dots, one color per variant; a thick line = mean of the included cells' smoothed
    curves at the steps they share; left-out cells dotted."""
    records = {r["path"]: r for r in summary["cells"]}
    colors = {v: f"C{i % 10}" for i, v in enumerate(summary["variants"])}
    optims = summary["optims"]
    fig = figure(figsize=(5.5 * max(1, len(optims)), 4.2))
    axes = fig.subplots(1, max(1, len(optims)), sharey=True, squeeze=False)[0]
    focus: list[float] = []  # included values past the first 10% of training set the y range
    for ax, optim in zip(axes, optims):
        for variant in summary["variants"]:
            # the summary holds the inferred arms; the cells as read may not
            members = [c for c in cells if c.optim == optim and c.metrics
                       and records[str(c.path)]["variant"] == variant]
            curves = []
            for cell in members:
                included = records[str(cell.path)]["included"]
                steps, losses = _finite(cell.metrics.train)
                smooth = ema_smooth(losses, smoothing)
                ax.plot(steps, smooth, color=colors[variant], lw=0.8, alpha=0.6 if included else 0.4,
                        ls="-" if included else ":")
                eval_steps, eval_losses = _finite(cell.metrics.evals)
                ax.plot(eval_steps, eval_losses, "o", ms=3, color=colors[variant], alpha=0.8 if included else 0.3)
                if included and steps:
                    curves.append(dict(zip(steps, smooth)))
                    cut = 0.1 * steps[-1]
                    focus += [v for s, v in zip(steps, smooth) if s >= cut]
                    focus += [v for s, v in zip(eval_steps, eval_losses) if s >= cut]
            if curves:
                common = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(common, [statistics.fmean(c[s] for c in curves) for s in common], color=colors[variant],
                        lw=2.2, label=f"{variant} (n={len(curves)})")
        ax.set_title(optim)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel(f"loss (train: EMA {smoothing}; dots: eval)")
    if focus:
        low, high = min(focus), max(focus)
        margin = 0.05 * (high - low) or 0.05
        axes[0].set_ylim(low - margin, high + margin)
    fig.suptitle("loss curves (thin: one seed; thick: mean of included seeds; dotted: left out)")
    fig.savefig(path, dpi=110)


def plot_final_losses(summary: Mapping[str, Any], path: Path) -> None:
    """Per optimizer panel: each cell's final eval loss (dots; left-out cells as grey x) and each
    group's mean with an error bar of ± one sample std."""
    variants, optims = summary["variants"], summary["optims"]
    groups = {(g["variant"], g["optim"]): g for g in summary["groups"]}
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig = figure(figsize=(max(4.0, 1.1 * len(variants)) * max(1, len(optims)), 4.2))
    axes = fig.subplots(1, max(1, len(optims)), sharey=True, squeeze=False)[0]
    for ax, optim in zip(axes, optims):
        for x, variant in enumerate(variants):
            cells = [c for c in summary["cells"] if c["optim"] == optim and c["variant"] == variant
                     and c["final_eval_loss"] is not None and math.isfinite(c["final_eval_loss"])]
            for j, cell in enumerate(cells):
                offset = 0.08 * (j - (len(cells) - 1) / 2)  # spread seeds so equal values stay visible
                if cell["included"]:
                    ax.plot(x + offset, cell["final_eval_loss"], "o", ms=4, color=colors[variant], alpha=0.6)
                else:
                    ax.plot(x + offset, cell["final_eval_loss"], "x", ms=6, color="grey")
            g = groups.get((variant, optim))
            if g and g["n"]:
                ax.errorbar(x + 0.3, g["mean"], yerr=g["std"] or 0.0, fmt="s", ms=6, capsize=4,
                            color=colors[variant])
        ax.set_xticks(range(len(variants)), [_tick_label(v) for v in variants], fontsize=7)
        ax.set_title(optim)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("final eval loss (nats)")
    kept = [g["mean"] + sign * (g["std"] or 0.0) for g in summary["groups"] if g["n"] for sign in (-1, 1)]
    kept += [c["final_eval_loss"] for c in summary["cells"] if c["included"]]
    if kept:  # scale to the included cells: one blown-up left-out cell would flatten the rest
        margin = 0.15 * (max(kept) - min(kept)) or 0.05
        axes[0].set_ylim(min(kept) - margin, max(kept) + margin)
    fig.suptitle("final eval loss per cell (dots), group mean ± sample std (squares), "
                 "left out (x, if in range)")
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
                ax.errorbar(xs[-1], gap["value"], yerr=[[gap["value"] - lo], [hi - gap["value"]]],
                            color="black", capsize=3, lw=0.9)
            else:
                without_interval += 1
                ax.annotate("1 seed:\nno interval", (xs[-1], gap["value"]), textcoords="offset points",
                            xytext=(0, 3 if gap["value"] >= 0 else -14), ha="center", fontsize=6)
        ax.bar(xs, values, width, label=optim, color=f"C{k % 10}", alpha=0.8)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(variants)), [_tick_label(v) for v in variants], fontsize=7)
    ax.set_ylabel(f"gap to {summary['settings']['baseline_norm']} (nats)")
    ax.set_title("gap to the baseline norm per optimizer" +
                 (" (95% t interval)" if without_interval < len(gaps) else " (1 seed: no intervals)"))
    ax.grid(alpha=0.3, axis="y")
    if optims:
        ax.legend()
    fig.savefig(path, dpi=110)



# --------------------------------------------------------------------------- diagnostics


def _diagnosed(cells: Sequence[Cell], summary: Mapping[str, Any], has) -> list[tuple[Cell, Mapping[str, Any]]]:
    """(cell, its summary record) for the placed cells whose diagnostics satisfy ``has``."""
    records = {r["path"]: r for r in summary["cells"]}
    return [(c, records[str(c.path)]) for c in cells
            if c.diagnostics is not None and has(c.diagnostics) and c.optim in summary["optims"]
            and records[str(c.path)]["variant"] in summary["variants"]]


def _panels(members: Sequence[tuple[Cell, Mapping[str, Any]]], summary: Mapping[str, Any], rows: int = 1,
            height: float = 4.2):
    """A figure with one column per optimizer that has a member; returns (fig, axes[row][col], optims)."""
    optims = [o for o in summary["optims"] if any(c.optim == o for c, _ in members)]
    fig = figure(figsize=(5.5 * max(1, len(optims)), height * rows))
    axes = fig.subplots(rows, max(1, len(optims)), sharex=True, sharey="row", squeeze=False)
    return fig, axes, optims


def _plot_series(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path, series, ylabel: str,
                 title: str, log: bool = False) -> bool:
    """One panel per optimizer, one line per cell of ``series(diagnostics)`` (step, value) pairs,
    one color per variant; left-out cells dotted. Non-finite points (and on a log axis,
    non-positive ones) are not drawn. Returns False, writing nothing, when no placed cell has
    a point."""
    members = _diagnosed(cells, summary, lambda d: bool(series(d)))
    if not members:
        return False
    colors = {v: f"C{i % 10}" for i, v in enumerate(summary["variants"])}
    fig, axes, optims = _panels(members, summary)
    for ax, optim in zip(axes[0], optims):
        for variant in summary["variants"]:
            group = [(c, r) for c, r in members if c.optim == optim and r["variant"] == variant]
            for i, (cell, record) in enumerate(group):
                points = [(s, v) for s, v in series(cell.diagnostics) if math.isfinite(v) and (v > 0 or not log)]
                ax.plot([s for s, _ in points], [v for _, v in points], color=colors[variant], lw=1.2,
                        marker="o" if len(points) == 1 else None, ms=3,
                        alpha=0.85 if record["included"] else 0.45, ls="-" if record["included"] else ":",
                        label=f"{variant} (n={len(group)})" if i == 0 else "_nolegend_")
        if log:
            ax.set_yscale("log")
        ax.set_title(optim)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both" if log else "major")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(f"{title} (one line per cell; dotted: left out)")
    fig.savefig(path, dpi=110)
    return True


def plot_saturation(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path) -> bool:
    """Saturation vs step, the mean over each cell's bounded norm layers (cells without any, e.g.
    RMSNorm cells, are not drawn); one panel per optimizer. False (no file) without data."""
    return _plot_series(cells, summary, path, lambda d: d.saturation, "saturation (mean over bounded norm layers)",
                 "norm-layer saturation")


def plot_spectral_norm(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path) -> bool:
    """Mean spectral norm of the weight matrices vs step (log scale); one panel per optimizer.
    False (no file) without data."""
    return _plot_series(cells, summary, path, lambda d: d.spectral_norm, "mean spectral norm of the weight matrices",
                 "spectral norm", log=True)


def _bucket_mean(curves: Sequence[Sequence[float]]) -> list[float]:
    """Per bucket, the mean of the curves' finite values there (NaN where none is)."""
    means = []
    for b in range(max(len(c) for c in curves)):
        values = [c[b] for c in curves if b < len(c) and math.isfinite(c[b])]
        means.append(statistics.fmean(values) if values else math.nan)
    return means


def plot_tail_tokens(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path) -> bool:
    """The last tail_tokens record of each cell: validation loss per token-frequency bucket,
    bucket 0 = the most frequent tokens, the last = the rarest. One panel per optimizer; thin
    lines = single cells (dotted: left out), thick lines with markers = the mean over a
    variant's included cells. Where the baseline norm has included cells, a second row shows
    each variant's mean minus the baseline's mean per bucket (how the gap splits head -> tail).
    False (no file) when no placed cell has a tail_tokens record."""
    members = _diagnosed(cells, summary, lambda d: d.tail_tokens is not None)
    if not members:
        return False
    colors = {v: f"C{i % 10}" for i, v in enumerate(summary["variants"])}
    base = summary["settings"]["baseline_norm"]

    def losses(cell: Cell) -> list[float]:
        return [math.nan if v is None else v for v in cell.diagnostics.tail_tokens.bucket_loss]

    means: dict[str, dict[str, list[float]]] = {}  # optim -> variant -> mean loss per bucket
    for optim in summary["optims"]:
        for variant in summary["variants"]:
            kept = [losses(c) for c, r in members if c.optim == optim and r["variant"] == variant and r["included"]]
            if kept:
                means.setdefault(optim, {})[variant] = _bucket_mean(kept)
    rows = 2 if any(base in m for m in means.values()) else 1
    fig, axes, optims = _panels(members, summary, rows=rows, height=3.8)
    for k, optim in enumerate(optims):
        ax = axes[0][k]
        for variant in summary["variants"]:
            group = [(c, r) for c, r in members if c.optim == optim and r["variant"] == variant]
            mean = means.get(optim, {}).get(variant)
            for i, (cell, record) in enumerate(group):
                ax.plot(range(len(losses(cell))), losses(cell), color=colors[variant], lw=0.8, alpha=0.35,
                        ls="-" if record["included"] else ":",
                        label=f"{variant} (left out)" if mean is None and i == 0 else "_nolegend_")
            if mean is not None:
                n = sum(r["included"] for _, r in group)
                ax.plot(range(len(mean)), mean, "o-", color=colors[variant], lw=2.0, ms=4,
                        label=f"{variant} (mean of {n})")
        ax.set_title(optim)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if rows == 2:
            ax = axes[1][k]
            reference = means.get(optim, {}).get(base)
            if reference is None:
                ax.text(0.5, 0.5, f"no included {base} cells", ha="center", va="center", transform=ax.transAxes)
            else:
                for variant, mean in means[optim].items():
                    if variant != base:
                        diff = [a - b for a, b in zip(mean, reference)]
                        ax.plot(range(len(diff)), diff, "o-", color=colors[variant], lw=1.5, ms=4, label=variant)
                ax.axhline(0.0, color=colors.get(base, "black"), lw=1.0)
            ax.grid(alpha=0.3)
        axes[-1][k].set_xlabel("token-frequency bucket (0 = most frequent → last = rarest)")
        axes[-1][k].xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("validation loss (nats)")
    if rows == 2:
        axes[1][0].set_ylabel(f"mean loss − mean {base} loss (nats)")
    fig.suptitle("loss by token-frequency bucket, last tail_tokens record of each cell")
    fig.savefig(path, dpi=110)
    return True
