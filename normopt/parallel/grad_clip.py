"""Global gradient-norm clipping that is correct for sharded (DTensor) gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate
from normopt.parallel import collectives


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g|| + 1e-6)): gradients are only ever scaled down."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """||g||_2 over all parameters and ranks.

    Sharded gradients contribute the squares of their local shards, summed over ranks with
    one all-reduce; replicated and plain gradients are counted once, not once per rank.
    """
    sharded: list[torch.Tensor] = []
    replicated: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            is_replicated = all(isinstance(pl, Replicate) for pl in g.placements)
            g = g.to_local()
            (replicated if is_replicated else sharded).append(g.detach().float().pow(2).sum())
        else:
            replicated.append(g.detach().float().pow(2).sum())
    device = (sharded + replicated)[0].device if sharded or replicated else torch.device("cpu")
    sharded_sq = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
    replicated_sq = torch.stack(replicated).sum() if replicated else torch.zeros((), device=device)
    collectives.all_reduce_sum(sharded_sq)
    return (sharded_sq + replicated_sq).sqrt()


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
