"""``normopt factorial SPEC --slurm``: the whole grid as a chain of SLURM jobs, to its report.

An untuned spec is two jobs: an array with one task per cell still to run, then a report job
(``--dependency=afterany``: it runs however the cells ended, and writes ``report.md`` for what
there is). A spec with a ``tune`` block is four::

    tuning     array, one task per tuning run still to run
    choose     afterany:tuning      makes each cell's choice (the same code as the local path;
                                    a diverged tuning run exits 3, which afterany still follows)
    evaluation afterok:choose       array, one task per evaluation cell, at the chosen value
    report     afterany:evaluation  writes report.md

Each array task runs ``launch/slurm.sbatch`` for its cell on the spec's ``slurm.nodes`` nodes
(or ``--nodes``; 1 if neither says) of ``slurm.gpus_per_node`` GPUs (or ``--gpus-per-node``;
8 if neither says), so preemption
(USR1 -> checkpoint -> exit 75 -> requeue -> resume) works as for a single job, and writes
``job.json`` in the cell's folder for ``normopt status``. The spec's ``slurm.options`` become
extra ``#SBATCH`` lines in every script and the command line's ``--sbatch-option``s go to every
``sbatch`` (which lets them override the scripts').

The grid's ``ROOT/plan.json`` (:mod:`normopt.factorial.plan`) holds the cells of each phase as
submitted: an array task finds its cell there by index, so a spec edited after submission
cannot change a running grid. ``ROOT/slurm/`` holds the scripts, ``jobs.json`` (the job ids of
every submission, read by ``normopt status``) and the job logs ``<phase>-<job>_<task>.out``.
Resubmitting skips the cells that are complete and refuses, as the local path does, an
evaluation cell that ran at a value the tuning no longer chooses.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normopt.config import REPO_ROOT
from normopt.errors import UserError
from normopt.factorial.cells import CellSpec, write_cell_json
from normopt.factorial.plan import PHASES, GridPlan, grid_plan, run_dir_of, write_plan
from normopt.factorial.tuning import TuneSpec, choose_values, tuned_cells
from normopt.plugins import plugin_args
from normopt.report.cells.axes import write_experiment_file
from normopt.run_dir import SLURM_DIR, RunDir

SLURM_KEYS = {"gpus_per_node", "nodes", "options"}
DEFAULT_GPUS_PER_NODE = 8
JOBS_FILE = "jobs.json"
SLURM_SBATCH = REPO_ROOT / "launch" / "slurm.sbatch"


def check_slurm_section(spec: dict[str, Any], path: Path) -> None:
    section = spec.get("slurm")
    if section is None:
        return
    if not isinstance(section, dict) or set(section) - SLURM_KEYS:
        raise UserError(f"{path}: slurm must be a mapping with keys {', '.join(sorted(SLURM_KEYS))}")
    gpus = section.get("gpus_per_node", DEFAULT_GPUS_PER_NODE)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UserError(f"{path}: slurm.gpus_per_node must be an integer >= 1, got {gpus!r}")
    nodes = section.get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UserError(f"{path}: slurm.nodes must be an integer >= 1, got {nodes!r}")
    options = section.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) and o.startswith("-") for o in options):
        raise UserError(f"{path}: slurm.options must be a list of sbatch options like --time=04:00:00")


def spec_gpus_per_node(spec: dict[str, Any]) -> int:
    """GPUs per node a SLURM array task asks for: the spec's slurm.gpus_per_node, else 8."""
    section = spec.get("slurm")
    return section.get("gpus_per_node", DEFAULT_GPUS_PER_NODE) if isinstance(section, dict) else DEFAULT_GPUS_PER_NODE


def spec_nodes(spec: dict[str, Any]) -> int:
    """Nodes per cell: the spec's slurm.nodes, else 1."""
    section = spec.get("slurm")
    return section.get("nodes", 1) if isinstance(section, dict) else 1


def slurm_folder(root: Path) -> Path:
    return Path(root) / SLURM_DIR


# ------------------------------------------------------------------------------- the scripts


def _header(name: str, root: Path, options: list[str] | tuple[str, ...], output: str) -> list[str]:
    return [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={slurm_folder(root) / output}",
        "#SBATCH --open-mode=append",
        *(f"#SBATCH {option}" for option in options),
    ]


def _python_lines(workdir: str) -> list[str]:
    """The jobs start where the grid was submitted (relative paths in the spec mean the same)
    and use the submitting Python unless NORMOPT_PYTHON names another."""
    return [
        f"cd {shlex.quote(workdir)} || exit 2",
        f"PYTHON=${{NORMOPT_PYTHON:-{shlex.quote(sys.executable)}}}",
        "export NORMOPT_PYTHON=$PYTHON",
    ]


def array_script(phase: str, root: Path, plan: GridPlan, options: list[str] | tuple[str, ...] = ()) -> str:
    """The array of one phase: task i looks up its cell in plan.json (for an evaluation cell
    of a tuned grid, at the chosen value) and runs launch/slurm.sbatch for it on
    ``plan.nodes`` nodes of ``plan.gpus_per_node`` GPUs (one launcher per node)."""
    count, gpus = len(plan.to_run[phase]), plan.gpus_per_node
    log = f"{phase}-%A_%a.out"
    lines = [
        *_header(
            f"normopt-{phase}",
            root,
            (
                f"--array=0-{count - 1}",
                f"--nodes={plan.nodes}",
                "--ntasks-per-node=1",
                f"--gpus-per-node={gpus}",
                "--signal=B:USR1@300",
                "--requeue",
                *options,
            ),
            log,
        ),
        f"# one {phase} run per array task (the cells: ROOT/plan.json); sbatch's command-line options override these",
        *_python_lines(plan.workdir),
        f"export NORMOPT_GPUS_PER_NODE={gpus}",
        f"export NORMOPT_JOB_LOG={shlex.quote(str(slurm_folder(root)))}/{phase}-${{SLURM_ARRAY_JOB_ID}}_"
        "${SLURM_ARRAY_TASK_ID}.out",
        f'TASK=$("$PYTHON" -m normopt.factorial.slurm_task args {shlex.quote(str(root))} {phase} '
        '"$SLURM_ARRAY_TASK_ID") || exit $?',
        '[ -n "$TASK" ] || exit 0  # nothing to run (the line above says why)',
        "# line 1: the cell's folder (a refused start is recorded there); line 2: its overrides",
        '{ IFS= read -r NORMOPT_RECORD_DIR; IFS= read -r OVERRIDES; } <<< "$TASK"',
        "export NORMOPT_RECORD_DIR",
        'eval "ARGS=($OVERRIDES)"',
        f'exec bash {shlex.quote(str(SLURM_SBATCH))} {_plugins(plan)}--config {shlex.quote(plan.base)} "${{ARGS[@]}}"',
    ]
    return "\n".join(lines) + "\n"


def _plugins(plan: GridPlan) -> str:
    """The grid's ``--plugin`` arguments, shell-quoted, each followed by a space."""
    return "".join(f"{shlex.quote(arg)} " for arg in plan.plugin_args)


def step_script(step: str, root: Path, plan: GridPlan, options: list[str] | tuple[str, ...] = ()) -> str:
    """A one-CPU job: ``choose`` (the tuned values) or ``report`` (report.md)."""
    command = {
        "choose": f'"$PYTHON" -m normopt.factorial.slurm_task choose {shlex.quote(str(root))}',
        "report": f'"$PYTHON" -m normopt.cli report {_plugins(plan)}{shlex.quote(str(root))}',
    }[step]
    lines = [
        *_header(f"normopt-{step}", root, ("--nodes=1", "--ntasks=1", "--cpus-per-task=1", *options), f"{step}-%j.out"),
        *_python_lines(plan.workdir),
        f"exec {command}",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ submission


@dataclass
class ChainJob:
    phase: str  # tuning, choose, evaluation, report
    script: Path
    after: str | None  # the phase this job waits for
    dependency: str | None  # afterany / afterok

    def sbatch(self, extra_options: list[str], ids: dict[str, str]) -> list[str]:
        command = ["sbatch", "--parsable", *extra_options]
        if self.after is not None and self.after in ids:
            command += [f"--dependency={self.dependency}:{ids[self.after]}", "--kill-on-invalid-dep=yes"]
        return [*command, str(self.script)]


def chain(root: Path, plan: GridPlan) -> list[ChainJob]:
    """The jobs of this submission in order; a phase with nothing to run is left out and the
    job after it waits for the one before (or for nothing)."""
    folder = slurm_folder(root)
    jobs: list[ChainJob] = []
    if plan.tune is not None:
        if plan.to_run["tuning"]:
            jobs.append(ChainJob("tuning", folder / "tuning.sbatch", None, None))
        jobs.append(ChainJob("choose", folder / "choose.sbatch", jobs[-1].phase if jobs else None, "afterany"))
    if plan.to_run["evaluation"]:
        dependency = "afterok" if jobs and jobs[-1].phase == "choose" else "afterany"
        jobs.append(ChainJob("evaluation", folder / "evaluation.sbatch", jobs[-1].phase if jobs else None, dependency))
    jobs.append(ChainJob("report", folder / "report.sbatch", jobs[-1].phase if jobs else None, "afterany"))
    return jobs


def scripts(root: Path, plan: GridPlan, options: list[str]) -> dict[Path, str]:
    texts = {}
    for job in chain(root, plan):
        texts[job.script] = (
            array_script(job.phase, root, plan, options)
            if job.phase in PHASES
            else step_script(job.phase, root, plan, options)
        )
    return texts


def print_chain(root: Path, plan: GridPlan, options: list[str], extra_options: list[str]) -> None:
    """--dry-run: every script, then the sbatch commands of the chain (job ids as $PHASE)."""
    for path, text in scripts(root, plan, options).items():
        print(f"--- {path}\n{text}", end="")
    print("--- the chain, submitted in this order:")
    ids = {job.phase: f"@{job.phase.upper()}@" for job in chain(root, plan)}  # '@' needs no shell quoting
    for job in chain(root, plan):
        tasks = f"  # {len(plan.to_run[job.phase])} task(s)" if job.phase in PHASES else ""
        command = shlex.join(job.sbatch(extra_options, ids))
        for phase, placeholder in ids.items():
            command = command.replace(placeholder, f"${phase.upper()}")
        print(f"{job.phase.upper()}=$({command}){tasks}")


def submit_chain(
    root: Path,
    plan: GridPlan,
    options: list[str],
    extra_options: list[str],
    spec_axes: dict[str, list],
    spec_report: dict[str, Any] | None,
) -> dict[str, str]:
    """Write the plan, the scripts and the cells' cell.json, then submit the chain; returns
    the job id of each phase. An sbatch that fails cancels the jobs already submitted."""
    folder = slurm_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    write_experiment_file(root, spec_axes, spec_report)
    write_plan(root, plan)
    for path, text in scripts(root, plan, options).items():
        path.write_text(text)
    for phase in PHASES:
        wanted = set(plan.to_run.get(phase, []))
        for cell in getattr(plan, phase):
            if cell.name in wanted and not RunDir(run_dir_of(cell)).cell_json.exists():
                write_cell_json(RunDir(run_dir_of(cell)), cell)
    ids: dict[str, str] = {}
    for job in chain(root, plan):
        command = job.sbatch(extra_options, ids)
        try:
            proc = subprocess.run(command, capture_output=True, text=True, cwd=plan.workdir)
        except FileNotFoundError:
            raise UserError("sbatch not found: is this a SLURM login node?") from None
        if proc.returncode != 0:
            if ids:
                subprocess.run(["scancel", *ids.values()], capture_output=True)
            message = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            cancelled = f"; cancelled the jobs already submitted ({', '.join(ids.values())})" if ids else ""
            raise UserError(f"sbatch for the {job.phase} job failed ({proc.returncode}): {message}{cancelled}")
        ids[job.phase] = proc.stdout.strip().split(";")[0]
    _append_submission(root, plan, ids)
    return ids


def _append_submission(root: Path, plan: GridPlan, ids: dict[str, str]) -> None:
    path = slurm_folder(root) / JOBS_FILE
    submissions = read_submissions(root)
    submissions.append(
        {"submitted": time.time(), "jobs": ids, "tasks": {phase: plan.to_run.get(phase, []) for phase in PHASES}}
    )
    path.write_text(json.dumps(submissions, indent=2) + "\n")


def squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """``{"12_3" or "14": (state, reason)}`` for the given jobs' tasks still known to SLURM;
    None when squeue is not there or does not answer."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    wanted, states = set(job_ids), {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0].split("_")[0] in wanted:
            states[parts[0]] = (parts[1], parts[2])
    return states


def read_submissions(root: Path) -> list[dict[str, Any]]:
    """Every submission of the grid, oldest first (empty without jobs.json)."""
    try:
        record = json.loads((slurm_folder(root) / JOBS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return record if isinstance(record, list) else []


def refuse_while_queued(root: Path) -> None:
    """A grid whose last submission still has jobs in the queue is not submitted again: two
    jobs would train one run (the second refused by its lock, a failed task)."""
    submissions = read_submissions(root)
    if not submissions:
        return
    ids = [str(i) for i in submissions[-1].get("jobs", {}).values()]
    queued = squeue_states(ids)
    if queued:
        jobs = sorted({task.split("_")[0] for task in queued})
        raise UserError(
            f"{root}: jobs {', '.join(jobs)} of its last submission are still in the queue; wait for "
            f"them (normopt status {root}) or cancel them (scancel {' '.join(jobs)}) before submitting again"
        )


def submit_grid(
    spec: dict[str, Any],
    base: Path,
    root: Path,
    cells: list[CellSpec],
    tune: TuneSpec | None,
    runs: list[CellSpec],
    gpus_per_node: int,
    nodes: int,
    extra_options: list[str],
    dry_run: bool,
) -> int:
    """``--slurm``: the grid's chain of jobs for the runs still to run, printed (``dry_run``)
    or submitted. A tuned grid whose tuning runs are all complete has its choice made here
    already, so an evaluation cell that ran at a value it no longer chooses is refused before
    anything is submitted, as on the local path."""
    if not dry_run:
        refuse_while_queued(root)
    plan = grid_plan(base, root, cells, tune, runs, gpus_per_node, nodes, plugin_args())
    if tune is not None and not plan.to_run["tuning"]:
        tuned_cells(root, tune, cells, choose_values(root, tune, runs))
    options = (spec.get("slurm") or {}).get("options", [])
    abs_root = root.resolve()
    if dry_run:
        print_chain(abs_root, plan, options, extra_options)
        print(f"dry run: nothing was submitted (base config {base})")
        return 0
    ids = submit_chain(abs_root, plan, options, extra_options, spec["axes"], spec.get("report"))
    jobs = ", ".join(
        f"{phase} {job}" + (f" ({len(plan.to_run[phase])} tasks)" if phase in PHASES else "")
        for phase, job in ids.items()
    )
    print(f"[factorial] submitted {jobs}; follow it with: normopt status {root}", flush=True)
    return 0
