"""Student's t distribution and the small-sample intervals built on it (no scipy).

With k seeds per cell a variance is estimated from k - 1 degrees of freedom, and a normal
(z = 1.96) interval built on it covers far less than 95% (about 88% for a paired contrast
over 3 seeds). The intervals here use t quantiles instead:

* a linear contrast C = sum_i c_i m_i of independent group means, se^2 = sum_i c_i^2 s_i^2 / n_i,
  with the Welch-Satterthwaite degrees of freedom
      nu = (sum_i w_i)^2 / sum_i (w_i^2 / (n_i - 1)),   w_i = c_i^2 s_i^2 / n_i;
* a paired contrast over k seeds: nu = k - 1 (exact for normal per-seed differences);
* a ratio R = N / D of two contrasts (a recovered share): Fieller's interval, the set of R
  with (N - R D)^2 <= t^2 var(N - R D), which is exact where the t interval of N - R D is,
  and unbounded when D is not distinguishable from 0 (then no interval exists).

The distribution function is computed from the regularized incomplete beta function,
    P(|T| > t) = I_x(nu / 2, 1 / 2),   x = nu / (nu + t^2),
evaluated by its continued fraction (modified Lentz), and quantiles by Newton's method on
that function; both are accurate to ~1e-12 for nu >= 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

LEVEL = 0.95  # two-sided coverage of every interval in a report


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf form), by modified
    Lentz iteration: converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (df > 0, may be fractional)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_pdf(t: float, df: float) -> float:
    """Gamma((nu+1)/2) / (sqrt(nu pi) Gamma(nu/2)) (1 + t^2/nu)^(-(nu+1)/2)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by Newton's method from the normal quantile (bisection
    steps keep it inside a bracket where the tails are heavy)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    t = min(max(_normal_quantile(p), lo), hi)
    for _ in range(200):
        f = t_cdf(t, df) - p
        step = f / t_pdf(t, df)
        if f == 0 or abs(step) < 1e-13 * max(1.0, t):
            return t - step
        if f > 0:
            hi = t
        else:
            lo = t
        candidate = t - step
        t = candidate if lo < candidate < hi else 0.5 * (lo + hi)
    return t


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def t_critical(df: float, level: float = LEVEL) -> float:
    """The two-sided critical value: P(|T| <= t) = level."""
    return t_quantile(0.5 + level / 2.0, df)


def welch_df(weights: Sequence[float], ns: Sequence[int]) -> float | None:
    """Welch-Satterthwaite degrees of freedom of sum_i w_i (w_i = c_i^2 s_i^2 / n_i, each
    estimated from n_i - 1 degrees of freedom): (sum w)^2 / sum(w_i^2 / (n_i - 1)). None
    when every w_i is 0 (the contrast has no spread to estimate)."""
    denominator = sum(w * w / (n - 1) for w, n in zip(weights, ns))
    if denominator == 0:
        return None
    return sum(weights) ** 2 / denominator


def t_interval(value: float, se: float | None, df: float | None, level: float = LEVEL) -> tuple[float, float] | None:
    """value -/+ t_{(1+level)/2, df} se; a point when se = 0; None without se or df."""
    if se is None:
        return None
    if se == 0:
        return (value, value)
    if df is None:
        return None
    half = t_critical(df, level) * se
    return (value - half, value + half)


def fieller_interval(
    num: float, den: float, var_num: float, var_den: float, cov: float, df: float, level: float = LEVEL
) -> tuple[float, float] | None:
    """Fieller's interval for R = num / den: the R with (N - R D)^2 <= t^2 var(N - R D),
    var(N - R D) = var_N - 2 R cov + R^2 var_D, i.e. the R between the roots of
        A R^2 - 2 B R + C = 0,  A = D^2 - t^2 var_D,  B = N D - t^2 cov,  C = N^2 - t^2 var_N.
    None when A <= 0: D is within its own interval of 0, and the set is unbounded."""
    t2 = t_critical(df, level) ** 2
    a = den * den - t2 * var_den
    if a <= 0:
        return None
    b = num * den - t2 * cov
    c = num * num - t2 * var_num
    disc = max(b * b - a * c, 0.0)
    root = math.sqrt(disc)
    return ((b - root) / a, (b + root) / a)
