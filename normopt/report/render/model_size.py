"""The size axis's section of report.md and its answer lines (the numbers:
:mod:`normopt.report.stats.model_size`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from normopt.report.render.tables import markdown_table
from normopt.report.stats.line_fit import VERDICT_WORDS
from normopt.report.stats.model_size import count_text, interval_text, levels_label, ratio_text, signed_text


def _context_prefix(record: Mapping[str, Any]) -> str:
    label = levels_label(record.get("context") or {})
    return f"[{label}] " if label else ""


def size_answer_lines(summary: Mapping[str, Any]) -> list[str]:
    """One answer line per fit, with its context's tokens-per-parameter state."""
    section = summary.get("model_size")
    if not section:
        return []
    held = {tuple(t["context"].items()): t for t in section["tokens_per_param"]}
    lines = []
    for fit in section["fits"]:
        tokens = held.get(tuple(fit["context"].items())) or {"held": "unknown"}
        note = ""
        if tokens["held"] == "setting":
            note = f" Tokens per parameter held fixed (train.tokens_per_param = {tokens['setting']:g})."
        elif tokens["held"] == "spec":
            note = " Tokens per parameter the same at every size."
        elif tokens["held"] == "no":
            note = (
                f" Tokens per parameter change with size ({tokens['spread']:.2g}x between the extremes: "
                "section Interaction against model size)."
            )
        lines.append(f"- {_context_prefix(fit)}{fit['sentence']}{note}")
    return lines


def _size_table(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:

    section = summary["model_size"]
    members = [s for s in section["sizes"] if s["context"] == context]
    pairs = list(dict.fromkeys((i["variant"], i["optim"]) for s in members for i in s["interactions"]))
    rows = []
    for s in members:
        found = {(i["variant"], i["optim"]): i for i in s["interactions"]}
        steps = " / ".join(str(x) for x in s["steps"]) or "?"
        row = [
            s["label"],
            "?" if s["parameters"] is None else f"{count_text(s['parameters'])} ({s['parameters']:,})",
            "—" if s["ln_parameters"] is None else f"{s['ln_parameters']:.3f}",
            steps,
            "?" if s["tokens"] is None else count_text(s["tokens"]),
            ratio_text(s["tokens_per_param"]),
        ]
        for pair in pairs:
            i = found.get(pair)
            row.append(
                "—"
                if i is None
                else f"{signed_text(i['value'])} {interval_text(i['ci95'])}"
                if i["ci95"] is not None
                else signed_text(i["value"])
            )
        rows.append(row)
    header = [
        "size",
        "parameters N",
        "ln N",
        "steps",
        "tokens T",
        "T / N",
        *[f"{v} × {o} interaction, 95% CI (Welch t)" for v, o in pairs],
    ]
    return markdown_table(header, rows)


def _fit_table(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:

    rows = []
    for fit in summary["model_size"]["fits"]:
        if fit["context"] != context:
            continue
        rows.append(
            [
                f"{fit['variant']} × {fit['optim']}",
                str(fit["k"]),
                fit["weights"],
                signed_text(fit["intercept"]),
                signed_text(fit["slope"]),
                "—" if fit["slope_se"] is None else f"{fit['slope_se']:.3f}",
                "—" if fit["df"] is None else str(fit["df"]),
                interval_text(fit["ci95"]),
                signed_text(fit["slope_per_doubling"]),
                "—" if fit["residual_scale"] is None else f"{fit['residual_scale']:.2f}",
                VERDICT_WORDS[fit["verdict"]],
            ]
        )
    return markdown_table(
        [
            "interaction",
            "sizes k",
            "weights",
            "intercept a",
            "slope b (nats per unit ln N)",
            "se(b)",
            "df (k − 2)",
            "95% CI of b (t)",
            "b × ln 2 (per doubling)",
            "scatter s",
            "verdict",
        ],
        rows,
    )


def size_section(summary: Mapping[str, Any], plot: str | None = None) -> list[str]:
    """The report.md section: what is fitted, the verdicts, the tokens per parameter, the tables
    and ``plot`` (its file name, when drawn)."""
    section = summary.get("model_size")
    if not section:
        return []
    keys = ", ".join(f"`{k}`" for k in section["axes"])
    parts = [
        "## Interaction against model size",
        "",
        (
            f"The size axis {keys}: each interaction estimated within each size (as in the section Interaction), "
            "against the number of parameters N: the model's parameters without its norm layers' weights and "
            "embedding scale (the same for every norm of a size; the N that train.tokens_per_param uses), at "
            "the config's vocabulary. Tokens T = steps × global batch × sequence length. The fit: "
            "I_i = a + b ln N_i by weighted least squares over the k sizes, weights 1/se_i² (se_i the Welch "
            "standard error of I_i; equal weights where a size has 1 seed); se(b) = sqrt(s² / S_xx) with "
            "s² = Σ w_i r_i² / (k − 2) the weighted scatter about the line (s = 1: as large as the seeds "
            "predict) and S_xx = Σ w_i (ln N_i − mean_w)²; the 95% interval is b ∓ t_{0.975, k−2} se(b), so "
            "with 3 sizes it has 1 degree of freedom, and with 2 sizes none: the slope is then not tested "
            "and the difference of the two interactions is given with its Welch t interval. Verdict: grows "
            "(interval above 0), shrinks (below 0), cannot be told apart from flat (includes 0). One "
            "unadjusted test per interaction, outside the main family."
        ),
        "",
    ]
    for context in [t["context"] for t in section["tokens_per_param"]]:
        if context:
            parts += [f"### {levels_label(context)}", ""]
        parts += [f"- {fit['sentence']}" for fit in section["fits"] if fit["context"] == context]
        parts += [f"- {t['sentence']}" for t in section["tokens_per_param"] if t["context"] == context]
        parts += [
            f"- At {s['label']}, {len(s['learned_no_context'])} cell(s) learned almost no context "
            f"({', '.join(s['learned_no_context'])}): the interaction there measures noise more than the "
            "norm or the optimizer, and so does the fit through it."
            for s in section["sizes"]
            if s["context"] == context and s["learned_no_context"]
        ]
        parts += ["", _size_table(summary, context), ""]
        if any(fit["context"] == context for fit in section["fits"]):
            parts += [_fit_table(summary, context), ""]
    if plot:
        parts += [f"![model_size]({plot})", ""]
    return parts
