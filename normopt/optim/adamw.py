"""AdamW (torch's): the reference optimizer, and the fallback for what Muon does not take."""

from __future__ import annotations

import torch

from normopt.optim.spec import OptimizerSpec


def build_adamw(groups: list, optim_cfg, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [g.torch_group() for g in groups], lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps
    )


ADAMW = OptimizerSpec("adamw", build_adamw, state_bytes=8)  # two float32 moments
