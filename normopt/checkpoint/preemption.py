"""Stop at a step boundary when the scheduler asks (SIGTERM, or SLURM's warning SIGUSR1) or
the user presses Ctrl-C (SIGINT; a second Ctrl-C stops at once, without a checkpoint).

The handler only records the signal; the training loop agrees on it across ranks (one
all-reduce it already does every step), saves a checkpoint and exits with
``normopt.errors.PREEMPTED_EXIT_CODE`` (75) so that a wrapper (launch/slurm.sbatch) can requeue the job.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers the first stop signal received; restores the old handlers on close."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
