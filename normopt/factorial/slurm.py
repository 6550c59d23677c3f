"""``normopt factorial --slurm``: one SLURM array job for a spec's cells, one task per cell.

Each task runs ``launch/slurm.sbatch`` for its cell on one node with the spec's
``slurm.gpus_per_node`` GPUs (or ``--gpus-per-node``; 8 if neither says); the spec's
``slurm.options`` become extra ``#SBATCH`` lines and the command line's ``--sbatch-option``s go
to ``sbatch`` itself (which lets them override the script's).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from normopt.config import REPO_ROOT
from normopt.errors import UserError
from normopt.factorial.cells import CellSpec, write_cell_json
from normopt.report.axes import write_experiment_file
from normopt.run_dir import CELL_FILE, RunDir

SLURM_KEYS = {"gpus_per_node", "options"}
DEFAULT_GPUS_PER_NODE = 8


def check_slurm_section(spec: dict[str, Any], path: Path) -> None:
    section = spec.get("slurm")
    if section is None:
        return
    if not isinstance(section, dict) or set(section) - SLURM_KEYS:
        raise UserError(f"{path}: slurm must be a mapping with keys {', '.join(sorted(SLURM_KEYS))}")
    gpus = section.get("gpus_per_node", DEFAULT_GPUS_PER_NODE)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UserError(f"{path}: slurm.gpus_per_node must be an integer >= 1, got {gpus!r}")
    options = section.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) and o.startswith("-") for o in options):
        raise UserError(f"{path}: slurm.options must be a list of sbatch options like --time=04:00:00")


def spec_gpus_per_node(spec: dict[str, Any]) -> int:
    """GPUs per node a SLURM array task asks for: the spec's slurm.gpus_per_node, else 8."""
    section = spec.get("slurm")
    return section.get("gpus_per_node", DEFAULT_GPUS_PER_NODE) if isinstance(section, dict) else DEFAULT_GPUS_PER_NODE


def slurm_array_script(base: Path, root: Path, cells: list[CellSpec], gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
                       options: list[str] | tuple[str, ...] = ()) -> str:
    """An sbatch array script: task i runs launch/slurm.sbatch for cell i on one node of
    ``gpus_per_node`` GPUs (exported as NORMOPT_GPUS_PER_NODE, so the launcher starts that
    many ranks whatever the node has); ``options`` become extra #SBATCH lines."""
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --array=0-{len(cells) - 1}",
        "#SBATCH --job-name=normopt-factorial",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={root}/slurm-%A_%a.out",
        *(f"#SBATCH {option}" for option in options),
        "# one cell per array task; sbatch options given on the command line override these",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        f"export NORMOPT_GPUS_PER_NODE={gpus_per_node}",
        "CELLS=(",
        *(f"  {shlex.quote(' '.join(shlex.quote(o) for o in c.overrides))}  # {c.name}" for c in cells),
        ")",
        'eval "ARGS=(${CELLS[$SLURM_ARRAY_TASK_ID]})"',
        f'exec bash launch/slurm.sbatch --config {shlex.quote(str(base))} "${{ARGS[@]}}"',
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(base: Path, root: Path, cells: list[CellSpec], dry_run: bool, gpus_per_node: int,
                 spec_options: list[str], extra_options: list[str], spec_axes: dict[str, list] | None = None,
                 spec_report: dict[str, Any] | None = None) -> int:
    """Write the array script (the spec's options in it) and submit it with ``sbatch``, the
    command line's options first (sbatch lets them override the script's)."""
    script = slurm_array_script(base, root, cells, gpus_per_node, spec_options)
    path = root / "factorial.sbatch"
    command = ["sbatch", *extra_options, str(path)]
    if dry_run:
        print(script)
        print(f"would write {path} and {CELL_FILE} for {len(cells)} cells, then run: {shlex.join(command)}")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if spec_axes is not None:
        write_experiment_file(root, spec_axes, spec_report)
    for cell in cells:
        write_cell_json(RunDir(root / cell.name), cell)
    try:
        return subprocess.run(command, check=False).returncode
    except FileNotFoundError:
        raise UserError("sbatch not found: is this a SLURM login node?") from None
