"""Two ``normopt launch`` processes on localhost as two nodes of one job (``--nnodes 2``, the
real env:// rendezvous, real processes): they train like one process; losing either node (its
launcher killed, or the whole node frozen with SIGSTOP) ends the survivor within
``--node-timeout`` + NODE_LOSS_EXIT_MARGIN_S with one line and status 69; ``--max-restarts``
resumes from the last complete checkpoint once the lost node's launcher is started again."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normopt.errors import NO_PROGRESS_EXIT_CODE, NODE_LOST_EXIT_CODE, USER_ERROR_EXIT_CODE
from normopt.launch import NODE_LOSS_EXIT_MARGIN_S, WATCHDOG_PEER_PATIENCE_S
from normopt.node_watch import NodeInfo, parse_left, parse_nodes, silent_for
from normopt.peer_loss import is_peer_loss, peer_loss_cause
from normopt.run_dir import RunDir
from tests.conftest import run_cli, tiny_run_args
from tests.processes import REPO_ROOT, child_env, free_port, wait_for_step
from tests.test_launcher import _alive, _rank_pids

NODE_TIMEOUT = 5.0  # long enough that a busy 2-core machine never starves a heartbeat this long
STEPS = 60  # enough steps left after the loss (at step 12 or so) that the kill lands mid-run
RUN = ("train.steps=60", "train.eval_interval=0", "checkpoint.interval=5")
HOST = socket.gethostname()
WATCHDOG_S = 5


class Job:
    """Two localhost launchers of one job: ports, the training arguments, and each start's
    output in a file (a pipe nobody reads could fill and stall a rank)."""

    def __init__(self, tmp_path: Path, corpus: Path, *options: str, nnodes: int = 2):
        self.tmp, self.run_dir = tmp_path, tmp_path / "run"
        self.args = tiny_run_args(self.run_dir, corpus, *RUN)
        self.options, self.nnodes = options, nnodes
        self.master_port, self.watch_port = free_port(), free_port()
        self.starts: list[tuple[int, subprocess.Popen, Path]] = []

    def start(self, node: int) -> subprocess.Popen:
        err = self.tmp / f"node{node}.{len(self.starts)}.err"
        command = [
            sys.executable,
            "-m",
            "normopt.cli",
            "launch",
            "--nnodes",
            str(self.nnodes),
            "--node-rank",
            str(node),
            "--nproc",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(self.master_port),
            "--watch-port",
            str(self.watch_port),
            "--node-timeout",
            str(NODE_TIMEOUT),
            *self.options,
            *self.args,
        ]
        with open(err, "w") as stderr:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        self.starts.append((node, proc, err))
        return proc

    def lines(self, proc: subprocess.Popen) -> list[str]:
        """The lines starting with "normopt" that ``proc`` wrote (a progress bar's \\r ends a line)."""
        err = next(path for _, p, path in self.starts if p is proc)
        return [line for line in err.read_text().splitlines() if line.startswith("normopt")]

    def stderr(self, proc: subprocess.Popen) -> str:
        return next(path for _, p, path in self.starts if p is proc).read_text()

    def stop_all(self) -> None:
        for _, proc, _ in self.starts:
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a stopped process; its ranks follow (parent-death signal)
                proc.wait()

    def losses(self) -> list[tuple[int, float]]:
        return _losses(self.run_dir)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["loss"]) for line in lines if "loss" in line]


def _eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["eval_loss"]) for line in lines if "eval_loss" in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus) -> Path:
    """The run in one process, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, *RUN), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_corpus) -> tuple[Job, list[subprocess.Popen]]:
    """The run on two localhost launchers of one rank each, uninterrupted."""
    job = Job(tmp_path_factory.mktemp("two_nodes"), tiny_corpus)
    try:
        nodes = [job.start(0), job.start(1)]
        _wait_all(nodes, 300)
    finally:
        job.stop_all()
    return job, nodes


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))


def test_two_launchers_train_like_one_process(two_nodes, reference):
    job, nodes = two_nodes
    for proc in nodes:
        assert proc.returncode == 0, job.stderr(proc)[-3000:]
        assert job.lines(proc) == ["normopt launch: 2 rank(s) finished (exit 0)"], job.stderr(proc)[-3000:]
    losses, one = dict(job.losses()), dict(_losses(reference))
    assert list(losses) == list(range(1, STEPS + 1)) == list(one)
    # the same global batch as 2 ranks x 1 micro-batch and as 1 rank x 2 micro-batches: fp32
    # sums the gradients in another order (measured: identical for 6 steps, 4.8e-7 apart at most
    # over 60), the tolerance tests/test_distributed_training.py holds 1 vs 2 ranks to
    for step, loss in one.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)
    assert losses[STEPS] < losses[1] - 1.0  # training moved the loss
    (_, evaluated), (_, one_evaluated) = _eval_losses(job.run_dir)[-1], _eval_losses(reference)[-1]
    assert abs(evaluated - one_evaluated) < 1e-5


def _checkpoint_line(run_dir: Path) -> str:
    run = RunDir(run_dir)
    steps = run.complete_steps()
    return (
        f"last complete checkpoint: {run.checkpoint(steps[-1])} (step {steps[-1]})"
        if steps
        else "last complete checkpoint: none"
    )


def _freeze(launcher: subprocess.Popen) -> list[int]:
    """SIGSTOP a node: its launcher and its ranks (a frozen host); returns the rank pids."""
    ranks = _rank_pids(launcher.pid)
    for pid in [launcher.pid, *ranks]:
        os.kill(pid, signal.SIGSTOP)
    return ranks


@pytest.mark.parametrize(
    "lost, how",
    [
        (1, "kill"),
        pytest.param(1, "freeze", marks=pytest.mark.slow),
        pytest.param(0, "kill", marks=pytest.mark.slow),
        pytest.param(0, "freeze", marks=pytest.mark.slow),
    ],
)
def test_a_lost_node_ends_the_survivor_in_bounded_time_with_one_line(tmp_path, tiny_corpus, lost, how):
    """Kill: the lost node's launcher gets SIGKILL (its ranks die with it). Freeze: the lost
    node's launcher and ranks get SIGSTOP, so every socket stays open and the survivor's
    collective would hang for gloo's 30 minutes without the heartbeat."""
    job = Job(tmp_path, tiny_corpus, "train.steps=400")
    job.args = tiny_run_args(
        job.run_dir, tiny_corpus, "train.steps=400", "train.eval_interval=0", "checkpoint.interval=5"
    )
    survivor_rank = 1 - lost
    try:
        nodes = [job.start(0), job.start(1)]
        wait_for_step(nodes[0], job.run_dir, 12)
        survivor_ranks = _rank_pids(nodes[survivor_rank].pid)
        assert len(survivor_ranks) == 1
        if how == "kill":
            nodes[lost].kill()
        else:
            frozen_ranks = _freeze(nodes[lost])
        lost_at = time.monotonic()
        nodes[survivor_rank].wait(timeout=NODE_TIMEOUT + NODE_LOSS_EXIT_MARGIN_S + 30)
        took = time.monotonic() - lost_at
        print(f"node {lost} {how}: the survivor exited {took:.1f} s after the loss (--node-timeout {NODE_TIMEOUT:g})")
        checkpoint = _checkpoint_line(job.run_dir)  # before a frozen node runs again
        survivor = nodes[survivor_rank]
        assert survivor.returncode == NODE_LOST_EXIT_CODE, job.stderr(survivor)[-3000:]
        assert took <= NODE_TIMEOUT + NODE_LOSS_EXIT_MARGIN_S, f"the survivor took {took:.1f} s"
        assert not any(_alive(pid) for pid in survivor_ranks), "a survivor's rank outlived its launcher"
        lines = job.lines(survivor)
        assert len(lines) == 1, job.stderr(survivor)[-3000:]
        why = "the watch store it hosts at 127.0.0.1:" if lost == 0 else "no heartbeat for "
        assert re.fullmatch(
            rf"normopt launch: node {lost} \({re.escape(HOST)}, rank {lost}\) lost \({re.escape(why)}.*\); "
            rf"stopped this node's rank\(s\); {re.escape(checkpoint)}; exit {NODE_LOST_EXIT_CODE}",
            lines[0],
        ), lines[0]
        assert "(step " in checkpoint  # the run was past its step-10 checkpoint when the node went
        assert "Traceback" not in job.stderr(survivor)
        if how == "freeze":
            # the frozen node runs again, finds the job gone, and ends by itself the same way
            for pid in [nodes[lost].pid, *frozen_ranks]:
                os.kill(pid, signal.SIGCONT)
            nodes[lost].wait(timeout=NODE_TIMEOUT + NODE_LOSS_EXIT_MARGIN_S + 30)
            assert nodes[lost].returncode == NODE_LOST_EXIT_CODE, job.stderr(nodes[lost])[-3000:]
            lines = job.lines(nodes[lost])
            assert len(lines) == 1 and lines[0].startswith("normopt launch: ") and " lost " in lines[0], lines
            assert "Traceback" not in job.stderr(nodes[lost])
            assert not any(_alive(pid) for pid in frozen_ranks)
    finally:
        job.stop_all()


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0])
def test_restart_after_a_lost_node_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_corpus, two_nodes, lost):
    """The lost node's launcher is started again at once (as a scheduler or a person would,
    perhaps before the survivor has even noticed): both restart from the last complete
    checkpoint, and the run's losses are those of the uninterrupted two-node run, exactly
    (resuming is bit-exact)."""
    job = Job(tmp_path, tiny_corpus, "--max-restarts", "1")
    survivor_rank = 1 - lost
    try:
        nodes = [job.start(0), job.start(1)]
        wait_for_step(nodes[0], job.run_dir, 12)
        nodes[lost].kill()
        nodes[lost].wait()
        again = job.start(lost)
        _wait_all([nodes[survivor_rank], again], 300)
    finally:
        job.stop_all()
    survivor = nodes[survivor_rank]
    assert survivor.returncode == 0, job.stderr(survivor)[-3000:]
    assert again.returncode == 0, job.stderr(again)[-3000:]
    lines = job.lines(survivor)
    assert len(lines) == 3, lines
    assert re.fullmatch(
        rf"normopt launch: node {lost} \({re.escape(HOST)}, rank {lost}\) lost \(.*\); stopped this "
        rf"node's rank\(s\); last complete checkpoint: .*step_\d+ \(step \d+\); restart 1 of 1: "
        rf"waiting up to 600 s for every node's launcher to join again",
        lines[0],
    ), lines[0]
    assert lines[1].startswith(
        "normopt launch: all 2 nodes joined again; restarting this node's rank(s) from the last complete checkpoint: "
    )
    assert lines[2] == "normopt launch: 2 rank(s) finished (exit 0)"
    assert job.lines(again) == ["normopt launch: 2 rank(s) finished (exit 0)"]
    # resumed (not restarted from step 0): metrics were cut back to the checkpoint and continued
    assert [step for step, _ in job.losses()] == list(range(1, STEPS + 1))
    uninterrupted, _ = two_nodes
    assert job.losses() == uninterrupted.losses()
    assert "Traceback" not in job.stderr(survivor) + job.stderr(again)


@pytest.mark.slow
def test_a_rank_that_crashes_on_another_node_is_named_without_waiting_for_a_timeout(tmp_path, tiny_corpus):
    """A rank of node 1 is killed (its launcher lives): node 1's launcher says so and leaves at
    once; node 0's rank loses its peer, and node 0 names node 1 as the node that failed, well
    within --node-timeout (nothing is silent: no node is lost)."""
    job = Job(tmp_path, tiny_corpus)
    job.args = tiny_run_args(
        job.run_dir, tiny_corpus, "train.steps=400", "train.eval_interval=0", "checkpoint.interval=0"
    )
    try:
        nodes = [job.start(0), job.start(1)]
        wait_for_step(nodes[0], job.run_dir, 5)
        os.kill(_rank_pids(nodes[1].pid)[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _wait_all(nodes, 60)
        took = time.monotonic() - killed_at
    finally:
        job.stop_all()
    assert [proc.returncode for proc in nodes] == [1, 1], job.stderr(nodes[0])[-3000:]
    assert took < NODE_TIMEOUT, f"took {took:.1f} s"
    assert job.lines(nodes[1]) == [
        ("normopt launch: 1 rank(s) of this node did not agree on how the run ended (rank 1: status 137); exit 1")
    ]
    (line,) = job.lines(nodes[0])
    assert line.startswith(
        f"normopt launch: node 1 ({HOST}, rank 1) ended with status 1 (a rank failed there; its "
        f"output says why); this node's rank(s): rank 0: lost its peers ("
    ), line
    assert "Traceback" not in job.stderr(nodes[0]) + job.stderr(nodes[1])


@pytest.mark.slow
def test_every_survivor_of_three_nodes_names_the_same_lost_node(tmp_path, tiny_corpus):
    """Node 2 of three is killed: node 0 and node 1 both exit 69 naming node 2 (the first
    declaration is the one every launcher reports), within the bound; node 0, the store's
    host, does not leave before node 1 has read which node was lost."""
    job = Job(tmp_path, tiny_corpus, nnodes=3)
    job.args = tiny_run_args(
        job.run_dir,
        tiny_corpus,
        "train.steps=400",
        "train.eval_interval=0",
        "checkpoint.interval=5",
        "train.global_batch_size=6",
        "train.eval_sequences=6",
    )
    try:
        nodes = [job.start(node) for node in range(3)]
        wait_for_step(nodes[0], job.run_dir, 12)
        nodes[2].kill()
        lost_at = time.monotonic()
        _wait_all(nodes[:2], NODE_TIMEOUT + NODE_LOSS_EXIT_MARGIN_S + 30)
        took = time.monotonic() - lost_at
    finally:
        job.stop_all()
    assert took <= NODE_TIMEOUT + NODE_LOSS_EXIT_MARGIN_S, f"took {took:.1f} s"
    for proc in nodes[:2]:
        assert proc.returncode == NODE_LOST_EXIT_CODE, job.stderr(proc)[-3000:]
        (line,) = job.lines(proc)
        assert line.startswith(f"normopt launch: node 2 ({HOST}, rank 2) lost (no heartbeat for "), line
        assert line.endswith(f"{_checkpoint_line(job.run_dir)}; exit {NODE_LOST_EXIT_CODE}"), line


def _launch_refusal(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", "launch", "--nproc", "1", *options],
        check=False,
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (("--nnodes", "2", "--node-timeout", "1"), "normopt: error: --node-timeout 1: must be at least 2 s"),
        (("--nnodes", "2", "--max-restarts", "-1"), "normopt: error: --max-restarts -1: must be 0 or more"),
        (("--nnodes", "2", "--watch-port", "70000"), "normopt: error: --watch-port 70000 is not a TCP port"),
        (
            ("--nnodes", "2", "--master-port", "29600", "--watch-port", "29600"),
            "normopt: error: --watch-port 29600 is the master port",
        ),
    ],
)
def test_bad_node_watch_options_are_refused_in_one_line(options, message):
    proc = _launch_refusal(*options)
    assert proc.returncode == USER_ERROR_EXIT_CODE
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _stand_in(path: Path, script: str) -> Path:
    path.write_text(f"#!/usr/bin/env bash\n{script}\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    "status, what",
    [
        pytest.param(NODE_LOST_EXIT_CODE, "a node was lost", marks=pytest.mark.slow),
        (NO_PROGRESS_EXIT_CODE, "a rank stopped making progress"),
    ],
)
def test_sbatch_requeues_a_lost_node_or_a_stalled_rank_a_bounded_number_of_times(tmp_path, tiny_corpus, status, what):
    """launch/slurm.sbatch: the launcher's 69 (a node lost) or 124 (no progress) requeues the
    job, whose new allocation resumes from the last complete checkpoint, until
    SLURM_RESTART_COUNT reaches NORMOPT_MAX_REQUEUES: then the job ends with that status.
    srun is replaced by a process that ends as the launchers do, scontrol by one that records
    its call."""
    log = tmp_path / "scontrol.log"
    env = {
        **child_env(),
        "NORMOPT_PYTHON": sys.executable,
        "SLURM_JOB_ID": "5151",
        "NORMOPT_GPUS_PER_NODE": "1",
        "NORMOPT_SRUN": str(_stand_in(tmp_path / "srun", f"exit {status}")),
        "NORMOPT_SCONTROL": str(_stand_in(tmp_path / "scontrol", f'echo "$*" >> {log}')),
        "NORMOPT_MAX_REQUEUES": "2",
    }
    command = ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), *tiny_run_args(tmp_path / "run", tiny_corpus)]
    for restarts in ("0", "1"):
        proc = subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "SLURM_RESTART_COUNT": restarts},
        )
        assert proc.returncode == 0, proc.stderr
        assert f"{what} (status {status}); requeueing job 5151" in proc.stderr
    assert log.read_text().splitlines() == ["requeue 5151", "requeue 5151"]
    proc = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=120, env={**env, "SLURM_RESTART_COUNT": "2"}
    )
    assert proc.returncode == status
    assert (
        f"{what} (status {status}) after 2 requeue(s) (NORMOPT_MAX_REQUEUES); not requeueing job 5151 again"
        in proc.stderr
    )
    assert len(log.read_text().splitlines()) == 2


@pytest.mark.slow  # one node's watchdog stays in the default run (tests/test_no_hang.py)
def test_a_frozen_rank_ends_its_node_by_the_watchdog_and_the_other_names_that_node(tmp_path, tiny_corpus):
    """Two nodes, a rank of node 1 stopped (SIGSTOP; its launcher still beats, so no node is
    lost): node 1's watchdog sees the rank's beat stop and ends it with 124 and the stall line;
    node 0's rank, alive but waiting on it, is not named: node 0 gives the other node its
    patience, its rank loses its peer, and its launcher ends with 1 naming node 1 and its 124."""
    job = Job(tmp_path, tiny_corpus, "--watchdog-timeout", str(WATCHDOG_S))
    job.args = tiny_run_args(
        job.run_dir, tiny_corpus, "train.steps=400", "train.eval_interval=0", "checkpoint.interval=0"
    )
    try:
        nodes = [job.start(0), job.start(1)]
        wait_for_step(nodes[0], job.run_dir, 3)
        (frozen,) = _rank_pids(nodes[1].pid)
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        _wait_all(nodes, WATCHDOG_S + WATCHDOG_PEER_PATIENCE_S + 60)
        took = time.monotonic() - frozen_at
    finally:
        job.stop_all()
    assert nodes[1].returncode == NO_PROGRESS_EXIT_CODE, job.stderr(nodes[1])[-3000:]
    (line,) = job.lines(nodes[1])
    assert re.fullmatch(
        rf"normopt launch: no progress for \d+ s: rank 1 was in step at step \d+ "
        rf"\(last checkpoint: none\); exit {NO_PROGRESS_EXIT_CODE}",
        line,
    ), line
    assert nodes[0].returncode == 1, job.stderr(nodes[0])[-3000:]
    (line,) = job.lines(nodes[0])
    assert line.startswith(f"normopt launch: node 1 ({HOST}, rank 1) ended with status {NO_PROGRESS_EXIT_CODE}"), line
    assert took < WATCHDOG_S + WATCHDOG_PEER_PATIENCE_S + 15, took
    assert "Traceback" not in job.stderr(nodes[0]) + job.stderr(nodes[1])
    assert not _alive(frozen)


# ---------------------------------------------------------------------- the small pieces


def test_node_description_names_host_and_ranks():
    assert NodeInfo(1, "gpu-07", 8, 15).describe() == "node 1 (gpu-07, ranks 8-15)"
    assert NodeInfo(0, "gpu-01", 0, 0).describe() == "node 0 (gpu-01, rank 0)"


def test_departures_and_silence_are_read_as_written():
    assert parse_left(b"1:0,2:3,") == {1: 0, 2: 3}
    assert parse_left("") == {}
    assert parse_nodes(b"0,2,") == {0, 2}
    # silence counts only the reads that happened: a stalled observer blames nobody
    assert silent_for(last_answer=10.0, since=4.0) == 6.0
    assert silent_for(last_answer=10.0, since=12.0) == 0.0


def test_only_a_broken_collective_counts_as_a_lost_peer():
    import torch.distributed as dist

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:33512: Connection reset by peer. This is typically caused by a remote worker"
    )
    assert is_peer_loss(gloo)
    assert peer_loss_cause(gloo).startswith("Read error [127.0.0.1]:33512: Connection reset by peer.")
    assert is_peer_loss(dist.DistNetworkError("Broken pipe"))
    try:
        try:
            raise gloo
        except RuntimeError:
            raise ValueError("raised while handling it") from None
    except ValueError as chained:
        assert not is_peer_loss(chained)  # "from None": no cause, no context shown, not a peer loss
    wrapped = RuntimeError("checkpoint failed")
    wrapped.__cause__ = gloo
    assert is_peer_loss(wrapped)
    assert not is_peer_loss(RuntimeError("shape mismatch"))
    assert not is_peer_loss(ValueError("Connection reset by peer"))  # a bug's text is not a transport error
