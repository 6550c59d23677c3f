"""``normopt factorial``: spec validation, cell expansion, skip/resume, SLURM dry run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from normopt.errors import UserError
from normopt.factorial.slurm import spec_gpus_per_node
from normopt.factorial.spec import expand_cells, load_spec
from tests.conftest import REPO_ROOT, TINY_MODEL


def _spec(tmp_path, corpus, **changes):
    spec = {
        "base": "configs/demo.yaml",
        "root": str(tmp_path / "grid"),
        "set": {
            "data.path": str(corpus),
            "data.vocab_size": 300,
            "train.steps": 4,
            "train.global_batch_size": 4,
            "train.micro_batch_size": 4,
            "train.seq_len": 32,
            "train.eval_interval": 2,
            "train.eval_sequences": 8,
            "train.mfu_probe": False,
            "optim.warmup_steps": 1,
            "checkpoint.interval": 2,
            **{item.split("=")[0]: yaml.safe_load(item.split("=")[1]) for item in TINY_MODEL},
        },
        "axes": {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw"]},
        "arms": {"alpha0.3": {"model.norm": "derf", "model.alpha_init_attn": 0.3}},
        "seeds": [0],
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cells_cross_axes_seeds_and_arms():
    spec = {
        "axes": {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"]},
        "arms": {"alpha0.3": {"model.norm": "derf", "model.alpha_init_ffn": 0.3}},
        "seeds": [0, 1],
        "set": {"train.steps": 5},
    }
    cells = expand_cells(spec)
    names = [c.name for c in cells]
    assert len(cells) == 2 * 2 * 2 + 2 * 2  # axes x seeds, arm x free axis (optim) x seeds
    assert "derf-muon-s1" in names and "alpha0.3-adamw-s0" in names
    arm = next(c for c in cells if c.name == "alpha0.3-muon-s1")
    assert arm.settings == {
        "train.steps": 5,
        "optim.name": "muon",
        "model.norm": "derf",
        "model.alpha_init_ffn": 0.3,
        "train.seed": 1,
    }
    assert arm.coords == {"optim": "muon", "norm": "derf"} and arm.arm == "alpha0.3"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"axes": {"model.normm": ["derf"]}}, "model.normm"),
        ({"axes": {"model.norm": ["batchnorm"]}}, "model.norm"),
        ({"seeds": []}, "seeds"),
        ({"extra": 1}, "unknown spec key"),
        ({"base": "configs/nope.yaml"}, "config file not found"),
        ({"root": ""}, "root must be a non-empty folder path"),
        ({"root": ["a", "b"]}, "root must be a non-empty folder path"),
        ({"root": "tests/conftest.py"}, "exists and is not a folder"),
        ({"slurm": {"gpus_per_node": 0}}, "slurm.gpus_per_node must be an integer >= 1"),
        ({"slurm": {"options": ["time=1"]}}, "slurm.options must be a list of sbatch options"),
        ({"slurm": {"partition": "gpu"}}, "slurm must be a mapping with keys"),
    ],
)
def test_spec_errors(tmp_path, tiny_corpus, change, message):
    with pytest.raises(UserError, match=message):
        load_spec(_spec(tmp_path, tiny_corpus, **change))


def _factorial(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", "factorial", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_grid_runs_skips_finished_cells_and_reports(tmp_path, tiny_corpus):
    spec = _spec(tmp_path, tiny_corpus)
    proc = _factorial(spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "grid"
    cells = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert cells == ["alpha0.3-adamw-s0", "derf-adamw-s0", "rmsnorm-adamw-s0"]
    record = json.loads((root / "alpha0.3-adamw-s0" / "cell.json").read_text())
    assert record == {
        "name": "alpha0.3-adamw-s0",
        "coords": {"optim": "adamw", "norm": "derf"},
        "seed": 0,
        "arm": "alpha0.3",
        "exit_code": 0,
    }
    assert (root / "report.md").exists() and (root / "summary.json").exists()

    # interrupt one cell: drop its final checkpoint; status says so, the rerun resumes it and skips the rest
    final = root / "derf-adamw-s0" / "checkpoints" / "step_00000004"
    shutil.rmtree(final)
    status = subprocess.run(
        [sys.executable, "-m", "normopt.cli", "status", str(root)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    states = {line.split()[1]: line.split()[2] for line in status.stdout.splitlines()[1:-1]}
    assert states == {"rmsnorm-adamw-s0": "done", "derf-adamw-s0": "preempted", "alpha0.3-adamw-s0": "done"}, (
        status.stdout
    )
    assert "stopped at step 4, last checkpoint step 2" in status.stdout
    again = _factorial(spec)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 2
    assert "resumed from" in (root / "derf-adamw-s0" / "train.log").read_text() and final.exists()
    assert "derf-adamw-s0: eval loss" in again.stdout  # one line per cell that ran
    last = again.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"\[factorial\] wall time per cell run: derf-adamw-s0 \d+s; 2 complete cell\(s\) skipped; "
        r"total \d+s \(with the report\)",
        last,
    ), last


def test_slurm_dry_run_prints_an_array_job(tmp_path, tiny_corpus):
    # (a global batch of 4 does not split over the default 8 GPUs of a node)
    proc = _factorial(_spec(tmp_path, tiny_corpus), "--slurm", "--dry-run", "--gpus-per-node=1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-2" in proc.stdout and "launch/slurm.sbatch" in proc.stdout
    assert "derf-adamw-s0" in proc.stdout and not (tmp_path / "grid").exists()
    # the array, then the report job once every task has ended, however it ended
    slurm = tmp_path / "grid" / "slurm"
    assert f"EVALUATION=$(sbatch --parsable {slurm / 'evaluation.sbatch'})  # 3 task(s)" in proc.stdout
    assert (
        f"REPORT=$(sbatch --parsable --dependency=afterany:$EVALUATION --kill-on-invalid-dep=yes "
        f"{slurm / 'report.sbatch'})"
    ) in proc.stdout
    assert f"-m normopt.cli report {tmp_path / 'grid'}" in proc.stdout


def test_slurm_job_takes_gpus_and_sbatch_options(tmp_path, tiny_corpus):
    spec = _spec(tmp_path, tiny_corpus, slurm={"gpus_per_node": 2, "options": ["--partition=gpu"]})
    proc = _factorial(spec, "--slurm", "--dry-run", "--sbatch-option=--time=04:00:00", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=2" in proc.stdout and "export NORMOPT_GPUS_PER_NODE=2" in proc.stdout
    assert "#SBATCH --partition=gpu" in proc.stdout
    slurm = tmp_path / "grid" / "slurm"
    assert f"sbatch --parsable --time=04:00:00 {slurm / 'evaluation.sbatch'}" in proc.stdout
    assert (
        f"--time=04:00:00 --dependency=afterany:$EVALUATION --kill-on-invalid-dep=yes {slurm / 'report.sbatch'}"
        in proc.stdout
    )
    # the flag overrides the spec; a global batch of 4 does not split over 3 ranks
    bad = _factorial(spec, "--slurm", "--dry-run", "--gpus-per-node", "3", timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "cannot be split evenly over 3 ranks" in bad.stderr and "cell " in bad.stderr


def test_slurm_cells_on_several_nodes(tmp_path, tiny_corpus):
    """slurm.nodes (or --nodes): each array task takes that many nodes, and the batch is checked
    for nodes x GPUs ranks."""
    spec = _spec(tmp_path, tiny_corpus, slurm={"gpus_per_node": 2, "nodes": 2})
    proc = _factorial(spec, "--slurm", "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and "#SBATCH --gpus-per-node=2" in proc.stdout
    bad = _factorial(spec, "--slurm", "--dry-run", "--nodes=3", timeout=120)  # 4 sequences over 6 ranks
    assert bad.returncode == 2 and "cannot be split evenly over 6 ranks" in bad.stderr
    wrong = _factorial(_spec(tmp_path, tiny_corpus, slurm={"nodes": 0}), "--slurm", "--dry-run", timeout=120)
    assert wrong.returncode == 2 and "slurm.nodes must be an integer >= 1, got 0" in wrong.stderr


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, tiny_corpus):
    spec = _spec(tmp_path, tiny_corpus)
    done = tmp_path / "grid" / "derf-adamw-s0" / "checkpoints"
    for step in (2, 4):
        (done / f"step_{step:08d}").mkdir(parents=True)
        (done / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    partial = tmp_path / "grid" / "rmsnorm-adamw-s0" / "checkpoints" / "step_00000002"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{}")
    proc = _factorial(spec, "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "derf-adamw-s0: complete, would skip" in proc.stdout
    assert "rmsnorm-adamw-s0: would resume from step 2 of 4" in proc.stdout
    assert "alpha0.3-adamw-s0: new, 4 steps" in proc.stdout and "model.alpha_init_attn=0.3" in proc.stdout
    assert not (tmp_path / "grid" / "alpha0.3-adamw-s0").exists()
    assert not (tmp_path / "grid" / "report.md").exists()
    # --nproc is checked against every cell's global batch before anything runs
    bad = _factorial(spec, "--dry-run", "--nproc", "3", timeout=120)
    assert bad.returncode == 2 and "cannot be split evenly over 3 ranks" in bad.stderr


def test_bad_spec_exits_2_with_one_line(tmp_path, tiny_corpus):
    proc = _factorial(_spec(tmp_path, tiny_corpus, seeds=["x"]), timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "seeds" in proc.stderr


def test_shipped_specs_are_valid():
    specs = sorted((REPO_ROOT / "configs" / "factorial").glob("*.yaml"))
    assert specs
    for path in specs:
        spec, _, cells = load_spec(path)
        assert len(cells) >= 6, path.name
        load_spec(path, spec_gpus_per_node(spec))  # every cell's batch splits over the job's GPUs
    gpus = {p.name: spec_gpus_per_node(load_spec(p)[0]) for p in specs}
    assert gpus["gpu_124m.yaml"] == 1 and gpus["paper_1b.yaml"] == 8


@pytest.mark.slow
def test_multi_rank_cells_keep_diverged_and_preempted_statuses(tmp_path, tiny_corpus):
    """Under --nproc 2 each cell runs through ``normopt launch``: a diverged cell is recorded
    with status 3 and the grid goes on; SIGTERM during the next cell stops it after a
    checkpoint, recorded as 75 (preempted), and the runner exits 75."""
    import signal
    import time

    spec = _spec(tmp_path, tiny_corpus, axes={"optim.lr": [1e4, 1e-3], "optim.name": ["adamw"]}, arms={})
    data = yaml.safe_load(spec.read_text())
    data["set"].update(
        {
            "optim.grad_clip": 0,
            "train.steps": 400,
            "train.eval_interval": 0,
            "checkpoint.interval": 0,
            "train.log_interval": 1,
        }
    )
    spec.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "normopt.cli", "factorial", str(spec), "--nproc", "2"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    root = tmp_path / "grid"
    cells = sorted(p.name for p in root.iterdir()) if root.exists() else []
    deadline = time.time() + 300
    second = None
    while time.time() < deadline and proc.poll() is None:
        records = [json.loads(p.read_text()) for p in root.glob("*/cell.json")] if root.exists() else []
        running = [r for r in records if "exit_code" not in r]
        metrics = [root / r["name"] / "metrics.jsonl" for r in running]
        if (
            any(r.get("exit_code") == 3 for r in records)
            and metrics
            and metrics[0].exists()
            and '"step": 3,' in metrics[0].read_text()
        ):
            second = running[0]["name"]
            break
        time.sleep(0.1)
    assert second is not None, (cells, proc.communicate())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 75, stderr[-3000:]
    statuses = {p.parent.name: json.loads(p.read_text()).get("exit_code") for p in root.glob("*/cell.json")}
    assert sorted(statuses.values()) == [3, 75], statuses
    assert statuses[second] == 75
