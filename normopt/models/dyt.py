"""Dynamic Tanh (DyT, arXiv 2503.10622): a bounded, statistics-free replacement for norms."""

from __future__ import annotations

import torch
from torch import nn

from normopt.models.norm_layer import Location, NormConfig, NormLayer


def dyt(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = g * tanh(alpha * x) (+ b), evaluated in float32 so bf16 inputs stay accurate."""
    y = torch.tanh(alpha.float() * x.float()) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class DyT(NormLayer):
    """g * tanh(a x) + b with a learnable scalar a (shape (1,) so FSDP can shard it) and
    per-feature g and (with ``bias``) b. DyT's LLaMA reference code has no b; its paper's
    formula and vision models keep it."""

    name = "dyt"
    saturating_function = "tanh"

    def __init__(self, dim: int, alpha_init: float = 0.5, bias: bool = True):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, dim: int, cfg: NormConfig, location: Location) -> DyT:
        return cls(dim, cfg.alpha_init(location), bias=cfg.bias)

    @classmethod
    def param_count(cls, dim: int, cfg: NormConfig) -> int:
        return dim + (dim if cfg.bias else 0) + 1  # g, b, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dyt(x, self.alpha, self.weight, self.bias)

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """z = alpha x."""
        return self.alpha.float() * x.float()

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.preactivation(x))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}, bias={self.bias is not None}"
