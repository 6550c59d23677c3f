"""The short answer report.md and the terminal open with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.render.family_markdown import factor_lines, flag_text, holm_verdict
from normopt.report.render.model_size import size_answer_lines
from normopt.report.render.over_training import stability_clause
from normopt.report.render.text import interval, nouns, number, percent, percent_interval, stratum_prefix
from normopt.report.stats.multiplicity import equivalence_phrase


def _excludes_zero(ci: Sequence[float] | None) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


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
    compare_noun, _ = nouns(summary)
    lines = []
    for item in summary["interactions"]:
        ci = item["ci95"]
        stability = stability_clause(summary, item)
        lines.append(
            f"- {stratum_prefix(item)}**{item['variant']} × {item['optim']}**: interaction "
            f"{number(item['value'], 3, True)} nats {'' if ci is None else interval(ci, 3) + ' '}"
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
                f"{number(gap['value'], 3, True)} nats {'' if ci is None else interval(ci, 3) + ' '}"
                f"({_verdict(ci)}; {holm_verdict(gap.get('p_holm'))}; "
                f"{equivalence_phrase(gap.get('equivalence'))}).{flag_text(gap)}"
            )
    for r in summary["recoveries"]:
        if r["share"] is None:
            continue
        under = "" if single else f", under {r['optim']}"
        text = (
            f"- {stratum_prefix(r)}**{r['fix']}** (fix of {r['base_norm']}{under}): recovers {percent(r['share'])} "
            f"of the gap {percent_interval(r['ci95'], r['ci_note'])}"
        )
        if r["interaction_share"] is not None:
            text += (
                f" and {percent(r['interaction_share'])} of the interaction "
                f"{percent_interval(r['interaction_ci95'], r['interaction_ci_note'])}"
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
