"""Reading a factorial experiment's cells: run directories and what the report uses of them.

A cell is one run directory (one subfolder of the experiment root). The report reads only
what runs leave behind (file names: :mod:`normopt.run_dir`):

* the metrics log: training lines ``{"step", "loss", ...}`` and evaluation lines
  ``{"step", "eval_loss"}`` (non-finite numbers spelled "nan"/"inf"/"-inf");
* the config: the cell's coordinates (``model.norm``, ``optim.name``, ``train.seed``), its
  length (``train.steps``) and the settings an arm is inferred from;
* ``cell.json`` (optional, written by a factorial runner): ``{"name", "coords": {axis: value},
  "seed", "arm", "exit_code"}``; what it names wins over the config;
* the diagnostics log (optional, written by the trainer): one record a line,
  ``{"step", "kind", ...}``; ``read_diagnostics`` keeps the kinds the report shows (norm-layer
  saturation, spectral norms of the weight matrices, loss by token-frequency bucket, the
  singular-value isotropy of updates and weights).

Placing cells into arms is :mod:`normopt.report.cells.arms`; flagging cells that cannot count
is :mod:`normopt.report.cells.cell_assessment`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normopt.config import flat_config
from normopt.diagnostics.isotropy import IsotropyMeans
from normopt.diagnostics.registry import DIAGNOSTICS
from normopt.diagnostics.tail_tokens import TailTokens
from normopt.errors import UserError
from normopt.metrics.jsonl import read_step_records
from normopt.metrics.record_fields import parse_metric
from normopt.report.cells.cost import read_cost
from normopt.report.cells.report_axes import NORM_KEY, OPTIM_KEY
from normopt.run_dir import MARKER_FILES, RecordKind, RunDir

# A cell's coordinates: the config keys, and the cell.json axes naming them under the names a
# runner may use (short or the config key)
SEED_KEY = "train.seed"
NORM_AXES = ("norm", NORM_KEY)
OPTIM_AXES = ("optim", OPTIM_KEY)
SEED_AXES = ("seed", SEED_KEY)


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
    coords: Mapping[str, Any] = field(default_factory=dict)  # cell.json's axis -> value, as written
    cost: Mapping[str, Any] | None = None  # report.cost.read_cost of metrics.jsonl

    @property
    def variant(self) -> str:
        return variant_label(self.norm, self.arm)


def variant_label(norm: str | None, arm: str | None) -> str:
    """``norm`` for a norm's base cells, ``norm[arm]`` for an arm of it; an arm named after
    its own norm (a spec's ``derf_ema: {model.norm: derf_ema, ...}``) is just ``norm``."""
    return f"{norm}[{arm}]" if arm and arm != norm else str(norm)


def read_metrics(path: Path) -> Metrics:
    """Parse ``metrics.jsonl``. A later line for a step replaces an earlier one (a resumed run
    that was not truncated logs some steps twice). An unterminated last line that does not
    parse is skipped (a killed writer leaves one); any other bad line is a UserError."""

    def parse(record: dict[str, Any]) -> tuple[int, float | None, float | None, float | None]:
        return (
            record["step"],
            parse_metric(record["loss"]) if "loss" in record else None,
            parse_metric(record["eval_loss"]) if "eval_loss" in record else None,
            parse_metric(record["unigram_entropy"]) if "unigram_entropy" in record else None,
        )

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
class Diagnostics:
    """What the report shows of one cell's ``diagnostics.jsonl``: per-step series sorted by step,
    one value per step (a later record for a step replaces an earlier one, as in metrics.jsonl).

    saturation at a step = the mean of ``saturation`` over the norm layers that report one (the
    bounded ones; an RMSNorm layer reports null); spectral_norm at a step = the mean of the
    logged spectral norms of the block matrices (``spectral_norm_groups``: MoE experts one by
    one; the embedding and output matrices are not block matrices and are reported apart, in
    ``spectral_groups``, the last record's summary). A NaN/Inf among the averaged values makes
    the mean NaN/Inf; null values are left out."""

    saturation: tuple[tuple[int, float], ...]  # (step, mean saturation over bounded norm layers)
    saturation_layers: Mapping[str, float]  # each bounded layer's saturation at the last such step
    spectral_norm: tuple[tuple[int, float], ...]  # (step, mean spectral norm over the block matrices)
    tail_tokens: TailTokens | None  # the tail_tokens record with the largest step
    partial_last_line: bool = False  # an unterminated last line was skipped
    # (step, layer name -> saturation) for every step with a bounded layer: what a mean hides
    saturation_by_step: tuple[tuple[int, Mapping[str, float]], ...] = ()
    run: Mapping[str, Any] | None = None  # the last "run" record (n_params, n_layers, ...), if any
    isotropy: IsotropyMeans | None = None  # the isotropy record with the largest step
    spectral_groups: Mapping[str, Any] | None = None  # spectral_norm_groups of the last record
    # every other registered diagnostic (a plugin's): kind -> its ``read`` of the last record
    others: Mapping[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No record of a kind the report shows."""
        return not (self.saturation or self.spectral_norm or self.tail_tokens)


def _mean(values: Sequence[float]) -> float:
    # plain sum, not math.fsum: inf + -inf gives nan here where fsum raises
    return sum(values) / len(values)


# the kinds the report's own sections show (the rest: Diagnostics.others)
BUILT_IN_KINDS = (
    RecordKind.RUN,
    RecordKind.NORM,
    RecordKind.SPECTRAL_NORM,
    RecordKind.NS_SPECTRUM,
    RecordKind.TAIL_TOKENS,
    RecordKind.ISOTROPY,
)


def read_diagnostics(path: Path) -> Diagnostics:
    """Parse ``diagnostics.jsonl``: one JSON object a line with an integer "step" and a "kind".
    Each kind the diagnostics registry holds is read by its diagnostic's ``read``
    (diagnostics/registry.py): "norm" (per-layer ``saturation``), "spectral_norm"
    (``matrices``: name -> spectral norm, summarised), "tail_tokens" (``bucket_loss``,
    ``bucket_token_share``, ``bucket_vocab_size``), "isotropy" (``groups``: "type/group" ->
    update_entropy, update_erank, weight_entropy, weight_erank) and a plugin's own kinds;
    "run" is the run's description, as written; other kinds are ignored. Numbers may be
    null or "nan"/"inf"/"-inf". As in ``read_metrics``, an unterminated last line that does
    not parse is skipped and any other bad line is a UserError."""
    readers = {kind: cls.read for kind, cls in DIAGNOSTICS.items()}
    readers[RecordKind.RUN] = dict

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
    saturation, spectral = by_kind[RecordKind.NORM], by_kind[RecordKind.SPECTRAL_NORM]
    tails, runs, isotropy = by_kind[RecordKind.TAIL_TOKENS], by_kind[RecordKind.RUN], by_kind[RecordKind.ISOTROPY]
    saturation = {s: layers for s, layers in sorted(saturation.items()) if layers}
    return Diagnostics(
        saturation=tuple((s, _mean(list(layers.values()))) for s, layers in saturation.items()),
        saturation_layers=saturation[max(saturation)] if saturation else {},
        spectral_norm=tuple((s, g["blocks"]) for s, g in sorted(spectral.items()) if g["blocks"] is not None),
        spectral_groups=spectral[max(spectral)] if spectral else None,
        tail_tokens=tails[max(tails)] if tails else None,
        partial_last_line=partial,
        saturation_by_step=tuple(saturation.items()),
        run=runs[max(runs)] if runs else None,
        isotropy=isotropy[max(isotropy)] if isotropy else None,
        others={
            kind: by_step[max(by_step)]
            for kind, by_step in by_kind.items()
            if kind not in BUILT_IN_KINDS and by_step and by_step[max(by_step)] is not None
        },
    )


# --------------------------------------------------------------------------- config and cells


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
    return flat_config(loaded)


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
    run = RunDir(folder)
    info = _read_cell_json(run.cell_json)
    config = _read_config(run.config)
    coords = info.get("coords", {})
    norm = _first(coords, NORM_AXES) or config.get(NORM_KEY)
    optim = _first(coords, OPTIM_AXES) or config.get(OPTIM_KEY)
    seed = info.get("seed")
    if seed is None:
        seed = _first(coords, SEED_AXES)
    if seed is None:
        seed = config.get(SEED_KEY)
    arm = info.get("arm")
    return Cell(
        name=str(info.get("name") or folder.name),
        path=folder,
        norm=None if norm is None else str(norm),
        optim=None if optim is None else str(optim),
        seed=_as_int(seed, "seed", folder),
        arm=None if arm is None or arm == "" else str(arm),
        arm_explicit="arm" in info,
        config=config,
        steps=_as_int(config.get("train.steps"), "train.steps", run.config),
        metrics=read_metrics(run.metrics) if run.metrics.is_file() else None,
        exit_code=_as_int(info.get("exit_code"), "exit_code", run.cell_json),
        diagnostics=read_diagnostics(run.diagnostics) if run.diagnostics.is_file() else None,
        coords=dict(coords),
        cost=read_cost(run.metrics),
    )


def discover_cells(root: Path) -> list[Cell]:
    """Every direct subfolder of ``root`` holding one of the run directory's MARKER_FILES
    (config.yaml, cell.json, metrics.jsonl) is a cell (hidden folders are skipped); sorted by
    folder name."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    folders = [
        d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and RunDir(d).has_marker()
    ]
    if not folders:
        hint = (
            "; it looks like a single run directory: pass the folder that holds the cells"
            if RunDir(root).has_marker()
            else ""
        )
        raise UserError(f"{root}: no cells found (expected subfolders with {', '.join(MARKER_FILES)}){hint}")
    return [load_cell(d) for d in folders]
