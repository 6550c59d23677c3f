"""Report over a factorial experiment: final losses, norm gaps, norm x optimizer interactions.

``normopt report ROOT`` reads the cells under ROOT (one subfolder per training run) and writes
``report.md``, ``summary.json`` and PNG plots. The work is split by stage:

* :mod:`normopt.experiments.cell_reading`: reading run directories (metrics, config,
  cell.json, diagnostics);
* :mod:`normopt.experiments.arms` and :mod:`normopt.experiments.cell_assessment`: placing
  cells into arms and flagging the cells that cannot count;
* :mod:`normopt.experiments.statistics`: group statistics, gaps, interactions, fix recovery
  and ``build_summary`` (the content of summary.json), with the formulas;
* :mod:`normopt.experiments.run_setup`: the setup the report opens with (model size, steps,
  tokens, data, seeds, code version);
* :mod:`normopt.experiments.plots` and :mod:`normopt.experiments.diagnostic_plots`: the PNG plots;
* this module: the markdown report, ``write_report`` (all of the above for one root) and the
  ``normopt report`` command line (``report_main``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.experiments.cell_reading import discover_cells
from normopt.experiments.diagnostic_plots import (
    plot_saturation,
    plot_saturation_layers,
    plot_spectral_norm,
    plot_tail_tokens,
)
from normopt.experiments.plots import plot_final_losses, plot_gaps, plot_loss_curves, smoothing_label
from normopt.experiments.run_setup import experiment_setup, setup_lines
from normopt.experiments.statistics import DEFAULT_FIXES, build_summary
from normopt.experiments.tables import markdown_table
from normopt.metrics.logger import jsonable

PLOT_FILES = {"loss_curves": "loss_curves.png", "final_eval_loss": "final_eval_loss.png",
              "gaps": "gaps.png"}
# written only when some cell logged the records each one draws
DIAGNOSTIC_PLOT_FILES = {"saturation": "saturation.png", "saturation_layers": "saturation_layers.png",
                         "spectral_norm": "spectral_norm.png", "tail_tokens": "tail_tokens.png"}
DIAGNOSTIC_DRAWERS = {"saturation": plot_saturation, "saturation_layers": plot_saturation_layers,
                      "spectral_norm": plot_spectral_norm, "tail_tokens": plot_tail_tokens}


# --------------------------------------------------------------------------- markdown


def _num(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(ci: Sequence[float] | None, digits: int = 4) -> str:
    return "no interval" if ci is None else f"[{_num(ci[0], digits, True)}, {_num(ci[1], digits, True)}]"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _pct_ci(ci: Sequence[float] | None, note: str | None = None) -> str:
    if ci is None:
        return f"no interval ({note})" if note else "no interval"
    return f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"


def main_table(summary: Mapping[str, Any]) -> str:
    """Final eval loss mean ± sample std (n) per variant x optimizer, with the gap to the
    baseline and its 95% t interval beside each."""
    groups = {(g["variant"], g["optim"]): g for g in summary["groups"]}
    gaps = {(g["variant"], g["optim"]): g for g in summary["gaps"]}
    base = summary["settings"]["baseline_norm"]
    header = ["variant"]
    for optim in summary["optims"]:
        header += [f"{optim} final eval loss", f"gap to {base} ({optim}), 95% CI"]
    rows = []
    for variant in summary["variants"]:
        row = [variant]
        for optim in summary["optims"]:
            g = groups.get((variant, optim))
            row.append("—" if g is None or not g["n"] else
                       f"{_num(g['mean'])} ± {_num(g['std'])} (n={g['n']})" if g["n"] > 1 else
                       f"{_num(g['mean'])} (n=1)")
            gap = gaps.get((variant, optim))
            row.append("—" if gap is None else
                       f"{_num(gap['value'], sign=True)} {_ci(gap['ci95'])}" if gap["ci95"] is not None
                       else _num(gap["value"], sign=True))
        rows.append(row)
    return markdown_table(header, rows)


def interaction_table(summary: Mapping[str, Any]) -> str:
    """interaction = gap(O) - gap(reference) with its 95% t interval, unpaired and paired."""
    rows = []
    for item in summary["interactions"]:
        paired = item["paired"]
        rows.append([item["variant"], f"{item['optim']} − {item['reference_optim']}",
                     _num(item["value"], sign=True), _ci(item["ci95"]),
                     "—" if paired is None else f"{_num(paired['value'], sign=True)} {_ci(paired['ci95'])} "
                                                f"({paired['n_seeds']} seeds)"])
    return markdown_table(["variant", "optimizer", "interaction (nats)", "95% CI (independent means, Welch t)",
                           "paired per-seed estimate, 95% CI (t, k−1 df)"], rows)


def recovery_table(summary: Mapping[str, Any]) -> str:
    rows = [[r["fix"], r["base_norm"], r["optim"], _num(r["gap_base"], sign=True), _num(r["gap_fix"], sign=True),
             _pct(r["share"]), _pct_ci(r["ci95"], r["ci_note"]),
             _pct(r["interaction_share"]),
             "—" if r["interaction_share"] is None else _pct_ci(r["interaction_ci95"], r["interaction_ci_note"])]
            for r in summary["recoveries"]]
    return markdown_table(["fix", "of", "optimizer", "gap of the norm", "gap of the fix",
                           "share of the gap recovered", "95% CI (Fieller)", "share of the interaction recovered",
                           "95% CI (Fieller)"], rows)


def _excludes_zero(ci: Sequence[float] | None) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


def answer_paragraph(summary: Mapping[str, Any]) -> str:
    """The short answer the report opens with: each norm's interaction with each optimizer
    (with its interval and whether it excludes 0) and each fix's recovered shares."""
    s = summary["settings"]
    lines = []
    for item in summary["interactions"]:
        ci = item["ci95"]
        verdict = ("no interval (1 seed)" if ci is None else
                   "its 95% interval excludes 0" if _excludes_zero(ci) else "its 95% interval includes 0")
        lines.append(f"- **{item['variant']} × {item['optim']}**: interaction {_num(item['value'], 3, True)} nats "
                     f"{'' if ci is None else _ci(ci, 3) + ' '}({verdict}): the gap to {s['baseline_norm']} is "
                     f"{'larger' if item['value'] > 0 else 'smaller'} under {item['optim']} than under "
                     f"{item['reference_optim']}.")
    for r in summary["recoveries"]:
        if r["share"] is None:
            continue
        text = (f"- **{r['fix']}** (fix of {r['base_norm']}, under {r['optim']}): recovers {_pct(r['share'])} "
                f"of the gap {_pct_ci(r['ci95'], r['ci_note'])}")
        if r["interaction_share"] is not None:
            text += f" and {_pct(r['interaction_share'])} of the interaction " \
                    f"{_pct_ci(r['interaction_ci95'], r['interaction_ci_note'])}"
        lines.append(text + ".")
    flat = [c["name"] for c in summary["cells"] if c.get("learned_no_context")]
    if flat:
        lines.insert(0, f"- **Caution**: {len(flat)} of {len(summary['cells'])} cells learned almost no context "
                        f"(final loss within 0.1 nats of, or above, the unigram entropy of their training "
                        f"tokens): {', '.join(flat)}. Their gaps measure noise more than the norm or the optimizer.")
    if not lines:
        return "No interaction or recovery is computable from these cells (see the notes)."
    return "\n".join(lines)


def _below_unigram(cell: Mapping[str, Any]) -> str:
    if cell["unigram_entropy"] is None or cell["final_eval_loss"] is None:
        return "—"
    text = _num(cell["final_eval_loss"] - cell["unigram_entropy"], 3, True)
    return f"{text} (learned no context)" if cell["learned_no_context"] else text


def cell_table(summary: Mapping[str, Any]) -> str:
    rows = [[c["name"], c["variant"] or "—", str(c["optim"] or "—"), str(c["seed"]), _num(c["final_eval_loss"]),
             _below_unigram(c),
             f"{c['last_step'] if c['last_step'] is not None else '—'} / {c['steps'] if c['steps'] is not None else '?'}",
             ", ".join(c["flags"]) or "ok"] for c in summary["cells"]]
    return markdown_table(["cell", "variant", "optimizer", "seed", "final eval loss", "minus unigram entropy",
                           "last step / steps", "flags"], rows)


def _bucket_losses(losses: Sequence[float | None] | None, step: int | None) -> str:
    if losses is None:
        return "—"
    return f"{', '.join(_num(v, 2) for v in losses) or 'no buckets'} (step {step})"


def diagnostics_table(summary: Mapping[str, Any]) -> str:
    """One row per cell with diagnostics: final mean saturation, final mean spectral norm and its
    growth (last / first record), and the last loss per token-frequency bucket."""
    rows = []
    for c in summary["cells"]:
        d = c.get("diagnostics")
        if d is None:
            continue
        steps = d["spectral_norm_steps"]
        rows.append([
            c["name"], c["variant"] or "—", str(c["optim"] or "—"), str(c["seed"]),
            "—" if d["final_saturation"] is None else f"{_num(d['final_saturation'])} (step {d['saturation_step']})",
            "—" if d["final_spectral_norm"] is None else f"{_num(d['final_spectral_norm'], 3)} (step {steps[1]})",
            "—" if d["spectral_norm_growth"] is None else f"×{_num(d['spectral_norm_growth'], 3)} "
                                                         f"(step {steps[0]} → {steps[1]})",
            _bucket_losses(d["tail_bucket_loss"], d["tail_tokens_step"]),
            ", ".join(c["flags"]) or "ok"])
    return markdown_table(["cell", "variant", "optimizer", "seed", "final saturation", "final mean spectral norm",
                           "spectral norm growth", "loss per token bucket, head → tail (nats)", "flags"], rows)


def collapse_notes(notes: Sequence[str], cell_names: Sequence[str]) -> list[str]:
    """The notes with those that say the same of several cells ("a: skipped ...", "b: skipped
    ...", or "a left out: diverged: ...") merged into one line naming the cells, at the place of
    the first; a note said of one cell, or of no cell, stays as it is. Eight identical lines hide
    the ninth, different one; one line per distinct statement does not."""
    names = sorted(cell_names, key=len, reverse=True)  # "a-s10" must not be read as "a-s1"
    said: dict[str, list[str]] = {}  # statement -> the cells it is said of, in order
    order: list[tuple[str, str]] = []  # ("note", text) or ("statement", key)
    for note in notes:
        name = next((n for n in names if note.startswith((f"{n}: ", f"{n} left out: "))), None)
        if name is None:
            order.append(("note", note))
            continue
        rest = note[len(name):]
        key = rest.removeprefix(" ") if rest.startswith(" left out: ") else rest.removeprefix(": ")
        if key not in said:
            said[key] = []
            order.append(("statement", key))
        said[key].append(name)
    lines = []
    for kind, text in order:
        if kind == "note":
            lines.append(text)
        elif len(said[text]) == 1:
            lines.append(f"{said[text][0]} {text}" if text.startswith("left out: ") else f"{said[text][0]}: {text}")
        else:
            lines.append(f"{text} — {len(said[text])} cells: {', '.join(said[text])}")
    return lines


def render_markdown(summary: Mapping[str, Any], plots: Mapping[str, str],
                    diagnostic_plots: Mapping[str, str] | None = None) -> str:
    """report.md: the tables, the plots (paths relative to report.md), the diagnostics (only when
    some cell has diagnostics.jsonl) and the flags/notes."""
    s = summary["settings"]
    cells = summary["cells"]
    kept = sum(c["included"] for c in cells)
    fixes = ", ".join(f"`{k}` → `{v}`" for k, v in s["fixes"].items()) or "none declared"
    parts = ["# normopt factorial report", ""]
    if "setup" in summary:
        parts += [*setup_lines(summary["setup"]), ""]
    parts += [
        (f"{len(cells)} cells, {kept} included, {len(cells) - kept} left out. Baseline norm: "
         f"`{s['baseline_norm']}`; reference optimizer: `{s['reference_optim']}`. Losses in nats "
         f"(final validation loss). Intervals: {s['interval']}."), "",
        "## Answer", "",
        answer_paragraph(summary), "",
        "## Final eval loss and gap to the baseline", "",
        (f"mean ± sample std over seeds (n cells); gap = mean(norm) − mean({s['baseline_norm']}) under "
         "the same optimizer, with its 95% t interval (Welch-Satterthwaite degrees of freedom)."), "",
        main_table(summary), "",
        "## Interaction", "",
        (f"interaction = gap under the optimizer − gap under {s['reference_optim']} = "
         "(L[n,O] − L[base,O]) − (L[n,ref] − L[base,ref]). 95% CI: t quantile with Welch-Satterthwaite "
         "degrees of freedom × sqrt(Σ s²/n) over the four independent group means. Paired: the same "
         "contrast per seed over the seeds present in all four groups, t with k−1 degrees of freedom."), "",
        interaction_table(summary), "",
        "## Fix recovery", "",
        ("gain = L[norm, O] − L[fix, O]; share of the gap = gain / gap(norm, O); share of the interaction "
         "= gain / interaction(norm, O) (needs the norm's cells under the reference optimizer). Both are "
         "ratios, so their 95% intervals are Fieller's (unbounded, hence not given, when the denominator's "
         f"own interval contains 0). Fixes: {fixes}; an arm of a norm is a fix of that norm."), "",
        recovery_table(summary), "",
        "## Plots", "",
    ]
    parts += [f"![{name}]({path})" for name, path in plots.items()]
    if any(c.get("diagnostics") is not None for c in cells):
        parts += [
            "", "## Diagnostics", "",
            ("From each cell's diagnostics.jsonl, every cell including left-out ones (descriptive, no "
             "statistics). Saturation: mean over the bounded norm layers (none for RMSNorm) at the last "
             "step logged. Spectral norm: mean over the weight matrices at the last record; growth = that "
             "mean at the last record / at the first. Token buckets: validation loss per token-frequency "
             "bucket, most frequent tokens first, at the last record (— = empty bucket)."), "",
            diagnostics_table(summary), "",
        ]
        parts += [f"![{name}]({path})" for name, path in (diagnostic_plots or {}).items()]
    parts += ["", "## Cells", "", cell_table(summary), "", "## Notes", ""]
    parts += [f"- {note}" for note in collapse_notes(summary["notes"], [c["name"] for c in cells])] or ["- none"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- edges


def write_report(root: str | Path, out: str | Path | None = None, *, baseline_norm: str = "rmsnorm",
                 reference_optim: str = "adamw", smoothing: float = 0.9,
                 fixes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the cells under ``root``, write report.md, summary.json and the PNG plots into
    ``out`` (default ``root``), and return the summary (with "files": the paths written).
    ``fixes`` maps a variant or norm to the norm it fixes (default DEFAULT_FIXES)."""
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
    root = Path(root)
    out = root if out is None else Path(out)
    cells = discover_cells(root)
    summary = build_summary(cells, baseline_norm=baseline_norm, reference_optim=reference_optim, fixes=fixes)
    summary["root"] = str(root)
    out.mkdir(parents=True, exist_ok=True)
    plots = {name: out / filename for name, filename in PLOT_FILES.items()}
    plot_loss_curves(cells, summary, plots["loss_curves"], smoothing)
    plot_final_losses(summary, plots["final_eval_loss"])
    plot_gaps(summary, plots["gaps"])
    diagnostic_plots = {name: out / filename for name, filename in DIAGNOSTIC_PLOT_FILES.items()
                        if DIAGNOSTIC_DRAWERS[name](cells, summary, out / filename)}
    files = {"report": out / "report.md", "summary": out / "summary.json", **plots, **diagnostic_plots}
    summary["settings"]["smoothing"] = smoothing
    summary["settings"]["smoothing_window"] = smoothing_label(smoothing)
    summary["setup"] = experiment_setup(cells)
    summary["files"] = {name: str(p) for name, p in files.items()}
    files["report"].write_text(render_markdown(summary, {n: p.name for n, p in plots.items()},
                                               {n: p.name for n, p in diagnostic_plots.items()}))
    files["summary"].write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    return summary


def _parse_fix(text: str) -> tuple[str, str]:
    variant, sep, norm = text.partition("=")
    if not sep or not variant or not norm:
        raise argparse.ArgumentTypeError(f"expected VARIANT=NORM, got {text!r}")
    return variant, norm


def report_main(argv: Sequence[str] | None = None) -> int:
    """``normopt report ROOT [--out DIR] [--baseline-norm rmsnorm] [--reference-optim adamw]
    [--smoothing 0.9] [--fix VARIANT=NORM ...]``: write the report, print the main tables and
    the paths written. Raises UserError (exit 2 in the CLI) for a bad root or unreadable files."""
    parser = argparse.ArgumentParser(
        prog="normopt report",
        description="Summarize a factorial experiment: one subfolder of ROOT per cell (run directory).")
    parser.add_argument("root", help="folder holding one run directory per cell")
    parser.add_argument("--out", default=None, help="where to write report.md, summary.json, plots (default: ROOT)")
    parser.add_argument("--baseline-norm", default="rmsnorm", help="norm the gaps are measured against")
    parser.add_argument("--reference-optim", default="adamw", help="optimizer the interactions are measured against")
    parser.add_argument("--smoothing", type=float, default=0.9,
                        help="train-loss smoothing in [0, 1): a centred mean over about (1+s)/(1-s) logged points "
                             "(0 = none)")
    parser.add_argument("--fix", type=_parse_fix, action="append", default=[], metavar="VARIANT=NORM",
                        help=f"declare a fix arm (added to the defaults {DEFAULT_FIXES})")
    args = parser.parse_args(argv)
    summary = write_report(args.root, args.out, baseline_norm=args.baseline_norm,
                           reference_optim=args.reference_optim, smoothing=args.smoothing,
                           fixes={**DEFAULT_FIXES, **dict(args.fix)})
    print_summary(summary)
    return 0


def print_summary(summary: Mapping[str, Any]) -> None:
    """The answer, the main table, interactions and fix recoveries, left-out cells, files written."""
    print(answer_paragraph(summary))
    print()
    print(main_table(summary))
    if summary["interactions"]:
        print()
        print(interaction_table(summary))
    if summary["recoveries"]:
        print()
        print(recovery_table(summary))
    left_out = [c["name"] for c in summary["cells"] if not c["included"]]
    if left_out:
        print(f"\nleft out ({len(left_out)}): {', '.join(left_out)} (see report.md)")
    print()
    for path in summary["files"].values():
        print(f"wrote {path}")
