"""Row-block teams: one matrix's Newton-Schulz split over several ranks.

With one owner per matrix, a distributed Muon step can never be faster than NS of the
largest matrix. ``optim.ns_row_blocks = P`` instead defines NS of every matrix row block
by row block: with X of shape (m, n) (wide orientation) cut into P blocks X_b of rows
(``shard_rows(m, P)``, torch.chunk style), one NS step is

    A_b  = X_b X^T                          (r_b x m)
    A    = [A_1; ...; A_P]                  (all-gather)
    X_b <- a X_b + (b A_b + c A_b A) X      (A_b A = the rows r_b of A^2)
    X    = [X_1; ...; X_P]                  (all-gather)

A team of s = min(P, ranks) ranks shares the blocks: member i computes the blocks
b = i, i + s, ... and two all-gathers per NS step give every member the whole A and X.
Each block's arithmetic (shapes, operands, kernels) is the same whichever process runs it,
so a single process that loops over the P blocks (``RowBlockTeam``) computes exactly the
bits a team of ranks computes (``GroupTeam``): distributed NS stays bit-identical to one
process for the same P. P = 1 is the plain iteration (``ns_step``). Row blocks of a
matmul need not equal the rows of the whole product bit for bit (on one CPU,
fp32 13x40 in 3 blocks does not), which is why P is part of the math, not of the layout.

Communication per NS step and member: (s - 1) / s of m^2 + m n elements received, in
the NS dtype, on top of the gather of the whole input to each member.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from normopt.parallel import collectives
from normopt.parallel.row_layout import shard_rows


class RowBlockTeam:
    """Every block computed by this process: the single-process form of a split NS."""

    def __init__(self, blocks: int):
        if blocks < 1:
            raise ValueError(f"ns_row_blocks must be >= 1, got {blocks}")
        self.blocks = blocks
        self.comm_s = 0.0  # seconds in all-gathers (none without a team of ranks)
        self.bytes_received = 0

    @property
    def mine(self) -> list[int]:
        """Indices of the blocks this process computes, ascending."""
        return list(range(self.blocks))

    def share(self, rows: int) -> float:
        """The fraction of a blocked NS step's FLOPs this process computes on a matrix with
        ``rows`` rows in NS orientation: its blocks' rows / rows (every per-block product
        is linear in the block's rows)."""
        layout = shard_rows(rows, self.blocks)
        return sum(layout[i][1] for i in self.mine) / rows if rows else 0.0

    def all_gather(self, pieces: list[torch.Tensor], layout: list[tuple[int, int]]) -> torch.Tensor:
        """The whole tensor along dim -2 from this process's blocks (here: all of them)."""
        return torch.cat(pieces, dim=-2)


class GroupTeam(RowBlockTeam):
    """Member ``member`` of a team of ``size`` ranks (process group ``group``) computing
    blocks member, member + size, ...; ``all_gather`` exchanges the blocks over ``group``."""

    def __init__(self, blocks: int, group: dist.ProcessGroup, member: int, size: int):
        super().__init__(blocks)
        self.group, self.member, self.size = group, member, size

    @property
    def mine(self) -> list[int]:
        return list(range(self.member, self.blocks, self.size))

    def all_gather(self, pieces: list[torch.Tensor], layout: list[tuple[int, int]]) -> torch.Tensor:
        """Each member's blocks are concatenated and zero-padded to the largest member's
        row count (gloo's all_gather wants equal sizes); the blocks are then put back in
        block order and concatenated. Padding rows are never read."""
        t0 = time.perf_counter()
        width = max(sum(layout[b][1] for b in range(i, self.blocks, self.size)) for i in range(self.size))
        mine = torch.cat(pieces, dim=-2)  # size <= blocks, so every member holds a block
        shape = (*mine.shape[:-2], width, mine.shape[-1])
        padded = torch.zeros(shape, dtype=mine.dtype, device=mine.device)
        padded[..., : mine.shape[-2], :] = mine
        gathered = collectives.all_gather(padded, self.group)
        ordered, offsets = [], [0] * self.size
        for b in range(self.blocks):
            i, length = b % self.size, layout[b][1]
            ordered.append(gathered[i][..., offsets[i] : offsets[i] + length, :])
            offsets[i] += length
        self.comm_s += time.perf_counter() - t0
        self.bytes_received += padded.numel() * padded.element_size() * (self.size - 1)
        return torch.cat(ordered, dim=-2)


def blocked_ns_step(X: torch.Tensor, a: float, b: float, c: float, team: RowBlockTeam) -> torch.Tensor:
    """One Newton-Schulz step on X (..., m, n) in row blocks (module docstring):

    A_b = X_b X^T;  A = gather(A_b);  X_b <- a X_b + (b A_b + c A_b A) X;  X = gather(X_b)
    """
    layout = shard_rows(X.size(-2), team.blocks)
    A = team.all_gather([X[..., s : s + n, :] @ X.mT for s, n in (layout[i] for i in team.mine)], layout)
    new_blocks = []
    for i in team.mine:
        s, n = layout[i]
        A_i = A[..., s : s + n, :]
        B_i = b * A_i + c * (A_i @ A)
        new_blocks.append(a * X[..., s : s + n, :] + B_i @ X)
    return team.all_gather(new_blocks, layout)
