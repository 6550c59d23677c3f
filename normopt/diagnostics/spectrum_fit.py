"""``normopt spectrum ROOT``: power laws in model size of the spectrum NS receives, per depth
group and matrix type, and the fewest Newton-Schulz steps per depth they imply.

Input: every ``diagnostics.jsonl`` below ROOT: its "run" line (n_params, n_layers, steps)
and its "ns_spectrum" records (per matrix: layer, sv_rel_fro, momentum_sv_rel_fro, ...;
see ``ns_spectrum.ns_spectrum_record``). Model size M is ``n_params`` (``MODEL_SIZE``).
Pipeline (after arXiv 2606.04058: the quantiles follow power laws in M per layer type):

1. Cells: block l of n goes to depth group floor(G l / n) of G (G = 3: early, mid, late
   thirds); a matrix's type is its role in the block (``matrix_type``: attn.wq, ffn.w2).
2. Per run, from the records with step >= burn_in * T, the value of a (group, type, level)
   cell is the geometric mean exp(mean(log q)) over the cell's matrices (one shape) and
   records. Zero and missing quantiles have no log: they are counted and reported.
3. Fit per cell over runs: log q = log c + beta log M, least squares, R^2 in log space.
4. At a target size M*: q(M*) = min(c M*^beta, 1); per type the fewest NS steps bringing
   its quantiles at levels >= --level into the band (``fewest_ns_steps_joint``), per
   group the worst type's (``recommend_steps``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from normopt.diagnostics.ns_spectrum import DEFAULT_MAX_STEPS, default_band, fewest_ns_steps_joint
from normopt.errors import UserError
from normopt.metrics.jsonl import read_step_records
from normopt.optim.newton_schulz import coefficient_schedule

DIAGNOSTICS_FILE = "diagnostics.jsonl"
QUANTITIES = ("sv_rel_fro", "sv_rel_max")
SOURCES = {"ns_input": "", "momentum": "momentum_"}  # field prefix in the ns_spectrum record
GROUP_NAMES = {1: ("all",), 2: ("early", "late"), 3: ("early", "mid", "late")}
DEFAULT_BURN_IN = 0.5
DEFAULT_LEVEL = 0.1
MODEL_SIZE = ("M = n_params of the run line: total learnable parameters including the token embedding "
              "(and the output head when untied; a tied head counts once)")

Cell = tuple[str, str, float]  # (depth group, matrix type, quantile level)


# --------------------------------------------------------------------------- cells


def group_names(n_groups: int) -> tuple[str, ...]:
    """Names of the depth groups, shallowest first: early/mid/late for 3, g0..g{G-1} past 3."""
    if n_groups < 1:
        raise UserError(f"--groups must be >= 1, got {n_groups}")
    return GROUP_NAMES.get(n_groups, tuple(f"g{i}" for i in range(n_groups)))


def depth_group(layer: int, n_layers: int, n_groups: int = 3) -> str:
    """Group of block ``layer`` (0-based) among ``n_layers``: index floor(G * layer / n_layers),
    i.e. the equal thirds early l < n/3, mid n/3 <= l < 2n/3, late the rest for G = 3."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is not in 0..{n_layers - 1}")
    return group_names(n_groups)[(n_groups * layer) // n_layers]


def matrix_type(name: str) -> str:
    """A matrix's role in its block: the dotted path after the block index (the first
    all-digit part), minus a trailing ``.weight`` and any later all-digit part (an expert
    index), so one type holds matrices of one shape:

        layers.3.attn.wq.weight -> attn.wq        layers.3.ffn.w2.weight -> ffn.w2
        layers.0.attn.wkv_a.weight -> attn.wkv_a  layers.1.ffn.experts.7.w1.weight -> ffn.experts.w1

    A name without a block index keeps its whole path (``output.weight`` -> ``output``)."""
    parts = name.split(".")
    parts = parts[:-1] if len(parts) > 1 and parts[-1] == "weight" else parts
    block = next((i for i, part in enumerate(parts) if part.isdigit()), -1)
    return ".".join(p for p in parts[block + 1:] if not p.isdigit()) or name


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RunSpectra:
    """One run directory's model size and its ns_spectrum records, in step order."""

    folder: Path
    n_params: int
    n_layers: int
    planned_steps: int | None
    records: tuple[dict, ...]


def read_diagnostics(path: Path) -> tuple[dict | None, list[dict]]:
    """(the last "run" line, the "ns_spectrum" lines sorted by step) of a diagnostics.jsonl.

    A later line for a step replaces an earlier one (a resumed run logs some steps twice).
    An unterminated last line that does not parse is skipped (a killed writer leaves one);
    any other bad line is a UserError.
    """
    records, _ = read_step_records(path, "diagnostics", lambda record: record)
    run, spectra = None, {}
    for record in records:
        if record.get("kind") == "run":
            run = record
        elif record.get("kind") == "ns_spectrum":
            spectra[record["step"]] = record
    return run, [spectra[s] for s in sorted(spectra)]


def _positive_int(run: Mapping[str, Any], key: str, path: Path, required: bool = True) -> int | None:
    value = run.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: the run line needs a positive integer {key!r}, got {value!r}")
    return value


def load_run(path: Path) -> RunSpectra | None:
    """The run in ``path`` (a diagnostics.jsonl), or None when it has no ns_spectrum records
    (an AdamW run, or one stopped before the first)."""
    run, records = read_diagnostics(path)
    if not records:
        return None
    if run is None:
        raise UserError(f"{path}: ns_spectrum records but no 'run' line (model size unknown)")
    return RunSpectra(path.parent, _positive_int(run, "n_params", path), _positive_int(run, "n_layers", path),
                      _positive_int(run, "steps", path, required=False), tuple(records))


def discover_runs(root: Path) -> list[RunSpectra]:
    """Every run below ``root`` (recursively) whose diagnostics.jsonl has ns_spectrum records."""
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    runs = [run for path in sorted(root.rglob(DIAGNOSTICS_FILE)) if (run := load_run(path)) is not None]
    if not runs:
        raise UserError(f"{root}: no {DIAGNOSTICS_FILE} with ns_spectrum records below it")
    return runs


# --------------------------------------------------------------------------- per-run values


def post_burn_in(run: RunSpectra, burn_in: float) -> list[dict]:
    """Records with step >= burn_in * T, T the planned steps (the last record's step when
    the run line has none)."""
    total = run.planned_steps if run.planned_steps is not None else run.records[-1]["step"]
    return [r for r in run.records if r["step"] >= burn_in * total]


def value_kind(value: Any) -> str:
    """"ok" for a finite q > 0, "zero" for q <= 0 (no logarithm), "missing" for anything
    else: null, a non-finite float, or the "nan"/"inf" string the log writes for one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "missing"
    return "ok" if value > 0 else "zero"


def geometric_mean(values: Sequence[Any]) -> float | None:
    """exp(mean(log v)) over the values ``value_kind`` calls "ok"; None when there are none."""
    logs = [math.log(v) for v in values if value_kind(v) == "ok"]
    return math.exp(math.fsum(logs) / len(logs)) if logs else None


def run_samples(run: RunSpectra, burn_in: float = DEFAULT_BURN_IN, field: str = "sv_rel_fro",
                n_groups: int = 3) -> dict[Cell, list[Any]]:
    """(group, type, level) -> every logged value of ``field`` in the post-burn-in records,
    zeros and missing values included."""
    samples: dict[Cell, list[Any]] = defaultdict(list)
    for record in post_burn_in(run, burn_in):
        levels = [float(v) for v in record.get("levels", ())]
        for name, matrix in record.get("matrices", {}).items():
            layer = matrix.get("layer")
            if layer is None:
                continue
            values = matrix.get(field)
            where = f"{run.folder / DIAGNOSTICS_FILE}: step {record['step']}, {name}"
            if values is None and field.startswith(SOURCES["momentum"]):
                raise UserError(f"{where}: no {field!r} (logged before momentum quantiles were); "
                                f"use --source ns_input")
            if not isinstance(values, list) or len(values) != len(levels):
                raise UserError(f"{where}: {field!r} should list one value per level {levels}")
            try:
                group = depth_group(layer, run.n_layers, n_groups)
            except ValueError as exc:
                raise UserError(f"{where}: {exc}") from None
            for level, value in zip(levels, values):
                samples[(group, matrix_type(name), level)].append(value)
    return samples


def cell_means(samples: Mapping[Cell, Sequence[Any]]) -> dict[Cell, float]:
    """(group, type, level) -> ``geometric_mean`` of the cell's values (over its matrices and
    records); cells without a usable value are left out."""
    return {cell: q for cell, values in samples.items() if (q := geometric_mean(values)) is not None}


def run_quantiles(run: RunSpectra, burn_in: float = DEFAULT_BURN_IN, field: str = "sv_rel_fro",
                  n_groups: int = 3) -> dict[Cell, float]:
    """``cell_means`` of ``run_samples``: a run's value per (group, type, level)."""
    return cell_means(run_samples(run, burn_in, field, n_groups))


# --------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class PowerLawFit:
    """q(M) = c M^beta for one depth group, matrix type and quantile level."""

    group: str
    type: str
    level: float
    c: float
    beta: float
    r2: float | None  # None when every q is equal (R^2 undefined)
    n_runs: int
    n_sizes: int

    def predict(self, n_params: float) -> float:
        return self.c * n_params**self.beta


def fit_power_law(sizes: Sequence[float], values: Sequence[float]) -> tuple[float, float, float | None]:
    """(c, beta, R^2) of the least-squares line log q = log c + beta log M.

    With x = log M, y = log q: beta = S_xy / S_xx, log c = mean(y) - beta mean(x),
    R^2 = 1 - SS_res / SS_tot (None if SS_tot = 0; exactly 1 for two points).
    Needs at least two distinct sizes.
    """
    x = [math.log(m) for m in sizes]
    y = [math.log(q) for q in values]
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxx = math.fsum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("a power-law fit needs at least two distinct model sizes")
    beta = math.fsum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    log_c = my - beta * mx
    ss_tot = math.fsum((b - my) ** 2 for b in y)
    ss_res = math.fsum((b - log_c - beta * a) ** 2 for a, b in zip(x, y))
    return math.exp(log_c), beta, (1.0 - ss_res / ss_tot if ss_tot > 0 else None)


def fit_all(points: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> tuple[list[PowerLawFit], list[str]]:
    """One fit per (group, type, level) seen in ``points`` ({"group", "type", "level",
    "n_params", "q"}, one per run); cells with fewer than two sizes get a note instead (one
    per group and type)."""
    by_cell: dict[Cell, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        by_cell[(p["group"], p["type"], p["level"])].append((p["n_params"], p["q"]))
    fits, unfitted = [], defaultdict(list)
    for cell in sorted(by_cell, key=lambda k: (groups.index(k[0]), k[1], k[2])):
        pairs = by_cell[cell]
        sizes = {m for m, _ in pairs}
        if len(sizes) < 2:
            unfitted[cell[:2]].append(f"q{cell[2]:g}")
            continue
        c, beta, r2 = fit_power_law([m for m, _ in pairs], [q for _, q in pairs])
        fits.append(PowerLawFit(*cell, c, beta, r2, len(pairs), len(sizes)))
    return fits, [f"{_label(*key)}: only one model size has data at {', '.join(levels)}, no fit"
                  for key, levels in unfitted.items()]


def unusable_cells(samples: Mapping[str, Mapping[Cell, list[Any]]], level: float) -> tuple[list[dict], list[str]]:
    """Each (group, type, level) with zero or missing values in ``samples`` (run folder ->
    ``run_samples``): their counts over all runs, the runs with any, the runs left with no
    usable value (no point), and a note line."""
    rows, notes = [], []
    for cell in sorted({cell for per_run in samples.values() for cell in per_run}):
        kinds = {run: Counter(map(value_kind, per_run.get(cell, ()))) for run, per_run in samples.items()}
        total = sum(kinds.values(), Counter())
        if total["zero"] + total["missing"] == 0:
            continue
        rows.append(row := {"group": cell[0], "type": cell[1], "level": cell[2], "values": total.total(),
                            "zero": total["zero"], "missing": total["missing"],
                            "runs": [r for r, k in kinds.items() if k["zero"] + k["missing"]],
                            "runs_without_value": [r for r, k in kinds.items() if k and not k["ok"]]})
        what = [f"{row['zero']} of {row['values']} values are 0"] if row["zero"] else []
        what += [f"{row['missing']} of {row['values']} missing or non-finite"] if row["missing"] else []
        note = f"{_label(*cell)}: {', '.join(what)} (in {', '.join(row['runs'])}); the means and the fit excluded them"
        if row["runs_without_value"]:
            note += f"; no point left for {', '.join(row['runs_without_value'])}"
        if row["zero"] and cell[2] >= level:
            note += "; NS cannot bring a zero singular value into the band"
        notes.append(note)
    return rows, notes


def _label(group: str, mtype: str, level: float | None = None) -> str:
    """'ffn.w2 late q0.1': how notes name a cell."""
    return f"{mtype} {group}" + ("" if level is None else f" q{level:g}")


# --------------------------------------------------------------------------- recommendation

_SIZE_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_size(text: str) -> float:
    """'1.1B' -> 1.1e9, '350M' -> 3.5e8, '125k' -> 1.25e5, '1.1e9' -> 1.1e9 (suffixes k, M,
    B or G, T, case-insensitive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*([kmbgt]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a parameter count like 1.1e9, 1.1B or 350M, got {text!r}")
    value = float(match.group(1) + (match.group(2) or "")) * _SIZE_SUFFIX[match.group(3).lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a parameter count must be positive, got {text!r}")
    return value


def format_size(n_params: float) -> str:
    """3.5e8 -> '350M', 1.1e9 -> '1.1B' (three significant digits)."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n_params >= scale:
            return f"{n_params / scale:.3g}{suffix}"
    return f"{n_params:.3g}"


def recommend_steps(fits: Sequence[PowerLawFit], target_params: float, level: float,
                    coefficients: str, band: Sequence[float],
                    max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, dict[str, Any]]:
    """Per depth group:

    - "types": per matrix type with a fit at ``level``, the predicted quantiles
      q(M*) = min(c M*^beta, 1) at every fitted level and "ns_steps", the fewest steps
      bringing those at levels >= ``level`` into ``band`` at once (None: not in ``max_steps``)
    - "worst_type": the type needing the most steps (None counts as most; on a tie the
      smaller predicted q at ``level``)
    - "ns_steps": the fewest steps bringing every type's tracked quantiles in at once. With
      the quintic band, which NS maps into itself, that is the worst type's count; a band
      NS can leave again (polar_express overshoots) can need more than any type alone.
    """
    by_cell: dict[tuple[str, str], list[PowerLawFit]] = defaultdict(list)
    for fit in fits:
        by_cell[(fit.group, fit.type)].append(fit)
    joint = lambda qs: fewest_ns_steps_joint(qs, tuple(band), coefficients, max_steps)  # noqa: E731
    out: dict[str, dict[str, Any]] = {}
    for (group, mtype), cell in by_cell.items():
        if any(f.level == level for f in cell):
            predicted = {f.level: min(f.predict(target_params), 1.0) for f in cell}
            tracked = [q for lv, q in predicted.items() if lv >= level]
            out.setdefault(group, {"types": {}})["types"][mtype] = {
                "predicted": predicted, "tracked": tracked, "ns_steps": joint(tracked)}
    for entry in out.values():
        types = entry["types"]
        entry["worst_type"] = max(types, key=lambda t: (math.inf if types[t]["ns_steps"] is None
                                                        else types[t]["ns_steps"], -types[t]["predicted"][level]))
        entry["ns_steps"] = joint([q for t in types.values() for q in t.pop("tracked")])
    return out


def ns_steps_per_layer(steps_by_group: Mapping[str, int | None], n_layers: int, n_groups: int = 3) -> str:
    """The ``optim.ns_steps_per_layer`` value "layers.0.*=k0,layers.1.*=k1,..." for a model of
    ``n_layers`` blocks, each block taking its depth group's steps (at least 1, the config's
    minimum); blocks of groups without a recommendation are left to optim.ns_steps."""
    rules = []
    for layer in range(n_layers):
        steps = steps_by_group.get(depth_group(layer, n_layers, n_groups))
        if steps is not None:
            rules.append(f"layers.{layer}.*={max(1, steps)}")
    return ",".join(rules)


# --------------------------------------------------------------------------- analysis


def _ns_config(runs: Sequence[RunSpectra], coefficients: str | None, band: Sequence[float] | None,
               notes: list[str]) -> tuple[str, tuple[float, ...]]:
    """(coefficients, band) to recommend for: as given, else as the largest run's last record
    logs them; a band not given nor logged for those coefficients is their default band."""
    name = lambda run: str(run.records[-1].get("coefficients", "quintic"))  # noqa: E731
    largest = max(runs, key=lambda r: (r.n_params, r.n_layers))
    if len({name(r) for r in runs}) > 1:
        notes.append(f"runs log different NS coefficients; recommending for {coefficients or name(largest)}")
    coefficients = coefficients or name(largest)
    try:
        coefficient_schedule(coefficients)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if band is None and coefficients == name(largest):
        band = largest.records[-1].get("band")
    try:
        return coefficients, tuple(float(v) for v in (band or default_band(coefficients)))
    except ValueError as exc:
        raise UserError(f"{exc} (use --band LO,HI)") from None


def analyze(root: str | Path, *, burn_in: float = DEFAULT_BURN_IN, quantity: str = "sv_rel_fro",
            source: str = "ns_input", n_groups: int = 3, target_params: float | None = None,
            target_layers: int | None = None, level: float = DEFAULT_LEVEL, coefficients: str | None = None,
            band: Sequence[float] | None = None, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """Read the runs under ``root``, fit the power laws and build the recommendation.

    Returns a JSON-ready summary: settings (with the model-size convention), runs, points
    (one per run and cell), fits, unusable (zero or missing values per cell),
    recommendation (None unless ``quantity`` is sv_rel_fro) and notes. ``source``
    "momentum" fits the momentum buffer's quantiles instead of the NS input's.
    Coefficients and band default to those logged by the largest run.
    """
    if not 0.0 <= burn_in < 1.0:
        raise UserError(f"--burn-in must be in [0, 1), got {burn_in}")
    if quantity not in QUANTITIES or source not in SOURCES:
        raise UserError(f"--quantity must be one of {QUANTITIES} and --source one of {tuple(SOURCES)}")
    root, field, groups = Path(root), SOURCES[source] + quantity, group_names(n_groups)
    notes: list[str] = []
    runs, points, samples = [], [], {}
    for run in discover_runs(root):
        samples[str(run.folder)] = per_run = run_samples(run, burn_in, field, n_groups)
        if not (means := cell_means(per_run)):
            notes.append(f"{run.folder}: no usable ns_spectrum value after the burn-in, left out")
            continue
        runs.append(run)
        points += [{"run": str(run.folder), "n_params": run.n_params, "group": g, "type": t, "level": lv, "q": q}
                   for (g, t, lv), q in means.items()]
    sizes = sorted({run.n_params for run in runs})
    if len(sizes) < 2:
        found = ", ".join(format_size(m) for m in sizes) or "none"
        raise UserError(f"{root}: need runs of at least 2 model sizes after the burn-in, found {found}")
    unusable, unusable_notes = unusable_cells(samples, level)
    fits, fit_notes = fit_all(points, groups)
    notes += unusable_notes + fit_notes
    coefficients, band = _ns_config(runs, coefficients, band, notes)
    largest = max(runs, key=lambda r: (r.n_params, r.n_layers))
    settings = {"root": str(root), "model_size": MODEL_SIZE, "burn_in": burn_in, "quantity": quantity,
                "source": source, "field": field, "groups": list(groups), "level": level,
                "target_params": float(target_params or largest.n_params),
                "target_layers": target_layers or largest.n_layers, "coefficients": coefficients,
                "band": list(band), "max_steps": max_steps}
    span = math.log10(settings["target_params"] / sizes[-1])
    if span > 1:  # a power law fitted over a narrow range says little this far out
        notes.append(f"the target is {span:.1f} decades above the largest run "
                     f"({format_size(sizes[-1])}): an extrapolation, read it as a trend")
    cells = {(p["group"], p["type"]) for p in points}
    return {"settings": settings,
            "runs": [{"folder": str(r.folder), "n_params": r.n_params, "n_layers": r.n_layers,
                      "planned_steps": r.planned_steps, "records_used": len(post_burn_in(r, burn_in))}
                     for r in runs],
            "points": points, "fits": [asdict(f) for f in fits], "unusable": unusable,
            "recommendation": _recommendation(fits, cells, settings, notes), "notes": notes}


def _recommendation(fits: Sequence[PowerLawFit], cells: set[tuple[str, str]], settings: Mapping[str, Any],
                    notes: list[str]) -> dict[str, Any] | None:
    """``recommend_steps`` as JSON (groups in depth order, their block ranges in the target
    model, the ns_steps_per_layer value), with a note for every type or group that has fits
    but none at --level (left out of the steps), every group out of reach, and every group
    whose joint count exceeds its worst type's."""
    if settings["quantity"] != "sv_rel_fro":
        notes.append("no NS-step recommendation: NS sees sv_rel_fro, not " + settings["quantity"])
        return None
    if settings["source"] == "momentum":
        notes.append("recommending from the momentum buffer's quantiles: what NS receives without "
                     "Nesterov; with Nesterov it receives g + beta m (--source ns_input)")
    level, n_groups, n_layers = settings["level"], len(settings["groups"]), settings["target_layers"]
    fitted_levels = sorted({f.level for f in fits})
    if level not in fitted_levels:
        raise UserError(f"--level {level} is not a fitted quantile level; choose one of {fitted_levels}")
    per_group = recommend_steps(fits, settings["target_params"], level, settings["coefficients"],
                                settings["band"], settings["max_steps"])
    fitted = {(f.group, f.type) for f in fits}
    for group, mtype in sorted(fitted - {(g, t) for g, e in per_group.items() for t in e["types"]}):
        notes.append(f"{_label(group, mtype)}: no fit at q{level:g}, so it does not enter the {group} steps")
    for group in sorted({g for g, _ in cells} - set(per_group), key=settings["groups"].index):
        notes.append(f"{group}: no matrix type has a fit at q{level:g}; its blocks are left to optim.ns_steps")
    steps = {g: r["ns_steps"] for g, r in per_group.items()}
    for group, value in steps.items():
        worst = per_group[group]["worst_type"]
        if value is None:
            notes.append(f"{group}: the predicted quantiles of {worst} (or of all types at once) do not reach "
                         f"the band within {settings['max_steps']} steps; left to optim.ns_steps")
        elif value != per_group[group]["types"][worst]["ns_steps"]:
            notes.append(f"{group}: every type in the band at once takes {value} steps, more than {worst} alone "
                         f"(the schedule leaves the band again after entering it)")
    members = defaultdict(list)
    for layer in range(n_layers):
        members[depth_group(layer, n_layers, n_groups)].append(layer)
    return {"groups": [{"group": g, "layers": "-".join(map(str, sorted({members[g][0], members[g][-1]})))
                        if members[g] else None, "ns_steps": steps[g], "worst_type": per_group[g]["worst_type"],
                        "types": [{"type": t, "ns_steps": e["ns_steps"],
                                   "predicted": [{"level": lv, "q": q} for lv, q in sorted(e["predicted"].items())]}
                                  for t, e in sorted(per_group[g]["types"].items())]}
                       for g in settings["groups"] if g in per_group],
            "ns_steps_per_layer": ns_steps_per_layer(steps, n_layers, n_groups)}


# --------------------------------------------------------------------------- output


def plot_spectrum(summary: Mapping[str, Any], path: Path) -> None:
    """Log-log q vs M at the --level quantile, one panel per depth group, one color per
    matrix type: a run's averaged quantile as points, the fitted line drawn out to the
    target size (dotted line)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, PNG by Agg
    except ImportError:
        raise UserError("the spectrum plot needs matplotlib: pip install matplotlib") from None
    s = summary["settings"]
    points = [p for p in summary["points"] if p["level"] == s["level"]] or summary["points"]
    level = points[0]["level"]
    groups = [g for g in s["groups"] if any(p["group"] == g for p in points)]
    types = sorted({p["type"] for p in points})
    fig = Figure(layout="constrained", figsize=(4.2 * len(groups), 3.8))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    lo, hi = min(p["n_params"] for p in points), max(max(p["n_params"] for p in points), s["target_params"])
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    for ax, group in zip(axes, groups):
        for i, mtype in enumerate(types):
            pts = [p for p in points if p["group"] == group and p["type"] == mtype]
            ax.scatter([p["n_params"] for p in pts], [p["q"] for p in pts], color=f"C{i % 10}", s=18)
            fit = next((f for f in summary["fits"] if (f["group"], f["type"], f["level"]) == (group, mtype, level)),
                       None)
            if fit:
                ax.plot(grid, [fit["c"] * m ** fit["beta"] for m in grid], color=f"C{i % 10}", lw=1.2,
                        label=f"{mtype}: beta={fit['beta']:.3f}")
        ax.axvline(s["target_params"], color="0.5", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", title=f"{group} layers, q{level:g}", xlabel="parameters M (n_params)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel(f"{s['field']} quantile (after burn-in)")
    fig.savefig(path, dpi=110)


def write_spectrum(root: str | Path, out: str | Path | None = None, **kwargs) -> dict[str, Any]:
    """``analyze`` plus spectrum.png and spectrum.json in ``out`` (default ``root``); the
    summary gains "files"."""
    summary = analyze(root, **kwargs)
    out = Path(root) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"plot": out / "spectrum.png", "summary": out / "spectrum.json"}
    plot_spectrum(summary, files["plot"])
    summary["files"] = {name: str(p) for name, p in files.items()}
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def fits_table(summary: Mapping[str, Any]) -> str:
    s = summary["settings"]
    head = (f"{s['model_size']}\nlog q = log c + beta log M ({s['field']} quantiles, geometric mean over a "
            f"type's matrices and the records from {s['burn_in']:.0%} of training on; {len(summary['runs'])} runs)")
    rows = [[f["group"], f["type"], f"{f['level']:g}", f"{f['c']:.4g}", f"{f['beta']:+.4f}",
             "-" if f["r2"] is None else f"{f['r2']:.4f}", str(f["n_runs"])] for f in summary["fits"]]
    return head + "\n" + _table(["group", "type", "level", "c", "beta", "R^2", "runs"], rows)


def recommendation_table(summary: Mapping[str, Any]) -> str:
    s, rec = summary["settings"], summary["recommendation"]
    levels = sorted({p["level"] for g in rec["groups"] for t in g["types"] for p in t["predicted"]})
    head = (f"NS steps for M* = {format_size(s['target_params'])} params (n_params), {s['target_layers']} layers "
            f"({s['coefficients']}, band [{s['band'][0]:g}, {s['band'][1]:g}], quantiles >= {s['level']:g} in band)")
    rows, summary_rows = [], []
    for g in rec["groups"]:
        steps = "-" if g["ns_steps"] is None else str(g["ns_steps"])
        summary_rows.append([g["group"], g["layers"] or "-", steps, g["worst_type"]])
        for t in g["types"]:
            q = {p["level"]: p["q"] for p in t["predicted"]}
            rows.append([g["group"], t["type"], *(f"{q[lv]:.3g}" if lv in q else "-" for lv in levels),
                         "-" if t["ns_steps"] is None else str(t["ns_steps"])])
    per_type = _table(["group", "type", *(f"q{lv:g}(M*)" for lv in levels), "ns_steps"], rows)
    per_group = _table(["group", "layers", "ns_steps", "worst type"], summary_rows)
    return f"{head}\n{per_type}\n\n{per_group}\n\noptim.ns_steps_per_layer={rec['ns_steps_per_layer']}"


def _parse_band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"expected LO < HI, got {text!r}")
    return lo, hi


def spectrum_main(argv: Sequence[str] | None = None) -> int:
    """``normopt spectrum ROOT [--burn-in 0.5] [--target-params 1.1B] [--target-layers N]
    [--level 0.1] [--source ns_input|momentum] [--out DIR] ...``: fit, print the tables,
    write spectrum.png and spectrum.json. Raises UserError (exit 2 in the CLI) for a
    missing ROOT, no ns_spectrum records, or fewer than two model sizes."""
    parser = argparse.ArgumentParser(
        prog="normopt spectrum",
        description="Fit power laws of the NS-input singular-value quantiles in model size, per depth "
                    "group and matrix type, and recommend Newton-Schulz steps per layer for a target size.")
    parser.add_argument("root", help="folder searched recursively for run directories with diagnostics.jsonl")
    parser.add_argument("--burn-in", type=float, default=DEFAULT_BURN_IN,
                        help="use records from this fraction of the planned steps on (default 0.5)")
    parser.add_argument("--target-params", type=parse_size, default=None,
                        help="model size to recommend for, counted like n_params (all parameters, embeddings "
                             "included), e.g. 1.1e9, 1.1B, 350M (default: largest run)")
    parser.add_argument("--target-layers", type=int, default=None,
                        help="blocks of the target model (default: n_layers of the largest run)")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL,
                        help="smallest quantile level that must reach the band (default 0.1)")
    parser.add_argument("--quantity", choices=QUANTITIES, default="sv_rel_fro",
                        help="sigma / ||G||_F (what NS sees; default) or sigma / sigma_max (fits only)")
    parser.add_argument("--source", choices=tuple(SOURCES), default="ns_input",
                        help="quantiles of the matrix fed to NS (default) or of the momentum buffer")
    parser.add_argument("--groups", type=int, default=3, dest="n_groups", help="number of depth groups (default 3)")
    parser.add_argument("--coefficients", default=None,
                        help="NS coefficients to recommend for (default: as logged by the largest run)")
    parser.add_argument("--band", type=_parse_band, default=None, metavar="LO,HI",
                        help="target band for NS outputs (default: as logged, or the coefficients' default)")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="give up past this many steps")
    parser.add_argument("--out", default=None, help="where to write spectrum.png and spectrum.json (default: ROOT)")
    args = parser.parse_args(argv)
    if args.target_layers is not None and args.target_layers < 1:
        raise UserError(f"--target-layers must be >= 1, got {args.target_layers}")
    options = {key: value for key, value in vars(args).items() if key not in ("root", "out")}
    summary = write_spectrum(args.root, args.out, **options)
    print(fits_table(summary))
    if summary["recommendation"] is not None:
        print()
        print(recommendation_table(summary))
    if summary["notes"]:
        print("\nnotes:\n" + "\n".join(f"  {n}" for n in summary["notes"]))
    print()
    for path in summary["files"].values():
        print(f"wrote {path}")
    return 0
