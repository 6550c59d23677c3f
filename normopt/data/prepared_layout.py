"""A prepared corpus on disk: the one place that names its files and writes its meta.

    <cache>/prepared/<key>/tokens.bin       the token stream (dtype in the meta)
                          /tokenizer.json   the tokenizer it was encoded with
                          /meta.json        source, counts, split, eos id, vocabulary, unigram entropy

Text corpora (``token_cache``) and generated ones (``synthetic_assoc``) both write it here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENS_FILE = "tokens.bin"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"


def unigram_entropy(counts: np.ndarray) -> float:
    """H = -sum_i p_i ln p_i (nats) with p_i = counts_i / sum(counts)."""
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def write_meta(
    out: Path,
    *,
    source: str,
    documents: int,
    tokens: np.ndarray,
    val_start: int,
    eos_id: int,
    vocab_size: int,
    seconds: float,
) -> dict:
    """Write ``meta.json`` for the token stream ``tokens`` (the unigram entropy over its
    training split); returns the meta."""
    meta = {
        "source": source,
        "documents": documents,
        "tokens": len(tokens),
        "val_start": val_start,
        "dtype": np.dtype(tokens.dtype).name,
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "unigram_entropy_nats": unigram_entropy(np.bincount(tokens[:val_start], minlength=vocab_size)),
        "seconds": round(seconds, 2),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta
