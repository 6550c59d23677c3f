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
  with 75, and one forwarded to a rank still starting waits until its handler is set. The
  ranks live in a process group of their own so that a Ctrl-C at the terminal reaches them
  once, through the launcher (a second Ctrl-C is the trainer's "stop now, no checkpoint").
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
through torch's env:// rendezvous, as torchrun's static rendezvous does. The launchers meet
first, on a watch store that node 0's launcher hosts on ``--watch-port`` (default: the master
port + 1), and keep a heartbeat there (``normopt.node_watch``):

* **node loss**: a node whose launcher is killed, or that stops answering while its processes
  live (a frozen host, a network partition), is declared lost after ``--node-timeout`` seconds
  of silence (default 30; node 0, the store's host, when the store does not answer for that
  long). Every surviving launcher then stops its ranks (a rank blocked in a collective with
  the lost node would otherwise wait for gloo/NCCL's 30-minute timeout) and exits with status
  69 within ``--node-timeout`` + 5 s (the silence is read once a second, so it is seen up to
  2 s late; 1 s for the ranks to end by themselves before they are killed; up to 1.5 s to
  record the loss, node 0 keeping the store up until the others have read it), printing one
  line that names the lost node (node rank, host, global ranks) and the run's last complete
  checkpoint (path and step, or none). Ranks whose collective broke exit quietly with 69 and
  leave the line to the launcher (``normopt.peer_loss``).
* **restarts**: with ``--max-restarts N``, a surviving launcher instead waits (up to
  ``--join-timeout`` seconds, default 600) until every node's launcher has joined again (the
  lost node's launcher started anew, by hand or by a scheduler) and restarts its ranks, which
  resume from the last complete checkpoint (``checkpoint.resume=auto``; resuming is
  bit-exact on CPU). Under SLURM the lost node's replacement comes from the scheduler:
  ``launch/slurm.sbatch`` requeues the job when the launcher exits with 69.

* **progress watchdog** (each node watches its own ranks): every rank keeps a small file in the launcher's
  temporary folder with its phase (``start-up``, ``step``, ``eval``, ``checkpoint save``,
  ``checkpoint wait``) and step, and a beat (``normopt.progress``). When no rank has entered a
  new phase or step for ``--watchdog-timeout`` seconds (default 600; 0 disables), the launcher
  kills the ranks and exits 124 with one line: ``no progress for N s: rank R was in PHASE at
  step S (last checkpoint: ...)``, R being a rank whose beat stopped (a stopped or frozen
  process), else the one furthest behind. The limit grows to 10 times the longest step seen,
  and a rank in start-up or a checkpoint phase gets at least that phase's collective timeout
  (``normopt.parallel.timeouts``, 1800 s by default). The run ends within the limit + 2 s
  (the files are read every 0.5 s; 1 s for the ranks to end before they are killed). In a
  multi-node job the node whose rank is frozen ends with 124 and that line; the other
  nodes, whose ranks still beat while they wait on it, give it 15 s more, then their ranks
  lose their peers and their launchers end with 1 naming that node and its status (where no
  rank is frozen anywhere, every node ends with 124 after those 15 s). ``launch/slurm.sbatch``
  requeues on 124 as on 69, up to ``NORMOPT_MAX_REQUEUES`` times.

Exit statuses: 0 done, 2 user error, 3 diverged, 75 stopped after a checkpoint (as the ranks
agree them), 69 a node was lost (or did not rejoin for a restart), 124 no progress for
``--watchdog-timeout`` seconds, 1 anything else (a rank crashed, or the nodes never all
joined at the start).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from normopt.cli_args import CommandParser
from normopt.errors import (
    DIVERGED_EXIT_CODE,
    NO_PROGRESS_EXIT_CODE,
    NODE_LOST_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    UserError,
)
from normopt.node_watch import (
    DEFAULT_JOIN_TIMEOUT_S,
    DEFAULT_NODE_TIMEOUT_S,
    HEARTBEAT_S,
    MIN_NODE_TIMEOUT_S,
    READ_LOSS_WAIT_S,
    JoinTimeout,
    NodeLoss,
    NodeWatch,
)
from normopt.peer_loss import PEER_LOST_REPORT_ENV, read_peer_loss_report
from normopt.progress import BEAT_S, PHASES, PROGRESS_DIR_ENV, progress_file, read_progress

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
# a lost node's survivors: how long their ranks get to end by themselves before being killed
KILL_GRACE_S = 1.0
# how late a lost node's survivors exit at most, past --node-timeout (see the module doc): the
# silence is seen up to two beats late, the ranks get their grace, node 0 lets the others read
# the loss (the others: up to 1 s to record it), and half a second for the rest
NODE_LOSS_EXIT_MARGIN_S = 2 * HEARTBEAT_S + KILL_GRACE_S + READ_LOSS_WAIT_S + 0.5
DEFAULT_WATCHDOG_TIMEOUT_S = 600.0
WATCHDOG_POLL_S = 0.5  # how often the watchdog reads the ranks' progress files
# multi-node: a node whose ranks all still beat waits this much longer before it ends them,
# so that the node with the frozen rank (whose launcher sees its beat stop) is the one named
WATCHDOG_PEER_PATIENCE_S = 15.0
WATCHDOG_STEP_FACTOR = 10  # the limit is at least this many times the longest step seen
TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
_PR_SET_PDEATHSIG = 1


def _find_prctl():
    """libc's prctl, looked up here in the launcher: the child that calls it runs while the
    node-watch thread may hold the dynamic loader's lock, and must not take that lock itself.
    None where there is none (not Linux): no parent-death signal; the forwarding still holds."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def _die_with_parent() -> None:
    """Runs in the child before exec: a new process group, and SIGKILL when the launcher dies.
    Only system calls here: other threads of the launcher may hold locks at the fork."""
    os.setpgid(0, 0)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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


def rank_env(
    base: dict[str, str],
    *,
    local_rank: int,
    nproc: int,
    node_rank: int,
    nnodes: int,
    master_addr: str,
    master_port: int,
) -> dict[str, str]:
    """The env:// rendezvous variables torch.distributed reads, for one rank."""
    return {
        **base,
        "RANK": str(node_rank * nproc + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": str(node_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


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
        self.stopped_for: object | None = None  # what interrupted wait(), if anything did

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

    def wait(self, interrupt: Callable[[], object | None] | None = None) -> list[int | None]:
        """Wait for every rank; once one has ended, give the rest a grace period to end the
        same way, then kill them. ``interrupt`` (asked on every poll while a rank runs) may
        return a reason to stop the ranks now: they get :data:`KILL_GRACE_S` to end by
        themselves, then are killed, and the reason is kept in ``stopped_for``. Returns each
        rank's status (None: killed here)."""
        first_end: float | None = None
        grace = AGREEMENT_GRACE_S
        while True:
            codes = [proc.poll() for proc in self.procs]
            if all(code is not None for code in codes):
                return [_status(code) for code in codes]
            reason = interrupt() if interrupt is not None else None
            if reason is not None:
                self.stopped_for = reason
                return self._end_within(KILL_GRACE_S)
            ended = [code for code in codes if code is not None]
            if ended and first_end is None:
                first_end = time.monotonic()
                grace = AGREEMENT_GRACE_S if _status(ended[0]) in AGREED_STATUSES else CRASH_GRACE_S
            if first_end is not None and time.monotonic() - first_end > grace:
                return self._end_within(0.0)
            time.sleep(0.1)

    def _end_within(self, grace: float) -> list[int | None]:
        """Let the ranks end by themselves for ``grace`` seconds, then kill the rest; each
        rank's status, None for one killed here."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(proc.poll() is None for proc in self.procs):
            time.sleep(0.05)
        running = [i for i, proc in enumerate(self.procs) if proc.poll() is None]
        self.kill_remaining()
        return [None if i in running else _status(proc.returncode) for i, proc in enumerate(self.procs)]


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
        prog="normopt launch",
        allow_abbrev=False,
        plugins=False,  # --plugin is training's: it goes on to every rank
        description="Train on N ranks of this node (one launcher per node for "
        "multi-node jobs), keeping normopt's exit statuses (0 done, 2 user error, 3 diverged, 75 "
        "stopped after a checkpoint, 69 a node was lost, 124 no progress) and forwarding "
        "SIGTERM/SIGUSR1/SIGINT to every rank.",
        epilog="Everything after the launcher's options goes to training: --plugin, --config PATH and "
        "section.key=value.",
    )
    parser.add_argument("--nproc", type=int, default=None, help="ranks on this node (default: visible GPUs, else 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument(
        "--node-rank", type=int, default=None, help="this node's index (default: $SLURM_NODEID, else 0)"
    )
    parser.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    parser.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port on node 0 (default: a free port on one node, 29500 on several)",
    )
    parser.add_argument(
        "--watch-port",
        type=int,
        default=None,
        help="several nodes: port of the launchers' heartbeat store on node 0 (default: master port + 1)",
    )
    parser.add_argument(
        "--node-timeout",
        type=float,
        default=DEFAULT_NODE_TIMEOUT_S,
        help=f"several nodes: declare a node lost after this many seconds without a heartbeat; "
        f"the others exit with 69 within it + {NODE_LOSS_EXIT_MARGIN_S:.0f} s "
        f"(default {DEFAULT_NODE_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--watchdog-timeout",
        type=float,
        default=DEFAULT_WATCHDOG_TIMEOUT_S,
        help=f"end the run with status {NO_PROGRESS_EXIT_CODE} when no rank has entered a new step or "
        f"phase for this many seconds (at least {WATCHDOG_STEP_FACTOR} x the longest step, and the "
        f"collective timeout in start-up and checkpoints); 0 disables "
        f"(default {DEFAULT_WATCHDOG_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="several nodes: after a lost node, restart this node's ranks from the last complete "
        "checkpoint up to N times, once every node's launcher has joined again (default 0)",
    )
    parser.add_argument(
        "--join-timeout",
        type=float,
        default=DEFAULT_JOIN_TIMEOUT_S,
        help=f"several nodes: how long to wait for every node's launcher, at the start and before "
        f"a restart (default {DEFAULT_JOIN_TIMEOUT_S:.0f} s)",
    )
    return parser


def _validate(train_args: list[str], world: int) -> str:
    """Refuse a bad config (or a batch that cannot be split over the ranks) here, once, with
    one line and status 2, before any rank starts. Returns the run directory."""
    from normopt.cli_args import config_parser
    from normopt.config import check_world_size, load_config

    args = config_parser("normopt launch", "").parse_args(train_args)
    cfg = load_config(args.config, args.overrides)
    check_world_size(cfg, world)
    return str(cfg.run.dir)


def last_checkpoint(run_dir: str) -> str:
    """The run's last complete checkpoint as "PATH (step N)", or "none"."""
    from normopt.run_dir import RunDir

    run = RunDir(run_dir)
    try:
        steps = run.complete_steps()
    except OSError:
        steps = []
    return f"{run.checkpoint(steps[-1])} (step {steps[-1]})" if steps else "none"


class StopSignals:
    """SIGTERM/SIGUSR1/SIGINT to the launcher: forwarded to the running ranks, remembered while
    none run (before the first start, between a lost node and a restart)."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.group: RankGroup | None = None

    def handle(self, signum, frame) -> None:
        if self.group is not None:
            self.group.forward(signum)
        else:
            self.pending.append(signum)

    def attach(self, group: RankGroup) -> RankGroup:
        """Forward from now on to ``group``, starting with what arrived while it was being started."""
        self.group = group
        for signum in self.pending:
            group.forward(signum)
        return group

    def detach(self) -> None:
        self.group = None


@dataclass
class Plan:
    """What this launcher runs: its ranks' command and environments, and the job's shape."""

    command: list[str]
    envs: list[dict[str, str]]
    reports: list[Path]  # where each local rank writes why it lost its peers
    node_rank: int
    nproc: int
    nnodes: int
    run_dir: str

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.nproc + local_rank


def launch_main(argv: list[str]) -> int:
    # a stop signal before the ranks exist is remembered, not fatal (status 75, one line)
    signals = StopSignals()
    original = {sig: signal.signal(sig, signals.handle) for sig in FORWARDED_SIGNALS}
    try:
        return _launch(argv, signals)
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def _launch(argv: list[str], signals: StopSignals) -> int:
    user_env = dict(os.environ)  # what the ranks get
    # the launcher's watch-store client logs every failed call with a C++ stack trace (before
    # torch is imported, which reads this once); the launcher says what happened in one line
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
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
    for option, value in (("--master-port", args.master_port), ("--watch-port", args.watch_port)):
        if value is not None and not 1 <= value <= 65535:
            raise UserError(f"{option} {value} is not a TCP port (1-65535)")
    if not 0 <= node_rank < args.nnodes:
        raise UserError(f"--node-rank {node_rank} is not in 0..{args.nnodes - 1}")
    if not args.node_timeout >= MIN_NODE_TIMEOUT_S:  # also refuses nan
        raise UserError(
            f"--node-timeout {args.node_timeout:g}: must be at least {MIN_NODE_TIMEOUT_S:g} s "
            f"(the heartbeat comes every {HEARTBEAT_S:g} s)"
        )
    if not args.watchdog_timeout >= 0 or args.watchdog_timeout == float("inf"):
        raise UserError(f"--watchdog-timeout {args.watchdog_timeout:g}: a number of seconds, 0 to disable")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: must be 0 or more")
    if not args.join_timeout > 0:
        raise UserError(f"--join-timeout {args.join_timeout:g}: must be more than 0 s")
    world = nproc * args.nnodes
    run_dir = _validate(train_args, world)
    if args.master_port is not None:
        port = args.master_port
    elif args.nnodes == 1:
        from normopt.parallel.distributed import free_port

        port = free_port()
    else:
        port = 29500
    watch_port = args.watch_port if args.watch_port is not None else port + 1
    if args.nnodes > 1 and watch_port == port:
        raise UserError(f"--watch-port {watch_port} is the master port: the ranks' rendezvous needs it")
    base_env = user_env
    threads = thread_default(base_env, nproc, usable_cores())
    if threads is not None:
        base_env["OMP_NUM_THREADS"] = threads
        print(
            f"normopt launch: OMP_NUM_THREADS={threads} per rank ({usable_cores()} usable cores / {nproc} "
            f"rank(s) on this node); set OMP_NUM_THREADS to choose",
            file=sys.stderr,
            flush=True,
        )
    if signals.pending:
        print(
            f"normopt launch: stopped by {signal.Signals(signals.pending[0]).name} before any rank started; "
            f"nothing to resume (exit {PREEMPTED_EXIT_CODE})",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    report_dir = Path(tempfile.mkdtemp(prefix="normopt-launch-"))
    try:
        reports = [report_dir / f"rank_{node_rank * nproc + i}.txt" for i in range(nproc)]
        envs = [
            {
                **rank_env(
                    base_env,
                    local_rank=i,
                    nproc=nproc,
                    node_rank=node_rank,
                    nnodes=args.nnodes,
                    master_addr=args.master_addr,
                    master_port=port,
                ),
                PEER_LOST_REPORT_ENV: str(reports[i]),
                PROGRESS_DIR_ENV: str(report_dir),
            }
            for i in range(nproc)
        ]
        plan = Plan(
            [sys.executable, str(TRAIN_SCRIPT), *train_args], envs, reports, node_rank, nproc, args.nnodes, run_dir
        )
        if args.nnodes == 1:
            return _run_one_node(plan, signals, args.watchdog_timeout, report_dir)
        watch = NodeWatch(node_rank, args.nnodes, nproc, args.master_addr, watch_port, args.node_timeout)
        try:
            status = _run_nodes(
                plan, signals, watch, args.max_restarts, args.join_timeout, args.watchdog_timeout, report_dir
            )
        except BaseException:
            watch.close()
            raise
        if not watch.close():
            # the watch thread is inside a store call that may never return: the interpreter's
            # teardown would abort under it ("terminate called without an active exception")
            shutil.rmtree(report_dir, ignore_errors=True)
            _exit_now(status)
        return status
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)


def _exit_now(status: int) -> None:
    """End the launcher with ``status`` without the interpreter's teardown (every line said)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _say(line: str, fresh_line: bool = False) -> None:
    """One line of the launcher's on stderr. ``fresh_line``: after ranks killed mid-line (a
    progress bar has no newline until it closes), start on a line of its own."""
    print(f"{chr(10) if fresh_line else ''}normopt launch: {line}", file=sys.stderr, flush=True)


def _run_ranks(plan: Plan, signals: StopSignals, interrupt=None) -> tuple[list[int | None], object | None]:
    """Start this node's ranks and wait for them (module doc); returns their statuses and what
    stopped them early (``interrupt``'s reason), if anything did."""
    for report in plan.reports:
        report.unlink(missing_ok=True)
    group = signals.attach(RankGroup(plan.command, plan.envs))
    try:
        statuses = group.wait(interrupt)
    finally:
        group.kill_remaining()
        signals.detach()
    return statuses, group.stopped_for


def _rank_details(plan: Plan, statuses: list[int | None]) -> str:
    """Each local rank's ending, in words: a lost peer quotes the rank's own cause."""
    parts = []
    for i, status in enumerate(statuses):
        if status is None:
            what = "stopped by the launcher"
        elif status == NODE_LOST_EXIT_CODE:
            cause = read_peer_loss_report(plan.reports[i])
            what = f"lost its peers ({cause})" if cause else "lost its peers"
        else:
            what = f"status {status}"
        parts.append(f"rank {plan.global_rank(i)}: {what}")
    return ", ".join(parts)


def _say_ending(plan: Plan, status: int, statuses: list[int | None]) -> None:
    """The launcher's line for ranks that ended by themselves (none where rank 0 said why)."""
    if status == CRASH_EXIT_CODE:
        # a rank that died (or quit after losing its peers) left its progress bar mid-line
        _say(
            f"{len(statuses)} rank(s) of this node did not agree on how the run ended "
            f"({_rank_details(plan, statuses)}); exit 1",
            fresh_line=True,
        )
    elif status == 0:
        _say(f"{plan.world} rank(s) {describe(status)} (exit {status})")
    # 2, 3 and 75: rank 0 has said why in one line; a second line would say it again


def _run_one_node(
    plan: Plan, signals: StopSignals, watchdog_timeout: float = 0.0, progress_dir: Path | None = None
) -> int:
    watchdog = (
        Watchdog(progress_dir, [plan.global_rank(i) for i in range(plan.nproc)], watchdog_timeout)
        if watchdog_timeout > 0 and progress_dir is not None
        else None
    )
    statuses, stall = _run_ranks(plan, signals, interrupt=watchdog.problem if watchdog else None)
    if isinstance(stall, Stall):
        _say(f"{stall.line(last_checkpoint(plan.run_dir))}; exit {NO_PROGRESS_EXIT_CODE}", fresh_line=True)
        return NO_PROGRESS_EXIT_CODE
    status = agreed_status(statuses)
    _say_ending(plan, status, statuses)
    return status


def _run_nodes(
    plan: Plan,
    signals: StopSignals,
    watch: NodeWatch,
    max_restarts: int,
    join_timeout: float,
    watchdog_timeout: float = 0.0,
    progress_dir: Path | None = None,
) -> int:
    """One node of a multi-node job: join the launchers' round, run the ranks while watching
    the other nodes and this node's ranks' progress, and on a lost node stop the ranks and
    either exit 69 or, restarts left, join the next round and start again; on no progress,
    stop them and exit 124 (module doc). The other nodes' ranks then lose their peers, and
    their launchers name this node and its status."""
    restarts = 0
    while True:
        try:
            joined = watch.join(join_timeout, abort=lambda: bool(signals.pending))
        except JoinTimeout as exc:
            missing = ", ".join(map(str, exc.missing))
            if restarts:
                _say(
                    f"node(s) {missing} did not rejoin within {join_timeout:g} s; last complete checkpoint: "
                    f"{last_checkpoint(plan.run_dir)}; exit {NODE_LOST_EXIT_CODE}"
                )
                return NODE_LOST_EXIT_CODE
            _say(
                f"node(s) {missing} did not join within {join_timeout:g} s (watch store "
                f"{watch.addr}:{watch.port}); every node runs normopt launch with the same --nnodes, "
                f"--master-addr and ports; exit {CRASH_EXIT_CODE}"
            )
            return CRASH_EXIT_CODE
        if joined < 0:
            name = signal.Signals(signals.pending[0]).name
            _say(
                f"stopped by {name} while waiting for every node to join; last complete checkpoint: "
                f"{last_checkpoint(plan.run_dir)}; exit {PREEMPTED_EXIT_CODE}"
            )
            return PREEMPTED_EXIT_CODE
        if restarts:
            _say(
                f"all {plan.nnodes} nodes joined again; restarting this node's rank(s) from the last complete "
                f"checkpoint: {last_checkpoint(plan.run_dir)}"
            )
        watchdog = (
            Watchdog(
                progress_dir,
                [plan.global_rank(i) for i in range(plan.nproc)],
                watchdog_timeout,
                patience_if_alive=WATCHDOG_PEER_PATIENCE_S,
            )
            if watchdog_timeout > 0 and progress_dir is not None
            else None
        )
        statuses, loss = _run_ranks(
            plan,
            signals,
            interrupt=lambda watchdog=watchdog: (
                watch.problem() or (watchdog.problem() if watchdog is not None else None)
            ),
        )
        if isinstance(loss, Stall):
            _say(f"{loss.line(last_checkpoint(plan.run_dir))}; exit {NO_PROGRESS_EXIT_CODE}", fresh_line=True)
            watch.leave(NO_PROGRESS_EXIT_CODE)
            if plan.node_rank == 0:
                watch.wait_for_others(AGREEMENT_GRACE_S)
            return NO_PROGRESS_EXIT_CODE
        if loss is None:
            status = agreed_status(statuses)
            if status != CRASH_EXIT_CODE or NODE_LOST_EXIT_CODE not in statuses:
                return _leave(plan, watch, status, statuses)  # agreed, or crashed here: nothing to wait for
            loss = _await_verdict(watch, plan)  # a rank lost its peers: was a node lost?
            if loss is None:
                return _leave(plan, watch, CRASH_EXIT_CODE, statuses)
        watch.declare(loss)
        line = _loss_line(loss, plan.node_rank, last_checkpoint(plan.run_dir))
        killed = None in statuses
        if restarts >= max_restarts:
            _say(f"{line}; exit {NODE_LOST_EXIT_CODE}", fresh_line=killed)
            if plan.node_rank == 0:
                watch.wait_for_others(READ_LOSS_WAIT_S, lost=loss.lost.node_rank)
            return NODE_LOST_EXIT_CODE
        restarts += 1
        _say(
            f"{line}; restart {restarts} of {max_restarts}: waiting up to {join_timeout:g} s for every node's "
            f"launcher to join again",
            fresh_line=killed,
        )


def _await_verdict(watch: NodeWatch, plan: Plan) -> NodeLoss | None:
    """A rank of this node lost its peers: wait until a node is declared lost, or every other
    node has left by itself, at most ``node_timeout`` plus three heartbeats (a silent node is
    declared up to two beats late, counted from its last beat, which came before this rank's
    collective broke)."""
    deadline = time.monotonic() + watch.node_timeout + 3 * HEARTBEAT_S
    others = set(range(plan.nnodes)) - {plan.node_rank}
    while time.monotonic() < deadline:
        loss = watch.problem()
        if loss is not None:
            return loss
        if others <= set(watch.left()):
            return None
        time.sleep(0.1)
    return None


def _leave(plan: Plan, watch: NodeWatch, status: int, statuses: list[int | None]) -> int:
    """The ranks ended by themselves: tell the other launchers, say how (a crash names the
    node that failed first, when another did), and, on node 0, keep the store up until the
    others have left."""
    watch.leave(status)
    if status == CRASH_EXIT_CODE:
        failed = {node: s for node, s in watch.left().items() if s not in AGREED_STATUSES and node != plan.node_rank}
        if failed:
            names = "; ".join(
                f"{watch.info(node).describe()} ended with status {s}" for node, s in sorted(failed.items())
            )
            _say(
                f"{names} (a rank failed there; its output says why); this node's rank(s): "
                f"{_rank_details(plan, statuses)}; exit {CRASH_EXIT_CODE}"
            )
        else:
            _say_ending(plan, status, statuses)
    else:
        _say_ending(plan, status, statuses)
    if plan.node_rank == 0:
        watch.wait_for_others(AGREEMENT_GRACE_S)
    return status


def _loss_line(loss: NodeLoss, node_rank: int, checkpoint: str) -> str:
    """The one line a survivor prints: the lost node, why, and where the run can resume."""
    if loss.lost.node_rank == node_rank:
        what = (
            f"this node, {loss.lost.describe()}, was declared lost by node {loss.declared_by} "
            f"({loss.reason}); stopped its rank(s)"
        )
    else:
        seen = "" if loss.declared_by == node_rank else f", seen by node {loss.declared_by}"
        what = f"{loss.lost.describe()} lost ({loss.reason}{seen}); stopped this node's rank(s)"
    return f"{what}; last complete checkpoint: {checkpoint}"


@dataclass
class Stall:
    """What the progress watchdog found: how long nothing moved, and the rank that holds the others."""

    silent_s: float
    rank: int
    phase: str
    step: int
    frozen: bool = False  # the rank's beat stopped too (else it is alive but does not move)

    def line(self, checkpoint: str) -> str:
        return (
            f"no progress for {self.silent_s:.0f} s: rank {self.rank} was in {self.phase} at step {self.step} "
            f"(last checkpoint: {checkpoint})"
        )


class Watchdog:
    """The launcher's progress watchdog (module doc): reads the ranks' progress files
    (``normopt.progress``) and returns a :class:`Stall` when no rank has entered a new phase
    or step for longer than the limit."""

    def __init__(self, folder: Path, ranks: list[int], timeout: float, patience_if_alive: float = 0.0) -> None:
        """``patience_if_alive``: more seconds to wait when every rank still beats (in a
        multi-node job they may be waiting on a frozen rank of another node, whose own
        launcher is the one to name it)."""
        from normopt.parallel.timeouts import collective_timeout

        self.folder, self.ranks, self.timeout = Path(folder), ranks, timeout
        self.patience_if_alive = patience_if_alive
        self.start_up_s = collective_timeout("start-up").total_seconds()
        self.checkpoint_s = collective_timeout("checkpoint").total_seconds()
        self.seen: dict[int, tuple] = {}
        self.last_change = time.monotonic()
        self.last_step_mark: float | None = None
        self.longest_step_s = 0.0
        self._next_read = 0.0

    def limit(self, phases: set[str]) -> float:
        limit = max(self.timeout, WATCHDOG_STEP_FACTOR * self.longest_step_s)
        if "start-up" in phases:
            limit = max(limit, self.start_up_s)
        if phases & {"checkpoint save", "checkpoint wait"}:
            limit = max(limit, self.checkpoint_s)
        return limit

    def problem(self) -> Stall | None:
        now = time.monotonic()
        if now < self._next_read:
            return None
        self._next_read = now + WATCHDOG_POLL_S
        records = {rank: read_progress(progress_file(self.folder, rank)) for rank in self.ranks}
        for rank, record in records.items():
            key = (record.get("phase"), record.get("step")) if record else None
            if key is not None and self.seen.get(rank) != key:
                self.seen[rank] = key
                self.last_change = now
                if rank == self.ranks[0] and key[0] == "step":
                    if self.last_step_mark is not None:
                        self.longest_step_s = max(self.longest_step_s, now - self.last_step_mark)
                    self.last_step_mark = now
        phases = {record.get("phase") for record in records.values() if record} | (
            {"start-up"} if any(record is None for record in records.values()) else set()
        )
        silent = now - self.last_change
        limit = self.limit(phases)
        if silent <= limit:
            return None
        stall = self._stuck(records, silent)
        if not stall.frozen and silent <= limit + self.patience_if_alive:
            return None
        return stall

    def _stuck(self, records: dict[int, dict | None], silent: float) -> Stall:
        """The rank that holds the others: one whose beat stopped (or that never wrote),
        else the one furthest behind (lowest step, earliest phase, longest in it)."""
        wall = time.time()

        def behind(rank: int):
            record = records[rank] or {}
            phase = record.get("phase", "start-up")
            order = PHASES.index(phase) if phase in PHASES else 0
            return (record.get("step", 0), order, record.get("since", 0.0))

        running = [rank for rank in self.ranks if not (records[rank] or {}).get("ended")] or self.ranks
        frozen = [
            rank
            for rank in running
            if records[rank] is None or wall - float(records[rank].get("beat", 0.0)) > 3 * BEAT_S + 1
        ]
        rank = min(frozen or running, key=behind)
        record = records[rank] or {}
        return Stall(silent, rank, str(record.get("phase", "start-up")), int(record.get("step", 0)), bool(frozen))
