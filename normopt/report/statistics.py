"""Statistics over a factorial experiment's cells, and the summary the report is made of.

Definitions (the docstrings below give the formulas):

* group = the included cells of one (variant, optimizer); variant = the norm, or
  ``norm[arm]`` for an arm; statistics over a group's cells (its seeds): mean, sample std.
  "norm" and "optimizer" stand for the report's compared and across axes
  (:mod:`normopt.report.axes`; any config keys), and with strata every statistic
  is computed within each stratum;
* gap(v, O) = mean(v, O) - mean(baseline, O), with a Welch t interval;
* interaction(v, O) = gap(v, O) - gap(v, reference), with a t interval from the four
  independent means (Welch-Satterthwaite degrees of freedom), plus a paired per-seed
  estimate (t with k - 1 degrees of freedom) where seeds match;
* recovered share of a fix F of norm n under O, of the gap: (gap(n, O) - gap(F, O)) / gap(n, O),
  and of the interaction: (gap(n, O) - gap(F, O)) / interaction(n, O), each with Fieller's
  interval for a ratio;
* the split of a difference over token-frequency buckets, head to tail
  (:mod:`normopt.report.tail_classes`).

The estimators are in :mod:`normopt.report.contrasts`. Every interval is a nominal two-sided
95% t interval (:mod:`normopt.report.student_t`); with one seed in a group there is no
interval, and the summary says so once. Welch's interval is an approximation, and its
coverage was checked by simulation only at 2 and 3 seeds per group under normal noise
(``benchmarks/interval_coverage.py --reps 20000``, seed 0): an interaction's covers 98.2% /
96.7% (2 / 3 seeds) with equal spreads, 95.7% / 94.1% when one of the four groups has 4x the
others' standard deviation and 91.8% / 93.4% at 10x (below 95%: one dominant group); the
paired interval 94.7% / 95.0%; Fieller's share interval 97.4% / 96.6% when bounded.

Many intervals (:mod:`normopt.report.multiplicity`): the interactions, the fixes' shares of
the interaction and the factor effects (:mod:`normopt.report.factor_effects`) form the main
family, Holm-adjusted, with Bonferroni simultaneous intervals; gaps and interactions carry an
equivalence test (TOST) at the report's margin; everything else is exploratory. Cells left
out are counted per group (``left_out_by_group``: ``flags`` counts cells per flag, ``by_flags``
counts each cell once under its combination of flags, ``cells`` names them); every contrast names
the groups of its own that lost cells (``left_out``) and, where a lost cell diverged, which way
that pushes the estimate given the sign with which the group enters it (``left_out_bias``;
:mod:`normopt.report.left_out`). Each linear contrast lists its ``groups`` with their
``coefficients``.

Cells that are missing, diverged, stopped early or cannot be placed (see
:func:`normopt.report.cell_assessment.assess_cell`) are listed with their flags and left out of
every statistic. ``build_summary`` gathers everything as plain data (summary.json), including
each cell's diagnostics numbers (``diagnostics_numbers``), which are descriptive only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from normopt.errors import UserError
from normopt.models.norms import NORMS, default_fixes
from normopt.optim.registry import OPTIMIZERS
from normopt.report.arms import assign_arms, fix_base
from normopt.report.axes import DEFAULT_EQUIVALENCE_MARGIN, SINGLE_COLUMN, ReportAxes, place_cells, stratum_of
from normopt.report.cell_assessment import (
    CONTEXT_MARGIN_NATS,
    DIVERGENCE_NATS,
    Assessment,
    assess_cell,
    learned_no_context,
)
from normopt.report.cell_reading import NORM_KEY, OPTIM_KEY, Cell, Diagnostics
from normopt.report.contrasts import (
    GroupStats,
    contrast,
    describe,
    paired_contrast,
    paired_ratio,
    ratio_of_contrasts,
)
from normopt.report.factor_effects import compute_factor_effects
from normopt.report.left_out import bias, by_flag_set, left_out_lines, ratio_signs
from normopt.report.multiplicity import EXPLORATORY, main_family, t_p_value, tost
from normopt.report.student_t import LEVEL
from normopt.report.tail_classes import tail_comparisons

INTERVAL_METHOD = (
    "95% t intervals: Welch-Satterthwaite degrees of freedom for independent means, "
    "k-1 for paired per-seed contrasts, Fieller's interval for recovered shares"
)
# the norm registry's fixes (derf_ema of derf) and its order
NORM_ORDER = NORMS  # the norm registry's order (plugins' norms after the built-ins)
OPTIM_ORDER = OPTIMIZERS  # the optimizer registry's order


# --------------------------------------------------------------------------- statistics


def diagnostics_numbers(diagnostics: Diagnostics) -> dict[str, Any]:
    """A cell's diagnostics in a few numbers (None where the cell logged no such record):

    * final_saturation: the mean saturation over the bounded norm layers at the last step that
      has one (``saturation_step``), with each layer's value in ``saturation_by_layer``;
    * final_spectral_norm: the mean spectral norm over the block matrices (MoE experts each
      once; embedding and output excluded) at the last spectral_norm record;
      spectral_norm_growth = that mean at the last record / at the first
      (``spectral_norm_steps`` = [first, last]); None with one record or a first mean of 0;
      spectral_norm_by_cell: the last record's mean per "type/group" of block matrix;
      embedding_spectral_norm, output_spectral_norm: those two matrices' own, at the last record;
    * tail_bucket_loss: the last tail_tokens record's loss per token-frequency bucket (nats,
      head -> tail, None = empty bucket), at ``tail_tokens_step``, with its token shares and
      vocabulary sizes;
    * update_isotropy, weight_isotropy: the last isotropy record's normalised singular-value
      entropy (1 = isotropic, 0 = rank one) of the applied updates and of the weights, per
      "type/group" cell (mean over the cell's matrices), at ``isotropy_step``; their
      effective ranks in update_effective_rank, weight_effective_rank."""
    saturation, spectral, tail = diagnostics.saturation, diagnostics.spectral_norm, diagnostics.tail_tokens
    iso, groups = diagnostics.isotropy, diagnostics.spectral_groups
    growth = None
    if len(spectral) >= 2 and spectral[0][1] != 0:
        growth = spectral[-1][1] / spectral[0][1]
    return {
        "final_saturation": saturation[-1][1] if saturation else None,
        "saturation_step": saturation[-1][0] if saturation else None,
        "saturation_by_layer": dict(diagnostics.saturation_layers),
        "final_spectral_norm": spectral[-1][1] if spectral else None,
        "spectral_norm_growth": growth,
        "spectral_norm_steps": [spectral[0][0], spectral[-1][0]] if spectral else None,
        "spectral_norm_by_cell": dict(groups["by_cell"]) if groups else None,
        "embedding_spectral_norm": groups["embedding"] if groups else None,
        "output_spectral_norm": groups["output"] if groups else None,
        "tail_tokens_step": tail.step if tail else None,
        "tail_bucket_loss": list(tail.bucket_loss) if tail else None,
        "tail_bucket_token_share": list(tail.bucket_token_share) if tail else None,
        "tail_bucket_vocab_size": list(tail.bucket_vocab_size) if tail else None,
        "isotropy_step": iso.step if iso else None,
        "update_isotropy": dict(iso.update_entropy) if iso else None,
        "weight_isotropy": dict(iso.weight_entropy) if iso else None,
        "update_effective_rank": dict(iso.update_erank) if iso else None,
        "weight_effective_rank": dict(iso.weight_erank) if iso else None,
        "partial_last_line": diagnostics.partial_last_line,
    }


# --------------------------------------------------------------------------- the summary


def _order(values: Iterable[str], canonical: Sequence[str], first: str | None) -> list[str]:
    rank = {name: i for i, name in enumerate(canonical)}
    return sorted(set(values), key=lambda v: (v != first, rank.get(v, len(rank)), v))


def _variant_order(cells: Sequence[Cell], baseline: str, canonical: Sequence[str]) -> list[str]:
    """Baseline first, then the compared axis's levels in ``canonical`` order (others by name),
    each level's arms after it."""
    rank = {name: i for i, name in enumerate(canonical)}
    keys = {
        (c.norm != baseline, rank.get(c.norm, len(rank)), c.norm, c.arm is not None, c.arm or ""): c.variant
        for c in cells
        if c.norm is not None and c.optim is not None
    }
    return [keys[k] for k in sorted(keys)]


def _check_factor_arms(factors: Mapping[str, Sequence[str]], cells: Sequence[Cell]) -> None:
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


Groups = Mapping[tuple[str, str], GroupStats]  # (variant, optimizer) -> its included cells
Stratum = tuple[tuple[str, "str | None"], ...]  # (key, level) of each stratum axis; () without strata


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
    at ``margin`` (:mod:`normopt.report.multiplicity`)."""
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


def _interaction_terms(variant: str, optim: str, base: str, reference: str) -> dict[tuple[str, str], float]:
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
            coefficients = _interaction_terms(variant, optim, base, reference)
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
            inter = {} if reference is None else _interaction_terms(target, optim, base, reference)
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


def _canonical_orders(axes: ReportAxes) -> tuple[Sequence[str], Sequence[str]]:
    """The level orders of the compared and the across axis: the spec's, else the registry's
    norms and the known optimizers."""
    compare = axes.order.get(axes.compare) or (NORM_ORDER if axes.compare == NORM_KEY else ())
    across = axes.order.get(axes.across or "") or (OPTIM_ORDER if axes.across == OPTIM_KEY else ())
    return compare, across


def _stratum_order(strata: Sequence[Stratum], axes: ReportAxes) -> list[Stratum]:
    """The strata in the order of the spec's levels (a size ladder reads smallest first), levels
    the spec does not list after them in the order found."""

    def rank(stratum: Stratum) -> tuple[int, ...]:
        levels = [axes.order.get(key, ()) for key, _ in stratum]
        return tuple(known.index(level) if level in known else len(known) for known, (_, level) in zip(levels, stratum))

    return sorted(strata, key=rank)  # stable: the order found among equal ranks


def _stratum_label(stratum: Stratum) -> str:
    return ", ".join(f"{key}={level}" for key, level in stratum)


def _prefixed(notes: Sequence[str], stratum: Stratum) -> list[str]:
    return [f"[{_stratum_label(stratum)}] {note}" for note in notes] if stratum else list(notes)


def build_summary(
    cells: Sequence[Cell],
    *,
    axes: ReportAxes | None = None,
    baseline_norm: str | None = None,
    reference_optim: str | None = None,
    fixes: Mapping[str, str] | None = None,
    divergence_nats: float = DIVERGENCE_NATS,
) -> dict[str, Any]:
    """Everything the report shows, as plain data (the content of summary.json): cells with
    their flags, groups (included cells only), gaps, interactions, recoveries and notes.

    ``axes`` (default: norm x optimizer) says which config keys are compared
    (:mod:`normopt.report.axes`); ``baseline_norm`` / ``reference_optim`` override
    its baseline and reference levels; ``fixes`` its fixes (default: the axes', else the norm
    registry's when the compared axis is the norm). With strata every statistic is computed per
    stratum, and each record names its ``stratum``."""
    axes = axes or ReportAxes()
    if baseline_norm is not None:
        axes = replace(axes, baseline=baseline_norm)
    if reference_optim is not None:
        axes = replace(axes, reference=reference_optim)
    if fixes is None:
        fixes = axes.fixes if axes.fixes is not None else (default_fixes() if axes.compare == NORM_KEY else {})
    fixes = dict(fixes)
    base, reference = axes.baseline, axes.reference if axes.across is not None else None
    compare_order, across_order = _canonical_orders(axes)

    placed = place_cells(cells, axes)
    strata = _stratum_order(list(dict.fromkeys(stratum_of(c, axes) for c in placed)), axes)
    notes: list[str] = []
    by_name: dict[str, Cell] = {}
    for stratum in strata:
        members, arm_notes = assign_arms(
            [c for c in placed if stratum_of(c, axes) == stratum], base, axes.coordinate_keys
        )
        notes += _prefixed(arm_notes, stratum)
        by_name.update({c.name: c for c in members})
    cells = [by_name[c.name] for c in placed]
    assessed = [(cell, assess_cell(cell, divergence_nats)) for cell in cells]
    variants = _variant_order(cells, base, compare_order)
    optims = _order((c.optim for c in cells if c.optim is not None), across_order, reference or SINGLE_COLUMN)
    norm_of = {c.variant: (c.norm, c.arm) for c in cells if c.norm is not None}
    fixes_of = {v: t for v in variants if (t := fix_base(v, *norm_of[v], fixes, base)) is not None}
    _check_factor_arms(axes.factors, cells)
    compare_noun, across_noun = axes.noun(axes.compare), axes.noun(axes.across)

    if base not in variants:
        notes.append(
            f"no {base} cells: no gaps, interactions or recoveries "
            f"({compare_noun} levels found: {', '.join(sorted({c.norm for c in cells if c.norm}))})"
        )
    if axes.across is not None and reference not in optims:
        notes.append(
            f"no {reference} cells: no interactions or recoveries ({across_noun} levels found: {', '.join(optims)})"
        )
    for cell, assessment in assessed:
        if assessment.flags:
            notes.append(f"{cell.name} left out: {'; '.join(assessment.reasons)}")
        if cell.metrics is not None and cell.metrics.partial_last_line:
            notes.append(f"{cell.name}: skipped an unterminated last line of metrics.jsonl")
        if cell.diagnostics is not None and cell.diagnostics.partial_last_line:
            notes.append(f"{cell.name}: skipped an unterminated last line of diagnostics.jsonl")

    margin = axes.equivalence_margin
    all_groups: dict[tuple[str, ...], GroupStats] = {}
    group_records, gaps, interactions, recoveries, tail, factor_effects = [], [], [], [], [], []
    share_groups: list[tuple[dict[str, Any], Groups]] = []  # each recovery with its stratum's groups
    left_out_by_group: dict[tuple[str, str, str], dict[str, list[str]]] = {}  # (stratum, v, O) -> flag -> cells
    for stratum in strata:
        members = [(c, a) for c, a in assessed if stratum_of(c, axes) == stratum]
        groups: dict[tuple[str, str], GroupStats] = {}
        for variant in variants:
            for optim in optims:
                in_group = [(c, a) for c, a in members if c.variant == variant and c.optim == optim]
                if in_group:
                    kept = [(c, a) for c, a in in_group if not a.flags]
                    for c, a in in_group:
                        for flag in a.flags:
                            left_out_by_group.setdefault((_stratum_label(stratum), variant, optim), {}).setdefault(
                                flag, []
                            ).append(c.name)
                    groups[variant, optim] = describe([a.final_eval_loss for _, a in kept], [c.seed for c, _ in kept])
        tag = {"stratum": dict(stratum)} if axes.strata else {}
        label = _stratum_label(stratum)
        all_groups.update({((label,) if label else ()) + key: g for key, g in groups.items()})
        stratum_notes: list[str] = []
        group_records += [
            {
                "variant": v,
                "norm": norm_of[v][0],
                "arm": norm_of[v][1],
                "optim": o,
                "n": g.n,
                "mean": g.mean,
                "std": g.std,
                "sem": g.sem,
                "seeds": list(g.by_seed),
                "cells": [c.name for c, a in members if c.variant == v and c.optim == o and not a.flags],
                "left_out": {flag: len(names) for flag, names in left_out_by_group.get((label, v, o), {}).items()},
                **tag,
            }
            for (v, o), g in groups.items()
        ]
        gaps += [{**g, **tag} for g in compute_gaps(groups, variants, optims, base, stratum_notes, margin)]
        if reference is not None:
            interactions += [
                {**i, **tag}
                for i in compute_interactions(groups, variants, optims, base, reference, stratum_notes, margin)
            ]
        for r in compute_recoveries(groups, fixes_of, optims, base, reference, stratum_notes):
            recoveries.append({**r, **tag})
            share_groups.append((recoveries[-1], groups))
        factor_effects += [
            {**f, **tag} for f in compute_factor_effects(groups, axes.factors, optims, reference, margin, stratum_notes)
        ]
        tail += [{**t, **tag} for t in tail_comparisons(members, variants, optims, base, reference, stratum_notes)]
        notes += _prefixed(stratum_notes, stratum)

    family = main_family(gaps, interactions, share_groups, factor_effects, single=axes.across is None)
    for kind, records in (("gap", gaps), ("interaction", interactions), ("factor effect", factor_effects)):
        for record in records:
            label = _stratum_label(tuple((record.get("stratum") or {}).items()))
            record["left_out"] = left_out_lines(record["groups"], label, left_out_by_group)
            found = bias(kind, dict(zip(record["groups"], record["coefficients"])), label, left_out_by_group)
            record["left_out_bias"] = [found] if found else []
    for record in recoveries:
        label = _stratum_label(tuple((record.get("stratum") or {}).items()))
        record["left_out"] = left_out_lines(record["groups"], label, left_out_by_group)
        record["left_out_bias"] = _recovery_bias(record, label, left_out_by_group)
    if (note := one_seed_note(all_groups)) is not None:
        notes.insert(0, note)
    flat = [
        c.name
        for c, a in assessed
        if c.metrics is not None and learned_no_context(a.final_eval_loss, c.metrics.unigram_entropy)
    ]
    if flat:
        notes.insert(
            0,
            f"{len(flat)} of {len(assessed)} cells end less than {CONTEXT_MARGIN_NATS} nats below the "
            f"unigram entropy of their training tokens, i.e. they learned almost no context "
            f"({', '.join(flat)}): gaps and interactions involving them measure noise more than "
            f"the {compare_noun} or the {across_noun or compare_noun}.",
        )
    return {
        "settings": {
            "baseline_norm": base,
            "reference_optim": reference,
            "fixes": fixes,
            "axes": axes.to_json(),
            "compare_noun": compare_noun,
            "across_noun": across_noun,
            "divergence_nats": divergence_nats,
            "interval": INTERVAL_METHOD,
            "level": LEVEL,
            "equivalence_margin": margin,
        },
        "variants": variants,
        "optims": optims,
        "cells": [
            _cell_record(c, a, fixes_of.get(c.variant) if c.norm else None, _stratum_label(stratum_of(c, axes)))
            for c, a in assessed
        ],
        "groups": group_records,
        "gaps": gaps,
        "interactions": interactions,
        "recoveries": recoveries,
        "factor_effects": factor_effects,
        "family": family,
        "left_out_by_group": [
            {
                "stratum": s,
                "variant": v,
                "optim": o,
                "flags": {f: len(n) for f, n in flags.items()},
                "by_flags": by_flag_set(flags),
                "cells": sorted({n for names in flags.values() for n in names}),
            }
            for (s, v, o), flags in left_out_by_group.items()
        ],
        "tail_classes": tail,
        "notes": notes,
    }


def _recovery_bias(
    record: Mapping[str, Any], stratum: str, left_out: Mapping[tuple[str, str, str], Mapping[str, list[str]]]
) -> list[dict[str, Any]]:
    """Which way lost diverged cells push a recovery's shares (:mod:`normopt.report.left_out`):
    share of the gap = (L[n,O] - L[F,O]) / (L[n,O] - L[base,O]), share of the interaction =
    the same gain / interaction(n, O); each only where the report gives it."""
    target, fix, optim, base = record["base_norm"], record["fix"], record["optim"], record["baseline"]
    gain = {f"{target}/{optim}": 1.0, f"{fix}/{optim}": -1.0}
    out = []
    if record["share"] is not None:
        gap = {f"{target}/{optim}": 1.0, f"{base}/{optim}": -1.0}
        out.append(bias("share of the gap", ratio_signs(gain, gap, record["share"]), stratum, left_out))
    if record["interaction_share"] is not None:
        inter = {"/".join(k): c for k, c in _interaction_terms(target, optim, base, record["reference_optim"]).items()}
        out.append(
            bias("share of the interaction", ratio_signs(gain, inter, record["interaction_share"]), stratum, left_out)
        )
    return [b for b in out if b is not None]


def _cell_record(cell: Cell, assessment: Assessment, fix_of: str | None, stratum: str) -> dict[str, Any]:
    metrics = cell.metrics
    return {
        **({"stratum": stratum} if stratum else {}),
        "name": cell.name,
        "path": str(cell.path),
        "norm": cell.norm,
        "arm": cell.arm,
        "variant": cell.variant if cell.norm is not None else None,
        "optim": cell.optim,
        "seed": cell.seed,
        "fix_of": fix_of,
        "steps": cell.steps,
        "last_step": metrics.last_step if metrics else None,
        "final_eval_loss": assessment.final_eval_loss,
        "unigram_entropy": metrics.unigram_entropy if metrics else None,
        "learned_no_context": learned_no_context(
            assessment.final_eval_loss, metrics.unigram_entropy if metrics else None
        ),
        "flags": list(assessment.flags),
        "reasons": list(assessment.reasons),
        "included": not assessment.flags,
        "partial_last_line": bool(metrics and metrics.partial_last_line),
        "diagnostics": None if cell.diagnostics is None else diagnostics_numbers(cell.diagnostics),
        "cost": cell.cost,
    }
