"""Content digests of a checkpoint: a bit flipped on disk is found before the run trusts it.

Every rank hashes the files it wrote (its DCP shards ``__<rank>_*.distcp`` and its RNG file;
rank 0 also the DCP ``.metadata`` and ``non_tensor_state.json``) once all of them are on disk,
and rank 0 records the SHA-256 of each, by path relative to the checkpoint, under
``trainer_state.json``'s ``sha256`` key before the checkpoint is renamed complete. Reading a
checkpoint back (resume, export, sample) recomputes them: a file whose bytes differ is a
damaged piece, refused in one line like a missing one. Ranks hash their own files, so the
cost is each rank's share of the checkpoint at ~1.5 GB/s (SHA-256 on one x86 core), paid in
parallel; start-up splits the check over the ranks the same way.

Checkpoints written before digests existed carry no ``sha256`` key and are verified for
structure only (``checkpoint.verify``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from normopt.run_dir import NON_TENSOR_STATE, RNG_DIR, damaged_checkpoint, rng_file

DIGESTS_KEY = "sha256"  # trainer_state.json's map of relative path -> hex digest
METADATA_FILE = ".metadata"
_HEX = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_written_by(checkpoint: Path, rank: int) -> list[str]:
    """The files of ``checkpoint`` that ``rank`` wrote, relative to it (DCP names each rank's
    shards ``__<rank>_<n>.distcp``)."""
    own = sorted(p.name for p in checkpoint.glob(f"__{rank}_*.distcp"))
    own.append(f"{RNG_DIR}/{rng_file(rank)}")
    if rank == 0:
        own += [METADATA_FILE, NON_TENSOR_STATE]
    return own


def digest_own_files(checkpoint: Path, rank: int) -> dict[str, str]:
    """SHA-256 of each file ``rank`` wrote into ``checkpoint``."""
    return {name: file_sha256(checkpoint / name) for name in files_written_by(checkpoint, rank)}


def recorded_digests(checkpoint: Path, trainer_state: dict) -> dict[str, str] | None:
    """The digests ``trainer_state`` records (None for a checkpoint written without them); a
    record that is not a map of relative paths to SHA-256 hex digests is a damaged piece."""
    recorded = trainer_state.get(DIGESTS_KEY)
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and _HEX.fullmatch(v)
        and not k.startswith("/")
        and ".." not in Path(k).parts
        for k, v in recorded.items()
    ):
        raise damaged_checkpoint(f"{checkpoint / 'trainer_state.json'} holds a malformed {DIGESTS_KEY} record")
    return recorded


def check_digests(checkpoint: Path, recorded: dict[str, str], names: list[str]) -> None:
    """Each of ``names`` (relative paths) has a recorded digest that its bytes match; a
    UserError naming the first that does not."""
    for name in names:
        if name not in recorded:
            raise damaged_checkpoint(f"{checkpoint / name} has no recorded digest")
        try:
            actual = file_sha256(checkpoint / name)
        except OSError as exc:
            raise damaged_checkpoint(
                f"{checkpoint / name} does not read ({exc.strerror or type(exc).__name__})"
            ) from None
        if actual != recorded[name]:
            raise damaged_checkpoint(
                f"{checkpoint / name} does not match its recorded SHA-256 (its bytes changed after it was written)"
            )


def share_of(names: list[str], rank: int, world_size: int) -> list[str]:
    """The part of ``names`` one rank of ``world_size`` checks (every name exactly once)."""
    return sorted(names)[rank::world_size]
