"""Reading a factorial experiment's cells: run directories, their metrics, arms and flags.

A cell is one run directory (one subfolder of the experiment root). The report reads only
what runs leave behind:

* ``metrics.jsonl``: training lines ``{"step", "loss", ...}`` and evaluation lines
  ``{"step", "eval_loss"}`` (non-finite numbers spelled "nan"/"inf"/"-inf");
* ``config.yaml``: the cell's coordinates (``model.norm``, ``optim.name``, ``train.seed``),
  its length (``train.steps``) and the settings an arm is inferred from;
* ``cell.json`` (optional, written by a factorial runner): ``{"name", "coords": {axis: value},
  "seed", "arm", "exit_code"}``; what it names wins over config.yaml;
* ``diagnostics.jsonl`` (optional, written by the trainer): one record a line,
  ``{"step", "kind", ...}``; ``read_diagnostics`` keeps the kinds the report shows (norm-layer
  saturation, spectral norms of the weight matrices, loss by token-frequency bucket).

Besides reading, this module places cells: their arm (settings that differ from the baseline
norm's cells, ``assign_arms``), the norm an arm or fix variant is a fix of (``fix_base``), and
the per-cell assessment that flags cells which are missing, diverged, stopped early or cannot
be placed (``assess_cell``); flagged cells are left out of every statistic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from normopt.errors import DIVERGED_EXIT_CODE, UserError
from normopt.metrics.jsonl import read_step_records

# A run whose loss ends this far above its own best value has blown up, even without a NaN.
# One nat is far beyond seed noise or a late-training bump (both are hundredths of a nat) and
# far below the rise of a real divergence (the loss returns towards ln(vocab), several nats).
DIVERGENCE_NATS = 1.0
# A cell whose final eval loss is not at least this far below the unigram entropy of its
# training tokens (the loss of the best model that ignores context) learned almost nothing
# beyond token frequencies: it is kept in the statistics, but flagged, since gaps between
# such cells measure noise more than the norm or the optimizer.
CONTEXT_MARGIN_NATS = 0.1
CELL_FILES = ("config.yaml", "cell.json", "metrics.jsonl")
DIAGNOSTICS_FILE = "diagnostics.jsonl"
FLAGS = ("missing", "diverged", "stopped_early", "unplaced")
# cell.json coordinate axes, under the names a runner may use (short or the config key)
NORM_AXES = ("norm", "model.norm")
OPTIM_AXES = ("optim", "optim.name")
SEED_AXES = ("seed", "train.seed")
# Config keys that never make an arm: the cell's own coordinates, bookkeeping, and execution
# choices that do the same math (placement, accumulation split, logging cadence).
NON_ARM_SECTIONS = frozenset({"run", "checkpoint", "diagnostics"})
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
    unigram_entropy: float | None = None  # of the training tokens (eval lines carry it)


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
    diagnostics: Diagnostics | None = None  # None = no diagnostics.jsonl

    @property
    def variant(self) -> str:
        return variant_label(self.norm, self.arm)


def variant_label(norm: str | None, arm: str | None) -> str:
    """``norm`` for a norm's base cells, ``norm[arm]`` for an arm of it; an arm named after
    its own norm (a spec's ``derf_ema: {model.norm: derf_ema, ...}``) is just ``norm``."""
    return f"{norm}[{arm}]" if arm and arm != norm else str(norm)


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
    def parse(record: dict[str, Any]) -> tuple[int, float | None, float | None, float | None]:
        return (record["step"],
                parse_metric(record["loss"]) if "loss" in record else None,
                parse_metric(record["eval_loss"]) if "eval_loss" in record else None,
                parse_metric(record["unigram_entropy"]) if "unigram_entropy" in record else None)

    records, partial = read_step_records(path, "metrics", parse)
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    entropy = None
    for step, loss, eval_loss, unigram in records:
        if loss is not None:
            train[step] = loss
        if eval_loss is not None:
            evals[step] = eval_loss
        entropy = unigram if unigram is not None else entropy
    last_step = max((step for step, *_ in records), default=None)
    return Metrics(tuple(sorted(train.items())), tuple(sorted(evals.items())), last_step, partial, entropy)


# --------------------------------------------------------------------------- diagnostics.jsonl


@dataclass(frozen=True)
class TailTokens:
    """One ``tail_tokens`` record: validation loss by token-frequency bucket, ordered from the
    most frequent tokens (bucket 0, the head) to the rarest (the last bucket, the tail)."""

    step: int
    bucket_loss: tuple[float | None, ...]  # mean cross-entropy (nats) over the bucket's targets; None = empty
    bucket_token_share: tuple[float | None, ...] = ()  # the bucket's share of the target tokens
    bucket_vocab_size: tuple[int | None, ...] = ()  # vocabulary entries in the bucket


@dataclass(frozen=True)
class Diagnostics:
    """What the report shows of one cell's ``diagnostics.jsonl``: per-step series sorted by step,
    one value per step (a later record for a step replaces an earlier one, as in metrics.jsonl).

    saturation at a step = the mean of ``saturation`` over the norm layers that report one (the
    bounded ones; an RMSNorm layer reports null); spectral_norm at a step = the mean of the
    logged spectral norms of the weight matrices. A NaN/Inf among the averaged values makes the
    mean NaN/Inf; null values are left out."""

    saturation: tuple[tuple[int, float], ...]  # (step, mean saturation over bounded norm layers)
    saturation_layers: Mapping[str, float]  # each bounded layer's saturation at the last such step
    spectral_norm: tuple[tuple[int, float], ...]  # (step, mean spectral norm over the matrices)
    tail_tokens: TailTokens | None  # the tail_tokens record with the largest step
    partial_last_line: bool = False  # an unterminated last line was skipped

    @property
    def empty(self) -> bool:
        """No record of a kind the report shows."""
        return not (self.saturation or self.spectral_norm or self.tail_tokens)


def _optional_metric(value: Any) -> float | None:
    """null -> None, else ``parse_metric``."""
    return None if value is None else parse_metric(value)


def _mean(values: Sequence[float]) -> float:
    # plain sum, not math.fsum: inf + -inf gives nan here where fsum raises
    return sum(values) / len(values)


def _mapping(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = record.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"'{key}' is not an object")
    return value


def _number_list(record: Mapping[str, Any], key: str, required: bool = True) -> tuple[float | None, ...]:
    if key not in record and not required:
        return ()
    value = record.get(key)
    if not isinstance(value, list):
        raise ValueError(f"'{key}' is not a list")
    return tuple(_optional_metric(v) for v in value)


def _saturations(record: Mapping[str, Any]) -> dict[str, float]:
    """layer name -> saturation, for the layers of a ``norm`` record that report one."""
    found = {}
    for name, layer in _mapping(record, "layers").items():
        if not isinstance(layer, Mapping):
            raise ValueError(f"layer {name!r} is not an object")
        value = _optional_metric(layer.get("saturation"))
        if value is not None:
            found[str(name)] = value
    return found


def _spectral_norms(record: Mapping[str, Any]) -> list[float]:
    values = [_optional_metric(v) for v in _mapping(record, "matrices").values()]
    return [v for v in values if v is not None]


def _tail_tokens(step: int, record: Mapping[str, Any]) -> TailTokens:
    sizes = record.get("bucket_vocab_size", [])
    if not isinstance(sizes, list) or any(s is not None and (isinstance(s, bool) or not isinstance(s, int))
                                          for s in sizes):
        raise ValueError("'bucket_vocab_size' is not a list of integers")
    return TailTokens(step, _number_list(record, "bucket_loss"), _number_list(record, "bucket_token_share", False),
                      tuple(sizes))


def read_diagnostics(path: Path) -> Diagnostics:
    """Parse ``diagnostics.jsonl``: one JSON object a line with an integer "step" and a "kind".
    Kept: "norm" (per-layer ``saturation``), "spectral_norm" (``matrices``: name -> spectral
    norm) and "tail_tokens" (``bucket_loss``, ``bucket_token_share``, ``bucket_vocab_size``);
    other kinds are ignored. Numbers may be null or "nan"/"inf"/"-inf". As in ``read_metrics``,
    an unterminated last line that does not parse is skipped and any other bad line is a
    UserError."""
    readers = {"norm": _saturations, "spectral_norm": _spectral_norms,
               "tail_tokens": lambda r: _tail_tokens(r["step"], r)}

    def parse(record: dict[str, Any]) -> tuple[str, int, Any]:
        kind = record.get("kind")
        if not isinstance(kind, str):
            raise ValueError(f"kind {kind!r} is not a string")
        reader = readers.get(kind)
        return kind, record["step"], reader(record) if reader else None

    records, partial = read_step_records(path, "diagnostics", parse)
    by_kind: dict[str, dict[int, Any]] = {kind: {} for kind in readers}
    for kind, step, parsed in records:
        if kind in by_kind:
            by_kind[kind][step] = parsed  # a later line for a step replaces an earlier one
    saturation, spectral, tails = by_kind["norm"], by_kind["spectral_norm"], by_kind["tail_tokens"]
    saturation = {s: layers for s, layers in sorted(saturation.items()) if layers}
    return Diagnostics(
        saturation=tuple((s, _mean(list(layers.values()))) for s, layers in saturation.items()),
        saturation_layers=saturation[max(saturation)] if saturation else {},
        spectral_norm=tuple((s, _mean(v)) for s, v in sorted(spectral.items()) if v),
        tail_tokens=tails[max(tails)] if tails else None,
        partial_last_line=partial,
    )


# --------------------------------------------------------------------------- config and cells


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
    diagnostics_path = folder / DIAGNOSTICS_FILE
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
        diagnostics=read_diagnostics(diagnostics_path) if diagnostics_path.is_file() else None,
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


def learned_no_context(final_loss: float | None, unigram_entropy: float | None,
                       margin: float = CONTEXT_MARGIN_NATS) -> bool | None:
    """True when final_loss > unigram_entropy - margin; None when either is unknown."""
    if final_loss is None or unigram_entropy is None:
        return None
    return final_loss > unigram_entropy - margin


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

