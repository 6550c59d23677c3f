"""Report over a factorial experiment: final losses, gaps to a baseline, interactions.

``normopt report ROOT`` reads the cells under ROOT (one subfolder per training run) and writes
``report.md``, ``summary.json`` and PNG plots. The work is split by stage, one sub-package each,
and each stage imports only those before it (``render`` and ``plots`` never each other):

* :mod:`normopt.report.cells`: reading run directories (``cell_reading``: metrics, config,
  cell.json, diagnostics; ``cost``), which config keys are compared (``axes``: norm x optimizer
  by default; any axes a spec names), placing cells into arms and flagging the cells that cannot
  count (``arms``, ``cell_assessment``), the setup the report opens with (``run_setup``) and a
  tuned grid's tuning folder (``tuning_runs``);
* :mod:`normopt.report.stats`: group statistics, gaps, interactions, fix recovery and
  ``build_summary`` (``summary``: the content of summary.json), with the formulas (``contrasts``
  the estimators, ``tail_classes`` the head/tail split, ``left_out`` the cells left out of each
  contrast and which way they push it); ``over_training``: the gaps and interactions at every
  eval step and whether the interaction was stable over the last quarter of training;
  ``tuning``: a tuned grid's choices and the interaction at each common value of the tuned key;
  ``model_size``: with a size axis, each interaction against log(parameters);
* :mod:`normopt.report.render`: report.md and the terminal's text (``markdown`` puts report.md
  together from the sections; ``notes`` merges a note said of several cells into one line,
  ``tables`` the table syntax);
* :mod:`normopt.report.plots`: the PNG plots (``smoothing`` in stats the centred mean drawn over
  the loss curves);
* this module: ``write_report`` (all of the above for one root) and the ``normopt report``
  command line (``report_main``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from normopt.cli_args import CommandParser
from normopt.errors import UserError
from normopt.metrics.logger import jsonable
from normopt.models.norms import default_fixes
from normopt.output_paths import check_output_folder
from normopt.plugins import check_run_plugins
from normopt.report.cells.axes import (
    ReportAxes,
    cell_level,
    infer_axes,
    override_axes,
    place_cells,
    read_experiment_file,
)
from normopt.report.cells.cell_reading import Cell, discover_cells
from normopt.report.cells.run_setup import experiment_setup
from normopt.report.plots.diagnostics import (
    plot_saturation,
    plot_saturation_layers,
    plot_spectral_norm,
    plot_tail_tokens,
)
from normopt.report.plots.losses import (
    plot_final_losses,
    plot_gaps,
    plot_loss_curves,
    smoothing_label,
)
from normopt.report.plots.model_size import plot_model_size
from normopt.report.plots.over_training import plot_over_training
from normopt.report.plots.tuning import plot_tuning
from normopt.report.render.answer import answer_paragraph
from normopt.report.render.final_step_tables import interaction_table, main_table, recovery_table
from normopt.report.render.markdown import render_markdown
from normopt.report.render.text import in_stratum, strata, stratum_label, stratum_prefix
from normopt.report.render.tuning import tuning_lines
from normopt.report.stats.model_size import size_analysis
from normopt.report.stats.over_training import over_training
from normopt.report.stats.summary import build_summary
from normopt.report.stats.tuning import tuning_analysis

PLOT_FILES = {"loss_curves": "loss_curves.png", "final_eval_loss": "final_eval_loss.png", "gaps": "gaps.png"}
# written only when some cell logged the records each one draws
DIAGNOSTIC_PLOT_FILES = {
    "saturation": "saturation.png",
    "saturation_layers": "saturation_layers.png",
    "spectral_norm": "spectral_norm.png",
    "tail_tokens": "tail_tokens.png",
}
# the over-training curves, a tuned grid's loss against the tuned value and the interaction against
# model size, each drawn inside its own report.md section (only when there is something to draw)
ANALYSIS_PLOT_FILES = {
    "over_training": "over_training.png",
    "tuning": "tuning.png",
    "model_size": "interaction_vs_size.png",
}
ANALYSIS_DRAWERS = {"over_training": plot_over_training, "tuning": plot_tuning, "model_size": plot_model_size}
DIAGNOSTIC_DRAWERS = {
    "saturation": plot_saturation,
    "saturation_layers": plot_saturation_layers,
    "spectral_norm": plot_spectral_norm,
    "tail_tokens": plot_tail_tokens,
}


# --------------------------------------------------------------------------- edges


def plot_view(cells: Sequence[Cell], summary: Mapping[str, Any]) -> tuple[list[Cell], dict[str, Any]]:
    """The cells and summary as the plots see them: with strata, each (across level, stratum)
    becomes a panel of its own (its label "level | stratum"), so no plot mixes strata."""
    if not summary["settings"]["axes"]["strata"]:
        return list(cells), dict(summary)

    def label(optim: str | None, stratum: Any) -> str:
        text = stratum if isinstance(stratum, str) else stratum_label(stratum)
        return f"{optim} | {text}" if text else str(optim)

    records = {r["path"]: r for r in summary["cells"]}
    view = dict(summary)
    view["cells"] = [{**r, "optim": label(r["optim"], r.get("stratum", ""))} for r in summary["cells"]]
    for key in ("groups", "gaps"):
        view[key] = [{**r, "optim": label(r["optim"], r.get("stratum"))} for r in summary[key]]
    view["optims"] = list(dict.fromkeys(label(g["optim"], g["stratum"]) for g in summary["groups"]))
    placed = [replace(c, optim=label(c.optim, records[str(c.path)].get("stratum", ""))) for c in cells]
    return placed, view


def write_report(
    root: str | Path,
    out: str | Path | None = None,
    *,
    axes: ReportAxes | None = None,
    baseline_norm: str | None = None,
    reference_optim: str | None = None,
    smoothing: float = 0.9,
    fixes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Read the cells under ``root``, write report.md, summary.json and the PNG plots into
    ``out`` (default ``root``), and return the summary (with "files": the paths written).
    ``axes``: which keys are compared (default: the root's experiment file, else inferred from
    the cells; :mod:`normopt.report.cells.axes`); ``baseline_norm`` / ``reference_optim``
    override its levels and ``fixes`` its fixes."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
    root = Path(root)
    out = root if out is None else Path(out)
    cells = discover_cells(root)
    for cell in cells:  # a cell trained with a plugin is read only with that plugin, unchanged
        check_run_plugins(cell.path, "report")
    axes = axes or read_experiment_file(root) or infer_axes(cells)
    summary = build_summary(cells, axes=axes, baseline_norm=baseline_norm, reference_optim=reference_optim, fixes=fixes)
    summary["root"] = str(root)
    summary["over_training"] = over_training(cells, summary)
    tuning = tuning_analysis(root, cells, summary, axes, fixes)
    if tuning is not None:
        summary["tuning"] = tuning
    model_size = size_analysis(cells, summary, axes)
    if model_size is not None:
        summary["model_size"] = model_size
    out.mkdir(parents=True, exist_ok=True)
    plot_cells, view = plot_view(place_cells(cells, axes), summary)
    plots = {name: out / filename for name, filename in PLOT_FILES.items()}
    plot_loss_curves(plot_cells, view, plots["loss_curves"], smoothing)
    plot_final_losses(view, plots["final_eval_loss"])
    plot_gaps(view, plots["gaps"])
    diagnostic_plots = {
        name: out / filename
        for name, filename in DIAGNOSTIC_PLOT_FILES.items()
        if DIAGNOSTIC_DRAWERS[name](plot_cells, view, out / filename)
    }
    analysis_plots = {
        name: out / filename
        for name, filename in ANALYSIS_PLOT_FILES.items()
        if ANALYSIS_DRAWERS[name](summary, out / filename)
    }
    files = {
        "report": out / "report.md",
        "summary": out / "summary.json",
        **plots,
        **diagnostic_plots,
        **analysis_plots,
    }
    summary["settings"]["smoothing"] = smoothing
    summary["settings"]["smoothing_window"] = smoothing_label(smoothing)
    summary["setup"] = experiment_setup(cells)
    summary["files"] = {name: str(p) for name, p in files.items()}
    files["report"].write_text(
        render_markdown(
            summary, {n: p.name for n, p in plots.items()}, {n: p.name for n, p in diagnostic_plots.items()}
        )
    )
    files["summary"].write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    return summary


def _parse_fix(text: str) -> tuple[str, str]:
    variant, sep, norm = text.partition("=")
    if not sep or not variant or not norm:
        raise argparse.ArgumentTypeError(f"expected VARIANT=NORM, got {text!r}")
    return variant, norm


def report_main(argv: Sequence[str] | None = None) -> int:
    """``normopt report ROOT [--out DIR] [--compare KEY] [--baseline LEVEL] [--across KEY|none]
    [--reference LEVEL] [--smoothing 0.9] [--fix VARIANT=LEVEL ...]``: write the report, print
    the main tables and the paths written. Raises UserError (exit 2 in the CLI) for a bad root
    or unreadable files."""
    parser = CommandParser(
        prog="normopt report",
        description="Summarize a factorial experiment: one subfolder of ROOT per cell (run directory). "
        "The axes come from ROOT's experiment.json (written by normopt factorial), else from "
        "the cells; the options below override them.",
    )
    parser.add_argument("root", help="folder holding one run directory per cell")
    parser.add_argument("--out", default=None, help="where to write report.md, summary.json, plots (default: ROOT)")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="KEY",
        help="config key whose levels are compared with the baseline (default model.norm)",
    )
    parser.add_argument(
        "--baseline",
        "--baseline-norm",
        dest="baseline",
        default=None,
        metavar="LEVEL",
        help="level the gaps are measured against (default rmsnorm, or the axis's first level)",
    )
    parser.add_argument(
        "--across",
        default=None,
        metavar="KEY",
        help="config key whose levels the gaps are compared across (default optim.name; 'none' for gaps only)",
    )
    parser.add_argument(
        "--reference",
        "--reference-optim",
        dest="reference",
        default=None,
        metavar="LEVEL",
        help="level of the across axis the interactions are measured against (default adamw, "
        "or the axis's first level)",
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        default=0.9,
        help="train-loss smoothing in [0, 1): a centred mean over about (1+s)/(1-s) logged points (0 = none)",
    )
    parser.add_argument(
        "--fix",
        type=_parse_fix,
        action="append",
        default=[],
        metavar="VARIANT=LEVEL",
        help=f"declare a fix arm (added to the defaults; for the norm axis {default_fixes()})",
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    cells = discover_cells(root)
    axes = override_axes(
        read_experiment_file(root) or infer_axes(cells),
        compare=args.compare,
        baseline=args.baseline,
        across=args.across,
        reference=args.reference,
        fixes=dict(args.fix),
    )
    levels = {cell_level(cell, axes.compare) for cell in cells} - {None}
    for variant, base in args.fix:
        for level in (variant, base):
            if level not in levels:
                raise UserError(
                    f"--fix {variant}={base}: no cell has {axes.compare}={level} "
                    f"(levels: {', '.join(sorted(levels)) or 'none'})"
                )
    if args.out:
        check_output_folder(Path(args.out), "--out")
    summary = write_report(root, args.out, axes=axes, smoothing=args.smoothing)
    print_summary(summary)
    return 0


def print_summary(summary: Mapping[str, Any]) -> None:
    """The answer, the main table, interactions and fix recoveries (per stratum), the head/tail
    sentences, left-out cells, files written."""
    print(answer_paragraph(summary))
    for stratum in strata(summary):
        print()
        if stratum is not None:
            print(f"[{stratum_label(stratum)}]")
        print(main_table(summary, stratum))
        if in_stratum(summary["interactions"], stratum):
            print()
            print(interaction_table(summary, stratum))
        if in_stratum(summary["recoveries"], stratum):
            print()
            print(recovery_table(summary, stratum))
    if summary.get("tuning"):
        print()
        print("\n".join(tuning_lines(summary)))
    if summary["tail_classes"]:
        print()
        for item in summary["tail_classes"]:
            print(f"{stratum_prefix(item)}{item['sentence']}")
    left_out = [c["name"] for c in summary["cells"] if not c["included"]]
    if left_out:
        print(f"\nleft out ({len(left_out)}): {', '.join(left_out)} (see report.md)")
    print()
    for path in summary["files"].values():
        print(f"wrote {path}")
