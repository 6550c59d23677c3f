"""No hang, anywhere: a checkpoint write refused on one rank ends every rank (exit 2, one
line naming the rank and the reason, sync or async), every collective has a timeout, and
``normopt launch``'s progress watchdog ends a run in which no rank moves (exit 124, one line
naming the stuck rank and its phase), leaving no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from normopt.errors import NO_PROGRESS_EXIT_CODE, UserError
from normopt.launch import Watchdog
from normopt.parallel.timeouts import collective_timeout
from normopt.progress import progress_file
from tests.conftest import tiny_run_args
from tests.processes import REPO_ROOT, child_env, normopt_lines, wait_for_step

# measured on 2 shared cores: the whole 2-rank run (start-up included) ended 13-17 s after
# it started; the bound leaves room for a loaded machine
CHECKPOINT_FAILURE_BOUND_S = 60
WATCHDOG_S = 5
# past the watchdog's limit: the files are read every 0.5 s, the ranks get 1 s to end before
# they are killed; the rest is the launcher's own exit (measured 6.9-8.1 s after the SIGSTOP
# in all, on 2 shared cores)
WATCHDOG_GRACE_S = 5


def _launch(args: list[str], *launcher_options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "normopt.cli", "launch", "--nproc", "2", *launcher_options, *args],
        cwd=REPO_ROOT,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rank_pids(launcher_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# the default run's fault injection fills the checkpoints' disk during a sync and an async save
@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_full_disk_in_a_checkpoint_ends_every_rank_with_one_line(tmp_path, tiny_corpus, async_save):
    """Two ranks under the launcher, the checkpoints on a tiny tmpfs that fills during the
    first save: exit 2 within the bound, one line naming the failing rank and the OS's reason,
    no traceback, no partial checkpoint left (it is removed, as a refused write's is)."""
    from tests.mounts import tmpfs

    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "checkpoints", size="300k") as checkpoints:
        started = time.monotonic()
        proc = _launch(
            tiny_run_args(
                run_dir,
                tiny_corpus,
                "checkpoint.interval=3",
                "train.steps=30",
                "train.eval_interval=0",
                f"checkpoint.async_save={async_save}",
            )
        )
        try:
            _, stderr = proc.communicate(timeout=CHECKPOINT_FAILURE_BOUND_S + 60)
        finally:
            proc.kill()
        elapsed = time.monotonic() - started
        left = sorted(p.name for p in checkpoints.iterdir())
    assert proc.returncode == 2, stderr[-3000:]
    assert elapsed < CHECKPOINT_FAILURE_BOUND_S, elapsed
    lines = normopt_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.match(
        r"normopt: error: writing checkpoint step \d+ on rank [01] failed \(no space left on device\); "
        r"the partial checkpoint was removed",
        lines[0],
    ), lines[0]
    assert not [name for name in left if name.endswith(".tmp")], left


@pytest.mark.slow
def test_a_full_disk_under_the_logs_of_two_ranks_ends_both_with_one_line(tmp_path, tiny_corpus):
    """The whole run on a disk that fills at once: rank 0 alone writes the logs, and its refusal
    (TensorBoard's file or a log, whichever is first) reaches the other rank at the next step's
    all-reduce: both exit 2, one line, instead of rank 0 leaving its peer in a collective."""
    from tests.mounts import tmpfs

    with tmpfs(tmp_path / "disk", size="40k") as disk:
        started = time.monotonic()
        proc = _launch(
            tiny_run_args(
                disk / "run",
                tiny_corpus,
                "checkpoint.interval=3",
                "train.steps=30",
                "diagnostics.interval=1",
                "checkpoint.async_save=true",
            )
        )
        try:
            _, stderr = proc.communicate(timeout=CHECKPOINT_FAILURE_BOUND_S + 60)
        finally:
            proc.kill()
        elapsed = time.monotonic() - started
    assert proc.returncode == 2, stderr[-3000:]
    assert elapsed < CHECKPOINT_FAILURE_BOUND_S, elapsed
    lines = normopt_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("normopt: error: writing ") and "failed (no space left on device) at step" in lines[0]


def test_a_stopped_rank_is_named_by_the_watchdog_and_nothing_outlives_the_launch(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    proc = _launch(
        tiny_run_args(run_dir, tiny_corpus, "train.steps=400", "train.eval_interval=0", "checkpoint.interval=0"),
        "--watchdog-timeout",
        str(WATCHDOG_S),
    )
    try:
        wait_for_step(proc, run_dir, 3)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2
        stopped = next(pid for pid in ranks if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        os.kill(stopped, signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, stderr = proc.communicate(timeout=WATCHDOG_S + 60)
        elapsed = time.monotonic() - frozen_at
    finally:
        proc.kill()
    assert proc.returncode == NO_PROGRESS_EXIT_CODE, stderr[-3000:]
    assert elapsed < WATCHDOG_S + WATCHDOG_GRACE_S, elapsed
    lines = normopt_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    found = re.fullmatch(
        rf"normopt launch: no progress for (\d+) s: rank 1 was in step at step \d+ "
        rf"\(last checkpoint: none\); exit {NO_PROGRESS_EXIT_CODE}",
        lines[0],
    )
    assert found and WATCHDOG_S <= int(found.group(1)) <= WATCHDOG_S + 1, lines[0]
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in ranks):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks), "a rank outlived its launcher"


@pytest.mark.slow
def test_the_step_timeout_bounds_a_collective_without_the_watchdog(tmp_path, tiny_corpus):
    """The watchdog off and a 3 s step timeout: the rank left waiting for a stopped peer times
    out in its collective, exits 69 quietly, and the launcher stops the stopped one (after its
    crash grace of 5 s) and names both: exit 1 within 3 + 5 s and a few more."""
    run_dir = tmp_path / "run"
    proc = _launch(
        tiny_run_args(run_dir, tiny_corpus, "train.steps=400", "train.eval_interval=0", "checkpoint.interval=0"),
        "--watchdog-timeout",
        "0",
        env={"NORMOPT_STEP_TIMEOUT_S": "3"},
    )
    try:
        wait_for_step(proc, run_dir, 3)
        ranks = _rank_pids(proc.pid)
        stopped = next(pid for pid in ranks if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        os.kill(stopped, signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - frozen_at
    finally:
        proc.kill()
    assert proc.returncode == 1 and elapsed < 3 + 5 + 6, (proc.returncode, elapsed, stderr[-3000:])
    lines = normopt_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "(rank 0: lost its peers (Timed out waiting 3000ms" in lines[0], lines[0]
    assert lines[0].endswith("rank 1: stopped by the launcher); exit 1"), lines[0]
    assert not any(_alive(pid) for pid in ranks)


def _write(folder: Path, rank: int, **record) -> None:
    progress_file(folder, rank).write_text(json.dumps(record))


def test_the_watchdog_names_a_frozen_rank_else_the_one_behind(tmp_path, monkeypatch):
    monkeypatch.setattr("normopt.launch.WATCHDOG_POLL_S", 0.0)
    now = time.time()
    watchdog = Watchdog(tmp_path, [0, 1, 2], timeout=0.2)
    _write(tmp_path, 0, phase="step", step=5, since=now, beat=now)
    _write(tmp_path, 1, phase="step", step=4, since=now, beat=now)
    _write(tmp_path, 2, phase="eval", step=5, since=now, beat=now)
    assert watchdog.problem() is None  # something moved just now
    time.sleep(0.3)
    stall = watchdog.problem()
    assert (stall.rank, stall.phase, stall.step) == (1, "step", 4)  # the one furthest behind
    _write(tmp_path, 2, phase="eval", step=5, since=now, beat=now - 10)  # its beat stopped
    stall = watchdog.problem()
    assert (stall.rank, stall.phase, stall.step) == (2, "eval", 5)
    _write(tmp_path, 2, phase="eval", step=5, since=now, beat=now - 10, ended=True)  # it ended by itself
    assert watchdog.problem().rank == 1
    assert (
        Watchdog(tmp_path, [0], timeout=0.1).limit({"checkpoint save"})
        == collective_timeout("checkpoint").total_seconds()
    )


def test_collective_timeouts_by_phase(monkeypatch):
    assert collective_timeout("step") == timedelta(seconds=600)
    assert collective_timeout("start-up") == collective_timeout("checkpoint") == timedelta(seconds=1800)
    monkeypatch.setenv("NORMOPT_STEP_TIMEOUT_S", "42")
    assert collective_timeout("step") == timedelta(seconds=42)
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("NORMOPT_STEP_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="NORMOPT_STEP_TIMEOUT_S"):
            collective_timeout("step")


def test_a_bad_watchdog_timeout_is_refused(tmp_path, tiny_corpus):
    proc = _launch(tiny_run_args(tmp_path / "run", tiny_corpus), "--watchdog-timeout", "-1")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.strip().startswith("normopt: error: --watchdog-timeout -1"), stderr


def test_a_refusal_on_rank_0_before_dcp_starts_fails_the_save_on_every_rank(tmp_path):
    """Rank 0's own piece of a checkpoint (its non-tensor state, written before DCP's
    collectives) refused by the disk: both ranks learn it at once and raise the same one-line
    refusal; rank 1 is not left inside DCP waiting for a rank that will never come."""
    from tests.torchrun import run_torchrun

    out = tmp_path / "out"
    run_torchrun(
        REPO_ROOT / "tests" / "workers" / "checkpoint_failure_worker.py",
        2,
        [str(tmp_path / "run"), str(out)],
        timeout=120,
        env={"NORMOPT_CHECKPOINT_TIMEOUT_S": "20"},
    )
    seen = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    assert seen[0]["refusal"] == seen[1]["refusal"], seen
    assert re.match(
        r"writing checkpoint step 1 on rank 0 failed \(no space left on device\); the partial "
        r"checkpoint was removed",
        seen[0]["refusal"],
    ), seen
    assert all(s["seconds"] < 15 for s in seen), seen
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
