"""The optimizer registry: the optimizers a config can name (``optim.name``) and what the
rest of normopt needs to know about each (:class:`~normopt.optim.spec.OptimizerSpec`).

Everything else (config validation, parameter groups, the builder, the memory bound, the
report's ordering) asks this module, never an optimizer's name. Adding an optimizer is one
module defining its spec and one line in :data:`OPTIMIZERS`, or ``OPTIMIZERS.register`` in a
plugin (:mod:`normopt.plugins`).
"""

from __future__ import annotations

from normopt.optim.adamw import ADAMW
from normopt.optim.lion import LION
from normopt.optim.muon_family import MUON, NORMUON
from normopt.optim.spec import OptimizerSpec
from normopt.registry import Registry

# one line per optimizer; the order is the order of config messages and report columns
OPTIMIZERS: Registry[OptimizerSpec] = Registry(
    "optimizer",
    "optimizers",
    section="optim",
    check=lambda spec: None if isinstance(spec, OptimizerSpec) else "register an OptimizerSpec",
)
for _spec in (ADAMW, MUON, NORMUON, LION):
    OPTIMIZERS.register(_spec)
FALLBACK = ADAMW.name  # takes what a matrices-only optimizer leaves (embeddings, head, norms, router)
REFERENCE_OPTIMIZER = ADAMW.name  # the level reports compare the other optimizers with


def optimizer_spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS.get_entry(name)
