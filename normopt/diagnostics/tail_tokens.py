"""Evaluation loss split by how frequent the target token is in the training split.

Buckets hold equal shares of the training tokens: sort the vocabulary by training count,
most frequent first; a token type whose cumulative share *before* it is F goes to bucket
floor(F * n) (capped at n - 1). Bucket 0 is the head (a few very frequent types), the
last bucket the tail (many rare types, and every type never seen in training). A type is
never split, so a type holding more than 1/n of the tokens leaves the next bucket(s) empty.
Equal-mass buckets give each bucket a similar number of validation tokens, so their losses
are about equally precise (deciles of the vocabulary would leave the rare ones nearly empty).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from normopt.diagnostics.diagnostic import EVALUATION, Diagnostic
from normopt.metrics.record_fields import number_list
from normopt.run_dir import RecordKind


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 26) -> np.ndarray:
    """Occurrences of every token id in ``tokens`` (read in chunks: it may be a memmap)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[start : start + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def frequency_buckets(counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """bucket[token_id] in 0..n_buckets-1 by equal shares of training mass (module doc)."""
    counts = np.asarray(counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    share_before = (np.cumsum(counts[order]) - counts[order]) / total if total > 0 else np.zeros(len(order))
    ranked = np.minimum((share_before * n_buckets).astype(np.int64), n_buckets - 1)
    ranked[counts[order] == 0] = n_buckets - 1
    buckets = np.empty(len(counts), dtype=np.int64)
    buckets[order] = ranked
    return buckets


def bucket_sums(
    per_token_loss: torch.Tensor, bucket_ids: torch.Tensor, weights: torch.Tensor, n_buckets: int
) -> torch.Tensor:
    """(2, n) float64: per bucket, the weighted sum of losses and the weighted token count.
    ``per_token_loss`` and ``bucket_ids`` have the shape of the targets (B, T), ``weights``
    shape (B,) (0 for padding windows)."""
    w = weights.double()[:, None].expand_as(per_token_loss).flatten()
    ids = bucket_ids.flatten()
    out = torch.zeros(2, n_buckets, dtype=torch.float64, device=per_token_loss.device)
    out[0].index_add_(0, ids, per_token_loss.double().flatten() * w)
    out[1].index_add_(0, ids, w)
    return out


def bucket_losses(sums: torch.Tensor) -> tuple[list[float | None], list[float]]:
    """Mean loss per bucket (None where empty) and each bucket's share of the tokens."""
    loss, count = sums[0].tolist(), sums[1].tolist()
    total = sum(count)
    means = [l / c if c > 0 else None for l, c in zip(loss, count)]
    return means, [c / total if total > 0 else 0.0 for c in count]


class TailTokenBuckets:
    """The evaluation's split by token frequency: which bucket every token id is in (from
    the training split's counts), and the per-bucket loss sums of one evaluation."""

    def __init__(self, train_tokens: np.ndarray, vocab_size: int, n_buckets: int, device: torch.device):
        self.n_buckets = n_buckets
        counts = token_counts(train_tokens, vocab_size)
        self.bucket_of = torch.from_numpy(frequency_buckets(counts, n_buckets)).to(device)
        self.vocab_per_bucket = torch.bincount(self.bucket_of, minlength=n_buckets).tolist()

    def zeros(self) -> torch.Tensor:
        return torch.zeros(2, self.n_buckets, dtype=torch.float64, device=self.bucket_of.device)

    def sums(self, per_token_loss: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(2, n) loss sums and token counts of one micro-batch (see :func:`bucket_sums`)."""
        return bucket_sums(per_token_loss, self.bucket_of[targets], weights, self.n_buckets)

    def record(self, step: int, sums: torch.Tensor) -> dict:
        """The diagnostics record of one evaluation from its all-reduced sums."""
        means, shares = bucket_losses(sums)
        return {
            "step": step,
            "kind": RecordKind.TAIL_TOKENS,
            "bucket_loss": means,
            "bucket_token_share": shares,
            "bucket_vocab_size": self.vocab_per_bucket,
        }


# --------------------------------------------------------------------------- the diagnostic


@dataclass(frozen=True)
class TailTokens:
    """One ``tail_tokens`` record: validation loss by token-frequency bucket, ordered from the
    most frequent tokens (bucket 0, the head) to the rarest (the last bucket, the tail)."""

    step: int
    bucket_loss: tuple[float | None, ...]  # mean cross-entropy (nats) over the bucket's targets; None = empty
    bucket_token_share: tuple[float | None, ...] = ()  # the bucket's share of the target tokens
    bucket_vocab_size: tuple[int | None, ...] = ()  # vocabulary entries in the bucket


class TailTokenLoss(Diagnostic):
    """Every evaluation's loss per token-frequency bucket (``diagnostics.tail_buckets``
    buckets of the training split's token counts), with each bucket's share of the target
    tokens and its vocabulary size."""

    name = RecordKind.TAIL_TOKENS
    when = EVALUATION
    help = "evaluation loss by token-frequency bucket, head to tail"
    keys = ("tail_buckets",)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.tail_buckets > 0

    def collect(self, step: int, **inputs) -> dict | None:
        if self.run.tail is None:
            return None
        record = self.run.tail.record(step, inputs["sums"])
        return {k: v for k, v in record.items() if k not in ("step", "kind")}

    @classmethod
    def mirror(cls, record, tensorboard, histograms: bool) -> None:
        for index, loss in enumerate(record["bucket_loss"]):
            if loss is not None:
                tensorboard.add_scalar(f"diag_tail_tokens/bucket_{index}", loss, record["step"])

    @staticmethod
    def read(record: Mapping) -> TailTokens:
        sizes = record.get("bucket_vocab_size", [])
        if not isinstance(sizes, list) or any(
            s is not None and (isinstance(s, bool) or not isinstance(s, int)) for s in sizes
        ):
            raise ValueError("'bucket_vocab_size' is not a list of integers")
        return TailTokens(
            record["step"],
            number_list(record, "bucket_loss"),
            number_list(record, "bucket_token_share", False),
            tuple(sizes),
        )
