"""The gaps and the interaction over training: the final-step statistics repeated at every
evaluation step, and whether the interaction was stable over the last part of training.

Bounded norms start slowly, so a gap measured at one step may be transient. At each eval step
t > 0 the included cells of each group (the same cells the final-step statistics use) give
their eval loss at t, and the estimators of :mod:`normopt.report.statistics` run on those
losses unchanged:

* gap(v, O, t) = mean_t(v, O) − mean_t(base, O), Welch t interval;
* interaction(v, O, t) = gap(v, O, t) − gap(v, ref, t), Welch t interval over the four
  independent means, and the paired per-seed estimate (t, k − 1 df).

A group at step t holds the cells that logged an eval at t (cells with different eval
intervals share only some steps). The intervals at different steps come from the same seeds,
so they are strongly correlated: a curve of intervals is not a family of independent tests.

**Stability** (:func:`interaction_stability`). The window is the last quarter of training:
the eval steps t with t >= 0.75 x t_final (t_final = the interaction's last eval step). The
interaction is

* ``stable`` when every estimate in the window has the sign of the final estimate and, where
  intervals exist, every window interval overlaps the final interval;
* ``drifts`` when the signs agree but some window interval does not overlap the final one
  (the estimate moved by more than its own uncertainty within the last quarter);
* ``sign changes`` when some estimate in the window has the other sign;
* ``too few evals`` with fewer than 3 evals in the window (an eval interval of at most
  train.steps / 8 gives 3).

With one seed per group there are no intervals and only the sign is checked (said in the
verdict). ``sign_settled_at`` is the first eval step from which every later estimate has the
final sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.report.cell_reading import Cell
from normopt.report.contrasts import describe
from normopt.report.plots import figure, variant_styles
from normopt.report.statistics import compute_gaps, compute_interactions
from normopt.report.tables import markdown_table

WINDOW_FRACTION = 0.25  # the last quarter of training
MIN_WINDOW_EVALS = 3
STABILITY_RULE = (f"stable = over the last {WINDOW_FRACTION:.0%} of training (eval steps >= "
                  f"{1 - WINDOW_FRACTION:.2f} x the last eval step, at least {MIN_WINDOW_EVALS} evals) every "
                  "estimate has the final estimate's sign and every 95% interval overlaps the final interval; "
                  "drifts = same sign but some interval does not overlap the final one; sign changes = some "
                  "estimate has the other sign; with 1 seed only the sign is checked")


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def interaction_stability(points: Sequence[Mapping[str, Any]], fraction: float = WINDOW_FRACTION,
                          min_evals: int = MIN_WINDOW_EVALS) -> dict[str, Any]:
    """The stability verdict of one curve (module docstring) from its points
    ``{"step", "value", "ci95"}`` in step order."""
    points = [p for p in points if p["value"] is not None and math.isfinite(p["value"])]
    if not points:
        return {"verdict": "no estimate", "window_steps": [], "sign_settled_at": None, "intervals": False}
    final = points[-1]
    window = [p for p in points if p["step"] >= (1 - fraction) * final["step"]]
    sign = _sign(final["value"])
    settled = final["step"]
    for p in reversed(points):
        if _sign(p["value"]) != sign:
            break
        settled = p["step"]
    values = [p["value"] for p in window]
    intervals = all(p["ci95"] is not None for p in window)
    record = {"window_steps": [p["step"] for p in window], "window_range": [min(values), max(values)],
              "final": final["value"], "sign_settled_at": settled, "intervals": intervals}
    if len(window) < min_evals:
        return {**record, "verdict": f"too few evals ({len(window)} in the window, needs {min_evals})"}
    if any(_sign(v) != sign for v in values):
        return {**record, "verdict": "sign changes"}
    if intervals and not all(_overlaps(p["ci95"], final["ci95"]) for p in window):
        return {**record, "verdict": "drifts"}
    return {**record, "verdict": "stable" if intervals else "stable (sign only, no intervals)"}


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
    gaps: dict[tuple, dict[str, Any]] = {}
    interactions: dict[tuple, dict[str, Any]] = {}
    for stratum, groups in strata.values():
        evals = {(g["variant"], g["optim"]): [(by_name[n].seed, _eval_at(by_name[n])) for n in g["cells"]]
                 for g in groups}
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
                gaps.setdefault(key, {"variant": gap["variant"], "optim": gap["optim"], "baseline": base,
                                      **tag, "points": []})["points"].append(
                    {"step": step, "value": gap["value"], "ci95": gap["ci95"], "df": gap["df"], "n": gap["n"]})
            if reference is None:
                continue
            for item in compute_interactions(at_step, summary["variants"], summary["optims"], base, reference,
                                             ignored):
                key = (repr(tag), item["variant"], item["optim"])
                paired = item["paired"]
                interactions.setdefault(key, {"variant": item["variant"], "optim": item["optim"],
                                              "reference_optim": reference, **tag, "points": []})["points"].append(
                    {"step": step, "value": item["value"], "ci95": item["ci95"], "df": item["df"], "n": item["n"],
                     "paired_ci95": None if paired is None else paired["ci95"]})
    for record in interactions.values():
        record["stability"] = interaction_stability(record["points"])
    return {"rule": STABILITY_RULE, "window_fraction": WINDOW_FRACTION, "min_window_evals": MIN_WINDOW_EVALS,
            "gaps": list(gaps.values()), "interactions": list(interactions.values())}


def stability_of(summary: Mapping[str, Any], item: Mapping[str, Any]) -> str | None:
    """The stability verdict of a final-step interaction record (matched by variant, optimizer
    and stratum), for the final-step table; None without over-training curves."""
    for record in (summary.get("over_training") or {}).get("interactions", ()):
        if (record["variant"], record["optim"], record.get("stratum")) == \
                (item["variant"], item["optim"], item.get("stratum")):
            st = record["stability"]
            settled = (f", sign since step {st['sign_settled_at']}"
                       if st.get("sign_settled_at") is not None and not st["verdict"].startswith("too few") else "")
            return f"{st['verdict']}{settled}"
    return None


# --------------------------------------------------------------------------- plot and markdown


def _label(record: Mapping[str, Any]) -> str:
    stratum = record.get("stratum")
    return record["optim"] + (f" | {', '.join(f'{k}={v}' for k, v in stratum.items())}" if stratum else "")


def plot_over_training(summary: Mapping[str, Any], path: Path) -> bool:
    """Top row: each variant's gap to the baseline over steps, one panel per across level (and
    stratum); bottom row: the interaction over steps per non-reference level. Shaded band =
    the 95% Welch t interval where seeds allow; the last quarter of training (the stability
    window) is shaded grey. False (nothing drawn) without curves."""
    curves = summary.get("over_training") or {}
    if not curves.get("gaps"):
        return False
    styles = variant_styles(summary)
    gap_panels = list(dict.fromkeys(_label(r) for r in curves["gaps"]))
    inter_panels = list(dict.fromkeys(_label(r) for r in curves["interactions"]))
    rows = 2 if inter_panels else 1
    cols = max(len(gap_panels), len(inter_panels))
    fig = figure(figsize=(4.6 * cols, 3.6 * rows))
    grid = fig.subplots(rows, cols, squeeze=False)
    s = summary["settings"]
    for row, (records, panels, what) in enumerate(
            [(curves["gaps"], gap_panels, f"gap to {s['baseline_norm']}"),
             (curves["interactions"], inter_panels, f"interaction (gap − gap under {s['reference_optim']})")][:rows]):
        for col in range(cols):
            ax = grid[row][col]
            if col >= len(panels):
                ax.set_visible(False)
                continue
            last = 0
            for record in (r for r in records if _label(r) == panels[col]):
                color, marker = styles.get(record["variant"], ("C0", "o"))
                steps = [p["step"] for p in record["points"]]
                last = max(last, *steps)
                ax.plot(steps, [p["value"] for p in record["points"]], marker=marker, color=color, ms=4,
                        label=record["variant"])
                band = [p for p in record["points"] if p["ci95"] is not None]
                if band:
                    ax.fill_between([p["step"] for p in band], [p["ci95"][0] for p in band],
                                    [p["ci95"][1] for p in band], color=color, alpha=0.15, lw=0)
            ax.axvspan((1 - WINDOW_FRACTION) * last, last, color="grey", alpha=0.08)
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_title(f"{what}: {panels[col]}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("nats")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("over training: estimates at every eval step, 95% t interval bands where seeds allow; "
                 "grey = the last quarter (stability window)", fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4f}"


def over_training_section(summary: Mapping[str, Any], plot: str | None) -> list[str]:
    """report.md's section: the rule, one table row per interaction (final, window range,
    verdict) and each interaction's values at every eval step (the gaps' in summary.json)."""
    curves = summary.get("over_training") or {}
    if not curves.get("interactions") and not curves.get("gaps"):
        return []
    parts = ["## Over training", "",
             ("The gaps and interactions at every eval step, from the same included cells as the final-step "
              "tables (Welch t intervals; intervals at different steps share their seeds, so they are not "
              f"independent tests). Stability: {curves['rule']}."), ""]
    rows = []
    for r in curves["interactions"]:
        st = r["stability"]
        lo_hi = st.get("window_range")
        rows.append([r["variant"], _label(r), _num(st.get("final")),
                     "—" if not lo_hi else f"{_num(lo_hi[0])} … {_num(lo_hi[1])}",
                     ", ".join(str(t) for t in st["window_steps"]) or "—", st["verdict"],
                     "—" if st.get("sign_settled_at") is None else str(st["sign_settled_at"])])
    if not rows:
        parts += ["No interaction to follow (the report has no across axis, or no computable interaction): "
                  "the gaps over steps are in the plot and in summary.json.", ""]
    if rows:
        parts += [markdown_table(["variant", "optimizer", "final interaction", "range over the window",
                                  "window eval steps", "verdict", "final sign since step"], rows), ""]
    for r in curves["interactions"]:  # the gaps' curves: the plot and summary.json
        cells = [f"{p['step']}: {_num(p['value'])}" +
                 (f" [{_num(p['ci95'][0])}, {_num(p['ci95'][1])}]" if p["ci95"] is not None else "")
                 for p in r["points"]]
        parts.append(f"- interaction {r['variant']} × {_label(r)} at each eval step: " + "; ".join(cells))
    parts.append("")
    if plot:
        parts += [f"![over_training]({plot})", ""]
    return parts
