"""Power laws in model size of the spectrum Newton-Schulz receives, per depth group and matrix
type, and the fewest NS steps per depth they imply (``normopt spectrum``; the command, the
analysis over a folder of runs and its outputs are :mod:`normopt.spectrum.report`).

Input: the diagnostics log of each run: its "run" line (n_params, n_layers, steps) and its
"ns_spectrum" records (per matrix: layer, sv_rel_fro, momentum_sv_rel_fro, ...; see
``ns_spectrum.ns_spectrum_record``). Model size M is ``n_params`` (``MODEL_SIZE``).
Pipeline (after arXiv 2606.04058: the quantiles follow power laws in M per layer type):

1. Cells: block l of n goes to depth group floor(G l / n) of G (G = 3: early, mid, late
   thirds); a matrix's type is its role in the block (``matrix_type``: attn.wq, ffn.w2).
2. Per run, from the records with step >= burn_in * T, the value of a (group, type, level)
   cell is the geometric mean exp(mean(log q)) over the cell's matrices (one shape) and
   records. Zero and missing quantiles have no log: they are counted and reported.
3. Fit per cell over runs: log q = log c + beta log M, least squares, R^2 in log space,
   with a 95% t interval on beta from the residuals (n runs, n - 2 degrees of freedom:
   se(beta) = s / sqrt(S_xx), s^2 = SS_res / (n - 2); none with two runs).
4. At a target size M*: q(M*) = min(c M*^beta, 1); per type the fewest NS steps bringing
   its quantiles at levels >= --level into the band (``fewest_ns_steps_joint``), per
   group the worst type's (``recommend_steps``); and the same steps at the two ends of
   each quantile's 95% interval at M* (the fitted line's t interval at x* = log M*,
   s sqrt(1/n + (x* - mean x)^2 / S_xx)), which bound the step count.

The trivial exponent. sigma / ||G||_F of a matrix whose normalised spectrum keeps its shape
scales as r^(-1/2) with its rank r = min(rows, cols): ||G||_F^2 sums r squared singular
values. So a ladder that only widens the model (M ~ d^2 at fixed depth, r ~ d) gives
sv_rel_fro ~ M^(-1/4) with no change of the spectrum at all. Each sv_rel_fro fit therefore
carries the trivial exponent of its own runs: the slope of r^(-1/2) against M over the same
runs (from each record's logged ``rank``; -1/4, the width-only value, where runs predate
it), and says whether its interval contains it. The shape-only control sv_rel_max = sigma /
sigma_max has trivial exponent 0 and is fitted beside it (``control_fits``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normopt.diagnostics.ns_spectrum import DEFAULT_MAX_STEPS, fewest_ns_steps_joint
from normopt.errors import UserError
from normopt.metrics.jsonl import read_step_records
from normopt.models.matrix_roles import depth_group, matrix_type
from normopt.report.stats.student_t import t_critical
from normopt.run_dir import DIAGNOSTICS_FILE, RecordKind, RunDir

QUANTITIES = ("sv_rel_fro", "sv_rel_max")
# exponent of a fixed-shape spectrum under width-only growth (module docstring), and the
# shape-only control's
TRIVIAL_WIDTH_ONLY = -0.25
TRIVIAL_SHAPE_ONLY = 0.0
SOURCES = {"ns_input": "", "momentum": "momentum_"}  # field prefix in the ns_spectrum record
DEFAULT_BURN_IN = 0.5
DEFAULT_LEVEL = 0.1
MODEL_SIZE = (
    "M = n_params of the run line: total learnable parameters including the token embedding "
    "(and the output head when untied; a tied head counts once)"
)

Cell = tuple[str, str, float]  # (depth group, matrix type, quantile level)


# --------------------------------------------------------------------------- cells


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RunSpectra:
    """One run directory's model size and its ns_spectrum records, in step order."""

    folder: Path
    n_params: int
    n_layers: int
    planned_steps: int | None
    records: tuple[dict, ...]


def read_ns_spectrum(path: Path) -> tuple[dict | None, list[dict]]:
    """(the last "run" line, the "ns_spectrum" lines sorted by step) of a diagnostics.jsonl.

    A later line for a step replaces an earlier one (a resumed run logs some steps twice).
    An unterminated last line that does not parse is skipped (a killed writer leaves one);
    any other bad line is a UserError.
    """
    records, _ = read_step_records(path, "diagnostics", lambda record: record)
    run, spectra = None, {}
    for record in records:
        if record.get("kind") == RecordKind.RUN:
            run = record
        elif record.get("kind") == RecordKind.NS_SPECTRUM:
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
    run, records = read_ns_spectrum(path)
    if not records:
        return None
    if run is None:
        raise UserError(f"{path}: ns_spectrum records but no 'run' line (model size unknown)")
    return RunSpectra(
        path.parent,
        _positive_int(run, "n_params", path),
        _positive_int(run, "n_layers", path),
        _positive_int(run, "steps", path, required=False),
        tuple(records),
    )


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
    """ "ok" for a finite q > 0, "zero" for q <= 0 (no logarithm), "missing" for anything
    else: null, a non-finite float, or the "nan"/"inf" string the log writes for one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "missing"
    return "ok" if value > 0 else "zero"


def geometric_mean(values: Sequence[Any]) -> float | None:
    """exp(mean(log v)) over the values ``value_kind`` calls "ok"; None when there are none."""
    logs = [math.log(v) for v in values if value_kind(v) == "ok"]
    return math.exp(math.fsum(logs) / len(logs)) if logs else None


def run_samples(
    run: RunSpectra, burn_in: float = DEFAULT_BURN_IN, field: str = "sv_rel_fro", n_groups: int = 3
) -> dict[Cell, list[Any]]:
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
            where = f"{RunDir(run.folder).diagnostics}: step {record['step']}, {name}"
            if values is None and field.startswith(SOURCES["momentum"]):
                raise UserError(f"{where}: no {field!r} (logged before momentum quantiles were); use --source ns_input")
            if not isinstance(values, list) or len(values) != len(levels):
                raise UserError(f"{where}: {field!r} should list one value per level {levels}")
            try:
                group = depth_group(layer, run.n_layers, n_groups)
            except ValueError as exc:
                raise UserError(f"{where}: {exc}") from None
            for level, value in zip(levels, values):
                samples[(group, matrix_type(name), level)].append(value)
    return samples


def run_ranks(run: RunSpectra, burn_in: float = DEFAULT_BURN_IN, n_groups: int = 3) -> dict[tuple[str, str], float]:
    """(group, type) -> the geometric mean of the logged ``rank`` (min(rows, cols)) over the
    cell's matrices in the post-burn-in records; cells whose records predate it are absent."""
    ranks: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for record in post_burn_in(run, burn_in):
        for name, matrix in record.get("matrices", {}).items():
            if matrix.get("layer") is not None and matrix.get("rank") is not None:
                try:
                    group = depth_group(matrix["layer"], run.n_layers, n_groups)
                except ValueError:
                    continue  # run_samples reports it
                ranks[(group, matrix_type(name))].append(matrix["rank"])
    return {cell: r for cell, values in ranks.items() if (r := geometric_mean(values)) is not None}


def cell_means(samples: Mapping[Cell, Sequence[Any]]) -> dict[Cell, float]:
    """(group, type, level) -> ``geometric_mean`` of the cell's values (over its matrices and
    records); cells without a usable value are left out."""
    return {cell: q for cell, values in samples.items() if (q := geometric_mean(values)) is not None}


def run_quantiles(
    run: RunSpectra, burn_in: float = DEFAULT_BURN_IN, field: str = "sv_rel_fro", n_groups: int = 3
) -> dict[Cell, float]:
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
    # the residual statistics behind the intervals (module docstring); None with 2 runs
    beta_se: float | None = None
    beta_ci95: tuple[float, float] | None = None
    residual_sd: float | None = None  # s = sqrt(SS_res / (n - 2))
    mean_log_m: float = 0.0
    sxx: float = 0.0
    trivial_beta: float | None = None  # the exponent a fixed spectral shape gives these runs
    trivial_source: str | None = None
    indistinguishable_from_trivial: bool | None = None  # None: no interval

    @property
    def df(self) -> int:
        return self.n_runs - 2

    def predict(self, n_params: float) -> float:
        return self.c * n_params**self.beta

    def predict_interval(self, n_params: float) -> tuple[float, float] | None:
        """The 95% t interval of the fitted line at M = n_params, back on the q scale:
        exp(log q* -/+ t_{n-2} s sqrt(1/n + (x* - mean x)^2 / S_xx)); None with 2 runs."""
        if self.residual_sd is None or self.df < 1:
            return None
        x = math.log(n_params)
        half = (
            t_critical(self.df) * self.residual_sd * math.sqrt(1 / self.n_runs + (x - self.mean_log_m) ** 2 / self.sxx)
        )
        centre = math.log(self.c) + self.beta * x
        return math.exp(centre - half), math.exp(centre + half)


# parameter counts closer than this factor are one model size: runs of one shape with other
# norms (a Derf cell has a few thousand parameters more than its RMSNorm twin) are no size
# ladder, and a slope fitted across them is noise divided by ~0 (it overflowed exp())
SAME_SIZE_RATIO = 1.1


def distinct_sizes(sizes: Sequence[float]) -> int:
    """How many model sizes ``sizes`` holds, counting those within SAME_SIZE_RATIO of the
    previous (sorted) as the same."""
    count, last = 0, None
    for size in sorted(sizes):
        if last is None or size > last * SAME_SIZE_RATIO:
            count, last = count + 1, size
    return count


def fit_power_law(sizes: Sequence[float], values: Sequence[float]) -> tuple[float, float, float | None]:
    """(c, beta, R^2) of the least-squares line log q = log c + beta log M.

    With x = log M, y = log q: beta = S_xy / S_xx, log c = mean(y) - beta mean(x),
    R^2 = 1 - SS_res / SS_tot (None if SS_tot = 0; exactly 1 for two points).
    Needs at least two distinct sizes (:func:`distinct_sizes`).
    """
    if distinct_sizes(sizes) < 2:
        raise ValueError(f"a power-law fit needs model sizes at least {SAME_SIZE_RATIO}x apart")
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


def fit_residuals(sizes: Sequence[float], values: Sequence[float], beta: float, c: float) -> dict[str, Any]:
    """se(beta), its 95% t interval (n - 2 df), s, mean log M and S_xx of a fitted line
    (module docstring); the interval fields None with fewer than 3 points."""
    x = [math.log(m) for m in sizes]
    y = [math.log(q) for q in values]
    mx = math.fsum(x) / len(x)
    sxx = math.fsum((a - mx) ** 2 for a in x)
    out: dict[str, Any] = {"beta_se": None, "beta_ci95": None, "residual_sd": None, "mean_log_m": mx, "sxx": sxx}
    df = len(x) - 2
    if df < 1:
        return out
    ss_res = math.fsum((b - math.log(c) - beta * a) ** 2 for a, b in zip(x, y))
    s = math.sqrt(ss_res / df)
    se = s / math.sqrt(sxx)
    half = t_critical(df) * se
    out.update(beta_se=se, beta_ci95=(beta - half, beta + half), residual_sd=s)
    return out


def trivial_exponent(ranks: Sequence[tuple[float, float]] | None, field: str) -> tuple[float | None, str]:
    """The exponent a fixed spectral shape gives ``field`` over these runs (module docstring):
    0 for sv_rel_max; for sv_rel_fro the slope of log r^(-1/2) on log M over the runs'
    (n_params, rank) pairs, else the width-only -1/4."""
    if field.endswith("sv_rel_max"):
        return TRIVIAL_SHAPE_ONLY, "sv_rel_max is shape-only: 0"
    if ranks and distinct_sizes([m for m, _ in ranks]) >= 2:
        _, slope, _ = fit_power_law([m for m, _ in ranks], [r**-0.5 for _, r in ranks])
        return slope, "slope of rank^(-1/2) over these runs"
    return TRIVIAL_WIDTH_ONLY, "assumed width-only growth at fixed depth (no rank logged)"


def fit_all(
    points: Sequence[Mapping[str, Any]], groups: Sequence[str], field: str = "sv_rel_fro"
) -> tuple[list[PowerLawFit], list[str]]:
    """One fit per (group, type, level) seen in ``points`` ({"group", "type", "level",
    "n_params", "q"} and optionally "rank", one per run); cells with fewer than two sizes get
    a note instead (one per group and type). Each fit carries its interval, its trivial
    exponent and whether the interval contains it."""
    by_cell: dict[Cell, list[tuple[float, float]]] = defaultdict(list)
    ranks: dict[tuple[str, str], dict[str, tuple[float, float]]] = defaultdict(dict)
    for p in points:
        by_cell[(p["group"], p["type"], p["level"])].append((p["n_params"], p["q"]))
        if p.get("rank"):
            ranks[(p["group"], p["type"])][p.get("run", len(ranks))] = (p["n_params"], p["rank"])
    fits, unfitted = [], defaultdict(list)
    for cell in sorted(by_cell, key=lambda k: (groups.index(k[0]), k[1], k[2])):
        pairs = by_cell[cell]
        sizes = distinct_sizes([m for m, _ in pairs])
        if sizes < 2:
            unfitted[cell[:2]].append(f"q{cell[2]:g}")
            continue
        c, beta, r2 = fit_power_law([m for m, _ in pairs], [q for _, q in pairs])
        stats = fit_residuals([m for m, _ in pairs], [q for _, q in pairs], beta, c)
        trivial, source = trivial_exponent(list(ranks[cell[:2]].values()) or None, field)
        ci = stats["beta_ci95"]
        fits.append(
            PowerLawFit(
                *cell,
                c,
                beta,
                r2,
                len(pairs),
                sizes,
                **stats,
                trivial_beta=trivial,
                trivial_source=source,
                indistinguishable_from_trivial=None if ci is None else ci[0] <= trivial <= ci[1],
            )
        )
    return fits, [
        f"{cell_label(*key)}: only one model size has data at {', '.join(levels)}, no fit"
        for key, levels in unfitted.items()
    ]


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
        rows.append(
            row := {
                "group": cell[0],
                "type": cell[1],
                "level": cell[2],
                "values": total.total(),
                "zero": total["zero"],
                "missing": total["missing"],
                "runs": [r for r, k in kinds.items() if k["zero"] + k["missing"]],
                "runs_without_value": [r for r, k in kinds.items() if k and not k["ok"]],
            }
        )
        what = [f"{row['zero']} of {row['values']} values are 0"] if row["zero"] else []
        what += [f"{row['missing']} of {row['values']} missing or non-finite"] if row["missing"] else []
        note = (
            f"{cell_label(*cell)}: {', '.join(what)} (in {', '.join(row['runs'])}); the means and the fit excluded them"
        )
        if row["runs_without_value"]:
            note += f"; no point left for {', '.join(row['runs_without_value'])}"
        if row["zero"] and cell[2] >= level:
            note += "; NS cannot bring a zero singular value into the band"
        notes.append(note)
    return rows, notes


def cell_label(group: str, mtype: str, level: float | None = None) -> str:
    """'ffn.w2 late q0.1': how notes name a cell."""
    return f"{mtype} {group}" + ("" if level is None else f" q{level:g}")


# --------------------------------------------------------------------------- recommendation


def recommend_steps(
    fits: Sequence[PowerLawFit],
    target_params: float,
    level: float,
    coefficients: str,
    band: Sequence[float],
    max_steps: int = DEFAULT_MAX_STEPS,
) -> dict[str, dict[str, Any]]:
    """Per depth group:

    - "types": per matrix type with a fit at ``level``, the predicted quantiles
      q(M*) = min(c M*^beta, 1) at every fitted level and "ns_steps", the fewest steps
      bringing those at levels >= ``level`` into ``band`` at once (None: not in ``max_steps``)
    - "worst_type": the type needing the most steps (None counts as most; on a tie the
      smaller predicted q at ``level``)
    - "crossed": per type, the (lower, higher) level pairs whose predictions are out of order
      (``crossed_levels``); such a type gets no "ns_steps", nor does its group
      ("crossed_types" lists them)
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
            tracked_fits = [f for f in cell if f.level >= level]
            tracked = [predicted[f.level] for f in tracked_fits]
            crossed = crossed_levels(predicted)
            ends = [f.predict_interval(target_params) for f in tracked_fits]
            bounds = (
                None
                if any(e is None for e in ends)
                else ([min(e[0], 1.0) for e in ends], [min(e[1], 1.0) for e in ends])
            )
            out.setdefault(group, {"types": {}})["types"][mtype] = {
                "predicted": predicted,
                "tracked": tracked,
                "bounds": bounds,
                "crossed": crossed,
                "predicted_ci95": {f.level: e for f, e in zip(tracked_fits, ends)},
                "ns_steps": None if crossed else joint(tracked),
                "ns_steps_ci95": None if crossed or bounds is None else step_range(joint, *bounds),
            }
    for entry in out.values():
        types = entry["types"]
        entry["worst_type"] = max(
            types,
            key=lambda t: (
                math.inf if types[t]["ns_steps"] is None else types[t]["ns_steps"],
                -types[t]["predicted"][level],
            ),
        )
        tracked = [q for t in types.values() for q in t.pop("tracked")]
        bounds = [t.pop("bounds") for t in types.values()]
        entry["crossed_types"] = sorted(t for t, e in types.items() if e["crossed"])
        entry["ns_steps"] = None if entry["crossed_types"] else joint(tracked)
        entry["ns_steps_ci95"] = (
            None
            if entry["crossed_types"] or any(b is None for b in bounds)
            else step_range(joint, [q for b in bounds for q in b[0]], [q for b in bounds for q in b[1]])
        )
    return out


def step_range(joint, lower: Sequence[float], upper: Sequence[float]) -> tuple[int | None, int | None]:
    """(fewest, most) NS steps over the two ends of the quantiles' intervals: the steps at the
    upper ends and at the lower ends, ordered; None (not reached in max_steps) counts as most."""
    a, b = joint(upper), joint(lower)
    key = lambda v: math.inf if v is None else v  # noqa: E731
    return (a, b) if key(a) <= key(b) else (b, a)


def crossed_levels(predicted: Mapping[float, float]) -> list[tuple[float, float]]:
    """Pairs (lower level, higher level) whose predicted quantiles are in the wrong order:
    the lower quantile above the higher one. Fits that cross at the target describe no
    distribution, so no NS steps are derived from them."""
    levels = sorted(predicted)
    return [
        (lo, hi) for i, lo in enumerate(levels) for hi in levels[i + 1 :] if predicted[lo] > predicted[hi] * (1 + 1e-9)
    ]
