"""Student t quantiles, Welch degrees of freedom, Fieller's interval, and the coverage of
the report's intervals at the seed counts experiments use."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from normopt.report.stats.contrasts import contrast, describe, paired_contrast, ratio_of_contrasts
from normopt.report.stats.student_t import (
    fieller_interval,
    t_cdf,
    t_critical,
    t_quantile,
    welch_df,
)

# two-sided 95% critical values from printed t tables
TABLE = {
    1: 12.7062,
    2: 4.3027,
    3: 3.1824,
    4: 2.7764,
    5: 2.5706,
    6: 2.4469,
    9: 2.2622,
    10: 2.2281,
    20: 2.0860,
    30: 2.0423,
    120: 1.9799,
}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_critical_values_match_t_tables(df):
    assert t_critical(df) == pytest.approx(TABLE[df], abs=6e-5)


def test_closed_forms():
    """df = 1 is Cauchy: t_p = tan(pi (p - 1/2)); df = 2: t_p = (2p - 1) sqrt(2 / (4 p (1 - p)))."""
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-10)
        assert t_quantile(1 - p, 3) == pytest.approx(-t_quantile(p, 3))
    assert t_cdf(0.0, 3.7) == 0.5


@pytest.mark.parametrize("df", [1.47, 2.94, 7.3])
def test_fractional_degrees_of_freedom_against_integration(df):
    """P(0 < T < t) by Simpson's rule over the density equals t_cdf(t) - 1/2."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    t, n = t_critical(df), 6000
    h = t / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    mass = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    assert mass == pytest.approx(0.475, abs=1e-9)


def test_welch_df():
    # equal variances and sizes: 2 (n - 1)
    assert welch_df([1.0, 1.0], [5, 5]) == pytest.approx(8.0)
    # one dominant term: its own n - 1
    assert welch_df([1.0, 1e-9], [4, 50]) == pytest.approx(3.0, rel=1e-6)
    assert welch_df([0.0, 0.0], [3, 3]) is None


def test_fieller_matches_brute_force():
    """The interval is the set of R with (N - R D)^2 <= t^2 var(N - R D)."""
    num, den, vn, vd, cov, df = 0.8, 1.0, 0.01, 0.02, 0.005, 4
    lo, hi = fieller_interval(num, den, vn, vd, cov, df)
    t2 = t_critical(df) ** 2
    inside = [
        r / 1000
        for r in range(-2000, 4000)
        if (num - r / 1000 * den) ** 2 <= t2 * (vn - 2 * r / 1000 * cov + (r / 1000) ** 2 * vd)
    ]
    assert lo == pytest.approx(inside[0], abs=1.1e-3) and hi == pytest.approx(inside[-1], abs=1.1e-3)
    assert fieller_interval(0.8, 0.1, 0.01, 0.02, 0.0, 4) is None  # D within its own interval of 0


def _coverage(trials: int, seeds: int, rng: random.Random) -> dict[str, float]:
    """Share of 95% intervals that contain the truth: an interaction of four independent
    groups with unequal spreads (Welch t, and the old z = 1.96), the same contrast when every
    seed shifts all its cells alike (paired t), and a recovered share (Fieller)."""
    means = {"a": 3.9, "b": 2.9, "c": 3.3, "d": 3.0, "f": 3.1}
    sigma = {"a": 0.05, "b": 0.01, "c": 0.03, "d": 0.02, "f": 0.04}
    truth = means["a"] - means["b"] - means["c"] + means["d"]
    share_truth = (means["a"] - means["f"]) / (means["a"] - means["b"])
    signs = {"a": 1.0, "b": -1.0, "c": -1.0, "d": 1.0}
    hits = {"welch": 0, "paired": 0, "normal": 0, "fieller": 0}
    for _ in range(trials):
        groups = {k: describe([means[k] + rng.gauss(0, sigma[k]) for _ in range(seeds)]) for k in means}
        c = contrast([(signs[k], groups[k]) for k in signs])
        hits["welch"] += c.ci95[0] <= truth <= c.ci95[1]
        hits["normal"] += abs(c.value - truth) <= 1.959964 * c.se
        ratio = ratio_of_contrasts({"a": 1.0, "f": -1.0}, {"a": 1.0, "b": -1.0}, groups)
        hits["fieller"] += ratio["ci95"] is not None and ratio["ci95"][0] <= share_truth <= ratio["ci95"][1]
        shared = [rng.gauss(0, 0.2) for _ in range(seeds)]  # a seed's effect on every cell
        seeded = {
            k: describe([means[k] + shared[s] + rng.gauss(0, sigma[k]) for s in range(seeds)], list(range(seeds)))
            for k in signs
        }
        p = paired_contrast([(signs[k], seeded[k]) for k in signs])["ci95"]
        hits["paired"] += p[0] <= truth <= p[1]
    return {k: v / trials for k, v in hits.items()}


def test_intervals_hold_their_coverage_with_three_seeds():
    rates = _coverage(3000, 3, random.Random(0))
    for method in ("welch", "paired", "fieller"):
        assert 0.93 <= rates[method] <= 0.97, rates
    assert rates["normal"] < 0.91, rates  # what z = 1.96 gave: far too narrow with 3 seeds


def test_paired_interval_with_two_seeds_uses_one_degree_of_freedom():
    groups = [describe([1.0, 1.2], [0, 1]), describe([0.5, 0.5], [0, 1])]
    p = paired_contrast([(1.0, groups[0]), (-1.0, groups[1])])
    se = statistics.stdev([0.5, 0.7]) / math.sqrt(2)
    assert p["df"] == 1 and p["ci95"] == pytest.approx([0.6 - 12.706205 * se, 0.6 + 12.706205 * se])


def test_the_share_of_a_gap_is_the_same_in_every_process():
    """The ratio's sums run in the contrasts' order, not a set's: string hashing differs from
    one process to the next (PYTHONHASHSEED), and it must not reach the last bits."""
    import subprocess
    import sys

    code = (
        "import statistics, random\n"
        "from normopt.report.stats.contrasts import describe, ratio_of_contrasts\n"
        "rng = random.Random(3)\n"
        "means = {('derf_ema', 'muon'): 3.17, ('derf', 'muon'): 3.31, ('rmsnorm', 'muon'): 3.0,"
        " ('derf', 'adamw'): 3.02, ('rmsnorm', 'adamw'): 3.01}\n"
        "names = list(means)\n"
        "groups = {k: describe([rng.gauss(m, 0.01) for _ in range(3)]) for k, m in means.items()}\n"
        "r = ratio_of_contrasts({names[0]: 1.0, names[1]: -1.0}, {names[1]: 1.0, names[2]: -1.0, names[3]: -1.0,"
        " names[4]: 1.0}, groups)\n"
        "print(repr(r['value']), repr(r['ci95']), repr(r['df']))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": str(seed), "PATH": ""}, capture_output=True, text=True
        ).stdout
        for seed in range(6)
    }
    assert len(outputs) == 1 and "None" not in next(iter(outputs)), outputs
