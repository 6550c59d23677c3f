"""benchmarks/gpu_check.py on a CPU: the offline preparation, and a clean refusal."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_prepared_cache_is_read_offline_after_a_move(tmp_path, monkeypatch):
    """--prepare fills a cache that, copied elsewhere (another machine's path), serves the
    check's data settings with no download and no HF datasets."""
    prepared = _run("--prepare", tmp_path / "here")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "copy" in prepared.stdout and "--cache" in prepared.stdout
    shutil.copytree(
        tmp_path / "here", tmp_path / "there", copy_function=shutil.copyfile, ignore=shutil.ignore_patterns("downloads")
    )

    import normopt.data.corpus as corpus
    import normopt.data.token_cache as token_cache
    from benchmarks.gpu_check import CONFIG_1B, data_overrides
    from normopt.config import load_config
    from normopt.data.token_cache import load_token_data, prepare_corpus

    def offline(*_):
        raise AssertionError("the prepared corpus was not found: it would be read again")

    monkeypatch.setattr(token_cache, "iter_documents", offline)
    monkeypatch.setattr(corpus.subprocess, "run", offline)
    cfg = load_config(CONFIG_1B, data_overrides(tmp_path / "there"))
    data = load_token_data(prepare_corpus(cfg.data, log=lambda *a: None))
    assert data.vocab_size == 32768 and len(data.tokens) > 1_000_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    proc = _run("--cache", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check: no CUDA device here (this check is for a GPU machine)"
