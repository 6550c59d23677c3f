"""The power of the report's test of one contrast, by simulating the report's own estimators.

One simulated grid at n seeds per cell (sigma = 1: every estimator of the report is
scale-equivariant, so power depends on delta / sigma only, and a minimum detectable effect
scales with sigma exactly):

1. every group gets n final losses drawn independently from N(0, 1) (normal seed noise, the
   same spread in every cell), summarised by the report's :func:`normopt.report.stats.contrasts.describe`;
2. every member of the report's family (:mod:`normopt.planner.family`) is estimated by the
   report's :func:`normopt.report.stats.contrasts.contrast` (Welch standard error and
   Welch-Satterthwaite degrees of freedom) and tested by its
   :func:`normopt.report.stats.multiplicity.t_p_value`; a share is in the family only where its
   condition holds, as in the report;
3. under the alternative delta, each member's estimate moves by its slope x delta (the group
   means move; the standard errors and degrees of freedom, which depend on the spreads only, do
   not), and the family's p-values get the report's Holm adjustment
   (:func:`normopt.report.stats.multiplicity.holm`);
4. the grid **detects** delta when the target's Holm-adjusted p-value is below the report's
   alpha (5%) and its estimate has delta's sign.

Power = the share of ``simulations`` grids that detect delta, with its Monte Carlo standard
error sqrt(p (1 - p) / simulations). Every delta is evaluated on the same simulated grids
(common random numbers, ``random.Random((seed, n))`` for the grids at n seeds), so the power
curve is smooth in delta and the results are reproducible. The minimum detectable effect (MDE)
is found by bisection on delta for the requested power; the seeds needed for an effect are the
smallest n (2 to ``max_seeds``) whose power reaches it, found by doubling n and then bisection
(power taken as increasing in n).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from normopt.planner.family import FamilyPlan
from normopt.report.stats.contrasts import contrast, describe
from normopt.report.stats.multiplicity import ALPHA, holm, t_p_value

DEFAULT_SIMULATIONS = 2000
DEFAULT_POWER = 0.8
DEFAULT_MAX_SEEDS = 64
MAX_EFFECT_SIGMAS = 1e4  # beyond this many sigmas the bisection gives up: no test exists


@dataclass
class Batch:
    """``simulations`` simulated grids at ``n`` seeds per cell: each member's estimate at
    delta = 0, its standard error and degrees of freedom, and each share's condition."""

    n: int
    seed: int
    values: list[list[float]] = field(default_factory=list)  # [grid][member]
    ses: list[list[float | None]] = field(default_factory=list)
    dfs: list[list[float | None]] = field(default_factory=list)
    conditions: list[list[float | None]] = field(default_factory=list)  # a share's denominator estimate
    fixed_p: list[list[float | None]] | None = None  # p-values that do not move with delta (power_at)

    @property
    def simulations(self) -> int:
        return len(self.values)


def simulate(plan: FamilyPlan, n: int, simulations: int, seed: int) -> Batch:
    """Step 1 and 2 of the module docstring for ``simulations`` grids at ``n`` seeds."""
    rng = random.Random(f"{seed}/{n}")
    seeds = list(range(n))
    batch = Batch(n, seed)
    for _ in range(simulations):
        stats = {g: describe([rng.gauss(0.0, 1.0) for _ in seeds], seeds) for g in plan.groups}
        values, ses, dfs, conditions = [], [], [], []
        for member in plan.members:
            c = contrast([(coefficient, stats[g]) for g, coefficient in member.terms])
            values.append(c.value)
            ses.append(c.se)
            dfs.append(c.df)
            conditions.append(
                sum(coefficient * stats[g].mean for g, coefficient in member.condition) if member.condition else None
            )
        batch.values.append(values)
        batch.ses.append(ses)
        batch.dfs.append(dfs)
        batch.conditions.append(conditions)
    return batch


@dataclass(frozen=True)
class Power:
    power: float
    mcse: float  # Monte Carlo standard error
    simulations: int
    mean_family_size: float

    def to_json(self) -> dict[str, float | int]:
        return {
            "power": self.power,
            "mcse": self.mcse,
            "simulations": self.simulations,
            "mean_family_size": self.mean_family_size,
        }


def _fixed_p(plan: FamilyPlan, batch: Batch) -> list[list[float | None]]:
    """The p-values that do not move with delta (slope 0), computed once per batch."""
    if batch.fixed_p is None:
        slopes = plan.slopes
        batch.fixed_p = [
            [t_p_value(v, s, d) if slopes[k] == 0 else None for k, (v, s, d) in enumerate(zip(vs, ss, ds))]
            for vs, ss, ds in zip(batch.values, batch.ses, batch.dfs)
        ]
    return batch.fixed_p


def target_test(plan: FamilyPlan, batch: Batch, grid: int, delta: float) -> tuple[float | None, float, int]:
    """Step 3 of the module docstring for one simulated grid: the target's Holm-adjusted p-value
    (None: not tested), its estimate and the number of tests in the family, at ``delta``."""
    values, ses, dfs, conditions = batch.values[grid], batch.ses[grid], batch.dfs[grid], batch.conditions[grid]
    fixed = _fixed_p(plan, batch)[grid]
    slopes, condition_slopes = plan.slopes, plan.condition_slopes
    p_values: list[float | None] = []
    where = None
    for k in range(len(slopes)):
        if conditions[k] is not None and conditions[k] + condition_slopes[k] * delta <= 0:
            continue  # a share of nothing to recover is not reported, so not tested
        if k == plan.target:
            where = len(p_values)
        p_values.append(fixed[k] if slopes[k] == 0 else t_p_value(values[k] + slopes[k] * delta, ses[k], dfs[k]))
    adjusted = holm(p_values)
    estimate = values[plan.target] + slopes[plan.target] * delta
    return (None if where is None else adjusted[where]), estimate, sum(1 for p in p_values if p is not None)


def power_at(plan: FamilyPlan, batch: Batch, delta: float) -> Power:
    """Step 4 of the module docstring: the power to detect ``delta`` (in sigmas)."""
    detected = sizes = 0
    for grid in range(batch.simulations):
        p_holm, estimate, size = target_test(plan, batch, grid, delta)
        sizes += size
        detected += p_holm is not None and p_holm < ALPHA and estimate * delta > 0
    p = detected / batch.simulations
    return Power(p, math.sqrt(p * (1 - p) / batch.simulations), batch.simulations, sizes / batch.simulations)


@dataclass(frozen=True)
class Detectable:
    """The minimum detectable effect at one seed count, in sigmas: None when no effect up to
    :data:`MAX_EFFECT_SIGMAS` reaches the power (1 seed: the report tests nothing)."""

    n: int
    effect: float | None
    power: Power | None  # the power at ``effect``
    # the effects whose power is the target power -/+ 2 Monte Carlo standard errors
    mc_range: tuple[float, float] | None = None


def _bisect(f: Callable[[float], float], goal: float, hi: float = 1.0, rel_tol: float = 1e-3) -> float | None:
    """The smallest x with f(x) >= goal, for f increasing, by doubling then bisection; None
    when even MAX_EFFECT_SIGMAS does not reach it."""
    lo = 0.0
    while f(hi) < goal:
        lo, hi = hi, hi * 2.0
        if hi > MAX_EFFECT_SIGMAS:
            return None
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if f(mid) >= goal:
            hi = mid
        else:
            lo = mid
    return hi


def minimum_detectable(plan: FamilyPlan, batch: Batch, power: float = DEFAULT_POWER) -> Detectable:
    """The smallest delta (sigmas) that ``batch``'s grids detect with ``power``."""
    effect = _bisect(lambda d: power_at(plan, batch, d).power, power)
    if effect is None:
        return Detectable(batch.n, None, None)
    at = power_at(plan, batch, effect)
    margin = 2 * math.sqrt(power * (1 - power) / batch.simulations)
    low = _bisect(lambda d: power_at(plan, batch, d).power, max(power - margin, 1e-9))
    high = _bisect(lambda d: power_at(plan, batch, d).power, min(power + margin, 1.0))
    return Detectable(batch.n, effect, at, None if low is None or high is None else (low, high))


class Batches:
    """Simulated grids per seed count, made once each (``progress`` is told of each new one)."""

    def __init__(self, plan: FamilyPlan, simulations: int, seed: int, progress: Callable[[str], None] | None = None):
        self.plan, self.simulations, self.seed, self.progress = plan, simulations, seed, progress
        self.made: dict[int, Batch] = {}

    def at(self, n: int) -> Batch:
        if n not in self.made:
            if self.progress:
                self.progress(f"simulating {self.simulations} grids at {n} seed{'s' if n != 1 else ''} per cell")
            self.made[n] = simulate(self.plan, n, self.simulations, self.seed)
        return self.made[n]


@dataclass(frozen=True)
class SeedsNeeded:
    effect: float  # in sigmas
    n: int | None  # None = more than max_seeds
    power: Power | None  # at n (at max_seeds when n is None)
    max_seeds: int


def seeds_needed(
    batches: Batches, effect: float, power: float = DEFAULT_POWER, max_seeds: int = DEFAULT_MAX_SEEDS
) -> SeedsNeeded:
    """The smallest n in [2, max_seeds] whose grids detect ``effect`` (sigmas) with ``power``."""
    plan = batches.plan

    def reaches(n: int) -> Power | None:
        at = power_at(plan, batches.at(n), effect)
        return at if at.power >= power else None

    lo, hi = 1, 2
    while True:
        if reaches(hi) is not None:
            break
        if hi >= max_seeds:
            return SeedsNeeded(effect, None, power_at(plan, batches.at(max_seeds), effect), max_seeds)
        lo, hi = hi, min(2 * hi, max_seeds)
    while hi - lo > 1:  # lo fails (or is 1), hi reaches
        mid = (lo + hi) // 2
        if reaches(mid) is not None:
            hi = mid
        else:
            lo = mid
    return SeedsNeeded(effect, hi, power_at(plan, batches.at(hi), effect), max_seeds)


class Progress:
    """Progress lines (``[plan] 12.3s simulating ...``) on ``write``, once the work has taken
    more than ``after`` seconds: a quick plan prints none."""

    def __init__(self, write: Callable[[str], None], after: float = 2.0):
        self.write, self.after, self.start = write, after, time.perf_counter()

    def __call__(self, line: str) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed >= self.after:
            self.write(f"[plan] {elapsed:5.1f}s {line}")
