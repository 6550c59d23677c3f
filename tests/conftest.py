"""Shared test fixtures: a persistent corpus cache, small corpora, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT, child_env

# prepared corpora and tokenizers survive between test runs (and are shared by torchrun ranks)
os.environ.setdefault("NORMOPT_CACHE", str(REPO_ROOT / ".cache" / "test"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A model and batch small enough that a CPU step takes milliseconds.
TINY_MODEL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=128",
]


def write_corpus(folder: Path, documents: int = 40, words: int = 400, seed: int = 0) -> Path:
    """Plain-text files with a learnable structure (repeated phrases drawn from a small set)."""
    import random

    rng = random.Random(seed)
    phrases = [
        "the quick brown fox jumps over the lazy dog",
        "to be or not to be that is the question",
        "all the world is a stage and all the men and women merely players",
        "now is the winter of our discontent",
        "a horse a horse my kingdom for a horse",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        text = " ".join(rng.choice(phrases) for _ in range(words // 8))
        (folder / f"doc_{d:03d}.txt").write_text(text + "\n")
    return folder


@pytest.fixture(autouse=True)
def _plugins_forgotten():
    """Every test starts from normopt's own registries: a plugin a test loads in this process
    (directly, or through a config or spec that names one) is forgotten when it ends."""
    yield
    from normopt.plugins import forget_all

    forget_all()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in the repo root, one process, captured output.

    One intra-op thread: test models are too small to gain from more, and spinning
    OpenMP threads slow to a crawl when another process holds the second core.
    """
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_run_args(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.path={corpus}",
        "data.vocab_size=300",
        *TINY_MODEL,
        "train.steps=6",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.seq_len=32",
        "train.eval_interval=3",
        "train.eval_sequences=8",
        "train.log_interval=1",
        "train.mfu_probe=false",
        "optim.warmup_steps=2",
        *extra,
    ]


def rerecord_digest(checkpoint: Path, name: str) -> None:
    """Record the present bytes of ``name`` (relative to ``checkpoint``) as its digest, as a
    crafter who edits trainer_state.json too would: what must stop such a file is the check
    of its contents, not the digest."""
    import json

    from normopt.checkpoint.digests import DIGESTS_KEY, file_sha256

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state[DIGESTS_KEY][name] = file_sha256(checkpoint / name)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


# what finished_run was trained with: a test that resumes a copy passes these too
FINISHED_RUN_ARGS = ("checkpoint.interval=3", "optim.name=muon")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_corpus) -> Path:
    """A finished 6-step Muon run on the tiny model (AdamW for the rest: both kinds of
    optimizer state) with checkpoints at steps 3 and 6, trained once per session. Tests
    that damage or resume it work on a copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster on localhost (``tests/slurm_cluster.py``), started once per
    session. Skipped with the reason where it cannot start here (not root, packages missing),
    unless NORMOPT_REQUIRE_SLURM=1 (CI sets it): then that is a failure."""
    from tests import slurm_cluster

    reason = slurm_cluster.unavailable()
    if reason and os.environ.get("NORMOPT_REQUIRE_SLURM") == "1":
        pytest.fail(f"NORMOPT_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
