"""One writer per run directory: an exclusive lock held for the life of a run.

Two processes training into the same ``run.dir`` would interleave their metrics and delete
each other's checkpoints. Rank 0 takes an advisory ``flock`` on ``<run.dir>/.lock`` before
anything in the run directory is read or written and keeps it until the run ends. The
kernel releases it when the holder exits in any way (even SIGKILL), so a lock is never
stale; the file keeps the holder's host and pid, which a refused second writer names.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from normopt.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise a UserError naming the process that holds it."""
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"run.dir {folder} exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"run.dir {self.path.parent}: cannot create {LOCK_FILE} "
                            f"({exc.strerror or type(exc).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise UserError(f"run.dir {self.path.parent} is in use by another run ({holder}); "
                            f"wait for it to end or choose another run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on {info['host']}"
        except (ValueError, KeyError, OSError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
