"""What the optimizer registry records about each optimizer (see optim/registry.py): all the
builder, the parameter groups, the memory bound and the diagnostics ask of an optimizer,
so that none of them names one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    # (param groups it takes, the optim config section, device type) -> a torch optimizer
    build: Callable[[list, Any, str], Any]
    state_bytes: int  # optimizer state per parameter it updates (the memory lower bound)
    matrices_only: bool = False  # takes the block matrices only; the rest goes to the fallback (AdamW)
    # orthogonalises with Newton-Schulz and answers for its cost: ``ns_flops_per_step()``, the
    # FLOPs ``ns_flops_computed`` since last read (then zeroed by the reader), an ``ns_timer``
    # it times each NS computation with (optim/muon.py)
    newton_schulz: bool = False
    # the diagnostics it can feed (diagnostics/registry.py): "ns_spectrum" needs ``ns_input(p)``,
    # the matrix NS last received, and ``momentum_buffer(p)``
    reports: tuple[str, ...] = ()
    # its own config keys: a dataclass of role() fields, joining the optim section as
    # optim.<name>_<field> (normopt/registry.py; read them with component_options)
    config: type | None = None
