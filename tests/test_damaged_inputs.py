"""Damaged files and hostile values end in one line and exit 2 (or are skipped where a
killed writer leaves them), never a traceback."""

from __future__ import annotations

import shutil

import pytest

from normopt.config import load_config
from normopt.errors import UserError
from tests.conftest import run_cli, tiny_run_args


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_corpus):
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


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
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3", "train.steps=8"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"lo\n' not in (run_dir / "metrics.jsonl").read_text() + "\n"


@pytest.mark.parametrize("content, words", [("garbage", "unreadable"), ('{"tokens": 3}', "no integer step")])
def test_damaged_trainer_state(finished_run, tmp_path, tiny_corpus, content, words):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").write_text(content)
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3", "train.steps=8"))
    assert _one_line_exit_2(proc, words), proc.stderr[-2000:]


def test_damaged_config_inside_a_checkpoint(finished_run, tmp_path, tiny_corpus):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "checkpoints" / "step_00000006" / "config.yaml").write_text("a: [\n")
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3", "train.steps=8"))
    assert _one_line_exit_2(proc, "cannot read the saved config"), proc.stderr[-2000:]


def test_lower_steps_on_a_finished_run_keep_its_config(finished_run, tmp_path, tiny_corpus):
    run_dir = _copy(finished_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, "checkpoint.interval=3", "train.steps=2"))
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
        load_config(None, [f"train.seed={2 ** 64}"])
    load_config(None, [f"train.seed={2 ** 64 - 1}"])
    with pytest.raises(UserError, match="invalid regular expression"):
        load_config(None, ["optim.ns_steps_per_layer=re:[=3"])  # checked under AdamW too


def test_cache_dir_that_is_a_file(tmp_path, tiny_corpus):
    (tmp_path / "cache").write_text("x")
    proc = run_cli(tiny_run_args(tmp_path / "run", tiny_corpus, f"data.cache_dir={tmp_path / 'cache'}",
                                 "data.vocab_size=301"))  # a corpus not prepared yet
    assert _one_line_exit_2(proc, "data.cache_dir: cannot create"), proc.stderr[-2000:]
