"""A checkpoint is data, not code: crafted files that would run a command on load are
refused with exit status 2 and one line, and the command never runs."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from normopt.checkpoint.safe_dcp import merge_tensors, split_tensors
from tests.conftest import FINISHED_RUN_ARGS, REPO_ROOT, rerecord_digest, run_cli, tiny_run_args


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir, run_dir / "checkpoints" / "step_00000006"


def _resume(run_dir, corpus):
    return run_cli(tiny_run_args(run_dir, corpus, *FINISHED_RUN_ARGS, "train.steps=9"))


def _export(run_dir):
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", "export", str(run_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _refused(proc, words):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return proc.returncode == 2 and words in lines[-1] and "Traceback" not in proc.stderr


def test_crafted_metadata_is_refused(finished_run, tmp_path, tiny_corpus):
    run_dir, checkpoint = _copy(finished_run, tmp_path)
    marker = tmp_path / "marker"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    rerecord_digest(checkpoint, ".metadata")
    resume = _resume(run_dir, tiny_corpus)
    assert _refused(resume, "refusing to load posix.system"), resume.stderr[-2000:]
    export = _export(run_dir)
    assert _refused(export, "refusing to load posix.system"), export.stderr[-2000:]
    assert not marker.exists()


def test_pickled_entry_is_refused(finished_run, tmp_path, tiny_corpus):
    """A byte entry (which DCP would read with torch.load(weights_only=False)) is refused
    before any entry is read."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    run_dir, checkpoint = _copy(finished_run, tmp_path)
    marker = tmp_path / "marker"
    torch.save(_Payload(marker), checkpoint / "evil.distcp")
    size = (checkpoint / "evil.distcp").stat().st_size
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # the test's own file
    key = "optim.param_groups.0.lr"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, size)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    rerecord_digest(checkpoint, ".metadata")
    resume = _resume(run_dir, tiny_corpus)
    assert _refused(resume, "refusing a checkpoint with pickled entries"), resume.stderr[-2000:]
    export = _export(run_dir)
    assert _refused(export, "refusing a checkpoint with pickled entries"), export.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["rank_00000.safetensors", "rank_00000.pt"])
def test_crafted_rng_state_is_refused(finished_run, tmp_path, tiny_corpus, name):
    run_dir, checkpoint = _copy(finished_run, tmp_path)
    marker = tmp_path / "marker"
    for old in (checkpoint / "rng").iterdir():
        old.unlink()
    torch.save(_Payload(marker), checkpoint / "rng" / name)
    if name.endswith(".safetensors"):
        rerecord_digest(checkpoint, f"rng/{name}")
    resume = _resume(run_dir, tiny_corpus)
    words = "unreadable RNG state" if name.endswith(".safetensors") else "refusing to unpickle"
    assert _refused(resume, words), resume.stderr[-2000:]
    assert not marker.exists()


def test_checkpoint_holds_no_pickle(finished_run):
    """Every file normopt writes into a checkpoint is JSON, YAML, safetensors or tensor shards,
    and DCP's metadata declares no byte entry."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from normopt.checkpoint.safe_dcp import read_metadata

    checkpoint = finished_run / "checkpoints" / "step_00000006"
    names = sorted(p.name for p in checkpoint.rglob("*") if p.is_file())
    assert names == [
        ".metadata",
        "__0_0.distcp",
        "config.yaml",
        "non_tensor_state.json",
        "rank_00000.safetensors",
        "trainer_state.json",
    ]
    metadata = read_metadata(checkpoint)
    assert not [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]


def test_split_and_merge_round_trip():
    state = {
        "model": {"w": torch.ones(2)},
        "optim": {
            "state": {"w": {"exp_avg": torch.zeros(2), "step": torch.tensor(3.0), "count": 4}},
            "param_groups": [
                {
                    "lr": 0.1,
                    "betas": (0.9, 0.95),
                    "nesterov": True,
                    "name": None,
                    "ns_coefficients": [(1.0, 2.0, 3.0)],
                    "params": ["w"],
                },
                {"lr": 0.2, "betas": (0.8, 0.9), "params": []},
            ],
        },
    }
    tensors, moved = split_tensors(state)
    assert all(torch.is_tensor(v) for v in _leaves(tensors))
    restored = merge_tensors(tensors, moved)
    assert restored["optim"]["param_groups"] == state["optim"]["param_groups"]
    assert restored["optim"]["state"]["w"]["count"] == 4
    assert restored["optim"]["state"]["w"]["exp_avg"] is state["optim"]["state"]["w"]["exp_avg"]


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _add_checkpoint(run_dir, step):
    """A copy of step 6's checkpoint as ``step``'s (same tensors, its own trainer state)."""
    import json

    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / "step_00000006", folder)
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
    return folder


def _loop(path):
    path.unlink()
    os.symlink(path.name, path)


def test_retention_prunes_only_behind_verified_checkpoints(finished_run, tmp_path, capsys):
    """keep_latest_k counts checkpoints that verify: a damaged new one prunes nothing, and a
    damaged older one is not one of the k kept."""
    from normopt.checkpoint.manager import CheckpointWriter
    from normopt.run_dir import RunDir

    run_dir, _ = _copy(finished_run, tmp_path)
    run = RunDir(run_dir)
    nine = _add_checkpoint(run_dir, 9)
    _loop(nine / "rng" / "rank_00000.safetensors")
    CheckpointWriter(run, True, keep_latest_k=1)._prune(9)
    assert run.complete_steps() == [3, 6, 9]  # the new one does not verify: nothing deleted
    err = capsys.readouterr().err
    assert "checkpoints not pruned" in err and "rank_00000.safetensors is a symlink loop" in err

    _add_checkpoint(run_dir, 12)
    CheckpointWriter(run, True, keep_latest_k=2)._prune(12)
    assert run.complete_steps() == [6, 9, 12]  # kept: 12 and 6 (verified); 9 is damaged, not counted
    CheckpointWriter(run, True, keep_latest_k=1)._prune(12)
    assert run.complete_steps() == [12]


def test_every_piece_has_a_recorded_digest(finished_run):
    import json

    from normopt.checkpoint.digests import DIGESTS_KEY, file_sha256

    checkpoint = finished_run / "checkpoints" / "step_00000006"
    recorded = json.loads((checkpoint / "trainer_state.json").read_text())[DIGESTS_KEY]
    pieces = sorted(
        str(p.relative_to(checkpoint))
        for p in checkpoint.rglob("*")
        if p.is_file() and p.name not in ("trainer_state.json", "config.yaml")
    )
    assert sorted(recorded) == pieces
    assert all(file_sha256(checkpoint / name) == digest for name, digest in recorded.items())


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "piece",
    [
        "__0_0.distcp",
        *(
            pytest.param(piece, marks=pytest.mark.slow)
            for piece in ("rng/rank_00000.safetensors", "non_tensor_state.json")
        ),
    ],
)
def test_a_flipped_bit_is_refused_and_nothing_is_written(finished_run, tmp_path, tiny_corpus, piece):
    """Bytes that changed after the write (bit rot, a bad copy) leave sizes and structure
    intact: only the digest finds them. Resume and export refuse in one line naming the
    piece, and the run directory is left byte for byte as it was."""
    run_dir, checkpoint = _copy(finished_run, tmp_path)
    _flip_a_byte(checkpoint / piece)
    before = _tree_bytes(run_dir)
    words = f"{piece} does not match its recorded SHA-256"
    resume = _resume(run_dir, tiny_corpus)
    assert _refused(resume, words), resume.stderr[-2000:]
    if piece == "__0_0.distcp":
        export = _export(run_dir)
        assert _refused(export, words), export.stderr[-2000:]
    assert _tree_bytes(run_dir) == before


def test_ranks_split_the_digest_check(finished_run, tmp_path):
    """Two checkers each read their share; the flipped piece is found by the one whose share
    holds it, and together they cover every piece."""
    from normopt.checkpoint.verify import checkpoint_problem, verify_checkpoint
    from normopt.errors import UserError

    _, checkpoint = _copy(finished_run, tmp_path)
    _flip_a_byte(checkpoint / "__0_0.distcp")
    outcomes = []
    for rank in range(2):
        try:
            verify_checkpoint(checkpoint, rank=rank, world_size=2)
            outcomes.append(None)
        except UserError as exc:
            outcomes.append(str(exc))
    assert sum(o is not None for o in outcomes) == 1 and "__0_0.distcp does not match" in next(filter(None, outcomes))
    assert checkpoint_problem(checkpoint, contents=False) is None  # the structure alone is intact
