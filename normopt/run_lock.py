"""One writer per run directory: an exclusive lock held for the life of a run.

Two processes training into the same ``run.dir`` would interleave their metrics and delete
each other's checkpoints. Rank 0 takes an advisory ``flock`` on the run directory itself
before anything in it is read or written and keeps it until the run ends. Locking the
directory creates no file, so a run refused for another reason leaves an existing run
directory untouched; the kernel releases the lock when the holder exits in any way (even
SIGKILL), so it is never stale. Once the holder starts writing, it records its host and
pid in the run directory's ``.lock`` file, which a refused second writer names.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket

from normopt.errors import UserError
from normopt.run_dir import RunDir


class RunLock:
    def __init__(self, run: RunDir):
        self.folder, self.holder_file = run.path, run.lock
        self._fd: int | None = None
        self.created = False  # whether acquire() made the folder (a refused start removes it again)

    def acquire(self) -> None:
        """Take the lock or raise a UserError naming the process that holds it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"run.dir {self.folder} exists and is not a folder")
        try:
            self.created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise UserError(f"run.dir {self.folder}: {exc.strerror or type(exc).__name__}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"run.dir {self.folder} is in use by another run ({self._holder()}); "
                f"wait for it to end or choose another run.dir"
            ) from None
        self._fd = fd

    def record_holder(self) -> None:
        """Write this process's host and pid beside the run (call once writing starts)."""
        info = {"host": socket.gethostname(), "pid": os.getpid()}
        self.holder_file.write_text(json.dumps(info) + "\n")

    def _holder(self) -> str:
        try:
            info = json.loads(self.holder_file.read_text())
            return f"pid {info['pid']} on {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its process has not started writing yet"

    def release(self, remove_if_created_and_empty: bool = False) -> None:
        """Unlock; a start that was refused before writing anything also removes the folder
        it created, so that nothing is left behind."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if remove_if_created_and_empty and self.created:
                try:
                    self.folder.rmdir()  # only an empty folder goes
                except OSError:
                    pass
            self._fd = None
