"""Build the optimizers for a model from the ``optim`` config section."""

from __future__ import annotations

import torch
from torch import nn

from normopt.config import resolve_dtype
from normopt.optim.lr_schedule import lr_factor
from normopt.optim.muon import Muon, NorMuon
from normopt.optim.ns_batches import resolve_ns_batch_size
from normopt.optim.ns_rules import NSStepRules, ns_steps_param_groups
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

    def ns_flops_per_step(self) -> float:
        """Newton-Schulz FLOPs of one optimizer step (0 without Muon or NorMuon)."""
        return sum(opt.ns_flops_per_step() for opt in self.optimizers if isinstance(opt, Muon))

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


def build_muon(group: ParamGroup, optim_cfg, device_type: str) -> Muon:
    """Muon or NorMuon over the matrix group, one torch param group per NS step count."""
    torch_groups = ns_steps_param_groups(
        zip(group.names, group.params), NSStepRules.parse(optim_cfg.ns_steps_per_layer),
        default_steps=optim_cfg.ns_steps,
        lr=group.lr, peak_lr=group.lr, weight_decay=group.weight_decay, role=group.role,
    )
    common = dict(
        momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
        ns_coefficients=optim_cfg.ns_coefficients, scale_rule=optim_cfg.scale_rule,
        ns_mode=optim_cfg.ns_mode, ns_dtype=resolve_dtype(optim_cfg.ns_dtype, device_type),
        ns_batch_size=resolve_ns_batch_size(optim_cfg.ns_batch_size, device_type), ns_row_blocks=optim_cfg.ns_row_blocks,
        ns_bucket_mb=optim_cfg.ns_bucket_mb, ns_overlap=optim_cfg.ns_overlap,
    )
    if group.optimizer == "normuon":
        return NorMuon(torch_groups, beta2=optim_cfg.normuon_beta2, eps=optim_cfg.normuon_eps, **common)
    return Muon(torch_groups, **common)


def build_optimizers(model: nn.Module, optim_cfg, device_type: str = "cpu") -> Optimizers:
    """AdamW for embeddings, head and norms (and matrices under ``adamw``); Muon or NorMuon
    for the matrices under ``muon`` / ``normuon``. Build after ``fully_shard``."""
    groups = build_param_groups(model, optim_cfg)
    optimizers: list[torch.optim.Optimizer] = []
    adamw_groups = [_torch_group(g) for g in groups if g.optimizer == "adamw"]
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(
            adamw_groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
        ))
    optimizers += [build_muon(g, optim_cfg, device_type) for g in groups if g.optimizer in ("muon", "normuon")]
    return Optimizers(optimizers, groups)
