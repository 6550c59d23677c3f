"""Statistics over a factorial experiment's cells, and the summary the report is made of.

Definitions (the docstrings below give the formulas):

* group = the included cells of one (variant, optimizer); variant = the norm, or
  ``norm[arm]`` for an arm; statistics over a group's cells (its seeds): mean, sample std.
  "norm" and "optimizer" stand for the report's compared and across axes
  (:mod:`normopt.report.cells.axes`; any config keys), and with strata every statistic
  is computed within each stratum;
* gap(v, O) = mean(v, O) - mean(baseline, O), with a Welch t interval;
* interaction(v, O) = gap(v, O) - gap(v, reference), with a t interval from the four
  independent means (Welch-Satterthwaite degrees of freedom), plus a paired per-seed
  estimate (t with k - 1 degrees of freedom) where seeds match;
* recovered share of a fix F of norm n under O, of the gap: (gap(n, O) - gap(F, O)) / gap(n, O),
  and of the interaction: (gap(n, O) - gap(F, O)) / interaction(n, O), each with Fieller's
  interval for a ratio;
* the split of a difference over token-frequency buckets, head to tail
  (:mod:`normopt.report.stats.tail_classes`).

The estimators are in :mod:`normopt.report.stats.contrasts`. Every interval is a nominal two-sided
95% t interval (:mod:`normopt.report.stats.student_t`); with one seed in a group there is no
interval, and the summary says so once. Welch's interval is an approximation, and its
coverage was checked by simulation only at 2 and 3 seeds per group under normal noise
(``benchmarks/interval_coverage.py --reps 20000``, seed 0): an interaction's covers 98.2% /
96.7% (2 / 3 seeds) with equal spreads, 95.7% / 94.1% when one of the four groups has 4x the
others' standard deviation and 91.8% / 93.4% at 10x (below 95%: one dominant group); the
paired interval 94.7% / 95.0%; Fieller's share interval 97.4% / 96.6% when bounded.

Many intervals (:mod:`normopt.report.stats.multiplicity`): the interactions, the fixes' shares of
the interaction and the factor effects (:mod:`normopt.report.stats.factor_effects`) form the main
family, Holm-adjusted, with Bonferroni simultaneous intervals; gaps and interactions carry an
equivalence test (TOST) at the report's margin; everything else is exploratory. Cells left
out are counted per group (``left_out_by_group``: ``flags`` counts cells per flag, ``by_flags``
counts each cell once under its combination of flags, ``cells`` names them); every contrast names
the groups of its own that lost cells (``left_out``) and, where a lost cell diverged, which way
that pushes the estimate given the sign with which the group enters it (``left_out_bias``;
:mod:`normopt.report.stats.left_out`). Each linear contrast lists its ``groups`` with their
``coefficients``.

Cells that are missing, diverged, stopped early or cannot be placed (see
:func:`normopt.report.cells.cell_assessment.assess_cell`) are listed with their flags and left out of
every statistic. ``build_summary`` gathers everything as plain data (summary.json), including
each cell's diagnostics numbers (``diagnostics_numbers``), which are descriptive only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from normopt.models.norms import default_fixes
from normopt.report.cells.arms import assign_arms, fix_base
from normopt.report.cells.axes import SINGLE_COLUMN, ReportAxes, canonical_levels, place_cells, stratum_of
from normopt.report.cells.cell_assessment import (
    CONTEXT_MARGIN_NATS,
    DIVERGENCE_NATS,
    Assessment,
    assess_cell,
    learned_no_context,
)
from normopt.report.cells.cell_reading import NORM_KEY, Cell
from normopt.report.stats.cell_records import cell_record
from normopt.report.stats.contrasts import GroupStats, describe
from normopt.report.stats.diagnostic_tables import diagnostic_tables
from normopt.report.stats.estimates import (
    Groups,
    compute_gaps,
    compute_interactions,
    compute_recoveries,
    one_seed_note,
)
from normopt.report.stats.factor_effects import check_factor_arms, compute_factor_effects
from normopt.report.stats.left_out import by_flag_set, mark_left_out
from normopt.report.stats.multiplicity import main_family
from normopt.report.stats.student_t import LEVEL
from normopt.report.stats.tail_classes import tail_comparisons

INTERVAL_METHOD = (
    "95% t intervals: Welch-Satterthwaite degrees of freedom for independent means, "
    "k-1 for paired per-seed contrasts, Fieller's interval for recovered shares"
)
# the norm registry's fixes (derf_ema of derf) and its order


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


Stratum = tuple[tuple[str, "str | None"], ...]  # (key, level) of each stratum axis; () without strata
LostCells = dict[tuple[str, str, str], dict[str, list[str]]]  # (stratum, variant, optim) -> flag -> cells


def _canonical_orders(axes: ReportAxes) -> tuple[Sequence[str], Sequence[str]]:
    """The level orders of the compared and the across axis: the spec's, else the registry's
    norms and the known optimizers."""
    compare = axes.order.get(axes.compare) or canonical_levels(axes.compare)
    across = axes.order.get(axes.across or "") or canonical_levels(axes.across)
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


@dataclass(frozen=True)
class _Design:
    """What every stratum's statistics are computed over: the axes, the levels in report order,
    the baseline and reference levels, each variant's level and arm, and what each fix fixes."""

    axes: ReportAxes
    base: str
    reference: str | None
    variants: list[str]
    optims: list[str]
    norm_of: dict[str, tuple[str | None, str | None]]
    fixes_of: dict[str, str]


@dataclass
class _Estimates:
    """The records every stratum adds to, in stratum order, and the cells each group lost."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    interactions: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    factor_effects: list[dict[str, Any]] = field(default_factory=list)
    tail: list[dict[str, Any]] = field(default_factory=list)
    share_groups: list[tuple[dict[str, Any], Groups]] = field(default_factory=list)  # each recovery, its groups
    all_groups: dict[tuple[str, ...], GroupStats] = field(default_factory=dict)
    left_out_by_group: LostCells = field(default_factory=dict)  # (stratum, v, O) -> flag -> cells
    notes: list[str] = field(default_factory=list)


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
    (:mod:`normopt.report.cells.axes`); ``baseline_norm`` / ``reference_optim`` override
    its baseline and reference levels; ``fixes`` its fixes (default: the axes', else the norm
    registry's when the compared axis is the norm). With strata every statistic is computed per
    stratum, and each record names its ``stratum``."""
    axes = _resolved_axes(axes or ReportAxes(), baseline_norm, reference_optim)
    fixes = _resolved_fixes(axes, fixes)
    cells, strata, notes = _placed_cells(cells, axes)
    assessed = [(cell, assess_cell(cell, divergence_nats)) for cell in cells]
    design = _design(cells, axes, fixes)
    notes += _missing_level_notes(cells, design) + _cell_notes(assessed)
    estimates = _Estimates()
    for stratum in strata:
        _estimate_stratum(estimates, stratum, [(c, a) for c, a in assessed if stratum_of(c, axes) == stratum], design)
    family = main_family(
        estimates.gaps,
        estimates.interactions,
        estimates.share_groups,
        estimates.factor_effects,
        single=axes.across is None,
    )
    mark_left_out(
        estimates.gaps,
        estimates.interactions,
        estimates.factor_effects,
        estimates.recoveries,
        estimates.left_out_by_group,
    )
    return {
        "settings": _settings(design, fixes, divergence_nats),
        "variants": design.variants,
        "optims": design.optims,
        "cells": _cell_records(assessed, design),
        "groups": estimates.groups,
        "gaps": estimates.gaps,
        "interactions": estimates.interactions,
        "recoveries": estimates.recoveries,
        "factor_effects": estimates.factor_effects,
        "family": family,
        "left_out_by_group": _left_out_records(estimates.left_out_by_group),
        "tail_classes": estimates.tail,
        "notes": _lead_notes(assessed, estimates.all_groups, axes) + notes + estimates.notes,
        **_diagnostic_tables([cell for cell, _ in assessed]),
    }


def _diagnostic_tables(cells) -> dict[str, Any]:
    """``diagnostic_tables``: the rows of diagnostics without a section of their own, if any."""
    tables = diagnostic_tables(cells)
    return {"diagnostic_tables": tables} if tables else {}


def _resolved_axes(axes: ReportAxes, baseline: str | None, reference: str | None) -> ReportAxes:
    """The axes with the baseline and reference levels given in their place."""
    if baseline is not None:
        axes = replace(axes, baseline=baseline)
    if reference is not None:
        axes = replace(axes, reference=reference)
    return axes


def _resolved_fixes(axes: ReportAxes, fixes: Mapping[str, str] | None) -> dict[str, str]:
    """The fixes given, else the axes', else the norm registry's when the compared axis is the norm."""
    if fixes is None:
        fixes = axes.fixes if axes.fixes is not None else (default_fixes() if axes.compare == NORM_KEY else {})
    return dict(fixes)


def _placed_cells(cells: Sequence[Cell], axes: ReportAxes) -> tuple[list[Cell], list[Stratum], list[str]]:
    """The cells placed on the axes with their arms assigned within each stratum (in the cells'
    order), the strata in order, and the notes the arms gave."""
    base = axes.baseline
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
    return [by_name[c.name] for c in placed], strata, notes


def _design(cells: Sequence[Cell], axes: ReportAxes, fixes: Mapping[str, str]) -> _Design:
    """The levels the cells have, in report order, and the fix of each variant that is one; a
    factor naming an arm no cell has is refused."""
    base, reference = axes.baseline, axes.reference if axes.across is not None else None
    compare_order, across_order = _canonical_orders(axes)
    variants = _variant_order(cells, base, compare_order)
    optims = _order((c.optim for c in cells if c.optim is not None), across_order, reference or SINGLE_COLUMN)
    norm_of = {c.variant: (c.norm, c.arm) for c in cells if c.norm is not None}
    fixes_of = {v: t for v in variants if (t := fix_base(v, *norm_of[v], fixes, base)) is not None}
    check_factor_arms(axes.factors, cells)
    return _Design(axes, base, reference, variants, optims, norm_of, fixes_of)


def _missing_level_notes(cells: Sequence[Cell], design: _Design) -> list[str]:
    """A note when no cell has the baseline level, or (with an across axis) the reference level."""
    axes, base, reference = design.axes, design.base, design.reference
    notes = []
    if base not in design.variants:
        notes.append(
            f"no {base} cells: no gaps, interactions or recoveries "
            f"({axes.noun(axes.compare)} levels found: {', '.join(sorted({c.norm for c in cells if c.norm}))})"
        )
    if axes.across is not None and reference not in design.optims:
        notes.append(
            f"no {reference} cells: no interactions or recoveries "
            f"({axes.noun(axes.across)} levels found: {', '.join(design.optims)})"
        )
    return notes


def _cell_notes(assessed: Sequence[tuple[Cell, Assessment]]) -> list[str]:
    """A note per cell left out (with its reasons) and per file whose unterminated last line was skipped."""
    notes = []
    for cell, assessment in assessed:
        if assessment.flags:
            notes.append(f"{cell.name} left out: {'; '.join(assessment.reasons)}")
        if cell.metrics is not None and cell.metrics.partial_last_line:
            notes.append(f"{cell.name}: skipped an unterminated last line of metrics.jsonl")
        if cell.diagnostics is not None and cell.diagnostics.partial_last_line:
            notes.append(f"{cell.name}: skipped an unterminated last line of diagnostics.jsonl")
    return notes


def _estimate_stratum(
    estimates: _Estimates, stratum: Stratum, members: Sequence[tuple[Cell, Assessment]], design: _Design
) -> None:
    """Add one stratum's groups, gaps, interactions, recoveries, factor effects and head/tail
    comparisons (each tagged with the stratum when the report has strata) to ``estimates``."""
    axes, base, reference, variants, optims = design.axes, design.base, design.reference, design.variants, design.optims
    label, margin = _stratum_label(stratum), axes.equivalence_margin
    groups = _describe_groups(members, design, label, estimates.left_out_by_group)
    tag = {"stratum": dict(stratum)} if axes.strata else {}
    estimates.all_groups.update({((label,) if label else ()) + key: g for key, g in groups.items()})
    notes: list[str] = []
    estimates.groups += _group_records(groups, members, design, estimates.left_out_by_group, label, tag)
    estimates.gaps += [{**g, **tag} for g in compute_gaps(groups, variants, optims, base, notes, margin)]
    if reference is not None:
        estimates.interactions += [
            {**i, **tag} for i in compute_interactions(groups, variants, optims, base, reference, notes, margin)
        ]
    for r in compute_recoveries(groups, design.fixes_of, optims, base, reference, notes):
        estimates.recoveries.append({**r, **tag})
        estimates.share_groups.append((estimates.recoveries[-1], groups))
    estimates.factor_effects += [
        {**f, **tag} for f in compute_factor_effects(groups, axes.factors, optims, reference, margin, notes)
    ]
    estimates.tail += [{**t, **tag} for t in tail_comparisons(members, variants, optims, base, reference, notes)]
    estimates.notes += _prefixed(notes, stratum)


def _describe_groups(
    members: Sequence[tuple[Cell, Assessment]], design: _Design, label: str, left_out: LostCells
) -> dict[tuple[str, str], GroupStats]:
    """Each (variant, optimizer) group of one stratum over its included cells; the cells it
    lost are added to ``left_out`` under each of their flags."""
    groups: dict[tuple[str, str], GroupStats] = {}
    for variant in design.variants:
        for optim in design.optims:
            in_group = [(c, a) for c, a in members if c.variant == variant and c.optim == optim]
            if in_group:
                kept = [(c, a) for c, a in in_group if not a.flags]
                for c, a in in_group:
                    for flag in a.flags:
                        left_out.setdefault((label, variant, optim), {}).setdefault(flag, []).append(c.name)
                groups[variant, optim] = describe([a.final_eval_loss for _, a in kept], [c.seed for c, _ in kept])
    return groups


def _group_records(
    groups: Groups,
    members: Sequence[tuple[Cell, Assessment]],
    design: _Design,
    left_out: LostCells,
    label: str,
    tag: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """summary.json's record of each group: its statistics, seeds, cells and left-out counts."""
    return [
        {
            "variant": v,
            "norm": design.norm_of[v][0],
            "arm": design.norm_of[v][1],
            "optim": o,
            "n": g.n,
            "mean": g.mean,
            "std": g.std,
            "sem": g.sem,
            "seeds": list(g.by_seed),
            "cells": [c.name for c, a in members if c.variant == v and c.optim == o and not a.flags],
            "left_out": {flag: len(names) for flag, names in left_out.get((label, v, o), {}).items()},
            **tag,
        }
        for (v, o), g in groups.items()
    ]


def _lead_notes(
    assessed: Sequence[tuple[Cell, Assessment]], groups: Mapping[tuple[str, ...], GroupStats], axes: ReportAxes
) -> list[str]:
    """The notes that open the list: the cells that learned almost no context, then the groups of one seed."""
    compare_noun, across_noun = axes.noun(axes.compare), axes.noun(axes.across)
    notes = []
    flat = [
        c.name
        for c, a in assessed
        if c.metrics is not None and learned_no_context(a.final_eval_loss, c.metrics.unigram_entropy)
    ]
    if flat:
        notes.append(
            f"{len(flat)} of {len(assessed)} cells end less than {CONTEXT_MARGIN_NATS} nats below the "
            f"unigram entropy of their training tokens, i.e. they learned almost no context "
            f"({', '.join(flat)}): gaps and interactions involving them measure noise more than "
            f"the {compare_noun} or the {across_noun or compare_noun}.",
        )
    if (note := one_seed_note(groups)) is not None:
        notes.append(note)
    return notes


def _cell_records(assessed: Sequence[tuple[Cell, Assessment]], design: _Design) -> list[dict[str, Any]]:
    """summary.json's record of every cell, included or not, in the cells' order."""
    return [
        cell_record(
            c, a, design.fixes_of.get(c.variant) if c.norm else None, _stratum_label(stratum_of(c, design.axes))
        )
        for c, a in assessed
    ]


def _settings(design: _Design, fixes: Mapping[str, str], divergence_nats: float) -> dict[str, Any]:
    """summary.json's settings: the levels, fixes and axes the report used, and its rules."""
    axes = design.axes
    return {
        "baseline_norm": design.base,
        "reference_optim": design.reference,
        "fixes": fixes,
        "axes": axes.to_json(),
        "compare_noun": axes.noun(axes.compare),
        "across_noun": axes.noun(axes.across),
        "divergence_nats": divergence_nats,
        "interval": INTERVAL_METHOD,
        "level": LEVEL,
        "equivalence_margin": axes.equivalence_margin,
    }


def _left_out_records(left_out: LostCells) -> list[dict[str, Any]]:
    """summary.json's left_out_by_group: per group that lost cells, the counts per flag and the cells."""
    return [
        {
            "stratum": s,
            "variant": v,
            "optim": o,
            "flags": {f: len(n) for f, n in flags.items()},
            "by_flags": by_flag_set(flags),
            "cells": sorted({n for names in flags.values() for n in names}),
        }
        for (s, v, o), flags in left_out.items()
    ]
