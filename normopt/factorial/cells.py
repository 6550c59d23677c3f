"""A factorial's cells as the runner and the SLURM array see them: ``CellSpec`` (name,
settings, coordinates, seed, arm, overrides) and the ``cell.json`` each cell's folder gets
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


def write_cell_json(run: RunDir, cell: CellSpec, **extra: Any) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    record = {"name": cell.name, "coords": cell.coords, "seed": cell.seed, "arm": cell.arm, **extra}
    run.cell_json.write_text(json.dumps(record, indent=2) + "\n")
