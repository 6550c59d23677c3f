"""Run-directory logging: the metrics log (one JSON object per line) and TensorBoard.

Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping

from normopt.metrics.jsonl import append_record, close_log, log_writes
from normopt.run_dir import RunDir


def jsonable(value):
    """``value`` with every non-finite float (also inside dicts and lists) as its string:
    JSON has no NaN/Inf, and "nan"/"inf" keep them visible (readers parse them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


_QUIET = False


def quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes events from a thread of its own; a write the disk refuses there is
    raised again in the main thread at the next add_* or close (and becomes one line there),
    so the thread's own traceback is not printed."""
    global _QUIET
    if _QUIET:
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    threading.excepthook, _QUIET = hook, True


class MetricsLogger:
    def __init__(self, run: RunDir, enabled: bool):
        self.enabled = enabled
        self._file = None
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._file = open(run.metrics, "a", buffering=1)
            quiet_tensorboard_thread_errors()
            self._writer = SummaryWriter(log_dir=str(run.tensorboard))

    def log(self, record: dict, prefix: str = "train") -> None:
        """Append ``record`` (must hold ``step``) and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        append_record(self._file, json.dumps(jsonable(record)), record.get("step"))
        step = record["step"]
        with log_writes("the TensorBoard events file", step):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    @property
    def tensorboard(self):
        """The run's SummaryWriter (None on ranks other than 0)."""
        return self._writer

    def close(self) -> None:
        """Close the log and the TensorBoard writer (both, even if one is refused); a write the
        disk refuses now is one line (``write_failure``), like one refused during the run."""
        if self.enabled:
            try:
                close_log(self._file)
            finally:
                with log_writes("the TensorBoard events file"):
                    self._writer.close()
