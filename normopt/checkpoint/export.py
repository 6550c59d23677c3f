"""Consolidate a sharded checkpoint's model weights into one safetensors file.

Runs in a single process with no process group: DCP reads every rank's shards of the
``model.*`` entries only (optimizer state is never loaded), whatever the world size that
wrote them, through the safe reader and tensor-only planner (nothing is unpickled).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from normopt.checkpoint.manager import read_trainer_state
from normopt.checkpoint.safe_dcp import SafeReader, TensorOnlyPlanner, read_metadata
from normopt.errors import UserError
from normopt.run_dir import RunDir

MODEL_PREFIX = "model."


def load_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a DCP checkpoint, keyed by parameter/buffer name."""
    metadata = read_metadata(checkpoint)  # UserError for crafted or unreadable metadata
    model = {
        key[len(MODEL_PREFIX):]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not model:
        raise UserError(f"checkpoint {checkpoint} holds no model weights")
    state = {"model": model}
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": exactly the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True,
                     storage_reader=SafeReader(str(checkpoint)), planner=TensorOnlyPlanner(str(checkpoint)))
    except BaseException as exc:  # DCP wraps read errors in a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise UserError(f"cannot load checkpoint {checkpoint}: {type(exc).__name__}") from None
    return state["model"]


def export_safetensors(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write the weights of ``step``'s checkpoint (default: the latest complete one) as one
    safetensors file, the config it was trained with beside it; return the file's path."""
    from safetensors.torch import save_file

    run = RunDir(run_dir)
    checkpoint = run.find_checkpoint(step, "--step")
    weights = load_model_weights(checkpoint)
    out = out or run.export / f"{checkpoint.name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer_state = read_trainer_state(checkpoint)
    # a tied head is the same tensor under two names; safetensors wants distinct storage
    tensors = {name: t.contiguous().clone() for name, t in weights.items()}
    save_file(tensors, str(out), metadata={"format": "pt", "step": str(trainer_state["step"])})
    config = run.config_of(checkpoint)
    if config is not None:
        shutil.copyfile(config, out.with_suffix(".config.yaml"))
    return out
