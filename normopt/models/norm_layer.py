"""What every normalisation layer is: the settings it is built from (:class:`NormConfig`) and
the interface the rest of normopt uses instead of naming norms (:class:`NormLayer`).

A norm is one class deriving from :class:`NormLayer` plus one line in the registry
(:mod:`normopt.models.norms`). The class says, in one place, everything other parts ask
about it: its config name, how to build it from a :class:`NormConfig`, how many parameters
it has, whether it is bounded (and so gets the reference alpha and embedding scale when a
setting is ``auto``), and what the diagnostics measure on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Location = Literal["attn", "ffn", "final"]


@dataclass(frozen=True)
class NormConfig:
    """The resolved norm settings of a model (no ``auto`` left; see
    :func:`normopt.models.norms.resolve_norm_config`, the one place the ``model.*`` config
    keys are read into it). Each layer reads the fields that apply to it."""

    name: str = "rmsnorm"  # the registry name (``model.norm``)
    eps: float = 1e-5  # normalising layers: added to the variance (``model.norm_eps``)
    alpha_init_attn: float = 0.5  # bounded layers: alpha init per location (``model.alpha_init_*``)
    alpha_init_ffn: float = 0.5
    alpha_init_final: float = 0.5
    shift_init: float = 0.0  # Derf's shift s (``model.derf_shift_init``)
    ema_momentum: float = 0.99  # derf_ema's m (``model.derf_ema_momentum``)
    ema_blend: float = 0.5  # derf_ema's lambda (``model.derf_ema_blend``)
    bias: bool = True  # a per-feature bias b, for layers that can have one (``model.norm_bias``)
    # the norm's own keys (a plugin's ``config``: model.<name>_<field>), as (field, value) pairs
    options: tuple[tuple[str, Any], ...] = ()

    def alpha_init(self, location: Location) -> float:
        return {"attn": self.alpha_init_attn, "ffn": self.alpha_init_ffn, "final": self.alpha_init_final}[location]

    def option(self, field: str) -> Any:
        """The value of one of the norm's own keys (``model.<name>_<field>``)."""
        return dict(self.options)[field]


class NormLayer(nn.Module):
    """Base of every norm layer: y = g * core(x) (+ b), with per-feature g and b.

    ``core`` is the layer without its affine part (the same for every token); for a
    bounded layer it is f(z) with f a saturating function of the pre-activation z.
    """

    name: ClassVar[str]  # the registry name, as ``model.norm`` spells it
    # f in core(x) = f(z) for a bounded layer ("tanh", "erf"; the diagnostics' saturation
    # threshold is keyed by it); None for a normalising layer, whose output is not bounded
    saturating_function: ClassVar[str | None] = None
    supports_bias: ClassVar[bool] = True  # whether ``model.norm_bias`` may switch b on
    fix_of: ClassVar[str | None] = None  # the registry name of the norm this one is a fix of
    param_role: ClassVar[str] = "norm"  # its parameters' optimizer group (optim/param_groups.py)
    # its own config keys, joining the model section as model.<name>_<field> (normopt/registry.py)
    config: ClassVar[type | None] = None

    @classmethod
    def bounded(cls) -> bool:
        """Bounded layers have no statistics to undo a small input scale: ``auto`` gives
        them the reference alpha inits and a sqrt(dim) embedding scale."""
        return cls.saturating_function is not None

    @classmethod
    def from_config(cls, dim: int, cfg: NormConfig, location: Location) -> NormLayer:
        """The layer over ``dim`` features at ``location`` of the network."""
        raise NotImplementedError

    @classmethod
    def param_count(cls, dim: int, cfg: NormConfig) -> int:
        """Learnable parameters of one layer over ``dim`` features (buffers excluded)."""
        raise NotImplementedError

    def preactivation(self, x: torch.Tensor) -> torch.Tensor | None:
        """z, whose saturation the diagnostics measure (float32); None if not bounded."""
        return None

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """The output without g and b, in float32."""
        raise NotImplementedError

    def diagnostic_extras(self) -> dict[str, float]:
        """Numbers only this kind of layer has, added to its diagnostics record."""
        return {}
