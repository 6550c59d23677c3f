"""A built-in heavy-tailed associative-memory corpus: ``data.path: synthetic:assoc``.

The setting of "Muon Outperforms Adam in Tail-End Associative Memory Learning" (2025) in
token form: a model must store n key -> value pairs whose keys appear with Zipf frequencies,
so a few pairs are seen constantly and most rarely (the tail).

What it generates, exactly (``data.synthetic_*`` keys):

* vocabulary: n = ``synthetic_classes`` key tokens ``k0 .. k{n-1}`` (ids 0 .. n-1), n value
  tokens ``v0 .. v{n-1}`` (ids n .. 2n-1) and an end-of-document token (id 2n, never emitted:
  normopt's data layer wants one); ``data.vocab_size`` is not used;
* the association: key k's value is ``v{perm[k]}`` for a permutation drawn once from
  ``synthetic_seed`` (a fixed random bijection, so a value's id says nothing about its key's
  frequency);
* the stream: ``synthetic_tokens`` / 2 pairs ``k, value(k)``, keys drawn i.i.d. with
  p(k) = (k + 1)^-alpha / sum_j (j + 1)^-alpha, alpha = ``synthetic_zipf`` (key 0 the most
  frequent), from a numpy PCG64 generator seeded with ``synthetic_seed``: the same options
  give the same tokens on any machine, and ``train.seed`` changes only the init and the
  batch order, never the data;
* splits: as for every corpus, the last ``data.val_fraction`` of the stream is validation.

Training windows are cut every seq_len + 1 tokens, so a window may start on a key or on a
value; either way every key inside it is followed by its value. The loss at a key position
has a floor, the entropy of the Zipf distribution (keys are independent draws); the loss at
a value position can go to 0 once the pair is stored. Of the unigram entropy of the
training tokens, about half is that floor. The token-frequency buckets of the tail-token
diagnostic put frequent keys and their values in the head buckets and rare ones in the tail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normopt.data.prepared_layout import TOKENIZER_FILE, TOKENS_FILE, write_meta
from normopt.errors import UserError

SYNTHETIC_PREFIX = "synthetic:"
SOURCES = ("assoc",)
EOS = "<|endoftext|>"


def is_synthetic(path: str) -> bool:
    return path.strip().startswith(SYNTHETIC_PREFIX)


@dataclass(frozen=True)
class AssocSpec:
    """The options of the associative-memory corpus; ``key`` names its cache folder."""

    classes: int
    zipf: float
    tokens: int
    seed: int
    val_fraction: float

    @classmethod
    def from_config(cls, data_cfg) -> AssocSpec:
        source = data_cfg.path.strip()[len(SYNTHETIC_PREFIX) :]
        if source not in SOURCES:
            raise UserError(
                f"data.path: unknown synthetic corpus {data_cfg.path.strip()!r} "
                f"(built in: {', '.join(SYNTHETIC_PREFIX + s for s in SOURCES)})"
            )
        return cls(
            data_cfg.synthetic_classes,
            float(data_cfg.synthetic_zipf),
            data_cfg.synthetic_tokens,
            data_cfg.synthetic_seed,
            data_cfg.val_fraction,
        )

    @property
    def key(self) -> str:
        return f"synthetic-assoc-c{self.classes}-z{self.zipf:g}-t{self.tokens}-s{self.seed}-val{self.val_fraction:g}"

    @property
    def vocab_size(self) -> int:
        return 2 * self.classes + 1


def zipf_probabilities(classes: int, alpha: float) -> np.ndarray:
    """p(k) = (k + 1)^-alpha / sum_j (j + 1)^-alpha for k = 0 .. classes - 1."""
    weights = np.arange(1, classes + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def value_permutation(classes: int, seed: int) -> np.ndarray:
    """perm[k]: key k's value is token id classes + perm[k]."""
    return np.random.default_rng([seed, 1]).permutation(classes)


def generate_assoc(spec: AssocSpec) -> np.ndarray:
    """The token stream (module doc): key, value, key, value, ... as uint16/uint32."""
    dtype = np.uint16 if spec.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    keys = np.random.default_rng([spec.seed, 0]).choice(
        spec.classes, size=spec.tokens // 2, p=zipf_probabilities(spec.classes, spec.zipf)
    )
    stream = np.empty(2 * len(keys), dtype=dtype)
    stream[0::2] = keys
    stream[1::2] = spec.classes + value_permutation(spec.classes, spec.seed)[keys]
    return stream


def assoc_tokenizer(classes: int):
    """A word-level tokenizer over ``k0 .. k{n-1} v0 .. v{n-1} <|endoftext|>`` (ids as in the
    module doc), so ``normopt sample`` and export read these runs like any other."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"k{i}": i for i in range(classes)}
    vocab.update({f"v{i}": classes + i for i in range(classes)})
    vocab[EOS] = 2 * classes
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer  # without a decoder, decode() joins the tokens with spaces


def build_assoc(spec: AssocSpec, out: Path, log) -> dict:
    """Write the prepared-corpus layout (tokens.bin, tokenizer.json, meta.json) into ``out``;
    returns the meta."""
    started = time.perf_counter()
    log(
        f"generating the associative-memory corpus ({spec.classes} keys, Zipf {spec.zipf:g}, "
        f"{spec.tokens:,} tokens, seed {spec.seed}) ..."
    )
    tokens = generate_assoc(spec)
    tokens.tofile(out / TOKENS_FILE)
    assoc_tokenizer(spec.classes).save(str(out / TOKENIZER_FILE))
    val_start = int(len(tokens) * (1.0 - spec.val_fraction))
    val_start -= val_start % 2  # the validation split starts on a key
    return write_meta(
        out,
        source=spec.key,
        documents=1,
        tokens=tokens,
        val_start=val_start,
        eos_id=2 * spec.classes,
        vocab_size=spec.vocab_size,
        seconds=time.perf_counter() - started,
    )
