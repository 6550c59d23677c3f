"""Which config keys a report compares, and at which levels.

A factorial report reads its cells along two axes:

* the **compared** axis (rows; ``model.norm`` in the norm x optimizer study): every level is
  measured against its **baseline** level (``rmsnorm``): gap = mean(level) - mean(baseline);
* the **across** axis (columns; ``optim.name``): the gaps are compared between each of its
  levels and its **reference** level (``adamw``): interaction = gap(level) - gap(reference).

Any config key can be either axis (``optim.muon_params`` x ``optim.name``, ``data.path`` x
``model.norm``, ...). A spec with one axis has no across axis (gaps only, no interactions);
every further axis is a **stratum**: the analysis is repeated for each combination of its
levels (``model.norm`` x ``optim.name`` x ``optim.muon_params`` gives one norm x optimizer
analysis per Muon assignment). ``fixes`` maps a level of the compared axis to the level
whose gap it is meant to recover (``derf_ema`` -> ``derf``; in a component ablation with
baseline ``all``, ``vo_ffn`` -> ``none`` reads as the share of Muon's advantage over AdamW
that Muon on the VO and FFN matrices carries). ``factors`` names pairs of variants that differ
in one setting, ``name: [without, with]`` (a variant is a level or ``level[arm]``): the
report gives each factor's change of the interaction (:mod:`normopt.report.stats.factor_effects`).
``equivalence_margin`` (nats, :data:`DEFAULT_EQUIVALENCE_MARGIN`) is the margin of the
report's equivalence ("no penalty") tests (:mod:`normopt.report.stats.multiplicity`). ``size`` names the
strata that are model sizes (a key or a list; ``none`` for no size axis; default: the strata
among :data:`SIZE_KEYS`): the report then fits each interaction against log(parameters)
(:mod:`normopt.report.stats.model_size`).

Where the settings come from, first found wins: the command line of ``normopt report``; the
experiment file a factorial runner writes into its root (:data:`EXPERIMENT_FILE`, the spec's
``axes`` and ``report`` sections); the norm x optimizer defaults when the cells vary in norm
and optimizer; else the axes recorded in the cells' ``cell.json`` in spec order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.optim.registry import REFERENCE_OPTIMIZER
from normopt.report.cells.cell_reading import NORM_KEY, OPTIM_KEY, SEED_KEY, Cell
from normopt.report.cells.report_axes import REPORT_AXES
from normopt.run_dir import EXPERIMENT_FILE


def short_axis_name(key: str) -> str:
    """The name a cell.json gives the axis ``key`` (the key itself for an unregistered one)."""
    return REPORT_AXES[key].short if key in REPORT_AXES else key


def default_level(key: str) -> str | None:
    return REPORT_AXES[key].default_level if key in REPORT_AXES else None


def canonical_levels(key: str | None) -> Sequence[str]:
    """The registered order of an axis's levels (the norm and optimizer registries'); () if none."""
    axis = REPORT_AXES.get(key or "")
    return () if axis is None or axis.levels is None else axis.levels()


# the one column label of a report without an across axis
SINGLE_COLUMN = "all"
REPORT_KEYS = {"compare", "baseline", "across", "reference", "fixes", "factors", "equivalence_margin", "size"}
# the keys that set a model's size: a stratum over one of them is a size axis unless report.size says
# otherwise (a preset axis over architectures of one size, debug / debug-mla, is one: report.size: none)
SIZE_KEYS = ("model.preset", "model.dim", "model.n_layers", "model.ffn_hidden")
# The default margin of an equivalence ("no penalty") statement, in nats of final validation
# loss: a difference whose 90% interval lies inside +/- this margin is called negligible (two
# one-sided tests at 5%). 0.05 nats is ~1.5% of the tiny grid's final loss and a third of the
# smallest effect docs/results.md discusses; a spec sets its own with report.equivalence_margin.
DEFAULT_EQUIVALENCE_MARGIN = 0.05


@dataclass(frozen=True)
class ReportAxes:
    """The axes and levels a report compares (module docstring). ``order`` lists each axis's
    levels in the order the spec gave them (tables follow it; unknown levels go last)."""

    compare: str = NORM_KEY
    baseline: str = "rmsnorm"
    across: str | None = OPTIM_KEY
    reference: str | None = REFERENCE_OPTIMIZER
    strata: tuple[str, ...] = ()
    fixes: Mapping[str, str] | None = None  # None = the norm registry's fixes (norm axis only)
    order: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # factor name -> (variant without it, variant with it): the change of the interaction when
    # that one factor is switched (:func:`normopt.report.stats.factor_effects.compute_factor_effects`)
    factors: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    equivalence_margin: float = DEFAULT_EQUIVALENCE_MARGIN
    # the keys report.size names (None = the strata among SIZE_KEYS; () = no size axis)
    size: tuple[str, ...] | None = None

    @property
    def size_keys(self) -> tuple[str, ...]:
        """The strata that are model sizes (:mod:`normopt.report.stats.model_size`)."""
        return tuple(k for k in (SIZE_KEYS if self.size is None else self.size) if k in self.strata)

    @property
    def is_norm_by_optimizer(self) -> bool:
        return self.compare == NORM_KEY and self.across == OPTIM_KEY

    @property
    def coordinate_keys(self) -> frozenset[str]:
        """Keys that place a cell rather than make an arm of it."""
        return frozenset({self.compare, SEED_KEY, *self.strata} | ({self.across} if self.across else set()))

    def noun(self, key: str | None) -> str:
        return REPORT_AXES[key].noun if key in REPORT_AXES else (key or "")

    def to_json(self) -> dict[str, Any]:
        return {
            "compare": self.compare,
            "baseline": self.baseline,
            "across": self.across,
            "reference": self.reference,
            "strata": list(self.strata),
            "fixes": None if self.fixes is None else dict(self.fixes),
            "order": {k: list(v) for k, v in self.order.items()},
            "factors": {k: list(v) for k, v in self.factors.items()},
            "equivalence_margin": self.equivalence_margin,
            "size": None if self.size is None else list(self.size),
            "size_keys": list(self.size_keys),
        }


def level_label(value: Any) -> str:
    """A config value as a level name: lists joined by commas, booleans lower case, None "none"."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(level_label(v) for v in value)
    return str(value)


def cell_level(cell: Cell, key: str) -> str | None:
    """The cell's level on axis ``key``: what its cell.json coords name (under the key or its
    short name), else its config's value; None when neither has it."""
    if key == NORM_KEY and cell.norm is not None:
        return cell.norm
    if key == OPTIM_KEY and cell.optim is not None:
        return cell.optim
    for name in (short_axis_name(key), key):
        if name in cell.coords:
            return level_label(cell.coords[name])
    return level_label(cell.config[key]) if key in cell.config else None


def place_cells(cells: Sequence[Cell], axes: ReportAxes) -> list[Cell]:
    """The cells with ``norm`` = their level on the compared axis and ``optim`` = their level on
    the across axis (SINGLE_COLUMN without one): the statistics read these two fields."""
    if axes.is_norm_by_optimizer:
        return list(cells)
    return [
        replace(
            cell,
            norm=cell_level(cell, axes.compare),
            optim=cell_level(cell, axes.across) if axes.across else SINGLE_COLUMN,
        )
        for cell in cells
    ]


def stratum_of(cell: Cell, axes: ReportAxes) -> tuple[tuple[str, str | None], ...]:
    return tuple((key, cell_level(cell, key)) for key in axes.strata)


def _full_key(name: str) -> str:
    return {axis.short: key for key, axis in REPORT_AXES.items()}.get(name, name)


def axes_from_levels(levels: Mapping[str, Sequence[Any]], report: Mapping[str, Any] | None = None) -> ReportAxes:
    """ReportAxes for a spec's ``axes`` (key -> levels, in order) and its optional ``report``
    section. Defaults: norm x optimizer when both are axes (baseline rmsnorm, reference adamw
    where present); else the first axis compared at its first level, the second (if any) as
    the across axis at its first level; the rest are strata."""
    report = dict(report or {})
    unknown = set(report) - REPORT_KEYS
    if unknown:
        raise UserError(f"report: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(REPORT_KEYS))})")
    order = {key: tuple(level_label(v) for v in values) for key, values in levels.items()}
    keys = list(order)
    if NORM_KEY in order and OPTIM_KEY in order:
        compare, across = NORM_KEY, OPTIM_KEY
    else:
        compare = keys[0] if keys else NORM_KEY
        across = keys[1] if len(keys) > 1 else None
    compare = report.get("compare", compare)
    across = report.get("across", across if across != compare else None)
    for name, key in (("compare", compare), ("across", across)):
        if key is not None and key not in order:
            raise UserError(f"report.{name}: {key!r} is not an axis (axes: {', '.join(keys)})")
    if across == compare:
        raise UserError(f"report: compare and across are the same axis {compare!r}")

    def level(key: str | None, given: Any) -> str | None:
        if key is None:
            if given is not None:
                raise UserError("report.reference needs an across axis")
            return None
        if given is not None:
            label = level_label(given)
            if label not in order[key]:
                raise UserError(f"report: {label!r} is not a level of {key} ({', '.join(order[key])})")
            return label
        default = default_level(key)
        return default if default in order[key] else order[key][0]

    fixes = report.get("fixes")
    if fixes is not None and (
        not isinstance(fixes, Mapping)
        or not all(level_label(k) in order[compare] and level_label(v) in order[compare] for k, v in fixes.items())
    ):
        raise UserError(f"report.fixes must map levels of {compare} to levels of {compare}")
    return ReportAxes(
        factors=_factors(report.get("factors"), compare, order[compare]),
        equivalence_margin=_margin(report.get("equivalence_margin", DEFAULT_EQUIVALENCE_MARGIN)),
        size=_size_keys(report.get("size"), order, compare, across),
        compare=compare,
        baseline=level(compare, report.get("baseline")),
        across=across,
        reference=level(across, report.get("reference")),
        strata=tuple(k for k in keys if k not in (compare, across)),
        fixes=None if fixes is None else {level_label(k): level_label(v) for k, v in fixes.items()},
        order=order,
    )


def _variant_level(variant: str) -> str:
    """The compared level of a variant name, ``level`` or ``level[arm]``."""
    return variant.split("[", 1)[0]


def _factors(given: Any, compare: str, levels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """report.factors: {name: [variant without the factor, variant with it]}, each variant a
    level of the compared axis or ``level[arm]`` (an arm of the spec)."""
    if given is None:
        return {}
    shape = (
        f"report.factors must map a name to [variant without, variant with] "
        f"(a variant: a level of {compare} or level[arm])"
    )
    if not isinstance(given, Mapping):
        raise UserError(shape)
    factors = {}
    for name, pair in given.items():
        if (
            not isinstance(name, str)
            or not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(v, str) and v for v in pair)
        ):
            raise UserError(f"{shape}; got {name!r}: {pair!r}")
        for variant in pair:
            if _variant_level(variant) not in levels or (
                "[" in variant and not (variant.endswith("]") and len(variant) > len(_variant_level(variant)) + 2)
            ):
                raise UserError(
                    f"report.factors.{name}: {variant!r} is not a level of {compare} "
                    f"({', '.join(levels)}) or level[arm]"
                )
        if pair[0] == pair[1]:
            raise UserError(f"report.factors.{name}: the two variants are the same ({pair[0]!r})")
        factors[name] = (pair[0], pair[1])
    return factors


def _size_keys(
    given: Any, order: Mapping[str, Sequence[str]], compare: str, across: str | None
) -> tuple[str, ...] | None:
    """report.size: None (the strata among SIZE_KEYS), ``none`` or [] (no size axis), a key or a
    list of keys, each an axis that is neither compared nor across (a stratum)."""
    if given is None:
        return None
    if given == "none":
        return ()
    keys = [given] if isinstance(given, str) else given
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise UserError(f"report.size must be an axis, a list of axes or none, got {given!r}")
    for key in keys:
        if key not in order:
            raise UserError(f"report.size: {key!r} is not an axis (axes: {', '.join(order)})")
        if key in (compare, across):
            raise UserError(
                f"report.size: {key!r} is the {'compared' if key == compare else 'across'} axis; "
                "a size axis is a further axis (a stratum)"
            )
    return tuple(dict.fromkeys(keys))


def _margin(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"report.equivalence_margin must be a positive finite number of nats, got {value!r}")
    return float(value)


def infer_axes(cells: Sequence[Cell]) -> ReportAxes:
    """Axes for cells without an experiment file: the keys their cell.json coords name, in the
    order written (a factorial runner writes them in spec order), with levels in order of first
    appearance; norm x optimizer when the cells name no coords or name both."""
    levels: dict[str, list[str]] = {}
    for cell in cells:
        for name in cell.coords:
            key = _full_key(name)
            label = cell_level(cell, key)
            if label is not None and label not in levels.setdefault(key, []):
                levels[key].append(label)
    if not levels or (NORM_KEY in levels and OPTIM_KEY in levels):
        return ReportAxes(strata=tuple(k for k in levels if k not in (NORM_KEY, OPTIM_KEY)))
    return axes_from_levels(levels)


def write_experiment_file(root: Path, levels: Mapping[str, Sequence[Any]], report: Mapping[str, Any] | None) -> None:
    """The spec's axes and report settings, for ``normopt report ROOT`` to read later."""
    root.mkdir(parents=True, exist_ok=True)
    record = {
        "axes": {k: [level_label(v) for v in values] for k, values in levels.items()},
        "report": dict(report or {}),
    }
    (root / EXPERIMENT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_grid_record(path: Path) -> Any:
    """The JSON a grid's runner wrote at ``path`` (None when there is no such file); a
    file that cannot be read or parsed is a UserError naming it."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def read_experiment_file(root: Path) -> ReportAxes | None:
    """ReportAxes from ``root``'s experiment file; None when there is none."""
    path = root / EXPERIMENT_FILE
    record = read_grid_record(path)
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("axes"), dict) or not record["axes"]:
        raise UserError(f"{path}: expected an object with a non-empty 'axes' object")
    try:
        return axes_from_levels(record["axes"], record.get("report"))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def override_axes(
    axes: ReportAxes,
    *,
    compare: str | None = None,
    baseline: str | None = None,
    across: str | None = None,
    reference: str | None = None,
    fixes: Mapping[str, str] | None = None,
) -> ReportAxes:
    """``axes`` with the command line's choices applied (``across="none"``: no across axis).
    A changed compared axis drops its old baseline and fixes; a changed across axis its
    reference; levels not given then default as in :func:`axes_from_levels`."""
    changes: dict[str, Any] = {}
    if compare is not None and compare != axes.compare:
        if compare == axes.across:
            changes.update(across=axes.compare, reference=axes.baseline)
        changes.update(compare=compare, fixes=None, baseline=_default_level(compare, axes.order))
    if across is not None:
        key = None if across == "none" else across
        if key != axes.across:
            changes.update(across=key, reference=None if key is None else _default_level(key, axes.order))
    result = replace(axes, **changes)
    strata = tuple(
        k
        for k in (*axes.strata, axes.compare, axes.across)
        if k is not None and k not in (result.compare, result.across)
    )
    result = replace(result, strata=strata)
    if baseline is not None:
        result = replace(result, baseline=baseline)
    if reference is not None:
        if result.across is None:
            raise UserError("--reference needs an across axis")
        result = replace(result, reference=reference)
    if fixes:
        result = replace(result, fixes={**(result.fixes or {}), **fixes})
    return result


def _default_level(key: str, order: Mapping[str, Sequence[str]]) -> str:
    default = default_level(key)
    levels = order.get(key, ())
    if default is not None and (not levels or default in levels):
        return default
    if not levels:
        raise UserError(f"no levels known for {key}: give the baseline/reference level on the command line")
    return levels[0]
