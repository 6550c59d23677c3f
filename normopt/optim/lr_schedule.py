"""Learning-rate schedules as pure functions of the step: lr(step) = peak_lr * factor(step).

A step-indexed function needs no state of its own, so resuming at step s restores it exactly.
"""

from __future__ import annotations

import math


def warmup_factor(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps during warmup, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then min + (1 - min) * (1 + cos(pi * p)) / 2 with p the post-warmup progress."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warmup, constant 1, then a linear decay to ``min_ratio``
    over the last ``decay_fraction`` of the steps."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress


def lr_factor(optim_cfg, step: int, total_steps: int) -> float:
    """The schedule named by ``optim.schedule`` at ``step`` (0-based)."""
    if optim_cfg.schedule == "constant":
        return warmup_factor(step, optim_cfg.warmup_steps)
    if optim_cfg.schedule == "wsd":
        return wsd_factor(step, total_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio, optim_cfg.decay_fraction)
    return cosine_factor(step, total_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio)
