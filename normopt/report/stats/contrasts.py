"""Estimators over independent groups of cells (seeds): group statistics, linear contrasts of
group means with Welch t intervals, their paired per-seed versions, and ratios of contrasts
with Fieller's interval. Every interval is a two-sided 95% t interval
(:mod:`normopt.report.stats.student_t`); a group with one cell has no variance, so contrasts
involving it have no interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from normopt.report.stats.student_t import LEVEL, fieller_interval, t_interval, welch_df


@dataclass(frozen=True)
class GroupStats:
    """Final eval losses of one group's included cells."""

    n: int
    mean: float | None  # sum(x) / n
    std: float | None  # sample std, sqrt(sum((x - mean)^2) / (n - 1)); None for n < 2
    by_seed: Mapping[int, float]  # seed -> final loss (mean over cells sharing a seed)

    @property
    def sem(self) -> float | None:
        """Standard error of the mean, std / sqrt(n)."""
        return None if self.std is None else self.std / math.sqrt(self.n)


def describe(values: Sequence[float], seeds: Sequence[int | None] = ()) -> GroupStats:
    """n, mean and sample standard deviation (n - 1 in the denominator) of ``values``."""
    values = list(values)
    by_seed: dict[int, list[float]] = {}
    for seed, value in zip(seeds, values):
        if seed is not None:
            by_seed.setdefault(seed, []).append(value)
    return GroupStats(
        n=len(values),
        mean=statistics.fmean(values) if values else None,
        std=statistics.stdev(values) if len(values) >= 2 else None,
        by_seed={s: statistics.fmean(v) for s, v in sorted(by_seed.items())},
    )


@dataclass(frozen=True)
class Contrast:
    """C = sum_i c_i mean_i over independent groups: its value, standard error
    se = sqrt(sum_i c_i^2 s_i^2 / n_i), Welch-Satterthwaite degrees of freedom and 95% t
    interval (se, df and ci None when a group has n < 2: its variance is unknown)."""

    value: float
    se: float | None
    df: float | None
    ci95: tuple[float, float] | None


def contrast(terms: Sequence[tuple[float, GroupStats]]) -> Contrast:
    """The contrast of ``terms`` = [(c_i, group_i), ...] (see :class:`Contrast`)."""
    value = sum(c * g.mean for c, g in terms)
    if any(g.n < 2 for _, g in terms):
        return Contrast(value, None, None, None)
    weights = [c * c * g.std**2 / g.n for c, g in terms]
    se = math.sqrt(sum(weights))
    df = welch_df(weights, [g.n for _, g in terms])
    return Contrast(value, se, df, t_interval(value, se, df))


def _common_seeds(groups: Sequence[GroupStats]) -> list[int]:
    return sorted(set.intersection(*(set(g.by_seed) for g in groups))) if groups else []


def paired_contrast(terms: Sequence[tuple[float, GroupStats]]) -> dict[str, Any] | None:
    """The same contrast per seed, over the seeds present in every group:
    d_s = sum_i c_i * x_{i,s}; estimate mean(d), se = stdev(d) / sqrt(k), 95% t interval with
    k - 1 degrees of freedom, k = number of seeds. Pairing removes variation that a seed
    shares across cells (data order, init draws). None when no seed is common to all
    groups; se None when k = 1."""
    common = _common_seeds([g for _, g in terms])
    if not common:
        return None
    per_seed = {s: sum(c * g.by_seed[s] for c, g in terms) for s in common}
    d = list(per_seed.values())
    k = len(d)
    se = statistics.stdev(d) / math.sqrt(k) if k >= 2 else None
    value = statistics.fmean(d)
    return {
        "n_seeds": k,
        "value": value,
        "se": se,
        "df": k - 1 if k >= 2 else None,
        "ci95": t_interval(value, se, k - 1 if k >= 2 else None),
        "per_seed": {str(s): v for s, v in per_seed.items()},
    }


def ratio_of_contrasts(
    numerator: Mapping[Any, float],
    denominator: Mapping[Any, float],
    groups: Mapping[Any, GroupStats],
    level: float = LEVEL,
) -> dict[str, Any]:
    """R = N / D for two contrasts of the same independent group means, N = sum_i a_i m_i,
    D = sum_i b_i m_i (coefficients keyed by group), with Fieller's 95% interval:
    var N = sum a_i^2 v_i, var D = sum b_i^2 v_i, cov = sum a_i b_i v_i (v_i = s_i^2 / n_i),
    degrees of freedom Welch-Satterthwaite for N - R D at the estimate (``level``: the
    interval's coverage, 95% unless a family adjustment asks for more). ``ci95`` is None
    with a ``reason`` when a group has n < 2, or when D is not distinguishable from 0 (the
    Fieller set is then unbounded)."""
    # in the contrasts' own order: a set's order follows string hashing, which changes from one
    # process to the next, and with it the last bits of every sum below
    keys = list(dict.fromkeys([*numerator, *denominator]))
    a = {k: numerator.get(k, 0.0) for k in keys}
    b = {k: denominator.get(k, 0.0) for k in keys}
    num = sum(a[k] * groups[k].mean for k in keys)
    den = sum(b[k] * groups[k].mean for k in keys)
    out: dict[str, Any] = {"value": None if den == 0 else num / den, "ci95": None, "df": None, "reason": None}
    if den == 0:
        out["reason"] = "the denominator is 0"
        return out
    if any(groups[k].n < 2 for k in keys):
        out["reason"] = "n=1 in a group"
        return out
    v = {k: groups[k].std ** 2 / groups[k].n for k in keys}
    ratio = num / den
    df = welch_df([(a[k] - ratio * b[k]) ** 2 * v[k] for k in keys], [groups[k].n for k in keys])
    if df is None:
        out["ci95"], out["df"] = (ratio, ratio), None
        return out
    ci = fieller_interval(
        num,
        den,
        sum(a[k] ** 2 * v[k] for k in keys),
        sum(b[k] ** 2 * v[k] for k in keys),
        sum(a[k] * b[k] * v[k] for k in keys),
        df,
        level,
    )
    out.update(ci95=ci, df=df, reason=None if ci is not None else "unbounded: the denominator's interval contains 0")
    return out


def paired_ratio(
    numerator: Mapping[Any, float], denominator: Mapping[Any, float], groups: Mapping[Any, GroupStats]
) -> dict[str, Any] | None:
    """R = mean(N_s) / mean(D_s) over the seeds common to every group, with Fieller's
    interval from the per-seed sample (co)variances / k and k - 1 degrees of freedom."""
    keys = sorted(set(numerator) | set(denominator))
    common = _common_seeds([groups[k] for k in keys])
    if not common:
        return None
    n_s = [sum(c * groups[k].by_seed[s] for k, c in numerator.items()) for s in common]
    d_s = [sum(c * groups[k].by_seed[s] for k, c in denominator.items()) for s in common]
    k = len(common)
    num, den = statistics.fmean(n_s), statistics.fmean(d_s)
    out: dict[str, Any] = {"n_seeds": k, "value": None if den == 0 else num / den, "ci95": None, "reason": None}
    if den == 0:
        out["reason"] = "the denominator is 0"
    elif k < 2:
        out["reason"] = "1 seed"
    else:
        var_n, var_d = statistics.variance(n_s) / k, statistics.variance(d_s) / k
        cov = statistics.covariance(n_s, d_s) / k
        out["ci95"] = fieller_interval(num, den, var_n, var_d, cov, k - 1)
        if out["ci95"] is None:
            out["reason"] = "unbounded: the denominator's interval contains 0"
    return out
