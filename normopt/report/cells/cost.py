"""A cell's cost (tokens/s, MFU, Newton-Schulz share) read from its metrics.jsonl windows
(the table: :mod:`normopt.report.render.cost`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normopt.metrics.cost_summary import COST_KEYS, summarize_cost
from normopt.metrics.jsonl import read_step_records


def read_cost(metrics_path: Path) -> dict[str, Any] | None:
    """``summarize_cost`` of a metrics.jsonl's training windows (the lines with
    ``tokens_per_s``; a later line for a step replaces an earlier one); None without a file
    or a window."""
    if not metrics_path.is_file():
        return None
    records, _ = read_step_records(metrics_path, "metrics", lambda r: r)
    by_step = {r["step"]: r for r in records if r.get("tokens_per_s") is not None}
    windows = [{k: by_step[s].get(k) for k in COST_KEYS} for s in sorted(by_step)]
    return summarize_cost(windows)
