"""Build the optimizers for a model from the ``optim`` config section."""

from __future__ import annotations

import torch
from torch import nn

from normopt.optim.lr_schedule import lr_factor
from normopt.optim.param_groups import ParamGroup, build_param_groups
from normopt.optim.registry import FALLBACK, optimizer_spec
from normopt.optim.spec import OptimizerSpec


class Optimizers:
    """The run's optimizers (AdamW, plus Muon/NorMuon for matrices) stepped together, each
    with its registry spec (``specs``, in the same order).

    Each torch param group remembers its peak lr as ``peak_lr``; :meth:`set_lr_factor`
    applies the schedule to all of them, and :meth:`current_lrs` reads back the rate of each
    optimizer family (what the metrics log).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], groups: list[ParamGroup], specs: list[OptimizerSpec]):
        self.optimizers = optimizers
        self.groups = groups
        self.specs = specs

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def _newton_schulz(self) -> list:
        """The optimizers that orthogonalise with Newton-Schulz (their spec says so)."""
        return [opt for opt, spec in zip(self.optimizers, self.specs) if spec.newton_schulz]

    def reporting(self, diagnostic: str) -> list:
        """The optimizers whose spec says they can feed ``diagnostic`` (e.g. "ns_spectrum")."""
        return [opt for opt, spec in zip(self.optimizers, self.specs) if diagnostic in spec.reports]

    def ns_flops_per_step(self) -> float:
        """Newton-Schulz FLOPs of one optimizer step (0 without Muon or NorMuon)."""
        return sum(opt.ns_flops_per_step() for opt in self._newton_schulz())

    def time_newton_schulz(self, timer) -> None:
        """Time every NS computation of the Muon-family optimizers with ``timer``."""
        for opt in self._newton_schulz():
            opt.ns_timer = timer

    def pop_ns_flops_computed(self) -> float:
        """NS FLOPs this process computed since the last call (its owned jobs' whole FLOPs,
        a row-block team member its share), then zero."""
        total = 0.0
        for opt in self._newton_schulz():
            total, opt.ns_flops_computed = total + opt.ns_flops_computed, 0.0
        return total

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * factor

    def current_lrs(self) -> dict[str, float]:
        """The scheduled learning rate of each optimizer family in use: ``lr`` of the groups on
        AdamW (or on the one optimizer that takes everything: AdamW, Lion), ``lr_matrix`` of the
        matrices on a matrices-only optimizer (Muon, NorMuon: ``optim.muon_lr``), when it has any."""
        family = {g.role: "lr_matrix" if optimizer_spec(g.optimizer).matrices_only else "lr" for g in self.groups}
        rates: dict[str, float] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                rates.setdefault(family[group["role"]], float(group["lr"]))
        return {key: rates[key] for key in ("lr", "lr_matrix") if key in rates}

    def apply_schedule(self, optim_cfg, step: int, total_steps: int) -> float:
        factor = lr_factor(optim_cfg, step, total_steps)
        self.set_lr_factor(factor)
        return factor


def build_optimizers(model: nn.Module, optim_cfg, device_type: str = "cpu") -> Optimizers:
    """One optimizer per registry name among the model's param groups (the fallback's
    first), each built by its registry entry. Build after ``fully_shard``."""
    groups = build_param_groups(model, optim_cfg)
    by_name: dict[str, list[ParamGroup]] = {}
    for group in sorted(groups, key=lambda g: g.optimizer != FALLBACK):  # stable: the fallback first
        by_name.setdefault(group.optimizer, []).append(group)
    specs = [optimizer_spec(name) for name in by_name]
    optimizers = [spec.build(named, optim_cfg, device_type) for spec, named in zip(specs, by_name.values())]
    return Optimizers(optimizers, groups, specs)
