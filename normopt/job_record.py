"""The record of the scheduler job that runs a run: ``RUN_DIR/job.json``.

``launch/slurm.sbatch`` writes it when a job attempt starts (``running``) and when it ends
(``ended`` with the exit status, or ``requeued`` when the job stopped after a checkpoint and
put itself back in the queue)::

    {"job_id": "4242", "array_job_id": "4240", "array_task_id": 2, "restarts": 0,
     "host": "node017", "state": "ended", "exit_status": 75, "log": ".../slurm/evaluation-4240_2.out",
     "started": 1796000000.0, "updated": 1796000320.5}

``normopt status`` reads it to say, from the run folders alone, which cells run, were
preempted or failed, with the job id and the log to read. It is JSON, written whole through
a temporary file and a rename, so a reader never sees half a record.

    python -m normopt.job_record RUN_DIR start
    python -m normopt.job_record RUN_DIR end STATUS [--requeued]
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from normopt.run_dir import RunDir

STATES = ("running", "requeued", "ended")


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def job_fields(environ: dict[str, str]) -> dict[str, Any]:
    """What SLURM says of the current job attempt (job id, array task, restarts, host)."""
    return {
        "job_id": environ.get("SLURM_JOB_ID"),
        "array_job_id": environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": _int_or_none(environ.get("SLURM_ARRAY_TASK_ID")),
        "restarts": _int_or_none(environ.get("SLURM_RESTART_COUNT")) or 0,
        "host": socket.gethostname(),
        "log": environ.get("NORMOPT_JOB_LOG"),
    }


def read_job_record(run: RunDir) -> dict[str, Any] | None:
    """The run's job record, or None without one (or with one that is not a JSON object)."""
    try:
        record = json.loads(run.job_json.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


def recorded_exit_status(run: RunDir) -> int | None:
    """How the run's last process ended, as recorded beside it: the exit status in job.json
    (a SLURM job) or in cell.json (the local factorial runner); None while it runs or when
    nothing was recorded."""
    record = read_job_record(run)
    if record is not None:
        return record.get("exit_status") if record["state"] != "running" else None
    try:
        cell = json.loads(run.cell_json.read_text())
    except (OSError, ValueError):
        return None
    status = cell.get("exit_code") if isinstance(cell, dict) else None
    return status if isinstance(status, int) else None


def write_job_record(
    run: RunDir, state: str, exit_status: int | None = None, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """Record the job attempt's ``state`` (one of STATES) in ``run``'s job.json."""
    if state not in STATES:
        raise ValueError(f"job state must be one of {STATES}, got {state!r}")
    now = time.time()
    previous = read_job_record(run) or {}
    fields = job_fields(dict(os.environ) if environ is None else environ)
    same_attempt = previous.get("job_id") == fields["job_id"] and previous.get("restarts") == fields["restarts"]
    record = {
        **fields,
        "state": state,
        "exit_status": exit_status,
        "started": previous.get("started", now) if same_attempt else now,
        "updated": now,
    }
    run.path.mkdir(parents=True, exist_ok=True)
    tmp = run.job_json.with_name(run.job_json.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run.job_json)
    return record


def main(argv: list[str]) -> int:
    usage = "usage: python -m normopt.job_record RUN_DIR {start | end STATUS [--requeued]}"
    if len(argv) < 2 or argv[1] not in ("start", "end") or (argv[1] == "end" and len(argv) < 3):
        print(usage, file=sys.stderr)
        return 2
    run = RunDir(Path(argv[0]))
    try:
        if argv[1] == "start":
            write_job_record(run, "running")
        else:
            status = int(argv[2])
            write_job_record(run, "requeued" if "--requeued" in argv[3:] else "ended", status)
    except (OSError, ValueError) as exc:  # a record that cannot be written must not fail the job
        print(f"normopt: warning: job record not written in {run.path}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
