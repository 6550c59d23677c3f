"""The seed-to-seed spread of a finished or pilot grid, and how well its seeds pin it down.

The grid's cells are read by the report's own reader and summarised by the report
(:func:`normopt.report.stats.summary.build_summary`: the same groups, the same left-out cells).
Every group with at least 2 included cells (seeds) gives a sample standard deviation s_i of its
final eval losses on n_i - 1 degrees of freedom; the pooled spread is

    sigma = sqrt( sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1) ),   nu = sum_i (n_i - 1),

the estimate of a common seed-to-seed standard deviation. Under normal seed noise
nu sigma^2 / sigma_true^2 is chi-square with nu degrees of freedom, so sigma_true's 95% interval
is [sigma sqrt(nu / chi2_{0.975, nu}), sigma sqrt(nu / chi2_{0.025, nu})]: with a few seeds its
upper end is several times sigma, which is why the plan repeats its answer there.

The chi-square distribution is computed from the regularized lower incomplete gamma function
(series below a + 1, Lentz's continued fraction above), its quantiles by bisection; no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.report.cells.axes import infer_axes, read_experiment_file
from normopt.report.cells.cell_reading import Cell, discover_cells
from normopt.report.stats.summary import build_summary


def regularized_gamma(a: float, x: float) -> float:
    """P(a, x) = gamma(a, x) / Gamma(a), the regularized lower incomplete gamma function."""
    if x <= 0.0:
        return 0.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:  # series: sum_k x^k / (a (a+1) ... (a+k))
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return math.exp(log_front) * total
    tiny = 1e-300  # continued fraction of Q(a, x) (modified Lentz)
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return 1.0 - math.exp(log_front) * h


def chi2_cdf(x: float, df: float) -> float:
    return regularized_gamma(df / 2.0, x / 2.0)


def chi2_quantile(p: float, df: float) -> float:
    """The x with P(X <= x) = p for X chi-square with ``df`` degrees of freedom (bisection)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, max(1.0, df)
    while chi2_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def sigma_interval(sigma: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """The chi-square interval of a standard deviation estimated on ``df`` degrees of freedom."""
    tail = (1.0 - level) / 2.0
    return (sigma * math.sqrt(df / chi2_quantile(1.0 - tail, df)), sigma * math.sqrt(df / chi2_quantile(tail, df)))


@dataclass(frozen=True)
class Spread:
    """The seed-to-seed standard deviation the plan uses (nats), and where it came from."""

    sigma: float
    df: int | None  # None: stated, not estimated
    ci95: tuple[float, float] | None
    source: str
    groups: int = 0  # groups with 2 or more seeds pooled
    cells: int = 0  # cells in those groups
    left_out: int = 0  # cells the report leaves out (missing, diverged, stopped early)

    def to_json(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "df": self.df,
            "ci95": None if self.ci95 is None else list(self.ci95),
            "source": self.source,
            "groups": self.groups,
            "cells": self.cells,
            "left_out": self.left_out,
        }


def stated_spread(sigma: float) -> Spread:
    if not (sigma > 0 and math.isfinite(sigma)):
        raise UserError(f"--sigma must be a positive number of nats, got {sigma}")
    return Spread(sigma, None, None, "stated (--sigma)")


def grid_cells(root: Path) -> tuple[list[Cell], dict[str, Any]]:
    """A grid's cells and the report's summary of them (the axes the report would use)."""
    cells = discover_cells(root)
    axes = read_experiment_file(root) or infer_axes(cells)
    return cells, build_summary(cells, axes=axes)


def pooled_spread(root: Path, summary: dict[str, Any]) -> Spread:
    """The pooled within-group spread of a grid's final eval losses (module docstring)."""
    used = [g for g in summary["groups"] if g["n"] >= 2 and g["std"] is not None]
    left_out = sum(1 for c in summary["cells"] if not c["included"])
    if not used:
        raise UserError(
            f"{root}: no group has 2 or more included seeds, so no seed-to-seed spread can be "
            f"measured ({len(summary['cells'])} cells, {left_out} left out); pass --sigma"
        )
    df = sum(g["n"] - 1 for g in used)
    sigma = math.sqrt(sum((g["n"] - 1) * g["std"] ** 2 for g in used) / df)
    if sigma <= 0:
        raise UserError(
            f"{root}: the final eval losses do not vary between seeds (pooled spread 0), so "
            f"they say nothing about seed noise; pass --sigma"
        )
    return Spread(
        sigma, df, sigma_interval(sigma, df), f"pooled from {root}", len(used), sum(g["n"] for g in used), left_out
    )
