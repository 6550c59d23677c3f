"""Build the normalisation layer a config names, at a given location in the network."""

from __future__ import annotations

from typing import Literal

from torch import nn

from normopt.models.derf import Derf, DerfEMA
from normopt.models.dyt import DyT
from normopt.models.presets import ModelArgs
from normopt.models.rmsnorm import RMSNorm

NORM_TYPES = (RMSNorm, DyT, Derf, DerfEMA)
Location = Literal["attn", "ffn", "final"]


def build_norm(args: ModelArgs, location: Location) -> nn.Module:
    """The ``args.norm`` layer over ``args.dim`` features, with the alpha init of ``location``."""
    alpha = {"attn": args.alpha_init_attn, "ffn": args.alpha_init_ffn,
             "final": args.alpha_init_final}[location]
    if args.norm == "rmsnorm":
        return RMSNorm(args.dim, args.norm_eps)
    if args.norm == "dyt":
        return DyT(args.dim, alpha)
    if args.norm == "derf":
        return Derf(args.dim, alpha, args.derf_shift_init)
    if args.norm == "derf_ema":
        return DerfEMA(args.dim, alpha, args.derf_shift_init,
                       args.derf_ema_momentum, args.derf_ema_blend)
    raise ValueError(f"unknown norm {args.norm!r}")
