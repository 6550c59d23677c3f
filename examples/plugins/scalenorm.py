"""ScaleNorm: one learned scalar instead of a per-feature gain.

Nguyen & Salazar, "Transformers without Tears: Improving the Normalization of
Self-Attention", IWSLT 2019 (arXiv:1910.05895), section 2.2:

    ScaleNorm(x; g) = g * x / ||x||_2

with a single learned scalar g per layer, initialised to sqrt(d) (d the width), and the
norm clamped below by a small epsilon. At initialisation it is RMSNorm with unit gain
(sqrt(d) / ||x|| = 1 / rms(x)); it trains one parameter per layer where RMSNorm trains d.

A normopt plugin: ``normopt train --plugin examples/plugins/scalenorm.py model.norm=scalenorm``.
The module imports torch alone and registers through ``normopt_plugin`` (normopt calls it
with ``normopt.extend``), so ``normopt export --format hf`` can carry it into transformers:
the export copies this file beside the generated modeling file.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ScaleNorm(nn.Module):
    """y = g x / max(||x||_2, eps), g one learned scalar (init sqrt(dim)), in float32."""

    name = "scalenorm"  # model.norm=scalenorm
    supports_bias = False  # the paper's layer has no bias

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        # shape (1,), not (): FSDP2 shards parameters along their first dimension
        self.weight = nn.Parameter(torch.full((1,), math.sqrt(dim)))

    # -- what normopt asks of a norm (normopt.extend.NormLayer) -------------------------

    @classmethod
    def from_config(cls, dim: int, cfg, location: str) -> ScaleNorm:
        return cls(dim, cfg.eps)  # model.norm_eps

    @classmethod
    def param_count(cls, dim: int, cfg) -> int:
        return 1

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """x / max(||x||, eps) in float32: the layer without its gain."""
        x = x.float()
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.core(x) * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(math.sqrt(self.dim))

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def normopt_plugin(normopt) -> None:
    normopt.NORMS.register(normopt.norm_layer(ScaleNorm))
