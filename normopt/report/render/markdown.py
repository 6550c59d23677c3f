"""report.md: ``render_markdown`` puts its sections together in order, each one a function of this
package. Every function reads only the summary (:func:`normopt.report.stats.summary.build_summary`),
never files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normopt.report.render.answer import answer_paragraph
from normopt.report.render.cell_tables import (
    cell_table,
    diagnostics_table,
    isotropy_table,
    placement,
    placement_columns,
)
from normopt.report.render.cost import cost_section
from normopt.report.render.family_markdown import (
    factor_section,
    family_section,
    left_out_section,
)
from normopt.report.render.final_step_tables import interaction_table, main_table, recovery_table
from normopt.report.render.model_size import size_section
from normopt.report.render.notes import collapse_notes
from normopt.report.render.over_training import over_training_section
from normopt.report.render.run_setup import setup_lines
from normopt.report.render.spectral_table import spectral_norm_table
from normopt.report.render.tables import markdown_table
from normopt.report.render.tail_section import tail_section
from normopt.report.render.text import nouns, per_stratum
from normopt.report.render.tuning import tuning_lead, tuning_section


def _file_name(summary: Mapping[str, Any], name: str) -> str | None:
    path = summary.get("files", {}).get(name)
    return None if path is None else Path(path).name


def render_markdown(
    summary: Mapping[str, Any], plots: Mapping[str, str], diagnostic_plots: Mapping[str, str] | None = None
) -> str:
    """report.md: the tables, the plots (paths relative to report.md), the diagnostics (only when
    some cell has diagnostics.jsonl) and the flags/notes."""
    sections = [
        _heading(summary),
        _answer_section(summary),
        tuning_lead(summary),
        family_section(summary),
        left_out_section(summary),
        _final_loss_section(summary),
        _interaction_section(summary),
        _recovery_section(summary),
        tuning_section(summary, _file_name(summary, "tuning")),
        over_training_section(summary, _file_name(summary, "over_training")),
        size_section(summary, _file_name(summary, "model_size")),
        factor_section(summary),
        tail_section(summary),
        _plots_section(plots),
        _diagnostics_section(summary, diagnostic_plots or {}),
        [""],  # the plots' images end without a blank line
        _diagnostic_tables_section(summary),
        cost_section(summary),
        _cells_section(summary),
        _notes_section(summary),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def _axes_text(summary: Mapping[str, Any]) -> str:
    """What is compared with what: the baseline and reference levels, or the keys and strata."""
    s = summary["settings"]
    c_noun, a_noun = nouns(summary)
    single = s["axes"]["across"] is None
    axes_text = f"Baseline {c_noun}: `{s['baseline_norm']}`" + (
        "" if single else f"; reference {a_noun}: `{s['reference_optim']}`"
    )
    if c_noun != "norm" or s["axes"]["strata"] or single:
        axes_text = (
            f"Compared: `{s['axes']['compare']}` against `{s['baseline_norm']}`"
            + ("" if single else f", across `{s['axes']['across']}` with reference `{s['reference_optim']}`")
            + (
                f"; analysed within each level of {', '.join(f'`{k}`' for k in s['axes']['strata'])}"
                if s["axes"]["strata"]
                else ""
            )
        )
    return axes_text


def _heading(summary: Mapping[str, Any]) -> list[str]:
    """The title, the setup block, and how many cells count with what is compared."""
    cells = summary["cells"]
    kept = sum(c["included"] for c in cells)
    parts = ["# normopt factorial report", ""]
    if "setup" in summary:
        parts += [*setup_lines(summary["setup"]), ""]
    return [
        *parts,
        (
            f"{len(cells)} cells, {kept} included, {len(cells) - kept} left out. {_axes_text(summary)}. Losses in "
            f"nats (final validation loss). Intervals: {summary['settings']['interval']}."
        ),
        "",
    ]


def _answer_section(summary: Mapping[str, Any]) -> list[str]:
    """The short answer."""
    return ["## Answer", "", answer_paragraph(summary), ""]


def _final_loss_section(summary: Mapping[str, Any]) -> list[str]:
    """The final eval losses and the gaps to the baseline, per stratum."""
    s = summary["settings"]
    c_noun, a_noun = nouns(summary)
    single = s["axes"]["across"] is None
    return [
        "## Final eval loss and gap to the baseline",
        "",
        (
            f"mean ± sample std over seeds (n cells); gap = mean({c_noun}) − mean({s['baseline_norm']})"
            f"{'' if single else f' under the same {a_noun}'}, with its 95% t interval "
            "(Welch-Satterthwaite degrees of freedom)"
            + (
                ": the gaps are the main family here (Holm-adjusted p-values in the family table)."
                if single
                else ": exploratory, unadjusted (the interactions built from them are the main family)."
            )
        ),
        "",
        *per_stratum(summary, main_table),
    ]


def _interaction_section(summary: Mapping[str, Any]) -> list[str]:
    """The interactions with their independent and paired intervals (none without an across axis)."""
    s = summary["settings"]
    if s["axes"]["across"] is None:
        return []
    _, a_noun = nouns(summary)
    return [
        "## Interaction",
        "",
        (
            f"interaction = gap under the {a_noun} − gap under {s['reference_optim']} = "
            "(L[n,O] − L[base,O]) − (L[n,ref] − L[base,ref]). 95% CI: t quantile with Welch-Satterthwaite "
            "degrees of freedom × sqrt(Σ s²/n) over the four independent group means. Paired: the same "
            "contrast per seed over the seeds present in all four groups, t with k−1 degrees of freedom."
        ),
        "",
        *per_stratum(summary, interaction_table),
    ]


def _recovery_section(summary: Mapping[str, Any]) -> list[str]:
    """Each fix's recovered shares of the gap and the interaction, per stratum."""
    s = summary["settings"]
    c_noun, a_noun = nouns(summary)
    single = s["axes"]["across"] is None
    fixes = ", ".join(f"`{k}` → `{v}`" for k, v in s["fixes"].items()) or "none declared"
    return [
        "## Fix recovery",
        "",
        (
            f"gain = L[{c_noun}, O] − L[fix, O]; share of the gap = gain / gap({c_noun}, O)"
            + (
                ""
                if single
                else f"; share of the interaction = gain / interaction({c_noun}, O) (needs the {c_noun}'s "
                f"cells under the reference {a_noun})"
            )
            + (
                ". The shares of the gap are exploratory; the shares of the interaction are in the main family"
                if not single
                else ""
            )
            + ". Both are ratios, so their 95% intervals are Fieller's (unbounded, hence not given, when the "
            f"denominator's own interval contains 0). Fixes: {fixes}; an arm of a {c_noun} is a fix of that "
            f"{c_noun}."
        ),
        "",
        *per_stratum(summary, recovery_table),
    ]


def _plots_section(plots: Mapping[str, str]) -> list[str]:
    """The main plots' images."""
    return ["## Plots", "", *(f"![{name}]({path})" for name, path in plots.items())]


def _diagnostic_tables_section(summary: Mapping[str, Any]) -> list[str]:
    """The tables of diagnostics without a section of their own (a plugin's), one each."""
    lines: list[str] = []
    for table in summary.get("diagnostic_tables", ()):
        lines += [f"### {table['title']} (`{table['kind']}`)", "", markdown_table(table["header"], table["rows"]), ""]
    return lines


def _diagnostics_section(summary: Mapping[str, Any], diagnostic_plots: Mapping[str, str]) -> list[str]:
    """The diagnostics tables and plots; nothing when no cell has diagnostics.jsonl."""
    if not any(c.get("diagnostics") is not None for c in summary["cells"]):
        return []
    return [
        "",
        "## Diagnostics",
        "",
        (
            "From each cell's diagnostics.jsonl, every cell including left-out ones (descriptive, no "
            "statistics). Saturation: mean over the bounded norm layers (none for RMSNorm) at the last "
            "step logged. Spectral norm: mean over the block matrices (attention, feed-forward, routers, "
            "each MoE expert as its own matrix) at the last record; growth = that mean at the last "
            "record / at the first. The token embedding and the output matrix are not block matrices "
            "(larger at init, and AdamW-trained under Muon): their spectral norms stand apart, and the "
            "means per matrix type and depth group are in the table below. Token buckets: validation loss "
            "per token-frequency bucket, most frequent tokens first, at the last record (— = empty bucket)."
        ),
        "",
        diagnostics_table(summary),
        "",
        *_spectral_lines(summary),
        *_isotropy_lines(summary),
        *(f"![{name}]({path})" for name, path in diagnostic_plots.items()),
    ]


def _spectral_lines(summary: Mapping[str, Any]) -> list[str]:
    """The spectral norms per block-matrix type; nothing when no cell logged them."""
    spectral = spectral_norm_table(summary, placement_columns(summary), lambda c: placement(summary, c))
    if spectral is None:
        return []
    return [
        "Spectral norms at the last record, per block-matrix type: the mean over each depth group's "
        "matrices (each MoE expert one matrix), then the token embedding and the output matrix.",
        "",
        spectral,
        "",
    ]


def _isotropy_lines(summary: Mapping[str, Any]) -> list[str]:
    """The isotropy of the updates and the weights per matrix type; nothing when no cell logged it."""
    isotropy = isotropy_table(summary)
    if isotropy is None:
        return []
    return [
        (
            "Isotropy of the update each optimizer step applied (W after − W before) and of the weights, "
            "at the last diagnostics step: the normalised singular-value entropy "
            "−Σ p_i log p_i / log r with p_i = s_i² / Σ s_j² (1 = every direction moved equally, "
            "0 = rank one), mean over the matrices of each type and depth group, shown as "
            "update / weight per matrix type; per depth group and the effective ranks in summary.json."
        ),
        "",
        isotropy,
        "",
    ]


def _cells_section(summary: Mapping[str, Any]) -> list[str]:
    """Every cell with its placement, loss and flags."""
    return ["## Cells", "", cell_table(summary), ""]


def _notes_section(summary: Mapping[str, Any]) -> list[str]:
    """The notes, one line per statement said of several cells."""
    notes = collapse_notes(summary["notes"], [c["name"] for c in summary["cells"]])
    return ["## Notes", "", *([f"- {note}" for note in notes] or ["- none"])]
