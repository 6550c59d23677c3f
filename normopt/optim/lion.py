"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675):
a sign-of-momentum optimizer with one state tensor per parameter.

    u     = sign(beta1 m + (1 - beta1) g)
    theta <- theta (1 - lr wd) - lr u
    m     <- beta2 m + (1 - beta2) g

Every element of the update has magnitude 1, so Lion's learning rate is typically 3-10x
smaller than AdamW's and its weight decay 3-10x larger (the paper's advice); ``optim.beta1``
and ``optim.beta2`` are its two betas (the paper uses 0.9 and 0.99). Under ``optim.name=lion``
Lion takes every parameter, with the same groups, learning rates and decay rules as AdamW.
The math is elementwise, so FSDP2 shards compute exactly what one process computes.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from normopt.optim.spec import OptimizerSpec


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def lion_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step of ``param`` in place (module docstring), ``momentum`` updated in place."""
    update = momentum.lerp(grad, 1.0 - beta1).sign_()
    param.mul_(1.0 - lr * weight_decay).add_(update, alpha=-lr)
    momentum.lerp_(grad, 1.0 - beta2)


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                lion_update_(
                    _local(p),
                    _local(p.grad),
                    _local(state["exp_avg"]),
                    group["lr"],
                    beta1,
                    beta2,
                    group["weight_decay"],
                )
        return loss


def build_lion(groups: list, optim_cfg, device_type: str) -> Lion:
    return Lion([g.torch_group() for g in groups], lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2))


LION = OptimizerSpec("lion", build_lion, state_bytes=4)  # one float32 momentum
