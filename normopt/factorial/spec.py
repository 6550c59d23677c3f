"""A factorial spec: reading and checking it (``load_spec``) and the cells it expands to
(``expand_cells``).

A spec (YAML) names a base config, settings for every cell, axes whose values are
crossed, optional arms (extra settings crossed with the axes they do not set) and seeds::

    base: configs/demo.yaml
    root: runs/factorial-tiny            # one run directory per cell below it
    set: {train.steps: 100}
    axes:
      model.norm: [rmsnorm, dyt, derf, derf_ema]
      optim.name: [adamw, muon]
    arms:
      alpha0.3: {model.norm: derf, model.alpha_init_attn: 0.3}
    seeds: [0, 1]
    slurm: {gpus_per_node: 8, nodes: 1, options: [--time=24:00:00]}   # optional, for --slurm
    plugins: [my_norm.py]                # optional: loaded here and by every cell (normopt/plugins.py)
    report: {compare: model.norm, baseline: rmsnorm, across: optim.name, reference: adamw}
    tune: {key: optim.lr, values: [1.0e-3, 3.0e-3], seeds: [100], steps: 50}   # optional

``report`` (optional) says what the report compares (:mod:`normopt.report.cells.axes`):
the axis whose levels are measured against a baseline level, the axis across which those gaps
are compared (at a reference level), and ``fixes`` (level -> the level whose gap it recovers).
Without it: norm x optimizer when both are axes, else the first axis against its first level
across the second axis. ``tune`` (optional) chooses one key's value per cell on separate tuning
seeds before the cell's seeds run (:mod:`normopt.factorial.tuning`). The runner writes the axes
and these settings into the root's ``experiment.json``, where ``normopt report ROOT`` finds them.

Cell names join the axis values (``derf-muon-s0``; arms ``alpha0.3-muon-s0``). Every cell's
global batch must split evenly over the ranks it will run on (``--nproc``, or the GPUs of a
SLURM node): that is checked when the spec is read, before anything runs.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from normopt.config import REPO_ROOT, check_world_size, load_config, load_config_plugins
from normopt.errors import UserError
from normopt.factorial.cells import CellSpec, format_value
from normopt.factorial.slurm import check_slurm_section
from normopt.factorial.tuning import read_tune_section, tuning_cells
from normopt.report.cells.axes import axes_from_levels, short_axis_name

SPEC_KEYS = {"base", "root", "set", "axes", "arms", "seeds", "slurm", "report", "tune", "plugins"}


def _resolve_path(text: str, spec_dir: Path) -> Path:
    """A path as given if it exists from here, else relative to the spec, else to the repo."""
    for candidate in (Path(text), spec_dir / text, REPO_ROOT / text):
        if candidate.exists():
            return candidate
    raise UserError(f"base: config file not found: {text}")


ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


def _value_label(value: Any) -> str:
    return format_value(value).replace("/", "_") or "none"


def expand_cells(spec: dict[str, Any]) -> list[CellSpec]:
    """Axes crossed with seeds, then every arm crossed with the axes it does not set."""
    axes: dict[str, list] = spec["axes"]
    seeds: list[int] = spec["seeds"]
    common: dict[str, Any] = spec.get("set") or {}
    cells: list[CellSpec] = []

    def add(values: dict[str, Any], seed: int, arm: str | None, arm_settings: dict[str, Any]) -> None:
        labels = [_value_label(v) for v in values.values()]
        group = "-".join(([arm] if arm else []) + labels)
        settings = {**common, **values, **arm_settings, "train.seed": seed}
        coords = {short_axis_name(k): v for k, v in {**values, **arm_settings}.items() if k in axes}
        cells.append(CellSpec(f"{group}-s{seed}" if group else f"s{seed}", settings, coords, seed, arm, group=group))

    for combo in itertools.product(*axes.values()):
        for seed in seeds:
            add(dict(zip(axes, combo)), seed, None, {})
    for arm, arm_settings in (spec.get("arms") or {}).items():
        free = [k for k in axes if k not in arm_settings]
        for combo in itertools.product(*(axes[k] for k in free)):
            for seed in seeds:
                add(dict(zip(free, combo)), seed, arm, dict(arm_settings))
    return cells


def read_spec_file(path: Path) -> Any:
    """The spec file's YAML, unchecked (``load_spec`` checks it)."""
    if not path.is_file():
        raise UserError(f"spec file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: cannot parse YAML ({str(exc).splitlines()[0]})") from None


def load_spec(path: str | Path, world_size: int | None = None) -> tuple[dict[str, Any], Path, list[CellSpec]]:
    """Read and check a spec; every cell's config is validated before anything runs, and
    with ``world_size`` also whether its global batch splits evenly over that many ranks."""
    path = Path(path)
    spec = read_spec_file(path)
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a spec is a mapping with keys {', '.join(sorted(SPEC_KEYS))}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{path}: unknown spec key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("base", "root", "axes", "seeds"):
        if key not in spec:
            raise UserError(f"{path}: missing spec key {key!r}")
    load_config_plugins(spec.get("plugins"), path)  # before any cell's config is read
    axes = spec["axes"]
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise UserError(f"{path}: axes must map config keys to non-empty lists of values")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise UserError(f"{path}: seeds must be a non-empty list of integers >= 0")
    for key in ("set", "arms"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise UserError(f"{path}: {key} must be a mapping")
    for arm, settings in (spec.get("arms") or {}).items():
        if not isinstance(arm, str) or not ARM_NAME.fullmatch(arm):
            raise UserError(
                f"{path}: arm name {arm!r} must be letters, digits, '_', '.', '=', '+' or '-' "
                f"(it names folders under the grid root)"
            )
        if not isinstance(settings, dict) or not settings:
            raise UserError(f"{path}: arm {arm!r} must map config keys to values")
    check_slurm_section(spec, path)
    if spec.get("report") is not None and not isinstance(spec["report"], dict):
        raise UserError(f"{path}: report must be a mapping")
    try:
        axes_from_levels(axes, spec.get("report"))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    base = _resolve_path(str(spec["base"]), path.parent)
    if not isinstance(spec["root"], str) or not spec["root"].strip():
        raise UserError(f"{path}: root must be a non-empty folder path, got {spec['root']!r}")
    root = Path(spec["root"])
    if root.exists() and not root.is_dir():
        raise UserError(f"{path}: root {root} exists and is not a folder")
    cells = expand_cells(spec)
    names = [c.name for c in cells]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{path}: two cells would share the name {duplicate!r}")
    for name in names:  # each cell is one folder directly under the root, whatever its values
        if name in (".", "..") or "\x00" in name or (root / name).resolve().parent != root.resolve():
            raise UserError(f"{path}: cell name {name!r} does not name a folder directly under the root {root}")
    for cell in cells:
        cell.overrides = [f"{k}={format_value(v)}" for k, v in cell.settings.items()]
        cell.overrides.append(f"run.dir={root / cell.name}")
    tune = read_tune_section(spec, path)
    runs = [] if tune is None else tuning_cells(cells, tune, root)
    for cell in [*cells, *runs]:
        try:
            cfg = load_config(base, cell.overrides)
            if world_size is not None:
                check_world_size(cfg, world_size)
        except UserError as exc:
            raise UserError(f"cell {cell.name}: {exc}") from None
    return spec, base, cells
