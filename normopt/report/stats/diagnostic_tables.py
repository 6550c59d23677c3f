"""The report's rows from diagnostics it has no section of its own for (a plugin's): each
diagnostic's ``report_rows`` over the cells' last records (diagnostics/diagnostic.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normopt.diagnostics.registry import DIAGNOSTICS
from normopt.report.cells.cell_reading import Cell


def diagnostic_tables(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One table per registered diagnostic with rows to add: ``{"kind", "title", "header",
    "rows"}`` (cells as text, in cell order), from (cell name, the diagnostic's ``read`` of
    the cell's last record) of every cell that has one."""
    tables = []
    for kind, diagnostic in DIAGNOSTICS.items():
        values = [
            (cell.name, cell.diagnostics.others[kind])
            for cell in cells
            if cell.diagnostics is not None and kind in cell.diagnostics.others
        ]
        table = diagnostic.report_rows(values) if values else None
        if table is not None:
            title, header, rows = table
            tables.append(
                {"kind": kind, "title": title, "header": list(header), "rows": [[str(c) for c in r] for r in rows]}
            )
    return tables
