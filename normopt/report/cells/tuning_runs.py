"""Where a tuned grid keeps its tuning runs, and reading the tune block it ran
(:mod:`normopt.report.stats.tuning`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.report.cells.axes import read_grid_record

TUNING_DIR = "tuning"  # ROOT/tuning/: one run directory per (cell, value, tuning seed)


TUNING_FILE = "tuning.json"  # ROOT/tuning/tuning.json: the spec's tune block, as run


def read_tuning_file(root: Path) -> dict[str, Any] | None:
    path = root / TUNING_DIR / TUNING_FILE
    record = read_grid_record(path)
    if record is None:
        return None
    if not isinstance(record, dict) or not {"key", "values", "by", "seeds"} <= set(record):
        raise UserError(f"{path}: expected an object with key, values, by, seeds")
    return record
