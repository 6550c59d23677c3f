"""``normopt launch``: start N training ranks on this node and keep normopt's exit statuses.

torchrun reports any failing rank as status 1 with a traceback, lets SIGUSR1 kill it while
its ranks train on as orphans, and starts each rank in a session of its own, so that neither
a preemption (75) nor a divergence (3) survives it and killing its process group leaves
the ranks running. This launcher is the small part of torchrun that normopt needs, with
those three things done the way a scheduler and the factorial runner expect:

* **statuses**: the ranks already agree on how a run ends (one all-reduce per step), so they
  exit with the same status; the launcher exits with it (0 done, 2 user error, 3 diverged,
  75 stopped after a checkpoint); rank 0 has printed the one line saying why, so the
  launcher adds one only for a finished run. A rank that crashes (any other status, or a
  signal) makes the launcher stop the others, name each rank's status and exit 1.
* **signals**: SIGTERM, SIGUSR1 and SIGINT sent to the launcher are forwarded to every rank,
  which checkpoints and exits 75; one that arrives before the ranks exist ends the launch
  with 75, and one forwarded to a rank still starting waits until its handler is set. The ranks live in a process group of their own so that a
  Ctrl-C at the terminal reaches them once, through the launcher (a second Ctrl-C is the
  trainer's "stop now, no checkpoint").
* **threads**: torchrun sets ``OMP_NUM_THREADS=1`` for several ranks; left unset, every rank
  would start a thread per core and N ranks oversubscribe the machine N times. Where the
  user has not set it, each rank gets the usable cores (this process's CPU affinity) divided
  by the ranks on this node, at least 1, and the launcher says so in one line; a value the
  user set is passed through untouched (``thread_default``).
* **lifetime**: every rank is started with the kernel's parent-death signal set to SIGKILL,
  so a launcher that is killed outright (``kill -9``, a killed process group) takes its
  ranks with it: never orphans, never a second writer after a restart.

Multi-node jobs run one launcher per node with ``--nnodes``, ``--node-rank`` (default: the
``SLURM_NODEID`` that srun sets) and the address of node 0 (``--master-addr``); ranks meet
through torch's env:// rendezvous, as torchrun's static rendezvous does.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from normopt.cli_args import CommandParser
from normopt.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    UserError,
)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
HANDLER_WAIT_S = 30.0  # how long a forwarded signal waits for a starting rank's handler
# statuses the ranks agree on; anything else from a rank is a crash
AGREED_STATUSES = {
    0: "finished",
    USER_ERROR_EXIT_CODE: "stopped on a user error (see the line above)",
    DIVERGED_EXIT_CODE: "stopped: the loss or gradient norm became NaN/Inf (no update applied)",
    PREEMPTED_EXIT_CODE: "stopped after a checkpoint; run the same command to resume",
}
CRASH_EXIT_CODE = 1
# after the first rank ends, the others get this long to end the same way before being killed
AGREEMENT_GRACE_S = 60.0
CRASH_GRACE_S = 5.0
TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: a new process group, and SIGKILL when the launcher dies."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no parent-death signal; the forwarding still holds
        pass


def default_nproc() -> int:
    """The visible GPUs, else 1 (CPU ranks use gloo)."""
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except Exception:  # a broken CUDA install should not stop a CPU launch
        return 1


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a scheduler's cgroup
    or ``taskset`` narrows), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_default(environ: dict[str, str], local_ranks: int, cores: int) -> str | None:
    """The ``OMP_NUM_THREADS`` to give each rank when the user has set none: ``cores //
    local_ranks``, at least 1. None when the user's own value (any, even an empty one) is
    to be passed through."""
    if "OMP_NUM_THREADS" in environ:
        return None
    return str(max(cores // local_ranks, 1))


def rank_env(base: dict[str, str], *, local_rank: int, nproc: int, node_rank: int, nnodes: int,
             master_addr: str, master_port: int) -> dict[str, str]:
    """The env:// rendezvous variables torch.distributed reads, for one rank."""
    return {**base, "RANK": str(node_rank * nproc + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": str(node_rank), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def agreed_status(statuses: list[int | None]) -> int:
    """The launcher's status from the ranks' statuses (None: killed by the launcher after
    another rank had ended). All ranks agreeing on a known status gives that status; a crash
    anywhere gives 1."""
    ended = [s for s in statuses if s is not None]
    if ended and all(s == ended[0] for s in ended) and ended[0] in AGREED_STATUSES and len(ended) == len(statuses):
        return ended[0]
    return CRASH_EXIT_CODE


def describe(status: int) -> str:
    return AGREED_STATUSES.get(status, "a rank failed (its output is above)")


class RankGroup:
    """The rank processes of this node: start, forward signals, wait, stop."""

    def __init__(self, command: list[str], envs: list[dict[str, str]]) -> None:
        self.procs = [subprocess.Popen(command, env=env, preexec_fn=_die_with_parent) for env in envs]

    def forward(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                if signum != signal.SIGINT:  # Python catches SIGINT from its start: nothing to wait for
                    _wait_until_caught(proc, signum)
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def kill_remaining(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def wait(self) -> list[int | None]:
        """Wait for every rank; once one has ended, give the rest a grace period to end the
        same way, then kill them. Returns each rank's status (None: killed here)."""
        first_end: float | None = None
        grace = AGREEMENT_GRACE_S
        while True:
            codes = [proc.poll() for proc in self.procs]
            if all(code is not None for code in codes):
                return [_status(code) for code in codes]
            ended = [code for code in codes if code is not None]
            if ended and first_end is None:
                first_end = time.monotonic()
                grace = AGREEMENT_GRACE_S if _status(ended[0]) in AGREED_STATUSES else CRASH_GRACE_S
            if first_end is not None and time.monotonic() - first_end > grace:
                running = [i for i, code in enumerate(codes) if code is None]
                self.kill_remaining()
                return [None if i in running else _status(proc.returncode) for i, proc in enumerate(self.procs)]
            time.sleep(0.1)


def _catches(pid: int, signum: int) -> bool | None:
    """Whether process ``pid`` has a handler for ``signum`` (None: unknown, without /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError):
        return None
    return bool(mask >> (signum - 1) & 1)


def _wait_until_caught(proc: subprocess.Popen, signum: int) -> None:
    """A rank started a moment ago may not have set its stop handler yet (it is the first
    thing train does); a signal then would kill it instead of stopping it cleanly."""
    deadline = time.monotonic() + HANDLER_WAIT_S
    while proc.poll() is None and time.monotonic() < deadline and _catches(proc.pid, signum) is False:
        time.sleep(0.01)


def _status(returncode: int) -> int:
    """A process's exit status, a death by signal counted as 128 + the signal (as a shell does)."""
    return 128 - returncode if returncode < 0 else returncode


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="normopt launch", allow_abbrev=False, description="Train on N ranks of this node (one launcher per node for "
        "multi-node jobs), keeping normopt's exit statuses (0 done, 2 user error, 3 diverged, 75 "
        "stopped after a checkpoint) and forwarding SIGTERM/SIGUSR1/SIGINT to every rank.",
        epilog="Everything after the launcher's options goes to training: --config PATH and section.key=value.")
    parser.add_argument("--nproc", type=int, default=None, help="ranks on this node (default: visible GPUs, else 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this node's index (default: $SLURM_NODEID, else 0)")
    parser.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="rendezvous port on node 0 (default: a free port on one node, 29500 on several)")
    return parser


def _validate(train_args: list[str], world: int) -> None:
    """Refuse a bad config (or a batch that cannot be split over the ranks) here, once, with
    one line and status 2, before any rank starts."""
    from normopt.cli_args import config_parser
    from normopt.config import check_world_size, load_config

    args = config_parser("normopt launch", "").parse_args(train_args)
    check_world_size(load_config(args.config, args.overrides), world)


def launch_main(argv: list[str]) -> int:
    # a stop signal before the ranks exist is remembered, not fatal (status 75, one line)
    pending: list[int] = []
    original = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in FORWARDED_SIGNALS}
    try:
        return _launch(argv, pending)
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def _launch(argv: list[str], pending: list[int]) -> int:
    args, train_args = _parser().parse_known_args(argv)
    nproc = args.nproc if args.nproc is not None else default_nproc()
    if nproc < 1 or args.nnodes < 1:
        raise UserError("--nproc and --nnodes must be at least 1")
    if args.node_rank is not None:
        node_rank = args.node_rank
    else:
        slurm_node = os.environ.get("SLURM_NODEID", "0").strip()
        if not re.fullmatch(r"[0-9]+", slurm_node):
            raise UserError(f"SLURM_NODEID={slurm_node!r} is not a node index (pass --node-rank)")
        node_rank = int(slurm_node)
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise UserError(f"--master-port {args.master_port} is not a TCP port (1-65535)")
    if not 0 <= node_rank < args.nnodes:
        raise UserError(f"--node-rank {node_rank} is not in 0..{args.nnodes - 1}")
    world = nproc * args.nnodes
    _validate(train_args, world)
    if args.master_port is not None:
        port = args.master_port
    elif args.nnodes == 1:
        from normopt.parallel.distributed import free_port

        port = free_port()
    else:
        port = 29500
    base_env = dict(os.environ)
    threads = thread_default(base_env, nproc, usable_cores())
    if threads is not None:
        base_env["OMP_NUM_THREADS"] = threads
        print(f"normopt launch: OMP_NUM_THREADS={threads} per rank ({usable_cores()} usable cores / {nproc} "
              f"rank(s) on this node); set OMP_NUM_THREADS to choose", file=sys.stderr, flush=True)
    envs = [rank_env(base_env, local_rank=i, nproc=nproc, node_rank=node_rank, nnodes=args.nnodes,
                     master_addr=args.master_addr, master_port=port) for i in range(nproc)]
    command = [sys.executable, str(TRAIN_SCRIPT), *train_args]
    if pending:
        print(f"normopt launch: stopped by {signal.Signals(pending[0]).name} before any rank started; "
              f"nothing to resume (exit {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    group = RankGroup(command, envs)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, frame: group.forward(signum))
    for signum in pending:  # arrived while the ranks were being started
        group.forward(signum)
    try:
        statuses = group.wait()
    finally:
        group.kill_remaining()
    status = agreed_status(statuses)
    if status == CRASH_EXIT_CODE:
        detail = ", ".join(f"rank {node_rank * nproc + i}: " + ("stopped by the launcher" if s is None else f"status {s}")
                           for i, s in enumerate(statuses))
        print(f"normopt launch: {world} rank(s) did not agree on how the run ended ({detail}); exit 1",
              file=sys.stderr, flush=True)
    elif status == 0:
        print(f"normopt launch: {world} rank(s) {describe(status)} (exit {status})", file=sys.stderr, flush=True)
    # 2, 3 and 75: rank 0 has said why in one line; a second line would say it again
    return status
