"""Cells left out of a contrast's groups, and which way their absence pushes the estimate.

A cell flagged missing, diverged, stopped early or unplaced is left out of every statistic
(:mod:`normopt.report.cells.cell_assessment`); a cell can carry several flags. Each contrast of the
summary (gap, interaction, fix recovery, factor effect) names the groups of its own that lost
cells, in ``left_out``: one line per group, each cell counted once with all its flags, e.g.
"derf/muon: 1 cell left out (1 diverged + stopped_early)".

**Direction** (``left_out_bias``, one record per estimate of the contrast that a lost diverged
cell moves). A diverged cell ended worse than the seeds that survived (its loss rose by more
than ``divergence_nats`` or went non-finite), so a group that lost one shows a mean lower than
the group trained. What that does to an estimate depends on the sign with which the group
enters it:

* a linear contrast C = sum_i c_i m_i moves by -c_i delta when m_i falls by delta: a group with
  c_i > 0 (the compared level under O, or the baseline under the reference, in an interaction)
  biases C **low** (a positive value such as a penalty is understated); a group with c_i < 0
  (the baseline under O, or the compared level under the reference) biases it **high** (a
  penalty is overstated);
* a ratio R = N / D of two contrasts (N = sum_i a_i m_i, D = sum_i b_i m_i; every share the report
  gives has D > 0) has dR/dm_i = (a_i - b_i R) / D, so the group enters with the sign of
  a_i - b_i R (a fix that lost a diverged seed biases its share of the gap high; the baseline,
  low);
* groups that push both ways: the direction is ``unknown``.

A missing or stopped cell says nothing about the loss it would have reached: it implies no
direction (its contrast carries the ⚠ of ``left_out`` and no ``left_out_bias``).

``left_out_bias`` records: ``{"estimate": what moves ("interaction", "share of the gap", ...),
"direction": "low" | "high" | "unknown", "plus": [groups entering with +], "minus": [groups
entering with -]}`` (only the groups that lost a diverged cell).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from normopt.report.cells.cell_assessment import FLAGS
from normopt.report.stats.estimates import interaction_terms

LeftOut = Mapping[tuple[str, str, str], Mapping[str, Sequence[str]]]  # (stratum, variant, optim) -> flag -> cells


def cell_flags(flags: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Each left-out cell of one group with all its flags (in :data:`FLAGS` order), from the
    group's flag -> cells mapping."""
    names = sorted({name for cells in flags.values() for name in cells})
    return {name: tuple(f for f in FLAGS if name in flags.get(f, ())) for name in names}


def by_flag_set(flags: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """How many cells of one group were left out with each combination of flags,
    {"diverged + stopped_early": 1, "missing": 2}: each cell counted once."""
    counts: dict[str, int] = {}
    for combo in sorted(cell_flags(flags).values(), key=lambda c: [FLAGS.index(f) for f in c]):
        key = " + ".join(combo)
        counts[key] = counts.get(key, 0) + 1
    return counts


def group_line(group: str, flags: Mapping[str, Sequence[str]]) -> str:
    """ "derf/muon: 2 cells left out (1 diverged + stopped_early, 1 missing)"."""
    counts = by_flag_set(flags)
    total = sum(counts.values())
    return (
        f"{group}: {total} cell{'s' if total != 1 else ''} left out ("
        + ", ".join(f"{n} {combo}" for combo, n in counts.items())
        + ")"
    )


def _group_flags(group: str, stratum: str, left_out: LeftOut) -> Mapping[str, Sequence[str]]:
    variant, optim = group.rsplit("/", 1)
    return left_out.get((stratum, variant, optim), {})


def left_out_lines(groups: Sequence[str], stratum: str, left_out: LeftOut) -> list[str]:
    """One line per group of a contrast that lost cells (module docstring)."""
    return [group_line(g, flags) for g in dict.fromkeys(groups) if (flags := _group_flags(g, stratum, left_out))]


def ratio_signs(numerator: Mapping[str, float], denominator: Mapping[str, float], ratio: float) -> dict[str, float]:
    """The sign with which each group enters R = N / D at R (D > 0): a_i - b_i R."""
    keys = list(dict.fromkeys([*numerator, *denominator]))
    return {k: numerator.get(k, 0.0) - denominator.get(k, 0.0) * ratio for k in keys}


def bias(estimate: str, signs: Mapping[str, float], stratum: str, left_out: LeftOut) -> dict[str, Any] | None:
    """Which way the diverged cells left out of ``signs``' groups push ``estimate`` (module
    docstring); None when none of its groups lost a diverged cell (or those that did enter
    with weight 0)."""
    diverged = [g for g in signs if _group_flags(g, stratum, left_out).get("diverged")]
    plus = [g for g in diverged if signs[g] > 0]
    minus = [g for g in diverged if signs[g] < 0]
    if not plus and not minus:
        return None
    direction = "unknown" if plus and minus else "low" if plus else "high"
    return {"estimate": estimate, "direction": direction, "plus": plus, "minus": minus}


def bias_phrase(record: Mapping[str, Any]) -> str:
    """One ``left_out_bias`` record in words."""
    plus, minus = record["plus"], record["minus"]

    def who(groups: Sequence[str], sign: str) -> str:
        return f"{', '.join(groups)} (entering with {sign})"

    if record["direction"] == "low":
        return (
            f"the {record['estimate']} is biased low, a positive value understated: {who(plus, '+')} lost "
            "a diverged seed, so its mean is lower than it trained"
        )
    if record["direction"] == "high":
        return (
            f"the {record['estimate']} is biased high, a positive value overstated: {who(minus, '−')} lost "
            "a diverged seed, so its mean is lower than it trained"
        )
    return (
        f"the direction of the {record['estimate']}'s bias is unknown: {who(plus, '+')} and "
        f"{who(minus, '−')} both lost diverged seeds"
    )


def _stratum_of(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={level}" for key, level in (record.get("stratum") or {}).items())


def mark_left_out(
    gaps: Sequence[MutableMapping[str, Any]],
    interactions: Sequence[MutableMapping[str, Any]],
    factor_effects: Sequence[MutableMapping[str, Any]],
    recoveries: Sequence[MutableMapping[str, Any]],
    left_out: LeftOut,
) -> None:
    """Set every contrast's ``left_out`` (its groups that lost cells) and ``left_out_bias``
    (which way the lost diverged cells push it)."""
    for kind, records in (("gap", gaps), ("interaction", interactions), ("factor effect", factor_effects)):
        for record in records:
            stratum = _stratum_of(record)
            record["left_out"] = left_out_lines(record["groups"], stratum, left_out)
            found = bias(kind, dict(zip(record["groups"], record["coefficients"])), stratum, left_out)
            record["left_out_bias"] = [found] if found else []
    for record in recoveries:
        stratum = _stratum_of(record)
        record["left_out"] = left_out_lines(record["groups"], stratum, left_out)
        record["left_out_bias"] = recovery_bias(record, stratum, left_out)


def recovery_bias(record: Mapping[str, Any], stratum: str, left_out: LeftOut) -> list[dict[str, Any]]:
    """Which way lost diverged cells push a recovery's shares (module docstring):
    share of the gap = (L[n,O] - L[F,O]) / (L[n,O] - L[base,O]), share of the interaction =
    the same gain / interaction(n, O); each only where the report gives it."""
    target, fix, optim, base = record["base_norm"], record["fix"], record["optim"], record["baseline"]
    gain = {f"{target}/{optim}": 1.0, f"{fix}/{optim}": -1.0}
    out = []
    if record["share"] is not None:
        gap = {f"{target}/{optim}": 1.0, f"{base}/{optim}": -1.0}
        out.append(bias("share of the gap", ratio_signs(gain, gap, record["share"]), stratum, left_out))
    if record["interaction_share"] is not None:
        inter = {"/".join(k): c for k, c in interaction_terms(target, optim, base, record["reference_optim"]).items()}
        out.append(
            bias("share of the interaction", ratio_signs(gain, inter, record["interaction_share"]), stratum, left_out)
        )
    return [b for b in out if b is not None]
