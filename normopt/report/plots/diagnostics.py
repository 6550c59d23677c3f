"""The report's diagnostics plots, from the cells' ``diagnostics.jsonl`` (read by
:mod:`normopt.report.cells.cell_reading`), drawn like the loss plots (:mod:`.plots`):

* ``plot_saturation``: mean norm-layer saturation vs step, one line per cell;
* ``plot_saturation_layers``: saturation per layer x step, one heat map per cell. A mean over
  layers can hide eight saturated layers behind one that is not; the heat map cannot;
* ``plot_spectral_norm``: mean spectral norm of the block matrices (embedding and output excluded) vs step (log scale);
* ``plot_tail_tokens``: loss by token-frequency bucket.

Diagnostics are logged every few hundred steps, so a series often has a handful of points:
every line carries markers at its points, so a straight segment between two records is not
read as a measured trend. Each drawer returns False, writing nothing, without data.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.report.cells.cell_reading import Cell
from normopt.report.plots.style import figure, seed_styles, variant_styles

SPARSE_POINTS = 30  # a series with at most this many points gets a marker at every one


def _diagnosed(cells: Sequence[Cell], summary: Mapping[str, Any], has) -> list[tuple[Cell, Mapping[str, Any]]]:
    """(cell, its summary record) for the placed cells whose diagnostics satisfy ``has``."""
    records = {r["path"]: r for r in summary["cells"]}
    return [
        (c, records[str(c.path)])
        for c in cells
        if c.diagnostics is not None
        and has(c.diagnostics)
        and c.optim in summary["optims"]
        and records[str(c.path)]["variant"] in summary["variants"]
    ]


def _panels(
    members: Sequence[tuple[Cell, Mapping[str, Any]]], summary: Mapping[str, Any], rows: int = 1, height: float = 4.2
):
    """A figure with one column per optimizer that has a member; returns (fig, axes[row][col], optims)."""
    optims = [o for o in summary["optims"] if any(c.optim == o for c, _ in members)]
    fig = figure(figsize=(5.5 * max(1, len(optims)), height * rows))
    axes = fig.subplots(rows, max(1, len(optims)), sharex=True, sharey="row", squeeze=False)
    return fig, axes, optims


def _plot_series(
    cells: Sequence[Cell], summary: Mapping[str, Any], path: Path, series, ylabel: str, title: str, log: bool = False
) -> bool:
    """One panel per optimizer, one line per cell of ``series(diagnostics)`` (step, value) pairs;
    color and marker = variant, line style = seed, left-out cells dotted. Every point of a
    sparse series gets a marker (a denser one about 10). Non-finite points (and on a log axis,
    non-positive ones) are not drawn. Returns False, writing nothing, when no placed cell has
    a point."""
    members = _diagnosed(cells, summary, lambda d: bool(series(d)))
    if not members:
        return False
    styles = variant_styles(summary)
    dashes = seed_styles([c for c, _ in members])
    fig, axes, optims = _panels(members, summary)
    for ax, optim in zip(axes[0], optims):
        for variant in summary["variants"]:
            color, marker = styles[variant]
            group = [(c, r) for c, r in members if c.optim == optim and r["variant"] == variant]
            for i, (cell, record) in enumerate(group):
                points = [(s, v) for s, v in series(cell.diagnostics) if math.isfinite(v) and (v > 0 or not log)]
                ax.plot(
                    [s for s, _ in points],
                    [v for _, v in points],
                    color=color,
                    lw=1.2,
                    marker=marker,
                    ms=4,
                    markevery=1 if len(points) <= SPARSE_POINTS else max(1, len(points) // 10),
                    alpha=0.85 if record["included"] else 0.45,
                    ls=dashes[cell.seed] if record["included"] else ":",
                    label=f"{variant} (n={len(group)})" if i == 0 else "_nolegend_",
                )
        if log:
            ax.set_yscale("log")
        ax.set_title(optim)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both" if log else "major")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(f"{title} (one line per cell, a marker per record; line style: seed; dotted: left out)")
    fig.savefig(path, dpi=110)
    return True


def plot_saturation(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path) -> bool:
    """Saturation vs step, the mean over each cell's bounded norm layers (cells without any, e.g.
    RMSNorm cells, are not drawn); one panel per optimizer. False (no file) without data. The
    per-layer picture is ``plot_saturation_layers``."""
    return _plot_series(
        cells,
        summary,
        path,
        lambda d: d.saturation,
        "saturation (mean over bounded norm layers)",
        "norm-layer saturation",
    )


def plot_saturation_layers(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path) -> bool:
    """One heat map per cell with bounded norm layers: layer (rows, in logged order) x diagnostics
    record (columns, labelled by step), color = saturation on a fixed 0..1 scale; a layer
    without a value at a step is grey. Small multiples in a grid, cells in the summary's order.
    False (no file) when no placed cell logged a saturation."""
    from matplotlib import colormaps

    members = _diagnosed(cells, summary, lambda d: bool(d.saturation_by_step))
    if not members:
        return False
    order = {v: i for i, v in enumerate(summary["variants"])}
    members.sort(key=lambda m: (summary["optims"].index(m[0].optim), order[m[1]["variant"]], m[0].seed or 0))
    columns = min(3, len(members))
    rows = math.ceil(len(members) / columns)
    layer_counts = [
        len({name for _, layers in c.diagnostics.saturation_by_step for name in layers}) for c, _ in members
    ]
    fig = figure(figsize=(4.6 * columns, max(2.4, 0.5 + 0.22 * max(layer_counts)) * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    cmap = colormaps["magma"].with_extremes(bad="lightgrey")
    image = None
    for ax, (cell, record) in zip(axes.flat, members):
        by_step = cell.diagnostics.saturation_by_step
        layers = list(dict.fromkeys(name for _, values in by_step for name in values))
        grid = [[values.get(name, math.nan) for _, values in by_step] for name in layers]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=1.0)
        steps = [s for s, _ in by_step]
        ticks = range(0, len(steps), max(1, len(steps) // 6))
        ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks], fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=6 if len(layers) > 12 else 7)
        ax.set_xlabel("step")
        ax.set_title(
            f"{cell.name} ({record['variant']}, {cell.optim})" + ("" if record["included"] else " — left out"),
            fontsize=8,
        )
    for ax in list(axes.flat)[len(members) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label="saturation (0..1)")
    fig.suptitle("norm-layer saturation per layer and step (grey: no value)")
    fig.savefig(path, dpi=110)
    return True


def plot_spectral_norm(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path) -> bool:
    """Mean spectral norm of the block matrices vs step (log scale; the embedding and output
    matrices are not in it); one panel per optimizer. False (no file) without data."""
    return _plot_series(
        cells,
        summary,
        path,
        lambda d: d.spectral_norm,
        "mean spectral norm of the block matrices (embedding, output excluded)",
        "spectral norm",
        log=True,
    )


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
    styles = variant_styles(summary)
    colors = {v: color for v, (color, _) in styles.items()}
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
                ax.plot(
                    range(len(losses(cell))),
                    losses(cell),
                    color=colors[variant],
                    lw=0.8,
                    alpha=0.35,
                    ls="-" if record["included"] else ":",
                    label=f"{variant} (left out)" if mean is None and i == 0 else "_nolegend_",
                )
            if mean is not None:
                n = sum(r["included"] for _, r in group)
                ax.plot(
                    range(len(mean)),
                    mean,
                    marker=styles[variant][1],
                    color=colors[variant],
                    lw=2.0,
                    ms=4,
                    label=f"{variant} (mean of {n})",
                )
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
                        ax.plot(
                            range(len(diff)),
                            diff,
                            marker=styles[variant][1],
                            color=colors[variant],
                            lw=1.5,
                            ms=4,
                            label=variant,
                        )
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
