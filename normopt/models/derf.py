"""Dynamic erf (Derf, arXiv 2512.10938) and normopt's EMA-blend fix (``derf_ema``).

Derf is bounded like DyT but saturates faster (erf approaches +-1 sooner than tanh), which
makes it sensitive to the growth of activations: large inputs are compressed (saturation)
and their magnitude is discarded (scale blindness).

``derf_ema`` reintroduces a running estimate of the input scale. With x the layer input,
r a running mean of E[x^2] and lambda the blend weight:

    r_t = m * r_{t-1} + (1 - m) * mean_over_global_batch(x^2)     (once per optimizer step)
    c   = (1 - lambda) + lambda * sqrt(r)
    y   = g * erf(alpha * x / c + s) + b

r starts at 1, so a fresh layer is exactly Derf; as activations grow, c grows with them and
large inputs are rescaled before erf saturates, while per-token magnitude differences (a
token twice as large gives twice the argument) survive because c is shared by all tokens.
r is a buffer: saved with the model, and updated from statistics averaged over every
data-parallel rank and micro-batch of the step, so it is identical on every rank and the
same for any number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def derf(x: torch.Tensor, alpha: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
         bias: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """y = g * erf(alpha * x / scale + s) + b, evaluated in float32."""
    arg = alpha.float() * (x.float() / scale) + shift.float()
    return (torch.erf(arg) * weight.float() + bias.float()).to(x.dtype)


def blended_scale(running_mean_square: torch.Tensor, blend: float) -> torch.Tensor:
    """c = (1 - lambda) + lambda * sqrt(r)."""
    return (1.0 - blend) + blend * running_mean_square.sqrt()


def ema_update(running: torch.Tensor, observed: torch.Tensor, momentum: float) -> torch.Tensor:
    """r <- m * r + (1 - m) * observed."""
    return running * momentum + observed * (1.0 - momentum)


class Derf(nn.Module):
    """g * erf(a x + s) + b with learnable scalars a, s (shape (1,)) and per-feature g, b."""

    def __init__(self, dim: int, alpha_init: float = 0.5, shift_init: float = 0.0):
        super().__init__()
        self.alpha_init, self.shift_init = alpha_init, shift_init
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.shift = nn.Parameter(torch.full((1,), shift_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return derf(x, self.alpha, self.shift, self.weight, self.bias)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.constant_(self.shift, self.shift_init)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}, shift_init={self.shift_init}"


class DerfEMA(Derf):
    """Derf whose argument is divided by a blended running input scale (see module doc).

    In training mode each forward adds E[x^2] of its micro-batch to a pending sum; the
    trainer folds the pending statistics into ``running_mean_square`` once per optimizer
    step with :func:`commit_running_scales`, which averages them over all ranks.
    """

    def __init__(self, dim: int, alpha_init: float = 0.5, shift_init: float = 0.0,
                 momentum: float = 0.99, blend: float = 0.5):
        super().__init__(dim, alpha_init, shift_init)
        self.momentum, self.blend = momentum, blend
        self.register_buffer("running_mean_square", torch.ones(1))
        self.register_buffer("pending_sum", torch.zeros(1), persistent=False)
        self.register_buffer("pending_count", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.pending_sum += x.detach().float().pow(2).mean()
                self.pending_count += 1
        scale = blended_scale(self.running_mean_square, self.blend)
        return derf(x, self.alpha, self.shift, self.weight, self.bias, scale)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.running_mean_square.fill_(1.0)
        self.pending_sum.zero_()
        self.pending_count.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, blend={self.blend}"


@torch.no_grad()
def commit_running_scales(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Fold every DerfEMA layer's pending E[x^2] into its running estimate.

    One all-reduce carries all layers' statistics, so the buffers stay identical on every
    rank. Call it once per optimizer step, on every rank.
    """
    layers = [m for m in model.modules() if isinstance(m, DerfEMA)]
    if not layers:
        return
    stats = torch.cat([torch.cat([m.pending_sum, m.pending_count]) for m in layers]).view(-1, 2)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    for layer, (total, count) in zip(layers, stats):
        if count > 0:
            layer.running_mean_square.copy_(
                ema_update(layer.running_mean_square, total / count, layer.momentum)
            )
        layer.pending_sum.zero_()
        layer.pending_count.zero_()
