"""``normopt factorial SPEC``: run every cell of a norm x optimizer grid as an ordinary run.

The spec and the cells it expands to are :mod:`normopt.factorial.spec`. Each cell's folder
gets a ``cell.json`` (:mod:`normopt.factorial.cells`: name, coords, seed, arm, and the exit
status once it ran) that ``normopt report`` reads next to the run's own ``metrics.jsonl``.
Cells run one after another on this machine (optionally each under ``normopt launch`` with N
ranks) under one progress bar, each cell's output in its ``train.log``; finished cells are
skipped, interrupted ones resume from their last checkpoint. ``--slurm`` submits the grid as a
chain of SLURM jobs instead (:mod:`normopt.factorial.slurm`): for a tuned spec a tuning array,
a job that makes the choice and an evaluation array; for any spec a last job that writes the
report. Each array task runs ``launch/slurm.sbatch`` for one cell on ``slurm.nodes`` nodes (or
``--nodes``; 1) of ``slurm.gpus_per_node`` GPUs (or ``--gpus-per-node``; 8); ``normopt status
ROOT`` follows it. Every cell's global batch must split evenly over the
ranks it will run on (``--nproc``, or nodes x GPUs per node under SLURM): that is checked when the spec
is read, before anything runs. ``--dry-run`` lists the cells and what would happen to each (or
prints the SLURM script) and runs nothing. A spec with a ``tune`` block first runs its tuning
runs under ``ROOT/tuning``, then the cells at each one's chosen value
(:mod:`normopt.factorial.tuning`); its dry run also gives the cost in runs and steps.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from normopt.cli_args import CommandParser
from normopt.config import REPO_ROOT, load_config
from normopt.errors import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, UserError
from normopt.factorial.cells import CellSpec, write_cell_json
from normopt.factorial.grid_clock import GridClock, cell_step_flops, format_duration
from normopt.factorial.plan import GridPlan, cell_diverged, grid_plan, write_plan
from normopt.factorial.slurm import spec_gpus_per_node, spec_nodes, submit_grid
from normopt.factorial.spec import load_spec, read_spec_file
from normopt.factorial.tuning import (
    TuneSpec,
    choose_values,
    read_tune_section,
    tuned_cells,
    tuning_cells,
    write_tuning_file,
)
from normopt.plugins import plugin_args
from normopt.report.cells.axes import level_label, write_experiment_file
from normopt.report.cells.cell_assessment import final_eval_loss
from normopt.report.cells.cell_reading import read_metrics
from normopt.report.cells.tuning_runs import TUNING_DIR
from normopt.report.writer import print_summary, write_report
from normopt.run_dir import RunDir


def train_command(base: Path, cell: CellSpec, nproc: int) -> list[str]:
    """One process for one rank; ``normopt launch`` for several, so that the cell's status
    (3 diverged, 75 preempted) reaches the runner as it is, not as torchrun's 1. The plugins
    loaded here (the spec's and the command's) are loaded by the cell too."""
    plugins = plugin_args()
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "normopt.cli",
            "launch",
            f"--nproc={nproc}",
            *plugins,
            "--config",
            str(base),
            *cell.overrides,
        ]
    return [sys.executable, str(REPO_ROOT / "train.py"), *plugins, "--config", str(base), *cell.overrides]


def steps_logged(run: RunDir) -> int:
    """The highest step in a run's metrics log so far (0 before the first line)."""
    return (read_metrics(run.metrics).last_step or 0) if run.metrics.exists() else 0


def _run_cell(command: list[str], run: RunDir, progress: "_GridProgress", index: int, verbose: bool) -> int:
    """Run one cell's training to completion, moving the grid's bar as its metrics log
    grows. The cell's own output goes to the train log in its run directory (or to the
    terminal with ``verbose``). The first Ctrl-C reaches the cell too (same process group),
    which checkpoints and exits 75; SIGTERM and SIGUSR1 sent to the runner (a scheduler's
    stop) are forwarded to the cell, to the same end. This waits for that."""
    with open(run.train_log, "a") as log:
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=None if verbose else log, stderr=None if verbose else subprocess.STDOUT
        )
        forward = lambda signum, frame: proc.poll() is None and proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                progress.update(index, steps_logged(run))
        except KeyboardInterrupt:
            proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return proc.returncode


class _GridProgress:
    """One bar over every step of the grid, with the time left from :class:`GridClock`
    (cells weighted by their cost per step) in place of tqdm's uniform extrapolation."""

    def __init__(self, step_flops: list[float], steps: list[int], first_steps: list[int], verbose: bool):
        self.steps, self.first_steps = steps, first_steps
        self.clock = GridClock(
            [flops if first < total else 0.0 for flops, total, first in zip(step_flops, steps, first_steps)],
            [total - first for total, first in zip(steps, first_steps)],
        )
        self.bar = tqdm(
            total=sum(steps),
            unit="step",
            dynamic_ncols=True,
            disable=verbose,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",
        )
        self.bar.set_postfix_str("time left: after the first steps", refresh=False)
        self.done_before = 0

    def start(self, index: int) -> None:
        self.clock.start(index, time.perf_counter())

    def update(self, index: int, logged: int) -> None:
        now = time.perf_counter()
        self.clock.observe(index, logged - self.first_steps[index], now)
        left = self.clock.seconds_left(now)
        if left is not None:
            self.bar.set_postfix_str(f"~{format_duration(left)} left", refresh=False)
        self.bar.n = self.done_before + logged
        self.bar.refresh()

    def finish(self, index: int) -> None:
        """Cell ``index`` ended (or was complete already and skipped)."""
        if index in self.clock.progress:
            self.clock.finish(index, time.perf_counter())
        self.done_before += self.steps[index]
        self.bar.n = self.done_before
        self.bar.refresh()


def _log_tail(run: RunDir, lines: int = 15) -> str:
    path = run.train_log
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_cells(
    base: Path,
    root: Path,
    cells: list[CellSpec],
    nproc: int = 1,
    verbose: bool = False,
    wall_times: dict[str, float] | None = None,
    plan: GridPlan | None = None,
) -> int:
    """Run the cells in order under one progress bar over all their steps; return 0, or the
    status that stopped the grid (75: preempted or Ctrl-C, resumable). The wall time of each
    cell run here goes into ``wall_times`` (by cell name). Steps and FLOPs per step come from
    ``plan`` where it has them (the grid's plan computed them once), else from the config."""
    known = plan.steps if plan is not None else {}
    flops_known = plan.step_flops if plan is not None else {}
    steps = [known[c.name] if c.name in known else load_config(base, c.overrides).train.steps for c in cells]
    runs = [RunDir(root / cell.name) for cell in cells]
    first_steps = [
        min(run.complete_steps()[-1], total) if run.complete_steps() else 0 for run, total in zip(runs, steps)
    ]
    step_flops = [
        flops_known[c.name] if c.name in flops_known else (cell_step_flops(base, c.overrides) if first < total else 0.0)
        for c, total, first in zip(cells, steps, first_steps)
    ]
    progress = _GridProgress(step_flops, steps, first_steps, verbose)
    bar = progress.bar
    wall_times = {} if wall_times is None else wall_times
    try:
        for index, (cell, cell_steps, run) in enumerate(zip(cells, steps, runs)):
            label = f"[factorial] cell {index + 1}/{len(cells)} {cell.name}"
            if first_steps[index] >= cell_steps or cell_diverged(run):
                progress.finish(index)
                bar.write(f"{label}: {'complete' if first_steps[index] >= cell_steps else 'diverged before'}, skipped")
                continue
            bar.set_description(f"cell {index + 1}/{len(cells)} {cell.name}")
            if verbose:
                print(label, flush=True)
            write_cell_json(run, cell)
            started = time.perf_counter()
            progress.start(index)
            status = _run_cell(train_command(base, cell, nproc), run, progress, index, verbose)
            write_cell_json(run, cell, exit_code=status)
            progress.finish(index)
            took = wall_times[cell.name] = time.perf_counter() - started
            if status == 0:
                loss = final_eval_loss(read_metrics(run.metrics).evals)
                result = f"eval loss {loss:.4f}" if loss is not None else "no evaluation logged"
                bar.write(f"{label}: {result} ({format_duration(took)})")
            elif status == DIVERGED_EXIT_CODE:  # a divergence is a result, recorded for the report
                bar.write(f"{label}: diverged at step {steps_logged(run)} ({format_duration(took)})")
            elif status == PREEMPTED_EXIT_CODE:
                bar.write(f"{label}: stopped after a checkpoint; run the same command to resume")
                return status
            else:
                tail = "" if verbose else f"\n{_log_tail(run)}\n"
                raise UserError(
                    f"cell {cell.name} failed with exit status {status}{tail}(full output: {run.train_log})"
                )
    finally:
        bar.close()
    return 0


def wall_time_line(wall_times: dict[str, float], cells: int, total_s: float) -> str:
    """The grid's last line: each cell run now and its wall time, and the whole command's."""
    skipped = cells - len(wall_times)
    per_cell = ", ".join(f"{name} {format_duration(s)}" for name, s in wall_times.items()) or "none"
    note = f"; {skipped} complete cell(s) skipped" if skipped else ""
    return f"[factorial] wall time per cell run: {per_cell}{note}; total {format_duration(total_s)} (with the report)"


def cell_plan(run: RunDir, steps: int) -> str:
    """What running a cell would do now: skip it, resume it, or start it."""
    done = run.complete_steps()
    if done and done[-1] >= steps:
        return "complete, would skip"
    if done:
        return f"would resume from step {done[-1]} of {steps}"
    return f"new, {steps} steps"


def print_plan(base: Path, root: Path, cells: list[CellSpec], notes: dict[str, str] | None = None) -> tuple[int, int]:
    """``--dry-run`` without ``--slurm``: one line per cell (name, plan and ``notes``' word on it),
    then its overrides; returns the steps of all its runs and of those still to run."""
    total = to_run = 0
    for index, cell in enumerate(cells, start=1):
        steps = load_config(base, cell.overrides).train.steps
        run = RunDir(root / cell.name)
        done = run.complete_steps()
        total += steps
        to_run += steps - min(done[-1] if done else 0, steps)
        note = (notes or {}).get(cell.name, "")
        print(f"cell {index}/{len(cells)} {cell.name}: {cell_plan(run, steps)}{note}")
        print(f"  {shlex.join(cell.overrides)}")
    return total, to_run


def print_tuned_plan(base: Path, root: Path, tune: TuneSpec, cells: list[CellSpec], runs: list[CellSpec]) -> None:
    """``--dry-run`` of a tuned spec: the tuning runs, then the evaluation cells (at the value
    chosen where a group's tuning runs have all finished), then the cost in runs and steps."""
    print(
        f"tuning: {len(runs)} runs under {root / TUNING_DIR} ({len(tune.values)} values of {tune.key} x "
        f"{len(tune.seeds)} tuning seed(s) x {len(runs) // (len(tune.values) * len(tune.seeds))} cells)"
    )
    tuning_steps = print_plan(base, root / TUNING_DIR, runs)
    choices = choose_values(root, tune, runs)
    chosen = {g: c for g, c in choices.items() if c.chosen is not None}
    ready, _ = tuned_cells(root, tune, cells, chosen)
    by_name = {c.name: c for c in ready}
    shown = [by_name.get(c.name, c) for c in cells]
    notes = {
        c.name: (
            f" (at the chosen {tune.key}={level_label(chosen[c.group].chosen)})"
            if c.name in by_name
            else f" (at the {tune.key} the tuning runs choose)"
        )
        for c in cells
    }
    print(f"evaluation: {len(cells)} cells under {root}")
    eval_steps = print_plan(base, root, shown, notes)
    print(
        f"cost: {len(runs)} tuning runs, {tuning_steps[0]} steps; {len(cells)} evaluation runs, "
        f"{eval_steps[0]} steps; in all {len(runs) + len(cells)} runs, {tuning_steps[0] + eval_steps[0]} steps "
        f"({tuning_steps[1] + eval_steps[1]} still to run)"
    )


def factorial_main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="normopt factorial", description="Run every cell of a factorial spec, then report.")
    parser.add_argument("spec", help="factorial spec (YAML)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per cell (normopt launch); default 1")
    parser.add_argument(
        "--slurm",
        action="store_true",
        help="submit the grid to SLURM instead: an array of cells (after a tuning array and a "
        "choice job for a tuned spec), then a job that writes the report",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="with --slurm: GPUs (ranks) per cell (default: the spec's slurm.gpus_per_node, else 8)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="with --slurm: nodes per cell, one launcher each (default: the spec's slurm.nodes, else 1)",
    )
    parser.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="with --slurm: an extra sbatch option, e.g. --sbatch-option=--time=04:00:00 "
        "(repeatable; overrides the script's)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells and what would happen to each (with --slurm: also the job scripts "
        "and the chain of sbatch commands); run and submit nothing",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show each cell's training output instead of one progress bar"
    )
    args = parser.parse_args(argv)
    if args.nproc < 1:
        raise UserError("--nproc must be at least 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise UserError("--gpus-per-node must be at least 1")
    if args.nodes is not None and args.nodes < 1:
        raise UserError("--nodes must be at least 1")
    if not args.slurm and (args.gpus_per_node is not None or args.nodes is not None or args.sbatch_option):
        raise UserError("--gpus-per-node, --nodes and --sbatch-option apply to --slurm only (use --nproc here)")
    bad = next((o for o in args.sbatch_option if not o.startswith("-")), None)
    if bad is not None:
        raise UserError(f"--sbatch-option: expected an sbatch option like --time=04:00:00, got {bad!r}")
    if args.slurm:  # a malformed slurm section is refused by load_spec before this count is used
        raw = read_spec_file(Path(args.spec))
        raw = raw if isinstance(raw, dict) else {}
        gpus, nodes = args.gpus_per_node or spec_gpus_per_node(raw), args.nodes or spec_nodes(raw)
        world_size = gpus * nodes
    else:
        world_size = args.nproc
    spec, base, cells = load_spec(args.spec, world_size)
    root = Path(spec["root"])
    tune = read_tune_section(spec, Path(args.spec))
    print(f"[factorial] {len(cells)} cells under {root}: {', '.join(c.name for c in cells)}", flush=True)
    runs = [] if tune is None else tuning_cells(cells, tune, root)
    if args.dry_run:
        if tune is None:
            total, to_run = print_plan(base, root, cells)
            print(f"cost: {len(cells)} runs, {total} steps ({to_run} still to run)")
        else:
            print_tuned_plan(base, root, tune, cells, runs)
    if args.slurm:
        return submit_grid(spec, base, root, cells, tune, runs, gpus, nodes, args.sbatch_option, args.dry_run)
    if args.dry_run:
        print(f"dry run: nothing was run (base config {base})")
        return 0
    write_experiment_file(root, spec["axes"], spec.get("report"))
    plan = grid_plan(base, root, cells, tune, runs)
    write_plan(root, plan)
    started, wall_times, planned = time.perf_counter(), {}, len(runs) + len(cells)
    if tune is not None:
        write_tuning_file(root, tune)
        print(f"[factorial] tuning {tune.key}: {len(runs)} runs under {root / TUNING_DIR}", flush=True)
        status = run_cells(base, root / TUNING_DIR, runs, args.nproc, args.verbose, wall_times, plan)
        if status:
            return status
        choices = choose_values(root, tune, runs)
        write_tuning_file(root, tune, choices)
        cells, lines = tuned_cells(root, tune, cells, choices)
        print("\n".join(lines), flush=True)
    status = run_cells(base, root, cells, args.nproc, args.verbose, wall_times, plan)
    if status:
        return status
    print_summary(write_report(root))
    print(wall_time_line(wall_times, planned, time.perf_counter() - started), flush=True)
    return 0
