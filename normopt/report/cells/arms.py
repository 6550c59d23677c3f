"""Arms: which settings, besides its coordinates, tell a cell apart from its norm's base cells.

A cell's coordinates are its norm, optimizer and seed. Its arm is the settings in which it
differs from the baseline norm's cells under the same optimizer (``assign_arms``), so a Derf
cell with ``model.alpha_init_*=0.3`` is the arm ``derf[alpha_init_attn=0.3,...]`` and the
report treats it as a variant of its own. Keys that never make an arm are the coordinates and
the keys whose role (:mod:`normopt.config`) is EXECUTION: they compute or record the same math.
That is stricter than what a resumed run may change (:mod:`normopt.resume_policy`):
cells of different ``train.steps`` (LENGTH) or measured on different validation sequences
(EVALUATION) are not comparable, so those keys do make arms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from normopt.config import keys_with_role
from normopt.key_roles import EVALUATION, EXECUTION, LENGTH, MATH
from normopt.report.cells.cell_reading import NORM_KEY, OPTIM_KEY, SEED_KEY, Cell


def _sections(keys: frozenset[str]) -> frozenset[str]:
    return frozenset(key.split(".", 1)[0] for key in keys)


# the norm x optimizer study's coordinates; a report over other axes passes its own
COORDINATE_KEYS = frozenset({NORM_KEY, OPTIM_KEY, SEED_KEY})
EXECUTION_KEYS = keys_with_role(EXECUTION)
NON_ARM_KEYS = EXECUTION_KEYS | COORDINATE_KEYS
# Sections made only of EXECUTION keys: a key of theirs that this version's schema does not
# know (a config.yaml written by another version) makes no arm either.
NON_ARM_SECTIONS = _sections(keys_with_role(EXECUTION)) - _sections(keys_with_role(MATH, LENGTH, EVALUATION))


def _arm_keys(key: str, coordinate_keys: frozenset[str] = COORDINATE_KEYS) -> bool:
    # execution keys as now registered: a loaded plugin's declared keys count by their role
    execution = keys_with_role(EXECUTION)
    return key.split(".", 1)[0] not in NON_ARM_SECTIONS and key not in execution and key not in coordinate_keys


def reference_settings(
    configs: Sequence[Mapping[str, Any]], coordinate_keys: frozenset[str] = COORDINATE_KEYS
) -> tuple[dict[str, Any], list[str]]:
    """The settings all ``configs`` agree on (arm-relevant keys only: not EXECUTION, not a
    coordinate), and the keys on which they disagree. Empty input -> ({}, [])."""
    if not configs:
        return {}, []
    shared: dict[str, Any] = {}
    disputed = []
    for key in sorted(set().union(*configs)):
        if not _arm_keys(key, coordinate_keys):
            continue
        values = [c.get(key) for c in configs]
        if all(v == values[0] for v in values):
            shared[key] = values[0]
        else:
            disputed.append(key)
    return shared, disputed


def infer_arm(config: Mapping[str, Any], reference: Mapping[str, Any]) -> str | None:
    """The arm of a cell = its settings that differ from ``reference`` (keys present in both),
    as ``"key=value,..."`` sorted by key; the section prefix is dropped unless two differing
    keys share a name. None when nothing differs."""
    diffs = {k: config[k] for k in sorted(reference) if k in config and config[k] != reference[k]}
    if not diffs:
        return None
    leaves = [k.split(".", 1)[-1] for k in diffs]
    names = leaves if len(set(leaves)) == len(leaves) else list(diffs)
    return ",".join(f"{name}={value}" for name, value in zip(names, diffs.values()))


def assign_arms(
    cells: Sequence[Cell], baseline_norm: str, coordinate_keys: frozenset[str] = COORDINATE_KEYS
) -> tuple[list[Cell], list[str]]:
    """Give every cell its arm; returns (cells, notes). ``coordinate_keys``: the keys that place
    a cell (the report's axes and the seed; default the norm x optimizer study's).

    Rule: an arm in cell.json (the key "arm", null = base cells) is taken as written. Any other
    cell with a config.yaml gets ``infer_arm(config, ref[O])`` where ref[O] holds the settings
    shared by all baseline-norm cells of its optimizer O that are base cells; the coordinates
    (model.norm, optim.name, train.seed) and the EXECUTION keys never count. So a Derf cell trained with
    model.alpha_init_*=0.3 where the baseline cells keep 0.5 is the arm
    ``derf[alpha_init_attn=0.3,alpha_init_ffn=0.3,alpha_init_final=0.3]``.
    """
    notes = []
    refs: dict[str, dict[str, Any]] = {}
    for optim in sorted({c.optim for c in cells if c.optim is not None}):
        base_configs = [
            c.config
            for c in cells
            if c.norm == baseline_norm and c.optim == optim and c.config and not (c.arm_explicit and c.arm is not None)
        ]
        refs[optim], disputed = reference_settings(base_configs, coordinate_keys)
        if disputed:
            notes.append(
                f"{baseline_norm} cells under {optim} differ in {', '.join(disputed)}: "
                f"they are pooled, and those keys define no arm"
            )
    assigned = []
    for cell in cells:
        if not cell.arm_explicit and cell.config and cell.optim in refs:
            cell = replace(cell, arm=infer_arm(cell.config, refs[cell.optim]))
        assigned.append(cell)
    return assigned, notes


def fix_base(
    variant: str, norm: str | None, arm: str | None, fixes: Mapping[str, str], baseline_norm: str
) -> str | None:
    """The norm a variant is a fix of, or None. Rule, first match wins: ``fixes[variant]``;
    ``fixes[norm]`` (an arm of a fix norm fixes the same norm); the variant's own norm when it
    is an arm. Fixes of the baseline norm are none (the baseline has no gap to recover)."""
    base = fixes.get(variant) or (fixes.get(norm) if norm is not None else None)
    if base is None and arm is not None:
        base = norm
    return None if base in (None, baseline_norm, variant) else base
