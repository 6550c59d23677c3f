"""The final-step tables: losses and gaps, interactions, fix recoveries (one per stratum)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normopt.report.render.over_training import stability_of
from normopt.report.render.tables import markdown_table
from normopt.report.render.text import in_stratum, interval, nouns, number, percent, percent_interval


def main_table(summary: Mapping[str, Any], stratum: Mapping[str, str] | None = None) -> str:
    """Final eval loss mean ± sample std (n) per variant x optimizer (the compared x the across
    axis), with the gap to the baseline and its 95% t interval beside each."""
    groups = {(g["variant"], g["optim"]): g for g in in_stratum(summary["groups"], stratum)}
    gaps = {(g["variant"], g["optim"]): g for g in in_stratum(summary["gaps"], stratum)}
    base = summary["settings"]["baseline_norm"]
    single = summary["settings"]["axes"]["across"] is None
    compare_noun, _ = nouns(summary)
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
                else f"{number(g['mean'])} ± {number(g['std'])} (n={g['n']})"
                if g["n"] > 1
                else f"{number(g['mean'])} (n=1)"
            )
            gap = gaps.get((variant, optim))
            row.append(
                "—"
                if gap is None
                else f"{number(gap['value'], sign=True)} {interval(gap['ci95'])}"
                if gap["ci95"] is not None
                else number(gap["value"], sign=True)
            )
        rows.append(row)
    if compare_noun != "norm":
        header[0] = compare_noun
    return markdown_table(header, rows)


def interaction_table(summary: Mapping[str, Any], stratum: Mapping[str, str] | None = None) -> str:
    """interaction = gap(O) - gap(reference) with its 95% t interval, unpaired and paired."""
    rows = []
    compare_noun, across_noun = nouns(summary)
    stability = bool((summary.get("over_training") or {}).get("interactions"))
    for item in in_stratum(summary["interactions"], stratum):
        paired = item["paired"]
        rows.append(
            [
                item["variant"],
                f"{item['optim']} − {item['reference_optim']}",
                number(item["value"], sign=True),
                interval(item["ci95"]),
                "—"
                if paired is None
                else f"{number(paired['value'], sign=True)} {interval(paired['ci95'])} ({paired['n_seeds']} seeds)",
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
    compare_noun, across_noun = nouns(summary)
    rows = []
    for r in in_stratum(summary["recoveries"], stratum):
        row = [
            r["fix"],
            r["base_norm"],
            *([] if single else [r["optim"]]),
            number(r["gap_base"], sign=True),
            number(r["gap_fix"], sign=True),
            percent(r["share"]),
            percent_interval(r["ci95"], r["ci_note"]),
        ]
        if not single:
            row += [
                percent(r["interaction_share"]),
                "—"
                if r["interaction_share"] is None
                else percent_interval(r["interaction_ci95"], r["interaction_ci_note"]),
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
