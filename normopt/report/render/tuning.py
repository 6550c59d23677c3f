"""A tuned grid in report.md and on the terminal: the choices, their reliability, the interaction at
every common value (the numbers: :mod:`normopt.report.stats.tuning`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from normopt.report.cells.axes import level_label
from normopt.report.render.family_markdown import flag_text
from normopt.report.render.tables import markdown_table
from normopt.report.stats.tuning import interaction_key
from normopt.report.stats.tuning_choice import BOOTSTRAP_RESAMPLES


def _num(x: float | None, sign: bool = False) -> str:
    return "—" if x is None or not math.isfinite(x) else (f"{x:+.4f}" if sign else f"{x:.4f}")


def _estimate(item: Mapping[str, Any] | None, mark: bool = True) -> str:
    """An estimate with its 95% interval, and ⚠ where a cell of its groups was left out."""
    if item is None:
        return "—"
    ci = item.get("ci95")
    interval = " (no interval)" if ci is None else f" [{_num(ci[0], True)}, {_num(ci[1], True)}]"
    return _num(item["value"], True) + interval + (" ⚠" if mark and item.get("left_out") else "")


def _value_cell(c: Mapping[str, Any], b: Mapping[str, Any], n_seeds: int) -> str:
    """One value's entry of the choice table: the mean over the tuning seeds; a value excluded
    for a diverged run says so; a value whose runs have not all finished shows the finished
    runs' mean marked † with how many it holds (not the mean the column names)."""
    label = level_label(b["value"])
    if label in c["excluded"]:
        return "diverged (excluded)" if "diverged" in c["excluded"][label] else "excluded"
    if b.get("n", len(b["losses"])) < n_seeds:
        return f"{_num(b['mean'])}† ({b.get('n', len(b['losses']))} of {n_seeds} seeds)"
    return _num(b["mean"])


def _share(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "—"
    if r["share_chosen_wins"] is None:
        return f"— ({r['reason']})"
    return f"{100 * r['share_chosen_wins']:.1f}%"


def _runner_up_text(c: Mapping[str, Any]) -> str:
    """runner-up − chosen with its 95% t interval and whether it is within the noise."""
    if c["margin"] is None:
        return "—"
    r = (c.get("reliability") or {}).get("runner_up_difference")
    if r is None or r["ci95"] is None:
        return f"{_num(c['margin'], True)} (no interval)"
    kind = "paired t" if r["paired"] else "Welch t"
    verdict = "within the noise" if r["within_noise"] else "outside the noise"
    return f"{_num(r['value'], True)} [{_num(r['ci95'][0], True)}, {_num(r['ci95'][1], True)}] ({kind}; {verdict})"


def tuning_lines(summary: Mapping[str, Any]) -> list[str]:
    """The terminal's lines of a tuned grid: each cell's choice."""
    t = summary.get("tuning")
    if not t:
        return []
    lines = []
    for c in t["choices"]:
        where = c["optim"] + (f" | {c['stratum']}" if c["stratum"] else "")
        if c["chosen"] is None:
            lines.append(f"tuned {t['key']} {c['variant']} ({where}): none ({c['reason']})")
            continue
        flags = (["at the edge of the range"] if c["at_edge"] else []) + (
            [f"excluded {', '.join(c['excluded'])}"] if c["excluded"] else []
        )
        r = c.get("reliability") or {}
        if r.get("share_chosen_wins") is not None:
            flags.append(f"wins {_share(r)} of {r['resamples']} seed resamples")
        diff = r.get("runner_up_difference")
        if diff is not None and diff["within_noise"]:
            flags.append(f"runner-up {level_label(c['runner_up'])} within the noise")
        lines.append(
            f"tuned {t['key']} {c['variant']} ({where}): {level_label(c['chosen'])}, {t['by']} "
            f"{_num(c['metric'])}" + (f" ({'; '.join(flags)})" if flags else "")
        )
    return lines


def tuning_lead(summary: Mapping[str, Any]) -> list[str]:
    """The line under the answer of a tuned grid: at which values its tables are."""
    t = summary.get("tuning")
    if not t:
        return []
    return [
        (
            f"Every table below is at each cell's tuned `{t['key']}`, chosen on the tuning seeds "
            f"{', '.join(map(str, t['tuning_seeds'])) or '—'} and measured on the evaluation seeds "
            f"{', '.join(map(str, t['evaluation_seeds'])) or '—'}; the section Tuning gives each choice and "
            "the interaction at every common value."
        ),
        "",
    ]


def _survival_line(k: Mapping[str, Any], key: str, reference: str) -> str:
    """One interaction's reading across the values: at the tuned values, the range at the common
    values none of whose tuning runs was left out, each flagged value, the values where it is not
    computable."""
    label = f"{k['optim']} − {reference}" + (f" | {k['stratum']}" if k["stratum"] else "")
    tuned = k["tuned"]
    text = f"- {k['variant']} × {label}: at the tuned values {_estimate(tuned, mark=False)}"
    text += flag_text(tuned) if tuned else ""
    at = ", ".join(level_label(v) for v in k["common_range_values"])
    if k["common_range"] is not None:
        where = "at the common values" if not k["flagged"] else "at the common values whose tuning runs all counted"
        text += (
            f"; {where} from {_num(k['common_range'][0], True)} to {_num(k['common_range'][1], True)} "
            f"(point estimates at {key}={at}; their intervals in the table below)"
        )
    else:
        text += "; at no common value without a left-out tuning run"
    for f in k["flagged"]:
        estimate = _estimate({**f, "value": f["estimate"]}, mark=False)
        text += f"; at {key}={level_label(f['value'])} {estimate}{flag_text(f)}"
    if k["not_computable"]:
        text += f"; not computable at {key}={', '.join(level_label(v) for v in k['not_computable'])}"
    return text


def tuning_section(summary: Mapping[str, Any], plot: str | None) -> list[str]:
    """report.md's tuning section: how the values were chosen, the choice table with each
    choice's reliability, the interaction at each common value beside the tuned one (with the
    left-out flags of each), the selection-bias statement."""
    t = summary.get("tuning")
    if not t:
        return []
    key = t["key"]
    n_seeds = len(t["tuning_seeds"])
    resamples = t.get("resamples", BOOTSTRAP_RESAMPLES)
    horizon = (
        f"{t['tuning_steps']} steps each (their own horizon)"
        if t.get("tuning_steps")
        else "as many steps as the evaluation runs"
    )
    parts = [
        "## Tuning",
        "",
        (
            f"Each cell (its axes and arm, without the seed) ran every value of `{key}` "
            f"({', '.join(level_label(v) for v in t['values'])}) on the tuning seeds "
            f"{', '.join(map(str, t['tuning_seeds'])) or '—'}, {horizon}. Chosen: the lowest {t['by']} "
            f"({t['metric']}); a value with a diverged tuning run is excluded; a value with a tuning run not "
            "finished (not run yet, or stopped before its last step without diverging; rerunning the grid "
            "resumes it) makes the choice wait; a tie (equal means) goes to the value listed first; a choice at "
            "the smallest or largest value tried is flagged (the best value may lie outside the range). Every "
            "table above this section is at the chosen values, on the evaluation seeds "
            f"{', '.join(map(str, t['evaluation_seeds'])) or '—'}."
        ),
        "",
        t["selection_bias"],
        "",
    ]
    header = [
        "variant",
        "optimizer",
        *[f"{key}={level_label(v)}" for v in t["values"]],
        "chosen",
        "runner-up − chosen, 95% t CI",
        f"chosen still wins (share of {resamples} seed resamples)",
        "note",
        "evaluation mean at chosen (n)",
        "tuning − evaluation",
    ]
    rows = []
    partial = False
    for c in t["choices"]:
        cells = [_value_cell(c, b, n_seeds) for b in c["by_value"]]
        partial = partial or any("†" in x for x in cells)
        note = []
        if c["at_edge"]:
            note.append("at the edge of the range")
        if c["tied"]:
            note.append(f"tied with {', '.join(level_label(v) for v in c['tied'])}")
        if c["excluded"]:
            note.append(f"excluded {', '.join(c['excluded'])}")
        diff = (c.get("reliability") or {}).get("runner_up_difference")
        if diff is not None and diff["within_noise"]:
            note.append(f"runner-up {level_label(c['runner_up'])} within the noise")
        if c["reason"]:
            note.append(c["reason"])
        rows.append(
            [
                c["variant"],
                c["optim"] + (f" | {c['stratum']}" if c["stratum"] else ""),
                *cells,
                "none" if c["chosen"] is None else level_label(c["chosen"]),
                _runner_up_text(c),
                _share(c.get("reliability")),
                "; ".join(note) or "—",
                f"{_num(c['evaluation_mean'])} ({c['evaluation_n']})",
                _num(c["tuning_minus_evaluation"], True),
            ]
        )
    parts += [
        f"{t['by']} per value (mean over the tuning seeds), the choice, how reliable it is, and the "
        "evaluation seeds' mean at the chosen value. Runner-up − chosen: the difference of their means over "
        "the tuning seeds with its 95% t interval (paired per seed, k−1 degrees of freedom); the runner-up is "
        "within the noise when the interval includes 0 (measured on the seeds that chose, so it favours the "
        f"chosen value). Chosen still wins: the share of {resamples} bootstrap resamples of the tuning seeds "
        f"(with replacement, each seed with all its values' runs; random.Random({t.get('resample_seed', 0)})"
        ") in which the chosen value still has the lowest mean; with k seeds there are few distinct "
        "resamples (3 at k = 2), so the share is coarse. Tuning − evaluation: the tuning runs' mean at the "
        "chosen value minus the evaluation mean, shown only when both ran the same number of steps; negative "
        "= the tuning estimate looked better than held-out seeds confirm.",
        "",
        markdown_table(header, rows),
        "",
    ]
    if partial:
        parts += [
            f"† not the mean over the {n_seeds} tuning seeds: the mean of the runs that finished so far "
            "(how many in brackets); the choice waits for the others.",
            "",
        ]
    records = t.get("survival") or []
    if records:
        reference = summary["settings"]["reference_optim"]
        parts += [_survival_line(k, key, reference) for k in records] + [""]
        rows = []
        for k in records:
            label = f"{k['optim']} − {reference}" + (f" | {k['stratum']}" if k["stratum"] else "")
            at = {
                level_label(v["value"]): next(
                    (i for i in v["interactions"] if interaction_key(i) == (k["variant"], k["optim"], k["stratum"])),
                    None,
                )
                for v in t["per_value"]
            }
            rows.append(
                [k["variant"], label, *[_estimate(at.get(level_label(v))) for v in t["values"]], _estimate(k["tuned"])]
            )
        parts += [
            (
                f"The interaction at each common `{key}` (every cell at that value: the tuning runs, "
                f"{horizon}; 95% Welch t interval where the tuning seeds allow) beside the interaction at the "
                "tuned values (evaluation seeds). ⚠ = a cell of its groups was left out (which, and the "
                "direction of the bias, in the list above). Whether the interaction survives tuning is the last "
                "column against the others."
            ),
            "",
            markdown_table(
                [
                    "variant",
                    "optimizer",
                    *[f"at {key}={level_label(v)}" for v in t["values"]],
                    "at the tuned values (evaluation seeds)",
                ],
                rows,
            ),
            "",
        ]
    parts += [f"- {note}" for note in t["notes"]]
    if plot:
        parts += ["", f"![tuning]({plot})", ""]
    return parts
