"""Which cells count: the per-cell assessment that flags cells which are missing, diverged,
stopped early or cannot be placed (``assess_cell``). A flagged cell is listed in the report
with its reasons and left out of every statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from normopt.errors import DIVERGED_EXIT_CODE
from normopt.report.cells.cell_reading import Cell, Metrics

# A run whose loss ends this far above its own best value has blown up, even without a NaN.
# One nat is far beyond seed noise or a late-training bump (both are hundredths of a nat) and
# far below the rise of a real divergence (the loss returns towards ln(vocab), several nats).
DIVERGENCE_NATS = 1.0
# A cell whose final eval loss is not at least this far below the unigram entropy of its
# training tokens (the loss of the best model that ignores context) learned almost nothing
# beyond token frequencies: it is kept in the statistics, but flagged, since gaps between
# such cells measure noise more than the norm or the optimizer.
CONTEXT_MARGIN_NATS = 0.1
FLAGS = ("missing", "diverged", "stopped_early", "unplaced")


@dataclass(frozen=True)
class Assessment:
    final_eval_loss: float | None
    flags: tuple[str, ...]  # subset of FLAGS; empty = the cell counts
    reasons: tuple[str, ...]  # one human-readable line per flag


def learned_no_context(
    final_loss: float | None, unigram_entropy: float | None, margin: float = CONTEXT_MARGIN_NATS
) -> bool | None:
    """True when final_loss > unigram_entropy - margin; None when either is unknown."""
    if final_loss is None or unigram_entropy is None:
        return None
    return final_loss > unigram_entropy - margin


def final_eval_loss(evals: Sequence[tuple[int, float]]) -> float | None:
    """The eval_loss of the last evaluation after training started (step > 0), else None:
    the step-0 evaluation measures the initialisation, not the run."""
    after_start = [value for step, value in evals if step > 0]
    return after_start[-1] if after_start else None


def divergence_reason(metrics: Metrics, nats: float = DIVERGENCE_NATS) -> str | None:
    """Why a run counts as diverged, or None. Diverged = (a) any logged loss or eval_loss is
    NaN/Inf, or (b) for the train loss or the eval loss series, last - min(series) > ``nats``:
    the run ended more than ``nats`` above the best value it had reached."""
    for name, series in (("loss", metrics.train), ("eval_loss", metrics.evals)):
        for step, value in series:
            if not math.isfinite(value):
                return f"{name} was {value} at step {step}"
    for name, series in (("loss", metrics.train), ("eval_loss", metrics.evals)):
        if len(series) >= 2:
            best_step, best = min(series, key=lambda sv: sv[1])
            last_step, last = series[-1]
            if last - best > nats:
                return (
                    f"{name} ended at {last:.3f} (step {last_step}), {last - best:.2f} nats above "
                    f"its best {best:.3f} (step {best_step})"
                )
    return None


def stopped_early(last_step: int | None, steps: int | None) -> bool | None:
    """last logged step < train.steps; None when either is unknown."""
    if last_step is None or steps is None:
        return None
    return last_step < steps


def assess_cell(cell: Cell, divergence_nats: float = DIVERGENCE_NATS) -> Assessment:
    """Flag a cell: unplaced (no norm or optimizer known), missing (no metrics.jsonl or no
    evaluation after step 0), diverged (``divergence_reason`` or exit status 3 recorded in
    cell.json), stopped_early (``stopped_early``). A flagged cell is left out of every statistic."""
    reasons: dict[str, str] = {}
    if cell.norm is None or cell.optim is None:
        reasons["unplaced"] = "no norm or optimizer in cell.json or config.yaml"
    final = None
    metrics = cell.metrics
    if metrics is None:
        reasons["missing"] = "no metrics.jsonl"
    else:
        final = final_eval_loss(metrics.evals)
        if final is None:
            reasons["missing"] = "no evaluation after step 0 in metrics.jsonl"
        why = divergence_reason(metrics, divergence_nats)
        if why:
            reasons["diverged"] = why
        if stopped_early(metrics.last_step, cell.steps):
            reasons["stopped_early"] = f"last logged step {metrics.last_step} < train.steps {cell.steps}"
    # the trainer stops *before* logging a non-finite loss, so the runner's record of the exit
    # status (cell.json "exit_code") is the only trace such a divergence leaves
    if cell.exit_code == DIVERGED_EXIT_CODE and "diverged" not in reasons:
        reasons["diverged"] = "exit status 3 (the trainer stopped on a non-finite loss)"
    flags = tuple(f for f in FLAGS if f in reasons)
    return Assessment(final, flags, tuple(f"{f}: {reasons[f]}" for f in flags))
