"""Deterministic global batches, split across data-parallel ranks.

Optimizer step ``s`` consumes the global batch of sequence positions
[s * B, (s + 1) * B) in a stream made of seeded permutations of the training sequences, one
permutation per epoch. Rank r of W takes the contiguous r-th 1/W of that batch and cuts it
into micro-batches. The global batch depends only on (seed, step), never on W, so the same
config gives the same math on any number of ranks, ranks never read the same sequence in a
step, and resuming at step s needs nothing but s.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

from normopt.data.token_cache import TokenData


@lru_cache(maxsize=4)
def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The order of training sequences in ``epoch``: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)


def global_batch_indices(step: int, global_batch_size: int, num_sequences: int, seed: int) -> np.ndarray:
    """Training-sequence indices of the global batch of optimizer step ``step`` (0-based)."""
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_sequences)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_permutation(num_sequences, seed, int(epoch))[offsets[mask]]
    return out


def rank_share(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous r-th 1/W of a batch (its length must divide by W)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


def to_inputs_targets(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> (inputs, next-token targets), each (batch, seq_len)."""
    t = torch.from_numpy(windows).to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


class TrainBatches:
    """This rank's micro-batches for any optimizer step."""

    def __init__(
        self,
        data: TokenData,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
    ):
        self.data, self.seq_len = data, seq_len
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.num_sequences = data.num_sequences(seq_len, "train")

    def rank_indices(self, step: int) -> np.ndarray:
        batch = global_batch_indices(step, self.global_batch_size, self.num_sequences, self.seed)
        return rank_share(batch, self.rank, self.world_size)

    def micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.rank_indices(step)
        for start in range(0, len(mine), self.micro_batch_size):
            windows = self.data.sequences(mine[start : start + self.micro_batch_size], self.seq_len, "train")
            yield to_inputs_targets(windows, self.device)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.num_sequences


def eval_micro_batches(
    data: TokenData,
    seq_len: int,
    num_sequences: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first ``num_sequences`` validation windows (0 = all), dealt round-robin to ranks.

    Yields (inputs, targets, weights). Every rank yields the same number of micro-batches,
    because sharded forward passes are collective; slots beyond a rank's share repeat
    window 0 with weight 0.
    """
    available = data.num_sequences(seq_len, "val")
    count = available if num_sequences == 0 else min(num_sequences, available)
    mine = np.arange(count)[rank::world_size]
    slots = -(-count // world_size)
    slots = -(-slots // micro_batch_size) * micro_batch_size
    indices = np.zeros(slots, dtype=np.int64)
    indices[: len(mine)] = mine
    weights = np.zeros(slots, dtype=np.float32)
    weights[: len(mine)] = 1.0
    for start in range(0, slots, micro_batch_size):
        windows = data.sequences(indices[start : start + micro_batch_size], seq_len, "val")
        inputs, targets = to_inputs_targets(windows, device)
        yield inputs, targets, torch.from_numpy(weights[start : start + micro_batch_size]).to(device)
