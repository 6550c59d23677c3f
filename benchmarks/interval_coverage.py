"""Coverage of the report's intervals at the seed counts the report is used with, by simulation.

    .venv/bin/python benchmarks/interval_coverage.py [--reps 20000] [--seed 0]

Each scenario draws normal final losses for the groups of one contrast (k seeds per group,
true contrast known), builds the report's interval with normopt's own estimators
(:mod:`normopt.report.stats.contrasts`) and counts how often it covers the truth:

* gap (2 groups) and interaction (4 groups), independent means, Welch t;
* the same with one group's standard deviation 2x, 4x or 10x the others' (one group
  dominates the variance; Welch-Satterthwaite's degrees of freedom are themselves estimated
  from k - 1 df per group, which is where the approximation is weakest);
* the paired per-seed interaction (t, k - 1 df), with a seed effect shared by all groups;
* Fieller's interval for a fix's share of a gap (true share 0.5, gap 10 sds of a group mean);
* the main family: m = 6 null interactions from independent groups, the share of
  replicates with any unadjusted 95% interval excluding 0 versus any Holm-adjusted p < 0.05
  (the family-wise error rate).

Prints one line per scenario: its coverage (or error rate) and the binomial standard error
of that estimate. Pure Python (random, math): nothing beyond normopt is needed.
"""

from __future__ import annotations

import argparse
import math
import random

from normopt.report.stats.contrasts import contrast, describe, paired_contrast, ratio_of_contrasts
from normopt.report.stats.multiplicity import holm, t_p_value

INTERACTION = (1.0, -1.0, -1.0, 1.0)


def _draw(rng: random.Random, means, sds, k: int, seed_sd: float = 0.0):
    shared = [rng.gauss(0.0, seed_sd) for _ in range(k)]
    return [describe([rng.gauss(m, sd) + shared[s] for s in range(k)], list(range(k))) for m, sd in zip(means, sds)]


def contrast_coverage(rng, reps: int, k: int, sds, coefficients, paired: bool = False, seed_sd: float = 0.0) -> float:
    means = [0.3 * i for i in range(len(coefficients))]
    truth = sum(c * m for c, m in zip(coefficients, means))
    hits = 0
    for _ in range(reps):
        groups = _draw(rng, means, sds, k, seed_sd)
        terms = list(zip(coefficients, groups))
        ci = paired_contrast(terms)["ci95"] if paired else contrast(terms).ci95
        hits += ci[0] <= truth <= ci[1]
    return hits / reps


def share_coverage(rng, reps: int, k: int) -> tuple[float, float]:
    """Groups n (target), F (fix), b (baseline): gap = L_n - L_b = 10 sd(mean), the fix
    recovers half of it; Fieller's interval of (L_n - L_F) / (L_n - L_b). Returns (coverage
    among the bounded intervals, share of replicates with no bounded interval): the report
    gives no interval when the gap's own interval contains 0."""
    sd = 1.0
    gap = 10 * sd / math.sqrt(k)
    means = {"n": gap, "F": gap / 2, "b": 0.0}
    hits = bounded = 0
    for _ in range(reps):
        groups = dict(zip(means, _draw(rng, list(means.values()), [sd] * 3, k)))
        ci = ratio_of_contrasts({"n": 1.0, "F": -1.0}, {"n": 1.0, "b": -1.0}, groups)["ci95"]
        if ci is not None:
            bounded += 1
            hits += ci[0] <= 0.5 <= ci[1]
    return hits / max(bounded, 1), 1 - bounded / reps


def family_error(rng, reps: int, k: int, m: int = 6) -> tuple[float, float]:
    """Any unadjusted rejection vs any Holm rejection over m independent null interactions."""
    raw = adjusted = 0
    for _ in range(reps):
        ps = []
        for _ in range(m):
            groups = _draw(rng, [0.0] * 4, [1.0] * 4, k)
            c = contrast(list(zip(INTERACTION, groups)))
            ps.append(t_p_value(c.value, c.se, c.df))
        raw += any(p < 0.05 for p in ps)
        adjusted += any(p < 0.05 for p in holm(ps))
    return raw / reps, adjusted / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    n = args.reps

    def line(name: str, value: float, reps: int) -> None:
        print(f"{name:<62} {value:6.1%}  (se {math.sqrt(value * (1 - value) / reps):.1%}, {reps} reps)")

    print("nominal 95% intervals; coverage by simulation")
    for k in (2, 3):
        line(f"k={k} gap, Welch, equal sds", contrast_coverage(rng, n, k, [1, 1], (1.0, -1.0)), n)
        line(f"k={k} gap, Welch, one sd 4x", contrast_coverage(rng, n, k, [4, 1], (1.0, -1.0)), n)
        line(f"k={k} interaction, Welch, equal sds", contrast_coverage(rng, n, k, [1] * 4, INTERACTION), n)
        line(
            f"k={k} interaction, Welch, one group's sd 4x (dominant)",
            contrast_coverage(rng, n, k, [4, 1, 1, 1], INTERACTION),
            n,
        )
        line(f"k={k} interaction, Welch, one group's sd 2x", contrast_coverage(rng, n, k, [2, 1, 1, 1], INTERACTION), n)
        line(
            f"k={k} interaction, Welch, one group's sd 10x", contrast_coverage(rng, n, k, [10, 1, 1, 1], INTERACTION), n
        )
        line(
            f"k={k} interaction, paired (k-1 df), shared seed effect",
            contrast_coverage(rng, n, k, [1] * 4, INTERACTION, paired=True, seed_sd=1.0),
            n,
        )
        covered, unbounded = share_coverage(rng, n // 2, k)
        line(f"k={k} share of a gap, Fieller, bounded intervals (true 0.5)", covered, round((1 - unbounded) * n // 2))
        line(f"k={k} share of a gap, Fieller: no bounded interval", unbounded, n // 2)
        raw, adjusted = family_error(rng, n // 10, k)
        line(f"k={k} family of 6 null interactions: any unadjusted 95% rejects", raw, n // 10)
        line(f"k={k} family of 6 null interactions: any Holm-adjusted rejects", adjusted, n // 10)


if __name__ == "__main__":
    main()
