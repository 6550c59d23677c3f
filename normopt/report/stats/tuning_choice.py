"""The choice of one cell's tuned value and how reliable it is (the rule and the bootstrap:
:mod:`normopt.report.stats.tuning`)."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from normopt.report.cells.axes import level_label
from normopt.report.stats.contrasts import contrast, describe
from normopt.report.stats.student_t import t_interval

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


def numeric_values(values: Sequence[Any]) -> list[float] | None:
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
    numbers = numeric_values([o.value for o in outcomes])
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
