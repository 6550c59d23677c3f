"""The norm registry: the normalisation layers a config can name, how to build one from the
``model`` config section, and the reference-model defaults that ``auto`` settings resolve to.

Everything else (parameter count, config validation, diagnostics, parameter groups, the
report's ordering) asks this module or the layer classes, never a norm's name. Adding a
norm is one :class:`~normopt.models.norm_layer.NormLayer` subclass in its own module and
one line in :data:`NORMS`, or, outside normopt, ``NORMS.register`` in a plugin
(:mod:`normopt.plugins`).

Reference defaults of the bounded norms (read from the published language-model code):

* DyT, LLaMA code (jiachenzhu/DyT, ``other_tasks/LLaMA``): y = g * tanh(alpha x), no bias;
  alpha init 0.8 / 0.2 / 0.2 for attention / FFN / final norms (its smallest published
  model, 7B; 0.6 / 0.15 at 13B, 0.2 / 0.05 at 34B and 70B); token embeddings multiplied by
  a learnable scalar initialised to sqrt(dim).
* Derf, GPT-2 code (zlab-princeton/Derf, ``language model/``): y = g * erf(alpha x + s) + b,
  bias kept; alpha init a command-line flag (its code default is 1.0; the Derf paper's
  default and the Derf x Muon study's setting is 0.5, used here); the same learnable
  sqrt(dim) embedding scale.

Normalising (unbounded) norms have no alpha and no embedding scale, and keep a bias when
they can have one: RMSNorm (Llama) has none, LayerNorm has its standard b.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from normopt.models.derf import Derf, DerfEMA
from normopt.models.dyt import DyT
from normopt.models.layernorm import LayerNorm
from normopt.models.norm_layer import Location, NormConfig, NormLayer
from normopt.models.rmsnorm import RMSNorm
from normopt.registry import Registry, component_options

# one line per norm; the order is the order of config messages and of the report's rows
NORMS: Registry[type[NormLayer]] = Registry(
    "norm",
    "norms",
    section="model",
    check=lambda cls: (
        None
        if isinstance(cls, type) and issubclass(cls, NormLayer)
        else "register a NormLayer subclass (a torch-only layer: wrapped by normopt.extend.norm_layer)"
    ),
)
for _cls in (RMSNorm, DyT, Derf, DerfEMA, LayerNorm):
    NORMS.register(_cls)

# alpha init per location and whether the layer has a bias b, for `auto` settings of the
# bounded norms (module docstring)
REFERENCE_ALPHA: dict[str, dict[str, float]] = {
    "dyt": {"attn": 0.8, "ffn": 0.2, "final": 0.2},
    "derf": {"attn": 0.5, "ffn": 0.5, "final": 0.5},
    "derf_ema": {"attn": 0.5, "ffn": 0.5, "final": 0.5},
}
REFERENCE_BIAS: dict[str, bool] = {"dyt": False, "derf": True, "derf_ema": True}


def norm_class(name: str) -> type[NormLayer]:
    """The layer class registered as ``name``."""
    return NORMS.get_entry(name)


def default_fixes() -> dict[str, str]:
    """Norm -> the norm it is a fix of (``fix_of``), the report's default fix arms."""
    return {name: cls.fix_of for name, cls in NORMS.items() if cls.fix_of is not None}


def reference_alpha(norm: str, location: Location) -> float:
    """The alpha init ``auto`` means for ``norm`` at ``location`` (0.5 for norms without one)."""
    return REFERENCE_ALPHA.get(norm, {}).get(location, 0.5)


def reference_bias(norm: str) -> bool:
    """Whether ``auto`` gives ``norm`` a bias b: as its reference code for a bounded norm,
    otherwise whenever the layer can have one."""
    return REFERENCE_BIAS.get(norm, norm_class(norm).supports_bias)


def reference_embed_scale(norm: str, dim: int) -> float | None:
    """The embedding scale ``auto`` means: sqrt(dim) for bounded norms, none otherwise."""
    return math.sqrt(dim) if norm_class(norm).bounded() else None


def resolve_norm_config(model_cfg) -> NormConfig:
    """The :class:`NormConfig` of a ``model`` config section, ``auto`` resolved for its norm.

    The one place the flat ``model.*`` norm keys (``norm``, ``norm_eps``,
    ``alpha_init_*``, ``norm_bias``, ``derf_shift_init``, ``derf_ema_*``) are read.
    """
    name = model_cfg.norm

    def alpha(location: Location) -> float:
        value = getattr(model_cfg, f"alpha_init_{location}")
        return reference_alpha(name, location) if value == "auto" else value

    return NormConfig(
        name=name,
        eps=model_cfg.norm_eps,
        alpha_init_attn=alpha("attn"),
        alpha_init_ffn=alpha("ffn"),
        alpha_init_final=alpha("final"),
        shift_init=model_cfg.derf_shift_init,
        ema_momentum=model_cfg.derf_ema_momentum,
        ema_blend=model_cfg.derf_ema_blend,
        bias=reference_bias(name) if model_cfg.norm_bias == "auto" else model_cfg.norm_bias,
        options=norm_options(model_cfg, name),
    )


def norm_options(model_cfg, name: str) -> tuple[tuple[str, Any], ...]:
    """The norm's own keys (its class's ``config``; normopt/registry.py) as (field, value) pairs."""
    options = component_options(model_cfg, name) if NORMS[name].config is not None else None
    return () if options is None else tuple(dataclasses.asdict(options).items())


def build_norm(cfg: NormConfig, dim: int, location: Location) -> NormLayer:
    """The ``cfg.name`` layer over ``dim`` features, with the alpha init of ``location``."""
    return norm_class(cfg.name).from_config(dim, cfg, location)


def norm_param_count(cfg: NormConfig, dim: int) -> int:
    """Learnable parameters of one ``cfg.name`` layer over ``dim`` features."""
    return norm_class(cfg.name).param_count(dim, cfg)
