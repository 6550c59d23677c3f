"""The main family of tests the report would form for a spec, and the contrast a plan is for.

The report (:func:`normopt.report.stats.summary.build_summary`, :func:`normopt.report.stats.multiplicity.main_family`)
forms its family from the groups it finds. To get exactly that family for a spec that has not
run, :func:`family_plan` writes a skeleton of the grid into a temporary folder (each cell's
``cell.json`` as the runner writes it, and one evaluation line), reads it back with the
report's own cell reader and builds the report's summary. Its records give the members:

* with an across axis: every interaction, every factor effect, and every fix's share of the
  interaction, which the report tests (through the fix's gain, L[n,O] - L[F,O]) only when the
  interaction of the fixed norm n under O is estimated positive (a share of no penalty is not
  reported);
* without one: every gap, every factor effect, and every fix's share of the gap, tested when
  the gap of n is estimated positive.

Each member is a linear contrast of group means (its ``terms``: group -> coefficient; a share's
is its gain) with an optional ``condition`` (a share: the contrast that must be estimated > 0
for it to be in the family). A group is "variant/optim", prefixed by its stratum.

The **target** is the contrast the plan is for: an interaction (a gap without an across axis),
by default the first in the report's order whose norm some fix is meant to repair (derf x muon
in the shipped norm grids: the published penalty), else the first. The **alternative** a power
is computed under: the target group's true mean is +delta, and so is each of its norm's fixes
under the same optimizer (a fix that recovers nothing); every other group's is 0. So the
target's true value is delta, every fix's gain is 0, and every interaction of another norm is
0; members through the same groups (a factor effect that switches the target variant, a fix's
own interaction where it has reference cells) carry delta too, and the plan names them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.factorial.cells import CellSpec, write_cell_json
from normopt.report.cells.axes import ReportAxes
from normopt.report.cells.cell_reading import discover_cells
from normopt.report.stats.summary import build_summary
from normopt.run_dir import RunDir


@dataclass(frozen=True)
class Member:
    """One test of the main family: ``terms`` (group -> coefficient) of the contrast whose
    two-sided t p-value it contributes; ``condition``: a share's denominator, the member
    counts only where that contrast is estimated > 0 (empty: always)."""

    kind: str  # "interaction", "gap", "factor effect", "share"
    label: str
    terms: tuple[tuple[str, float], ...]
    condition: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class FamilyPlan:
    """The family of a spec's report and the plan's target and alternative (module docstring)."""

    groups: tuple[str, ...]  # every group of the grid
    members: tuple[Member, ...]
    target: int  # index of the planned contrast in ``members``
    shift: Mapping[str, float]  # group -> true mean per unit delta under the alternative
    single: bool  # no across axis: the family is gaps, shares of the gap, factor effects

    @property
    def target_member(self) -> Member:
        return self.members[self.target]

    def slope(self, terms: Sequence[tuple[str, float]]) -> float:
        """How much a contrast's true value moves per unit delta under the alternative."""
        return sum(c * self.shift.get(g, 0.0) for g, c in terms)

    @cached_property
    def slopes(self) -> tuple[float, ...]:
        """Each member's slope (its true value per unit delta)."""
        return tuple(self.slope(m.terms) for m in self.members)

    @cached_property
    def condition_slopes(self) -> tuple[float, ...]:
        return tuple(self.slope(m.condition) for m in self.members)

    def non_null(self) -> list[str]:
        """The members other than the target whose true value is not 0 under the alternative."""
        return [m.label for i, m in enumerate(self.members) if i != self.target and self.slope(m.terms) != 0]

    def size_range(self) -> tuple[int, int]:
        """The fewest and the most tests the family can hold (shares enter by their condition)."""
        always = sum(1 for m in self.members if not m.condition)
        return always, len(self.members)

    def to_json(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "target": self.target_member.label,
            "single": self.single,
            "members": [
                {"kind": m.kind, "label": m.label, "terms": dict(m.terms), "condition": dict(m.condition) or None}
                for m in self.members
            ],
            "size": list(self.size_range()),
            "shift": dict(self.shift),
            "non_null": self.non_null(),
        }


def _stratum_prefix(record: Mapping[str, Any]) -> str:
    """ "key=level, key=level | " of a record's stratum (a summary's mapping, or a cell record's
    label), "" without strata."""
    stratum = record.get("stratum") or ""
    if isinstance(stratum, Mapping):
        stratum = ", ".join(f"{k}={v}" for k, v in stratum.items())
    return f"{stratum} | " if stratum else ""


def group_key(record: Mapping[str, Any]) -> str:
    """The planner's name of a record's group: its stratum prefix and "variant/optim"."""
    return _stratum_prefix(record) + f"{record['variant']}/{record['optim']}"


def _terms(record: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    prefix = _stratum_prefix(record)
    return tuple((prefix + g, float(c)) for g, c in zip(record["groups"], record["coefficients"]))


def skeleton_summary(cells: Sequence[CellSpec], axes: ReportAxes) -> dict[str, Any]:
    """The report's summary of the spec's grid as if every cell had finished (one evaluation
    line each): what the report would compare, and which family it would form."""
    with tempfile.TemporaryDirectory(prefix="normopt-plan-") as tmp:
        for index, cell in enumerate(cells):
            run = RunDir(Path(tmp) / cell.name)
            write_cell_json(run, cell)
            run.metrics.write_text(json.dumps({"step": 1, "eval_loss": 1.0 + 0.001 * index}) + "\n")
        return build_summary(discover_cells(Path(tmp)), axes=axes)


def _label(kind: str, record: Mapping[str, Any]) -> str:
    prefix = _stratum_prefix(record)
    if kind == "interaction":
        return f"{prefix}interaction {record['variant']} × {record['optim']} − {record['reference_optim']}"
    if kind == "gap":
        return f"{prefix}gap {record['variant']} − {record['baseline']} under {record['optim']}"
    if kind == "factor effect":
        return f"{prefix}factor {record['factor']} under {record['optim']}"
    return (
        f"{prefix}{record['fix']}'s share of {record['base_norm']}'s "
        + ("gap" if record.get("reference_optim") is None else "interaction")
        + f" under {record['optim']}"
    )


def family_plan(summary: Mapping[str, Any], target: str | None = None) -> FamilyPlan:
    """The family of ``summary`` (a report summary: :func:`skeleton_summary`) as members, the
    target (``target`` = "variant/optim", or the default of the module docstring) and the
    alternative."""
    single = summary["settings"]["axes"]["across"] is None
    primary = "gap" if single else "interaction"
    records = {"gap": summary["gaps"], "interaction": summary["interactions"]}
    members: list[Member] = []
    owners: list[Mapping[str, Any] | None] = []  # the record behind each primary member
    for record in records[primary]:
        members.append(Member(primary, _label(primary, record), _terms(record)))
        owners.append(record)
    for record in summary["factor_effects"]:
        members.append(Member("factor effect", _label("factor effect", record), _terms(record)))
        owners.append(None)
    for record in summary["recoveries"]:
        prefix = _stratum_prefix(record)
        denominator = next(
            (
                r
                for r in records[primary]
                if r["variant"] == record["base_norm"]
                and r["optim"] == record["optim"]
                and r.get("stratum") == record.get("stratum")
            ),
            None,
        )
        if denominator is None:  # the fixed norm's own contrast is not computable: never tested
            continue
        gain = (
            (prefix + f"{record['base_norm']}/{record['optim']}", 1.0),
            (prefix + f"{record['fix']}/{record['optim']}", -1.0),
        )
        members.append(Member("share", _label("share", record), gain, _terms(denominator)))
        owners.append(None)
    primaries = [i for i, m in enumerate(members) if m.kind == primary]
    if not primaries:
        need = (
            "2 levels of the compared axis"
            if single
            else "a compared level with cells at the across axis's reference level and another"
        )
        raise UserError(f"the report of this spec has no {primary} to plan for (it needs {need})")
    fixed = {(r["base_norm"], r["optim"], repr(r.get("stratum"))): [] for r in summary["recoveries"]}
    for r in summary["recoveries"]:
        fixed[r["base_norm"], r["optim"], repr(r.get("stratum"))].append(r["fix"])
    if target is None:
        chosen = next(
            (
                i
                for i in primaries
                if (owners[i]["variant"], owners[i]["optim"], repr(owners[i].get("stratum"))) in fixed
            ),
            primaries[0],
        )
    else:
        chosen = next((i for i in primaries if f"{owners[i]['variant']}/{owners[i]['optim']}" == target), None)
        if chosen is None:
            names = ", ".join(dict.fromkeys(f"{owners[i]['variant']}/{owners[i]['optim']}" for i in primaries))
            raise UserError(
                f"--target {target}: not {'a gap' if single else 'an interaction'} of this spec's "
                f"report (those: {names})"
            )
    record = owners[chosen]
    prefix = _stratum_prefix(record)
    shift = {group_key(record): 1.0}
    for fix in fixed.get((record["variant"], record["optim"], repr(record.get("stratum"))), []):
        shift[prefix + f"{fix}/{record['optim']}"] = 1.0
    groups = tuple(group_key(g) for g in summary["groups"])
    return FamilyPlan(groups, tuple(members), chosen, shift, single)
