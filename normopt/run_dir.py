"""The run directory: where every file of one training run lives, named in one place.

One run = one folder (``run.dir``)::

    config.yaml          the resolved config the run was started (or last continued) with
    plugins.json         the plugins loaded when it was: name, source, SHA-256 (normopt.plugins)
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

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from normopt.errors import UserError

CONFIG_FILE = "config.yaml"
PLUGINS_FILE = "plugins.json"  # the plugins the run was started with (normopt.plugins)
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
# spec's axes and report settings (see ``normopt.report.cells.axes``), the grid's plan, and, for a
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


PARTIAL = "partial"  # checkpoint_status of a step folder without its completion marker


def entry_problem(path: Path, want: str) -> str | None:
    """None when ``path`` is a ``want`` ("file" or "folder") that reads: a regular file that
    opens, or a folder that lists; links are followed, but not into a loop or back into a
    folder that holds them. Otherwise what it is instead, in a few words."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if not os.path.lexists(path):
            return "missing"
        if os.path.islink(path):
            return "a dangling symlink"
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    if want == "folder":
        if not stat.S_ISDIR(info.st_mode):
            return "a file, not a folder" if stat.S_ISREG(info.st_mode) else "not a regular folder"
        if os.path.islink(path):
            target, home = os.path.realpath(path), os.path.realpath(os.path.dirname(os.path.abspath(path)))
            if home == target or home.startswith(target.rstrip(os.sep) + os.sep):
                return "a symlink to a folder that holds it (a loop)"
        try:
            os.listdir(path)
        except OSError as exc:
            return f"unreadable ({exc.strerror or type(exc).__name__})"
        return None
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    return None


class RecordKind:
    """The ``kind`` of each diagnostics.jsonl record (``{"step", "kind", ...}`` a line):
    writers (diagnostics/) and readers (report, spectrum fit) use these names."""

    RUN = "run"  # once, at the start of a fresh run: n_params, n_layers, norm, optim, steps
    NORM = "norm"  # norm-layer statistics on the probe batch
    SPECTRAL_NORM = "spectral_norm"
    NS_SPECTRUM = "ns_spectrum"
    ISOTROPY = "isotropy"
    TAIL_TOKENS = "tail_tokens"


def damaged_checkpoint(problem: str) -> UserError:
    """The one-line refusal of a damaged checkpoint; ``problem`` names the piece."""
    return UserError(
        f"cannot load checkpoint: {problem} (a damaged checkpoint is used whole or not at all; "
        f"repair it, or move its step folder away to use the one before)"
    )


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
        return {
            "weights": weights,
            "config": weights.with_suffix(".config.yaml"),
            "tokenizer": weights.with_suffix(".tokenizer.json"),
        }

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

    def step_folders(self) -> list[int]:
        """Steps with an entry named ``step_XXXXXXXX`` under checkpoints/ (whatever it is:
        complete, partial or damaged), ascending."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(self.checkpoints)) if m)

    def checkpoint_status(self, step: int) -> str | None:
        """None when ``step``'s folder is a complete checkpoint (a readable folder holding a
        readable trainer_state.json, its completion marker); PARTIAL when it is a readable
        folder without the marker (the documented interrupted write); otherwise the damage,
        in one line naming the piece. Only the folder and the marker are looked at here:
        ``checkpoint.verify`` checks every piece of the one a run resumes from."""
        folder = self.checkpoint(step)
        problem = entry_problem(folder, "folder")
        if problem:
            return f"{folder} is {problem}"
        marker = folder / TRAINER_STATE
        if not os.path.lexists(marker):
            return PARTIAL
        problem = entry_problem(marker, "file")
        return f"{marker} is {problem}" if problem else None

    def skipped_partials(self, checkpoint: Path | None) -> list[str]:
        """Names of the partial checkpoints (``.tmp`` folders and step folders without their
        trainer state) newer than ``checkpoint`` (all of them when it is None)."""
        newest = int(STEP_DIR.match(checkpoint.name).group(1)) if checkpoint is not None else -1
        names = [
            self.checkpoint(s).name for s in self.step_folders() if s > newest and self.checkpoint_status(s) == PARTIAL
        ]
        for folder in self.partial_checkpoints():
            match = STEP_DIR.match(folder.name.removesuffix(PARTIAL_SUFFIX))
            if match and int(match.group(1)) > newest:
                names.append(folder.name)
        return sorted(names)

    def find_checkpoint(self, step: int | None, option: str) -> Path:
        """The complete checkpoint of ``step``, or the latest one when ``step`` is None. A
        UserError when there is none, or when the one asked for (or the newest that is not
        partial) is damaged: an older checkpoint is used only in place of partial ones.
        ``option`` names the setting that asked for ``step``."""
        if step is None:
            for candidate in reversed(self.step_folders()):
                status = self.checkpoint_status(candidate)
                if status == PARTIAL:
                    continue
                if status is not None:
                    raise damaged_checkpoint(status)
                return self.checkpoint(candidate)
            raise UserError(f"{self.path}: no complete checkpoint under {self.checkpoints}")
        status = self.checkpoint_status(step) if step in self.step_folders() else PARTIAL
        if status == PARTIAL:
            steps = self.complete_steps()
            raise UserError(
                f"{option}: no complete checkpoint for step {step} in {self.checkpoints} "
                f"(have: {', '.join(map(str, steps)) or 'none'})"
            )
        if status is not None:
            raise damaged_checkpoint(status)
        return self.checkpoint(step)

    def config_of(self, checkpoint: Path) -> Path | None:
        """The config a checkpoint was trained with: its own copy, else the run's config.yaml
        (checkpoints written without a copy); None when neither exists."""
        for path in (checkpoint / CONFIG_FILE, self.config):
            if path.exists():
                return path
        return None
