"""Whether a checkpoint is whole: the one check that start-up (before resuming from a
checkpoint) and retention (before pruning older ones) rely on.

A checkpoint is whole when every piece of it is a regular file or folder that reads (no
symlink loop, no link back into a folder that holds it, no folder where a file belongs, no
fifo or device): its folder, ``trainer_state.json`` (and what it says:
``read_trainer_state``), ``non_tensor_state.json``, the RNG state of every rank it
was written by, the DCP ``.metadata`` (read safely, see ``safe_dcp``) and every model and
optimizer shard file that metadata points into, each at least as long as the bytes it is
said to hold, and (``contents=True``) each of those files' bytes those it had when written
(``checkpoint.digests``). A damaged checkpoint is a UserError naming the piece; it is never
half-used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from normopt.checkpoint.digests import METADATA_FILE, check_digests, recorded_digests, share_of
from normopt.errors import UserError
from normopt.run_dir import (
    NON_TENSOR_STATE,
    RNG_DIR,
    STEP_DIR,
    TRAINER_STATE,
    damaged_checkpoint,
    entry_problem,
    rng_file,
)


def _require(path: Path, want: str) -> None:
    problem = entry_problem(path, want)
    if problem:
        raise damaged_checkpoint(f"{path} is {problem}")


def _walk(folder: Path) -> None:
    """Every entry below ``folder`` is a file or folder that reads (links into loops refused)."""
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        is_folder = os.path.isdir(path) and entry_problem(path, "folder") is None
        if is_folder:
            if os.path.islink(path):
                continue  # a valid link to a folder elsewhere: its pieces are checked by name below
            _walk(path)
        elif entry_problem(path, "file") is not None:
            _require(path, "folder" if os.path.isdir(path) else "file")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_trainer_state(checkpoint: Path) -> dict:
    """The checkpoint's trainer_state.json: an object whose integer ``step`` is its folder's
    step, with a non-negative integer ``tokens`` and a positive integer ``world_size`` where
    present. Anything else is a UserError naming the file."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not _is_int(state.get("step")):
        raise UserError(f"{path}: no integer step")
    match = STEP_DIR.match(checkpoint.name)
    if state["step"] < 0 or (match and int(match.group(1)) != state["step"]):
        raise UserError(f"{path}: step {state['step']} is not its checkpoint's step ({checkpoint.name})")
    if "tokens" in state and not (_is_int(state["tokens"]) and state["tokens"] >= 0):
        raise UserError(f"{path}: tokens {state['tokens']!r} is not a count")
    if "world_size" in state and not (_is_int(state["world_size"]) and state["world_size"] >= 1):
        raise UserError(f"{path}: world_size {state['world_size']!r} is not a rank count")
    return state


def verify_checkpoint(checkpoint: Path, contents: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """The checkpoint's trainer state, once every piece of it is known to be whole; a
    UserError naming the first damaged piece otherwise (module doc). With ``contents``, the
    recorded digests are checked too: the small ``.metadata`` by every caller, the other
    files split over ``world_size`` callers (this one checks ``rank``'s share), so that ranks
    starting together read the checkpoint once between them."""
    from normopt.checkpoint.safe_dcp import read_metadata

    checkpoint = Path(checkpoint)
    _require(checkpoint, "folder")
    _walk(checkpoint)
    _require(checkpoint / TRAINER_STATE, "file")
    state = read_trainer_state(checkpoint)
    recorded = recorded_digests(checkpoint, state) if contents else None
    _require(checkpoint / NON_TENSOR_STATE, "file")
    rng = checkpoint / RNG_DIR
    _require(rng, "folder")
    pieces = [NON_TENSOR_STATE]
    for writer in range(state.get("world_size", 1)):
        pieces.append(f"{RNG_DIR}/{rng_file(writer)}")
        path = rng / rng_file(writer)
        if not os.path.lexists(path) and list(rng.glob("*.pt")):
            raise UserError(
                f"{rng}: pickled RNG states of an older normopt; refusing to unpickle them (start a new run.dir)"
            )
        _require(path, "file")
    _require(checkpoint / METADATA_FILE, "file")
    if recorded is not None:
        check_digests(checkpoint, recorded, [METADATA_FILE])
    metadata = read_metadata(checkpoint)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
            raise damaged_checkpoint(
                f"{checkpoint / METADATA_FILE} names a shard outside its folder ({relative!r:.80})"
            )
        needed[relative] = max(end, needed.get(relative, 0))
    for relative, end in sorted(needed.items()):
        path = checkpoint / relative
        _require(path, "file")
        size = os.path.getsize(path)
        if size < end:
            raise damaged_checkpoint(f"{path} is truncated ({size} bytes, the metadata needs {end})")
        pieces.append(relative)
    if recorded is not None:
        check_digests(checkpoint, recorded, share_of(pieces, rank, world_size))
    return state


def checkpoint_problem(checkpoint: Path, contents: bool = True) -> str | None:
    """None when ``checkpoint`` verifies, else the one-line reason."""
    try:
        verify_checkpoint(checkpoint, contents=contents)
    except UserError as exc:
        return str(exc)
    return None
