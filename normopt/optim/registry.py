"""The optimizer registry: the optimizers a config can name (``optim.name``) and what the
rest of normopt needs to know about each (:class:`~normopt.optim.spec.OptimizerSpec`).

Everything else (config validation, parameter groups, the builder, the memory bound, the
report's ordering) asks this module, never an optimizer's name. Adding an optimizer is one
module defining its spec and one line in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

from normopt.optim.adamw import ADAMW
from normopt.optim.lion import LION
from normopt.optim.muon_family import MUON, NORMUON
from normopt.optim.spec import OptimizerSpec

# one line per optimizer; the order is the order of config messages and report columns
OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        ADAMW,
        MUON,
        NORMUON,
        LION,
    )
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
FALLBACK = ADAMW.name  # takes what a matrices-only optimizer leaves (embeddings, head, norms, router)
REFERENCE_OPTIMIZER = ADAMW.name  # the level reports compare the other optimizers with


def optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r} (optimizers: {', '.join(OPTIMIZER_NAMES)})") from None
