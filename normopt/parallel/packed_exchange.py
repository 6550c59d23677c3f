"""Byte-packed, uneven all_to_all: the transport under distributed Newton-Schulz.

Pieces of mixed dtypes (a bf16 momentum, an fp32 per-row statistic) are copied back to
back into one uint8 buffer, each starting at a multiple of ``ALIGN`` bytes so that a
received byte range can be reinterpreted in place as any dtype. One
``all_to_all_single`` with per-rank uneven splits then moves everything a rank sends in
one call: nothing is up-cast, padded to a common shape, or sent twice.

``post_all_to_all`` starts the collective asynchronously and returns a ``PendingExchange``;
``wait`` blocks until the bytes have arrived. Only the time spent blocked (and packing)
is counted as visible communication; a transfer that completes while the caller computes
costs nothing visible.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from normopt.parallel import collectives

ALIGN = 16


def numel_of(rows: int, trailing: tuple[int, ...]) -> int:
    """Elements of a (rows, *trailing) tensor."""
    n = rows
    for d in trailing:
        n *= d
    return n


def padded_nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes one piece occupies in a packed buffer: numel * itemsize, rounded up to ALIGN."""
    n = numel * dtype.itemsize
    return -(-n // ALIGN) * ALIGN


def pack(pieces: Sequence[torch.Tensor], total_bytes: int, device: torch.device) -> torch.Tensor:
    """Copy ``pieces`` back to back (each ALIGN-aligned) into one uint8 buffer."""
    buf = torch.empty(total_bytes, dtype=torch.uint8, device=device)
    offset = 0
    for t in pieces:
        n = t.numel() * t.element_size()
        if n:
            buf[offset : offset + n].view(t.dtype).copy_(t.reshape(-1))
        offset += padded_nbytes(t.numel(), t.dtype)
    assert offset == total_bytes, (offset, total_bytes)
    return buf


def view_piece(
    buf: torch.Tensor, offset: int, rows: int, trailing: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The piece of shape (rows, *trailing) stored at byte ``offset`` of ``buf`` (no copy)."""
    n = numel_of(rows, trailing) * dtype.itemsize
    return buf[offset : offset + n].view(dtype).view(rows, *trailing)


@dataclass
class PendingExchange:
    """An all_to_all in flight: ``recv`` is valid after ``wait``."""

    work: object | None
    send: torch.Tensor | None
    recv: torch.Tensor
    recv_splits: list[int]

    def wait(self) -> float:
        """Block until the transfer is done; returns the seconds spent blocked. Releases
        the send buffer."""
        t0 = time.perf_counter()
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.send = None
        return time.perf_counter() - t0


def post_all_to_all(
    send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, async_op: bool = True
) -> PendingExchange:
    """Start one uneven all_to_all_single on uint8 buffers (in rank order of ``group``)."""
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
    work = collectives.all_to_all_single(recv, send, recv_splits, send_splits, group=group, async_op=async_op)
    return PendingExchange(work=work if async_op else None, send=send, recv=recv, recv_splits=recv_splits)
