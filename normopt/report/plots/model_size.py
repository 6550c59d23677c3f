"""interaction_vs_size.png: each interaction against model size with its fitted line
(:mod:`normopt.report.stats.model_size`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.stats.model_size import interval_text, levels_label


def plot_model_size(summary: Mapping[str, Any], path) -> bool:
    """One panel per context: each interaction against N (log axis) with its 95% Welch t
    interval per size (none with 1 seed) and the fitted line a + b ln N, its slope and interval
    in the legend. False (nothing drawn) without fits."""
    section = summary.get("model_size")
    if not section or not any(f["slope"] is not None for f in section["fits"]):
        return False
    from normopt.report.plots.losses import figure, variant_styles

    styles = variant_styles(summary)
    contexts = [t["context"] for t in section["tokens_per_param"]]
    fig = figure(figsize=(max(6.4, 5.2 * len(contexts)), 4.2))
    axes = fig.subplots(1, len(contexts), squeeze=False)[0]
    optims = list(dict.fromkeys(f["optim"] for f in section["fits"]))
    for ax, context in zip(axes, contexts):
        for fit in (f for f in section["fits"] if f["context"] == context):
            color, marker = styles.get(fit["variant"], ("C0", "o"))
            linestyle = ("-", "--", ":", "-.")[optims.index(fit["optim"]) % 4]
            n = [math.exp(x) for x in fit["ln_parameters"]]
            low = [v - (c[0] if c else v) for v, c in zip(fit["values"], _cis(summary, fit))]
            high = [(c[1] if c else v) - v for v, c in zip(fit["values"], _cis(summary, fit))]
            ax.errorbar(n, fit["values"], yerr=[low, high], fmt=marker, color=color, capsize=3, ms=5)
            if fit["slope"] is not None:
                grid = [min(n) * (max(n) / min(n)) ** (i / 40) for i in range(41)]
                label = f"{fit['variant']} × {fit['optim']}: b = {fit['slope']:+.3f}" + (
                    f" {interval_text(fit['ci95'])} (t, {fit['df']} df)" if fit["ci95"] else " (not tested)"
                )
                ax.plot(
                    grid,
                    [fit["intercept"] + fit["slope"] * math.log(g) for g in grid],
                    color=color,
                    linestyle=linestyle,
                    lw=1.2,
                    label=label,
                )
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N (norm weights left out; log axis)")
        ax.set_ylabel("interaction (nats)")
        ax.set_title(levels_label(context) or "interaction against model size", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "interaction at each size, 95% Welch t interval (none with 1 seed)\nline: the weighted fit I = a + b ln N",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return True


def _cis(summary: Mapping[str, Any], fit: Mapping[str, Any]) -> list[Sequence[float] | None]:
    """The 95% interval of ``fit``'s interaction at each of its sizes."""
    out = []
    for label in fit["sizes"]:
        size = next(s for s in summary["model_size"]["sizes"] if s["label"] == label and s["context"] == fit["context"])
        found = next(i for i in size["interactions"] if (i["variant"], i["optim"]) == (fit["variant"], fit["optim"]))
        out.append(found["ci95"])
    return out
