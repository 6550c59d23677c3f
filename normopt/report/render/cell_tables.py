"""The per-cell tables of report.md: every cell with its flags, and the diagnostics and isotropy
of the cells that logged them (descriptive)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normopt.report.render.tables import markdown_table
from normopt.report.render.text import nouns, number


def _below_unigram(cell: Mapping[str, Any]) -> str:
    if cell["unigram_entropy"] is None or cell["final_eval_loss"] is None:
        return "—"
    text = number(cell["final_eval_loss"] - cell["unigram_entropy"], 3, True)
    return f"{text} (learned no context)" if cell["learned_no_context"] else text


def placement_columns(summary: Mapping[str, Any]) -> list[str]:
    compare_noun, across_noun = nouns(summary)
    columns = ["variant" if compare_noun == "norm" else compare_noun]
    columns += [across_noun] if across_noun else []
    return columns + (["stratum"] if summary["settings"]["axes"]["strata"] else [])


def placement(summary: Mapping[str, Any], c: Mapping[str, Any]) -> list[str]:
    values = [c["variant"] or "—"]
    values += [str(c["optim"] or "—")] if summary["settings"]["axes"]["across"] is not None else []
    return values + ([c.get("stratum", "")] if summary["settings"]["axes"]["strata"] else [])


def cell_table(summary: Mapping[str, Any]) -> str:
    rows = [
        [
            c["name"],
            *placement(summary, c),
            str(c["seed"]),
            number(c["final_eval_loss"]),
            _below_unigram(c),
            f"{'—' if c['last_step'] is None else c['last_step']} / {'?' if c['steps'] is None else c['steps']}",
            ", ".join(c["flags"]) or "ok",
        ]
        for c in summary["cells"]
    ]
    return markdown_table(
        [
            "cell",
            *placement_columns(summary),
            "seed",
            "final eval loss",
            "minus unigram entropy",
            "last step / steps",
            "flags",
        ],
        rows,
    )


def _bucket_losses(losses: Sequence[float | None] | None, step: int | None) -> str:
    if losses is None:
        return "—"
    return f"{', '.join(number(v, 2) for v in losses) or 'no buckets'} (step {step})"


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
                *placement(summary, c),
                str(c["seed"]),
                "—"
                if d["final_saturation"] is None
                else f"{number(d['final_saturation'])} (step {d['saturation_step']})",
                "—" if d["final_spectral_norm"] is None else f"{number(d['final_spectral_norm'], 3)} (step {steps[1]})",
                f"{number(d.get('embedding_spectral_norm'), 3)} / {number(d.get('output_spectral_norm'), 3)}",
                "—"
                if d["spectral_norm_growth"] is None
                else f"×{number(d['spectral_norm_growth'], 3)} (step {steps[0]} → {steps[1]})",
                _bucket_losses(d["tail_bucket_loss"], d["tail_tokens_step"]),
                ", ".join(c["flags"]) or "ok",
            ]
        )
    return markdown_table(
        [
            "cell",
            *placement_columns(summary),
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
            f"{number(mean_of(d['update_isotropy'], t), 2)} / {number(mean_of(d['weight_isotropy'], t), 2)}"
            for t in types
        ]
        rows.append([c["name"], *placement(summary, c), str(d["isotropy_step"]), *cells])
    return markdown_table(["cell", *placement_columns(summary), "step", *types], rows)
