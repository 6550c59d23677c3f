"""Build the normalisation layer a config names, at a given location in the network, and
the reference-model defaults that ``auto`` settings resolve to.

Reference defaults (read from the published language-model code):

* DyT, LLaMA code (jiachenzhu/DyT, ``other_tasks/LLaMA``): y = g * tanh(alpha x), no bias;
  alpha init 0.8 / 0.2 / 0.2 for attention / FFN / final norms (its smallest published
  model, 7B; 0.6 / 0.15 at 13B, 0.2 / 0.05 at 34B and 70B); token embeddings multiplied by
  a learnable scalar initialised to sqrt(dim).
* Derf, GPT-2 code (zlab-princeton/Derf, ``language model/``): y = g * erf(alpha x + s) + b,
  bias kept; alpha init a command-line flag (its code default is 1.0; the Derf paper's
  default and the Derf x Muon study's setting is 0.5, used here); the same learnable
  sqrt(dim) embedding scale.
* RMSNorm: no alpha, no bias, no embedding scale (Llama).
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from normopt.models.derf import Derf, DerfEMA
from normopt.models.dyt import DyT
from normopt.models.rmsnorm import RMSNorm

NORM_TYPES = (RMSNorm, DyT, Derf, DerfEMA)
BOUNDED_NORMS = ("dyt", "derf", "derf_ema")
Location = Literal["attn", "ffn", "final"]

# alpha init per location and whether the layer has a bias b, for `auto` settings
REFERENCE_ALPHA: dict[str, dict[str, float]] = {
    "dyt": {"attn": 0.8, "ffn": 0.2, "final": 0.2},
    "derf": {"attn": 0.5, "ffn": 0.5, "final": 0.5},
    "derf_ema": {"attn": 0.5, "ffn": 0.5, "final": 0.5},
}
REFERENCE_BIAS: dict[str, bool] = {"rmsnorm": False, "dyt": False, "derf": True, "derf_ema": True}


def reference_alpha(norm: str, location: Location) -> float:
    """The alpha init ``auto`` means for ``norm`` at ``location`` (0.5 for norms without one)."""
    return REFERENCE_ALPHA.get(norm, {}).get(location, 0.5)


def reference_embed_scale(norm: str, dim: int) -> float | None:
    """The embedding scale ``auto`` means: sqrt(dim) for bounded norms, none for RMSNorm."""
    return math.sqrt(dim) if norm in BOUNDED_NORMS else None


def build_norm(args, location: Location) -> nn.Module:
    """The ``args.norm`` layer over ``args.dim`` features, with the alpha init of ``location``
    (``args`` is a resolved :class:`~normopt.models.presets.ModelArgs`)."""
    alpha = {"attn": args.alpha_init_attn, "ffn": args.alpha_init_ffn,
             "final": args.alpha_init_final}[location]
    if args.norm == "rmsnorm":
        return RMSNorm(args.dim, args.norm_eps)
    if args.norm == "dyt":
        return DyT(args.dim, alpha, bias=args.norm_bias)
    if args.norm == "derf":
        return Derf(args.dim, alpha, args.derf_shift_init, bias=args.norm_bias)
    if args.norm == "derf_ema":
        return DerfEMA(args.dim, alpha, args.derf_shift_init,
                       args.derf_ema_momentum, args.derf_ema_blend, bias=args.norm_bias)
    raise ValueError(f"unknown norm {args.norm!r}")
