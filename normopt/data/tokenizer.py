"""Tokenizers: a byte-level BPE trained on the corpus (cached), or any ``tokenizer.json``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from normopt.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# names under which common tokenizer.json files carry their end-of-document token
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) with one special
    token, the end-of-document marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"data.tokenizer: no such file {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"data.tokenizer: cannot read {path} ({str(exc).splitlines()[0]})") from None


def eos_id(tokenizer) -> int:
    for name in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise UserError(
        f"data.tokenizer: the tokenizer has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})"
    )
