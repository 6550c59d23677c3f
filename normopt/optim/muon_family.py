"""Muon and NorMuon as the registry builds them: the block matrices, one torch param group
per Newton-Schulz step count and head-block layout (``optim.muon_split_heads``), the NS
settings of the ``optim`` section."""

from __future__ import annotations

from normopt.dtypes import resolve_dtype
from normopt.optim.muon import Muon, NorMuon
from normopt.optim.ns_batches import resolve_ns_batch_size
from normopt.optim.ns_rules import ns_steps_param_groups
from normopt.optim.spec import OptimizerSpec


def _by_head_blocks(group) -> list[tuple[tuple[str, int] | None, list[tuple[str, object]]]]:
    """The group's (name, param) pairs split by head-block layout (None: whole matrices), in
    order of first appearance; one part, the whole group, when nothing splits."""
    parts: dict[tuple[str, int] | None, list[tuple[str, object]]] = {}
    for name, p in zip(group.names, group.params):
        parts.setdefault(group.head_blocks.get(name), []).append((name, p))
    return list(parts.items())


def _torch_groups(groups: list, optim_cfg) -> list[dict]:
    # the head_blocks key only where a matrix splits: groups (and checkpoints) of runs
    # without per-head orthogonalisation stay what they were
    return [
        torch_group
        for g in groups
        for layout, named in _by_head_blocks(g)
        for torch_group in ns_steps_param_groups(
            named,
            optim_cfg.ns_step_rules(),
            default_steps=optim_cfg.ns_steps,
            lr=g.lr,
            peak_lr=g.lr,
            weight_decay=g.weight_decay,
            role=g.role,
            **({} if layout is None else {"head_blocks": layout}),
        )
    ]


def _ns_options(optim_cfg, device_type: str) -> dict:
    return dict(
        momentum=optim_cfg.momentum,
        nesterov=optim_cfg.nesterov,
        ns_coefficients=optim_cfg.ns_coefficients,
        ns_algorithm=optim_cfg.ns_algorithm,
        scale_rule=optim_cfg.scale_rule,
        ns_mode=optim_cfg.ns_mode,
        ns_dtype=resolve_dtype(optim_cfg.ns_dtype, device_type),
        ns_batch_size=resolve_ns_batch_size(optim_cfg.ns_batch_size, device_type),
        ns_row_blocks=optim_cfg.ns_row_blocks,
        ns_bucket_mb=optim_cfg.ns_bucket_mb,
        ns_overlap=optim_cfg.ns_overlap,
    )


def build_muon(groups: list, optim_cfg, device_type: str) -> Muon:
    return Muon(_torch_groups(groups, optim_cfg), **_ns_options(optim_cfg, device_type))


def build_normuon(groups: list, optim_cfg, device_type: str) -> NorMuon:
    return NorMuon(
        _torch_groups(groups, optim_cfg),
        beta2=optim_cfg.normuon_beta2,
        eps=optim_cfg.normuon_eps,
        **_ns_options(optim_cfg, device_type),
    )


_NS = dict(matrices_only=True, newton_schulz=True, reports=("ns_spectrum",))
MUON = OptimizerSpec("muon", build_muon, state_bytes=4, **_NS)  # one float32 momentum
NORMUON = OptimizerSpec("normuon", build_normuon, state_bytes=4, **_NS)  # + per-row second moment
