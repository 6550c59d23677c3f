"""A spec's ``tune`` block: a value of one config key (the learning rate) chosen per cell before
the cell's evaluation seeds run::

    tune:
      key: optim.lr                 # the tuned config key (not an axis, not in set or an arm)
      values: [1.0e-3, 3.0e-3, 1.0e-2]
      by: final_eval_loss           # the choice's metric (the only one so far)
      seeds: [100]                  # tuning seeds, disjoint from the spec's seeds
      steps: 40                     # optional: a shorter horizon for the tuning runs (it
                                    # replaces a train.tokens_per_param of the cells)

Every cell of the grid without its seed (``derf-muon``, ``alpha0.3-muon``: its *group*) runs
every value on every tuning seed, as ``ROOT/tuning/<group>-<key><value>-s<seed>`` (with its own
full learning-rate schedule over ``steps``). Once a group's tuning runs have finished, the
value is chosen (:func:`normopt.report.stats.tuning_choice.choose_value`: lowest mean, diverged values
excluded, ties to the value listed first; a run not finished, not run yet or stopped early,
makes the group wait, and rerunning resumes it) and the group's evaluation cells (``ROOT/<group>-s<seed>``,
the spec's seeds) run at it. The tuning seeds must differ from the evaluation seeds, so
that the losses the report compares were not used to choose (the report's tuning section).

Re-running skips finished tuning runs and evaluation cells; an evaluation cell that ran at
another value than the tuning runs now choose is refused rather than mixed in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from normopt.config import flat_config
from normopt.errors import DIVERGED_EXIT_CODE, UserError
from normopt.factorial.cells import CellSpec, format_value
from normopt.job_record import recorded_exit_status
from normopt.report.cells.axes import level_label
from normopt.report.cells.cell_assessment import assess_cell
from normopt.report.cells.cell_reading import load_cell
from normopt.report.cells.tuning_runs import TUNING_DIR, TUNING_FILE
from normopt.report.stats.tuning_choice import METRICS, Choice, ValueOutcome, choose_value
from normopt.run_dir import RunDir

TUNE_KEYS = {"key", "values", "by", "seeds", "steps"}
# keys a tuning run sets itself or that name the run, never the tuned one
RESERVED_KEYS = {"train.seed", "train.steps", "run.dir"}


@dataclass(frozen=True)
class TuneSpec:
    key: str
    values: tuple[Any, ...]
    by: str
    seeds: tuple[int, ...]
    steps: int | None  # None = the evaluation cells' train.steps

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "values": list(self.values),
            "by": self.by,
            "seeds": list(self.seeds),
            "steps": self.steps,
        }


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_tune_section(spec: Mapping[str, Any], path: Path) -> TuneSpec | None:
    """The spec's ``tune`` block, checked (module docstring); None without one."""
    raw = spec.get("tune")
    if raw is None:
        return None
    where = f"{path}: tune"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping with keys {', '.join(sorted(TUNE_KEYS))}")
    unknown = set(raw) - TUNE_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(TUNE_KEYS))})")
    for name in ("key", "values", "seeds"):
        if name not in raw:
            raise UserError(f"{where}: missing key {name!r}")
    key = raw["key"]
    if not isinstance(key, str) or "." not in key:
        raise UserError(f"{where}.key must be a dotted config key like optim.lr, got {key!r}")
    if key in spec["axes"]:
        raise UserError(f"{where}.key {key} is an axis: a tuned key is chosen per cell, not crossed")
    if key in (spec.get("set") or {}):
        raise UserError(f"{where}.key {key} is also in set: the tuning chooses its value, remove it from set")
    arm = next((a for a, settings in (spec.get("arms") or {}).items() if key in settings), None)
    if arm is not None:
        raise UserError(f"{where}.key {key} is set by arm {arm!r}: the tuning chooses its value for every cell")
    if key in RESERVED_KEYS:
        raise UserError(f"{where}.key cannot be {key} (the tuning runs set it themselves)")
    values = raw["values"]
    if not isinstance(values, list) or len(values) < 2 or any(isinstance(v, (dict, list)) or v is None for v in values):
        raise UserError(f"{where}.values must be a list of at least 2 plain values, got {values!r}")
    labels = [level_label(v) for v in values]
    if len(set(labels)) != len(labels):
        raise UserError(f"{where}.values lists {next(v for v in labels if labels.count(v) > 1)} twice")
    by = raw.get("by", "final_eval_loss")
    if by not in METRICS:
        raise UserError(f"{where}.by must be one of {', '.join(METRICS)}, got {by!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_seed(s) for s in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"{where}.seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    shared = sorted(set(seeds) & set(spec["seeds"]))
    if shared:
        raise UserError(
            f"{where}.seeds share {', '.join(map(str, shared))} with seeds (the evaluation seeds): "
            "a seed that chose the value would bias its own loss, so use other seeds"
        )
    steps = raw.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"{where}.steps must be an integer >= 1, got {steps!r}")
    return TuneSpec(key, tuple(values), by, tuple(seeds), steps)


def _short_key(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def tuning_cells(cells: Sequence[CellSpec], tune: TuneSpec, root: Path) -> list[CellSpec]:
    """One run per (group, value, tuning seed), settings copied from the group's first
    evaluation cell; named ``<group>-<key><value>-s<seed>`` under ``root/tuning``."""
    firsts = {}
    for cell in cells:
        firsts.setdefault(cell.group, cell)
    runs = []
    for group, cell in firsts.items():
        for value in tune.values:
            for seed in tune.seeds:
                label = level_label(value).replace("/", "_")
                # tune.steps is the tuning runs' own horizon: it replaces a train.tokens_per_param
                settings = {
                    **cell.settings,
                    tune.key: value,
                    "train.seed": seed,
                    **({"train.steps": tune.steps, "train.tokens_per_param": 0} if tune.steps is not None else {}),
                }
                name = f"{group}-{_short_key(tune.key)}{label}-s{seed}"
                # the tuned key is a coordinate too: `normopt report ROOT/tuning` then analyses
                # each value on its own (a stratum) instead of pooling the values
                run = CellSpec(
                    name,
                    settings,
                    {**cell.coords, tune.key: value},
                    seed,
                    cell.arm,
                    group=group,
                    record={"tune": {"key": tune.key, "value": value}},
                )
                run.overrides = [f"{k}={format_value(v)}" for k, v in settings.items()]
                run.overrides.append(f"run.dir={root / TUNING_DIR / name}")
                runs.append(run)
    return runs


def tuning_outcomes(root: Path, tune: TuneSpec, runs: Sequence[CellSpec]) -> dict[str, list[ValueOutcome]]:
    """Per group, per value (spec order): the final eval losses of the tuning runs that count
    (with their seeds) and why the others do not (not run yet, diverged, stopped early)."""
    found: dict[tuple[str, str], tuple[list[float], list[str], list[int]]] = {}
    for run in runs:
        losses, failures, seeds = found.setdefault((run.group, level_label(run.record["tune"]["value"])), ([], [], []))
        folder = root / TUNING_DIR / run.name
        if not RunDir(folder).metrics.is_file():
            failures.append(f"incomplete: {run.name} has not run")
            continue
        cell = load_cell(folder)
        assessment = assess_cell(cell)
        if recorded_exit_status(RunDir(folder)) == DIVERGED_EXIT_CODE and "diverged" not in assessment.flags:
            # it stopped before an update whose gradient norm was not finite: the losses it logged are
            last = cell.metrics.last_step if cell.metrics else None
            failures.append(
                f"{run.name}: diverged: exited {DIVERGED_EXIT_CODE} (loss or gradient norm not finite) "
                f"after step {last}"
            )
        elif not assessment.flags:
            losses.append(assessment.final_eval_loss)
            seeds.append(run.seed)
        elif set(assessment.flags) <= {"missing", "stopped_early"}:
            failures.append(f"incomplete: {run.name}: {'; '.join(assessment.reasons)}")
        else:
            failures.append(f"{run.name}: {'; '.join(assessment.reasons)}")
    groups = list(dict.fromkeys(run.group for run in runs))
    return {g: [ValueOutcome(v, *(tuple(x) for x in found[g, level_label(v)])) for v in tune.values] for g in groups}


def choose_values(root: Path, tune: TuneSpec, runs: Sequence[CellSpec]) -> dict[str, Choice]:
    """Each group's choice from its tuning runs as they are on disk now."""
    return {
        group: choose_value(outcomes, len(tune.seeds)) for group, outcomes in tuning_outcomes(root, tune, runs).items()
    }


def write_tuning_file(root: Path, tune: TuneSpec, choices: Mapping[str, Choice] | None = None) -> None:
    """ROOT/tuning/tuning.json: the tune block as run (the report reads it) and, once made, the
    choices (a record for people; the report recomputes them from the runs)."""
    folder = root / TUNING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        **tune.to_json(),
        "choices": {
            group: {
                "chosen": c.chosen,
                "mean": c.metric,
                "runner_up": c.runner_up,
                "margin": c.margin,
                "tied": list(c.tied),
                "at_edge": c.at_edge,
                "excluded": dict(c.excluded),
                "reason": c.reason,
            }
            for group, c in (choices or {}).items()
        },
    }
    (folder / TUNING_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _ran_at(folder: Path, key: str) -> str | None:
    """The value of ``key`` an evaluation cell's run recorded in its config.yaml (None if it has
    not started)."""
    path = RunDir(folder).config
    if not path.is_file():
        return None
    flat = flat_config(yaml.safe_load(path.read_text()) or {})
    return level_label(flat[key]) if key in flat else None


def with_choice(cell: CellSpec, tune: TuneSpec, value: Any) -> CellSpec:
    """The evaluation cell at the chosen value (its override before ``run.dir``)."""
    overrides = [o for o in cell.overrides if not o.startswith("run.dir=")]
    run_dir = [o for o in cell.overrides if o.startswith("run.dir=")]
    return replace(
        cell,
        settings={**cell.settings, tune.key: value},
        overrides=[*overrides, f"{tune.key}={format_value(value)}", *run_dir],
        record={**cell.record, "tuned": {"key": tune.key, "value": value, "by": tune.by}},
    )


def tuned_cells(
    root: Path, tune: TuneSpec, cells: Sequence[CellSpec], choices: Mapping[str, Choice]
) -> tuple[list[CellSpec], list[str]]:
    """The evaluation cells whose group has a choice, at that value, and one line per group
    (its choice, or why it has none and its cells do not run). An evaluation cell that already
    ran at another value is a UserError: its loss would not be at the chosen value."""
    ready, lines = [], []
    for group, choice in choices.items():
        members = [c for c in cells if c.group == group]
        if choice.chosen is None:
            lines.append(
                f"[tuning] {group}: no value chosen ({choice.reason}); its {len(members)} evaluation cell(s) do not run"
            )
            continue
        margin = "" if choice.margin is None else f", {choice.margin:.4f} nats ahead of {level_label(choice.runner_up)}"
        flags = (["at the edge of the range"] if choice.at_edge else []) + (
            [f"excluded {', '.join(choice.excluded)}"] if choice.excluded else []
        )
        lines.append(
            f"[tuning] {group}: {tune.key}={level_label(choice.chosen)} ({tune.by} "
            f"{choice.metric:.4f}{margin}{'; ' + '; '.join(flags) if flags else ''})"
        )
        for cell in members:
            ran = _ran_at(root / cell.name, tune.key)
            if ran is not None and ran != level_label(choice.chosen):
                raise UserError(
                    f"cell {cell.name} ran at {tune.key}={ran} but the tuning runs choose "
                    f"{level_label(choice.chosen)}: move {root / cell.name} away to rerun it"
                )
            ready.append(with_choice(cell, tune, choice.chosen))
    return ready, lines
