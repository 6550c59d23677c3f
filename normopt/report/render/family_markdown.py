"""The report's multiplicity and confound sections (markdown): the main family with its
Holm-adjusted p-values and simultaneous intervals, the factor effects of a confound ablation,
and the cells left out per group. Reads only the summary (:mod:`normopt.report.stats.multiplicity`,
:mod:`normopt.report.stats.factor_effects` say what the numbers are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.render.tables import markdown_table
from normopt.report.stats.left_out import bias_phrase
from normopt.report.stats.multiplicity import ALPHA, equivalence_phrase


def _signed(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _interval(ci: Sequence[float] | None, digits: int = 3) -> str:
    return "no interval" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3g}"


def _prefix(record: Mapping[str, Any]) -> str:
    stratum = record.get("stratum")
    return f"[{', '.join(f'{k}={v}' for k, v in stratum.items())}] " if stratum else ""


def flag_text(record: Mapping[str, Any]) -> str:
    """' ⚠ cells left out of its groups (derf/muon: 1 cell left out (1 diverged)): the
    interaction is biased low, ...' when a group of the contrast lost cells (with the direction
    of ``left_out_bias``, :mod:`normopt.report.stats.left_out`), else ''."""
    flags = record.get("left_out") or []
    if not flags:
        return ""
    text = f" ⚠ cells left out of its groups ({'; '.join(flags)})"
    biases = record.get("left_out_bias") or []
    if biases:
        return text + ": " + "; ".join(bias_phrase(b) for b in biases)
    if not any("diverged" in line for line in flags):
        return text + ": no direction implied (a missing or stopped cell says nothing about its loss)"
    return text


def holm_verdict(p_holm: float | None) -> str:
    if p_holm is None:
        return "not tested (1 seed)"
    return f"Holm p={p_holm:.3g}, " + (
        "distinguishable from 0 in the family" if p_holm < ALPHA else "not distinguishable from 0 in the family"
    )


def family_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """One row per member of the main family."""
    rows = []
    single = summary["settings"]["axes"]["across"] is None
    if single:
        for g in summary["gaps"]:
            rows.append(
                [
                    f"{_prefix(g)}gap {g['variant']} − {g['baseline']}",
                    _signed(g["value"]),
                    _interval(g["ci95"]),
                    _interval(g.get("ci_simultaneous")),
                    _p(g["p"]),
                    _p(g.get("p_holm")),
                    flag_text(g).strip() or "—",
                ]
            )
    for i in summary["interactions"]:
        rows.append(
            [
                f"{_prefix(i)}interaction {i['variant']} × {i['optim']}",
                _signed(i["value"]),
                _interval(i["ci95"]),
                _interval(i.get("ci_simultaneous")),
                _p(i["p"]),
                _p(i.get("p_holm")),
                flag_text(i).strip() or "—",
            ]
        )
    key = "share" if single else "interaction_share"
    for r in summary["recoveries"]:
        if r.get("family") != "main" or r[key] is None:
            continue
        rows.append(
            [
                f"{_prefix(r)}{r['fix']}'s share of {r['base_norm']}'s "
                f"{'gap' if single else 'interaction'} under {r['optim']}",
                f"{100 * r[key]:.1f}%",
                _pct_interval(r["ci95"] if single else r["interaction_ci95"]),
                _pct_interval(r.get(f"{key}_ci_simultaneous")),
                _p(r["p"]),
                _p(r.get(f"{key}_p_holm")),
                flag_text(r).strip() or "—",
            ]
        )
    for f in summary.get("factor_effects", []):
        rows.append(
            [
                f"{_prefix(f)}factor {f['factor']} under {f['optim']}",
                _signed(f["value"]),
                _interval(f["ci95"]),
                _interval(f.get("ci_simultaneous")),
                _p(f["p"]),
                _p(f.get("p_holm")),
                flag_text(f).strip() or "—",
            ]
        )
    return rows


def _pct_interval(ci: Sequence[float] | None) -> str:
    return "no interval" if ci is None else f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"


def family_section(summary: Mapping[str, Any]) -> list[str]:
    """'## The main family of comparisons': what is in it, how it is adjusted, the table, and
    what is exploratory."""
    family = summary.get("family")
    if not family or not family["members"]:
        return []
    m = family["size"]
    return [
        "## The main family of comparisons",
        "",
        (
            f"The answer above rests on {family['members']} comparisons ({family['composition']}); {m} of them "
            f"have a test. Adjustment: {family['method']}. {family['rejected']} of {m} are distinguishable from 0 "
            f"after adjustment. A share is tested through its gain (H0: the fix gains nothing). Labelled "
            f"exploratory, with unadjusted 95% intervals and not to be read one at a time as findings: "
            f"{family['exploratory']}."
        ),
        "",
        markdown_table(
            [
                "comparison",
                "estimate",
                "95% CI (unadjusted)",
                f"simultaneous {family['simultaneous_level']:.2%} CI (Bonferroni)",
                "p",
                "p (Holm)",
                "left-out cells",
            ],
            family_rows(summary),
        ),
        "",
    ]


def factor_lines(summary: Mapping[str, Any]) -> list[str]:
    """The answer paragraph's lines for a confound ablation: per factor, its effect on the
    interaction with its intervals and verdicts, then which factors carry the interaction."""
    effects = summary.get("factor_effects") or []
    if not effects:
        return []
    lines = []
    carriers = []
    for f in effects:
        lines.append(
            f"- {_prefix(f)}**factor {f['factor']}** ({f['without']} → {f['with']}): changes the interaction "
            f"with {f['optim']} by {_signed(f['value'])} nats {_interval(f['ci95'])} (simultaneous "
            f"{_interval(f.get('ci_simultaneous'))}; {holm_verdict(f.get('p_holm'))}; "
            f"{equivalence_phrase(f.get('equivalence'))}).{flag_text(f)}"
        )
        if f.get("p_holm") is not None and f["p_holm"] < ALPHA:
            carriers.append(
                f"{_prefix(f)}{f['factor']} under {f['optim']} (effect on the {f['optim']} − "
                f"{f['reference_optim']} interaction {_signed(f['value'])} nats)"
            )
    m = summary["family"]["size"]
    if carriers:
        rest = (
            "; the other factors' effects are not distinguishable from 0 at these seeds"
            if len(carriers) < len(effects)
            else ""
        )
        lines.append(
            f"- **Which factor carries the interaction**: after Holm adjustment over the {m} main "
            f"comparisons, switching {', '.join(carriers)} changes it{rest}."
        )
    else:
        lines.append(
            f"- **Which factor carries the interaction**: none of the factors' effects is "
            f"distinguishable from 0 after Holm adjustment over the {m} main comparisons; the "
            f"intervals above bound how much each could carry."
        )
    return lines


def factor_section(summary: Mapping[str, Any]) -> list[str]:
    effects = summary.get("factor_effects") or []
    if not effects:
        return []
    rows = [
        [
            f"{_prefix(f)}{f['factor']}",
            f"{f['without']} → {f['with']}",
            f"{f['optim']} − {f['reference_optim']}",
            _signed(f["value"]),
            _interval(f["ci95"]),
            "—" if f["paired"] is None else f"{_signed(f['paired']['value'])} {_interval(f['paired']['ci95'])}",
            equivalence_phrase(f.get("equivalence")),
            f"{_signed(f['gap_change']['value'])} {_interval(f['gap_change']['ci95'])}",
        ]
        for f in effects
    ]
    return [
        "## Factor effects",
        "",
        (
            "effect = interaction(with the factor) − interaction(without it) = (L[with,O] − L[with,ref]) − "
            "(L[without,O] − L[without,ref]): how much switching that one factor changes the across axis's "
            "effect. 95% CI: Welch t over the four independent means (main family); paired per seed and the change "
            "of the gap under O alone, L[with,O] − L[without,O], are exploratory."
        ),
        "",
        markdown_table(
            [
                "factor",
                "switch",
                "across",
                "effect (nats)",
                "95% CI (Welch)",
                "paired, 95% CI",
                "equivalence",
                "gap change under O, 95% CI",
            ],
            rows,
        ),
        "",
    ]


def _contrast_label(kind: str, record: Mapping[str, Any]) -> str:
    if kind == "gaps":
        return f"{_prefix(record)}gap {record['variant']} − {record['baseline']} under {record['optim']}"
    if kind == "interactions":
        return f"{_prefix(record)}interaction {record['variant']} × {record['optim']} − {record['reference_optim']}"
    if kind == "recoveries":
        return f"{_prefix(record)}{record['fix']}'s recovery of {record['base_norm']} under {record['optim']}"
    return f"{_prefix(record)}factor {record['factor']} under {record['optim']}"


def left_out_section(summary: Mapping[str, Any]) -> list[str]:
    """The cells left out of each group (each cell counted once, with all its flags), and for
    each contrast whose group lost a diverged cell, which way that pushes it
    (:mod:`normopt.report.stats.left_out`)."""
    records = summary.get("left_out_by_group") or []
    if not records:
        return []
    rows = [
        [
            r["stratum"] or "—",
            r["variant"],
            r["optim"],
            ", ".join(f"{n} {combo}" for combo, n in r["by_flags"].items()),
            ", ".join(r["cells"]),
        ]
        for r in records
    ]
    total = sum(len(r["cells"]) for r in records)
    diverged = sum(r["flags"].get("diverged", 0) for r in records)
    directions = [
        f"- {_contrast_label(kind, r)}: " + "; ".join(bias_phrase(b) for b in r["left_out_bias"]) + "."
        for kind in ("interactions", "recoveries", "factor_effects", "gaps")
        for r in summary.get(kind) or ()
        if r.get("left_out_bias")
    ]
    return [
        "## Cells left out, per group",
        "",
        (
            f"{total} cell{'s' if total != 1 else ''} left out, {diverged} of them diverged (each cell counted once; "
            "'diverged + stopped_early' is one cell with both flags). A group that lost a diverged cell shows its "
            "surviving seeds only, so its mean is lower than the group trained. What that does to a contrast "
            "depends on the sign with which the group enters it: a group entering with + (in an interaction the "
            "compared level under O and the baseline under the reference) biases the contrast low, understating a "
            "penalty; a group entering with − (the baseline under O and the compared level under the reference) "
            "biases it high, overstating a penalty. A missing or stopped cell implies no direction. Every contrast "
            "of the answer and the family table that lost cells carries a ⚠; the list below the table gives the "
            "direction of each estimate a lost diverged cell moves."
        ),
        "",
        markdown_table(["stratum", "variant", "optimizer", "left out (cells, by flags)", "cells"], rows),
        "",
        *(["Direction of each affected estimate:", "", *directions, ""] if directions else []),
    ]
