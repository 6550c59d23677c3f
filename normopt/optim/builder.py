"""Build the optimizers for a model from the ``optim`` config section."""

from __future__ import annotations

import torch
from torch import nn

from normopt.optim.lr_schedule import lr_factor
from normopt.optim.param_groups import ParamGroup, build_param_groups


class Optimizers:
    """The run's optimizers (AdamW, plus Muon/NorMuon for matrices) stepped together.

    Each torch param group remembers its peak lr as ``peak_lr``; :meth:`set_lr_factor`
    applies the schedule to all of them.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], groups: list[ParamGroup]):
        self.optimizers = optimizers
        self.groups = groups

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * factor

    def apply_schedule(self, optim_cfg, step: int, total_steps: int) -> float:
        factor = lr_factor(optim_cfg, step, total_steps)
        self.set_lr_factor(factor)
        return factor


def _torch_group(group: ParamGroup) -> dict:
    return {"params": group.params, "lr": group.lr, "peak_lr": group.lr,
            "weight_decay": group.weight_decay, "role": group.role}


def build_optimizers(model: nn.Module, optim_cfg) -> Optimizers:
    groups = build_param_groups(model, optim_cfg)
    adamw_groups = [_torch_group(g) for g in groups if g.optimizer == "adamw"]
    optimizers: list[torch.optim.Optimizer] = []
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(
            adamw_groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
        ))
    muon_groups = [g for g in groups if g.optimizer in ("muon", "normuon")]
    if muon_groups:
        raise NotImplementedError("muon/normuon are built by the Muon integration")
    return Optimizers(optimizers, groups)
