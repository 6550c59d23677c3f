"""Interrupted runs: SIGKILL, stop signals, incomplete checkpoints, other world sizes."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import REPO_ROOT, run_cli, tiny_run_args
from tests.processes import start, wait_for_step
from tests.torchrun import run_torchrun

STEPS = 40


# the Muon runs here train a latent-attention + mixture-of-experts model (expert stacks, the
# aux-free routing bias, a buffer that must survive too) and put only some matrices on Muon
# (the others on AdamW as matrix_adamw), so both kinds of optimizer state of the block
# matrices go through a kill and a reshard; W_o is orthogonalised per head (its own torch
# param group with head_blocks in the checkpoint), the expert stacks whole
OPTIM_SETTINGS = {
    "adamw": ["optim.name=adamw"],
    "muon": [
        "optim.name=muon",
        "optim.muon_params=vo_ffn",
        "optim.muon_split_heads=qkvo",
        "model.attention=mla",
        "model.ffn=moe",
        "model.n_experts=4",
        "model.moe_balance=aux_free",
        "model.moe_bias_rate=0.01",
    ],
}


def _args(run_dir, corpus, *extra):
    return tiny_run_args(
        run_dir,
        corpus,
        f"train.steps={STEPS}",
        "train.eval_interval=10",
        "checkpoint.interval=3",
        "checkpoint.keep_latest_k=3",
        "optim.schedule=constant",
        "train.dtype=float32",
        *extra,
    )


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus):
    out = {}
    for optim in ("adamw", "muon"):
        run_dir = tmp_path_factory.mktemp(f"ref-{optim}")
        proc = run_cli(_args(run_dir, tiny_corpus, *OPTIM_SETTINGS[optim]))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[optim] = _losses(run_dir)
    return out


@pytest.mark.parametrize(
    "optim, kill_after, async_save",
    [
        # the fault injection (tests/test_fault_injection.py) kills 2-rank Muon runs mid-step and mid-write,
        # sync and async, in the default run; the other two cases here run with -m slow
        ("adamw", 7, False),
        pytest.param("muon", 14, False, marks=pytest.mark.slow),
        pytest.param("adamw", 20, True, marks=pytest.mark.slow),
    ],
)
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_corpus, reference, optim, kill_after, async_save):
    """Killed anywhere (also while a checkpoint is being written, in the background or
    not), the run resumes from its last complete checkpoint and logs the same losses."""
    run_dir = tmp_path / "run"
    args = _args(run_dir, tiny_corpus, *OPTIM_SETTINGS[optim], f"checkpoint.async_save={str(async_save).lower()}")
    proc = start(args)
    wait_for_step(proc, run_dir, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert _losses(run_dir) == reference[optim]


def test_incomplete_checkpoint_is_never_loaded(tmp_path, tiny_corpus, reference):
    """A checkpoint whose writing was cut short (a .tmp folder, or one without its
    trainer state) is skipped in favour of the last complete one."""
    run_dir = tmp_path / "run"
    args = _args(run_dir, tiny_corpus)
    assert run_cli([*args, "train.steps=9"]).returncode == 0
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_00000012.tmp").mkdir()
    (checkpoints / "step_00000012.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (checkpoints / "step_00000015").mkdir()  # renamed but never finished: no trainer_state.json
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step_00000009 at step 9" in resumed.stdout
    # the fallback is said, in one line
    assert (
        "normopt: partial checkpoints step_00000012.tmp, step_00000015 (an interrupted write) skipped; "
        "resuming from step_00000009"
    ) in resumed.stdout.splitlines()
    assert _losses(run_dir) == reference["adamw"]


# SIGTERM also runs through the launcher in test_launcher; all three share one handler
@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGUSR1,
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    ],
    ids=["SIGUSR1", "SIGTERM", "SIGINT"],
)
def test_stop_signal_checkpoints_and_exits_75(tmp_path, tiny_corpus, reference, sig):
    run_dir = tmp_path / "run"
    args = _args(run_dir, tiny_corpus)
    proc = start(args)
    wait_for_step(proc, run_dir, 5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert f"stopped by {sig.name}" in stderr
    stopped_at = max(_losses(run_dir))
    assert stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").exists()
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(run_dir) == reference["adamw"]


@pytest.mark.slow  # resharded resume stays in the default run through test_hsdp (2 x 2 -> one process)
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_on_another_number_of_ranks(tmp_path, tiny_corpus, reference, optim):
    """Model and optimizer state (AdamW moments, Muon momentum) reshard through DCP; the
    data order does not depend on the world size, so 1 rank then 2 ranks follows the
    1-rank curve (fp32, 1e-5)."""
    run_dir = tmp_path / "run"
    args = _args(run_dir, tiny_corpus, *OPTIM_SETTINGS[optim])
    assert run_cli([*args, "train.steps=12"]).returncode == 0
    run_torchrun(REPO_ROOT / "train.py", 2, args)
    losses = _losses(run_dir)
    assert losses.keys() == reference[optim].keys()
    for step, loss in reference[optim].items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)


def test_missing_shard_exits_2(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    args = _args(run_dir, tiny_corpus, "train.steps=3")
    assert run_cli(args).returncode == 0
    for shard in (run_dir / "checkpoints" / "step_00000003").glob("*.distcp"):
        shard.unlink()
    proc = run_cli([*args[:-1], "train.steps=6"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot load checkpoint" in lines[0], proc.stderr[-2000:]


def test_checkpoint_of_another_model_exits_2(tmp_path, tiny_corpus):
    """Even with every config copy gone, shapes that do not match are refused cleanly."""
    run_dir = tmp_path / "run"
    args = _args(run_dir, tiny_corpus, "train.steps=3")
    assert run_cli(args).returncode == 0
    (run_dir / "config.yaml").unlink()
    (run_dir / "checkpoints" / "step_00000003" / "config.yaml").unlink()
    proc = run_cli([*args[:-1], "train.steps=6", "model.ffn_hidden=96"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds another model than this config builds: it has other shapes for" in lines[0]
