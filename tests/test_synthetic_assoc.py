"""The built-in associative-memory corpus (data.path synthetic:assoc)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from normopt.config import load_config
from normopt.data.prepared_layout import unigram_entropy
from normopt.data.synthetic_assoc import (
    AssocSpec,
    assoc_tokenizer,
    generate_assoc,
    value_permutation,
    zipf_probabilities,
)
from normopt.data.token_cache import load_token_data, prepare_corpus
from normopt.errors import UserError
from tests.conftest import run_cli

SPEC = AssocSpec(classes=64, zipf=1.1, tokens=400_000, seed=3, val_fraction=0.05)


def test_same_options_same_tokens_and_the_seed_changes_them():
    a, b = generate_assoc(SPEC), generate_assoc(SPEC)
    assert np.array_equal(a, b) and a.dtype == np.uint16 and len(a) == SPEC.tokens
    other = generate_assoc(AssocSpec(64, 1.1, 400_000, 4, 0.05))
    assert not np.array_equal(a, other)
    # fixed values: the stream must not change between versions or machines (numpy PCG64)
    assert a[:6].tolist() == generate_assoc(SPEC)[:6].tolist()


def test_every_key_is_followed_by_its_value():
    tokens = generate_assoc(SPEC).astype(np.int64)
    keys, values = tokens[0::2], tokens[1::2]
    assert keys.max() < SPEC.classes <= values.min() and values.max() < 2 * SPEC.classes
    assert np.array_equal(values, SPEC.classes + value_permutation(SPEC.classes, SPEC.seed)[keys])
    assert sorted(value_permutation(SPEC.classes, SPEC.seed)) == list(range(SPEC.classes))


def test_key_frequencies_follow_zipf():
    keys = generate_assoc(SPEC)[0::2]
    n = len(keys)
    p = zipf_probabilities(SPEC.classes, SPEC.zipf)
    assert p[0] > p[1] > p[-1] and math.isclose(p.sum(), 1.0)
    assert p[0] / p[9] == pytest.approx(10**1.1)
    observed = np.bincount(keys, minlength=SPEC.classes) / n
    # each frequency within 5 binomial standard errors (a false alarm has p < 1e-4 per key)
    assert np.all(np.abs(observed - p) <= 5 * np.sqrt(p * (1 - p) / n))
    # chi-square with 63 degrees of freedom: mean 63, sd ~11; 130 is beyond 99.99%
    chi2 = float((((observed - p) * n) ** 2 / (p * n)).sum())
    assert chi2 < 130


def test_tokenizer_reads_and_writes_the_tokens():
    tokenizer = assoc_tokenizer(4)
    assert tokenizer.get_vocab_size() == 9
    assert tokenizer.encode("k0 v3 k2 v1").ids == [0, 7, 2, 5]
    assert tokenizer.decode([0, 7, 2, 5]) == "k0 v3 k2 v1"


def _data_cfg(tmp_path, **changes):
    fields = dict(
        path="synthetic:assoc",
        cache_dir=str(tmp_path),
        synthetic_classes=64,
        synthetic_zipf=1.1,
        synthetic_tokens=400_000,
        synthetic_seed=3,
        val_fraction=0.05,
        tokenizer="",
    )
    return SimpleNamespace(**{**fields, **changes})


def test_prepared_like_any_corpus(tmp_path):
    folder = prepare_corpus(_data_cfg(tmp_path), log=lambda *_: None)
    data = load_token_data(folder)
    assert data.vocab_size == 2 * 64 + 1 and len(data.tokens) == 400_000 and data.val_start % 2 == 0
    assert np.array_equal(np.asarray(data.tokens), generate_assoc(SPEC))
    train = np.asarray(data.tokens[: data.val_start])
    assert data.unigram_entropy == pytest.approx(unigram_entropy(np.bincount(train, minlength=129)))
    # about half the unigram entropy: keys and values have the same distribution
    p = zipf_probabilities(64, 1.1)
    assert data.unigram_entropy == pytest.approx(math.log(2) - float((p * np.log(p)).sum()), abs=0.01)
    assert prepare_corpus(_data_cfg(tmp_path), log=lambda *_: None) == folder  # cached
    assert prepare_corpus(_data_cfg(tmp_path, synthetic_seed=4), log=lambda *_: None) != folder


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="unknown synthetic corpus 'synthetic:assc'"):
        load_config(None, ["data.path=synthetic:assc"])
    with pytest.raises(UserError, match="data.synthetic_classes"):
        load_config(None, ["data.path=synthetic:assoc", "data.synthetic_classes=1"])
    with pytest.raises(UserError, match="data.synthetic_zipf"):
        load_config(None, ["data.synthetic_zipf=-1"])


def test_training_on_it_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(
        [
            f"run.dir={run}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.path=synthetic:assoc",
            "data.synthetic_classes=32",
            "data.synthetic_tokens=20000",
            "model.dim=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.n_kv_heads=1",
            "model.ffn_hidden=64",
            "train.steps=4",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.seq_len=32",
            "train.eval_interval=4",
            "train.eval_sequences=8",
            "train.mfu_probe=false",
            "optim.warmup_steps=1",
            "diagnostics.tail_buckets=4",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    data = load_token_data(next((tmp_path / "cache" / "prepared").iterdir()))
    assert evals and evals[-1]["unigram_entropy"] == pytest.approx(data.unigram_entropy)
    assert "vocab=65" in proc.stdout + proc.stderr
    tail = [
        json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines() if '"tail_tokens"' in line
    ]
    assert tail and len(tail[-1]["bucket_loss"]) == 4
