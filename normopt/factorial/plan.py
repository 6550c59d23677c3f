"""A grid's plan, ``ROOT/plan.json``: every run of a factorial as ``normopt factorial`` expanded it.

Written by the local runner and by ``--slurm`` alike, before anything runs::

    {"base": "/abs/configs/demo.yaml", "workdir": "/where/it/was/started", "gpus_per_node": 8, "nodes": 1,
     "tune": {"key": "optim.lr", "values": [...], "by": ..., "seeds": [...], "steps": 40} | null,
     "tuning": [CellSpec...], "evaluation": [CellSpec...],
     "to_run": {"tuning": [names], "evaluation": [names]},
     "steps": {name: train.steps}, "step_flops": {name: FLOPs per step}}

``to_run`` names the runs the latest submission runs (a SLURM array task ``i`` runs
``to_run[phase][i]``); ``steps`` and ``step_flops`` (the grid clock's prior cost per step,
:func:`normopt.factorial.grid_clock.cell_step_flops`) let ``normopt status`` say how far each
run is and how long the rest will take without building a model or reading the spec again.
Plain JSON: nothing in it is ever executed or unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from normopt.errors import DIVERGED_EXIT_CODE, UserError
from normopt.factorial.cells import CellSpec
from normopt.factorial.tuning import TuneSpec
from normopt.job_record import recorded_exit_status
from normopt.report.cells.tuning_runs import TUNING_DIR
from normopt.run_dir import PLAN_FILE, RunDir

PHASES = ("tuning", "evaluation")


@dataclass
class GridPlan:
    """What a grid runs: its base config, the working folder its jobs start in, the tune
    block (or None), every tuning run and evaluation cell, and which of them are to run now."""

    base: str
    workdir: str
    gpus_per_node: int
    tune: dict[str, Any] | None
    tuning: list[CellSpec]
    evaluation: list[CellSpec]
    to_run: dict[str, list[str]]
    steps: dict[str, int] = field(default_factory=dict)
    step_flops: dict[str, float] = field(default_factory=dict)
    nodes: int = 1  # per SLURM array task
    # the --plugin arguments every job of the grid passes (the spec's and the command's plugins)
    plugin_args: list[str] = field(default_factory=list)

    def cell(self, phase: str, index: int) -> CellSpec:
        """Array task ``index`` of ``phase``: the ``index``-th of the runs to run."""
        names = self.to_run.get(phase, [])
        if not 0 <= index < len(names):
            raise UserError(f"{phase} array task {index}: the plan has {len(names)} task(s) in that phase")
        return next(c for c in getattr(self, phase) if c.name == names[index])

    def tune_spec(self) -> TuneSpec | None:
        if self.tune is None:
            return None
        t = self.tune
        return TuneSpec(t["key"], tuple(t["values"]), t["by"], tuple(t["seeds"]), t["steps"])


def plan_step_costs(base: Path, runs: list[CellSpec]) -> tuple[dict[str, int], dict[str, float]]:
    """Each run's ``train.steps`` and FLOPs per step, computed once per distinct setting (a
    seed or the run folder does not change the cost)."""
    from normopt.config import load_config
    from normopt.factorial.grid_clock import cell_step_flops

    steps, flops, cache = {}, {}, {}
    for run in runs:
        key = tuple(o for o in run.overrides if not o.startswith(("train.seed=", "run.dir=")))
        if key not in cache:
            cache[key] = (load_config(base, run.overrides).train.steps, cell_step_flops(base, run.overrides))
        steps[run.name], flops[run.name] = cache[key]
    return steps, flops


def cell_is_complete(run: RunDir, steps: int) -> bool:
    done = run.complete_steps()
    return bool(done) and done[-1] >= steps


def cell_diverged(run: RunDir) -> bool:
    """Whether the run's last process ended diverged (exit 3): a result, not run again."""
    return recorded_exit_status(run) == DIVERGED_EXIT_CODE


def grid_plan(
    base: Path,
    root: Path,
    cells: list[CellSpec],
    tune: TuneSpec | None,
    runs: list[CellSpec],
    gpus_per_node: int = 1,
    nodes: int = 1,
    plugin_args: list[str] | tuple[str, ...] = (),
) -> GridPlan:
    """The plan of a grid as it stands on disk: every run, and those neither complete nor
    diverged to run."""
    steps, flops = plan_step_costs(base, [*runs, *cells])

    def incomplete(folder: Path, group: list[CellSpec]) -> list[str]:
        return [
            c.name
            for c in group
            if not cell_is_complete(RunDir(folder / c.name), steps[c.name])
            and not cell_diverged(RunDir(folder / c.name))
        ]

    return GridPlan(
        str(Path(base).resolve()),
        os.getcwd(),
        gpus_per_node,
        None if tune is None else tune.to_json(),
        runs,
        cells,
        {"tuning": incomplete(Path(root) / TUNING_DIR, runs), "evaluation": incomplete(Path(root), cells)},
        steps,
        flops,
        nodes,
        list(plugin_args),
    )


def write_plan(root: Path, plan: GridPlan) -> Path:
    path = Path(root) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    return path


def read_plan(root: Path) -> GridPlan:
    path = Path(root) / PLAN_FILE
    try:
        record = json.loads(path.read_text())
        return GridPlan(
            record["base"],
            record["workdir"],
            record["gpus_per_node"],
            record["tune"],
            [CellSpec(**c) for c in record["tuning"]],
            [CellSpec(**c) for c in record["evaluation"]],
            record["to_run"],
            record.get("steps", {}),
            record.get("step_flops", {}),
            record.get("nodes", 1),
            record.get("plugin_args", []),
        )
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (a grid's plan, written by normopt factorial)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable grid plan ({type(exc).__name__}: {exc})") from None


def run_dir_of(cell: CellSpec) -> Path:
    """The run folder a cell's overrides name (relative to the plan's workdir)."""
    return Path(next(o for o in reversed(cell.overrides) if o.startswith("run.dir=")).split("=", 1)[1])
