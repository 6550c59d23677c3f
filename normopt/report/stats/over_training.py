"""The gaps and the interaction over training: the final-step statistics repeated at every
evaluation step, and whether the interaction was stable over the last part of training.

Bounded norms start slowly, so a gap measured at one step may be transient. At each eval step
t > 0 the included cells of each group (the same cells the final-step statistics use) give
their eval loss at t, and the estimators of :mod:`normopt.report.stats.estimates` run on those
losses unchanged:

* gap(v, O, t) = mean_t(v, O) − mean_t(base, O), Welch t interval;
* interaction(v, O, t) = gap(v, O, t) − gap(v, ref, t), Welch t interval over the four
  independent means, and the paired per-seed estimate (t, k − 1 df).

A group at step t holds the cells that logged an eval at t (cells with different eval
intervals share only some steps). The intervals at different steps come from the same seeds,
so they are strongly correlated: a curve of intervals is not a family of independent tests.

**Stability** (:func:`interaction_stability`). The window is the last quarter of training:
the eval steps t with t >= 0.75 x t_final (t_final = the interaction's last eval step), from
t_0 (the window's first step) to t_final. The quantity tested is the interaction's change over
the window,

    Delta = I(t_final) - I(t_0) = sum_i c_i mean_i(L_c(t_final) - L_c(t_0)),

itself a linear contrast (the interaction's coefficients c_i) of the groups' mean per-cell
changes, over the cells that logged an eval at both steps. Each cell's change is one number
and the cells are independent, so Delta has its own Welch t interval (Welch-Satterthwaite
degrees of freedom), which the interval of each estimate alone does not give (the two
estimates share their seeds). With M = the report's equivalence margin
(``report.equivalence_margin``), the interaction

* ``sign changes`` when some estimate in the window has the other sign than the final one;
* else is ``stable`` when the 90% t interval of Delta lies inside (-M, M) (two one-sided tests
  at 5%, as for "negligible" elsewhere in the report: the change is shown smaller than M);
* else ``drifts`` when the 95% t interval of Delta excludes 0 (the estimate moved by more than
  its own uncertainty);
* else ``change unresolved``: Delta is neither shown smaller than M nor distinguishable from 0
  (too few seeds, or too noisy, to tell);
* ``too few evals`` with fewer than 3 evals in the window (an eval interval of at most
  train.steps / 8 gives 3).

With one seed per group Delta has no interval: only the sign is checked, and the verdict says
so (``sign kept, change not tested (1 seed)``); where some group has no cell with an eval at
both ends of the window Delta is not computable, and the verdict says that instead.
``sign_settled_at`` is the first eval step from which every later estimate has the final sign.

summary.json ``over_training``: ``rule`` (the rule above, in words, with M), ``margin`` (M),
``window_fraction``, ``min_window_evals``, ``gaps`` and ``interactions`` (per curve: variant,
optim, stratum, ``points`` [{step, value, ci95, df, n}], and for an interaction ``stability``:
``verdict``, ``window_steps``, ``window_range``, ``final``, ``sign_settled_at``, ``intervals``
and ``change`` {``from_step``, ``to_step``, ``value``, ``se``, ``df``, ``ci95``, ``ci90``,
``margin``, ``equivalent``, ``excludes_0``, ``n``} or None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.cells.axes import DEFAULT_EQUIVALENCE_MARGIN
from normopt.report.cells.cell_reading import Cell
from normopt.report.stats.contrasts import contrast, describe
from normopt.report.stats.estimates import compute_gaps, compute_interactions
from normopt.report.stats.multiplicity import tost
from normopt.report.stats.student_t import t_interval

WINDOW_FRACTION = 0.25  # the last quarter of training
MIN_WINDOW_EVALS = 3


def stability_rule(margin: float) -> str:
    """The stability rule in words (module docstring), with the report's margin M."""
    return (
        f"over the last {WINDOW_FRACTION:.0%} of training (eval steps >= {1 - WINDOW_FRACTION:.2f} x the last "
        f"eval step, at least {MIN_WINDOW_EVALS} evals), Δ = the interaction at the last eval step − at the "
        "window's first, a contrast of the cells' own changes with its Welch t interval; sign changes = some "
        f"estimate in the window has the other sign; stable = the 90% interval of Δ lies inside ±{margin:g} "
        f"nats (two one-sided tests at 5%, margin M = {margin:g}); drifts = not stable and the 95% interval "
        "of Δ excludes 0; change unresolved = neither; with 1 seed only the sign is checked"
    )


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def window_of(points: Sequence[Mapping[str, Any]], fraction: float = WINDOW_FRACTION) -> list[Mapping[str, Any]]:
    """The points with a finite estimate at eval steps >= (1 - fraction) x the last one."""
    points = [p for p in points if p["value"] is not None and math.isfinite(p["value"])]
    if not points:
        return []
    return [p for p in points if p["step"] >= (1 - fraction) * points[-1]["step"]]


def change_record(
    value: float, se: float | None, df: float | None, margin: float, from_step: int, to_step: int, n: Sequence[int] = ()
) -> dict[str, Any]:
    """Delta's record (module docstring): its 95% and 90% t intervals, whether the 90% one lies
    inside (-margin, margin) (TOST at 5%) and whether the 95% one excludes 0."""
    ci95 = t_interval(value, se, df)
    equivalence = tost(value, se, df, margin)
    return {
        "from_step": from_step,
        "to_step": to_step,
        "value": value,
        "se": se,
        "df": df,
        "ci95": ci95,
        "ci90": None if equivalence is None else equivalence["ci90"],
        "margin": margin,
        "equivalent": None if equivalence is None else equivalence["equivalent"],
        "excludes_0": None if ci95 is None else (ci95[0] > 0 or ci95[1] < 0),
        "n": list(n),
    }


def interaction_stability(
    points: Sequence[Mapping[str, Any]],
    change: Mapping[str, Any] | None = None,
    fraction: float = WINDOW_FRACTION,
    min_evals: int = MIN_WINDOW_EVALS,
) -> dict[str, Any]:
    """The stability verdict of one curve (module docstring) from its points
    ``{"step", "value", "ci95"}`` in step order and the change over its window (a
    :func:`change_record`; None = not computable, which checks the sign only)."""
    window = window_of(points, fraction)
    if not window:
        return {
            "verdict": "no estimate",
            "window_steps": [],
            "sign_settled_at": None,
            "intervals": False,
            "change": None,
        }
    finite = [p for p in points if p["value"] is not None and math.isfinite(p["value"])]
    final = finite[-1]
    sign = _sign(final["value"])
    settled = final["step"]
    for p in reversed(finite):
        if _sign(p["value"]) != sign:
            break
        settled = p["step"]
    values = [p["value"] for p in window]
    intervals = all(p["ci95"] is not None for p in window)
    record = {
        "window_steps": [p["step"] for p in window],
        "window_range": [min(values), max(values)],
        "final": final["value"],
        "sign_settled_at": settled,
        "intervals": intervals,
        "change": None if change is None else dict(change),
    }
    if len(window) < min_evals:
        return {**record, "verdict": f"too few evals ({len(window)} in the window, needs {min_evals})"}
    if any(_sign(v) != sign for v in values):
        return {**record, "verdict": "sign changes"}
    if change is None:
        return {
            **record,
            "verdict": "sign kept, change not computable (a group has no cell with an eval at both ends of the window)",
        }
    if change["ci95"] is None:
        return {**record, "verdict": "sign kept, change not tested (1 seed)"}
    if change["equivalent"]:
        return {**record, "verdict": "stable"}
    if change["excludes_0"]:
        return {**record, "verdict": "drifts"}
    return {**record, "verdict": "change unresolved"}


def _eval_at(cell: Cell) -> dict[int, float]:
    return {step: value for step, value in (cell.metrics.evals if cell.metrics else ()) if step > 0}


def over_training(cells: Sequence[Cell], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The gap and interaction curves of every stratum (module docstring), from the groups of
    ``summary`` (their included cells) and the cells' eval records."""
    s = summary["settings"]
    base, reference = s["baseline_norm"], s["reference_optim"]
    by_name = {c.name: c for c in cells}
    strata: dict[str, tuple[Any, list[Mapping[str, Any]]]] = {}
    for group in summary["groups"]:
        label = repr(sorted((group.get("stratum") or {}).items()))
        strata.setdefault(label, (group.get("stratum"), []))[1].append(group)
    margin = s.get("equivalence_margin", DEFAULT_EQUIVALENCE_MARGIN)
    gaps: dict[tuple, dict[str, Any]] = {}
    interactions: dict[tuple, dict[str, Any]] = {}
    evals_of: dict[str, Mapping[tuple[str, str], list[tuple[int | None, dict[int, float]]]]] = {}
    for stratum, groups in strata.values():
        evals = {
            (g["variant"], g["optim"]): [(by_name[n].seed, _eval_at(by_name[n])) for n in g["cells"]] for g in groups
        }
        evals_of[repr({} if stratum is None else {"stratum": stratum})] = evals
        steps = sorted({t for members in evals.values() for _, at in members for t in at})
        tag = {} if stratum is None else {"stratum": stratum}
        for step in steps:
            at_step = {}
            for key, members in evals.items():
                kept = [(seed, at[step]) for seed, at in members if step in at]
                if kept:
                    at_step[key] = describe([v for _, v in kept], [seed for seed, _ in kept])
            ignored: list[str] = []
            for gap in compute_gaps(at_step, summary["variants"], summary["optims"], base, ignored):
                key = (repr(tag), gap["variant"], gap["optim"])
                gaps.setdefault(
                    key, {"variant": gap["variant"], "optim": gap["optim"], "baseline": base, **tag, "points": []}
                )["points"].append(
                    {"step": step, "value": gap["value"], "ci95": gap["ci95"], "df": gap["df"], "n": gap["n"]}
                )
            if reference is None:
                continue
            for item in compute_interactions(at_step, summary["variants"], summary["optims"], base, reference, ignored):
                key = (repr(tag), item["variant"], item["optim"])
                paired = item["paired"]
                interactions.setdefault(
                    key,
                    {
                        "variant": item["variant"],
                        "optim": item["optim"],
                        "reference_optim": reference,
                        **tag,
                        "points": [],
                    },
                )["points"].append(
                    {
                        "step": step,
                        "value": item["value"],
                        "ci95": item["ci95"],
                        "df": item["df"],
                        "n": item["n"],
                        "paired_ci95": None if paired is None else paired["ci95"],
                    }
                )
    for (tag, variant, optim), record in interactions.items():
        terms = {(variant, optim): 1.0, (base, optim): -1.0, (variant, reference): -1.0, (base, reference): 1.0}
        record["stability"] = interaction_stability(
            record["points"], window_change(evals_of[tag], terms, window_of(record["points"]), margin)
        )
    return {
        "rule": stability_rule(margin),
        "margin": margin,
        "window_fraction": WINDOW_FRACTION,
        "min_window_evals": MIN_WINDOW_EVALS,
        "gaps": list(gaps.values()),
        "interactions": list(interactions.values()),
    }


def window_change(
    evals: Mapping[tuple[str, str], Sequence[tuple[int | None, Mapping[int, float]]]],
    terms: Mapping[tuple[str, str], float],
    window: Sequence[Mapping[str, Any]],
    margin: float,
) -> dict[str, Any] | None:
    """Delta over the window (module docstring): the contrast ``terms`` of each group's mean
    per-cell change L(t_final) - L(t_0), over the cells with an eval at both steps, with its
    Welch t interval; None without a window of 2 steps or with a group that has no such cell."""
    if len(window) < 2:
        return None
    first, last = window[0]["step"], window[-1]["step"]
    groups = []
    for key, c in terms.items():
        changes = [at[last] - at[first] for _, at in evals.get(key, ()) if first in at and last in at]
        if not changes:
            return None
        groups.append((c, describe(changes)))
    delta = contrast(groups)
    return change_record(delta.value, delta.se, delta.df, margin, first, last, [g.n for _, g in groups])


def stability_record(summary: Mapping[str, Any], item: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``stability`` record of a final-step interaction (matched by variant, optimizer and
    stratum); None without over-training curves."""
    for record in (summary.get("over_training") or {}).get("interactions", ()):
        if (record["variant"], record["optim"], record.get("stratum")) == (
            item["variant"],
            item["optim"],
            item.get("stratum"),
        ):
            return record["stability"]
    return None


def curve_label(record: Mapping[str, Any]) -> str:
    """A curve's across level, with its stratum: the panel it is drawn in and its row's name."""
    stratum = record.get("stratum")
    return record["optim"] + (f" | {', '.join(f'{k}={v}' for k, v in stratum.items())}" if stratum else "")
