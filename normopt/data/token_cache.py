"""Tokenise a corpus once into a flat token file, then memory-map it for training.

Layout of a prepared corpus (one folder per corpus x tokenizer under the cache dir):
``tokens.bin`` (documents' tokens, each followed by EOS, as uint16 or uint32),
``tokenizer.json`` and ``meta.json`` (counts, EOS id, unigram entropy). The validation
split is the tail ``val_fraction`` of the token stream, the training split everything
before it: the two never share a token. Folders appear only when complete (written under a
temporary name, then renamed), so an interrupted preparation is redone, never half-read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normopt.data.corpus import CorpusSpec, default_cache_dir, iter_documents, resolve_corpus
from normopt.data.prepared_layout import META_FILE, TOKENIZER_FILE, TOKENS_FILE, write_meta
from normopt.data.synthetic_assoc import AssocSpec, build_assoc, is_synthetic
from normopt.data.tokenizer import eos_id, load_tokenizer, train_bpe
from normopt.errors import UserError

ENCODE_BATCH = 512
# bytes of text per token assumed when capping tokenizer training at data.max_tokens
BYTES_PER_TOKEN_GUESS = 4


@dataclass
class TokenData:
    """A prepared corpus: the memory-mapped token stream and what is known about it."""

    tokens: np.ndarray
    val_start: int  # index of the first validation token
    eos_id: int
    vocab_size: int
    unigram_entropy: float  # nats, over the training split
    folder: Path

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / TOKENIZER_FILE

    def num_sequences(self, seq_len: int, split: str) -> int:
        """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets)."""
        span = self.val_start if split == "train" else len(self.tokens) - self.val_start
        return span // (seq_len + 1)

    def sequences(self, indices: np.ndarray, seq_len: int, split: str) -> np.ndarray:
        """Windows ``indices`` of a split as an int64 array of shape (len(indices), seq_len + 1)."""
        base = 0 if split == "train" else self.val_start
        starts = base + np.asarray(indices, dtype=np.int64) * (seq_len + 1)
        window = np.arange(seq_len + 1, dtype=np.int64)
        return self.tokens[starts[:, None] + window].astype(np.int64)


def _limited(docs: Iterator[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for doc in docs:
        yield doc
        seen += len(doc)
        if max_bytes and seen >= max_bytes:
            return


def _tokenizer_identity(data_cfg) -> str:
    if data_cfg.tokenizer:
        path = Path(data_cfg.tokenizer).expanduser()
        if not path.is_file():
            raise UserError(f"data.tokenizer: no such file {path}")
        return "file-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"bpe{data_cfg.vocab_size}"


def prepared_folder(data_cfg, spec: CorpusSpec) -> Path:
    # every key that changes the prepared files: the source, the tokenizer, the cap, the split
    key = f"{spec.fingerprint()}-{_tokenizer_identity(data_cfg)}-max{data_cfg.max_tokens}-val{data_cfg.val_fraction:g}"
    return default_cache_dir(data_cfg.cache_dir) / "prepared" / key


def prepared_tokenizer(data_cfg) -> Path | None:
    """The tokenizer.json a run with ``data_cfg`` trained with, without preparing anything:
    the configured data.tokenizer, else the one in the corpus's prepared folder (None when
    that folder is gone, e.g. a cleared cache or another machine)."""
    if data_cfg.tokenizer and not is_synthetic(data_cfg.path):
        path = Path(data_cfg.tokenizer).expanduser()
        return path if path.is_file() else None
    path = _folder_and_builder(data_cfg, print)[0] / TOKENIZER_FILE
    return path if path.is_file() else None


def _folder_and_builder(data_cfg, log):
    """The prepared folder of ``data_cfg``'s corpus and the function that fills a folder
    with it: tokenising a text corpus, or generating a synthetic one."""
    if is_synthetic(data_cfg.path):
        spec = AssocSpec.from_config(data_cfg)
        return (default_cache_dir(data_cfg.cache_dir) / "prepared" / spec.key, lambda out: build_assoc(spec, out, log))
    spec = resolve_corpus(data_cfg)
    return prepared_folder(data_cfg, spec), lambda out: _build(data_cfg, spec, out, log)


def prepare_corpus(data_cfg, log=print) -> Path:
    """Make sure the corpus named by ``data_cfg`` is tokenised; return its folder.

    Call it on one process (rank 0) while the others wait: it is idempotent and cheap when
    the folder already exists.
    """
    folder, build = _folder_and_builder(data_cfg, log)
    if (folder / META_FILE).exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:  # a cache folder that is a file, read-only, or on a full disk
        raise UserError(f"data.cache_dir: cannot create {tmp.parent} ({exc.strerror or type(exc).__name__})") from None
    try:
        build(tmp)
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build(data_cfg, spec: CorpusSpec, out: Path, log) -> None:
    started = time.perf_counter()
    max_bytes = data_cfg.max_tokens * BYTES_PER_TOKEN_GUESS
    if data_cfg.tokenizer:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    else:
        # open the source before saying anything: a missing dataset fails without a word on tokenizers
        documents = iter_documents(spec)
        first = next(documents, None)
        log(f"training a byte-level BPE tokenizer (vocab {data_cfg.vocab_size}) on the corpus ...")
        texts = itertools.chain([] if first is None else [first], documents)
        tokenizer = train_bpe(_limited(texts, max_bytes), data_cfg.vocab_size)
    eos = eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    tokenizer.save(str(out / TOKENIZER_FILE))

    log("tokenizing the corpus ...")
    total, documents = 0, 0
    with open(out / TOKENS_FILE, "wb") as f:
        batch: list[str] = []
        for doc in iter_documents(spec):
            batch.append(doc)
            if len(batch) == ENCODE_BATCH:
                total, documents = _write_batch(f, tokenizer, batch, eos, dtype, total, documents, data_cfg.max_tokens)
                batch = []
                if data_cfg.max_tokens and total >= data_cfg.max_tokens:
                    break
        if batch:
            total, documents = _write_batch(f, tokenizer, batch, eos, dtype, total, documents, data_cfg.max_tokens)
    if total == 0:
        raise UserError("the corpus is empty: no text was found in data.path")
    tokens = np.memmap(out / TOKENS_FILE, dtype=dtype, mode="r")
    meta = write_meta(
        out,
        source=spec.describe()[:2000],
        documents=documents,
        tokens=tokens,
        val_start=int(total * (1.0 - data_cfg.val_fraction)),
        eos_id=eos,
        vocab_size=vocab_size,
        seconds=time.perf_counter() - started,
    )
    log(f"prepared {total:,} tokens from {documents:,} documents in {meta['seconds']:.1f}s")


def _write_batch(f, tokenizer, batch, eos, dtype, total, documents, max_tokens):
    for encoding in tokenizer.encode_batch(batch):
        ids = np.asarray(encoding.ids + [eos], dtype=dtype)
        if max_tokens:
            ids = ids[: max(0, max_tokens - total)]
        f.write(ids.tobytes())
        total += len(ids)
        documents += 1
    return total, documents


def load_token_data(folder: Path) -> TokenData:
    meta = json.loads((folder / META_FILE).read_text())
    tokens = np.memmap(folder / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r")
    return TokenData(
        tokens=tokens,
        val_start=meta["val_start"],
        eos_id=meta["eos_id"],
        vocab_size=meta["vocab_size"],
        unigram_entropy=meta["unigram_entropy_nats"],
        folder=folder,
    )


def check_enough_data(data: TokenData, seq_len: int) -> None:
    train, val = data.num_sequences(seq_len, "train"), data.num_sequences(seq_len, "val")
    if train < 1 or val < 1:
        raise UserError(
            f"the corpus is too small: {len(data.tokens):,} tokens give {train} training and "
            f"{val} validation sequences of train.seq_len={seq_len} (need at least one of each)"
        )
