"""A tuned grid: how each cell's value of the tuned key (``optim.lr``) was chosen, how reliable
the choice is, and the interaction at every common value beside the interaction at the tuned
values.

A spec's ``tune`` block (:mod:`normopt.factorial.tuning`) runs every cell of the grid (each
combination of the axes and arms, without its seed) at every value of the tuned key on the
tuning seeds, in ``ROOT/tuning/`` (:data:`TUNING_DIR`, with :data:`TUNING_FILE` recording the
block). ``choose_value`` picks each cell's value:

* the metric (``by``) is ``final_eval_loss``: the last evaluation after step 0, averaged over
  the tuning seeds;
* a value counts only when all its tuning runs finished; a value with a diverged tuning run is
  excluded and named; a value with a tuning run that has not finished (not run yet, or stopped
  before its last step without diverging: rerunning the grid resumes it) makes the choice wait,
  since a choice among a subset of the values would depend on the order of runs. Until then
  the report shows that value's finished runs' mean marked "†" with how many of the tuning
  seeds it holds: it is not the mean over the tuning seeds;
* the lowest mean wins; a tie (equal means) goes to the value listed first in the spec;
* a choice at the smallest or largest numeric value tried is flagged: the best value may lie
  outside the range.

Reliability of a choice (``choice_reliability``), with several tuning seeds:

* the share of B = :data:`BOOTSTRAP_RESAMPLES` bootstrap resamples of the tuning seeds (drawn
  with replacement, k of k, by ``random.Random(BOOTSTRAP_SEED)`` afresh for every cell, so the
  report is deterministic) in which the chosen value still wins by the rule above. A seed is
  resampled with all its values' runs at once (paired: a seed fixes the data order and the
  initialisation for every value), unless the values' runs do not share their seeds, in which
  case each value's runs are resampled on their own. With k seeds there are at most
  C(2k - 1, k) distinct resamples (3 at k = 2), so the share is coarse at few seeds;
* the runner-up's difference, mean(runner-up) − mean(chosen) over the tuning seeds, with its 95%
  t interval (paired per seed, k − 1 degrees of freedom; Welch for unpaired runs). The runner-up
  is **within the noise** when that interval includes 0. The difference is measured on the
  seeds that made the choice, which inflates it in the chosen value's favour: "within the noise"
  is the firmer finding, and a runner-up outside the noise may still be close. With one tuning
  seed neither is computable, and the report says so.

Selection bias. The grid's evaluation cells (ROOT/CELL, the spec's ``seeds``) run at the chosen
value on seeds disjoint from the tuning seeds, so the choice depends on data those losses do
not: the tuned losses and the interaction at the tuned values carry no selection bias. Noise
in the choice can only pick a value other than the true best, which makes a tuned loss
pessimistic, never optimistic. Where tuning and evaluation seeds overlap (a hand-assembled
folder) the report says the tuned loss is optimistic and bounds the expected optimism of a
minimum over k noisy means by sigma * sqrt(2 ln k) (sigma = the largest standard error of the
tuning means; the expected maximum of k centred normals with standard deviation at most sigma
is at most that, whatever their correlation).

The interaction at each common value comes from the tuning runs at that value, through the
report's own statistics (:func:`normopt.report.stats.summary.build_summary`), so each carries the
``left_out`` and ``left_out_bias`` of its groups (:mod:`normopt.report.stats.left_out`): a value
where a tuning run of one of the four groups was left out (diverged, or not finished) is marked
⚠, kept out of the range "at the common values", and named beside it with its flags and, for a
diverged run, the direction of its bias.

summary.json ``tuning``: ``key``, ``values``, ``by``, ``metric``, ``tuning_seeds``,
``evaluation_seeds``, ``tuning_steps``, ``selection_bias``, ``notes``, ``resamples`` (B) and
``resample_seed``; ``per_value`` (per value:
``value``, ``interactions``, ``groups``: the tuning runs' statistics at that value);
``choices`` (per cell: ``stratum``, ``variant``, ``optim``, ``by_value`` [{``value``, ``mean``
(of the finished runs), ``n`` (finished runs), ``complete`` (n = the number of tuning seeds),
``losses``, ``seeds``, ``failures``}], ``chosen``, ``metric``, ``runner_up``, ``margin``,
``tied``, ``at_edge``, ``excluded``, ``reason``, ``reliability`` {``share_chosen_wins``,
``resamples``, ``resample_seed``, ``n_seeds``, ``paired``, ``reason``, ``runner_up_difference``
{``value``, ``se``, ``df``, ``ci95``, ``within_noise``, ``paired``} or None} or None,
``evaluation_ran_at``, ``evaluation_mean``, ``evaluation_n``, ``tuning_minus_evaluation``);
``survival`` (per interaction: ``variant``, ``optim``, ``stratum``, ``tuned`` (the interaction
at the tuned values: ``value``, ``ci95``, ``left_out``, ``left_out_bias``), ``common_range``
[min, max] over the values none of whose tuning runs was left out and ``common_range_values``
those values, ``flagged`` [{``value``, ``estimate``, ``ci95``, ``left_out``, ``left_out_bias``}],
``not_computable`` [values]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.report.cells.axes import ReportAxes, level_label
from normopt.report.cells.cell_reading import Cell, discover_cells
from normopt.report.cells.tuning_runs import TUNING_DIR, read_tuning_file
from normopt.report.stats.summary import build_summary
from normopt.report.stats.tuning_choice import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    METRICS,
    ValueOutcome,
    choice_reliability,
    choose_value,
)


def _unit(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return (record.get("stratum") or "", record["variant"] or "", record["optim"] or "")


def tuning_analysis(
    root: Path, cells: Sequence[Cell], summary: Mapping[str, Any], axes: ReportAxes, fixes: Mapping[str, str] | None
) -> dict[str, Any] | None:
    """For a root with a tuning folder: per cell (variant, optimizer, stratum) the metric at
    every value and the choice; per value the interactions at that common value (the tuning
    runs' report statistics); the value each evaluation cell ran at; the selection-bias
    statement. None without a tuning folder."""
    tune = read_tuning_file(root)
    if tune is None:
        return None
    key, values, seeds = tune["key"], list(tune["values"]), list(tune["seeds"])
    tuning_cells = discover_cells(root / TUNING_DIR)
    fixes = summary["settings"]["fixes"] if fixes is None else fixes
    per_value: list[dict[str, Any]] = []
    runs: dict[tuple, dict[str, list[Mapping[str, Any]]]] = {}  # cell -> value label -> its run records
    for value in values:
        members = [c for c in tuning_cells if key in c.config and level_label(c.config[key]) == level_label(value)]
        s_v = (
            build_summary(members, axes=axes, fixes=fixes)
            if members
            else {"interactions": [], "groups": [], "cells": []}
        )
        per_value.append({"value": value, "interactions": s_v["interactions"], "groups": s_v["groups"]})
        for record in s_v["cells"]:
            runs.setdefault(_unit(record), {}).setdefault(level_label(value), []).append(record)
    outcomes: dict[tuple, list[ValueOutcome]] = {}
    for unit, by_value in runs.items():
        outcomes[unit] = []
        for value in values:
            records = by_value.get(level_label(value), [])
            losses = tuple(r["final_eval_loss"] for r in records if r["included"])
            run_seeds = tuple(r["seed"] for r in records if r["included"])
            failures = tuple(
                ("incomplete: " if set(r["flags"]) <= {"missing", "stopped_early"} else "") + "; ".join(r["reasons"])
                for r in records
                if not r["included"]
            )
            failures += ("incomplete: no tuning run",) * max(0, len(seeds) - len(records))
            outcomes[unit].append(ValueOutcome(value, losses, failures, run_seeds))
    eval_values: dict[tuple, list[str]] = {}
    by_name = {c.name: c for c in cells}
    for group in summary["groups"]:
        ran = {level_label(by_name[n].config[key]) for n in group["cells"] if key in by_name[n].config}
        stratum = ", ".join(f"{k}={v}" for k, v in (group.get("stratum") or {}).items())
        eval_values[(stratum, group["variant"], group["optim"])] = sorted(ran)
    eval_groups = {
        _unit({**g, "stratum": ", ".join(f"{k}={v}" for k, v in (g.get("stratum") or {}).items())}): g
        for g in summary["groups"]
    }
    choices = []
    notes = []
    for unit, unit_outcomes in outcomes.items():
        choice = choose_value(unit_outcomes, len(seeds))
        ran = eval_values.get(unit, [])
        group = eval_groups.get(unit)
        chosen_label = None if choice.chosen is None else level_label(choice.chosen)
        if ran and chosen_label is not None and ran != [chosen_label]:
            notes.append(
                f"{'/'.join(p for p in unit if p)}: evaluation cells ran at {key}={', '.join(ran)}, "
                f"but the tuning runs now choose {chosen_label}"
            )
        same_horizon = tune.get("steps") in (None, summary_steps(summary, unit))
        chosen_outcome = next((o for o in unit_outcomes if o.value == choice.chosen), None)
        optimism = (
            chosen_outcome.mean - group["mean"]
            if same_horizon and chosen_outcome is not None and chosen_outcome.mean is not None and group and group["n"]
            else None
        )
        choices.append(
            {
                "stratum": unit[0],
                "variant": unit[1],
                "optim": unit[2],
                "by_value": [
                    {
                        "value": o.value,
                        "mean": o.mean,
                        "n": len(o.losses),
                        "complete": len(o.losses) == len(seeds),
                        "losses": list(o.losses),
                        "seeds": list(o.seeds),
                        "failures": list(o.failures),
                    }
                    for o in unit_outcomes
                ],
                "chosen": choice.chosen,
                "metric": choice.metric,
                "runner_up": choice.runner_up,
                "margin": choice.margin,
                "tied": list(choice.tied),
                "at_edge": choice.at_edge,
                "excluded": dict(choice.excluded),
                "reason": choice.reason,
                "reliability": choice_reliability(unit_outcomes, choice),
                "evaluation_ran_at": ran,
                "evaluation_mean": group["mean"] if group else None,
                "evaluation_n": group["n"] if group else 0,
                "tuning_minus_evaluation": optimism,
            }
        )
    rank = {name: i for i, name in enumerate([*summary["variants"], *summary["optims"]])}
    choices.sort(key=lambda c: (c["stratum"], rank.get(c["variant"], len(rank)), rank.get(c["optim"], len(rank))))
    eval_seeds = sorted({c.seed for c in cells if c.seed is not None})
    tuning_seeds = sorted({c.seed for c in tuning_cells if c.seed is not None})
    return {
        "key": key,
        "values": values,
        "by": tune["by"],
        "metric": METRICS.get(tune["by"], tune["by"]),
        "tuning_seeds": tuning_seeds,
        "evaluation_seeds": eval_seeds,
        "tuning_steps": tune.get("steps"),
        "choices": choices,
        "per_value": per_value,
        "notes": notes,
        "survival": survival(summary, per_value),
        "resamples": BOOTSTRAP_RESAMPLES,
        "resample_seed": BOOTSTRAP_SEED,
        "selection_bias": selection_bias_statement(tuning_seeds, eval_seeds, choices, per_value, len(values)),
    }


def interaction_key(item: Mapping[str, Any]) -> tuple[str, str, str]:
    return item["variant"], item["optim"], _stratum_text(item.get("stratum"))


def survival(summary: Mapping[str, Any], per_value: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per interaction: the interaction at the tuned values (evaluation seeds) and at the common
    values (module docstring): its range over the values none of whose tuning runs was left
    out, each value whose groups lost a tuning run (flagged, with its bias), and the values
    where it is not computable."""
    tuned = {interaction_key(i): i for i in summary["interactions"]}
    keys = list(dict.fromkeys(interaction_key(i) for v in per_value for i in v["interactions"]))
    keys += [k for k in tuned if k not in keys]
    out = []
    for key in keys:
        at = [(v["value"], next((i for i in v["interactions"] if interaction_key(i) == key), None)) for v in per_value]
        clean = [(value, i) for value, i in at if i is not None and not i.get("left_out")]
        t = tuned.get(key)
        out.append(
            {
                "variant": key[0],
                "optim": key[1],
                "stratum": key[2],
                "tuned": None
                if t is None
                else {
                    "value": t["value"],
                    "ci95": t["ci95"],
                    "left_out": t.get("left_out", []),
                    "left_out_bias": t.get("left_out_bias", []),
                },
                "common_range": [min(i["value"] for _, i in clean), max(i["value"] for _, i in clean)]
                if clean
                else None,
                "common_range_values": [value for value, _ in clean],
                "flagged": [
                    {
                        "value": value,
                        "estimate": i["value"],
                        "ci95": i["ci95"],
                        "left_out": i["left_out"],
                        "left_out_bias": i.get("left_out_bias", []),
                    }
                    for value, i in at
                    if i is not None and i.get("left_out")
                ],
                "not_computable": [value for value, i in at if i is None],
            }
        )
    return out


def summary_steps(summary: Mapping[str, Any], unit: tuple[str, str, str]) -> int | None:
    """train.steps of a cell's evaluation runs (None when they disagree or are unknown)."""
    steps = {c["steps"] for c in summary["cells"] if _unit(c) == unit}
    return steps.pop() if len(steps) == 1 else None


def selection_bias_statement(
    tuning_seeds: Sequence[int],
    eval_seeds: Sequence[int],
    choices: Sequence[Mapping[str, Any]],
    per_value: Sequence[Mapping[str, Any]],
    k: int,
) -> str:
    """What the tuned losses' selection does to them (module docstring), as one paragraph."""
    shared = sorted(set(tuning_seeds) & set(eval_seeds))
    if not shared:
        return (
            f"The tuned cells' losses and interactions come from the evaluation seeds "
            f"{', '.join(map(str, eval_seeds)) or '—'}, none of which chose the value (tuning seeds "
            f"{', '.join(map(str, tuning_seeds)) or '—'}): the choice is independent of them, so they carry "
            "no selection bias. Noise in the choice can only pick a value other than the true best, which "
            "makes a tuned loss pessimistic, not optimistic; the runner-up − chosen column shows how close each "
            "choice was."
        )
    sems = [g["sem"] for v in per_value for g in v["groups"] if g.get("sem") is not None]
    bound = max(sems) * math.sqrt(2 * math.log(k)) if sems and k > 1 else None
    return (
        f"Seeds {', '.join(map(str, shared))} both chose the value and are evaluated: the tuned losses are "
        "optimistic (a minimum over noisy means is biased low). "
        + (
            f"Expected optimism at most sigma·sqrt(2 ln k) = {bound:.4f} nats (sigma = {max(sems):.4f}, the "
            f"largest standard error of a tuning mean; k = {k} values)."
            if bound is not None
            else "With one tuning seed per value the noise of a mean is unknown, so the optimism cannot be bounded "
            "from these runs."
        )
    )


def _stratum_text(stratum: Any) -> str:
    if isinstance(stratum, Mapping):
        return ", ".join(f"{k}={v}" for k, v in stratum.items())
    return stratum or ""
