"""Damaged files and hostile values end in one line and exit 2 (or are skipped where a
killed writer leaves them), never a traceback."""

from __future__ import annotations

import shutil

import pytest

from normopt.config import load_config
from normopt.errors import UserError
from tests.conftest import FINISHED_RUN_ARGS, run_cli, tiny_run_args
from tests.processes import train_in_process


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _one_line_exit_2(proc, words):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return proc.returncode == 2 and words in lines[-1] and "Traceback" not in proc.stderr


def test_torn_last_metrics_line_is_skipped_on_resume(finished_run, tmp_path, tiny_corpus):
    run_dir = _copy(finished_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "train.steps=8"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"lo\n' not in (run_dir / "metrics.jsonl").read_text() + "\n"


@pytest.mark.parametrize("content, words", [("garbage", "unreadable"), ('{"tokens": 3}', "no integer step")])
def test_damaged_trainer_state(finished_run, tmp_path, tiny_corpus, content, words, capsys):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").write_text(content)
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "train.steps=8"), capsys)
    assert _one_line_exit_2(proc, words), proc.stderr[-2000:]


def test_damaged_config_inside_a_checkpoint(finished_run, tmp_path, tiny_corpus, capsys):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "checkpoints" / "step_00000006" / "config.yaml").write_text("a: [\n")
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "train.steps=8"), capsys)
    assert _one_line_exit_2(proc, "cannot read the saved config"), proc.stderr[-2000:]


def test_lower_steps_on_a_finished_run_keep_its_config(finished_run, tmp_path, tiny_corpus):
    run_dir = _copy(finished_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "train.steps=2"))
    assert proc.returncode == 0 and "run already complete" in proc.stdout
    assert (run_dir / "config.yaml").read_text() == before


def test_run_dir_that_is_a_file(tmp_path, tiny_corpus):
    (tmp_path / "file").write_text("x")
    proc = run_cli(tiny_run_args(tmp_path / "file", tiny_corpus))
    assert _one_line_exit_2(proc, "exists and is not a folder"), proc.stderr[-2000:]


def test_hostile_config_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: 3 \xff\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(UserError, match=r"train.seed: must be in \[0, 2\^64\)"):
        load_config(None, [f"train.seed={2**64}"])
    load_config(None, [f"train.seed={2**64 - 1}"])
    with pytest.raises(UserError, match="invalid regular expression"):
        load_config(None, ["optim.ns_steps_per_layer=re:[=3"])  # checked under AdamW too


def test_cache_dir_that_is_a_file(tmp_path, tiny_corpus, capsys):
    (tmp_path / "cache").write_text("x")
    proc = train_in_process(
        tiny_run_args(tmp_path / "run", tiny_corpus, f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=301"),
        capsys,
    )  # a corpus not prepared yet
    assert _one_line_exit_2(proc, "data.cache_dir: cannot create"), proc.stderr[-2000:]


def test_model_too_large_for_memory_is_refused_before_allocating(tmp_path, tiny_corpus, capsys):
    """~275B parameters: the lower bound alone exceeds any machine this runs on; refused with
    the estimate, before any weight exists and without a traceback."""
    proc = train_in_process(
        tiny_run_args(
            tmp_path / "run",
            tiny_corpus,
            "model.dim=16384",
            "model.n_layers=80",
            "model.n_heads=128",
            "model.n_kv_heads=8",
            "model.ffn_hidden=53248",
        ),
        capsys,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("normopt: error: the model does not fit: it needs at least ")
    assert "GiB are available" in line and "Traceback" not in proc.stderr


def test_memory_estimate_formula():
    from normopt.memory_budget import GIB, check_fits, estimate_memory

    est = estimate_memory(params=1_000_000, optimizer="adamw", world_size=4, micro_batch=2, seq_len=8, vocab_size=100)
    assert est.state_bytes == 1_000_000 * 16 // 4  # fp32 weight + grad + two AdamW moments, sharded
    assert est.logits_bytes == 2 * 4 * 2 * 8 * 100
    assert estimate_memory(1_000_000, "muon", 1, 1, 1, 1).state_bytes == 12_000_000
    check_fits(est, est.total_bytes, "exact fit")  # fits: no error
    with pytest.raises(UserError, match="does not fit"):
        check_fits(est, est.total_bytes - 1, "one byte short")
    check_fits(est, None, "unknown")  # unknown memory: never refuse
    assert GIB == 2**30


FULL_DISK_AT_SECOND_SAVE = """
import errno, os, sys
import torch.distributed.checkpoint as dcp
from normopt.checkpoint import manager
from normopt.cli import main

real_save, calls = dcp.save, []

def save(state, checkpoint_id):
    calls.append(checkpoint_id)
    if len(calls) < 2:
        return real_save(state, checkpoint_id=checkpoint_id)
    with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:  # a torn shard, as a full disk leaves
        f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), checkpoint_id)

manager.dcp.save = save
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_corpus):
    """The second checkpoint's write fails with ENOSPC: one line naming the cause, exit 2,
    the partial folder removed, the first checkpoint intact and resumable."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=2", "checkpoint.keep_latest_k=5")
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_AT_SECOND_SAVE, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "failed (no space left on device)" in line and "Traceback" not in proc.stderr
    assert "step_00000002 is kept" in line
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert folders == ["step_00000002"]
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr


class _RefusesOnClose:
    """An open log whose last buffered bytes the disk refuses when it is closed."""

    def __init__(self, name):
        self.name, self.closed = name, False

    def write(self, text):
        pass

    def close(self):
        import errno

        self.closed = True
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_when_the_logs_close_is_one_line(tmp_path):
    from normopt.diagnostics.collector import DiagnosticsWriter
    from normopt.errors import UserError
    from normopt.metrics.logger import MetricsLogger
    from normopt.run_dir import RunDir

    writer = DiagnosticsWriter(tmp_path / "diagnostics.jsonl", None, enabled=True, histograms=False)
    writer._file.close()
    writer._file = _RefusesOnClose(str(tmp_path / "diagnostics.jsonl"))
    with pytest.raises(
        UserError,
        match=r"^writing .*diagnostics.jsonl failed \(no space left on device\) when "
        r"closing it; the checkpoints written so far are kept$",
    ):
        writer.close()
    writer.close()  # closed once, not again

    logger = MetricsLogger(RunDir(tmp_path), enabled=True)
    logger._file.close()
    logger._file = _RefusesOnClose(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(UserError, match=r"metrics.jsonl failed \(no space left on device\) when closing it"):
        logger.close()
    assert logger._writer.file_writer is None  # TensorBoard's writer was closed all the same


@pytest.mark.parametrize(
    "size, words",
    [
        ("40k", "failed (no space left on device) at step"),  # a log or TensorBoard's file, whichever fills it
        ("400k", "failed (no space left on device); the partial checkpoint was removed"),
    ],
)
def test_a_disk_that_fills_during_a_run_ends_it_with_one_clean_line(tmp_path, tiny_corpus, size, words):
    """A real full disk (a tiny tmpfs): whatever refuses first (TensorBoard's writer thread,
    torch's zip writer, which calls a short write "unexpected pos"), the run ends with exit 2
    and one line naming the disk, on a line of its own: the progress bar is cleared first."""
    from tests.mounts import tmpfs

    with tmpfs(tmp_path / "disk", size=size) as disk:
        proc = run_cli(
            tiny_run_args(disk / "run", tiny_corpus, "checkpoint.interval=3", "diagnostics.interval=1", "train.steps=9")
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip("\n").split("\n")[-1].split("\r")
    assert last[-1].startswith("normopt: error: ") and words in last[-1], proc.stderr[-3000:]
    assert all(not part.strip() for part in last[-2:-1])  # what the bar drew last was wiped
    messages = [part for line in proc.stderr.split("\n") for part in line.split("\r") if "normopt" in part]
    assert messages == [last[-1]], proc.stderr[-3000:]
    assert "unexpected pos" not in proc.stderr and "enforce fail" not in proc.stderr
