"""The weighted least-squares line of an interaction against ln N, its slope's interval and verdict
(the fit: :mod:`normopt.report.stats.model_size`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.stats.multiplicity import t_p_value
from normopt.report.stats.student_t import t_interval

GROWS, SHRINKS, FLAT, NOT_TESTED = "grows", "shrinks", "flat", "not tested"


VERDICT_WORDS = {GROWS: "grows", SHRINKS: "shrinks", FLAT: "cannot be told apart from flat", NOT_TESTED: "not tested"}


def weighted_line_fit(
    x: Sequence[float], y: Sequence[float], se: Sequence[float | None] | None = None
) -> dict[str, Any]:
    """y_i = a + b x_i by weighted least squares (module docstring): weights 1/se_i^2 when every
    se_i is a positive number, else equal weights; the slope's standard error from the weighted
    residual scatter, its 95% t interval and two-sided p-value with k - 2 degrees of freedom.
    With k = 2 the slope is the line through the points and se, df, ci95 and p are None; with
    fewer than 2 points or one distinct x there is no slope."""
    k = len(x)
    if len(y) != k or (se is not None and len(se) != k):
        raise ValueError("x, y and se must have the same length")
    inverse = se is not None and k > 0 and all(s is not None and s > 0 and math.isfinite(s) for s in se)
    w = [1.0 / s**2 for s in se] if inverse else [1.0] * k
    out: dict[str, Any] = {
        "k": k,
        "weights": "inverse variance" if inverse else "equal",
        "intercept": None,
        "slope": None,
        "slope_se": None,
        "df": None,
        "t": None,
        "ci95": None,
        "p": None,
        "residual_scale": None,
        "slope_se_from_seeds": None,
        "reason": None,
    }
    if k < 2:
        out["reason"] = "fewer than 2 sizes"
        return out
    total = sum(w)
    x_w = sum(wi * xi for wi, xi in zip(w, x)) / total
    y_w = sum(wi * yi for wi, yi in zip(w, y)) / total
    s_xx = sum(wi * (xi - x_w) ** 2 for wi, xi in zip(w, x))
    if s_xx <= 1e-12 * total * max(1.0, x_w * x_w):
        out["reason"] = "every size has the same number of parameters"
        return out
    slope = sum(wi * (xi - x_w) * (yi - y_w) for wi, xi, yi in zip(w, x, y)) / s_xx
    out.update(intercept=y_w - slope * x_w, slope=slope, slope_se_from_seeds=1.0 / math.sqrt(s_xx) if inverse else None)
    df = k - 2
    if df == 0:
        out.update(df=0, reason="two sizes: the line through two points leaves k - 2 = 0 degrees of freedom")
        return out
    residual = sum(wi * (yi - out["intercept"] - slope * xi) ** 2 for wi, xi, yi in zip(w, x, y))
    s2 = residual / df
    slope_se = math.sqrt(s2 / s_xx)
    out.update(
        df=df,
        slope_se=slope_se,
        residual_scale=math.sqrt(s2),
        t=None if slope_se == 0 else slope / slope_se,
        ci95=t_interval(slope, slope_se, df),
        p=t_p_value(slope, slope_se, df),
    )
    return out


def slope_verdict(fit: Mapping[str, Any]) -> str:
    """grows / shrinks (the slope's 95% interval lies above / below 0), flat (it includes 0),
    not tested (no interval)."""
    ci = fit.get("ci95")
    if ci is None:
        return NOT_TESTED
    return GROWS if ci[0] > 0 else SHRINKS if ci[1] < 0 else FLAT
