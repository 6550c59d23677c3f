"""What a config key changes: the role tag on each config field.

The role decides where a key may differ: between a checkpoint and the run resuming it
(:mod:`normopt.resume_policy`) and between cells of one arm (the factorial's
arms). Every section config tags its fields with :func:`role`; an untagged field is MATH.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

ROLE = "role"
MATH = "math"  # the training math: fixed for a run's life; cells that differ are different arms
LENGTH = "length"  # how many steps a run takes: raising it continues a finished run
EVALUATION = "evaluation"  # what the validation loss is measured on; the training is the same
EXECUTION = "execution"  # how the same math is run or recorded (device, split, logs, checkpoints)
ROLES = (MATH, LENGTH, EVALUATION, EXECUTION)


def role(name: str, default: Any) -> Any:
    """A config field with ``default`` whose key has the role ``name`` (see ROLES)."""
    return field(default=default, metadata={ROLE: name})


def role_of(f) -> str:
    """The role of a dataclass field (untagged = MATH)."""
    return f.metadata.get(ROLE, MATH)


def require(ok: bool, key: str, message: str) -> None:
    """Refuse a config value: a UserError naming the key (every section's checks use it)."""
    if not ok:
        from normopt.errors import UserError

        raise UserError(f"{key}: {message}")
