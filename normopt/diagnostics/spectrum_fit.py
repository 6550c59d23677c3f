"""``normopt spectrum ROOT``: power laws of the NS-input spectrum in model size, and the
fewest Newton-Schulz steps per depth they imply for a bigger model.

Input: every ``diagnostics.jsonl`` below ROOT (one run directory each). The lines used are

    {"step": 0, "kind": "run", "n_params": M, "n_layers": n, "steps": T, ...}
    {"step": s, "kind": "ns_spectrum", "coefficients": "quintic", "levels": [...],
     "band": [lo, hi], "matrices": {name: {"layer": l or null, "sv_rel_fro": [...],
                                           "sv_rel_max": [...], ...}, ...}}

(the per-matrix fields are ``ns_spectrum.ns_spectrum_record``'s). Other kinds are ignored.

Pipeline (after arXiv 2606.04058, which finds these quantiles follow power laws in M):

1. Depth groups: block l of n goes to group floor(G l / n) of G (default G = 3: "early"
   l < n/3, "mid" n/3 <= l < 2n/3, "late" the rest). Matrices outside blocks are skipped.
2. Burn-in: per run only records with step >= burn_in * T count. For each group and level
   the run's value is the geometric mean exp(mean(log q)) over the group's matrices and
   those records (the quantiles span decades, and the fit is in log space anyway).
3. Fit per group and level over runs (one point per run): log q = log c + beta log M,
   ordinary least squares, R^2 in log space.
4. Recommendation at a target size M*: q(M*) = c M*^beta (capped at 1, the largest a
   singular value of X_0 can be), then the fewest NS steps that bring the predicted
   quantiles at levels >= --level all into the band at once
   (``ns_spectrum.fewest_ns_steps_joint``; with the quintic band, which NS maps into
   itself, that is just ``fewest_ns_steps`` of the level's quantile).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from normopt.diagnostics.ns_spectrum import DEFAULT_MAX_STEPS, default_band, fewest_ns_steps_joint
from normopt.errors import UserError
from normopt.metrics.jsonl import read_step_records
from normopt.optim.newton_schulz import coefficient_schedule

DIAGNOSTICS_FILE = "diagnostics.jsonl"
QUANTITIES = ("sv_rel_fro", "sv_rel_max")
GROUP_NAMES = {1: ("all",), 2: ("early", "late"), 3: ("early", "mid", "late")}
DEFAULT_BURN_IN = 0.5
DEFAULT_LEVEL = 0.1


# --------------------------------------------------------------------------- depth groups


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


# --------------------------------------------------------------------------- per-run averages


def post_burn_in(run: RunSpectra, burn_in: float) -> list[dict]:
    """Records with step >= burn_in * T, T the planned steps (the last record's step when
    the run line has none)."""
    total = run.planned_steps if run.planned_steps is not None else run.records[-1]["step"]
    return [r for r in run.records if r["step"] >= burn_in * total]


def geometric_mean(values: Iterable[float]) -> float | None:
    """exp(mean(log v)) over the finite positive values; None when there are none."""
    logs = [math.log(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return math.exp(math.fsum(logs) / len(logs)) if logs else None


def _group_samples(run: RunSpectra, records: Sequence[dict], quantity: str,
                   n_groups: int) -> dict[tuple[str, float], list[float]]:
    """(group, level) -> every logged quantile of ``quantity`` in those records."""
    samples: dict[tuple[str, float], list[float]] = defaultdict(list)
    for record in records:
        levels = [float(v) for v in record.get("levels", ())]
        for name, matrix in record.get("matrices", {}).items():
            layer = matrix.get("layer")
            if layer is None:
                continue
            values = matrix.get(quantity)
            if not isinstance(values, list) or len(values) != len(levels):
                raise UserError(f"{run.folder / DIAGNOSTICS_FILE}: step {record['step']}, {name}: "
                                f"{quantity!r} should list one value per level {levels}")
            try:
                group = depth_group(layer, run.n_layers, n_groups)
            except ValueError as exc:
                raise UserError(f"{run.folder / DIAGNOSTICS_FILE}: {name}: {exc}") from None
            for level, value in zip(levels, values):
                samples[(group, level)].append(value)
    return samples


def run_quantiles(run: RunSpectra, burn_in: float = DEFAULT_BURN_IN, quantity: str = "sv_rel_fro",
                  n_groups: int = 3) -> dict[tuple[str, float], float]:
    """(group, level) -> geometric mean of the level's quantile over the group's matrices
    and the post-burn-in records. Empty when no record is past the burn-in."""
    samples = _group_samples(run, post_burn_in(run, burn_in), quantity, n_groups)
    means = {key: geometric_mean(values) for key, values in samples.items()}
    return {key: value for key, value in means.items() if value is not None}


# --------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class PowerLawFit:
    """q(M) = c M^beta for one depth group and quantile level."""

    group: str
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
    """One fit per (group, level) seen in ``points`` ({"group", "level", "n_params", "q"}, one
    per run); (group, level) pairs with fewer than two sizes are skipped with a note."""
    by_key: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        by_key[(p["group"], p["level"])].append((p["n_params"], p["q"]))
    fits, notes = [], []
    for group, level in sorted(by_key, key=lambda k: (groups.index(k[0]), k[1])):
        pairs = by_key[(group, level)]
        sizes = {m for m, _ in pairs}
        if len(sizes) < 2:
            notes.append(f"{group} level {level}: only one model size has data, no fit")
            continue
        c, beta, r2 = fit_power_law([m for m, _ in pairs], [q for _, q in pairs])
        fits.append(PowerLawFit(group, level, c, beta, r2, len(pairs), len(sizes)))
    return fits, notes


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
    """Per depth group: the predicted quantiles q(M*) = min(c M*^beta, 1) at every fitted
    level, and "ns_steps", the fewest steps bringing those at levels >= ``level`` into
    ``band`` at once (None if ``max_steps`` do not). Groups without a fit at ``level`` are
    left out."""
    by_group: dict[str, list[PowerLawFit]] = defaultdict(list)
    for fit in fits:
        by_group[fit.group].append(fit)
    out = {}
    for group, group_fits in by_group.items():
        if not any(f.level == level for f in group_fits):
            continue
        predicted = {f.level: min(f.predict(target_params), 1.0) for f in group_fits}
        tracked = [q for lv, q in predicted.items() if lv >= level]
        out[group] = {"predicted": predicted,
                      "ns_steps": fewest_ns_steps_joint(tracked, tuple(band), coefficients, max_steps)}
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


def _layer_ranges(n_layers: int, n_groups: int) -> dict[str, str]:
    """group -> "first-last" block indices of a model of ``n_layers``."""
    members: dict[str, list[int]] = defaultdict(list)
    for layer in range(n_layers):
        members[depth_group(layer, n_layers, n_groups)].append(layer)
    return {g: f"{ls[0]}-{ls[-1]}" if len(ls) > 1 else str(ls[0]) for g, ls in members.items()}


# --------------------------------------------------------------------------- analysis


def _ns_setting(run: RunSpectra) -> tuple[str, tuple[float, float]]:
    """(coefficient name, band) of a run's last ns_spectrum record (band defaulted by name)."""
    last = run.records[-1]
    coefficients = str(last.get("coefficients", "quintic"))
    band = last.get("band")
    try:
        return coefficients, (tuple(float(v) for v in band) if band else default_band(coefficients))
    except ValueError as exc:
        raise UserError(f"{run.folder / DIAGNOSTICS_FILE}: {exc}") from None


def analyze(root: str | Path, *, burn_in: float = DEFAULT_BURN_IN, quantity: str = "sv_rel_fro",
            n_groups: int = 3, target_params: float | None = None, target_layers: int | None = None,
            level: float = DEFAULT_LEVEL, coefficients: str | None = None,
            band: Sequence[float] | None = None, max_steps: int = DEFAULT_MAX_STEPS) -> dict[str, Any]:
    """Read the runs under ``root``, fit the power laws and build the recommendation.

    Returns a JSON-ready summary: settings, runs (with their averaged points), fits,
    recommendation (None when ``quantity`` is not the NS input's sv_rel_fro) and notes.
    Coefficients and band default to those logged by the largest run.
    """
    if not 0.0 <= burn_in < 1.0:
        raise UserError(f"--burn-in must be in [0, 1), got {burn_in}")
    if quantity not in QUANTITIES:
        raise UserError(f"--quantity must be one of {QUANTITIES}, got {quantity!r}")
    root = Path(root)
    groups = group_names(n_groups)
    notes: list[str] = []
    runs, points = [], []
    for run in discover_runs(root):
        averages = run_quantiles(run, burn_in, quantity, n_groups)
        if not averages:
            notes.append(f"{run.folder}: no ns_spectrum record after the burn-in, left out")
            continue
        runs.append(run)
        points += [{"run": str(run.folder), "n_params": run.n_params, "group": g, "level": lv, "q": q}
                   for (g, lv), q in averages.items()]
    sizes = sorted({run.n_params for run in runs})
    if len(sizes) < 2:
        found = ", ".join(format_size(m) for m in sizes) or "none"
        raise UserError(f"{root}: need runs of at least 2 model sizes after the burn-in, found {found}")
    fits, fit_notes = fit_all(points, groups)
    notes += fit_notes

    largest = max(runs, key=lambda r: (r.n_params, r.n_layers))
    logged_coefficients, logged_band = _ns_setting(largest)
    if len({_ns_setting(r)[0] for r in runs}) > 1:
        notes.append(f"runs log different NS coefficients; recommending for {coefficients or logged_coefficients}")
    coefficients = coefficients or logged_coefficients
    try:
        coefficient_schedule(coefficients)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if band is None:
        band = logged_band if coefficients == logged_coefficients else _default_band_or_error(coefficients)
    settings = {"root": str(root), "burn_in": burn_in, "quantity": quantity, "groups": list(groups),
                "level": level, "target_params": float(target_params or largest.n_params),
                "target_layers": target_layers or largest.n_layers, "coefficients": coefficients,
                "band": [float(v) for v in band], "max_steps": max_steps}
    span = math.log10(settings["target_params"] / sizes[-1])
    if span > 1:  # a power law fitted over a narrow range says little this far out
        notes.append(f"the target is {span:.1f} decades above the largest run "
                     f"({format_size(sizes[-1])}): an extrapolation, read it as a trend")
    recommendation = _recommendation(fits, settings, notes)
    return {"settings": settings,
            "runs": [{"folder": str(r.folder), "n_params": r.n_params, "n_layers": r.n_layers,
                      "planned_steps": r.planned_steps, "records_used": len(post_burn_in(r, burn_in))}
                     for r in runs],
            "points": points, "fits": [asdict(f) for f in fits],
            "recommendation": recommendation, "notes": notes}


def _default_band_or_error(coefficients: str) -> tuple[float, float]:
    try:
        return default_band(coefficients)
    except ValueError as exc:
        raise UserError(f"{exc} (use --band LO,HI)") from None


def _recommendation(fits: Sequence[PowerLawFit], settings: Mapping[str, Any],
                    notes: list[str]) -> dict[str, Any] | None:
    if settings["quantity"] != "sv_rel_fro":
        notes.append("no NS-step recommendation: NS sees sv_rel_fro, not " + settings["quantity"])
        return None
    level, n_groups = settings["level"], len(settings["groups"])
    fitted_levels = sorted({f.level for f in fits})
    if level not in fitted_levels:
        raise UserError(f"--level {level} is not a fitted quantile level; choose one of {fitted_levels}")
    per_group = recommend_steps(fits, settings["target_params"], level, settings["coefficients"],
                                settings["band"], settings["max_steps"])
    steps = {g: r["ns_steps"] for g, r in per_group.items()}
    for group, value in steps.items():
        if value is None:
            notes.append(f"{group}: the predicted quantiles do not reach the band within "
                         f"{settings['max_steps']} steps; left to optim.ns_steps")
    n_layers = settings["target_layers"]
    ranges = _layer_ranges(n_layers, n_groups)
    ordered = [g for g in settings["groups"] if g in per_group]
    return {"groups": [{"group": g, "layers": ranges.get(g), "ns_steps": steps[g],
                        "predicted": [{"level": lv, "q": q} for lv, q in sorted(per_group[g]["predicted"].items())]}
                       for g in ordered],
            "ns_steps_per_layer": ns_steps_per_layer(steps, n_layers, n_groups)}


# --------------------------------------------------------------------------- output


def _figure(**kwargs):
    """A matplotlib Figure without pyplot: no global backend state, PNGs drawn by Agg."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the spectrum plot needs matplotlib: pip install matplotlib") from None
    return Figure(layout="constrained", **kwargs)


def plot_spectrum(summary: Mapping[str, Any], path: Path) -> None:
    """Log-log q vs M, one panel per depth group: a run's averaged quantiles as points, one
    color per level, and the fitted lines drawn out to the target size (dotted line)."""
    settings = summary["settings"]
    groups = [g for g in settings["groups"] if any(p["group"] == g for p in summary["points"])]
    levels = sorted({p["level"] for p in summary["points"]})
    fig = _figure(figsize=(4.2 * len(groups), 3.8))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    colors = {lv: f"C{i % 10}" for i, lv in enumerate(levels)}
    sizes = [p["n_params"] for p in summary["points"]]
    lo, hi = min(sizes), max(max(sizes), settings["target_params"])
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    for ax, group in zip(axes, groups):
        for lv in levels:
            pts = [p for p in summary["points"] if p["group"] == group and p["level"] == lv]
            ax.scatter([p["n_params"] for p in pts], [p["q"] for p in pts], color=colors[lv], s=18)
            fit = next((f for f in summary["fits"] if f["group"] == group and f["level"] == lv), None)
            label = f"q{lv:g}" + (f": beta={fit['beta']:.3f}" if fit else "")
            if fit:
                ax.plot(grid, [fit["c"] * m ** fit["beta"] for m in grid], color=colors[lv], lw=1.2, label=label)
        ax.axvline(settings["target_params"], color="0.5", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{group} layers")
        ax.set_xlabel("parameters M")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"{settings['quantity']} quantile (after burn-in)")
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
    head = (f"log q = log c + beta log M ({s['quantity']} quantiles, geometric mean over matrices and records "
            f"from {s['burn_in']:.0%} of training on; {len(summary['runs'])} runs)")
    rows = [[f["group"], f"{f['level']:g}", f"{f['c']:.4g}", f"{f['beta']:+.4f}",
             "-" if f["r2"] is None else f"{f['r2']:.4f}", str(f["n_runs"])] for f in summary["fits"]]
    return head + "\n" + _table(["group", "level", "c", "beta", "R^2", "runs"], rows)


def recommendation_table(summary: Mapping[str, Any]) -> str:
    s, rec = summary["settings"], summary["recommendation"]
    levels = sorted({p["level"] for g in rec["groups"] for p in g["predicted"]})
    head = (f"NS steps for M* = {format_size(s['target_params'])} params, {s['target_layers']} layers "
            f"({s['coefficients']}, band [{s['band'][0]:g}, {s['band'][1]:g}], quantiles >= {s['level']:g} in band)")
    rows = []
    for g in rec["groups"]:
        q = {p["level"]: p["q"] for p in g["predicted"]}
        rows.append([g["group"], g["layers"] or "-", *(f"{q[lv]:.3g}" if lv in q else "-" for lv in levels),
                     "-" if g["ns_steps"] is None else str(g["ns_steps"])])
    table = _table(["group", "layers", *(f"q{lv:g}(M*)" for lv in levels), "ns_steps"], rows)
    return f"{head}\n{table}\n\noptim.ns_steps_per_layer={rec['ns_steps_per_layer']}"


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
    [--level 0.1] [--out DIR] ...``: fit, print the tables, write spectrum.png and
    spectrum.json. Raises UserError (exit 2 in the CLI) for a missing ROOT, no
    ns_spectrum records, or fewer than two model sizes."""
    parser = argparse.ArgumentParser(
        prog="normopt spectrum",
        description="Fit power laws of the NS-input singular-value quantiles in model size, per depth "
                    "group, and recommend Newton-Schulz steps per layer for a target size.")
    parser.add_argument("root", help="folder searched recursively for run directories with diagnostics.jsonl")
    parser.add_argument("--burn-in", type=float, default=DEFAULT_BURN_IN,
                        help="use records from this fraction of the planned steps on (default 0.5)")
    parser.add_argument("--target-params", type=parse_size, default=None,
                        help="model size to recommend for, e.g. 1.1e9, 1.1B, 350M (default: largest run)")
    parser.add_argument("--target-layers", type=int, default=None,
                        help="blocks of the target model (default: n_layers of the largest run)")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL,
                        help="smallest quantile level that must reach the band (default 0.1)")
    parser.add_argument("--quantity", choices=QUANTITIES, default="sv_rel_fro",
                        help="sigma / ||G||_F (what NS sees; default) or sigma / sigma_max (fits only)")
    parser.add_argument("--groups", type=int, default=3, help="number of depth groups (default 3)")
    parser.add_argument("--coefficients", default=None,
                        help="NS coefficients to recommend for (default: as logged by the largest run)")
    parser.add_argument("--band", type=_parse_band, default=None, metavar="LO,HI",
                        help="target band for NS outputs (default: as logged, or the coefficients' default)")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="give up past this many steps")
    parser.add_argument("--out", default=None, help="where to write spectrum.png and spectrum.json (default: ROOT)")
    args = parser.parse_args(argv)
    if args.target_layers is not None and args.target_layers < 1:
        raise UserError(f"--target-layers must be >= 1, got {args.target_layers}")
    summary = write_spectrum(args.root, args.out, burn_in=args.burn_in, quantity=args.quantity,
                             n_groups=args.groups, target_params=args.target_params,
                             target_layers=args.target_layers, level=args.level,
                             coefficients=args.coefficients, band=args.band, max_steps=args.max_steps)
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
