"""``normopt status ROOT`` from the run folders alone (no SLURM answering): one state per run
from its checkpoints, metrics, cell.json and job.json, the live lock of a local run, and the
time left from the measured seconds per step; and the job record slurm.sbatch writes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
from pathlib import Path

import pytest

from normopt.errors import UserError
from normopt.factorial.cells import CellSpec
from normopt.factorial.plan import GridPlan, read_plan, write_plan
from normopt.factorial.status import grid_status, status_main, time_left
from normopt.job_record import main as job_record_main
from normopt.job_record import read_job_record, recorded_exit_status, write_job_record
from normopt.run_dir import RunDir
from tests.test_tuning import fake_run

STEPS = 100


def _cell(root: Path, name: str) -> CellSpec:
    return CellSpec(name, {}, {"norm": "rmsnorm", "optim": "adamw"}, 0, overrides=[f"run.dir={root / name}"])


def _grid(root: Path, names: list[str], flops: float = 1e9) -> GridPlan:
    plan = GridPlan(
        "/base.yaml",
        str(root),
        1,
        None,
        [],
        [_cell(root, n) for n in names],
        {"tuning": [], "evaluation": names},
        {n: STEPS for n in names},
        {n: flops for n in names},
    )
    write_plan(root, plan)
    return plan


def _partial_run(folder: Path, last_step: int, checkpoint: int | None, seconds_per_step: float = 0.5) -> None:
    """A run stopped (or still going) at ``last_step`` with a checkpoint at ``checkpoint``."""
    fake_run(folder, "rmsnorm", "adamw", 0, {}, complete=False)
    tokens_per_step = 128
    lines = [
        {"step": s, "loss": 5.0, "tokens": s * tokens_per_step, "tokens_per_s": tokens_per_step / seconds_per_step}
        for s in range(1, last_step + 1)
    ]
    with open(folder / "metrics.jsonl", "a") as out:
        out.write("".join(json.dumps(line) + "\n" for line in lines))
    cell = json.loads((folder / "cell.json").read_text())
    cell.pop("exit_code")
    (folder / "cell.json").write_text(json.dumps(cell))
    if checkpoint is not None:
        marker = folder / "checkpoints" / f"step_{checkpoint:08d}"
        marker.mkdir(parents=True)
        (marker / "trainer_state.json").write_text("{}")


def _job(folder: Path, state: str, status: int | None, job_id: str = "77") -> None:
    write_job_record(
        RunDir(folder),
        state,
        status,
        environ={"SLURM_JOB_ID": job_id, "NORMOPT_JOB_LOG": f"/logs/evaluation-{job_id}.out"},
    )


def test_every_state_from_the_run_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # squeue absent: the folders alone
    names = ["done", "diverged", "preempted", "requeued", "failed", "recorded", "running", "queued", "skipped"]
    root = tmp_path / "grid"
    plan = _grid(root, names)
    fake_run(root / "done", "rmsnorm", "adamw", 0, {50: 3.0, STEPS: 2.5})
    fake_run(root / "diverged", "rmsnorm", "adamw", 0, {50: 3.0, 60: "nan"}, complete=False)
    _partial_run(root / "preempted", 40, 40)
    (root / "preempted" / "cell.json").write_text(json.dumps({"name": "preempted", "exit_code": 75}))
    _partial_run(root / "requeued", 30, 30)
    _job(root / "requeued", "requeued", 75)
    _partial_run(root / "failed", 12, None)
    _job(root / "failed", "ended", 1)
    _partial_run(root / "recorded", 20, 10)  # its job.json says running; no squeue to ask
    _job(root / "recorded", "running", None)
    _partial_run(root / "running", 25, 20, seconds_per_step=2.0)
    (root / "queued").mkdir()
    (root / "queued" / "cell.json").write_text(json.dumps({"name": "queued"}))
    (root / "skipped").mkdir()
    (root / "skipped" / "cell.json").write_text(json.dumps({"name": "skipped", "skipped": "no value chosen"}))
    lock = os.open(root / "running", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a training process holds its run (normopt.run_lock)
    try:
        statuses, step_lines, from_slurm = grid_status(root)
    finally:
        os.close(lock)
    by_name = {s.name: s for s in statuses}
    assert not from_slurm and step_lines == []
    assert {n: by_name[n].state for n in names} == {
        "done": "done",
        "diverged": "diverged",
        "preempted": "preempted",
        "requeued": "preempted",
        "failed": "failed",
        "recorded": "running",
        "running": "running",
        "queued": "queued",
        "skipped": "skipped",
    }
    assert by_name["done"].detail == "eval loss 2.5000"
    assert by_name["diverged"].detail == "at step 60"
    assert by_name["preempted"].detail == "stopped after a checkpoint at step 40, last checkpoint step 40"
    assert by_name["failed"].detail == "exit 1 at step 12, log /logs/evaluation-77.out"
    assert (
        by_name["recorded"].detail
        == "step 20/100 (job 77 on " + socket.gethostname() + ", by its job.json; squeue not available)"
    )
    assert by_name["running"].detail == "step 25/100 (this machine)"
    assert by_name["queued"].detail == "not started"
    # time left: each unfinished run at its own rate, the others at the mean of the measured
    # runs of the same cost (0.5 s/step for preempted, requeued, failed, lost; 2.0 for running)
    measured = {"preempted": 0.5, "requeued": 0.5, "running": 2.0, "recorded": 0.5}
    predicted = (0.5 * 4 + 2.0) / 5  # failed is measured too, but ended: not counted in the time left
    expected = sum(
        rate * (STEPS - last)
        for rate, last in (
            (measured["preempted"], 40),
            (measured["requeued"], 30),
            (measured["running"], 25),
            (measured["recorded"], 20),
        )
    )
    expected += predicted * STEPS  # queued: nothing run
    assert time_left(plan, statuses) == pytest.approx(expected)


def test_status_prints_one_line_per_run_and_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    root = tmp_path / "grid"
    _grid(root, ["a", "b"])
    fake_run(root / "a", "rmsnorm", "adamw", 0, {STEPS: 2.5})
    (root / "b").mkdir()
    assert status_main([str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"grid {root}: 0 tuning run(s), 2 evaluation cell(s) (from the run folders)"
    assert re.fullmatch(r"evaluation\s+a\s+done\s+eval loss 2\.5000", out[1])
    assert re.fullmatch(r"evaluation\s+b\s+queued\s+not started", out[2])
    assert out[3].startswith(
        "summary: 1 done, 0 running, 1 queued, 0 preempted, 0 diverged, 0 failed, 0 skipped; "
        "time left: after the first measured steps"
    )


def test_status_refuses_a_folder_without_a_plan(tmp_path):
    with pytest.raises(UserError, match=r"plan.json: no such file \(a grid's plan, written by normopt factorial\)"):
        status_main([str(tmp_path)])
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable grid plan"):
        read_plan(tmp_path)


def test_job_record_keeps_the_start_of_an_attempt_and_restarts_a_new_one(tmp_path):
    run = RunDir(tmp_path / "run")
    env = {"SLURM_JOB_ID": "5", "SLURM_ARRAY_JOB_ID": "4", "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "0"}
    first = write_job_record(run, "running", environ=env)
    assert (first["job_id"], first["array_job_id"], first["array_task_id"], first["restarts"]) == ("5", "4", 1, 0)
    ended = write_job_record(run, "requeued", 75, environ=env)
    assert ended["started"] == first["started"] and recorded_exit_status(run) == 75
    again = write_job_record(run, "running", environ={**env, "SLURM_RESTART_COUNT": "1"})
    assert again["restarts"] == 1 and again["started"] >= ended["updated"]
    assert recorded_exit_status(run) is None  # running: no exit yet
    assert job_record_main([str(run.path), "end", "0"]) == 0
    assert read_job_record(run)["state"] == "ended" and recorded_exit_status(run) == 0
    assert job_record_main([str(run.path), "bogus"]) == 2
