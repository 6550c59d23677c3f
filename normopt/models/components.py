"""The attention and feed-forward registries: the block components a config can name
(``model.attention``, ``model.ffn``), beside the norm registry (models/norms.py).

Everything else (shape defaults, parameter and FLOP counts, the memory estimate, matrix
roles, the start-up log) asks the registered class, never a component's name. Adding an
attention or a feed-forward is one module with its class (the classmethods the existing
ones have) and one line here.
"""

from __future__ import annotations

from normopt.models.gqa import GroupedQueryAttention
from normopt.models.mla import LatentAttention
from normopt.models.moe import MoEFeedForward
from normopt.models.sliding_window import SlidingWindowAttention
from normopt.models.swiglu import SwiGLU

ATTENTIONS: dict[str, type] = {
    cls.name: cls
    for cls in (
        GroupedQueryAttention,
        LatentAttention,
        SlidingWindowAttention,
    )
}
FEED_FORWARDS: dict[str, type] = {
    cls.name: cls
    for cls in (
        SwiGLU,
        MoEFeedForward,
    )
}
ATTENTION_NAMES: tuple[str, ...] = tuple(ATTENTIONS)
FEED_FORWARD_NAMES: tuple[str, ...] = tuple(FEED_FORWARDS)


def attention_class(name: str) -> type:
    try:
        return ATTENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r} (attentions: {', '.join(ATTENTION_NAMES)})") from None


def feed_forward_class(name: str) -> type:
    try:
        return FEED_FORWARDS[name]
    except KeyError:
        raise ValueError(f"unknown feed-forward {name!r} (feed-forwards: {', '.join(FEED_FORWARD_NAMES)})") from None


def matrix_components() -> dict[str, str]:
    """Every registered block matrix type -> its component (see models/matrix_roles.py)."""
    return {
        name: component
        for cls in (*ATTENTIONS.values(), *FEED_FORWARDS.values())
        for name, component in cls.matrix_components.items()
    }
