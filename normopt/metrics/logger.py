"""Run-directory logging: ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only rank 0 writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from normopt.errors import UserError


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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a resumed run re-logs them)."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                continue  # a torn last line: the writer was killed mid-line
            raise UserError(f"{path}: line {index + 1} is not JSON") from None
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        self._file = None
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._file = open(self.path, "a", buffering=1)
            self._writer = SummaryWriter(log_dir=str(self.tb_dir))

    def log(self, record: dict, prefix: str = "train") -> None:
        """Append ``record`` (must hold ``step``) and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        self._file.write(json.dumps(jsonable(record)) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, step)

    @property
    def tensorboard(self):
        """The run's SummaryWriter (None on ranks other than 0)."""
        return self._writer

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._writer.add_text(tag, text.replace("\n", "  \n"))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()
