"""A real one-node SLURM cluster on localhost for the test suite: munged, slurmctld and slurmd.

Debian's ``slurm-wlm`` and ``munge`` packages (``scripts/install_slurm.sh`` installs them as
root) run a cluster of one node whose every file (config, state, spool, logs, munge key and
socket) lives in one folder, on free ports, so it touches no system-wide SLURM or munge::

    python -m tests.slurm_cluster start DIR     # start, wait until the node is idle, print SLURM_CONF
    python -m tests.slurm_cluster stop DIR

The node declares ``gpu`` GRES with ``File=`` entries (``/dev/null``, ``/dev/zero``): without
``File=`` slurmd reports 0 GPUs and the node goes INVAL, and with them ``--gpus-per-node`` is
accepted while the job's ranks run on the CPU with gloo. ``ProctrackType=proctrack/linuxproc``
and ``TaskPlugin=task/none`` keep cgroups out of it. Jobs run as the submitting user (root
here) with the submitter's environment (sbatch's default ``--export=ALL``), which is how
``NORMOPT_PYTHON`` reaches them.

:func:`unavailable` says in one line why a cluster cannot be started here (not root, a
package missing); the tests skip with that line, and CI (root, packages installed) runs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
GPUS = 2  # GRES gpu entries the node declares
START_TIMEOUT_S = 60.0


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if sys.platform != "linux":
        return "a local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their user)"
    missing = [p for p in (*DAEMONS, "mungekey", *CLIENTS) if _which(p) is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): run scripts/install_slurm.sh as root"
    return None


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(folder: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
    return "\n".join(
        [
            "ClusterName=normopt-test",
            f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            "MpiDefault=none",
            "GresTypes=gpu",
            "MinJobAge=600",  # finished jobs stay visible to scontrol/squeue for 10 minutes
            "KillWait=30",  # SLURM's default: the time a job has between SIGTERM and SIGKILL
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{GPUS} State=UNKNOWN",
            f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]
    )


@dataclass
class Cluster:
    """A started cluster: its folder and the environment its clients need (``SLURM_CONF``)."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        proc = subprocess.run(list(command), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()}\n{self.logs()}")
        return proc

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()

    def logs(self, lines: int = 40) -> str:
        """The last lines of each daemon's log, for a failure message."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.folder / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def wait_idle(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the node is idle (no job on it); RuntimeError with the logs otherwise."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node not idle after {timeout:.0f} s (state {state!r})\n{self.logs()}")

    def stop(self) -> None:
        stop(self.folder)


def start(folder: Path) -> Cluster:
    """Write the configs, start munged, slurmctld and slurmd, wait until the node is idle."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    folder = Path(folder).resolve()
    stop(folder)  # a cluster left over in this folder
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    node = socket.gethostname().split(".")[0]
    munge_socket = folder / "munge" / "munge.socket"
    key = folder / "munge" / "munge.key"
    if not key.exists():
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, node, os.cpu_count() or 1, _free_port(), _free_port(), munge_socket))
    (folder / "gres.conf").write_text(
        "".join(f"NodeName={node} Name=gpu File={device}\n" for device in ("/dev/null", "/dev/zero")[:GPUS])
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(folder)
    commands = [
        [
            _which("munged"),
            "--force",
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munge' / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munge' / 'munged.seed'}",
        ],
        [_which("slurmctld"), "-f", str(conf), "-i"],  # -i: ignore state a crashed cluster left
        [_which("slurmd"), "-f", str(conf), "-N", node],
    ]
    for command in commands:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            stop(folder)
            raise RuntimeError(
                f"{Path(command[0]).name} failed to start ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}\n{cluster.logs()}"
            )
        if command[0].endswith("munged"):
            _wait_for(munge_socket.exists, 10, f"munged socket {munge_socket}", cluster)
    try:
        cluster.wait_idle()
    except RuntimeError:
        stop(folder)
        raise
    return cluster


def _wait_for(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not appear within {timeout:.0f} s\n{cluster.logs()}")
        time.sleep(0.1)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop(folder: Path) -> None:
    """Stop the daemons of the cluster in ``folder`` (slurmd, slurmctld, then munged), waiting
    for each to exit; the jobs slurmd started die with their step daemons."""
    folder = Path(folder)
    for pidfile in (folder / "slurmd.pid", folder / "slurmctld.pid", folder / "munge" / "munged.pid"):
        pid = _pid(pidfile)
        if pid is None:
            continue
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if not _alive(pid):
                break
        pidfile.unlink(missing_ok=True)
    # job steps outlive slurmd when it is stopped: end what still runs from this cluster
    subprocess.run(["pkill", "-KILL", "-f", f"slurmstepd.*{folder}"], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster {start,stop} DIR", file=sys.stderr)
        return 2
    if argv[0] == "stop":
        stop(Path(argv[1]))
        return 0
    try:
        cluster = start(Path(argv[1]))
    except RuntimeError as exc:
        print(f"slurm_cluster: {exc}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
