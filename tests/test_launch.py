"""launch/slurm.sbatch's argument handling and refusals (its dry run, no SLURM needed). The
signal -> checkpoint -> requeue path runs on a real SLURM in tests/test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "launch" / "slurm.sbatch"
SHIMS = REPO_ROOT / "tests" / "shims"


def _env(**extra):
    return {
        **os.environ,
        "NORMOPT_PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    }


def test_dry_run_prints_the_multi_node_launch():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--config", "configs/demo.yaml", "model.norm=derf", "train.global_batch_size=64"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(
            NORMOPT_DRY_RUN="1",
            SLURM_JOB_ID="777",
            SLURM_NNODES="4",
            NORMOPT_GPUS_PER_NODE="8",
            NORMOPT_RDZV_HOST="node001",
        ),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run.dir: runs/demo-derf-adamw" in out
    for piece in [
        "normopt.cli launch --nproc 8 --nnodes 4 --master-addr node001 --master-port 20777 "
        "--config configs/demo.yaml model.norm=derf train.global_batch_size=64",
        "scontrol requeue 777",
    ]:
        assert piece in out, piece


def test_batch_that_the_job_cannot_split_is_refused_before_launch():
    """The config is checked for the job's real rank count (4 nodes x 8 GPUs = 32 ranks)."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--config", "configs/demo.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(NORMOPT_DRY_RUN="1", SLURM_JOB_ID="777", SLURM_NNODES="4", NORMOPT_GPUS_PER_NODE="8"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(
        "normopt: error: train.global_batch_size: 16 sequences cannot be split evenly over 32 ranks"
    )


def test_bad_config_is_refused_before_launch():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "optim.lr=-1"], capture_output=True, text=True, timeout=120, env=_env(NORMOPT_DRY_RUN="1")
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "normopt: error: optim.lr: must be in (0, 1e+06]"
