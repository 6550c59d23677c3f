"""The ``data`` config section: where the corpus comes from and how it is tokenised."""

from __future__ import annotations

from dataclasses import dataclass

from normopt.key_roles import EXECUTION, require, role


MAX_VOCAB = 1 << 20  # 1M tokens: beyond every published LM vocabulary (256k at most)


@dataclass
class DataConfig:
    path: str = ""  # file, folder, glob or hub dataset name; empty = built-in Shakespeare
    hub_config: str = ""  # hub dataset configuration name, if the dataset has several
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False  # stream a hub dataset instead of downloading it whole
    max_tokens: int = 0  # stop reading the corpus after this many tokens (0 = all)
    tokenizer: str = ""  # a tokenizer.json; empty = train a byte-level BPE on the corpus
    vocab_size: int = 8192  # for the trained BPE
    val_fraction: float = 0.05  # tail of the token stream held out for evaluation
    # data.path synthetic:assoc (normopt/data/synthetic_assoc.py): key -> value pairs with
    # Zipf-distributed keys; the vocabulary is 2 x classes + 1 (data.vocab_size is not used)
    synthetic_classes: int = 1024
    synthetic_zipf: float = 1.0  # p(key k) proportional to (k + 1)^-zipf
    synthetic_tokens: int = 2_000_000
    synthetic_seed: int = 0  # the data's own seed: train.seed never changes the data
    cache_dir: str = role(EXECUTION, "")  # empty = $NORMOPT_CACHE or ~/.cache/normopt

    def validate(self) -> None:
        require(260 <= self.vocab_size <= MAX_VOCAB, "data.vocab_size",
                f"must be in [260, {MAX_VOCAB}] (256 bytes + specials; larger BPEs exhaust memory in training)")
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
        require(self.max_tokens >= 0, "data.max_tokens", "must be >= 0")
        require(2 <= self.synthetic_classes <= 1_000_000, "data.synthetic_classes", "must be in [2, 1000000]")
        require(self.synthetic_zipf >= 0, "data.synthetic_zipf", "must be >= 0 (0 = uniform keys)")
        require(self.synthetic_tokens >= 1000, "data.synthetic_tokens", "must be at least 1000")
        require(self.synthetic_seed >= 0, "data.synthetic_seed", "must be >= 0")
        from normopt.data.synthetic_assoc import AssocSpec, is_synthetic

        if is_synthetic(self.path):
            AssocSpec.from_config(self)  # an unknown synthetic:NAME is refused here
