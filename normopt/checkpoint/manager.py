"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``<run>/checkpoints/step_00000100/`` holds every rank's shards of the model and
optimizer state (including ``derf_ema`` running scales, which are model buffers),
``trainer_state.json`` (step, tokens, world size), ``rng/rank_XXXXX.pt`` (each rank's RNG
states) and a copy of the run's ``config.yaml``. The learning-rate schedule is a pure
function of the step and the data order a function of (seed, step), so the step restores
both. A checkpoint is written under
``step_XXXXXXXX.tmp`` and renamed by rank 0 only after every rank has finished writing,
so a folder without ``.tmp`` is always complete; leftovers of interrupted writes are ignored
and cleaned up by the next save.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from normopt.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"


def step_dir(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"step_{step:08d}"


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for child in checkpoint_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(model: nn.Module, optimizers: list) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizers)
    return {"model": model_sd, "optim": optim_sd}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_rng_state(folder: Path) -> None:
    """This rank's torch (CPU and CUDA), numpy and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "rng" / f"rank_{_rank():05d}.pt")


def load_rng_state(folder: Path) -> bool:
    """Restore this rank's RNG states if the checkpoint has them; False if not."""
    path = folder / "rng" / f"rank_{_rank():05d}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


class CheckpointWriter:
    """Writes complete checkpoints, optionally asynchronously.

    Synchronous: every rank writes its shards, then rank 0 marks the checkpoint complete
    (trainer state, config copy, rename) and prunes to ``keep_latest_k``. Asynchronous:
    ``dcp.async_save`` copies the state to CPU memory and writes it in a background thread
    while training goes on; the checkpoint is marked complete when the next save (or
    :meth:`wait`) finds every rank's write finished. At most one write is in flight.
    """

    def __init__(self, checkpoint_dir: Path, is_main: bool, keep_latest_k: int,
                 config_path: Path | None = None, async_save: bool = False):
        self.checkpoint_dir, self.is_main, self.keep_latest_k = checkpoint_dir, is_main, keep_latest_k
        self.config_path, self.async_save = config_path, async_save
        self._pending = None  # (future, step, trainer_state)
        # background writes coordinate over their own gloo group, away from training's collectives
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self, step: int, model: nn.Module, optimizers: list, trainer_state: dict,
             block: bool = False) -> Path:
        self.wait()
        final = step_dir(self.checkpoint_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        state = _state(model, optimizers)
        if self.async_save and not block:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            save_rng_state(tmp)
            self._pending = (future, step, trainer_state)
            return final
        dcp.save(state, checkpoint_id=str(tmp))
        save_rng_state(tmp)
        self._mark_complete(step, trainer_state)
        return final

    def wait(self) -> None:
        """Finish the write in flight, if any, and mark it complete."""
        if self._pending is None:
            return
        future, step, trainer_state = self._pending
        self._pending = None
        future.result()
        self._mark_complete(step, trainer_state)

    def _mark_complete(self, step: int, trainer_state: dict) -> None:
        final = step_dir(self.checkpoint_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        _barrier()  # every rank's shards are on disk
        if self.is_main:
            (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
            if self.config_path is not None and self.config_path.exists():
                shutil.copyfile(self.config_path, tmp / "config.yaml")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in complete_steps(self.checkpoint_dir)[:-self.keep_latest_k]:
                shutil.rmtree(step_dir(self.checkpoint_dir, old), ignore_errors=True)
            for stale in self.checkpoint_dir.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()


def _first_cause(exc: BaseException) -> str:
    """A one-line reason, digging through DCP's per-rank failure wrapper."""
    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))  # (exception, traceback) of the first rank
        exc = inner[0] if isinstance(inner, tuple) else inner
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_checkpoint(path: Path, model: nn.Module, optimizers: list) -> dict:
    """Load model and optimizer state in place (any world size); return the trainer state."""
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"checkpoint {path} is incomplete or missing ({TRAINER_STATE} not found)")
    state = _state(model, optimizers)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        reason = _first_cause(exc)
        raise UserError(f"cannot load checkpoint {path}: {reason[:300]}") from None
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads(state_file.read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    # RNG streams belong to ranks: restore them only when every rank has its own again
    if trainer_state.get("world_size") == world:
        load_rng_state(path)
    return trainer_state
