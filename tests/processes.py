"""Starting normopt processes from tests: their environment, ports, and waiting for a step.

Every test that runs ``train.py``, the launcher or torchrun goes through here, so that
they all run with one intra-op thread (test models gain nothing from more, and spinning
OpenMP threads crawl when another process holds the second core), unbuffered output and
the repository on the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from normopt.parallel.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO_ROOT",
    "InProcessResult",
    "child_env",
    "child_pids",
    "free_port",
    "normopt_lines",
    "rank_pid",
    "start",
    "train_in_process",
    "wait_for_step",
]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start(args: list[str], launcher: bool = False) -> subprocess.Popen:
    """``train.py ARGS`` (or ``normopt launch --nproc 2 ARGS``) in the background, output piped."""
    command = (
        [sys.executable, "-m", "normopt.cli", "launch", "--nproc", "2"]
        if launcher
        else [sys.executable, str(REPO_ROOT / "train.py")]
    )
    return subprocess.Popen(
        [*command, *args], cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    """Block until the run's metrics.jsonl logs ``step`` (or more); fail if the process ends first."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            logged = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip().endswith("}")]
            if logged and max(logged) >= step:
                return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never appeared (exit {proc.poll()})")


@dataclass
class InProcessResult:
    returncode: int
    stderr: str
    stdout: str


def train_in_process(args: list[str], capsys) -> InProcessResult:
    """``train.py ARGS`` in this process, for refusals that come before any model exists
    (the exit status and one-line contract of a real process is tested with subprocesses
    elsewhere). The process-group variables a run sets are put back afterwards."""
    from normopt.cli import main

    saved = dict(os.environ)
    capsys.readouterr()
    try:
        code = main(["train", *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    captured = capsys.readouterr()
    return InProcessResult(code, captured.err, captured.out)


def child_pids(parent: int) -> list[int]:
    """The pids of ``parent``'s children (a launcher's ranks)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launcher's rank ``rank`` (its RANK in its environment); None if none is."""
    for pid in child_pids(launcher_pid):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def normopt_lines(text: str) -> list[str]:
    """The lines of ``text`` that start with "normopt" (a progress bar's \\r ends a line too)."""
    return [part for line in text.split("\n") for part in line.split("\r") if part.strip().startswith("normopt")]
