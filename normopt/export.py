"""Consolidate a sharded checkpoint's model weights into one safetensors file.

Runs in a single process with no process group: DCP reads every rank's shards of the
``model.*`` entries only (optimizer state is never loaded), whatever the world size that
wrote them, through the safe reader and tensor-only planner (nothing is unpickled).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from normopt.checkpoint.safe_dcp import SafeReader, TensorOnlyPlanner, read_metadata
from normopt.checkpoint.verify import read_trainer_state, verify_checkpoint
from normopt.errors import UserError
from normopt.output_paths import check_output_file, write_failed
from normopt.plugins import check_run_plugins
from normopt.run_dir import RunDir

MODEL_PREFIX = "model."


def load_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a DCP checkpoint, keyed by parameter/buffer name,
    once every piece of the checkpoint verifies (a damaged one is refused, never exported)."""
    verify_checkpoint(checkpoint)
    metadata = read_metadata(checkpoint)  # UserError for crafted or unreadable metadata
    model = {
        key[len(MODEL_PREFIX) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not model:
        raise UserError(f"checkpoint {checkpoint} holds no model weights")
    state = {"model": model}
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": exactly the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(
                state,
                checkpoint_id=str(checkpoint),
                no_dist=True,
                storage_reader=SafeReader(str(checkpoint)),
                planner=TensorOnlyPlanner(str(checkpoint)),
            )
    except BaseException as exc:  # DCP wraps read errors in a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}") from None
    return state["model"]


EXPORT_FILE_MODE = 0o644
EXPORT_DIR_MODE = 0o755


def run_tokenizer(run: RunDir, config: Path | None) -> Path:
    """The tokenizer.json the run trained with (see ``prepared_tokenizer``)."""
    from normopt.config import read_saved_config
    from normopt.data.token_cache import prepared_tokenizer

    if config is None:
        raise UserError(f"{run.path}: no config.yaml, so the run's tokenizer is unknown")
    cfg = read_saved_config(config)
    path = prepared_tokenizer(cfg.data)
    if path is None:
        where = cfg.data.tokenizer or "the prepared corpus under data.cache_dir"
        raise UserError(
            f"the run's tokenizer is gone ({where}); prepare the corpus again with the run's "
            f"config (e.g. a 0-step run) or set data.tokenizer"
        )
    return path


def export_safetensors(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write the weights of ``step``'s checkpoint (default: the latest complete one) as one
    safetensors file, with the config it was trained with and its tokenizer beside it
    (``RunDir.export_files``), so the export needs nothing else; return the weights file's path.
    Files are 0644 and a created folder 0755 whatever the checkpoint's own modes (a DCP
    checkpoint may be private to its writer; an export is meant to be shared)."""
    from safetensors.torch import save_file

    run = RunDir(run_dir)
    check_run_plugins(run.path, "export")
    checkpoint = run.find_checkpoint(step, "--step")
    config = run.config_of(checkpoint)
    tokenizer = run_tokenizer(run, config)  # before writing anything: an export is complete or absent
    weights = load_model_weights(checkpoint)
    paths = run.export_files(out or run.export / f"{checkpoint.name}.safetensors")
    for path in paths.values():  # all three, before anything is written
        check_output_file(path, "--out", run)
    folder = paths["weights"].parent
    trainer_state = read_trainer_state(checkpoint)
    # a tied head is the same tensor under two names; safetensors wants distinct storage
    tensors = {name: t.contiguous().clone() for name, t in weights.items()}
    created = [path for path in paths.values() if not os.path.lexists(path)]
    try:
        if not folder.exists():
            folder.mkdir(parents=True)
            folder.chmod(EXPORT_DIR_MODE)
        save_file(tensors, str(paths["weights"]), metadata={"format": "pt", "step": str(trainer_state["step"])})
        shutil.copyfile(config, paths["config"])
        shutil.copyfile(tokenizer, paths["tokenizer"])
        for path in paths.values():
            path.chmod(EXPORT_FILE_MODE)
    except Exception as exc:  # the file system refused a write: one line, and no half export left
        failure = write_failed("--out", paths["weights"], exc)
        if failure is None:
            raise
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise failure from None
    return paths["weights"]
