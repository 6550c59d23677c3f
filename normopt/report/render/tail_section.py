"""The head-versus-tail section of report.md (the comparisons: :mod:`normopt.report.stats.tail_classes`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normopt.report.render.tables import markdown_table
from normopt.report.render.text import in_stratum, interval, number, per_stratum, stratum_prefix


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
                cells.append(number(b["value"], 3, True))
            else:
                cells.append(f"{number(b['value'], 3, True)} ± {(b['ci95'][1] - b['ci95'][0]) / 2:.3f}")
        spread = item["tail_minus_head"]
        rows.append(
            [
                f"{item['first_label']} − {item['second_label']}",
                "; ".join(cells),
                f"{number(spread['value'], 3, True)} {interval(spread['ci95'], 3)}",
            ]
        )
    return markdown_table(
        ["A − B (nats)", "per bucket, head → tail (± 95% CI half-width)", "tail − head, 95% CI (Welch t)"], rows
    )


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
    return [*parts, "", *per_stratum(summary, tail_table)]
