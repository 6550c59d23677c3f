"""Many intervals in one report: the main family of comparisons, its Holm adjustment, and
equivalence ("no penalty") statements.

A report holds dozens of intervals; read one at a time, about 1 in 20 of the null ones
excludes 0 by chance. So the report names one **main family** (the comparisons its answer
rests on) and adjusts within it; everything else is labelled exploratory (unadjusted):

* main family: every interaction (Welch, independent means), every fix's share of the
  interaction (of the gap when the report has no across axis; then the gaps themselves, the
  only contrasts left, join the family too), and every declared factor effect
  (:mod:`normopt.report.stats.factor_effects`);
* Holm's step-down adjustment of the members' two-sided p-values (H0: the contrast is 0; for
  a share, H0: the fix's gain is 0, the share's numerator). With p_(1) <= ... <= p_(m),
      p_adj(i) = max_{j <= i} min(1, (m - j + 1) p_(j));
  it controls the family-wise error rate at 5% for any dependence between the tests;
* simultaneous intervals: Bonferroni, each at level 1 - 0.05 / m (Holm's step-down has no
  matching interval; Bonferroni's is its conservative companion: Holm may reject a member
  whose Bonferroni interval still touches 0, never the other way round);
* equivalence (two one-sided tests, TOST): a difference d is called negligible at margin M
  when both H0: d <= -M and H0: d >= M are rejected at 5%, i.e. when the 90% t interval lies
  inside (-M, M); p_TOST = max(P(T >= (d + M)/se), P(T <= (d - M)/se)). "No penalty" in a
  report means exactly this, with M = ``report.equivalence_margin``
  (:data:`normopt.report.cells.axes.DEFAULT_EQUIVALENCE_MARGIN` unless the spec sets one); an
  interval that includes 0 without lying inside +/-M says nothing either way.

Each member is a Welch-t (or Fieller) quantity whose coverage is only approximate at 2-3
seeds; see :mod:`normopt.report.stats.summary` for the measured coverage.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from normopt.report.stats.contrasts import GroupStats, ratio_of_contrasts
from normopt.report.stats.student_t import LEVEL, t_cdf, t_interval

ALPHA = 1.0 - LEVEL
MAIN = "main"
EXPLORATORY = "exploratory"


def t_p_value(value: float, se: float | None, df: float | None) -> float | None:
    """Two-sided p-value of H0: contrast = 0, 2 P(T_df >= |value / se|); None without se or
    df (one seed in a group); se = 0: 0 when value != 0 else 1."""
    if se is None:
        return None
    if se == 0:
        return 0.0 if value != 0 else 1.0
    if df is None:
        return None
    return 2.0 * (1.0 - t_cdf(abs(value) / se, df))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's adjusted p-values, in the input order (module docstring); members with no
    p-value (None) are not tests and do not count in m."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(tested)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def simultaneous_level(m: int) -> float:
    """Bonferroni's per-member level for a family of m: 1 - 0.05 / m."""
    return 1.0 - ALPHA / max(m, 1)


def tost(value: float, se: float | None, df: float | None, margin: float) -> dict[str, Any] | None:
    """Two one-sided tests of |d| < margin at 5% (module docstring): the 90% t interval, the
    TOST p-value and whether d is negligible. None without se (one seed in a group)."""
    if se is None or (se > 0 and df is None):
        return None
    if se == 0:
        inside = abs(value) < margin
        return {"margin": margin, "ci90": (value, value), "p": 0.0 if inside else 1.0, "equivalent": inside}
    p_low = 1.0 - t_cdf((value + margin) / se, df)  # H0: d <= -margin
    p_high = t_cdf((value - margin) / se, df)  # H0: d >= margin
    p = max(p_low, p_high)
    return {"margin": margin, "ci90": t_interval(value, se, df, level=1.0 - 2 * ALPHA), "p": p, "equivalent": p < ALPHA}


def equivalence_phrase(record: dict[str, Any] | None) -> str:
    """How a report says an equivalence result in words."""
    if record is None:
        return "no equivalence test (1 seed)"
    ci = record["ci90"]
    if record["equivalent"]:
        return (
            f"negligible within ±{record['margin']:g} nats (90% interval [{ci[0]:+.3f}, {ci[1]:+.3f}], "
            f"TOST p={record['p']:.3g})"
        )
    return (
        f"not shown negligible at ±{record['margin']:g} nats (90% interval [{ci[0]:+.3f}, {ci[1]:+.3f}], "
        f"TOST p={record['p']:.3g})"
    )


def adjust_family(members: Sequence[MutableMapping[str, Any]]) -> dict[str, Any]:
    """Holm-adjust the members in place: each gets ``p_holm`` (from its ``p``) and
    ``family`` = main. Returns the family's description for summary.json."""
    for member, p_adj in zip(members, holm([m.get("p") for m in members])):
        member["p_holm"] = p_adj
        member["family"] = MAIN
    m = sum(1 for member in members if member.get("p") is not None)
    rejected = sum(1 for member in members if member.get("p_holm") is not None and member["p_holm"] < ALPHA)
    return {
        "size": m,
        "members": len(members),
        "rejected": rejected,
        "alpha": ALPHA,
        "simultaneous_level": simultaneous_level(m),
        "method": (
            f"Holm's step-down adjustment of two-sided t p-values over the m={m} tested members "
            f"(family-wise error rate {ALPHA:.0%}); simultaneous intervals: Bonferroni, each at "
            f"{simultaneous_level(m):.2%}"
        ),
    }


def main_family(
    gaps: list[dict[str, Any]],
    interactions: list[dict[str, Any]],
    share_groups: Sequence[tuple[dict[str, Any], Mapping[Any, GroupStats]]],
    factor_effects: list[dict[str, Any]],
    single: bool,
) -> dict[str, Any]:
    """The main family (:mod:`normopt.report.stats.multiplicity`): the interactions, each fix's share
    of the interaction (of the gap, with the gaps themselves, without an across axis) and the
    factor effects. Holm-adjusts their p-values in place and gives each a Bonferroni
    simultaneous interval (``ci_simultaneous``); every other record is exploratory."""
    shares = [(r, g) for r, g in share_groups if (r["share"] if single else r["interaction_share"]) is not None]
    contrasts = [*(gaps if single else []), *interactions, *factor_effects]
    members: list[dict[str, Any]] = [*contrasts]
    share_members = []
    for record, _ in shares:
        # the share's test: H0 gain = 0 (its numerator); one member per share
        member = {"p": record["p"]}
        share_members.append(member)
        members.append(member)
    family = adjust_family(members)
    level = family["simultaneous_level"]
    for record in contrasts:
        record["ci_simultaneous"] = t_interval(record["value"], record["se"], record["df"], level)
    for (record, groups), member in zip(shares, share_members):
        key = "share" if single else "interaction_share"
        target, fix, optim = record["base_norm"], record["fix"], record["optim"]
        gain = {(target, optim): 1.0, (fix, optim): -1.0}
        inter = (
            {(target, optim): 1.0, (record["baseline"], optim): -1.0}
            if single
            else {
                (target, optim): 1.0,
                (record["baseline"], optim): -1.0,
                (target, record["reference_optim"]): -1.0,
                (record["baseline"], record["reference_optim"]): 1.0,
            }
        )
        record[f"{key}_ci_simultaneous"] = ratio_of_contrasts(gain, inter, groups, level)["ci95"]
        record[f"{key}_p_holm"] = member["p_holm"]
        record["family"] = MAIN
    for record, _ in share_groups:
        record.setdefault("family", EXPLORATORY)
    family["composition"] = (
        "gaps, fixes' shares of the gap, factor effects"
        if single
        else "interactions (Welch), fixes' shares of the interaction (tested by their gain), factor effects"
    )
    family["exploratory"] = (
        "everything else: "
        + ("" if single else "gaps, shares of the gap, ")
        + "paired per-seed estimates, token-frequency buckets, factors' gap changes "
        "(unadjusted 95% intervals)"
    )
    return family
