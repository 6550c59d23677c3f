"""The gaps, interactions and fix recoveries of one stratum's groups (the definitions:
:mod:`normopt.report.stats.summary`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.cells.axes import DEFAULT_EQUIVALENCE_MARGIN
from normopt.report.stats.contrasts import GroupStats, contrast, paired_contrast, paired_ratio, ratio_of_contrasts
from normopt.report.stats.multiplicity import EXPLORATORY, t_p_value, tost

Groups = Mapping[tuple[str, str], GroupStats]  # (variant, optimizer) -> its included cells


def _usable(groups: Groups, keys: Sequence[tuple[str, str]], label: str, notes: list[str]) -> bool:
    """True when every group in ``keys`` has an included cell; else a note says which lack one."""
    empty = ["/".join(k) for k in keys if k not in groups or groups[k].n == 0]
    if empty:
        notes.append(f"{label}: not computable (no usable cells in {', '.join(empty)})")
    return not empty


def one_seed_note(groups: Groups) -> str | None:
    """One sentence for the groups whose variance is unknown (n = 1), or None."""
    single = ["/".join(k) for k, g in groups.items() if g.n == 1]
    if not single:
        return None
    if len(single) == sum(1 for g in groups.values() if g.n > 0):
        return (
            "1 seed per cell: every gap, interaction and share below is an estimate without "
            "an interval (an interval needs at least 2 seeds per group)."
        )
    return (
        f"1 seed in {', '.join(single)}: contrasts involving these groups are estimates without "
        f"an interval (an interval needs at least 2 seeds per group)."
    )


def compute_gaps(
    groups: Groups,
    variants: Sequence[str],
    optims: Sequence[str],
    base: str,
    notes: list[str],
    margin: float = DEFAULT_EQUIVALENCE_MARGIN,
) -> list[dict[str, Any]]:
    """gap(v, O) = mean(v, O) - mean(base, O), se = sqrt(s_v^2/n_v + s_b^2/n_b), 95% t interval
    with Welch-Satterthwaite degrees of freedom, its two-sided p-value and an equivalence test
    at ``margin`` (:mod:`normopt.report.stats.multiplicity`)."""
    gaps = []
    for variant in variants:
        for optim in optims:
            if variant == base or (variant, optim) not in groups:
                continue
            keys = [(variant, optim), (base, optim)]
            if not _usable(groups, keys, f"gap {variant} vs {base} under {optim}", notes):
                continue
            c = contrast([(1.0, groups[keys[0]]), (-1.0, groups[keys[1]])])
            gaps.append(
                {
                    "variant": variant,
                    "optim": optim,
                    "baseline": base,
                    "value": c.value,
                    "se": c.se,
                    "df": c.df,
                    "ci95": c.ci95,
                    "n": [groups[k].n for k in keys],
                    "p": t_p_value(c.value, c.se, c.df),
                    "equivalence": tost(c.value, c.se, c.df, margin),
                    "groups": ["/".join(k) for k in keys],
                    "coefficients": [1.0, -1.0],
                    "family": EXPLORATORY,
                }
            )
    return gaps


def interaction_terms(variant: str, optim: str, base: str, reference: str) -> dict[tuple[str, str], float]:
    """The coefficients of L[v,O] - L[base,O] - L[v,ref] + L[base,ref]."""
    return {(variant, optim): 1.0, (base, optim): -1.0, (variant, reference): -1.0, (base, reference): 1.0}


def compute_interactions(
    groups: Groups,
    variants: Sequence[str],
    optims: Sequence[str],
    base: str,
    reference: str,
    notes: list[str],
    margin: float = DEFAULT_EQUIVALENCE_MARGIN,
) -> list[dict[str, Any]]:
    """interaction(v, O) = (L[v,O] - L[base,O]) - (L[v,ref] - L[base,ref]) for O != ref, with a
    95% t interval from the four independent means (Welch-Satterthwaite degrees of freedom),
    its two-sided p-value, an equivalence test at ``margin`` and the paired per-seed estimate
    (t, k - 1 degrees of freedom)."""
    items = []
    for variant in variants:
        for optim in optims:
            if variant == base or optim == reference or (variant, optim) not in groups:
                continue
            coefficients = interaction_terms(variant, optim, base, reference)
            if not _usable(groups, list(coefficients), f"interaction {variant} x {optim}", notes):
                continue
            terms = [(c, groups[k]) for k, c in coefficients.items()]
            c = contrast(terms)
            items.append(
                {
                    "variant": variant,
                    "optim": optim,
                    "reference_optim": reference,
                    "value": c.value,
                    "se": c.se,
                    "df": c.df,
                    "ci95": c.ci95,
                    "n": [groups[k].n for k in coefficients],
                    "p": t_p_value(c.value, c.se, c.df),
                    "equivalence": tost(c.value, c.se, c.df, margin),
                    "groups": ["/".join(k) for k in coefficients],
                    "coefficients": list(coefficients.values()),
                    "method": "independent means, Welch t",
                    "paired": paired_contrast(terms),
                }
            )
    return items


def compute_recoveries(
    groups: Groups,
    fixes_of: Mapping[str, str],
    optims: Sequence[str],
    base: str,
    reference: str | None,
    notes: list[str],
) -> list[dict[str, Any]]:
    """For each fix F of norm n (``fixes_of[F] = n``) and optimizer O != ref (every column when
    there is no reference), the fix's gain L[n,O] - L[F,O] as a share of

    * n's gap under O:                  share = (L[n,O] - L[F,O]) / (L[n,O] - L[base,O]);
    * n's interaction with O (if n has cells under ref):
      interaction_share = (L[n,O] - L[F,O]) / ((L[n,O] - L[base,O]) - (L[n,ref] - L[base,ref])),

    each with Fieller's 95% interval over independent means and, where seeds match, over
    per-seed paired contrasts (``paired`` / ``interaction_paired``). A share needs something to
    recover: where n is no worse than the baseline (gap <= 0), or has no interaction penalty,
    that share is not reported and a note says why (a share of a negative gap would read as a
    recovery when the fix moved away from the baseline)."""
    items = []
    for fix, target in fixes_of.items():
        for optim in optims:
            if optim == reference or (fix, optim) not in groups:
                continue
            keys = [(target, optim), (fix, optim), (base, optim)]
            label = f"recovery of {target}'s gap by {fix} under {optim}"
            if not _usable(groups, keys, label, notes):
                continue
            gain = {(target, optim): 1.0, (fix, optim): -1.0}
            gap = {(target, optim): 1.0, (base, optim): -1.0}
            share = ratio_of_contrasts(gain, gap, groups)
            gap_n = contrast([(1.0, groups[keys[0]]), (-1.0, groups[keys[2]])])
            gain_c = contrast([(1.0, groups[keys[0]]), (-1.0, groups[keys[1]])])
            if gap_n.value <= 0:
                notes.append(
                    f"{label}: {target} has no gap to recover ({gap_n.value:+.4f} nats: it is no worse "
                    f"than {base}), so no share of it is reported"
                )
                share = {"value": None, "ci95": None, "df": None, "reason": "no gap to recover"}
            item = {
                "fix": fix,
                "base_norm": target,
                "optim": optim,
                "baseline": base,
                "reference_optim": reference,
                "gap_base": gap_n.value,
                "gap_fix": groups[keys[1]].mean - groups[keys[2]].mean,
                "share": share["value"],
                "ci95": share["ci95"],
                "df": share["df"],
                "ci_note": share["reason"],
                "paired": None if share["value"] is None else paired_ratio(gain, gap, groups),
                "interaction": None,
                "interaction_share": None,
                "interaction_ci95": None,
                "interaction_ci_note": None,
                "interaction_paired": None,
                "gain": gain_c.value,
                "gain_ci95": gain_c.ci95,
                "p": t_p_value(gain_c.value, gain_c.se, gain_c.df),
                "groups": ["/".join(k) for k in keys],
                "method": "Fieller's interval (t, Welch-Satterthwaite df; paired: k-1 df)",
            }
            inter = {} if reference is None else interaction_terms(target, optim, base, reference)
            item["groups"] = list(dict.fromkeys(item["groups"] + ["/".join(k) for k in inter]))
            interaction = (
                sum(c * groups[k].mean for k, c in inter.items())
                if inter and all(k in groups and groups[k].n for k in inter)
                else None
            )
            if interaction is not None and interaction <= 0:
                # no penalty to recover: a share of a negative interaction would read as a recovery
                item["interaction"] = interaction
                notes.append(
                    f"{label}: {target} has no interaction penalty under {optim} "
                    f"({interaction:+.4f} nats), so no share of it is reported"
                )
            elif interaction is not None:
                ratio = ratio_of_contrasts(gain, inter, groups)
                item.update(
                    interaction=interaction,
                    interaction_share=ratio["value"],
                    interaction_ci95=ratio["ci95"],
                    interaction_ci_note=ratio["reason"],
                    interaction_paired=paired_ratio(gain, inter, groups),
                )
            items.append(item)
    return items
