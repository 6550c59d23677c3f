"""Grids and jobs through a real SLURM (slurmctld + slurmd + munged on localhost,
``tests/cluster.py``): a tuned grid submitted with ``--slurm`` runs to ``report.md`` with
no other command; USR1 preemption of an array task checkpoints, exits 75, requeues and resumes
bit-identically; ``scancel`` (SIGTERM) checkpoints and exits 75 without a requeue; a task
whose processes are all killed, and a task that fails, are reported as failed with their logs,
and the report job still runs after them.

The node declares two GPUs as GRES, so each array task asks ``--gpus-per-node=1`` and two run
at a time; their ranks run on the CPU with gloo. A job that SLURM requeues waits about two
minutes (its BeginTime) before it may start again; the tests move that start to now with
``scontrol update``, which changes when the job starts, not what it does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_MODEL
from tests.processes import REPO_ROOT

SBATCH = REPO_ROOT / "launch" / "slurm.sbatch"
TIMEOUT_S = 300


@pytest.fixture
def cluster(slurm_cluster):
    """The session's cluster, its queue emptied after each test (a failed test's jobs must not
    keep the next one waiting)."""
    yield slurm_cluster
    jobs = slurm_cluster.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
    if jobs:
        slurm_cluster.run("scancel", *sorted(set(jobs)), check=False)
        _wait(lambda: _queue_empty(slurm_cluster), "the queue to empty after the test", slurm_cluster, timeout=60)


def _job_env(cluster) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitter's environment): one thread per
    rank, this Python, the repository on the path."""
    return cluster.env(
        {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "NORMOPT_PYTHON": sys.executable,
            "PYTHONPATH": str(REPO_ROOT),
        }
    )


def _normopt(cluster, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", *args],
        cwd=REPO_ROOT,
        env=_job_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _spec(tmp_path: Path, corpus: Path, **changes) -> Path:
    spec = {
        "base": str(REPO_ROOT / "configs" / "demo.yaml"),
        "root": str(tmp_path / "grid"),
        "set": {
            "data.path": str(corpus),
            "data.vocab_size": 300,
            "train.steps": 6,
            "train.global_batch_size": 4,
            "train.micro_batch_size": 4,
            "train.seq_len": 32,
            "train.eval_interval": 3,
            "train.eval_sequences": 8,
            "train.mfu_probe": False,
            "train.log_interval": 1,
            "optim.warmup_steps": 1,
            "optim.grad_clip": 0,
            "checkpoint.interval": 3,
            **{item.split("=")[0]: yaml.safe_load(item.split("=")[1]) for item in TINY_MODEL},
        },
        "axes": {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw"]},
        "seeds": [0],
        "slurm": {"gpus_per_node": 1},
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _wait(condition, what: str, cluster, timeout: float = TIMEOUT_S, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    queue = cluster.run("squeue", check=False).stdout
    raise AssertionError(f"{what}: not within {timeout:.0f} s\nsqueue:\n{queue}\n{cluster.logs(15)}")


def _queue_empty(cluster) -> bool:
    return cluster.run("squeue", "-h", check=False).stdout.strip() == ""


def _job_field(cluster, job: str, field: str) -> str:
    out = cluster.run("scontrol", "-o", "show", "job", job, check=False).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def _start_now(cluster, job: str) -> None:
    """Let a requeued job start without its BeginTime delay."""
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)


def _kill_job_processes(cluster, job: str) -> None:
    """SIGKILL every process of a job at once (its batch script, srun, the launcher, the
    ranks), as a node that dies leaves it: nothing of the job gets to record how it ended."""
    # frozen first, until no new process appears (a shell that saw its child die could
    # otherwise fork the recorder between two kills on a busy machine), then killed
    frozen: set[int] = set()
    while True:
        listed = cluster.run("scontrol", "listpids", job).stdout.splitlines()[1:]
        pids = {int(line.split()[0]) for line in listed if line.split() and line.split()[0].isdigit()}
        assert pids or frozen, listed
        if pids <= frozen:
            break
        for pid in pids - frozen:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= pids
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_tuned_grid_runs_through_slurm_to_its_report(cluster, tmp_path, tiny_corpus):
    """Tuning array (the value 1e4 diverges: exit 3, which the choice job's afterany still
    follows), the choice, the evaluation array at the chosen value, then the report job."""
    spec = _spec(
        tmp_path,
        tiny_corpus,
        axes={"model.norm": ["derf"], "optim.name": ["adamw"]},
        tune={"key": "optim.lr", "values": [1.0e-2, 1.0e4], "seeds": [100]},
    )
    root = tmp_path / "grid"
    dry = _normopt(cluster, "factorial", str(spec), "--slurm", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "cost: 2 tuning runs, 12 steps; 1 evaluation runs, 6 steps" in dry.stdout
    assert "CHOOSE=$(sbatch --parsable --dependency=afterany:$TUNING" in dry.stdout
    assert "EVALUATION=$(sbatch --parsable --dependency=afterok:$CHOOSE" in dry.stdout
    assert not root.exists()

    proc = _normopt(cluster, "factorial", str(spec), "--slurm")
    assert proc.returncode == 0, proc.stderr
    assert re.search(
        r"submitted tuning \d+ \(2 tasks\), choose \d+, evaluation \d+ \(1 tasks\), report \d+", proc.stdout
    ), proc.stdout
    during = _normopt(cluster, "status", str(root))
    assert during.returncode == 0, during.stderr
    assert "(from the SLURM queue and run folders)" in during.stdout
    assert len([line for line in during.stdout.splitlines() if line.startswith(("tuning ", "evaluation "))]) == 3

    twice = _normopt(cluster, "factorial", str(spec), "--slurm")  # two jobs would train one run
    assert twice.returncode == 2 and len(twice.stderr.strip().splitlines()) == 1, twice.stderr
    assert "of its last submission are still in the queue" in twice.stderr

    _wait(lambda: _queue_empty(cluster), "the chain to finish", cluster)
    assert (root / "report.md").is_file(), (root / "slurm").iterdir()
    choices = _read_json(root / "tuning" / "tuning.json")["choices"]
    assert {group: c["chosen"] for group, c in choices.items()} == {"derf-adamw": 0.01}
    assert all("exited 3" in c["excluded"]["10000.0"] or "nan" in c["excluded"]["10000.0"] for c in choices.values())
    for cell in ("derf-adamw-s0",):
        assert yaml.safe_load((root / cell / "config.yaml").read_text())["optim"]["lr"] == 0.01
        assert _read_json(root / cell / "job.json")["exit_status"] == 0
    diverged = _read_json(root / "tuning" / "derf-adamw-lr10000.0-s100" / "job.json")
    assert diverged["state"] == "ended" and diverged["exit_status"] == 3

    after = _normopt(cluster, "status", str(root))
    assert after.returncode == 0, after.stderr
    lines = after.stdout.splitlines()
    assert re.search(r"^evaluation\s+derf-adamw-s0\s+done\s+eval loss \d", after.stdout, re.M), after.stdout
    assert re.search(r"^tuning\s+derf-adamw-lr10000.0-s100\s+diverged\s+at step \d", after.stdout, re.M)
    assert any(line.startswith("report") and "done (report.md)" in line for line in lines), after.stdout
    assert lines[-1].startswith("summary: 2 done, 0 running, 0 queued, 0 preempted, 1 diverged, 0 failed"), lines[-1]

    # nothing is left to run (a diverged run is a result, not rerun): the choice and the report
    again = _normopt(cluster, "factorial", str(spec), "--slurm", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "TUNING=" not in again.stdout and "EVALUATION=" not in again.stdout and "REPORT=" in again.stdout


def test_usr1_preempts_an_array_task_which_requeues_and_resumes_bit_identically(cluster, tmp_path, tiny_corpus):
    spec = _spec(tmp_path, tiny_corpus, axes={"model.norm": ["rmsnorm"], "optim.name": ["adamw"]})
    settings = yaml.safe_load(spec.read_text())
    settings["set"].update(
        {"train.steps": 300, "train.eval_interval": 0, "checkpoint.interval": 0, "train.dtype": "float32"}
    )
    spec.write_text(yaml.safe_dump(settings))
    root, cell = tmp_path / "grid", tmp_path / "grid" / "rmsnorm-adamw-s0"
    proc = _normopt(cluster, "factorial", str(spec), "--slurm")
    assert proc.returncode == 0, proc.stderr
    array = re.search(r"evaluation (\d+)", proc.stdout).group(1)
    _wait(
        lambda: (cell / "metrics.jsonl").exists() and max(_losses(cell), default=0) >= 3,
        "step 3 of the array task",
        cluster,
        interval=0.05,
    )
    cluster.run("scancel", "--signal=USR1", "--batch", f"{array}_0")
    record = _wait(
        lambda: _read_json(cell / "job.json").get("state") == "requeued" and _read_json(cell / "job.json"),
        "the task to record its requeue",
        cluster,
        interval=0.1,
    )
    assert record["exit_status"] == 75
    stopped_at = max(_losses(cell))
    assert 3 <= stopped_at < 300
    assert (cell / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").is_file()
    _wait(lambda: _job_field(cluster, f"{array}_0", "JobState") == "PENDING", "the task back in the queue", cluster)
    status = _normopt(cluster, "status", str(root))
    assert re.search(
        rf"^evaluation\s+rmsnorm-adamw-s0\s+preempted\s+requeued, last checkpoint step {stopped_at}",
        status.stdout,
        re.M,
    ), status.stdout
    _start_now(cluster, f"{array}_0")
    _wait(lambda: _queue_empty(cluster), "the resumed task and the report job", cluster)
    final = _read_json(cell / "job.json")
    assert final["state"] == "ended" and final["exit_status"] == 0 and final["restarts"] == 1, final
    assert (root / "report.md").is_file()

    reference = tmp_path / "reference"
    overrides = [
        o
        for o in json.loads((root / "plan.json").read_text())["evaluation"][0]["overrides"]
        if not o.startswith("run.dir=")
    ]
    single = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "--config",
            str(REPO_ROOT / "configs/demo.yaml"),
            *overrides,
            f"run.dir={reference}",
        ],
        cwd=REPO_ROOT,
        env=_job_env(cluster),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    resumed, uninterrupted = _losses(cell), _losses(reference)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 301))
    assert resumed == uninterrupted  # bit-identical, steps after the requeue included


def test_scancel_a_lost_task_and_a_failed_one_each_reported_and_the_report_still_written(
    cluster, tmp_path, tiny_corpus
):
    """One grid, three array tasks, submitted held. Task 2's corpus (an arm's own copy) is
    removed before release, so it fails at its start (exit 2, recorded in job.json). Of the two
    that train, ``scancel`` (SIGTERM) of task 0 checkpoints and exits 75 with no requeue; SIGKILL
    of every process of task 1 (as when its node dies) leaves its job.json at "running", which
    ``normopt status`` reports as a job that ended without a record. The report job, which
    follows the array however it ended, still writes report.md naming what it left out."""
    import shutil

    broken = shutil.copytree(tiny_corpus, tmp_path / "broken-corpus")
    spec = _spec(tmp_path, tiny_corpus, arms={"broken": {"data.path": str(broken), "model.norm": "rmsnorm"}})
    settings = yaml.safe_load(spec.read_text())
    settings["set"].update(
        {"train.steps": 400, "train.eval_interval": 0, "checkpoint.interval": 0, "train.dtype": "float32"}
    )
    spec.write_text(yaml.safe_dump(settings))
    root = tmp_path / "grid"
    proc = _normopt(cluster, "factorial", str(spec), "--slurm", "--sbatch-option=--hold")
    assert proc.returncode == 0, proc.stderr
    array = re.search(r"evaluation (\d+)", proc.stdout).group(1)
    names = [c["name"] for c in json.loads((root / "plan.json").read_text())["evaluation"]]
    assert names == ["rmsnorm-adamw-s0", "derf-adamw-s0", "broken-adamw-s0"]
    cells = [root / name for name in names]
    shutil.rmtree(broken)
    for job in re.findall(r"(?:evaluation|report) (\d+)", proc.stdout):
        cluster.run("scontrol", "release", job)
    for cell in cells[:2]:
        _wait(
            lambda cell=cell: (cell / "metrics.jsonl").exists() and max(_losses(cell), default=0) >= 3,
            f"step 3 of {cell.name}",
            cluster,
            interval=0.05,
        )
    cluster.run("scancel", f"{array}_0")
    _kill_job_processes(cluster, _read_json(cells[1] / "job.json")["job_id"])
    _wait(lambda: _queue_empty(cluster), "the three tasks and the report job", cluster)

    record = _read_json(cells[0] / "job.json")
    assert record["state"] == "ended" and record["exit_status"] == 75, record
    stopped_at = max(_losses(cells[0]))
    assert stopped_at < 400
    assert (cells[0] / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").is_file()
    assert _job_field(cluster, f"{array}_0", "Restarts") == "0"
    assert _job_field(cluster, f"{array}_0", "JobState") == "CANCELLED"
    assert _read_json(cells[1] / "job.json")["state"] == "running"  # nothing could record its end
    failed = _read_json(cells[2] / "job.json")
    assert failed["state"] == "ended" and failed["exit_status"] == 2, failed

    status = _normopt(cluster, "status", str(root))
    lines = {line.split()[1]: line for line in status.stdout.splitlines() if line.startswith("evaluation")}
    assert re.search(
        rf"preempted\s+stopped after a checkpoint at step {stopped_at}, last checkpoint step {stopped_at}",
        lines["rmsnorm-adamw-s0"],
    ), status.stdout
    assert re.search(
        r"failed\s+job \d+ on \S+ ended without a record at step \d+ \(node lost or job killed\), "
        r"no checkpoint, log \S+/slurm/evaluation-\d+_1\.out",
        lines["derf-adamw-s0"],
    ), status.stdout
    assert re.search(r"failed\s+exit 2 at step 0, log \S+/slurm/evaluation-\d+_2\.out", lines["broken-adamw-s0"])
    log = Path(re.search(r"log (\S+)", lines["broken-adamw-s0"]).group(1))
    assert "data.path" in log.read_text()
    report_line = next(line for line in status.stdout.splitlines() if line.startswith("report"))
    assert "done (report.md)" in report_line, report_line
    assert "broken-adamw-s0 left out: missing: no metrics.jsonl" in (root / "report.md").read_text()
    assert status.stdout.splitlines()[-1].startswith(
        "summary: 0 done, 0 running, 0 queued, 1 preempted, 0 diverged, 2 failed"
    )
