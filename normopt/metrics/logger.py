"""Run-directory logging: the metrics log (one JSON object per line) and TensorBoard.

Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from normopt.metrics.jsonl import append_record
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


class MetricsLogger:
    def __init__(self, run: RunDir, enabled: bool):
        self.enabled = enabled
        self._file = None
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._file = open(run.metrics, "a", buffering=1)
            self._writer = SummaryWriter(log_dir=str(run.tensorboard))

    def log(self, record: dict, prefix: str = "train") -> None:
        """Append ``record`` (must hold ``step``) and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        append_record(self._file, json.dumps(jsonable(record)), record.get("step"))
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    @property
    def tensorboard(self):
        """The run's SummaryWriter (None on ranks other than 0)."""
        return self._writer

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()
