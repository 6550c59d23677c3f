"""``normopt status ROOT``: where a grid stands, one line per run, and the time left.

Each run of the grid's plan (``ROOT/plan.json``: tuning runs, then evaluation cells) gets one
state, read from its folder and, where the grid was submitted with ``--slurm`` and ``squeue``
answers, from SLURM:

    done        complete (its last checkpoint is at train.steps): the final eval loss
    running     step / steps (SLURM job id, or the local process holding the run's lock)
    queued      waiting in SLURM (its reason), or not started yet
    preempted   stopped after a checkpoint (exit 75, or requeued by its job): the last checkpoint
    diverged    the loss became NaN/Inf (exit 3, or the metrics say so): the step
    failed      any other exit: the status and the log to read
    skipped     a tuned cell whose group's tuning chose no value

then the choose and report jobs of a SLURM chain, and a summary line: the count per state and
the time left from the grid clock (:mod:`normopt.factorial.grid_clock`: each run's measured
seconds per step, and for runs without one the measured runs of the same FLOPs per step, else
the median seconds per FLOP), as the sum over runs of their steps left (cell time), and what
that is spread over the runs running now. Nothing here builds a model: the costs are in the plan.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normopt.cli_args import CommandParser
from normopt.errors import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, UserError
from normopt.factorial.grid_clock import format_duration, predicted_seconds_per_step
from normopt.factorial.plan import PHASES, GridPlan, read_plan
from normopt.factorial.slurm import read_submissions, slurm_folder, squeue_states
from normopt.job_record import read_job_record, recorded_exit_status
from normopt.report.cells.cell_assessment import divergence_reason, final_eval_loss
from normopt.report.cells.cell_reading import read_metrics
from normopt.report.cells.tuning_runs import TUNING_DIR, TUNING_FILE
from normopt.run_dir import RunDir

STATES = ("done", "running", "queued", "preempted", "diverged", "failed", "skipped")
SQUEUE_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"}
SQUEUE_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED"}


@dataclass
class RunStatus:
    phase: str
    name: str
    state: str  # one of STATES
    detail: str
    steps_left: int
    seconds_per_step: float | None  # measured from its metrics log


def _queued(entry: tuple[str, str]) -> str:
    """squeue's state in lower case, with its reason where it gives one."""
    return entry[0].lower() + (f" ({entry[1]})" if entry[1] not in ("", "None") else "")


def _lock_held(run: RunDir) -> bool:
    """Whether a process holds the run's lock (normopt.run_lock): it is training now."""
    try:
        fd = os.open(run.path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def measured_seconds_per_step(run: RunDir) -> float | None:
    """Seconds per optimizer step from the run's last training line (tokens per step over
    tokens per second; start-up, evaluation and checkpoints not included)."""
    try:
        lines = run.metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("tokens_per_s") and record.get("tokens") and record.get("step"):
            return record["tokens"] / record["step"] / record["tokens_per_s"]
    return None


def run_status(
    phase: str,
    run: RunDir,
    steps: int,
    queue: tuple[str, str] | None,
    job_id: str | None,
    left_queue: str | None = None,
) -> RunStatus:
    """One run's state (module docstring) from its folder and its SLURM queue entry;
    ``left_queue`` is the log of its job when SLURM was asked and no longer lists that job."""
    metrics = read_metrics(run.metrics) if run.metrics.is_file() else None
    last = (metrics.last_step or 0) if metrics else 0
    checkpoints = run.complete_steps()
    checkpoint = f"last checkpoint step {checkpoints[-1]}" if checkpoints else "no checkpoint"
    record, cell = read_job_record(run), _read_json(run.cell_json)
    exit_status = recorded_exit_status(run)
    log = (record or {}).get("log") or (str(run.train_log) if run.train_log.exists() else None)
    job = f" (job {job_id})" if job_id else ""
    rate = measured_seconds_per_step(run)

    def status(state: str, detail: str, left: int | None = None) -> RunStatus:
        return RunStatus(phase, run.path.name, state, detail, max(steps - last, 0) if left is None else left, rate)

    if checkpoints and checkpoints[-1] >= steps:
        loss = final_eval_loss(metrics.evals) if metrics else None
        return status("done", f"eval loss {loss:.4f}" if loss is not None else "no evaluation logged", 0)
    if queue is not None and queue[0] in SQUEUE_RUNNING:
        return status("running", f"step {last}/{steps}{job}")
    if queue is None and _lock_held(run):
        return status("running", f"step {last}/{steps} (this machine)")
    if queue is not None and queue[0] in SQUEUE_WAITING:
        if checkpoints or (record and record["state"] == "requeued"):
            return status("preempted", f"requeued, {checkpoint}; {_queued(queue)}{job}")
        return status("queued", f"{_queued(queue)}{job}")
    if cell.get("skipped"):
        return status("skipped", str(cell["skipped"]), 0)
    if exit_status == DIVERGED_EXIT_CODE or (metrics and divergence_reason(metrics) is not None):
        return status("diverged", f"at step {last}", 0)
    if record and record["state"] == "requeued" or exit_status == PREEMPTED_EXIT_CODE:
        return status("preempted", f"stopped after a checkpoint at step {last}, {checkpoint}{job}")
    if exit_status not in (None, 0):
        return status("failed", f"exit {exit_status} at step {last}{f', log {log}' if log else ''}")
    if record and record["state"] == "running":
        where = f"job {record.get('job_id')}" + (f" on {record.get('host')}" if record.get("host") else "")
        if left_queue is None:  # SLURM not asked: the record is all there is
            return status("running", f"step {last}/{steps} ({where}, by its job.json; squeue not available)")
        return status(
            "failed",
            f"{where} ended without a record at step {last} (node lost or job killed), "
            f"{checkpoint}{f', log {log}' if log else ''}",
        )
    if last == 0 and left_queue is not None:
        return status("failed", f"its job{job} ended before training started, log {left_queue}", 0)
    if last == 0:
        return status("queued", "not started")
    return status("preempted", f"stopped at step {last}, {checkpoint}")


def _latest_jobs(root: Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The job id of each phase in the latest submission, and each run's array task index."""
    submissions = read_submissions(root)
    if not submissions:
        return {}, {}
    latest = submissions[-1]
    tasks = {phase: {name: i for i, name in enumerate(latest.get("tasks", {}).get(phase, []))} for phase in PHASES}
    return dict(latest.get("jobs", {})), tasks


def grid_status(root: Path) -> tuple[list[RunStatus], list[str], bool]:
    """Every run's status, the lines for the choose and report jobs, and whether SLURM's
    queue was read."""
    plan = read_plan(root)
    jobs, tasks = _latest_jobs(root)
    queue = squeue_states(list(jobs.values())) if jobs else None
    statuses = []
    for phase, folder in (("tuning", root / TUNING_DIR), ("evaluation", root)):
        for cell in getattr(plan, phase):
            index = tasks.get(phase, {}).get(cell.name)
            task = f"{jobs[phase]}_{index}" if index is not None and phase in jobs else None
            entry = queue.get(task) if queue is not None and task else None
            if entry is None and queue is not None and task is not None and jobs[phase] in queue:
                entry = queue[jobs[phase]]  # a pending array shown whole
            gone = (
                str(slurm_folder(root) / f"{phase}-{task}.out")
                if queue is not None and task is not None and entry is None
                else None
            )
            statuses.append(
                run_status(phase, RunDir(folder / cell.name), plan.steps.get(cell.name, 0), entry, task, gone)
            )
    return statuses, _step_lines(root, plan, jobs, queue), queue is not None


def _step_lines(root: Path, plan: GridPlan, jobs: dict[str, str], queue: dict | None) -> list[str]:
    lines = []
    for step in ("choose", "report"):
        if step not in jobs:
            continue
        entry = (queue or {}).get(jobs[step])
        if entry is not None:
            state = _queued(entry)
        elif step == "choose":
            choices = _read_json(root / TUNING_DIR / TUNING_FILE).get("choices")
            state = f"done ({len(choices)} group(s) chosen)" if choices else "ended without choices"
        else:
            report = root / "report.md"
            submitted = read_submissions(root)[-1].get("submitted", 0)
            state = "done (report.md)" if report.exists() and report.stat().st_mtime >= submitted else "not written"
        log = slurm_folder(root) / f"{step}-{jobs[step]}.out"
        lines.append(f"{step:<11} {'':<34} {state} (job {jobs[step]}{f', log {log}' if log.exists() else ''})")
    return lines


def time_left(plan: GridPlan, statuses: list[RunStatus]) -> float | None:
    """Cell time left: each unfinished run's steps left at its measured seconds per step, or
    at the grid clock's prediction from the measured runs. None with no measurement yet."""
    measured = [
        (plan.step_flops.get(s.name, 0.0), s.seconds_per_step) for s in statuses if s.seconds_per_step is not None
    ]
    total = 0.0
    for s in statuses:
        if s.steps_left <= 0 or s.state in ("diverged", "failed", "skipped"):
            continue
        rate = s.seconds_per_step or predicted_seconds_per_step(plan.step_flops.get(s.name, 0.0), measured)
        if rate is None:
            return None
        total += s.steps_left * rate
    return total


def status_main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="normopt status",
        description="Where a grid stands: one line per run (done, running, queued, preempted, "
        "diverged, failed, skipped), SLURM job ids where squeue answers, and the "
        "time left.",
    )
    parser.add_argument("root", help="the grid's root folder (the spec's root)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    plan = read_plan(root)
    statuses, step_lines, from_slurm = grid_status(root)
    source = "SLURM queue and run folders" if from_slurm else "run folders"
    print(
        f"grid {root}: {len(plan.tuning)} tuning run(s), {len(plan.evaluation)} evaluation cell(s) (from the {source})"
    )
    for s in statuses:
        print(f"{s.phase:<11} {s.name:<34} {s.state:<10} {s.detail}")
    for line in step_lines:
        print(line)
    counts = Counter(s.state for s in statuses)
    left = time_left(plan, statuses)
    running = counts.get("running", 0)
    if left is None:
        clock = "time left: after the first measured steps"
    elif left == 0:
        clock = "nothing left to run"
    else:
        spread = f", ~{format_duration(left / running)} with {running} running at once" if running > 1 else ""
        clock = f"time left: ~{format_duration(left)} of training steps (grid clock; start-up not counted){spread}"
    print(f"summary: {', '.join(f'{counts.get(s, 0)} {s}' for s in STATES)}; {clock} [{time.strftime('%H:%M:%S')}]")
    return 0
