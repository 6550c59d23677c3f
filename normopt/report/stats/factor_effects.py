"""Factor effects: how much of an interaction one switched setting carries.

A confound ablation (``configs/factorial/confounds_cpu.yaml``) runs pairs of variants that
differ in exactly one factor (the embedding scale, the alpha init per location, the
nonlinearity). Its report names them in ``report.factors``: ``name: [without, with]``. For
each factor and each level O of the across axis other than the reference,

    effect(O) = (L[with, O] - L[with, ref]) - (L[without, O] - L[without, ref])
              = interaction(with, O) - interaction(without, O)

(the baseline's terms cancel): how much switching the factor on changes the across axis's
effect, e.g. Muon's advantage over AdamW. A 4-group linear contrast of independent means,
with a Welch t interval (Welch-Satterthwaite degrees of freedom), its paired per-seed
estimate where seeds match, and an equivalence test at the report's margin
(:mod:`normopt.report.stats.multiplicity`). The change of the gap under O alone,
L[with, O] - L[without, O], is given beside it (exploratory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normopt.errors import UserError
from normopt.report.cells.cell_reading import Cell
from normopt.report.stats.contrasts import GroupStats, contrast, paired_contrast
from normopt.report.stats.multiplicity import t_p_value, tost


def factor_terms(without: str, with_: str, optim: str, reference: str) -> dict[tuple[str, str], float]:
    """The coefficients of (L[with,O] - L[with,ref]) - (L[without,O] - L[without,ref])."""
    return {(with_, optim): 1.0, (with_, reference): -1.0, (without, optim): -1.0, (without, reference): 1.0}


def compute_factor_effects(
    groups: Mapping[tuple[str, str], GroupStats],
    factors: Mapping[str, Sequence[str]],
    optims: Sequence[str],
    reference: str | None,
    margin: float,
    notes: list[str],
) -> list[dict[str, Any]]:
    """One record per (factor, O != reference) with the effect (module docstring); a note for
    each factor whose cells are missing."""
    items: list[dict[str, Any]] = []
    if reference is None:
        if factors:
            notes.append("factor effects need an across axis with a reference level: none computed")
        return items
    for name, (without, with_) in factors.items():
        for optim in optims:
            if optim == reference:
                continue
            coefficients = factor_terms(without, with_, optim, reference)
            empty = ["/".join(k) for k in coefficients if k not in groups or groups[k].n == 0]
            if empty:
                notes.append(
                    f"factor {name} ({without} -> {with_}) under {optim}: not computable "
                    f"(no usable cells in {', '.join(empty)})"
                )
                continue
            terms = [(c, groups[k]) for k, c in coefficients.items()]
            c = contrast(terms)
            gap_change = contrast([(1.0, groups[with_, optim]), (-1.0, groups[without, optim])])
            items.append(
                {
                    "factor": name,
                    "without": without,
                    "with": with_,
                    "optim": optim,
                    "reference_optim": reference,
                    "value": c.value,
                    "se": c.se,
                    "df": c.df,
                    "ci95": c.ci95,
                    "p": t_p_value(c.value, c.se, c.df),
                    "n": [groups[k].n for k in coefficients],
                    "groups": ["/".join(k) for k in coefficients],
                    "coefficients": list(coefficients.values()),
                    "equivalence": tost(c.value, c.se, c.df, margin),
                    "paired": paired_contrast(terms),
                    "gap_change": {"value": gap_change.value, "ci95": gap_change.ci95, "family": "exploratory"},
                    "method": "independent means, Welch t",
                }
            )
    return items


def check_factor_arms(factors: Mapping[str, Sequence[str]], cells: Sequence[Cell]) -> None:
    """A factor's ``level[arm]`` must name an arm some cell has (a level is checked against the
    spec's levels when the axes are read); a misspelt arm is refused, not reported as missing
    cells."""
    arms = sorted({c.arm for c in cells if c.arm is not None})
    for name, pair in factors.items():
        for variant in pair:
            if "[" in variant and (arm := variant.split("[", 1)[1].removesuffix("]")) not in arms:
                raise UserError(
                    f"report.factors.{name}: {variant!r} names an arm {arm!r} that no cell has "
                    f"(arms: {', '.join(arms) or 'none'})"
                )
