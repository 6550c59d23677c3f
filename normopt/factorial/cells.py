"""A factorial's cells as the runner and the SLURM array see them: ``CellSpec`` (name,
settings, coordinates, seed, arm, overrides, group) and the ``cell.json`` each cell's folder gets
(``write_cell_json``), which ``normopt report`` reads next to the run's own ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from normopt.run_dir import RunDir


@dataclass
class CellSpec:
    name: str
    settings: dict[str, Any]  # dotted key -> value, applied over the base config
    coords: dict[str, Any]
    seed: int
    arm: str | None = None
    overrides: list[str] = field(default_factory=list)
    group: str = ""  # the name without the seed: the cells that differ only in seed
    record: dict[str, Any] = field(default_factory=dict)  # more for cell.json (a tuned value)


def format_value(value: Any) -> str:
    """A spec value as an override's text: booleans lower case, None empty."""
    return "" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))


def write_cell_json(run: RunDir, cell: CellSpec, **extra: Any) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    record = {"name": cell.name, "coords": cell.coords, "seed": cell.seed, "arm": cell.arm, **cell.record, **extra}
    run.cell_json.write_text(json.dumps(record, indent=2) + "\n")
