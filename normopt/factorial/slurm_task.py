"""What the jobs of a grid submitted with ``--slurm`` run (:mod:`normopt.factorial.slurm`)::

    python -m normopt.factorial.slurm_task args ROOT PHASE INDEX   # one array task's training arguments
    python -m normopt.factorial.slurm_task choose ROOT             # the tuning's choice, per cell

``args`` prints two lines, the cell's run folder and its overrides shell-quoted for
``launch/slurm.sbatch`` (nothing when the cell is not to run: its group's tuning chose no
value), and writes the cell's ``cell.json``.
An evaluation cell of a tuned grid gets the value the tuning runs on disk choose now, through
the same functions as the local runner (:func:`normopt.factorial.tuning.choose_values` and
``tuned_cells``), so a cell that ran at another value is refused there too. ``choose`` writes
the choices into ``ROOT/tuning/tuning.json`` and prints one line per cell group; it fails
(exit 2) when an evaluation cell already ran at a value no longer chosen, which keeps the
evaluation array (``afterok``) from running.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from normopt.errors import USER_ERROR_EXIT_CODE, UserError
from normopt.factorial.cells import CellSpec, write_cell_json
from normopt.factorial.plan import GridPlan, read_plan, run_dir_of
from normopt.factorial.tuning import choose_values, tuned_cells, write_tuning_file
from normopt.run_dir import RunDir


def evaluation_cell(root: Path, plan: GridPlan, cell: CellSpec) -> tuple[CellSpec | None, str]:
    """The evaluation cell at its group's chosen value (None if its group has no choice) and
    the tuning line for its group."""
    tune = plan.tune_spec()
    if tune is None:
        return cell, ""
    choices = choose_values(root, tune, plan.tuning)
    ready, lines = tuned_cells(
        root, tune, [c for c in plan.evaluation if c.group == cell.group], {cell.group: choices[cell.group]}
    )
    return next((c for c in ready if c.name == cell.name), None), lines[0]


def task_args(root: Path, phase: str, index: int) -> str:
    """Array task ``index`` of ``phase``: its run folder and its shell-quoted overrides on two
    lines ('' when it does not run)."""
    plan = read_plan(root)
    cell = plan.cell(phase, index)
    if phase == "evaluation":
        cell_at_choice, line = evaluation_cell(root, plan, cell)
        if line:
            print(line, file=sys.stderr)
        if cell_at_choice is None:
            print(f"[normopt] {cell.name}: not run (its group's tuning chose no value)", file=sys.stderr)
            write_cell_json(RunDir(run_dir_of(cell)), cell, skipped="no value chosen by the tuning runs")
            return ""
        cell = cell_at_choice
    write_cell_json(RunDir(run_dir_of(cell)), cell)
    return f"{run_dir_of(cell)}\n{shlex.join(cell.overrides)}"


def choose(root: Path) -> list[str]:
    """Each group's choice from the tuning runs on disk, written to tuning.json; the lines say
    what was chosen. UserError when an evaluation cell ran at a value no longer chosen."""
    plan = read_plan(root)
    tune = plan.tune_spec()
    if tune is None:
        raise UserError(f"{root}: this grid has no tune block; there is nothing to choose")
    choices = choose_values(root, tune, plan.tuning)
    write_tuning_file(root, tune, choices)
    _, lines = tuned_cells(root, tune, plan.evaluation, choices)
    return lines


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 4 and argv[0] == "args" and argv[3].isdigit():
            print(task_args(Path(argv[1]), argv[2], int(argv[3])))
            return 0
        if len(argv) == 2 and argv[0] == "choose":
            print("\n".join(choose(Path(argv[1]))), flush=True)
            return 0
    except UserError as exc:
        print(f"normopt: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print("usage: python -m normopt.factorial.slurm_task {args ROOT PHASE INDEX | choose ROOT}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
