"""The run directory: where every file of one training run lives, named in one place.

One run = one folder (``run.dir``)::

    config.yaml          the resolved config the run was started (or last continued) with
    metrics.jsonl        training and evaluation lines, one JSON object a line
    diagnostics.jsonl    diagnostics records (norm stats, spectral norms, NS spectrum, ...)
    tensorboard/         TensorBoard event files
    checkpoints/         step_XXXXXXXX/ per complete checkpoint (``.tmp`` while being written):
                         DCP shards, trainer_state.json, non_tensor_state.json,
                         rng/rank_XXXXX.safetensors and a copy of config.yaml
    cell.json            written by a factorial runner: the cell's name, coordinates, exit status
    job.json             written by launch/slurm.sbatch: the SLURM job running the run, its state
                         and exit status (``normopt.job_record``)
    train.log            a factorial cell's console output
    export/              ``normopt export``: step_XXXXXXXX.safetensors with .config.yaml and
                         .tokenizer.json beside it
    .lock                host and pid of the process writing the run (see ``run_lock``)

The trainer, the checkpoint writer, the exporter, the factorial runner and the readers of
finished runs (report, spectrum fit) all go through :class:`RunDir` and the names here (the
kinds of diagnostics records too), so the layout is spelled out here only. Nothing here
imports torch: the readers stay light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from normopt.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
CELL_FILE = "cell.json"
JOB_FILE = "job.json"
TRAIN_LOG = "train.log"
EXPORT_DIR = "export"
LOCK_FILE = ".lock"
# An experiment root (a factorial's ``root``, one run directory per cell below it) holds the
# spec's axes and report settings (see ``normopt.report.axes``), the grid's plan, and, for a
# grid submitted to SLURM, a folder with the job scripts, the submitted job ids and the job
# logs (``normopt.factorial.slurm``).
EXPERIMENT_FILE = "experiment.json"
PLAN_FILE = "plan.json"  # every run of the grid as expanded (normopt.factorial.plan)
SLURM_DIR = "slurm"
# Any of these makes a folder a run directory (a cell written by a factorial runner may hold
# only its cell.json before its run starts).
MARKER_FILES = (CONFIG_FILE, CELL_FILE, METRICS_FILE, JOB_FILE)

# Inside checkpoints/: one folder per step; it is complete once its trainer state exists
# (the writer fills ``step_XXXXXXXX.tmp`` and renames it only after every rank has finished).
STEP_DIR = re.compile(r"^step_(\d{8})$")
PARTIAL_SUFFIX = ".tmp"
TRAINER_STATE = "trainer_state.json"
NON_TENSOR_STATE = "non_tensor_state.json"  # optimizer hyperparameters and other non-tensor entries
RNG_DIR = "rng"  # one safetensors file of RNG states per rank


def rng_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


class RecordKind:
    """The ``kind`` of each diagnostics.jsonl record (``{"step", "kind", ...}`` a line):
    writers (diagnostics/) and readers (report, spectrum fit) use these names."""

    RUN = "run"  # once, at the start of a fresh run: n_params, n_layers, norm, optim, steps
    NORM = "norm"  # norm-layer statistics on the probe batch
    SPECTRAL_NORM = "spectral_norm"
    NS_SPECTRUM = "ns_spectrum"
    ISOTROPY = "isotropy"
    TAIL_TOKENS = "tail_tokens"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory. Only names; nothing is created or read on construction."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def diagnostics(self) -> Path:
        return self.path / DIAGNOSTICS_FILE

    def export_files(self, weights: Path) -> dict[str, Path]:
        """The files of one export, named after its weights file ``step_N.safetensors``."""
        return {"weights": weights, "config": weights.with_suffix(".config.yaml"),
                "tokenizer": weights.with_suffix(".tokenizer.json")}

    def hf_export_folder(self, checkpoint: Path) -> Path:
        """The default folder of a checkpoint's Hugging Face export: ``export/step_N_hf``."""
        return self.export / f"{checkpoint.name}_hf"

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def cell_json(self) -> Path:
        return self.path / CELL_FILE

    @property
    def job_json(self) -> Path:
        return self.path / JOB_FILE

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def export(self) -> Path:
        return self.path / EXPORT_DIR

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def has_marker(self) -> bool:
        """Whether the folder holds any of ``MARKER_FILES``."""
        return any((self.path / name).is_file() for name in MARKER_FILES)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int) -> Path:
        """The folder of ``step``'s checkpoint (complete or not)."""
        return self.checkpoints / f"step_{step:08d}"

    def partial_checkpoint(self, step: int) -> Path:
        """The folder ``step``'s checkpoint is written into before it is complete."""
        folder = self.checkpoint(step)
        return folder.with_name(folder.name + PARTIAL_SUFFIX)

    def partial_checkpoints(self) -> list[Path]:
        """Folders of checkpoints being written, or left over by interrupted writes."""
        return sorted(self.checkpoints.glob(f"step_*{PARTIAL_SUFFIX}"))

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for child in self.checkpoints.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / TRAINER_STATE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def find_checkpoint(self, step: int | None, option: str) -> Path:
        """The complete checkpoint of ``step``, or the latest one when ``step`` is None. A
        UserError when there is none; ``option`` names the setting that asked for ``step``."""
        steps = self.complete_steps()
        if step is None:
            if not steps:
                raise UserError(f"{self.path}: no complete checkpoint under {self.checkpoints}")
            step = steps[-1]
        if step not in steps:
            raise UserError(f"{option}: no complete checkpoint for step {step} in {self.checkpoints} "
                            f"(have: {', '.join(map(str, steps)) or 'none'})")
        return self.checkpoint(step)

    def config_of(self, checkpoint: Path) -> Path | None:
        """The config a checkpoint was trained with: its own copy, else the run's config.yaml
        (checkpoints written without a copy); None when neither exists."""
        for path in (checkpoint / CONFIG_FILE, self.config):
            if path.exists():
                return path
        return None
