"""Where each rank is (its phase and step), for ``normopt launch``'s progress watchdog.

A rank started by the launcher finds a folder in :data:`PROGRESS_DIR_ENV` and keeps one small
JSON file there, ``rank_R.json``: the phase it is in (``start-up``, ``step``, ``eval``,
``checkpoint save``, ``checkpoint wait``), the step, when it entered that phase, and a beat
that a background thread renews every :data:`BEAT_S` seconds. The launcher
(:class:`normopt.launch.Watchdog`) ends the run when no rank has entered a new phase or step
for ``--watchdog-timeout`` seconds, and names the rank that holds the others: one whose beat
stopped (a frozen or stopped process), else the one furthest behind. Without the variable
(plain ``python``, torchrun) nothing is written. The file lives in the launcher's temporary
folder, never on the run's disk, so a full disk does not silence it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

PROGRESS_DIR_ENV = "NORMOPT_PROGRESS_DIR"
BEAT_S = 1.0
# the order of a step's phases, to tell which of two ranks at the same step is behind
PHASES = ("start-up", "step", "eval", "checkpoint wait", "checkpoint save")


def progress_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank_{rank}.json"


class Progress:
    """This rank's phase and step, kept in its file with a beat (a no-op without the folder)."""

    def __init__(self) -> None:
        folder = os.environ.get(PROGRESS_DIR_ENV)
        self.path = progress_file(Path(folder), int(os.environ.get("RANK", "0"))) if folder else None
        self.phase, self.step, self.since = "start-up", 0, time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended = False

    def mark(self, phase: str, step: int | None = None) -> None:
        """This rank enters ``phase`` (at ``step``; the current one when None)."""
        if self.path is None:
            return
        with self._lock:
            self.phase, self.since = phase, time.time()
            if step is not None:
                self.step = step
        self._write()
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="normopt-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            self._write()

    def _write(self) -> None:
        with self._lock:
            record = {
                "phase": self.phase,
                "step": self.step,
                "since": self.since,
                "beat": time.time(),
                "pid": os.getpid(),
                "ended": self._ended,
            }
            tmp = self.path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.path)
            except OSError:
                pass  # the launcher's folder is gone (it is ending the run): nothing to report to

    def close(self) -> None:
        """Stop the beat and say this rank has ended (so it is never the one named as stuck)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * BEAT_S)
            self._ended = True
            self._write()


_progress: Progress | None = None


def progress() -> Progress:
    """This process's progress record (created on first use)."""
    global _progress
    if _progress is None:
        _progress = Progress()
    return _progress


def mark(phase: str, step: int | None = None) -> None:
    progress().mark(phase, step)


def read_progress(path: Path) -> dict | None:
    """A rank's record as the launcher reads it; None while there is none (or it is torn)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
