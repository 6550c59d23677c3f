"""The markdown of a factorial report: the answer paragraph, the tables (per stratum where the
report has strata), the head/tail section and ``render_markdown`` (report.md). Every function
reads only the summary (:func:`normopt.report.statistics.build_summary`), never files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normopt.report.cost import cost_section
from normopt.report.family_markdown import (
    factor_lines,
    factor_section,
    family_section,
    flag_text,
    holm_verdict,
    left_out_section,
)
from normopt.report.model_size import size_answer_lines, size_section
from normopt.report.multiplicity import equivalence_phrase
from normopt.report.notes import collapse_notes
from normopt.report.over_training import over_training_section, stability_clause, stability_of
from normopt.report.run_setup import setup_lines
from normopt.report.spectral_table import spectral_norm_table
from normopt.report.tables import markdown_table
from normopt.report.tuning import tuning_lead, tuning_section


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


def strata(summary: Mapping[str, Any]) -> list[dict[str, str] | None]:
    """The summary's strata in order ([None] for a report without strata)."""
    if not summary["settings"]["axes"]["strata"]:
        return [None]
    found: list[dict[str, str]] = []
    for group in summary["groups"]:
        if group["stratum"] not in found:
            found.append(group["stratum"])
    return found


def stratum_label(stratum: Mapping[str, str] | None) -> str:
    return "" if not stratum else ", ".join(f"{k}={v}" for k, v in stratum.items())


def in_stratum(records: Sequence[Mapping[str, Any]], stratum: Mapping[str, str] | None) -> list[Mapping[str, Any]]:
    return [r for r in records if stratum is None or r.get("stratum") == stratum]


def _nouns(summary: Mapping[str, Any]) -> tuple[str, str]:
    s = summary["settings"]
    return s.get("compare_noun", "norm"), s.get("across_noun", "optimizer") or ""


def main_table(summary: Mapping[str, Any], stratum: Mapping[str, str] | None = None) -> str:
    """Final eval loss mean ± sample std (n) per variant x optimizer (the compared x the across
    axis), with the gap to the baseline and its 95% t interval beside each."""
    groups = {(g["variant"], g["optim"]): g for g in in_stratum(summary["groups"], stratum)}
    gaps = {(g["variant"], g["optim"]): g for g in in_stratum(summary["gaps"], stratum)}
    base = summary["settings"]["baseline_norm"]
    single = summary["settings"]["axes"]["across"] is None
    compare_noun, _ = _nouns(summary)
    header = ["variant"]
    for optim in summary["optims"]:
        header += (
            ["final eval loss", f"gap to {base}, 95% CI"]
            if single
            else [f"{optim} final eval loss", f"gap to {base} ({optim}), 95% CI"]
        )
    rows = []
    for variant in summary["variants"]:
        if not any((variant, optim) in groups for optim in summary["optims"]):
            continue
        row = [variant]
        for optim in summary["optims"]:
            g = groups.get((variant, optim))
            row.append(
                "—"
                if g is None or not g["n"]
                else f"{_num(g['mean'])} ± {_num(g['std'])} (n={g['n']})"
                if g["n"] > 1
                else f"{_num(g['mean'])} (n=1)"
            )
            gap = gaps.get((variant, optim))
            row.append(
                "—"
                if gap is None
                else f"{_num(gap['value'], sign=True)} {_ci(gap['ci95'])}"
                if gap["ci95"] is not None
                else _num(gap["value"], sign=True)
            )
        rows.append(row)
    if compare_noun != "norm":
        header[0] = compare_noun
    return markdown_table(header, rows)


def interaction_table(summary: Mapping[str, Any], stratum: Mapping[str, str] | None = None) -> str:
    """interaction = gap(O) - gap(reference) with its 95% t interval, unpaired and paired."""
    rows = []
    compare_noun, across_noun = _nouns(summary)
    stability = bool((summary.get("over_training") or {}).get("interactions"))
    for item in in_stratum(summary["interactions"], stratum):
        paired = item["paired"]
        rows.append(
            [
                item["variant"],
                f"{item['optim']} − {item['reference_optim']}",
                _num(item["value"], sign=True),
                _ci(item["ci95"]),
                "—"
                if paired is None
                else f"{_num(paired['value'], sign=True)} {_ci(paired['ci95'])} ({paired['n_seeds']} seeds)",
                *([stability_of(summary, item) or "—"] if stability else []),
            ]
        )
    return markdown_table(
        [
            "variant" if compare_noun == "norm" else compare_noun,
            across_noun,
            "interaction (nats)",
            "95% CI (independent means, Welch t)",
            "paired per-seed estimate, 95% CI (t, k−1 df)",
            *(["over the last quarter of training (section Over training)"] if stability else []),
        ],
        rows,
    )


def recovery_table(summary: Mapping[str, Any], stratum: Mapping[str, str] | None = None) -> str:
    """Each fix's recovered shares of its target's gap (and interaction) with Fieller intervals;
    without an across axis there is neither an across column nor an interaction share."""
    single = summary["settings"]["axes"]["across"] is None
    compare_noun, across_noun = _nouns(summary)
    rows = []
    for r in in_stratum(summary["recoveries"], stratum):
        row = [
            r["fix"],
            r["base_norm"],
            *([] if single else [r["optim"]]),
            _num(r["gap_base"], sign=True),
            _num(r["gap_fix"], sign=True),
            _pct(r["share"]),
            _pct_ci(r["ci95"], r["ci_note"]),
        ]
        if not single:
            row += [
                _pct(r["interaction_share"]),
                "—" if r["interaction_share"] is None else _pct_ci(r["interaction_ci95"], r["interaction_ci_note"]),
            ]
        rows.append(row)
    header = [
        "fix",
        "of",
        *([] if single else [across_noun]),
        f"gap of the {compare_noun}",
        "gap of the fix",
        "share of the gap recovered",
        "95% CI (Fieller)",
    ]
    if not single:
        header += ["share of the interaction recovered", "95% CI (Fieller)"]
    return markdown_table(header, rows)


def _excludes_zero(ci: Sequence[float] | None) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


def stratum_prefix(record: Mapping[str, Any]) -> str:
    label = stratum_label(record.get("stratum"))
    return f"[{label}] " if label else ""


def _verdict(ci: Sequence[float] | None) -> str:
    return (
        "no interval (1 seed)"
        if ci is None
        else "its 95% interval excludes 0"
        if _excludes_zero(ci)
        else "its 95% interval includes 0"
    )


def _direction(item: Mapping[str, Any], baseline: str) -> str:
    """Which way the point estimate of an interaction points, at the 3 decimals the answer shows
    (an estimate that rounds to 0 reads as the same gap under both levels)."""
    optim, reference = item["optim"], item["reference_optim"]
    if round(item["value"], 3) == 0:
        return (
            f"the point estimate of the gap to {baseline} is the same under {optim} as under {reference} "
            "(to the 0.001 nats shown)"
        )
    return (
        f"the point estimate of the gap to {baseline} is {'larger' if item['value'] > 0 else 'smaller'} under "
        f"{optim} than under {reference}"
    )


def answer_paragraph(summary: Mapping[str, Any]) -> str:
    """The short answer the report opens with: each level's interaction with each level of the
    across axis (with its interval, whether it excludes 0, its Holm verdict at the final step and
    its stability over the last quarter of training) and each fix's recovered shares; without an
    across axis, each level's gap to the baseline."""
    s = summary["settings"]
    single = s["axes"]["across"] is None
    compare_noun, _ = _nouns(summary)
    lines = []
    for item in summary["interactions"]:
        ci = item["ci95"]
        stability = stability_clause(summary, item)
        lines.append(
            f"- {stratum_prefix(item)}**{item['variant']} × {item['optim']}**: interaction "
            f"{_num(item['value'], 3, True)} nats {'' if ci is None else _ci(ci, 3) + ' '}"
            f"({_verdict(ci)}; {holm_verdict(item.get('p_holm'))}"
            f"{' at the final step; ' + stability if stability else ''}; "
            f"{equivalence_phrase(item.get('equivalence'))}): {_direction(item, s['baseline_norm'])}."
            f"{flag_text(item)}"
        )
    if single:
        for gap in summary["gaps"]:
            ci = gap["ci95"]
            lines.append(
                f"- {stratum_prefix(gap)}**{gap['variant']}**: gap to {s['baseline_norm']} "
                f"{_num(gap['value'], 3, True)} nats {'' if ci is None else _ci(ci, 3) + ' '}"
                f"({_verdict(ci)}; {holm_verdict(gap.get('p_holm'))}; "
                f"{equivalence_phrase(gap.get('equivalence'))}).{flag_text(gap)}"
            )
    for r in summary["recoveries"]:
        if r["share"] is None:
            continue
        under = "" if single else f", under {r['optim']}"
        text = (
            f"- {stratum_prefix(r)}**{r['fix']}** (fix of {r['base_norm']}{under}): recovers {_pct(r['share'])} "
            f"of the gap {_pct_ci(r['ci95'], r['ci_note'])}"
        )
        if r["interaction_share"] is not None:
            text += (
                f" and {_pct(r['interaction_share'])} of the interaction "
                f"{_pct_ci(r['interaction_ci95'], r['interaction_ci_note'])}"
            )
        p_holm = r.get("share_p_holm" if single else "interaction_share_p_holm")
        if r.get("family") == "main":
            text += f" ({holm_verdict(p_holm)})"
        lines.append(text + "." + flag_text(r))
    lines += factor_lines(summary)
    lines += size_answer_lines(summary)
    flat = [c["name"] for c in summary["cells"] if c.get("learned_no_context")]
    if flat:
        lines.insert(
            0,
            f"- **Caution**: {len(flat)} of {len(summary['cells'])} cells learned almost no context "
            f"(final loss within 0.1 nats of, or above, the unigram entropy of their training "
            f"tokens): {', '.join(flat)}. Their gaps measure noise more than the "
            f"{compare_noun if compare_noun != 'norm' else 'norm or the optimizer'}.",
        )
    if not lines:
        return "No interaction or recovery is computable from these cells (see the notes)."
    return "\n".join(lines)


def _below_unigram(cell: Mapping[str, Any]) -> str:
    if cell["unigram_entropy"] is None or cell["final_eval_loss"] is None:
        return "—"
    text = _num(cell["final_eval_loss"] - cell["unigram_entropy"], 3, True)
    return f"{text} (learned no context)" if cell["learned_no_context"] else text


def _placement_columns(summary: Mapping[str, Any]) -> list[str]:
    compare_noun, across_noun = _nouns(summary)
    columns = ["variant" if compare_noun == "norm" else compare_noun]
    columns += [across_noun] if across_noun else []
    return columns + (["stratum"] if summary["settings"]["axes"]["strata"] else [])


def _placement(summary: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    values = [c["variant"] or "—"]
    values += [str(c["optim"] or "—")] if summary["settings"]["axes"]["across"] is not None else []
    return values + ([c.get("stratum", "")] if summary["settings"]["axes"]["strata"] else [])


def cell_table(summary: Mapping[str, Any]) -> str:
    rows = [
        [
            c["name"],
            *_placement(summary, c),
            str(c["seed"]),
            _num(c["final_eval_loss"]),
            _below_unigram(c),
            f"{'—' if c['last_step'] is None else c['last_step']} / {'?' if c['steps'] is None else c['steps']}",
            ", ".join(c["flags"]) or "ok",
        ]
        for c in summary["cells"]
    ]
    return markdown_table(
        [
            "cell",
            *_placement_columns(summary),
            "seed",
            "final eval loss",
            "minus unigram entropy",
            "last step / steps",
            "flags",
        ],
        rows,
    )


def tail_table(summary: Mapping[str, Any], stratum: Mapping[str, str] | None = None) -> str:
    """One row per pair of groups: B's gain over A per token-frequency bucket (head → tail),
    ± the half-width of its 95% Welch t interval, and the tail − head contrast."""
    rows = []
    for item in in_stratum(summary["tail_classes"], stratum):
        cells = []
        for b in item["buckets"]:
            if b["value"] is None:
                cells.append("—")
            elif b["ci95"] is None:
                cells.append(_num(b["value"], 3, True))
            else:
                cells.append(f"{_num(b['value'], 3, True)} ± {(b['ci95'][1] - b['ci95'][0]) / 2:.3f}")
        spread = item["tail_minus_head"]
        rows.append(
            [
                f"{item['first_label']} − {item['second_label']}",
                "; ".join(cells),
                f"{_num(spread['value'], 3, True)} {_ci(spread['ci95'], 3)}",
            ]
        )
    return markdown_table(
        ["A − B (nats)", "per bucket, head → tail (± 95% CI half-width)", "tail − head, 95% CI (Welch t)"], rows
    )


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
        rows.append(
            [
                c["name"],
                *_placement(summary, c),
                str(c["seed"]),
                "—"
                if d["final_saturation"] is None
                else f"{_num(d['final_saturation'])} (step {d['saturation_step']})",
                "—" if d["final_spectral_norm"] is None else f"{_num(d['final_spectral_norm'], 3)} (step {steps[1]})",
                f"{_num(d.get('embedding_spectral_norm'), 3)} / {_num(d.get('output_spectral_norm'), 3)}",
                "—"
                if d["spectral_norm_growth"] is None
                else f"×{_num(d['spectral_norm_growth'], 3)} (step {steps[0]} → {steps[1]})",
                _bucket_losses(d["tail_bucket_loss"], d["tail_tokens_step"]),
                ", ".join(c["flags"]) or "ok",
            ]
        )
    return markdown_table(
        [
            "cell",
            *_placement_columns(summary),
            "seed",
            "final saturation",
            "final mean spectral norm, block matrices",
            "embedding / output spectral norm",
            "spectral norm growth",
            "loss per token bucket, head → tail (nats)",
            "flags",
        ],
        rows,
    )


def _type_of(cell_key: str) -> str:
    return cell_key.split("/", 1)[0]


def isotropy_table(summary: Mapping[str, Any]) -> str | None:
    """One row per cell with an isotropy record: per matrix type, the normalised singular-value
    entropy of the applied update and of the weights (mean over the type's depth groups), as
    "update / weight"; None when no cell logged one."""
    rows, types = [], []
    for c in summary["cells"]:
        d = c.get("diagnostics") or {}
        for key in d.get("update_isotropy") or {}:
            if _type_of(key) not in types:
                types.append(_type_of(key))
    if not types:
        return None

    def mean_of(values: Mapping[str, float | None], matrix_type: str) -> float | None:
        kept = [v for k, v in values.items() if _type_of(k) == matrix_type and v is not None]
        return sum(kept) / len(kept) if kept else None

    for c in summary["cells"]:
        d = c.get("diagnostics") or {}
        if d.get("update_isotropy") is None:
            continue
        cells = [
            f"{_num(mean_of(d['update_isotropy'], t), 2)} / {_num(mean_of(d['weight_isotropy'], t), 2)}" for t in types
        ]
        rows.append([c["name"], *_placement(summary, c), str(d["isotropy_step"]), *cells])
    return markdown_table(["cell", *_placement_columns(summary), "step", *types], rows)


def _per_stratum(summary: Mapping[str, Any], table) -> list[str]:
    """``table`` once, or once per stratum under its own heading."""
    out = []
    for stratum in strata(summary):
        if stratum is not None:
            out += [f"### {stratum_label(stratum)}", ""]
        out += [table(summary, stratum), ""]
    return out


def tail_section(summary: Mapping[str, Any]) -> list[str]:
    """The head-versus-tail section: what it measures, one sentence per pair, the table."""
    if not summary["tail_classes"]:
        return []
    parts = [
        "## Head and tail: differences by token frequency (exploratory)",
        "",
        (
            "Per pair of groups A, B that differ in one axis: B's gain over A, mean(A) − mean(B), of the "
            "validation loss in each token-frequency bucket (equal shares of the training tokens, bucket 0 "
            "= the most frequent tokens, the last = the rarest), ± the half-width of its 95% Welch t "
            "interval over seeds. tail − head = the gain in the tail bucket minus the gain in the head "
            "bucket, from the per-cell difference L_tail − L_head (a positive value: B gains more on the "
            "rare tokens). Exploratory: one unadjusted interval per bucket and pair, outside the main family; "
            "about 1 in 20 null intervals here excludes 0 by chance."
        ),
        "",
    ]
    parts += [f"- {stratum_prefix(item)}{item['sentence']}" for item in summary["tail_classes"]]
    return [*parts, "", *_per_stratum(summary, tail_table)]


def _file_name(summary: Mapping[str, Any], name: str) -> str | None:
    path = summary.get("files", {}).get(name)
    return None if path is None else Path(path).name


def render_markdown(
    summary: Mapping[str, Any], plots: Mapping[str, str], diagnostic_plots: Mapping[str, str] | None = None
) -> str:
    """report.md: the tables, the plots (paths relative to report.md), the diagnostics (only when
    some cell has diagnostics.jsonl) and the flags/notes."""
    s = summary["settings"]
    cells = summary["cells"]
    c_noun, a_noun = _nouns(summary)
    single = s["axes"]["across"] is None
    kept = sum(c["included"] for c in cells)
    fixes = ", ".join(f"`{k}` → `{v}`" for k, v in s["fixes"].items()) or "none declared"
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
    parts = ["# normopt factorial report", ""]
    if "setup" in summary:
        parts += [*setup_lines(summary["setup"]), ""]
    parts += [
        (
            f"{len(cells)} cells, {kept} included, {len(cells) - kept} left out. {axes_text}. Losses in nats "
            f"(final validation loss). Intervals: {s['interval']}."
        ),
        "",
        "## Answer",
        "",
        answer_paragraph(summary),
        "",
        *tuning_lead(summary),
        *family_section(summary),
        *left_out_section(summary),
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
        *_per_stratum(summary, main_table),
    ]
    if not single:
        parts += [
            "## Interaction",
            "",
            (
                f"interaction = gap under the {a_noun} − gap under {s['reference_optim']} = "
                "(L[n,O] − L[base,O]) − (L[n,ref] − L[base,ref]). 95% CI: t quantile with Welch-Satterthwaite "
                "degrees of freedom × sqrt(Σ s²/n) over the four independent group means. Paired: the same "
                "contrast per seed over the seeds present in all four groups, t with k−1 degrees of freedom."
            ),
            "",
            *_per_stratum(summary, interaction_table),
        ]
    parts += [
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
        *_per_stratum(summary, recovery_table),
        *tuning_section(summary, _file_name(summary, "tuning")),
        *over_training_section(summary, _file_name(summary, "over_training")),
        *size_section(summary, _file_name(summary, "model_size")),
        *factor_section(summary),
        *tail_section(summary),
        "## Plots",
        "",
    ]
    parts += [f"![{name}]({path})" for name, path in plots.items()]
    if any(c.get("diagnostics") is not None for c in cells):
        parts += [
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
        ]
        spectral = spectral_norm_table(summary, _placement_columns(summary), lambda c: _placement(summary, c))
        if spectral is not None:
            parts += [
                "Spectral norms at the last record, per block-matrix type: the mean over each depth group's "
                "matrices (each MoE expert one matrix), then the token embedding and the output matrix.",
                "",
                spectral,
                "",
            ]
        isotropy = isotropy_table(summary)
        if isotropy is not None:
            parts += [
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
        parts += [f"![{name}]({path})" for name, path in (diagnostic_plots or {}).items()]
    parts += ["", *cost_section(summary), "## Cells", "", cell_table(summary), "", "## Notes", ""]
    parts += [f"- {note}" for note in collapse_notes(summary["notes"], [c["name"] for c in cells])] or ["- none"]
    return "\n".join(parts) + "\n"
