"""The factorial report's cost table: per cell, what a training step cost (tokens/s, model
MFU, the optimizer's and Newton-Schulz's share of step time, the achieved NS rate), read from
the cell's metrics.jsonl windows and summarised like the run's own end-of-run line
(:func:`normopt.metrics.cost_summary.summarize_cost`: medians over the logging windows, the
first left out when there are more). Descriptive: one number per cell, no statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normopt.report.render.tables import markdown_table


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def cost_section(summary: Mapping[str, Any]) -> list[str]:
    """The '## Cost' section's lines (none when no cell logged a training window)."""
    cells = [c for c in summary["cells"] if c.get("cost")]
    if not cells:
        return []
    rows = []
    for c in cells:
        cost = c["cost"]
        rows.append(
            [
                c["name"],
                f"{cost['tokens_per_s']:,.0f}" if cost.get("tokens_per_s") is not None else "—",
                _pct(cost.get("mfu")),
                _pct(cost.get("mfu_with_ns")),
                _pct(cost.get("optimizer_share")),
                "—" if cost.get("ns_tflop_per_step") is None else f"{cost['ns_tflop_per_step']:.4g}",
                _pct(cost.get("ns_share")),
                "—" if cost.get("ns_tflops") is None else f"{cost['ns_tflops']:.3g}",
                str(cost["windows"]),
            ]
        )
    return [
        "## Cost",
        "",
        (
            "Per cell, from its metrics.jsonl: medians over the logging windows (the first, which holds the "
            "warm-up, left out when there are more). Model MFU counts the model's forward and backward FLOPs; "
            "model + NS adds the optimizer's Newton-Schulz FLOPs; the shares are of wall time per step; the NS "
            "rate is rank 0's NS FLOPs over its NS time. Timings depend on the machine and its load: compare "
            "cells run on the same hardware."
        ),
        "",
        markdown_table(
            [
                "cell",
                "tokens/s",
                "model MFU",
                "model + NS MFU",
                "optimizer share",
                "NS TFLOP/step",
                "NS share",
                "NS TFLOP/s",
                "windows",
            ],
            rows,
        ),
        "",
    ]
