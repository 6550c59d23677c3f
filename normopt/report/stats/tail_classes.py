"""Head versus tail: how a difference between two groups of cells splits over token frequency.

Each cell's last ``tail_tokens`` record gives its validation loss per token-frequency bucket
(bucket 0 = the most frequent tokens, the last = the rarest; equal shares of the training
tokens each, :mod:`normopt.diagnostics.tail_tokens`). For two groups A and B of included cells
that differ in one axis, per bucket b:

    d_b = mean_A(L_b) - mean_B(L_b)        (B's gain over A in bucket b, nats)

with a 95% Welch t interval over the two groups' seeds (as every independent-means contrast
in :mod:`normopt.report.stats.summary`). Whether the tail gains more than the head is the
contrast of the per-cell quantity x = L_tail - L_head between the groups,

    d_tail - d_head = mean_A(x) - mean_B(x),

again with a Welch t interval; pairing the two buckets within each cell removes what a cell
shares across its buckets (its overall loss level). The head bucket is the first and the tail
bucket the last that every cell of both groups measured.

Pairs compared: along the across axis, each level O against the reference R within a level v
of the compared axis (A = (v, R), B = (v, O): what O gains over R, e.g. AdamW minus Muon);
along the compared axis, each level v against the baseline within a level O (A = (v, O),
B = (baseline, O): the gap of v, split by frequency).

A pair whose bucket rows cannot be compared (a cell without a tail_tokens record, bucket
counts that differ, fewer than two buckets every cell measured) is dropped, and a note says
which and why (``bucket_rows_problem``); pairs in which no cell logged buckets at all
(diagnostics off) are left out without a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from normopt.report.cells.cell_assessment import Assessment
from normopt.report.cells.cell_reading import Cell
from normopt.report.stats.contrasts import contrast, describe


def _bucket_losses(cell: Cell) -> tuple[float | None, ...] | None:
    tail = cell.diagnostics.tail_tokens if cell.diagnostics is not None else None
    return None if tail is None else tail.bucket_loss


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def shared_head_tail(rows: Sequence[Sequence[float | None]]) -> tuple[int, int] | None:
    """(head, tail): the first and the last bucket with a finite loss in every row; None when
    the rows differ in length or fewer than two buckets are shared."""
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    shared = [b for b in range(len(rows[0])) if all(_finite(r[b]) for r in rows)]
    return (shared[0], shared[-1]) if len(shared) >= 2 else None


def _difference(
    first: Sequence[float],
    second: Sequence[float],
    seeds_first: Sequence[int | None],
    seeds_second: Sequence[int | None],
) -> dict[str, Any]:
    c = contrast([(1.0, describe(first, seeds_first)), (-1.0, describe(second, seeds_second))])
    return {"value": c.value, "se": c.se, "df": c.df, "ci95": c.ci95, "n": [len(first), len(second)]}


def bucket_rows_problem(first: Sequence[Cell], second: Sequence[Cell]) -> str | None:
    """Why the two groups' bucket rows cannot be compared, or None when they can (or when
    neither group has cells, or no cell logged buckets: nothing to say)."""
    cells = [*first, *second]
    rows = {c.name: _bucket_losses(c) for c in cells}
    if not first or not second or all(r is None for r in rows.values()):
        return None
    missing = [name for name, r in rows.items() if r is None]
    if missing:
        return f"no tail_tokens record in {', '.join(missing)}"
    lengths = sorted({len(r) for r in rows.values()})
    if len(lengths) > 1:
        return f"the cells logged different bucket counts ({', '.join(map(str, lengths))})"
    if shared_head_tail(list(rows.values())) is None:
        return "fewer than two buckets have a finite loss in every cell"
    return None


def compare_buckets(first: Sequence[Cell], second: Sequence[Cell]) -> dict[str, Any] | None:
    """Per-bucket differences first - second and the tail-minus-head contrast (module doc), or
    None when the cells' buckets do not line up (different bucket counts, fewer than two
    buckets measured by all)."""
    rows_first = [_bucket_losses(c) for c in first]
    rows_second = [_bucket_losses(c) for c in second]
    if not rows_first or not rows_second or any(r is None for r in rows_first + rows_second):
        return None
    ends = shared_head_tail(rows_first + rows_second)
    if ends is None:
        return None
    head, tail = ends
    seeds_first, seeds_second = [c.seed for c in first], [c.seed for c in second]
    buckets = []
    for b in range(len(rows_first[0])):
        if all(_finite(r[b]) for r in rows_first + rows_second):
            buckets.append(
                {
                    "bucket": b,
                    **_difference([r[b] for r in rows_first], [r[b] for r in rows_second], seeds_first, seeds_second),
                }
            )
        else:
            buckets.append({"bucket": b, "value": None, "se": None, "df": None, "ci95": None, "n": None})
    spread = _difference(
        [r[tail] - r[head] for r in rows_first], [r[tail] - r[head] for r in rows_second], seeds_first, seeds_second
    )
    return {"buckets": buckets, "head_bucket": head, "tail_bucket": tail, "tail_minus_head": spread}


def tail_sentence(item: dict[str, Any]) -> str:
    """One sentence: does B gain more over A in the tail bucket than in the head bucket?"""
    by_bucket = {b["bucket"]: b for b in item["buckets"]}
    head, tail = by_bucket[item["head_bucket"]]["value"], by_bucket[item["tail_bucket"]]["value"]
    spread = item["tail_minus_head"]
    ci = spread["ci95"]
    more = "more" if spread["value"] > 0 else "less"
    if ci is None:
        verdict = "one seed per group, so no interval: an estimate only"
    elif ci[0] > 0 or ci[1] < 0:
        verdict = f"95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}] excludes 0"
    else:
        verdict = f"95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}] includes 0: not distinguishable from an even gain"
    return (
        f"{item['second_label']} vs {item['first_label']}: the tail bucket gains {more} than the head bucket "
        f"({tail:+.3f} vs {head:+.3f} nats; tail − head {spread['value']:+.3f}, {verdict})."
    )


def tail_comparisons(
    members: Sequence[tuple[Cell, Assessment]],
    variants: Sequence[str],
    optims: Sequence[str],
    baseline: str,
    reference: str | None,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The bucket comparisons of one stratum's cells (module doc): first the across-axis pairs,
    then the compared-axis pairs (no across pairs without a ``reference``); each with labels,
    per-bucket differences, the head/tail contrast and its sentence. A pair dropped for its
    bucket rows gets a line in ``notes``."""

    def group(variant: str, optim: str) -> list[Cell]:
        return [c for c, a in members if c.variant == variant and c.optim == optim and not a.flags]

    pairs = [
        ("across", (v, reference), (v, o)) for v in variants for o in optims if reference is not None and o != reference
    ]
    pairs += [("compare", (v, o), (baseline, o)) for o in optims for v in variants if v != baseline]
    items = []
    for kind, first, second in pairs:
        result = compare_buckets(group(*first), group(*second))
        if result is None:
            problem = bucket_rows_problem(group(*first), group(*second))
            if problem is not None and notes is not None:
                notes.append(f"head/tail comparison {'/'.join(second)} vs {'/'.join(first)} left out: {problem}")
            continue
        label = (
            (lambda g: f"{g[1]} ({g[0]})")
            if kind == "across"
            else (lambda g: f"{g[0]} ({g[1]})")
            if reference is not None
            else (lambda g: g[0])
        )
        item = {
            "kind": kind,
            "first": {"variant": first[0], "optim": first[1]},
            "second": {"variant": second[0], "optim": second[1]},
            "first_label": label(first),
            "second_label": label(second),
            **result,
        }
        item["sentence"] = tail_sentence(item)
        items.append(item)
    return items
