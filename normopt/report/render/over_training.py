"""The over-training section of report.md and the answer's words for an interaction's stability
(the curves and the rule: :mod:`normopt.report.stats.over_training`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normopt.report.render.tables import markdown_table
from normopt.report.stats.over_training import curve_label, stability_record


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4f}"


def _change_text(change: Mapping[str, Any] | None) -> str:
    if change is None:
        return "—"
    ci = change["ci95"]
    return (
        f"{_num(change['value'])} "
        + ("(no interval)" if ci is None else f"[{_num(ci[0])}, {_num(ci[1])}]")
        + f" (step {change['from_step']} → {change['to_step']})"
    )


def stability_of(summary: Mapping[str, Any], item: Mapping[str, Any]) -> str | None:
    """The stability verdict of a final-step interaction record, for the final-step table;
    None without over-training curves."""
    st = stability_record(summary, item)
    if st is None:
        return None
    settled = (
        f", sign since step {st['sign_settled_at']}"
        if st.get("sign_settled_at") is not None and not st["verdict"].startswith("too few")
        else ""
    )
    return f"{st['verdict']}{settled}"


def stability_clause(summary: Mapping[str, Any], item: Mapping[str, Any]) -> str | None:
    """The answer's words for a final-step interaction's stability: the verdict, the change Delta
    over the window with its 95% interval, and what the verdict means for the final-step
    reading; None without over-training curves."""
    st = stability_record(summary, item)
    if st is None:
        return None
    verdict = st["verdict"]
    change = st.get("change")
    delta = "" if change is None else f"; change Δ over the window {_change_text(change)}"
    margin = (summary.get("over_training") or {}).get("margin")
    meaning = {
        "sign changes": (
            " — the final-step estimate's sign is not settled, so its test says nothing about later steps"
        ),
        "drifts": " — the estimate was still moving, so the final step may not be where it settles",
        "stable": f" — the change is shown within ±{margin:g} nats" if margin is not None else "",
        "change unresolved": " — the change is neither shown small nor distinguishable from 0",
    }.get(verdict, "")
    return f"over the last quarter of training: {verdict}{delta}{meaning}"


def over_training_section(summary: Mapping[str, Any], plot: str | None) -> list[str]:
    """report.md's section: the rule, one table row per interaction (final, window range,
    verdict) and each interaction's values at every eval step (the gaps' in summary.json)."""
    curves = summary.get("over_training") or {}
    if not curves.get("interactions") and not curves.get("gaps"):
        return []
    parts = [
        "## Over training",
        "",
        (
            "The gaps and interactions at every eval step, from the same included cells as the final-step "
            "tables (Welch t intervals; intervals at different steps share their seeds, so they are not "
            f"independent tests). Stability: {curves['rule']}."
        ),
        "",
    ]
    rows = []
    for r in curves["interactions"]:
        st = r["stability"]
        lo_hi = st.get("window_range")
        change = st.get("change")
        rows.append(
            [
                r["variant"],
                curve_label(r),
                _num(st.get("final")),
                "—" if not lo_hi else f"{_num(lo_hi[0])} … {_num(lo_hi[1])}",
                ", ".join(str(t) for t in st["window_steps"]) or "—",
                _change_text(change),
                "—"
                if change is None or change["ci90"] is None
                else f"[{_num(change['ci90'][0])}, {_num(change['ci90'][1])}]",
                st["verdict"],
                "—" if st.get("sign_settled_at") is None else str(st["sign_settled_at"]),
            ]
        )
    if not rows:
        parts += [
            "No interaction to follow (the report has no across axis, or no computable interaction): "
            "the gaps over steps are in the plot and in summary.json.",
            "",
        ]
    if rows:
        parts += [
            markdown_table(
                [
                    "variant",
                    "optimizer",
                    "final interaction",
                    "range over the window",
                    "window eval steps",
                    "change Δ over the window, 95% CI (Welch t)",
                    f"Δ's 90% CI (stable if inside ±{curves['margin']:g})",
                    "verdict",
                    "final sign since step",
                ],
                rows,
            ),
            "",
        ]
    for r in curves["interactions"]:  # the gaps' curves: the plot and summary.json
        cells = [
            f"{p['step']}: {_num(p['value'])}"
            + (f" [{_num(p['ci95'][0])}, {_num(p['ci95'][1])}]" if p["ci95"] is not None else "")
            for p in r["points"]
        ]
        parts.append(f"- interaction {r['variant']} × {curve_label(r)} at each eval step: " + "; ".join(cells))
    parts.append("")
    if plot:
        parts += [f"![over_training]({plot})", ""]
    return parts
