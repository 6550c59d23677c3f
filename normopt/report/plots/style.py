"""What every report plot shares: ``figure`` is how every experiment plot (the spectrum fit's too)
gets its matplotlib Figure, and each variant and seed has one style in every plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normopt.errors import UserError
from normopt.report.cells.cell_reading import Cell

MARKERS = "osD^v<>ph*"
SEED_LINESTYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))


def figure(**kwargs):
    """A matplotlib Figure without pyplot: no global backend state, PNGs drawn by Agg."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the plots need matplotlib: pip install matplotlib") from None
    return Figure(layout="constrained", **kwargs)


def variant_styles(summary: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """variant -> (color, marker), in the summary's variant order: lines that overlap stay
    distinguishable by their markers, not only by a color."""
    return {v: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, v in enumerate(summary["variants"])}


def seed_styles(cells: Sequence[Cell]) -> dict[int | None, str]:
    """seed -> line style, the same in every panel (seeds sorted; None last)."""
    seeds = sorted({c.seed for c in cells}, key=lambda s: (s is None, s or 0))
    return {s: SEED_LINESTYLES[i % len(SEED_LINESTYLES)] for i, s in enumerate(seeds)}
