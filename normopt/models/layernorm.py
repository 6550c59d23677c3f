"""LayerNorm: the classic normalising layer, y = (x - mean(x)) / sqrt(var(x) + eps) * g + b.

Unbounded like RMSNorm (its statistics undo any input scale, so ``auto`` gives it no
embedding scale and no alpha) and, unlike RMSNorm, centred and with a bias b (on under
``auto``, as in the standard layer; ``model.norm_bias=false`` drops it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normopt.models.norm_layer import Location, NormConfig, NormLayer


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, evaluated in float32 so bf16 inputs stay accurate."""
    y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


class LayerNorm(NormLayer):
    name = "layernorm"

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, dim: int, cfg: NormConfig, location: Location) -> LayerNorm:
        return cls(dim, cfg.eps, bias=cfg.bias)

    @classmethod
    def param_count(cls, dim: int, cfg: NormConfig) -> int:
        return dim + (dim if cfg.bias else 0)  # g, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"
