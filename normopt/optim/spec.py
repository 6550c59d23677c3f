"""What the optimizer registry records about each optimizer (see optim/registry.py)."""

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
