"""Global gradient-norm clipping that is correct for sharded (DTensor) gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate

from normopt.parallel import collectives
from normopt.parallel.row_shards import RowShards, row_shards_of


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g|| + 1e-6)): gradients are only ever scaled down."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """||g||_2 over all parameters and ranks.

    Sharded gradients contribute the squares of their local shards, summed with one
    all-reduce over the group their rows are split over (every rank under FSDP; one
    replica's shard group under HSDP, whose replicas hold identical shards and would
    otherwise be counted once per replica). Replicated and plain gradients are counted
    once, not once per rank.
    """
    sharded: dict[RowShards, list[torch.Tensor]] = {}
    replicated: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            is_replicated = all(isinstance(pl, Replicate) for pl in g.placements)
            square = g.to_local().detach().float().pow(2).sum()
            if is_replicated:
                replicated.append(square)
            else:
                sharded.setdefault(row_shards_of(g), []).append(square)
        else:
            replicated.append(g.detach().float().pow(2).sum())
    squares = [t for group in sharded.values() for t in group] + replicated
    device = squares[0].device if squares else torch.device("cpu")
    total = torch.stack(replicated).sum() if replicated else torch.zeros((), device=device)
    if not sharded:  # every rank still takes part in the (one) all-reduce below
        sharded[None] = []
    for shards, group in sharded.items():  # in order of first appearance: the same on every rank
        sharded_sq = torch.stack(group).sum() if group else torch.zeros((), device=device)
        collectives.all_reduce_sum(sharded_sq, shards.group() if shards is not None else None)
        total = sharded_sq + total
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients by :func:`clip_coefficient`; return the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    total = global_grad_norm(params)
    if max_norm > 0:
        coef = float(clip_coefficient(total, max_norm))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return total
