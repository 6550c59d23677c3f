"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout (the names are :mod:`normopt.run_dir`'s): ``<run>/checkpoints/step_00000100/`` holds
every rank's shards of the model and optimizer state (including ``derf_ema`` running scales,
which are model buffers), ``trainer_state.json`` (step, tokens, world size, the SHA-256 of
every other piece: ``digests``),
``non_tensor_state.json`` (optimizer hyperparameters and any other non-tensor entry),
``rng/rank_XXXXX.safetensors`` (each rank's RNG states: tensors, with the Python and numpy
scalars as JSON metadata) and a copy of the run's ``config.yaml``. Nothing in a checkpoint is
pickled, and loading one never unpickles anything but DCP's own metadata types (see
``safe_dcp``). The learning-rate schedule is a pure function of the step and the data order a
function of (seed, step), so the step restores both. A checkpoint is written under
``step_XXXXXXXX.tmp`` and renamed by rank 0 only after every rank has finished writing,
so a folder without ``.tmp`` is always complete; leftovers of interrupted writes are ignored
and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from normopt import progress
from normopt.checkpoint.digests import DIGESTS_KEY, digest_own_files
from normopt.checkpoint.safe_dcp import (
    SafeReader,
    TensorOnlyPlanner,
    check_non_tensor_state,
    merge_tensors,
    read_metadata,
    read_non_tensor_state,
    split_tensors,
    write_non_tensor_state,
)
from normopt.checkpoint.verify import checkpoint_problem, read_trainer_state
from normopt.errors import UserError
from normopt.parallel import collectives
from normopt.parallel.timeouts import collective_timeout
from normopt.run_dir import CONFIG_FILE, RNG_DIR, TRAINER_STATE, RunDir, rng_file


def _state(model: nn.Module, optimizers: list) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizers)
    return {"model": model_sd, "optim": optim_sd}


def _rng_path(folder: Path) -> Path:
    return folder / RNG_DIR / rng_file(collectives.rank())


def save_rng_state(folder: Path) -> None:
    """This rank's torch (CPU and CUDA), numpy and Python RNG states, as safetensors with
    the non-tensor parts in its JSON metadata."""
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, list(python_state), gauss_next]),
    }
    _rng_path(folder).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(_rng_path(folder)), metadata=meta)


def load_rng_state(folder: Path) -> bool:
    """Restore this rank's RNG states if the checkpoint has them; False if not."""
    from safetensors import safe_open

    path = _rng_path(folder)
    if os.path.lexists(path) and not path.is_file():  # a loop, a folder: never skipped as if absent
        raise UserError(f"cannot load checkpoint: {path} is not a regular file")
    if not path.is_file():
        if list((folder / RNG_DIR).glob("*.pt")):
            raise UserError(
                f"{folder / RNG_DIR}: pickled RNG states of an older normopt; refusing to "
                f"unpickle them (start a new run.dir)"
            )
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        version, python_state, gauss_next = json.loads(meta["python"])
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((version, tuple(python_state), gauss_next))
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
    except Exception as exc:
        raise UserError(f"{path}: unreadable RNG state ({type(exc).__name__})") from None
    return True


class CheckpointWriter:
    """Writes complete checkpoints, optionally asynchronously.

    Synchronous: every rank writes its shards, then rank 0 marks the checkpoint complete
    (trainer state, config copy, rename) and prunes to ``keep_latest_k``. Asynchronous:
    ``dcp.async_save`` copies the state to CPU memory and writes it in a background thread
    while training goes on; the checkpoint is marked complete when the next save (or
    :meth:`wait`) finds every rank's write finished. At most one write is in flight.
    """

    def __init__(self, run: RunDir, is_main: bool, keep_latest_k: int, async_save: bool = False):
        self.run, self.is_main, self.keep_latest_k, self.async_save = run, is_main, keep_latest_k, async_save
        self._pending = None  # (future, step, trainer_state)
        # background writes coordinate over their own gloo group, away from training's collectives,
        # with the checkpoint timeout (a rank that never arrives fails the save instead of hanging it)
        self._group = (
            collectives.new_group(backend="gloo", timeout=collective_timeout("checkpoint")) if async_save else None
        )

    def save(self, step: int, model: nn.Module, optimizers: list, trainer_state: dict, block: bool = False) -> Path:
        self.wait()
        progress.mark("checkpoint save", step)
        final, tmp = self.run.checkpoint(step), self.run.partial_checkpoint(step)
        with collectives.phase_timeout("checkpoint"):
            tensors, non_tensors = split_tensors(_state(model, optimizers))
            failure = None
            try:
                if self.is_main:
                    self.run.checkpoints.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True, exist_ok=True)
                    write_non_tensor_state(tmp, non_tensors)
            except Exception as exc:  # noqa: BLE001 - any refusal of this rank's disk is agreed below
                failure = _first_cause(exc, tmp)
            # agreed before DCP starts: a rank that skipped dcp.save while the others run its
            # collectives would leave them waiting in a gather that never completes
            self._agree_written(step, failure)
            future = None
            try:
                if self.async_save and not block:
                    future = dcp.async_save(tensors, checkpoint_id=str(tmp), process_group=self._group)
                    save_rng_state(tmp)
                else:
                    dcp.save(tensors, checkpoint_id=str(tmp))
                    save_rng_state(tmp)
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - CheckpointException is a BaseException
                failure = _first_cause(exc, tmp)
            self._agree_written(step, failure, in_flight=future)
            if self.async_save and not block:
                self._pending = (future, step, trainer_state)
                return final
            self._mark_complete(step, trainer_state)
        return final

    def wait(self) -> None:
        """Finish the write in flight, if any, and mark it complete."""
        if self._pending is None:
            return
        future, step, trainer_state = self._pending
        self._pending = None
        progress.mark("checkpoint wait", step)
        failure = None
        with collectives.phase_timeout("checkpoint"):
            try:
                future.result(timeout=collective_timeout("checkpoint").total_seconds())
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a timeout too: agreed below
                failure = _first_cause(exc, self.run.partial_checkpoint(step))
            self._agree_written(step, failure)
            self._mark_complete(step, trainer_state)

    def abandon(self) -> None:
        """Forget the write in flight without waiting for it or talking to the other ranks
        (the run already failed on this rank, and the others may be anywhere): its
        ``.tmp`` folder stays an ignored partial checkpoint, cleaned by the next save."""
        self._pending = None

    def _agree_written(self, step: int, failure: str | None, in_flight=None) -> None:
        """Every rank learns whether any rank's write failed (a full disk, a read-only
        folder); if one did, rank 0 removes the partial checkpoint, the previous complete
        one stays, and all ranks stop with the first failing rank and its reason in one line."""
        failures = collectives.all_gather_object(failure)
        failed = [(rank, reason) for rank, reason in enumerate(failures) if reason is not None]
        if not failed:
            return
        if in_flight is not None:  # this rank's background write still fills the folder: let it end first
            try:
                in_flight.result(timeout=collective_timeout("checkpoint").total_seconds())
            except (Exception, CheckpointException):  # noqa: BLE001 - the save has failed already
                pass
        collectives.barrier()
        partial = self.run.partial_checkpoint(step)
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        collectives.barrier()
        previous = self.run.complete_steps()
        kept = (
            f"the last complete checkpoint {self.run.checkpoint(previous[-1])} is kept"
            if previous
            else "no earlier checkpoint exists"
        )
        rank, reason = failed[0]
        where = f" on rank {rank}" if len(failures) > 1 else ""
        raise UserError(
            f"writing checkpoint step {step}{where} failed ({reason}); the partial checkpoint was removed and {kept}"
        )

    def _mark_complete(self, step: int, trainer_state: dict) -> None:
        final, tmp = self.run.checkpoint(step), self.run.partial_checkpoint(step)
        collectives.barrier()  # every rank's shards are on disk
        failure, own = None, {}
        try:
            own = digest_own_files(tmp, collectives.rank())
        except Exception as exc:  # noqa: BLE001 - a file that does not read back fails the save on every rank
            failure = _first_cause(exc, tmp)
        self._agree_written(step, failure)
        digests = {name: digest for share in collectives.all_gather_object(own) for name, digest in share.items()}
        if self.is_main:
            try:
                state = {**trainer_state, "step": step, DIGESTS_KEY: dict(sorted(digests.items()))}
                (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
                if self.run.config.exists():
                    shutil.copyfile(self.run.config, tmp / CONFIG_FILE)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            except Exception as exc:  # noqa: BLE001 - rank 0's refusal ends every rank, not rank 0 alone
                failure = _first_cause(exc, tmp)
        self._agree_written(step, failure)
        if self.is_main:
            self._prune(step)
            for stale in self.run.partial_checkpoints():
                shutil.rmtree(stale, ignore_errors=True)
        collectives.barrier()

    def _prune(self, step: int) -> None:
        """Rank 0, after ``step``'s checkpoint was renamed complete: keep the newest
        ``keep_latest_k`` checkpoints that verify (``checkpoint.verify``; their structure: the
        digests were taken from the files on disk moments ago, and are checked on reading
        a checkpoint back) and delete only the
        complete ones older than all of those; nothing at all unless ``step``'s own verifies
        (a damaged checkpoint is never counted as one kept, nor deleted by retention)."""
        problem = checkpoint_problem(self.run.checkpoint(step), contents=False)
        if problem is not None:
            print(
                f"normopt: warning: checkpoints not pruned: the new one does not verify ({problem})",
                file=sys.stderr,
                flush=True,
            )
            return
        verified = []
        for candidate in reversed(self.run.complete_steps()):
            if len(verified) == self.keep_latest_k:
                break
            if candidate == step or checkpoint_problem(self.run.checkpoint(candidate), contents=False) is None:
                verified.append(candidate)
        if len(verified) < self.keep_latest_k:
            return
        for old in self.run.complete_steps():
            if old < verified[-1]:
                shutil.rmtree(self.run.checkpoint(old), ignore_errors=True)


def _first_cause(exc: BaseException, folder: Path | None = None) -> str:
    """A one-line reason, digging through DCP's per-rank failure wrapper. A write that failed
    on a file system with no space left (``folder``'s) is named as such, whatever the
    serializer said (torch's zip writer reports a short write as "unexpected pos")."""
    if isinstance(exc, CheckpointException) and exc.failures:
        inner = next(iter(exc.failures.values()))  # (exception, traceback) of the first rank
        exc = inner[0] if isinstance(inner, tuple) else inner
    text = str(exc).strip()
    if is_disk_full(exc) or (folder is not None and _no_space_left(folder)):
        return "no space left on device"
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _no_space_left(folder: Path, below: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` (or its nearest existing parent) has less
    than ``below`` bytes left for this user."""
    for path in (folder, *folder.parents):
        try:
            info = os.statvfs(path)
        except OSError:
            continue
        return info.f_bavail * info.f_frsize < below
    return False


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the disk is full."""
    import errno

    text = str(exc)
    return (
        getattr(exc, "errno", None) == errno.ENOSPC
        or "No space left on device" in text
        or "StorageFull" in text
        or (exc.__cause__ is not None and is_disk_full(exc.__cause__))
    )


def check_same_model(path: Path, metadata, model: nn.Module) -> None:
    """Refuse a checkpoint of another model: its model tensors must be the built model's, by
    name and full shape (a DyT checkpoint holds RMSNorm's ``weight`` names too, plus alpha,
    and DCP would load the shared names and ignore the rest)."""
    saved = {
        key.removeprefix("model."): tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith("model.") and hasattr(entry, "size")
    }
    built = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, extra = sorted(built.keys() - saved.keys()), sorted(saved.keys() - built.keys())
    shapes = sorted(name for name in built.keys() & saved.keys() if built[name] != saved[name])
    if missing or extra or shapes:
        parts = [
            f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("lacks", missing), ("has extra", extra), ("has other shapes for", shapes))
            if names
        ]
        raise UserError(f"checkpoint {path} holds another model than this config builds: it {'; '.join(parts)}")


def load_checkpoint(path: Path, model: nn.Module, optimizers: list) -> dict:
    """Load model and optimizer state in place (any world size); return the trainer state."""
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"checkpoint {path} is incomplete or missing ({TRAINER_STATE} not found)")
    trainer_state = read_trainer_state(path)
    # crafted metadata and pickled entries are refused here, in one line, before DCP
    # (which would log tracebacks around them) reads anything
    metadata = read_metadata(path)
    check_same_model(path, metadata, model)
    non_tensors = read_non_tensor_state(path)
    tensors, expected = split_tensors(_state(model, optimizers))
    check_non_tensor_state(path, non_tensors, expected)
    try:
        dcp.load(
            tensors, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), planner=TensorOnlyPlanner(str(path))
        )
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        reason = _first_cause(exc)
        raise UserError(f"cannot load checkpoint {path}: {reason[:300]}") from None
    state = merge_tensors(tensors, non_tensors)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    world = collectives.world_size()
    # RNG streams belong to ranks: restore them only when every rank has its own again
    if trainer_state.get("world_size") == world:
        load_rng_state(path)
    return trainer_state
