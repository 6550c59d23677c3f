"""What a run's step costs: the per-window Newton-Schulz fields of metrics.jsonl and the
run's cost summary (end-of-run log, ``summary["cost"]``, the factorial report's cost table).

Per logging window (metrics.jsonl), besides ``tokens_per_s``, ``mfu`` (the model's forward
and backward FLOPs only), ``mfu_with_ns`` (model + Newton-Schulz FLOPs, "model + Muon") and
``optimizer_share`` (optimizer step time / wall time):

    ns_tflop_per_step = NS FLOPs of one step over every matrix / 1e12 (exact per matrix, step
                count, coefficients and algorithm: ``ns_flops``), whichever rank runs them
    ns_s      = NS seconds per step on this rank (rank 0 logs): device time on CUDA
    ns_share  = NS seconds / wall seconds of the window
    ns_tflops = NS FLOPs this rank computed / its NS seconds / 1e12 (the achieved NS rate;
                FLOPs exact per matrix, step count, coefficients and algorithm: ``ns_flops``)
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

COST_KEYS: tuple[str, ...] = (
    "tokens_per_s",
    "mfu",
    "mfu_with_ns",
    "optimizer_share",
    "ns_tflop_per_step",
    "ns_s",
    "ns_share",
    "ns_tflops",
)


def ns_window_fields(
    ns_flops_per_step: float, ns_seconds: float, ns_flops: float, steps: int, elapsed: float
) -> dict[str, float | None]:
    """The NS fields of one logging window (module docstring) from the step's NS FLOPs, and
    the NS seconds and FLOPs this rank spent in the window's ``steps`` steps; ``ns_tflops``
    is None when no NS time was measured (a rank that owned no matrix)."""
    return {
        "ns_tflop_per_step": ns_flops_per_step / 1e12,
        "ns_s": ns_seconds / steps if steps else None,
        "ns_share": ns_seconds / elapsed if elapsed > 0 else None,
        "ns_tflops": ns_flops / ns_seconds / 1e12 if ns_seconds > 0 else None,
    }


def summarize_cost(windows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Median of each of COST_KEYS over the logging windows, leaving out the first when there
    are several (it holds the warm-up: allocation, compilation, autotuning); keys no window
    logged are None. ``windows`` in the result: how many windows the medians are over.
    None for no window."""
    if not windows:
        return None
    used = list(windows[1:]) if len(windows) > 1 else list(windows)
    out: dict[str, Any] = {"windows": len(used)}
    for key in COST_KEYS:
        values = [float(w[key]) for w in used if w.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def describe_cost(cost: Mapping[str, Any] | None, ns_flops_per_step: float) -> str | None:
    """The end-of-run cost line, or None without a window."""
    if cost is None:
        return None

    def pct(key: str) -> str:
        return "—" if cost.get(key) is None else f"{100 * cost[key]:.1f}%"

    text = (
        f"cost (median of {cost['windows']} logging window(s), the first left out when there are more): "
        f"{cost['tokens_per_s']:,.0f} tokens/s, model MFU {pct('mfu')}, optimizer {pct('optimizer_share')} "
        f"of step time"
    )
    if ns_flops_per_step:
        rate = "—" if cost.get("ns_tflops") is None else f"{cost['ns_tflops']:.3g} TFLOP/s"
        ns_s = "—" if cost.get("ns_s") is None else f"{1e3 * cost['ns_s']:.3g} ms"
        text += (
            f"; Newton-Schulz {ns_flops_per_step / 1e12:.4g} TFLOP per step, {ns_s} per step on rank 0 "
            f"({pct('ns_share')} of step time) at {rate}; model + NS MFU {pct('mfu_with_ns')}"
        )
    return text
