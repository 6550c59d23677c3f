"""The ``data`` config section: where the corpus comes from and how it is tokenised."""

from __future__ import annotations

from dataclasses import dataclass

from normopt.key_roles import EXECUTION, MATH, require, role

MAX_VOCAB = 1 << 20  # 1M tokens: beyond every published LM vocabulary (256k at most)


@dataclass
class DataConfig:
    """Where the corpus comes from, how it is tokenised and how much is held out."""

    path: str = role(
        MATH,
        "",
        "a file, folder, glob or hub dataset name; synthetic:assoc = the synthetic "
        "associative-recall task; empty = the built-in Shakespeare",
    )
    hub_config: str = role(MATH, "", "hub dataset configuration name, if the dataset has several")
    split: str = role(MATH, "train", "the hub dataset's split to read (local files are read whole)")
    text_column: str = role(
        MATH, "text", "the column holding the text (hub datasets and .json/.jsonl or .parquet files)"
    )
    streaming: bool = role(MATH, False, "stream a hub dataset instead of downloading it whole")
    max_tokens: int = role(MATH, 0, "stop reading the corpus after this many tokens (0 = all)")
    tokenizer: str = role(MATH, "", "a tokenizer.json; empty = train a byte-level BPE on the corpus")
    vocab_size: int = role(MATH, 8192, "vocabulary size of the trained BPE (not used with data.tokenizer)")
    val_fraction: float = role(MATH, 0.05, "tail of the token stream held out for evaluation")
    # data.path synthetic:assoc: normopt/data/synthetic_assoc.py
    synthetic_classes: int = role(
        MATH,
        1024,
        "synthetic:assoc: key -> value classes; the vocabulary is 2 x classes + 1 (data.vocab_size is not used)",
    )
    synthetic_zipf: float = role(
        MATH, 1.0, "synthetic:assoc: p(key k) proportional to (k + 1)^-zipf (0 = uniform keys)"
    )
    synthetic_tokens: int = role(MATH, 2_000_000, "synthetic:assoc: tokens in the generated stream of key, value pairs")
    synthetic_seed: int = role(MATH, 0, "synthetic:assoc: the data's own seed (train.seed never changes the data)")
    cache_dir: str = role(
        EXECUTION, "", "where prepared corpora are cached; empty = $NORMOPT_CACHE or ~/.cache/normopt"
    )

    def validate(self) -> None:
        require(
            260 <= self.vocab_size <= MAX_VOCAB,
            "data.vocab_size",
            f"must be in [260, {MAX_VOCAB}] (256 bytes + specials; larger BPEs exhaust memory in training)",
        )
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
        require(self.max_tokens >= 0, "data.max_tokens", "must be >= 0")
        require(2 <= self.synthetic_classes <= 1_000_000, "data.synthetic_classes", "must be in [2, 1000000]")
        require(self.synthetic_zipf >= 0, "data.synthetic_zipf", "must be >= 0 (0 = uniform keys)")
        require(self.synthetic_tokens >= 1000, "data.synthetic_tokens", "must be at least 1000")
        require(self.synthetic_seed >= 0, "data.synthetic_seed", "must be >= 0")
        from normopt.data.synthetic_assoc import AssocSpec, is_synthetic

        if is_synthetic(self.path):
            AssocSpec.from_config(self)  # an unknown synthetic:NAME is refused here
