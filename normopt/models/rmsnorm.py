"""RMSNorm: the normalising baseline."""

from __future__ import annotations

import torch
from torch import nn

from normopt.models.norm_layer import Location, NormConfig, NormLayer


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * g, reduced over the last dim in float32."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class RMSNorm(NormLayer):
    """x / rms(x) * g: unbounded, no bias (Llama)."""

    name = "rmsnorm"
    supports_bias = False

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def from_config(cls, dim: int, cfg: NormConfig, location: Location) -> RMSNorm:
        return cls(dim, cfg.eps)

    @classmethod
    def param_count(cls, dim: int, cfg: NormConfig) -> int:
        return dim  # gain g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
