"""The attention and feed-forward registries: the block components a config can name
(``model.attention``, ``model.ffn``), beside the norm registry (models/norms.py).

Everything else (shape defaults, parameter and FLOP counts, the memory estimate, matrix
roles, the start-up log) asks the registered class, never a component's name. Adding an
attention or a feed-forward is one module with its class (the classmethods the existing
ones have) and one line here, or ``ATTENTIONS.register`` / ``FEED_FORWARDS.register`` in a
plugin (:mod:`normopt.plugins`).
"""

from __future__ import annotations

from normopt.models.gqa import GroupedQueryAttention
from normopt.models.mla import LatentAttention
from normopt.models.moe import MoEFeedForward
from normopt.models.sliding_window import SlidingWindowAttention
from normopt.models.swiglu import SwiGLU
from normopt.registry import Registry

ATTENTIONS: Registry[type] = Registry("attention", "attentions", section="model")
for _cls in (GroupedQueryAttention, LatentAttention, SlidingWindowAttention):
    ATTENTIONS.register(_cls)
FEED_FORWARDS: Registry[type] = Registry("feed-forward", "feed-forwards", section="model")
for _cls in (SwiGLU, MoEFeedForward):
    FEED_FORWARDS.register(_cls)


def attention_class(name: str) -> type:
    return ATTENTIONS.get_entry(name)


def feed_forward_class(name: str) -> type:
    return FEED_FORWARDS.get_entry(name)


def matrix_components() -> dict[str, str]:
    """Every registered block matrix type -> its component (see models/matrix_roles.py)."""
    return {
        name: component
        for cls in (*ATTENTIONS.values(), *FEED_FORWARDS.values())
        for name, component in cls.matrix_components.items()
    }
