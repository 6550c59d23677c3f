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
report's own statistics (:func:`normopt.report.statistics.build_summary`), so each carries the
``left_out`` and ``left_out_bias`` of its groups (:mod:`normopt.report.left_out`): a value
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
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.report.axes import ReportAxes, level_label, read_grid_record
from normopt.report.cell_reading import Cell, discover_cells
from normopt.report.contrasts import contrast, describe
from normopt.report.family_markdown import flag_text
from normopt.report.plots import figure, variant_styles
from normopt.report.statistics import build_summary
from normopt.report.student_t import t_interval
from normopt.report.tables import markdown_table

TUNING_DIR = "tuning"  # ROOT/tuning/: one run directory per (cell, value, tuning seed)
TUNING_FILE = "tuning.json"  # ROOT/tuning/tuning.json: the spec's tune block, as run
METRICS = {"final_eval_loss": "the last evaluation's loss after step 0, mean over the tuning seeds"}


@dataclass(frozen=True)
class ValueOutcome:
    """One value's tuning runs in one cell: the metric of each run that counts (and its seed),
    and one reason per run that does not (``diverged: ...``, ``incomplete: ...``)."""

    value: Any
    losses: tuple[float, ...]
    failures: tuple[str, ...] = ()
    seeds: tuple[int | None, ...] = ()  # the seed of each loss, where known (pairs values by seed)

    @property
    def mean(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None


@dataclass(frozen=True)
class Choice:
    chosen: Any | None  # None = no value could be chosen (``reason``)
    metric: float | None  # the chosen value's mean
    runner_up: Any | None = None
    margin: float | None = None  # runner-up's mean − the chosen mean (>= 0)
    tied: tuple[Any, ...] = ()  # values whose mean equals the chosen one's
    at_edge: bool = False
    excluded: Mapping[str, str] = field(default_factory=dict)  # value label -> why it does not count
    reason: str | None = None


def _numeric(values: Sequence[Any]) -> list[float] | None:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    return None


def choose_value(outcomes: Sequence[ValueOutcome], n_seeds: int) -> Choice:
    """The choice of one cell's value from its outcomes in spec order (module docstring):
    lowest mean over ``n_seeds`` tuning runs; ties to the earlier value; diverged values
    excluded; a value with fewer than ``n_seeds`` runs finished (not run yet, or stopped early)
    makes the choice wait."""
    excluded: dict[str, str] = {}
    waiting = []
    for o in outcomes:
        failed = [f for f in o.failures if not f.startswith("incomplete")]
        if failed:
            excluded[level_label(o.value)] = "; ".join(failed)
        elif len(o.losses) < n_seeds or any(not math.isfinite(x) for x in o.losses):
            waiting.append(level_label(o.value))
    if waiting:
        return Choice(None, None, excluded=excluded, reason=f"tuning runs not finished for {', '.join(waiting)}")
    usable = [o for o in outcomes if level_label(o.value) not in excluded]
    if not usable:
        return Choice(None, None, excluded=excluded, reason="every value has a diverged tuning run")
    ranked = sorted(range(len(usable)), key=lambda i: (usable[i].mean, i))  # stable: ties to the earlier
    best = usable[ranked[0]]
    runner = usable[ranked[1]] if len(ranked) > 1 else None
    numbers = _numeric([o.value for o in outcomes])
    edge = numbers is not None and len(numbers) > 1 and float(best.value) in (min(numbers), max(numbers))
    return Choice(
        best.value,
        best.mean,
        runner.value if runner else None,
        None if runner is None else runner.mean - best.mean,
        tuple(o.value for o in usable if o is not best and o.mean == best.mean),
        edge,
        excluded,
    )


BOOTSTRAP_RESAMPLES = 2000  # B: resamples of the tuning seeds per cell
BOOTSTRAP_SEED = 0  # random.Random(BOOTSTRAP_SEED), afresh for every cell


def _winner(means: Sequence[float]) -> int:
    """The index of the lowest mean, ties to the earlier (the rule of ``choose_value``)."""
    return min(range(len(means)), key=lambda i: (means[i], i))


def choice_reliability(
    outcomes: Sequence[ValueOutcome], choice: Choice, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, Any] | None:
    """How reliable a made choice is (module docstring): the share of ``resamples`` bootstrap
    resamples of the tuning seeds in which the chosen value still wins, and the runner-up's
    difference with its 95% t interval. None when no value was chosen."""
    if choice.chosen is None:
        return None
    usable = [o for o in outcomes if level_label(o.value) not in choice.excluded]
    chosen = next(i for i, o in enumerate(usable) if level_label(o.value) == level_label(choice.chosen))
    k = min(len(o.losses) for o in usable)
    seed_sets = {
        tuple(sorted(o.seeds))
        if len(o.seeds) == len(o.losses) and None not in o.seeds and len(set(o.seeds)) == len(o.seeds)
        else None
        for o in usable
    }
    paired = len(seed_sets) == 1 and None not in seed_sets
    out: dict[str, Any] = {
        "share_chosen_wins": None,
        "resamples": resamples,
        "resample_seed": seed,
        "n_seeds": k,
        "paired": paired,
        "reason": None,
        "runner_up_difference": None,
    }
    if len(usable) < 2:
        out["reason"] = "no other value to compare with"
        return out
    if k < 2:
        out["reason"] = "1 tuning seed: nothing to resample, no interval"
        return out
    rng = random.Random(seed)
    if paired:
        seeds = sorted(usable[0].seeds)
        table = [[dict(zip(o.seeds, o.losses))[s] for s in seeds] for o in usable]  # value x seed
        wins = 0
        for _ in range(resamples):
            picks = [rng.randrange(k) for _ in range(k)]
            wins += _winner([sum(row[i] for i in picks) / k for row in table]) == chosen
    else:
        wins = 0
        for _ in range(resamples):
            means = []
            for o in usable:
                n = len(o.losses)
                means.append(sum(o.losses[rng.randrange(n)] for _ in range(n)) / n)
            wins += _winner(means) == chosen
    out["share_chosen_wins"] = wins / resamples
    runner = next(o for o in usable if level_label(o.value) == level_label(choice.runner_up))
    best = usable[chosen]
    if paired:
        by_seed = dict(zip(best.seeds, best.losses))
        d = [loss - by_seed[s] for s, loss in zip(runner.seeds, runner.losses)]
        value = statistics.fmean(d)
        se = statistics.stdev(d) / math.sqrt(len(d))
        df: float | None = len(d) - 1
        ci = t_interval(value, se, df)
    else:
        c = contrast([(1.0, describe(runner.losses)), (-1.0, describe(best.losses))])
        value, se, df, ci = c.value, c.se, c.df, c.ci95
    out["runner_up_difference"] = {
        "value": value,
        "se": se,
        "df": df,
        "ci95": ci,
        "paired": paired,
        "within_noise": None if ci is None else ci[0] <= 0.0 <= ci[1],
    }
    return out


# --------------------------------------------------------------------------- the report's analysis


def read_tuning_file(root: Path) -> dict[str, Any] | None:
    path = root / TUNING_DIR / TUNING_FILE
    record = read_grid_record(path)
    if record is None:
        return None
    if not isinstance(record, dict) or not {"key", "values", "by", "seeds"} <= set(record):
        raise UserError(f"{path}: expected an object with key, values, by, seeds")
    return record


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


def _interaction_key(item: Mapping[str, Any]) -> tuple[str, str, str]:
    return item["variant"], item["optim"], _stratum_text(item.get("stratum"))


def survival(summary: Mapping[str, Any], per_value: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per interaction: the interaction at the tuned values (evaluation seeds) and at the common
    values (module docstring): its range over the values none of whose tuning runs was left
    out, each value whose groups lost a tuning run (flagged, with its bias), and the values
    where it is not computable."""
    tuned = {_interaction_key(i): i for i in summary["interactions"]}
    keys = list(dict.fromkeys(_interaction_key(i) for v in per_value for i in v["interactions"]))
    keys += [k for k in tuned if k not in keys]
    out = []
    for key in keys:
        at = [(v["value"], next((i for i in v["interactions"] if _interaction_key(i) == key), None)) for v in per_value]
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


# --------------------------------------------------------------------------- plot and markdown


def _is_positive_numeric(values: Sequence[Any]) -> bool:
    numbers = _numeric(values)
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
    xs = {level_label(v): (float(v) if _numeric(values) else i) for i, v in enumerate(values)}
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


def _num(x: float | None, sign: bool = False) -> str:
    return "—" if x is None or not math.isfinite(x) else (f"{x:+.4f}" if sign else f"{x:.4f}")


def _estimate(item: Mapping[str, Any] | None, mark: bool = True) -> str:
    """An estimate with its 95% interval, and ⚠ where a cell of its groups was left out."""
    if item is None:
        return "—"
    ci = item.get("ci95")
    interval = " (no interval)" if ci is None else f" [{_num(ci[0], True)}, {_num(ci[1], True)}]"
    return _num(item["value"], True) + interval + (" ⚠" if mark and item.get("left_out") else "")


def _value_cell(c: Mapping[str, Any], b: Mapping[str, Any], n_seeds: int) -> str:
    """One value's entry of the choice table: the mean over the tuning seeds; a value excluded
    for a diverged run says so; a value whose runs have not all finished shows the finished
    runs' mean marked † with how many it holds (not the mean the column names)."""
    label = level_label(b["value"])
    if label in c["excluded"]:
        return "diverged (excluded)" if "diverged" in c["excluded"][label] else "excluded"
    if b.get("n", len(b["losses"])) < n_seeds:
        return f"{_num(b['mean'])}† ({b.get('n', len(b['losses']))} of {n_seeds} seeds)"
    return _num(b["mean"])


def _share(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "—"
    if r["share_chosen_wins"] is None:
        return f"— ({r['reason']})"
    return f"{100 * r['share_chosen_wins']:.1f}%"


def _runner_up_text(c: Mapping[str, Any]) -> str:
    """runner-up − chosen with its 95% t interval and whether it is within the noise."""
    if c["margin"] is None:
        return "—"
    r = (c.get("reliability") or {}).get("runner_up_difference")
    if r is None or r["ci95"] is None:
        return f"{_num(c['margin'], True)} (no interval)"
    kind = "paired t" if r["paired"] else "Welch t"
    verdict = "within the noise" if r["within_noise"] else "outside the noise"
    return f"{_num(r['value'], True)} [{_num(r['ci95'][0], True)}, {_num(r['ci95'][1], True)}] ({kind}; {verdict})"


def _stratum_text(stratum: Any) -> str:
    if isinstance(stratum, Mapping):
        return ", ".join(f"{k}={v}" for k, v in stratum.items())
    return stratum or ""


def tuning_lines(summary: Mapping[str, Any]) -> list[str]:
    """The terminal's lines of a tuned grid: each cell's choice."""
    t = summary.get("tuning")
    if not t:
        return []
    lines = []
    for c in t["choices"]:
        where = c["optim"] + (f" | {c['stratum']}" if c["stratum"] else "")
        if c["chosen"] is None:
            lines.append(f"tuned {t['key']} {c['variant']} ({where}): none ({c['reason']})")
            continue
        flags = (["at the edge of the range"] if c["at_edge"] else []) + (
            [f"excluded {', '.join(c['excluded'])}"] if c["excluded"] else []
        )
        r = c.get("reliability") or {}
        if r.get("share_chosen_wins") is not None:
            flags.append(f"wins {_share(r)} of {r['resamples']} seed resamples")
        diff = r.get("runner_up_difference")
        if diff is not None and diff["within_noise"]:
            flags.append(f"runner-up {level_label(c['runner_up'])} within the noise")
        lines.append(
            f"tuned {t['key']} {c['variant']} ({where}): {level_label(c['chosen'])}, {t['by']} "
            f"{_num(c['metric'])}" + (f" ({'; '.join(flags)})" if flags else "")
        )
    return lines


def tuning_lead(summary: Mapping[str, Any]) -> list[str]:
    """The line under the answer of a tuned grid: at which values its tables are."""
    t = summary.get("tuning")
    if not t:
        return []
    return [
        (
            f"Every table below is at each cell's tuned `{t['key']}`, chosen on the tuning seeds "
            f"{', '.join(map(str, t['tuning_seeds'])) or '—'} and measured on the evaluation seeds "
            f"{', '.join(map(str, t['evaluation_seeds'])) or '—'}; the section Tuning gives each choice and "
            "the interaction at every common value."
        ),
        "",
    ]


def _survival_line(k: Mapping[str, Any], key: str, reference: str) -> str:
    """One interaction's reading across the values: at the tuned values, the range at the common
    values none of whose tuning runs was left out, each flagged value, the values where it is not
    computable."""
    label = f"{k['optim']} − {reference}" + (f" | {k['stratum']}" if k["stratum"] else "")
    tuned = k["tuned"]
    text = f"- {k['variant']} × {label}: at the tuned values {_estimate(tuned, mark=False)}"
    text += flag_text(tuned) if tuned else ""
    at = ", ".join(level_label(v) for v in k["common_range_values"])
    if k["common_range"] is not None:
        where = "at the common values" if not k["flagged"] else "at the common values whose tuning runs all counted"
        text += (
            f"; {where} from {_num(k['common_range'][0], True)} to {_num(k['common_range'][1], True)} "
            f"(point estimates at {key}={at}; their intervals in the table below)"
        )
    else:
        text += "; at no common value without a left-out tuning run"
    for f in k["flagged"]:
        estimate = _estimate({**f, "value": f["estimate"]}, mark=False)
        text += f"; at {key}={level_label(f['value'])} {estimate}{flag_text(f)}"
    if k["not_computable"]:
        text += f"; not computable at {key}={', '.join(level_label(v) for v in k['not_computable'])}"
    return text


def tuning_section(summary: Mapping[str, Any], plot: str | None) -> list[str]:
    """report.md's tuning section: how the values were chosen, the choice table with each
    choice's reliability, the interaction at each common value beside the tuned one (with the
    left-out flags of each), the selection-bias statement."""
    t = summary.get("tuning")
    if not t:
        return []
    key = t["key"]
    n_seeds = len(t["tuning_seeds"])
    resamples = t.get("resamples", BOOTSTRAP_RESAMPLES)
    horizon = (
        f"{t['tuning_steps']} steps each (their own horizon)"
        if t.get("tuning_steps")
        else "as many steps as the evaluation runs"
    )
    parts = [
        "## Tuning",
        "",
        (
            f"Each cell (its axes and arm, without the seed) ran every value of `{key}` "
            f"({', '.join(level_label(v) for v in t['values'])}) on the tuning seeds "
            f"{', '.join(map(str, t['tuning_seeds'])) or '—'}, {horizon}. Chosen: the lowest {t['by']} "
            f"({t['metric']}); a value with a diverged tuning run is excluded; a value with a tuning run not "
            "finished (not run yet, or stopped before its last step without diverging; rerunning the grid "
            "resumes it) makes the choice wait; a tie (equal means) goes to the value listed first; a choice at "
            "the smallest or largest value tried is flagged (the best value may lie outside the range). Every "
            "table above this section is at the chosen values, on the evaluation seeds "
            f"{', '.join(map(str, t['evaluation_seeds'])) or '—'}."
        ),
        "",
        t["selection_bias"],
        "",
    ]
    header = [
        "variant",
        "optimizer",
        *[f"{key}={level_label(v)}" for v in t["values"]],
        "chosen",
        "runner-up − chosen, 95% t CI",
        f"chosen still wins (share of {resamples} seed resamples)",
        "note",
        "evaluation mean at chosen (n)",
        "tuning − evaluation",
    ]
    rows = []
    partial = False
    for c in t["choices"]:
        cells = [_value_cell(c, b, n_seeds) for b in c["by_value"]]
        partial = partial or any("†" in x for x in cells)
        note = []
        if c["at_edge"]:
            note.append("at the edge of the range")
        if c["tied"]:
            note.append(f"tied with {', '.join(level_label(v) for v in c['tied'])}")
        if c["excluded"]:
            note.append(f"excluded {', '.join(c['excluded'])}")
        diff = (c.get("reliability") or {}).get("runner_up_difference")
        if diff is not None and diff["within_noise"]:
            note.append(f"runner-up {level_label(c['runner_up'])} within the noise")
        if c["reason"]:
            note.append(c["reason"])
        rows.append(
            [
                c["variant"],
                c["optim"] + (f" | {c['stratum']}" if c["stratum"] else ""),
                *cells,
                "none" if c["chosen"] is None else level_label(c["chosen"]),
                _runner_up_text(c),
                _share(c.get("reliability")),
                "; ".join(note) or "—",
                f"{_num(c['evaluation_mean'])} ({c['evaluation_n']})",
                _num(c["tuning_minus_evaluation"], True),
            ]
        )
    parts += [
        f"{t['by']} per value (mean over the tuning seeds), the choice, how reliable it is, and the "
        "evaluation seeds' mean at the chosen value. Runner-up − chosen: the difference of their means over "
        "the tuning seeds with its 95% t interval (paired per seed, k−1 degrees of freedom); the runner-up is "
        "within the noise when the interval includes 0 (measured on the seeds that chose, so it favours the "
        f"chosen value). Chosen still wins: the share of {resamples} bootstrap resamples of the tuning seeds "
        f"(with replacement, each seed with all its values' runs; random.Random({t.get('resample_seed', 0)})"
        ") in which the chosen value still has the lowest mean; with k seeds there are few distinct "
        "resamples (3 at k = 2), so the share is coarse. Tuning − evaluation: the tuning runs' mean at the "
        "chosen value minus the evaluation mean, shown only when both ran the same number of steps; negative "
        "= the tuning estimate looked better than held-out seeds confirm.",
        "",
        markdown_table(header, rows),
        "",
    ]
    if partial:
        parts += [
            f"† not the mean over the {n_seeds} tuning seeds: the mean of the runs that finished so far "
            "(how many in brackets); the choice waits for the others.",
            "",
        ]
    records = t.get("survival") or []
    if records:
        reference = summary["settings"]["reference_optim"]
        parts += [_survival_line(k, key, reference) for k in records] + [""]
        rows = []
        for k in records:
            label = f"{k['optim']} − {reference}" + (f" | {k['stratum']}" if k["stratum"] else "")
            at = {
                level_label(v["value"]): next(
                    (i for i in v["interactions"] if _interaction_key(i) == (k["variant"], k["optim"], k["stratum"])),
                    None,
                )
                for v in t["per_value"]
            }
            rows.append(
                [k["variant"], label, *[_estimate(at.get(level_label(v))) for v in t["values"]], _estimate(k["tuned"])]
            )
        parts += [
            (
                f"The interaction at each common `{key}` (every cell at that value: the tuning runs, "
                f"{horizon}; 95% Welch t interval where the tuning seeds allow) beside the interaction at the "
                "tuned values (evaluation seeds). ⚠ = a cell of its groups was left out (which, and the "
                "direction of the bias, in the list above). Whether the interaction survives tuning is the last "
                "column against the others."
            ),
            "",
            markdown_table(
                [
                    "variant",
                    "optimizer",
                    *[f"at {key}={level_label(v)}" for v in t["values"]],
                    "at the tuned values (evaluation seeds)",
                ],
                rows,
            ),
            "",
        ]
    parts += [f"- {note}" for note in t["notes"]]
    if plot:
        parts += ["", f"![tuning]({plot})", ""]
    return parts
