"""launch/slurm.sbatch without SLURM: argument handling (dry run) and the
signal -> checkpoint -> requeue path, with srun and scontrol replaced by local shims."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT, tiny_run_args
from tests.torchrun import free_port

SCRIPT = REPO_ROOT / "launch" / "slurm.sbatch"
SHIMS = REPO_ROOT / "tests" / "shims"


def _env(**extra):
    return {**os.environ, "NORMOPT_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO_ROOT), **extra}


def test_dry_run_prints_the_multi_node_launch():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--config", "configs/demo.yaml", "model.norm=derf", "train.global_batch_size=64"],
        capture_output=True, text=True, timeout=120,
        env=_env(NORMOPT_DRY_RUN="1", SLURM_JOB_ID="777", SLURM_NNODES="4", NORMOPT_GPUS_PER_NODE="8",
                 NORMOPT_RDZV_HOST="node001"),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run.dir: runs/demo-derf-adamw" in out
    for piece in ["normopt.cli launch --nproc 8 --nnodes 4 --master-addr node001 --master-port 20777 "
                  "--config configs/demo.yaml model.norm=derf train.global_batch_size=64",
                  "scontrol requeue 777"]:
        assert piece in out, piece


def test_batch_that_the_job_cannot_split_is_refused_before_launch():
    """The config is checked for the job's real rank count (4 nodes x 8 GPUs = 32 ranks)."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--config", "configs/demo.yaml"], capture_output=True, text=True, timeout=120,
        env=_env(NORMOPT_DRY_RUN="1", SLURM_JOB_ID="777", SLURM_NNODES="4", NORMOPT_GPUS_PER_NODE="8"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("normopt: error: train.global_batch_size: 16 sequences cannot be "
                                          "split evenly over 32 ranks")


def test_bad_config_is_refused_before_launch():
    proc = subprocess.run(["bash", str(SCRIPT), "optim.lr=-1"], capture_output=True, text=True,
                          timeout=120, env=_env(NORMOPT_DRY_RUN="1"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "normopt: error: optim.lr: must be in (0, 1e+06]"


def test_usr1_checkpoints_then_requeues(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    log = tmp_path / "scontrol.log"
    args = tiny_run_args(run_dir, tiny_corpus, "train.steps=400", "train.eval_interval=0",
                         "checkpoint.interval=0", "train.dtype=float32")
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(NORMOPT_SRUN=str(SHIMS / "srun"), NORMOPT_SCONTROL=str(SHIMS / "scontrol"),
                 SCONTROL_LOG=str(log), SLURM_JOB_ID="4242", NORMOPT_GPUS_PER_NODE="2",
                 NORMOPT_RDZV_HOST="127.0.0.1", NORMOPT_RDZV_PORT=str(free_port()), OMP_NUM_THREADS="1"),
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"step": 3' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert log.read_text().strip() == "requeue 4242"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    stopped_at = max(steps)
    assert 3 <= stopped_at < 400
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").exists()
    assert "stopped by SIGUSR1" in stderr
