"""report.md's table of spectral norms by block-matrix type and depth group, the token
embedding and output matrix apart (:func:`normopt.diagnostics.spectral_norm.spectral_norm_groups`
defines the groups). Reads only the summary."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from normopt.report.render.tables import markdown_table


def _value(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def spectral_norm_table(
    summary: Mapping[str, Any], placement_columns: Sequence[str], placement: Callable[[Mapping[str, Any]], list[str]]
) -> str | None:
    """One row per cell with a spectral_norm record: per matrix type the last record's mean
    per depth group ("early / mid / late", in depth order), then the embedding and the output
    matrix; None when no cell logged one."""
    types: list[str] = []
    groups: list[str] = []
    cells = [c for c in summary["cells"] if (c.get("diagnostics") or {}).get("spectral_norm_by_cell")]
    for c in cells:
        for key in c["diagnostics"]["spectral_norm_by_cell"]:
            mtype, group = key.rsplit("/", 1)
            types += [mtype] if mtype not in types else []
            groups += [group] if group not in groups else []
    if not cells:
        return None
    order = {name: i for i, name in enumerate(("early", "mid", "late", "all"))}
    groups.sort(key=lambda g: (order.get(g, len(order)), g))
    rows = []
    for c in cells:
        d = c["diagnostics"]
        by_cell = d["spectral_norm_by_cell"]
        rows.append(
            [
                c["name"],
                *placement(c),
                str(d["spectral_norm_steps"][1]),
                *(" / ".join(_value(by_cell.get(f"{t}/{g}")) for g in groups) for t in types),
                _value(d.get("embedding_spectral_norm")),
                _value(d.get("output_spectral_norm")),
            ]
        )
    header = [
        "cell",
        *placement_columns,
        "step",
        *(f"{t} ({' / '.join(groups)})" for t in types),
        "embedding",
        "output",
    ]
    return markdown_table(header, rows)
