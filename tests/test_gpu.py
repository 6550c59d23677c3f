"""The GPU path on one CUDA device; every test here is skipped without one.

Run it on a GPU machine with ``python -m pytest tests/test_gpu.py`` (or all GPU checks at
once with ``benchmarks/gpu_check.py``). It trains on the built-in corpus with the 32768-token
BPE: on a machine without network, prepare it elsewhere (``benchmarks/gpu_check.py
--prepare DIR``) and point ``NORMOPT_CACHE`` at the copied folder. Each run is a real
``train.py`` process on the small ``debug`` model in bf16; the module takes about three
minutes on one H100/H200 (under two with ``-n 4 --dist loadgroup``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.py runs these on a GPU)"
)

GPU_RUN = [
    "data.path=",
    "data.vocab_size=32768",
    "model.preset=debug",
    "train.device=cuda",
    "train.steps=16",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.seq_len=256",
    "train.log_interval=1",
    "train.eval_interval=0",
    "train.eval_sequences=32",
    "diagnostics.interval=0",
    "optim.warmup_steps=4",
    "optim.lr=3e-3",
]
# the compiled model against eager, bf16, 16 steps of Derf + Muon: rounding differs (other
# fused kernels) and grows through training; these bounds hold with room on an H200
COMPILE_STEP_LOSS_ATOL = 0.05
COMPILE_FINAL_EVAL_RTOL = 0.01


def _train(run_dir, *extra, timeout=600):
    return run_cli([f"run.dir={run_dir}", *GPU_RUN, *extra], timeout=timeout)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in _records(run_dir) if "loss" in r}


def _final_eval(run_dir):
    return [r["eval_loss"] for r in _records(run_dir) if "eval_loss" in r][-1]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# the tests that read one run go to one pytest-xdist worker (``-n 4 --dist loadgroup``)
SHARED_RUN = pytest.mark.xdist_group("derf_muon_run")
DERF_MUON = ["model.norm=derf", "optim.name=muon", "train.deterministic=true"]


@pytest.fixture(scope="module")
def derf_muon_run(tmp_path_factory):
    """16 deterministic steps of Derf + Muon with checkpoints at 8 and 16."""
    run_dir = tmp_path_factory.mktemp("gpu") / "derf-muon"
    _ok(_train(run_dir, *DERF_MUON, "checkpoint.interval=8"))
    return run_dir


@SHARED_RUN
def test_bf16_training_learns_checkpoints_and_logs_memory(derf_muon_run):
    header = (derf_muon_run / "config.yaml").read_text()
    assert "deterministic: true" in header
    losses = _losses(derf_muon_run)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16][0] < losses[1][0] - 0.4, losses  # 10.400 -> 9.598 on an H200
    record = [r for r in _records(derf_muon_run) if "loss" in r][-1]
    assert 0 < record["mem_peak_allocated_gib"] <= record["mem_peak_reserved_gib"]
    assert 0 < record["optimizer_share"] < 1 and record["mfu"] > 0 and record["mfu_with_ns"] > record["mfu"]
    for step in (8, 16):
        assert (derf_muon_run / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()


@SHARED_RUN
def test_resume_is_bit_identical_with_deterministic_kernels(derf_muon_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(derf_muon_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000016")
    proc = _train(resumed, *DERF_MUON, "checkpoint.interval=8")
    _ok(proc)
    assert "resumed from" in proc.stdout and "at step 8" in proc.stdout
    original, again = _losses(derf_muon_run), _losses(resumed)
    assert [again[s] for s in range(9, 17)] == [original[s] for s in range(9, 17)]
    assert _final_eval(resumed) == _final_eval(derf_muon_run)


@SHARED_RUN
def test_activation_checkpointing_changes_no_bit(derf_muon_run, tmp_path):
    run_dir = tmp_path / "ac"
    _ok(_train(run_dir, *DERF_MUON, "checkpoint.interval=8", "train.activation_checkpointing=block"))
    assert _losses(run_dir) == _losses(derf_muon_run)


@SHARED_RUN
def test_compiled_model_matches_eager(derf_muon_run, tmp_path):
    run_dir = tmp_path / "compiled"
    _ok(_train(run_dir, *DERF_MUON, "checkpoint.interval=8", "train.compile=true"))
    eager, compiled = _losses(derf_muon_run), _losses(run_dir)
    worst = max(abs(eager[s][0] - compiled[s][0]) for s in eager)
    assert worst < COMPILE_STEP_LOSS_ATOL, (worst, eager, compiled)
    assert _final_eval(run_dir) == pytest.approx(_final_eval(derf_muon_run), rel=COMPILE_FINAL_EVAL_RTOL)


@pytest.mark.parametrize("norm,optim", [("dyt", "normuon"), ("derf_ema", "muon"), ("rmsnorm", "adamw")])
def test_optimizers_and_norms_train_on_cuda(tmp_path, norm, optim):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, f"model.norm={norm}", f"optim.name={optim}", "train.steps=40")
    _ok(proc)
    assert "(cuda)" in proc.stdout and "dtype=bfloat16" in proc.stdout
    losses = _losses(run_dir)
    assert losses[40][0] < losses[1][0] - 0.5, losses


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_latent_attention_experts_async_checkpoints_export_and_sample(tmp_path):
    """MLA + MoE under Muon with deterministic kernels (the expert loop's index_add_,
    bincount and scatter_add_ must have deterministic CUDA paths), asynchronous checkpoints,
    then export and greedy sampling from the GPU checkpoint."""
    run_dir = tmp_path / "mla-moe"
    _ok(
        _train(
            run_dir,
            "model.attention=mla",
            "model.ffn=moe",
            "model.n_experts=4",
            "model.moe_top_k=2",
            "optim.name=muon",
            "train.steps=8",
            "checkpoint.interval=4",
            "checkpoint.async_save=true",
            "train.deterministic=true",
        )
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    assert "moe_load_entropy" in json.dumps(_records(run_dir))
    exported = _cli("export", run_dir)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run_dir / "export" / "step_00000008.safetensors").is_file()
    greedy = ["sample", run_dir, "--prompt", "To be, or not", "--max-new-tokens", "8", "--temperature", "0"]
    first, second = _cli(*greedy), _cli(*greedy)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("To be, or not") and first.stdout == second.stdout


def test_a_diverging_run_stops_with_status_3(tmp_path):
    proc = _train(tmp_path / "nan", "optim.lr=1e4", "optim.grad_clip=0", "train.steps=30")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
