"""What a config key changes: the role tag on each config field.

The role decides where a key may differ: between a checkpoint and the run resuming it
(:mod:`normopt.resume_policy`) and between cells of one arm (the factorial's
arms). Every section config declares each field with :func:`role`, which also carries the
key's one-line help: ``normopt config --reference`` (normopt/config_reference.py) prints the
reference of every key from these declarations, so the documentation cannot drift from them.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

ROLE = "role"
HELP = "help"
MATH = "math"  # the training math: fixed for a run's life; cells that differ are different arms
LENGTH = "length"  # how many steps a run takes: raising it continues a finished run
EVALUATION = "evaluation"  # what the validation loss is measured on; the training is the same
EXECUTION = "execution"  # how the same math is run or recorded (device, split, logs, checkpoints)
ROLES = (MATH, LENGTH, EVALUATION, EXECUTION)


def role(name: str, default: Any, help: str) -> Any:
    """A config field with ``default`` whose key has the role ``name`` (see ROLES) and the
    one-line ``help`` the configuration reference prints for it."""
    if name not in ROLES:
        raise ValueError(f"unknown key role {name!r} (roles: {', '.join(ROLES)})")
    if not help.strip() or "\n" in help:
        raise ValueError(f"a config key's help is one non-empty line, got {help!r}")
    return field(default=default, metadata={ROLE: name, HELP: help})


def role_of(f) -> str:
    """The role of a dataclass field (untagged = MATH)."""
    return f.metadata.get(ROLE, MATH)


def help_of(f) -> str:
    """The one-line help of a dataclass field ("" when it was declared without :func:`role`)."""
    return f.metadata.get(HELP, "")


def require(ok: bool, key: str, message: str) -> None:
    """Refuse a config value: a UserError naming the key (every section's checks use it)."""
    if not ok:
        from normopt.errors import UserError

        raise UserError(f"{key}: {message}")
