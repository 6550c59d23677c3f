"""End-to-end runs through ``python train.py``: the run-directory contract, resuming,
and learning on the real corpus with every norm."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from normopt.config import config_from_dict
from tests.conftest import TINY_MODEL, run_cli, tiny_run_args


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contract(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters=" in proc.stdout and "TensorBoard logs:" in proc.stdout

    saved = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.run.dir == str(run_dir) and saved.train.steps == 6

    lines = _lines(run_dir)
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 32
    assert [r["step"] for r in evals] == [0, 3, 6]

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000006"]


@pytest.mark.parametrize("optim", [pytest.param("adamw", marks=pytest.mark.slow), "normuon"])
def test_finished_run_is_reused_and_extended_exactly(tmp_path, tiny_corpus, optim):
    """Re-running a finished run does nothing; raising train.steps continues from its
    checkpoint with the same losses as a run that went straight through (optimizer state,
    including NorMuon's momentum and row second moments, restored through DCP)."""
    args = ["optim.schedule=constant", "train.dtype=float32", f"optim.name={optim}"]
    straight = tmp_path / "straight"
    assert run_cli(tiny_run_args(straight, tiny_corpus, *args, "train.steps=9")).returncode == 0

    resumed = tmp_path / "resumed"
    assert run_cli(tiny_run_args(resumed, tiny_corpus, *args)).returncode == 0
    before = (resumed / "metrics.jsonl").read_text()
    again = run_cli(tiny_run_args(resumed, tiny_corpus, *args))
    assert again.returncode == 0 and "run already complete" in again.stdout
    assert (resumed / "metrics.jsonl").read_text() == before

    extended = run_cli(tiny_run_args(resumed, tiny_corpus, *args, "train.steps=9"))
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "resumed from" in extended.stdout
    want = {r["step"]: r["loss"] for r in _lines(straight) if "loss" in r}
    got = {r["step"]: r["loss"] for r in _lines(resumed) if "loss" in r}
    assert got == want  # bit-identical, steps 1..9


def test_resume_refuses_a_changed_model(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    assert run_cli(tiny_run_args(run_dir, tiny_corpus)).returncode == 0
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "model.norm=dyt"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "model.norm" in proc.stderr


def test_resume_never_refuses_an_existing_run(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    assert run_cli(tiny_run_args(run_dir, tiny_corpus)).returncode == 0
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.resume=never"))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


# two runs carry the claim by default: the baseline, and a bounded norm under a Muon-family
# optimizer; the other pairs are the same claim again and run with -m slow
@pytest.mark.parametrize(
    "norm, optim",
    [
        ("rmsnorm", "adamw"),
        ("derf", "normuon"),
        *(
            pytest.param(n, o, marks=pytest.mark.slow)
            for n, o in (("dyt", "adamw"), ("derf", "adamw"), ("derf_ema", "adamw"), ("rmsnorm", "muon"))
        ),
    ],
)
def test_real_corpus_validation_loss_falls(tmp_path, norm, optim):
    run_dir = tmp_path / f"{norm}-{optim}"
    proc = run_cli(
        [
            f"run.dir={run_dir}",
            "data.vocab_size=1024",
            *TINY_MODEL,
            f"model.norm={norm}",
            f"optim.name={optim}",
            "train.steps=40",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.seq_len=64",
            "train.eval_interval=40",
            "train.eval_sequences=64",
            "train.mfu_probe=false",
            "optim.lr=0.01",
            "optim.warmup_steps=5",
            "checkpoint.interval=0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = {r["step"]: r["eval_loss"] for r in _lines(run_dir) if "eval_loss" in r}
    assert evals[40] < evals[0] - 0.5, evals


def test_damaged_checkpoint_exits_2_with_one_line(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    assert run_cli(tiny_run_args(run_dir, tiny_corpus)).returncode == 0
    shards = sorted((run_dir / "checkpoints" / "step_00000006").glob("*.distcp"))
    assert shards
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "train.steps=8"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot load checkpoint" in lines[0], proc.stderr[-2000:]


def test_nan_stops_before_the_update_and_every_checkpoint_is_finite(tmp_path, tiny_corpus):
    """A huge lr makes the gradient norm non-finite within a few steps: the run exits 3 before
    applying that update, so every checkpoint it wrote holds finite tensors."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir = tmp_path / "run"
    proc = run_cli(
        tiny_run_args(
            run_dir,
            tiny_corpus,
            "optim.lr=1e4",
            "optim.grad_clip=0",
            "checkpoint.interval=1",
            "checkpoint.keep_latest_k=100",
            "train.steps=12",
        )
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "stopping before the update" in proc.stderr
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints, "the run stopped before its first checkpoint: raise train.steps or lower optim.lr"
    for checkpoint in checkpoints:
        dcp_to_torch_save(checkpoint, tmp_path / "full.pt")
        state = torch.load(tmp_path / "full.pt", weights_only=False)  # a file this test just wrote
        tensors = [t for t in state["model"].values() if torch.is_tensor(t)]
        assert tensors and all(torch.isfinite(t.float()).all() for t in tensors), checkpoint.name


def test_one_writer_per_run_directory(tmp_path, tiny_corpus):
    """While a run holds run.dir, a second writer exits 2 naming it and touches nothing; after
    the holder dies (SIGKILL), the lock is free again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir, tiny_corpus, "train.steps=100000", "train.eval_interval=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.2)
        second = run_cli(tiny_run_args(run_dir, tiny_corpus, "train.seed=1"))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (pid {first.pid} on" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    after_kill = run_cli(tiny_run_args(run_dir, tiny_corpus, "train.steps=2"))
    assert after_kill.returncode == 0, after_kill.stderr[-2000:]  # the dead holder's lock is gone


NON_FINITE_UPDATE = """
import sys
import torch
from normopt.optim import builder
from normopt.cli import main

real_step = builder.Optimizers.step


def step(self):  # an update that overflows: the loss and gradient norm stay finite
    real_step(self)
    for group in self.groups:
        for p in group.params:
            if p.ndim == 2:
                (p.data.to_local() if hasattr(p.data, "to_local") else p.data)[0, 0] = float("inf")
                return


builder.Optimizers.step = step
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_an_update_that_overflows_writes_no_checkpoint(tmp_path, tiny_corpus):
    """The loss and the gradient norm are checked before every update, but an update itself
    can leave a weight non-finite: then the checkpoint of that step is not written, the run
    stops as diverged (3), and no checkpoint holding inf exists."""
    import subprocess
    import sys

    from tests.processes import REPO_ROOT, child_env

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", NON_FINITE_UPDATE, *tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=1")],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "after step 1 a weight is not finite; no checkpoint written" in proc.stderr
    assert not list((run_dir / "checkpoints").glob("step_*"))


def test_values_float32_cannot_hold_and_impossible_shapes_are_refused():
    from normopt.config import load_config
    from normopt.errors import UserError

    for override, words in (
        ("optim.lr=1e39", "cannot be represented in float32"),
        ("optim.lr=3e38", "optim.lr: must be in (0, 1e+06]"),
        ("optim.eps=1e-300", "cannot be represented in float32"),
        ("model.rope_theta=0", "model.rope_theta: must be positive"),
        ("data.vocab_size=100000000", "data.vocab_size: must be in [260, 1048576]"),
    ):
        with pytest.raises(UserError, match=re.escape(words)):
            load_config(None, [override])
    assert load_config(None, ["optim.weight_decay=0"]).optim.weight_decay == 0.0


def test_the_validation_fraction_is_part_of_the_prepared_corpus_key(tmp_path, tiny_corpus):
    from types import SimpleNamespace

    from normopt.data.corpus import resolve_corpus
    from normopt.data.token_cache import prepared_folder

    def key(fraction):
        cfg = SimpleNamespace(
            path=str(tiny_corpus),
            cache_dir=str(tmp_path),
            text_column="text",
            tokenizer="",
            vocab_size=300,
            max_tokens=0,
            val_fraction=fraction,
        )
        return prepared_folder(cfg, resolve_corpus(cfg)).name

    assert key(0.05) != key(0.1) and key(0.05) == key(0.05)
