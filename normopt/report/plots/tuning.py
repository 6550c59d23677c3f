"""tuning.png: a tuned grid's final tuning loss against the tuned value (:mod:`normopt.report.stats.tuning`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.report.cells.axes import level_label
from normopt.report.plots.style import figure, variant_styles
from normopt.report.stats.tuning_choice import numeric_values


def _is_positive_numeric(values: Sequence[Any]) -> bool:
    numbers = numeric_values(values)
    return numbers is not None and all(x > 0 for x in numbers)


def plot_tuning(summary: Mapping[str, Any], path: Path) -> bool:
    """Final tuning loss against the tuned value, one panel per across level (and stratum), one
    line per variant through the means over tuning seeds (each seed a faint dot; a value whose
    runs have not all finished is left off the line), the chosen value a large open circle,
    excluded (diverged) values an x on the panel's top edge. A log
    x axis when every value is a positive number. False without a tuning analysis."""
    tuning = summary.get("tuning")
    if not tuning or not tuning["choices"]:
        return False
    styles = variant_styles(summary)
    values = tuning["values"]
    log_x = _is_positive_numeric(values)
    xs = {level_label(v): (float(v) if numeric_values(values) else i) for i, v in enumerate(values)}
    panels = list(dict.fromkeys((c["optim"], c["stratum"]) for c in tuning["choices"]))
    fig = figure(figsize=(4.8 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (optim, stratum) in zip(axes, panels):
        for c in (c for c in tuning["choices"] if (c["optim"], c["stratum"]) == (optim, stratum)):
            color, marker = styles.get(c["variant"], ("C0", "o"))
            line = [
                (xs[level_label(b["value"])], b["mean"])
                for b in c["by_value"]
                if b["mean"] is not None and level_label(b["value"]) not in c["excluded"] and b.get("complete", True)
            ]
            ax.plot([x for x, _ in line], [y for _, y in line], marker=marker, color=color, label=c["variant"])
            for b in c["by_value"]:
                for loss in b["losses"]:
                    ax.plot(xs[level_label(b["value"])], loss, ".", color=color, alpha=0.35)
                if level_label(b["value"]) in c["excluded"]:
                    ax.plot(
                        xs[level_label(b["value"])],
                        1.0,
                        "x",
                        color=color,
                        ms=9,
                        mew=2,
                        transform=ax.get_xaxis_transform(),
                        clip_on=False,
                    )
            if c["chosen"] is not None and c["metric"] is not None:
                ax.plot(xs[level_label(c["chosen"])], c["metric"], "o", ms=14, mfc="none", mec=color, mew=2)
        if log_x:
            ax.set_xscale("log")
        else:
            ax.set_xticks(list(xs.values()), list(xs))
        ax.set_xlabel(tuning["key"])
        ax.set_title(optim + (f" | {stratum}" if stratum else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("final tuning eval loss (nats)")
    horizon = f"{tuning['tuning_steps']} steps" if tuning.get("tuning_steps") else "the grid's steps"
    fig.suptitle(
        f"tuning: final eval loss vs {tuning['key']} ({horizon}, seeds "
        f"{', '.join(map(str, tuning['tuning_seeds']))}); open circle = chosen, x = diverged (excluded); "
        "the line joins complete means only",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return True
