"""``normopt spectrum ROOT``: fit the spectrum power laws (:mod:`normopt.spectrum.fit`)
over every run below ROOT, recommend NS steps per depth for a target model size, and write
``spectrum.png`` and ``spectrum.json`` beside a printed summary.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from normopt.cli_args import CommandParser
from normopt.diagnostics.ns_spectrum import DEFAULT_MAX_STEPS, default_band
from normopt.errors import UserError
from normopt.models.matrix_roles import group_names
from normopt.optim.newton_schulz import coefficient_schedule
from normopt.output_paths import check_output_folder
from normopt.report.plots.style import figure
from normopt.report.render.tables import text_table
from normopt.spectrum.fit import (
    DEFAULT_BURN_IN,
    DEFAULT_LEVEL,
    MODEL_SIZE,
    QUANTITIES,
    SAME_SIZE_RATIO,
    SOURCES,
    PowerLawFit,
    RunSpectra,
    cell_label,
    cell_means,
    depth_group,
    discover_runs,
    distinct_sizes,
    fit_all,
    post_burn_in,
    recommend_steps,
    run_ranks,
    run_samples,
    unusable_cells,
)
from normopt.spectrum.layer_rules import ns_steps_per_layer

# --------------------------------------------------------------------------- model sizes

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


# --------------------------------------------------------------------------- analysis


def _ns_config(
    runs: Sequence[RunSpectra], coefficients: str | None, band: Sequence[float] | None, notes: list[str]
) -> tuple[str, tuple[float, ...]]:
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


def analyze(
    root: str | Path,
    *,
    burn_in: float = DEFAULT_BURN_IN,
    quantity: str = "sv_rel_fro",
    source: str = "ns_input",
    n_groups: int = 3,
    target_params: float | None = None,
    target_layers: int | None = None,
    level: float = DEFAULT_LEVEL,
    coefficients: str | None = None,
    band: Sequence[float] | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> dict[str, Any]:
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
    control_field = SOURCES[source] + "sv_rel_max" if quantity == "sv_rel_fro" else None
    runs, points, control_points, samples = [], [], [], {}
    for run in discover_runs(root):
        samples[str(run.folder)] = per_run = run_samples(run, burn_in, field, n_groups)
        if not (means := cell_means(per_run)):
            notes.append(f"{run.folder}: no usable ns_spectrum value after the burn-in, left out")
            continue
        runs.append(run)
        ranks = run_ranks(run, burn_in, n_groups)
        points += [
            {
                "run": str(run.folder),
                "n_params": run.n_params,
                "group": g,
                "type": t,
                "level": lv,
                "q": q,
                "rank": ranks.get((g, t)),
            }
            for (g, t, lv), q in means.items()
        ]
        if control_field is not None:
            control = cell_means(run_samples(run, burn_in, control_field, n_groups))
            control_points += [
                {"run": str(run.folder), "n_params": run.n_params, "group": g, "type": t, "level": lv, "q": q}
                for (g, t, lv), q in control.items()
            ]
    sizes = sorted({run.n_params for run in runs})
    if distinct_sizes(sizes) < 2:
        found = ", ".join(format_size(m) for m in sizes) or "none"
        raise UserError(
            f"{root}: need runs of at least 2 model sizes ({SAME_SIZE_RATIO}x apart) after the burn-in, found {found}"
        )
    unusable, unusable_notes = unusable_cells(samples, level)
    fits, fit_notes = fit_all(points, groups, field)
    control_fits = fit_all(control_points, groups, control_field)[0] if control_field else []
    notes += unusable_notes + fit_notes
    notes += _trivial_notes(fits, field)
    coefficients, band = _ns_config(runs, coefficients, band, notes)
    largest = max(runs, key=lambda r: (r.n_params, r.n_layers))
    settings = {
        "root": str(root),
        "model_size": MODEL_SIZE,
        "burn_in": burn_in,
        "quantity": quantity,
        "source": source,
        "field": field,
        "groups": list(groups),
        "level": level,
        "target_params": float(target_params or largest.n_params),
        "target_layers": target_layers or largest.n_layers,
        "coefficients": coefficients,
        "band": list(band),
        "max_steps": max_steps,
    }
    span = math.log10(settings["target_params"] / sizes[-1])
    if span > 1:  # a power law fitted over a narrow range says little this far out
        notes.append(
            f"the target is {span:.1f} decades above the largest run "
            f"({format_size(sizes[-1])}): an extrapolation, read it as a trend"
        )
    cells = {(p["group"], p["type"]) for p in points}
    return {
        "settings": settings,
        "runs": [
            {
                "folder": str(r.folder),
                "n_params": r.n_params,
                "n_layers": r.n_layers,
                "planned_steps": r.planned_steps,
                "records_used": len(post_burn_in(r, burn_in)),
            }
            for r in runs
        ],
        "points": points,
        "fits": [asdict(f) for f in fits],
        "control_fits": [asdict(f) for f in control_fits],
        "unusable": unusable,
        "recommendation": _recommendation(fits, cells, settings, notes),
        "notes": notes,
    }


def _trivial_notes(fits: Sequence[PowerLawFit], field: str) -> list[str]:
    """One note on the exponents whose interval contains the trivial one, and one on those
    without an interval (two runs)."""
    notes = []
    trivial = [f for f in fits if f.indistinguishable_from_trivial]
    if trivial:
        cells = ", ".join(cell_label(f.group, f.type, f.level) for f in trivial)
        notes.append(
            f"{len(trivial)} of {len(fits)} {field} exponents are indistinguishable from the trivial one "
            f"(their 95% interval contains what a fixed spectral shape gives these runs; "
            f"{trivial[0].trivial_source}): {cells}. They show no change of the spectrum's shape with M"
        )
    if any(f.beta_ci95 is None for f in fits):
        notes.append(
            "fits over 2 runs have no interval on their exponent (0 residual degrees of freedom): "
            "add a run at a third size, or a second seed"
        )
    return notes


def _recommendation(
    fits: Sequence[PowerLawFit], cells: set[tuple[str, str]], settings: Mapping[str, Any], notes: list[str]
) -> dict[str, Any] | None:
    """``recommend_steps`` as JSON (groups in depth order, their block ranges in the target
    model, the ns_steps_per_layer value), with a note for every type or group that has fits
    but none at --level (left out of the steps), every group out of reach, and every group
    whose joint count exceeds its worst type's."""
    if settings["quantity"] != "sv_rel_fro":
        notes.append("no NS-step recommendation: NS sees sv_rel_fro, not " + settings["quantity"])
        return None
    if settings["source"] == "momentum":
        notes.append(
            "recommending from the momentum buffer's quantiles: what NS receives without "
            "Nesterov; with Nesterov it receives g + beta m (--source ns_input)"
        )
    level, n_groups, n_layers = settings["level"], len(settings["groups"]), settings["target_layers"]
    fitted_levels = sorted({f.level for f in fits})
    if level not in fitted_levels:
        raise UserError(f"--level {level} is not a fitted quantile level; choose one of {fitted_levels}")
    per_group = recommend_steps(
        fits, settings["target_params"], level, settings["coefficients"], settings["band"], settings["max_steps"]
    )
    fitted = {(f.group, f.type) for f in fits}
    for group, mtype in sorted(fitted - {(g, t) for g, e in per_group.items() for t in e["types"]}):
        notes.append(f"{cell_label(group, mtype)}: no fit at q{level:g}, so it does not enter the {group} steps")
    for group in sorted({g for g, _ in cells} - set(per_group), key=settings["groups"].index):
        notes.append(f"{group}: no matrix type has a fit at q{level:g}; its blocks are left to optim.ns_steps")
    steps = {g: r["ns_steps"] for g, r in per_group.items()}
    for group, value in steps.items():
        worst = per_group[group]["worst_type"]
        for mtype in per_group[group]["crossed_types"]:
            pairs = ", ".join(f"q{lo:g} above q{hi:g}" for lo, hi in per_group[group]["types"][mtype]["crossed"])
            notes.append(
                f"{cell_label(group, mtype)}: the quantile fits cross at M* ({pairs}): no NS-steps advice "
                f"for {group}; its blocks are left to optim.ns_steps"
            )
        if per_group[group]["crossed_types"]:
            continue
        if value is None:
            notes.append(
                f"{group}: the predicted quantiles of {worst} (or of all types at once) do not reach "
                f"the band within {settings['max_steps']} steps; left to optim.ns_steps"
            )
        elif value != per_group[group]["types"][worst]["ns_steps"]:
            notes.append(
                f"{group}: every type in the band at once takes {value} steps, more than {worst} alone "
                f"(the schedule leaves the band again after entering it)"
            )
    members = defaultdict(list)
    for layer in range(n_layers):
        members[depth_group(layer, n_layers, n_groups)].append(layer)
    return {
        "groups": [
            {
                "group": g,
                "layers": "-".join(map(str, sorted({members[g][0], members[g][-1]}))) if members[g] else None,
                "ns_steps": steps[g],
                "worst_type": per_group[g]["worst_type"],
                "ns_steps_ci95": per_group[g]["ns_steps_ci95"],
                "crossed_types": per_group[g]["crossed_types"],
                "types": [
                    {
                        "type": t,
                        "ns_steps": e["ns_steps"],
                        "ns_steps_ci95": e["ns_steps_ci95"],
                        "crossed": [list(pair) for pair in e["crossed"]],
                        "predicted": [{"level": lv, "q": q} for lv, q in sorted(e["predicted"].items())],
                    }
                    for t, e in sorted(per_group[g]["types"].items())
                ],
            }
            for g in settings["groups"]
            if g in per_group
        ],
        "ns_steps_per_layer": ns_steps_per_layer(steps, n_layers, n_groups),
    }


# --------------------------------------------------------------------------- output


def plot_spectrum(summary: Mapping[str, Any], path: Path) -> None:
    """Log-log q vs M at the --level quantile, one panel per depth group, one color per
    matrix type: a run's averaged quantile as points, the fitted line drawn out to the
    target size (dotted line)."""
    s = summary["settings"]
    points = [p for p in summary["points"] if p["level"] == s["level"]] or summary["points"]
    level = points[0]["level"]
    groups = [g for g in s["groups"] if any(p["group"] == g for p in points)]
    types = sorted({p["type"] for p in points})
    fig = figure(figsize=(4.2 * len(groups), 3.8))
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    lo, hi = min(p["n_params"] for p in points), max(max(p["n_params"] for p in points), s["target_params"])
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    for ax, group in zip(axes, groups):
        for i, mtype in enumerate(types):
            pts = [p for p in points if p["group"] == group and p["type"] == mtype]
            ax.scatter([p["n_params"] for p in pts], [p["q"] for p in pts], color=f"C{i % 10}", s=18)
            fit = next(
                (f for f in summary["fits"] if (f["group"], f["type"], f["level"]) == (group, mtype, level)), None
            )
            if fit:
                ax.plot(
                    grid,
                    [fit["c"] * m ** fit["beta"] for m in grid],
                    color=f"C{i % 10}",
                    lw=1.2,
                    label=f"{mtype}: beta={fit['beta']:.3f}",
                )
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


def _beta_ci(fit: Mapping[str, Any] | None) -> str:
    if fit is None:
        return "-"
    ci = fit["beta_ci95"]
    return f"{fit['beta']:+.4f}" + ("" if ci is None else f" [{ci[0]:+.4f}, {ci[1]:+.4f}]")


def _trivial(fit: Mapping[str, Any]) -> str:
    flag = fit["indistinguishable_from_trivial"]
    return f"{fit['trivial_beta']:+.3f}" + ("" if flag is None else " (within CI)" if flag else " (outside CI)")


def fits_table(summary: Mapping[str, Any]) -> str:
    s = summary["settings"]
    head = (
        f"{s['model_size']}\nlog q = log c + beta log M ({s['field']} quantiles, geometric mean over a "
        f"type's matrices and the records from {s['burn_in']:.0%} of training on; {len(summary['runs'])} runs). "
        f"beta with its 95% t interval from the fit's residuals (runs - 2 df). trivial: the exponent a fixed "
        f"spectral shape gives these runs (sv_rel_fro ~ rank^(-1/2); -0.25 for width-only growth), and whether "
        f"the interval contains it"
    )
    control = {(f["group"], f["type"], f["level"]): f for f in summary.get("control_fits", [])}
    rows = [
        [
            f["group"],
            f["type"],
            f"{f['level']:g}",
            f"{f['c']:.4g}",
            _beta_ci(f),
            _trivial(f),
            _beta_ci(control.get((f["group"], f["type"], f["level"]))),
            "-" if f["r2"] is None else f"{f['r2']:.4f}",
            str(f["n_runs"]),
        ]
        for f in summary["fits"]
    ]
    header = [
        "group",
        "type",
        "level",
        "c",
        "beta [95% CI]",
        "trivial beta",
        "control: sv_rel_max beta [95% CI]" if control else "control",
        "R^2",
        "runs",
    ]
    return head + "\n" + text_table(header, rows)


def recommendation_table(summary: Mapping[str, Any]) -> str:
    s, rec = summary["settings"], summary["recommendation"]
    levels = sorted({p["level"] for g in rec["groups"] for t in g["types"] for p in t["predicted"]})
    head = (
        f"NS steps for M* = {format_size(s['target_params'])} params (n_params), {s['target_layers']} layers "
        f"({s['coefficients']}, band [{s['band'][0]:g}, {s['band'][1]:g}], quantiles >= {s['level']:g} in band)"
    )
    rows, summary_rows = [], []
    for g in rec["groups"]:
        steps = "crossed" if g["crossed_types"] else "-" if g["ns_steps"] is None else str(g["ns_steps"])
        summary_rows.append(
            [g["group"], g["layers"] or "-", steps, _step_range(g.get("ns_steps_ci95")), g["worst_type"]]
        )
        for t in g["types"]:
            q = {p["level"]: p["q"] for p in t["predicted"]}
            rows.append(
                [
                    g["group"],
                    t["type"],
                    *(f"{q[lv]:.3g}" if lv in q else "-" for lv in levels),
                    "crossed" if t["crossed"] else "-" if t["ns_steps"] is None else str(t["ns_steps"]),
                    _step_range(t.get("ns_steps_ci95")),
                ]
            )
    per_type = text_table(["group", "type", *(f"q{lv:g}(M*)" for lv in levels), "ns_steps", "95% range"], rows)
    per_group = text_table(["group", "layers", "ns_steps", "95% range", "worst type"], summary_rows)
    return f"{head}\n{per_type}\n\n{per_group}\n\noptim.ns_steps_per_layer={rec['ns_steps_per_layer']}"


def _step_range(steps: Sequence[int | None] | None) -> str:
    """'5-7' from the steps at the two ends of the predicted quantiles' intervals; '-' without
    an interval (two runs); '>max' for an end that never reaches the band."""
    if steps is None:
        return "-"
    return "-".join(">max" if v is None else str(v) for v in steps) if steps[0] != steps[1] else str(steps[0])


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
    parser = CommandParser(
        prog="normopt spectrum",
        description="Fit power laws of the NS-input singular-value quantiles in model size, per depth "
        "group and matrix type, and recommend Newton-Schulz steps per layer for a target size.",
    )
    parser.add_argument("root", help="folder searched recursively for run directories with diagnostics.jsonl")
    parser.add_argument(
        "--burn-in",
        type=float,
        default=DEFAULT_BURN_IN,
        help="use records from this fraction of the planned steps on (default 0.5)",
    )
    parser.add_argument(
        "--target-params",
        type=parse_size,
        default=None,
        help="model size to recommend for, counted like n_params (all parameters, embeddings "
        "included), e.g. 1.1e9, 1.1B, 350M (default: largest run)",
    )
    parser.add_argument(
        "--target-layers",
        type=int,
        default=None,
        help="blocks of the target model (default: n_layers of the largest run)",
    )
    parser.add_argument(
        "--level",
        type=float,
        default=DEFAULT_LEVEL,
        help="smallest quantile level that must reach the band (default 0.1)",
    )
    parser.add_argument(
        "--quantity",
        choices=QUANTITIES,
        default="sv_rel_fro",
        help="sigma / ||G||_F (what NS sees; default) or sigma / sigma_max (fits only)",
    )
    parser.add_argument(
        "--source",
        choices=tuple(SOURCES),
        default="ns_input",
        help="quantiles of the matrix fed to NS (default) or of the momentum buffer",
    )
    parser.add_argument("--groups", type=int, default=3, dest="n_groups", help="number of depth groups (default 3)")
    parser.add_argument(
        "--coefficients", default=None, help="NS coefficients to recommend for (default: as logged by the largest run)"
    )
    parser.add_argument(
        "--band",
        type=_parse_band,
        default=None,
        metavar="LO,HI",
        help="target band for NS outputs (default: as logged, or the coefficients' default)",
    )
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="give up past this many steps")
    parser.add_argument("--out", default=None, help="where to write spectrum.png and spectrum.json (default: ROOT)")
    args = parser.parse_args(argv)
    if args.target_layers is not None and args.target_layers < 1:
        raise UserError(f"--target-layers must be >= 1, got {args.target_layers}")
    options = {key: value for key, value in vars(args).items() if key not in ("root", "out", "plugin")}
    if args.out:
        check_output_folder(Path(args.out), "--out")
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
