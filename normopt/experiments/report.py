"""Report over a factorial experiment: final losses, norm gaps, norm x optimizer interactions.

``normopt report ROOT`` reads the cells under ROOT (one subfolder per training run) and writes
``report.md``, ``summary.json`` and PNG plots. It reads only what runs leave behind:

* ``metrics.jsonl``: training lines ``{"step", "loss", ...}`` and evaluation lines
  ``{"step", "eval_loss"}`` (non-finite numbers spelled "nan"/"inf"/"-inf");
* ``config.yaml``: the cell's coordinates (``model.norm``, ``optim.name``, ``train.seed``),
  its length (``train.steps``) and the settings an arm is inferred from;
* ``cell.json`` (optional, written by a factorial runner): ``{"name", "coords": {axis: value},
  "seed", "arm", "exit_code"}``; what it names wins over config.yaml.

Definitions (the docstrings below give the formulas):

* group = the included cells of one (variant, optimizer); variant = the norm, or
  ``norm[arm]`` for an arm; statistics over a group's cells (its seeds): mean, sample std;
* gap(v, O) = mean(v, O) - mean(baseline, O), standard error from Welch's formula;
* interaction(v, O) = gap(v, O) - gap(v, reference); 95% interval by a normal approximation
  over the four independent means, plus a paired per-seed estimate where seeds match;
* recovered share of a fix F of norm n under O = (gap(n, O) - gap(F, O)) / gap(n, O).

Cells that are missing, diverged, stopped early or cannot be placed are listed with their
flags and left out of every statistic.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from normopt.errors import DIVERGED_EXIT_CODE, UserError

# A run whose loss ends this far above its own best value has blown up, even without a NaN.
# One nat is far beyond seed noise or a late-training bump (both are hundredths of a nat) and
# far below the rise of a real divergence (the loss returns towards ln(vocab), several nats).
DIVERGENCE_NATS = 1.0
Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.95996...: two-sided 95% normal quantile
DEFAULT_FIXES: dict[str, str] = {"derf_ema": "derf"}
NORM_ORDER = ("rmsnorm", "dyt", "derf", "derf_ema")
OPTIM_ORDER = ("adamw", "muon", "normuon")
CELL_FILES = ("config.yaml", "cell.json", "metrics.jsonl")
FLAGS = ("missing", "diverged", "stopped_early", "unplaced")
PLOT_FILES = {"loss_curves": "loss_curves.png", "final_eval_loss": "final_eval_loss.png",
              "gaps": "gaps.png"}
# cell.json coordinate axes, under the names a runner may use (short or the config key)
NORM_AXES = ("norm", "model.norm")
OPTIM_AXES = ("optim", "optim.name")
SEED_AXES = ("seed", "train.seed")
# Config keys that never make an arm: the cell's own coordinates, bookkeeping, and execution
# choices that do the same math (placement, accumulation split, logging cadence).
NON_ARM_SECTIONS = frozenset({"run", "checkpoint"})
NON_ARM_KEYS = frozenset({
    "model.norm", "optim.name", "train.seed", "data.cache_dir", "train.device", "train.compile",
    "train.mfu_probe", "train.log_interval", "train.eval_interval", "train.micro_batch_size",
    "optim.ns_mode",
})


# --------------------------------------------------------------------------- reading cells


@dataclass(frozen=True)
class Metrics:
    """One cell's ``metrics.jsonl``: (step, value) pairs sorted by step, one per step."""

    train: tuple[tuple[int, float], ...]  # training loss
    evals: tuple[tuple[int, float], ...]  # eval_loss (step 0 = before training)
    last_step: int | None  # the largest step of any line; None for an empty file
    partial_last_line: bool = False  # an unterminated last line was skipped


@dataclass(frozen=True)
class Cell:
    """One run directory and what the report knows about it."""

    name: str
    path: Path
    norm: str | None
    optim: str | None
    seed: int | None
    arm: str | None  # None = the norm's base cells
    arm_explicit: bool  # arm came from cell.json (else it is inferred from config.yaml)
    config: Mapping[str, Any]  # flattened "section.key" -> value; empty without config.yaml
    steps: int | None  # train.steps, the length the run was meant to have
    metrics: Metrics | None  # None = no metrics.jsonl
    exit_code: int | None = None  # the run's exit status, if a runner recorded it

    @property
    def variant(self) -> str:
        return variant_label(self.norm, self.arm)


def variant_label(norm: str | None, arm: str | None) -> str:
    """``norm`` for a norm's base cells, ``norm[arm]`` for an arm of it."""
    return f"{norm}[{arm}]" if arm else str(norm)


def parse_metric(value: Any) -> float:
    """A logged number as a float: JSON numbers as they are; the strings "nan", "inf" and
    "-inf" (how the metrics logger writes non-finite floats) as the matching float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)  # float("nan") / float("-inf") parse; other strings raise ValueError


def read_metrics(path: Path) -> Metrics:
    """Parse ``metrics.jsonl``. A later line for a step replaces an earlier one (a resumed run
    that was not truncated logs some steps twice). An unterminated last line that does not
    parse is skipped (a killed writer leaves one); any other bad line is a UserError."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read metrics ({exc})") from None
    lines = text.split("\n")  # a terminated file ends with "", so only a partial line can be last
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    last_step = None
    partial = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if "step" not in record:
                raise ValueError("no 'step'")
            step = record["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"step {step!r} is not an integer")
            loss = parse_metric(record["loss"]) if "loss" in record else None
            eval_loss = parse_metric(record["eval_loss"]) if "eval_loss" in record else None
        except ValueError as exc:
            if number == len(lines):
                partial = True
                continue
            raise UserError(f"{path}:{number}: unreadable metrics line ({exc})") from None
        last_step = step if last_step is None else max(last_step, step)
        if loss is not None:
            train[step] = loss
        if eval_loss is not None:
            evals[step] = eval_loss
    return Metrics(tuple(sorted(train.items())), tuple(sorted(evals.items())), last_step, partial)


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model": {"norm": "derf"}}`` -> ``{"model.norm": "derf"}`` (one level, as config.yaml)."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, Mapping):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[str(section)] = values
    return flat


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read config ({str(exc).splitlines()[0]})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path}: expected a mapping of config sections")
    return flatten_config(loaded)


def _read_cell_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read cell description ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("coords", {}), dict):
        raise UserError(f"{path}: expected an object with a 'coords' object")
    return info


def _first(mapping: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k) is not None), None)


def _as_int(value: Any, what: str, path: Path) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{path}: {what} {value!r} is not an integer")
    return value


def load_cell(folder: Path) -> Cell:
    """Read one cell folder. Coordinates come from cell.json where it names them, else from
    config.yaml (norm = model.norm, optimizer = optim.name, seed = train.seed)."""
    info = _read_cell_json(folder / "cell.json")
    config = _read_config(folder / "config.yaml")
    coords = info.get("coords", {})
    norm = _first(coords, NORM_AXES) or config.get("model.norm")
    optim = _first(coords, OPTIM_AXES) or config.get("optim.name")
    seed = info.get("seed")
    if seed is None:
        seed = _first(coords, SEED_AXES)
    if seed is None:
        seed = config.get("train.seed")
    arm = info.get("arm")
    metrics_path = folder / "metrics.jsonl"
    return Cell(
        name=str(info.get("name") or folder.name),
        path=folder,
        norm=None if norm is None else str(norm),
        optim=None if optim is None else str(optim),
        seed=_as_int(seed, "seed", folder),
        arm=None if arm is None or arm == "" else str(arm),
        arm_explicit="arm" in info,
        config=config,
        steps=_as_int(config.get("train.steps"), "train.steps", folder / "config.yaml"),
        metrics=read_metrics(metrics_path) if metrics_path.is_file() else None,
        exit_code=_as_int(info.get("exit_code"), "exit_code", folder / "cell.json"),
    )


def discover_cells(root: Path) -> list[Cell]:
    """Every direct subfolder of ``root`` holding config.yaml, cell.json or metrics.jsonl is a
    cell (hidden folders are skipped); sorted by folder name."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    folders = [d for d in sorted(root.iterdir())
               if d.is_dir() and not d.name.startswith(".") and any((d / f).is_file() for f in CELL_FILES)]
    if not folders:
        hint = ("; it looks like a single run directory: pass the folder that holds the cells"
                if any((root / f).is_file() for f in CELL_FILES) else "")
        raise UserError(f"{root}: no cells found (expected subfolders with "
                        f"{', '.join(CELL_FILES)}){hint}")
    return [load_cell(d) for d in folders]


# --------------------------------------------------------------------------- arms


def _arm_keys(key: str) -> bool:
    return key.split(".", 1)[0] not in NON_ARM_SECTIONS and key not in NON_ARM_KEYS


def reference_settings(configs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The settings all ``configs`` agree on (arm-relevant keys only), and the keys on which
    they disagree. Empty input -> ({}, [])."""
    if not configs:
        return {}, []
    shared: dict[str, Any] = {}
    disputed = []
    for key in sorted(set().union(*configs)):
        if not _arm_keys(key):
            continue
        values = [c.get(key) for c in configs]
        if all(v == values[0] for v in values):
            shared[key] = values[0]
        else:
            disputed.append(key)
    return shared, disputed


def infer_arm(config: Mapping[str, Any], reference: Mapping[str, Any]) -> str | None:
    """The arm of a cell = its settings that differ from ``reference`` (keys present in both),
    as ``"key=value,..."`` sorted by key; the section prefix is dropped unless two differing
    keys share a name. None when nothing differs."""
    diffs = {k: config[k] for k in sorted(reference) if k in config and config[k] != reference[k]}
    if not diffs:
        return None
    leaves = [k.split(".", 1)[-1] for k in diffs]
    names = leaves if len(set(leaves)) == len(leaves) else list(diffs)
    return ",".join(f"{name}={value}" for name, value in zip(names, diffs.values()))


def assign_arms(cells: Sequence[Cell], baseline_norm: str) -> tuple[list[Cell], list[str]]:
    """Give every cell its arm; returns (cells, notes).

    Rule: an arm in cell.json (the key "arm", null = base cells) is taken as written. Any other
    cell with a config.yaml gets ``infer_arm(config, ref[O])`` where ref[O] holds the settings
    shared by all baseline-norm cells of its optimizer O that are base cells; model.norm,
    optim.name, train.seed and the NON_ARM keys never count. So a Derf cell trained with
    model.alpha_init_*=0.3 where the baseline cells keep 0.5 is the arm
    ``derf[alpha_init_attn=0.3,alpha_init_ffn=0.3,alpha_init_final=0.3]``.
    """
    notes = []
    refs: dict[str, dict[str, Any]] = {}
    for optim in sorted({c.optim for c in cells if c.optim is not None}):
        base_configs = [c.config for c in cells
                        if c.norm == baseline_norm and c.optim == optim and c.config
                        and not (c.arm_explicit and c.arm is not None)]
        refs[optim], disputed = reference_settings(base_configs)
        if disputed:
            notes.append(f"{baseline_norm} cells under {optim} differ in {', '.join(disputed)}: "
                         f"they are pooled, and those keys define no arm")
    assigned = []
    for cell in cells:
        if not cell.arm_explicit and cell.config and cell.optim in refs:
            cell = replace(cell, arm=infer_arm(cell.config, refs[cell.optim]))
        assigned.append(cell)
    return assigned, notes


def fix_base(variant: str, norm: str | None, arm: str | None, fixes: Mapping[str, str],
             baseline_norm: str) -> str | None:
    """The norm a variant is a fix of, or None. Rule, first match wins: ``fixes[variant]``;
    ``fixes[norm]`` (an arm of a fix norm fixes the same norm); the variant's own norm when it
    is an arm. Fixes of the baseline norm are none (the baseline has no gap to recover)."""
    base = fixes.get(variant) or (fixes.get(norm) if norm is not None else None)
    if base is None and arm is not None:
        base = norm
    return None if base in (None, baseline_norm, variant) else base


# --------------------------------------------------------------------------- per cell


@dataclass(frozen=True)
class Assessment:
    final_eval_loss: float | None
    flags: tuple[str, ...]  # subset of FLAGS; empty = the cell counts
    reasons: tuple[str, ...]  # one human-readable line per flag


def final_eval_loss(evals: Sequence[tuple[int, float]]) -> float | None:
    """The eval_loss of the last evaluation after training started (step > 0), else None:
    the step-0 evaluation measures the initialisation, not the run."""
    after_start = [value for step, value in evals if step > 0]
    return after_start[-1] if after_start else None


def divergence_reason(metrics: Metrics, nats: float = DIVERGENCE_NATS) -> str | None:
    """Why a run counts as diverged, or None. Diverged = (a) any logged loss or eval_loss is
    NaN/Inf, or (b) for the train loss or the eval loss series, last - min(series) > ``nats``:
    the run ended more than ``nats`` above the best value it had reached."""
    for name, series in (("loss", metrics.train), ("eval_loss", metrics.evals)):
        for step, value in series:
            if not math.isfinite(value):
                return f"{name} was {value} at step {step}"
    for name, series in (("loss", metrics.train), ("eval_loss", metrics.evals)):
        if len(series) >= 2:
            best_step, best = min(series, key=lambda sv: sv[1])
            last_step, last = series[-1]
            if last - best > nats:
                return (f"{name} ended at {last:.3f} (step {last_step}), {last - best:.2f} nats above "
                        f"its best {best:.3f} (step {best_step})")
    return None


def stopped_early(last_step: int | None, steps: int | None) -> bool | None:
    """last logged step < train.steps; None when either is unknown."""
    if last_step is None or steps is None:
        return None
    return last_step < steps


def assess_cell(cell: Cell, divergence_nats: float = DIVERGENCE_NATS) -> Assessment:
    """Flag a cell: unplaced (no norm or optimizer known), missing (no metrics.jsonl or no
    evaluation after step 0), diverged (``divergence_reason`` or exit status 3 recorded in
    cell.json), stopped_early (``stopped_early``). A flagged cell is left out of every statistic."""
    reasons: dict[str, str] = {}
    if cell.norm is None or cell.optim is None:
        reasons["unplaced"] = "no norm or optimizer in cell.json or config.yaml"
    final = None
    metrics = cell.metrics
    if metrics is None:
        reasons["missing"] = "no metrics.jsonl"
    else:
        final = final_eval_loss(metrics.evals)
        if final is None:
            reasons["missing"] = "no evaluation after step 0 in metrics.jsonl"
        why = divergence_reason(metrics, divergence_nats)
        if why:
            reasons["diverged"] = why
        if stopped_early(metrics.last_step, cell.steps):
            reasons["stopped_early"] = f"last logged step {metrics.last_step} < train.steps {cell.steps}"
    # the trainer stops *before* logging a non-finite loss, so the runner's record of the exit
    # status (cell.json "exit_code") is the only trace such a divergence leaves
    if cell.exit_code == DIVERGED_EXIT_CODE and "diverged" not in reasons:
        reasons["diverged"] = "exit status 3 (the trainer stopped on a non-finite loss)"
    flags = tuple(f for f in FLAGS if f in reasons)
    return Assessment(final, flags, tuple(f"{f}: {reasons[f]}" for f in flags))


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
    }


# --------------------------------------------------------------------------- markdown


def _num(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(ci: Sequence[float] | None, digits: int = 4) -> str:
    return "no interval" if ci is None else f"[{_num(ci[0], digits, True)}, {_num(ci[1], digits, True)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main_table(summary: Mapping[str, Any]) -> str:
    """Final eval loss mean ± sample std (n) per variant x optimizer, with the gap to the
    baseline (± Welch se) beside each."""
    groups = {(g["variant"], g["optim"]): g for g in summary["groups"]}
    gaps = {(g["variant"], g["optim"]): g for g in summary["gaps"]}
    base = summary["settings"]["baseline_norm"]
    header = ["variant"]
    for optim in summary["optims"]:
        header += [f"{optim} final eval loss", f"gap to {base} ({optim})"]
    rows = []
    for variant in summary["variants"]:
        row = [variant]
        for optim in summary["optims"]:
            g = groups.get((variant, optim))
            row.append("—" if g is None or not g["n"] else
                       f"{_num(g['mean'])} ± {_num(g['std'])} (n={g['n']})")
            gap = gaps.get((variant, optim))
            row.append("—" if gap is None else
                       f"{_num(gap['value'], sign=True)} ± {_num(gap['se'])}" if gap["se"] is not None
                       else f"{_num(gap['value'], sign=True)} (n=1, no se)")
        rows.append(row)
    return _table(header, rows)


def interaction_table(summary: Mapping[str, Any]) -> str:
    """interaction = gap(O) - gap(reference) with its 95% interval, unpaired and paired."""
    rows = []
    for item in summary["interactions"]:
        paired = item["paired"]
        rows.append([item["variant"], f"{item['optim']} − {item['reference_optim']}",
                     _num(item["value"], sign=True), _ci(item["ci95"]),
                     "—" if paired is None else f"{_num(paired['value'], sign=True)} {_ci(paired['ci95'])} "
                                                f"({paired['n_seeds']} seeds)"])
    return _table(["variant", "optimizer", "interaction (nats)", "95% CI (independent means)",
                   "paired per-seed estimate"], rows)


def recovery_table(summary: Mapping[str, Any]) -> str:
    rows = [[r["fix"], r["base_norm"], r["optim"], _num(r["gap_base"], sign=True), _num(r["gap_fix"], sign=True),
             "—" if r["share"] is None else f"{100 * r['share']:.1f}%",
             "no interval" if r["ci95"] is None else f"[{100 * r['ci95'][0]:.1f}%, {100 * r['ci95'][1]:.1f}%]"]
            for r in summary["recoveries"]]
    return _table(["fix", "of", "optimizer", "gap of the norm", "gap of the fix", "recovered", "95% CI"], rows)


def cell_table(summary: Mapping[str, Any]) -> str:
    rows = [[c["name"], c["variant"] or "—", str(c["optim"] or "—"), str(c["seed"]), _num(c["final_eval_loss"]),
             f"{c['last_step'] if c['last_step'] is not None else '—'} / {c['steps'] if c['steps'] is not None else '?'}",
             ", ".join(c["flags"]) or "ok"] for c in summary["cells"]]
    return _table(["cell", "variant", "optimizer", "seed", "final eval loss", "last step / steps", "flags"], rows)


def render_markdown(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """report.md: the tables, the plots (paths relative to report.md) and the flags/notes."""
    s = summary["settings"]
    cells = summary["cells"]
    kept = sum(c["included"] for c in cells)
    fixes = ", ".join(f"`{k}` → `{v}`" for k, v in s["fixes"].items()) or "none declared"
    parts = [
        "# normopt factorial report", "",
        (f"{len(cells)} cells, {kept} included, {len(cells) - kept} left out. Baseline norm: "
         f"`{s['baseline_norm']}`; reference optimizer: `{s['reference_optim']}`. Losses in nats."), "",
        "## Final eval loss and gap to the baseline", "",
        (f"mean ± sample std over seeds (n cells); gap = mean(norm) − mean({s['baseline_norm']}) under "
         "the same optimizer, ± Welch standard error sqrt(s1²/n1 + s2²/n2)."), "",
        main_table(summary), "",
        "## Interaction", "",
        (f"interaction = gap under the optimizer − gap under {s['reference_optim']} = "
         "(L[n,O] − L[base,O]) − (L[n,ref] − L[base,ref]). 95% CI: ±1.96·sqrt(Σ s²/n) over the four "
         "group means (independent means, normal approximation; anti-conservative with few seeds). "
         "Paired: the same contrast per seed, over the seeds present in all four groups."), "",
        interaction_table(summary), "",
        "## Fix recovery", "",
        ("recovered = (gap(norm, O) − gap(fix, O)) / gap(norm, O) under each non-reference optimizer; "
         f"95% CI by the delta method. Fixes: {fixes}; an arm of a norm is a fix of that norm."), "",
        recovery_table(summary), "",
        "## Plots", "",
    ]
    parts += [f"![{name}]({path})" for name, path in plots.items()]
    parts += ["", "## Cells", "", cell_table(summary), "", "## Notes", ""]
    parts += [f"- {note}" for note in summary["notes"]] or ["- none"]
    return "\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: tuples -> lists, non-finite floats -> "nan"/"inf"/"-inf" (as metrics.jsonl)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- plots


def _figure(**kwargs):
    """A matplotlib Figure without pyplot: no global backend state, PNGs drawn by Agg."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report's plots need matplotlib: pip install matplotlib") from None
    return Figure(layout="constrained", **kwargs)


def _tick_label(variant: str) -> str:
    """An arm's label on several lines (one setting a line) so long arms stay readable."""
    return variant.replace("[", "\n[").replace(",", ",\n")


def _finite(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    points = [(s, v) for s, v in series if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss_curves(cells: Sequence[Cell], summary: Mapping[str, Any], path: Path, smoothing: float) -> None:
    """One panel per optimizer; per cell a thin line of the EMA-smoothed train loss and its eval
    losses as dots, one color per variant; a thick line = mean of the included cells' smoothed
    curves at the steps they share; left-out cells dotted."""
    records = {r["path"]: r for r in summary["cells"]}
    colors = {v: f"C{i % 10}" for i, v in enumerate(summary["variants"])}
    optims = summary["optims"]
    fig = _figure(figsize=(5.5 * max(1, len(optims)), 4.2))
    axes = fig.subplots(1, max(1, len(optims)), sharey=True, squeeze=False)[0]
    focus: list[float] = []  # included values past the first 10% of training set the y range
    for ax, optim in zip(axes, optims):
        for variant in summary["variants"]:
            # the summary holds the inferred arms; the cells as read may not
            members = [c for c in cells if c.optim == optim and c.metrics
                       and records[str(c.path)]["variant"] == variant]
            curves = []
            for cell in members:
                included = records[str(cell.path)]["included"]
                steps, losses = _finite(cell.metrics.train)
                smooth = ema_smooth(losses, smoothing)
                ax.plot(steps, smooth, color=colors[variant], lw=0.8, alpha=0.6 if included else 0.4,
                        ls="-" if included else ":")
                eval_steps, eval_losses = _finite(cell.metrics.evals)
                ax.plot(eval_steps, eval_losses, "o", ms=3, color=colors[variant], alpha=0.8 if included else 0.3)
                if included and steps:
                    curves.append(dict(zip(steps, smooth)))
                    cut = 0.1 * steps[-1]
                    focus += [v for s, v in zip(steps, smooth) if s >= cut]
                    focus += [v for s, v in zip(eval_steps, eval_losses) if s >= cut]
            if curves:
                common = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(common, [statistics.fmean(c[s] for c in curves) for s in common], color=colors[variant],
                        lw=2.2, label=f"{variant} (n={len(curves)})")
        ax.set_title(optim)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel(f"loss (train: EMA {smoothing}; dots: eval)")
    if focus:
        low, high = min(focus), max(focus)
        margin = 0.05 * (high - low) or 0.05
        axes[0].set_ylim(low - margin, high + margin)
    fig.suptitle("loss curves (thin: one seed; thick: mean of included seeds; dotted: left out)")
    fig.savefig(path, dpi=110)


def plot_final_losses(summary: Mapping[str, Any], path: Path) -> None:
    """Per optimizer panel: each cell's final eval loss (dots; left-out cells as grey x) and each
    group's mean with an error bar of ± one sample std."""
    variants, optims = summary["variants"], summary["optims"]
    groups = {(g["variant"], g["optim"]): g for g in summary["groups"]}
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig = _figure(figsize=(max(4.0, 1.1 * len(variants)) * max(1, len(optims)), 4.2))
    axes = fig.subplots(1, max(1, len(optims)), sharey=True, squeeze=False)[0]
    for ax, optim in zip(axes, optims):
        for x, variant in enumerate(variants):
            cells = [c for c in summary["cells"] if c["optim"] == optim and c["variant"] == variant
                     and c["final_eval_loss"] is not None and math.isfinite(c["final_eval_loss"])]
            for j, cell in enumerate(cells):
                offset = 0.08 * (j - (len(cells) - 1) / 2)  # spread seeds so equal values stay visible
                if cell["included"]:
                    ax.plot(x + offset, cell["final_eval_loss"], "o", ms=4, color=colors[variant], alpha=0.6)
                else:
                    ax.plot(x + offset, cell["final_eval_loss"], "x", ms=6, color="grey")
            g = groups.get((variant, optim))
            if g and g["n"]:
                ax.errorbar(x + 0.3, g["mean"], yerr=g["std"] or 0.0, fmt="s", ms=6, capsize=4,
                            color=colors[variant])
        ax.set_xticks(range(len(variants)), [_tick_label(v) for v in variants], fontsize=7)
        ax.set_title(optim)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("final eval loss (nats)")
    kept = [g["mean"] + sign * (g["std"] or 0.0) for g in summary["groups"] if g["n"] for sign in (-1, 1)]
    kept += [c["final_eval_loss"] for c in summary["cells"] if c["included"]]
    if kept:  # scale to the included cells: one blown-up left-out cell would flatten the rest
        margin = 0.15 * (max(kept) - min(kept)) or 0.05
        axes[0].set_ylim(min(kept) - margin, max(kept) + margin)
    fig.suptitle("final eval loss per cell (dots), group mean ± sample std (squares), "
                 "left out (x, if in range)")
    fig.savefig(path, dpi=110)


def plot_gaps(summary: Mapping[str, Any], path: Path) -> None:
    """Gap to the baseline per variant, one bar per optimizer, error bars = 95% normal interval."""
    variants = [v for v in summary["variants"] if v != summary["settings"]["baseline_norm"]]
    optims = summary["optims"]
    gaps = {(g["variant"], g["optim"]): g for g in summary["gaps"]}
    fig = _figure(figsize=(max(4.5, 1.2 * len(variants) * len(optims)), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(optims))
    for k, optim in enumerate(optims):
        xs, values, errors = [], [], []
        for x, variant in enumerate(variants):
            gap = gaps.get((variant, optim))
            if gap is not None:
                xs.append(x + (k - (len(optims) - 1) / 2) * width)
                values.append(gap["value"])
                errors.append(Z95 * gap["se"] if gap["se"] is not None else 0.0)
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=optim, color=f"C{k % 10}", alpha=0.8)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(variants)), [_tick_label(v) for v in variants], fontsize=7)
    ax.set_ylabel(f"gap to {summary['settings']['baseline_norm']} (nats)")
    ax.set_title("gap to the baseline norm per optimizer (95% normal interval)")
    ax.grid(alpha=0.3, axis="y")
    if optims:
        ax.legend()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- edges


def write_report(root: str | Path, out: str | Path | None = None, *, baseline_norm: str = "rmsnorm",
                 reference_optim: str = "adamw", smoothing: float = 0.9,
                 fixes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the cells under ``root``, write report.md, summary.json and the PNG plots into
    ``out`` (default ``root``), and return the summary (with "files": the paths written).
    ``fixes`` maps a variant or norm to the norm it fixes (default DEFAULT_FIXES)."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
    root = Path(root)
    out = root if out is None else Path(out)
    cells = discover_cells(root)
    summary = build_summary(cells, baseline_norm=baseline_norm, reference_optim=reference_optim, fixes=fixes)
    summary["root"] = str(root)
    out.mkdir(parents=True, exist_ok=True)
    plots = {name: out / filename for name, filename in PLOT_FILES.items()}
    plot_loss_curves(cells, summary, plots["loss_curves"], smoothing)
    plot_final_losses(summary, plots["final_eval_loss"])
    plot_gaps(summary, plots["gaps"])
    files = {"report": out / "report.md", "summary": out / "summary.json", **plots}
    summary["settings"]["smoothing"] = smoothing
    summary["files"] = {name: str(p) for name, p in files.items()}
    files["report"].write_text(render_markdown(summary, {n: p.name for n, p in plots.items()}))
    files["summary"].write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


def _parse_fix(text: str) -> tuple[str, str]:
    variant, sep, norm = text.partition("=")
    if not sep or not variant or not norm:
        raise argparse.ArgumentTypeError(f"expected VARIANT=NORM, got {text!r}")
    return variant, norm


def report_main(argv: Sequence[str] | None = None) -> int:
    """``normopt report ROOT [--out DIR] [--baseline-norm rmsnorm] [--reference-optim adamw]
    [--smoothing 0.9] [--fix VARIANT=NORM ...]``: write the report, print the main tables and
    the paths written. Raises UserError (exit 2 in the CLI) for a bad root or unreadable files."""
    parser = argparse.ArgumentParser(
        prog="normopt report",
        description="Summarize a factorial experiment: one subfolder of ROOT per cell (run directory).")
    parser.add_argument("root", help="folder holding one run directory per cell")
    parser.add_argument("--out", default=None, help="where to write report.md, summary.json, plots (default: ROOT)")
    parser.add_argument("--baseline-norm", default="rmsnorm", help="norm the gaps are measured against")
    parser.add_argument("--reference-optim", default="adamw", help="optimizer the interactions are measured against")
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA factor for the train-loss curves, in [0, 1)")
    parser.add_argument("--fix", type=_parse_fix, action="append", default=[], metavar="VARIANT=NORM",
                        help=f"declare a fix arm (added to the defaults {DEFAULT_FIXES})")
    args = parser.parse_args(argv)
    summary = write_report(args.root, args.out, baseline_norm=args.baseline_norm,
                           reference_optim=args.reference_optim, smoothing=args.smoothing,
                           fixes={**DEFAULT_FIXES, **dict(args.fix)})
    print(main_table(summary))
    if summary["interactions"]:
        print()
        print(interaction_table(summary))
    left_out = [c["name"] for c in summary["cells"] if not c["included"]]
    if left_out:
        print(f"\nleft out ({len(left_out)}): {', '.join(left_out)} (see report.md)")
    print()
    for path in summary["files"].values():
        print(f"wrote {path}")
    return 0
