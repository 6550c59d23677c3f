"""Statistics over a factorial experiment's cells, and the summary the report is made of.

Definitions (the docstrings below give the formulas):

* group = the included cells of one (variant, optimizer); variant = the norm, or
  ``norm[arm]`` for an arm; statistics over a group's cells (its seeds): mean, sample std;
* gap(v, O) = mean(v, O) - mean(baseline, O), standard error from Welch's formula;
* interaction(v, O) = gap(v, O) - gap(v, reference); 95% interval by a normal approximation
  over the four independent means, plus a paired per-seed estimate where seeds match;
* recovered share of a fix F of norm n under O = (gap(n, O) - gap(F, O)) / gap(n, O).

Cells that are missing, diverged, stopped early or cannot be placed (see
:func:`normopt.experiments.cells.assess_cell`) are listed with their flags and left out of
every statistic. ``build_summary`` gathers everything as plain data (summary.json), including
each cell's diagnostics numbers (``diagnostics_numbers``), which are descriptive only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from normopt.experiments.cells import (
    DIVERGENCE_NATS,
    Assessment,
    Cell,
    Diagnostics,
    assess_cell,
    assign_arms,
    fix_base,
)

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...: two-sided 95% normal quantile
DEFAULT_FIXES: dict[str, str] = {"derf_ema": "derf"}
NORM_ORDER = ("rmsnorm", "dyt", "derf", "derf_ema")
OPTIM_ORDER = ("adamw", "muon", "normuon")


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class GroupStats:
    """Final eval losses of one group's included cells."""

    n: int
    mean: float | None  # sum(x) / n
    std: float | None  # sample std, sqrt(sum((x - mean)^2) / (n - 1)); None for n < 2
    by_seed: Mapping[int, float]  # seed -> final loss (mean over cells sharing a seed)

    @property
    def sem(self) -> float | None:
        """Standard error of the mean, std / sqrt(n)."""
        return None if self.std is None else self.std / math.sqrt(self.n)


def describe(values: Sequence[float], seeds: Sequence[int | None] = ()) -> GroupStats:
    """n, mean and sample standard deviation (n - 1 in the denominator) of ``values``."""
    values = list(values)
    by_seed: dict[int, list[float]] = {}
    for seed, value in zip(seeds, values):
        if seed is not None:
            by_seed.setdefault(seed, []).append(value)
    return GroupStats(
        n=len(values),
        mean=statistics.fmean(values) if values else None,
        std=statistics.stdev(values) if len(values) >= 2 else None,
        by_seed={s: statistics.fmean(v) for s, v in sorted(by_seed.items())},
    )


def normal_interval(value: float, se: float | None, z: float = Z95) -> tuple[float, float] | None:
    """value -/+ z * se (z = 1.96 for 95%); None without a standard error."""
    return None if se is None else (value - z * se, value + z * se)


def contrast(terms: Sequence[tuple[float, GroupStats]]) -> tuple[float, float | None]:
    """A linear contrast of independent group means, C = sum_i c_i * mean_i, with standard
    error se(C) = sqrt(sum_i c_i^2 * s_i^2 / n_i) (s_i the sample std; for C = mean_1 - mean_2
    this is Welch's se). se is None when any group has n < 2: its variance is unknown."""
    value = sum(c * g.mean for c, g in terms)
    if any(g.n < 2 for _, g in terms):
        return value, None
    return value, math.sqrt(sum(c * c * g.std ** 2 / g.n for c, g in terms))


def paired_contrast(terms: Sequence[tuple[float, GroupStats]]) -> dict[str, Any] | None:
    """The same contrast per seed, over the seeds present in every group:
    d_s = sum_i c_i * x_{i,s}; estimate mean(d), se = stdev(d) / sqrt(k), k = number of seeds.
    Pairing removes variation that a seed shares across cells (data order, init draws).
    None when no seed is common to all groups; se None when k = 1."""
    common = set.intersection(*(set(g.by_seed) for _, g in terms))
    if not common:
        return None
    per_seed = {s: sum(c * g.by_seed[s] for c, g in terms) for s in sorted(common)}
    d = list(per_seed.values())
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) >= 2 else None
    value = statistics.fmean(d)
    return {"n_seeds": len(d), "value": value, "se": se, "ci95": normal_interval(value, se),
            "per_seed": {str(s): v for s, v in per_seed.items()}}


def recovery_share(base: GroupStats, fix: GroupStats, baseline: GroupStats) -> tuple[float | None, float | None]:
    """Share of the base norm's gap a fix recovers, R = (gap_n - gap_F) / gap_n
    = (a - c) / (a - b) with a = mean(base norm), b = mean(baseline), c = mean(fix).
    Its se is the delta method over the three independent means:
    var(R) = (dR/da)^2 va + (dR/db)^2 vb + (dR/dc)^2 vc, dR/da = (c - b) / (a - b)^2,
    dR/db = (a - c) / (a - b)^2, dR/dc = -1 / (a - b), v = s^2 / n. R is None when gap_n = 0;
    se is None when a group has n < 2."""
    a, b, c = base.mean, baseline.mean, fix.mean
    gap = a - b
    if gap == 0:
        return None, None
    share = (a - c) / gap
    if min(base.n, fix.n, baseline.n) < 2:
        return share, None
    grads = ((c - b) / gap ** 2, (a - c) / gap ** 2, -1.0 / gap)
    variances = (base.std ** 2 / base.n, baseline.std ** 2 / baseline.n, fix.std ** 2 / fix.n)
    return share, math.sqrt(sum(g * g * v for g, v in zip(grads, variances)))


def ema_smooth(values: Sequence[float], beta: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing):
    m_t = beta * m_{t-1} + (1 - beta) * x_t with m_{-1} = 0, s_t = m_t / (1 - beta^(t+1)),
    i.e. s_t = sum_i beta^(t-i) x_i / sum_i beta^(t-i). Starting from s_0 = x_0 instead would give
    the first (highest) loss the weight of the whole unseen past and hold the curve up for a
    short run's few logged points. beta = 0: the raw values."""
    smoothed, m = [], 0.0
    for t, x in enumerate(values):
        m = beta * m + (1 - beta) * x
        smoothed.append(m / (1 - beta ** (t + 1)))
    return smoothed


def diagnostics_numbers(diagnostics: Diagnostics) -> dict[str, Any]:
    """A cell's diagnostics in a few numbers (None where the cell logged no such record):

    * final_saturation: the mean saturation over the bounded norm layers at the last step that
      has one (``saturation_step``), with each layer's value in ``saturation_by_layer``;
    * final_spectral_norm: the mean spectral norm over the weight matrices at the last
      spectral_norm record; spectral_norm_growth = that mean at the last record / at the first
      (``spectral_norm_steps`` = [first, last]); None with one record or a first mean of 0;
    * tail_bucket_loss: the last tail_tokens record's loss per token-frequency bucket (nats,
      head -> tail, None = empty bucket), at ``tail_tokens_step``, with its token shares and
      vocabulary sizes."""
    saturation, spectral, tail = diagnostics.saturation, diagnostics.spectral_norm, diagnostics.tail_tokens
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
        "tail_tokens_step": tail.step if tail else None,
        "tail_bucket_loss": list(tail.bucket_loss) if tail else None,
        "tail_bucket_token_share": list(tail.bucket_token_share) if tail else None,
        "tail_bucket_vocab_size": list(tail.bucket_vocab_size) if tail else None,
        "partial_last_line": diagnostics.partial_last_line,
    }


# --------------------------------------------------------------------------- the summary


def _order(values: Iterable[str], canonical: Sequence[str], first: str) -> list[str]:
    rank = {name: i for i, name in enumerate(canonical)}
    return sorted(set(values), key=lambda v: (v != first, rank.get(v, len(rank)), v))


def _variant_order(cells: Sequence[Cell], baseline_norm: str) -> list[str]:
    """Baseline first, then norms in NORM_ORDER (others by name), each norm's arms after it."""
    rank = {name: i for i, name in enumerate(NORM_ORDER)}
    keys = {(c.norm != baseline_norm, rank.get(c.norm, len(rank)), c.norm, c.arm is not None, c.arm or ""): c.variant
            for c in cells if c.norm is not None and c.optim is not None}
    return [keys[k] for k in sorted(keys)]


Groups = Mapping[tuple[str, str], GroupStats]  # (variant, optimizer) -> its included cells


def _usable(groups: Groups, keys: Sequence[tuple[str, str]], label: str, notes: list[str]) -> bool:
    """True when every group in ``keys`` has an included cell; else a note says which lack one."""
    empty = ["/".join(k) for k in keys if k not in groups or groups[k].n == 0]
    if empty:
        notes.append(f"{label}: not computable (no usable cells in {', '.join(empty)})")
    return not empty


def _note_small(groups: Groups, keys: Sequence[tuple[str, str]], label: str, notes: list[str]) -> None:
    """With n = 1 a group's variance is unknown: say that the estimate has no interval."""
    small = ["/".join(k) for k in keys if groups[k].n < 2]
    if small:
        notes.append(f"{label}: no interval (n=1 in {', '.join(small)})")


def compute_gaps(groups: Groups, variants: Sequence[str], optims: Sequence[str], base: str,
                 notes: list[str]) -> list[dict[str, Any]]:
    """gap(v, O) = mean(v, O) - mean(base, O), se = sqrt(s_v^2/n_v + s_b^2/n_b) (Welch)."""
    gaps = []
    for variant in variants:
        for optim in optims:
            if variant == base or (variant, optim) not in groups:
                continue
            keys = [(variant, optim), (base, optim)]
            label = f"gap {variant} vs {base} under {optim}"
            if not _usable(groups, keys, label, notes):
                continue
            value, se = contrast([(1.0, groups[keys[0]]), (-1.0, groups[keys[1]])])
            _note_small(groups, keys, label, notes)
            gaps.append({"variant": variant, "optim": optim, "baseline": base, "value": value, "se": se,
                         "ci95": normal_interval(value, se), "n": [groups[k].n for k in keys]})
    return gaps


def compute_interactions(groups: Groups, variants: Sequence[str], optims: Sequence[str], base: str,
                         reference: str, notes: list[str]) -> list[dict[str, Any]]:
    """interaction(v, O) = (L[v,O] - L[base,O]) - (L[v,ref] - L[base,ref]) for O != ref, with a
    95% normal interval from the four independent means and the paired per-seed estimate."""
    items = []
    for variant in variants:
        for optim in optims:
            if variant == base or optim == reference or (variant, optim) not in groups:
                continue
            keys = [(variant, optim), (base, optim), (variant, reference), (base, reference)]
            label = f"interaction {variant} x {optim}"
            if not _usable(groups, keys, label, notes):
                continue
            terms = [(c, groups[k]) for c, k in zip((1.0, -1.0, -1.0, 1.0), keys)]
            value, se = contrast(terms)
            _note_small(groups, keys, label, notes)
            items.append({
                "variant": variant, "optim": optim, "reference_optim": reference, "value": value, "se": se,
                "ci95": normal_interval(value, se), "n": [groups[k].n for k in keys],
                "method": "independent means, normal approximation", "paired": paired_contrast(terms)})
    return items


def compute_recoveries(groups: Groups, fixes_of: Mapping[str, str], optims: Sequence[str], base: str,
                       reference: str, notes: list[str]) -> list[dict[str, Any]]:
    """For each fix F of norm n (``fixes_of[F] = n``) and optimizer O != ref: the recovered share
    (gap(n, O) - gap(F, O)) / gap(n, O), with a delta-method 95% normal interval."""
    items = []
    for fix, target in fixes_of.items():
        for optim in optims:
            if optim == reference or (fix, optim) not in groups:
                continue
            keys = [(target, optim), (fix, optim), (base, optim)]
            label = f"recovery of {target}'s gap by {fix} under {optim}"
            if not _usable(groups, keys, label, notes):
                continue
            g_n, g_f, g_b = (groups[k] for k in keys)
            share, se = recovery_share(g_n, g_f, g_b)
            gap_n, gap_se = contrast([(1.0, g_n), (-1.0, g_b)])
            if share is None:
                notes.append(f"{label}: {target} has no gap to recover")
            elif gap_se is not None and abs(gap_n) < 2 * gap_se:
                notes.append(f"{label}: {target}'s gap is within 2 se of 0, the share is unreliable")
            _note_small(groups, keys, label, notes)
            items.append({
                "fix": fix, "base_norm": target, "optim": optim, "gap_base": gap_n,
                "gap_fix": g_f.mean - g_b.mean, "share": share, "se": se,
                "ci95": None if share is None else normal_interval(share, se),
                "method": "delta method, normal approximation"})
    return items


def build_summary(cells: Sequence[Cell], *, baseline_norm: str = "rmsnorm", reference_optim: str = "adamw",
                  fixes: Mapping[str, str] | None = None,
                  divergence_nats: float = DIVERGENCE_NATS) -> dict[str, Any]:
    """Everything the report shows, as plain data (the content of summary.json): cells with
    their flags, groups (included cells only), gaps, interactions, recoveries and notes."""
    fixes = dict(DEFAULT_FIXES if fixes is None else fixes)
    cells, notes = assign_arms(cells, baseline_norm)
    assessed = [(cell, assess_cell(cell, divergence_nats)) for cell in cells]
    variants = _variant_order(cells, baseline_norm)
    optims = _order((c.optim for c in cells if c.optim is not None), OPTIM_ORDER, reference_optim)
    norm_of = {c.variant: (c.norm, c.arm) for c in cells if c.norm is not None}
    fixes_of = {v: t for v in variants if (t := fix_base(v, *norm_of[v], fixes, baseline_norm)) is not None}

    groups: dict[tuple[str, str], GroupStats] = {}
    for variant in variants:
        for optim in optims:
            members = [(c, a) for c, a in assessed if c.variant == variant and c.optim == optim]
            if members:
                kept = [(c, a) for c, a in members if not a.flags]
                groups[variant, optim] = describe([a.final_eval_loss for _, a in kept], [c.seed for c, _ in kept])

    if baseline_norm not in variants:
        notes.append(f"no {baseline_norm} cells: no gaps, interactions or recoveries "
                     f"(norms found: {', '.join(sorted({c.norm for c in cells if c.norm}))})")
    if reference_optim not in optims:
        notes.append(f"no {reference_optim} cells: no interactions or recoveries "
                     f"(optimizers found: {', '.join(optims)})")
    for cell, assessment in assessed:
        if assessment.flags:
            notes.append(f"{cell.name} left out: {'; '.join(assessment.reasons)}")
        if cell.metrics is not None and cell.metrics.partial_last_line:
            notes.append(f"{cell.name}: skipped an unterminated last line of metrics.jsonl")
        if cell.diagnostics is not None and cell.diagnostics.partial_last_line:
            notes.append(f"{cell.name}: skipped an unterminated last line of diagnostics.jsonl")

    gaps = compute_gaps(groups, variants, optims, baseline_norm, notes)
    interactions = compute_interactions(groups, variants, optims, baseline_norm, reference_optim, notes)
    recoveries = compute_recoveries(groups, fixes_of, optims, baseline_norm, reference_optim, notes)
    return {
        "settings": {"baseline_norm": baseline_norm, "reference_optim": reference_optim, "fixes": fixes,
                     "divergence_nats": divergence_nats, "interval": "95% normal approximation (z=1.96)"},
        "variants": variants,
        "optims": optims,
        "cells": [_cell_record(c, a, fixes_of.get(c.variant) if c.norm else None) for c, a in assessed],
        "groups": [{"variant": v, "norm": norm_of[v][0], "arm": norm_of[v][1], "optim": o, "n": g.n,
                    "mean": g.mean, "std": g.std, "sem": g.sem, "seeds": list(g.by_seed),
                    "cells": [c.name for c, a in assessed if c.variant == v and c.optim == o and not a.flags]}
                   for (v, o), g in groups.items()],
        "gaps": gaps,
        "interactions": interactions,
        "recoveries": recoveries,
        "notes": notes,
    }


def _cell_record(cell: Cell, assessment: Assessment, fix_of: str | None) -> dict[str, Any]:
    metrics = cell.metrics
    return {
        "name": cell.name, "path": str(cell.path), "norm": cell.norm, "arm": cell.arm,
        "variant": cell.variant if cell.norm is not None else None,
        "optim": cell.optim, "seed": cell.seed, "fix_of": fix_of, "steps": cell.steps,
        "last_step": metrics.last_step if metrics else None, "final_eval_loss": assessment.final_eval_loss,
        "flags": list(assessment.flags), "reasons": list(assessment.reasons), "included": not assessment.flags,
        "partial_last_line": bool(metrics and metrics.partial_last_line),
        "diagnostics": None if cell.diagnostics is None else diagnostics_numbers(cell.diagnostics),
    }

