"""The setup block report.md opens with (the values: :mod:`normopt.report.cells.run_setup`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _count(n: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _listed(values: Sequence[Any], show=str) -> str:
    return "?" if not values else " / ".join(show(v) for v in values)


def _parameters(counts: Sequence[int]) -> str:
    """One count, or the range over the cells (norms differ by a few parameters a layer)."""
    if not counts:
        return "?"
    low, high = min(counts), max(counts)
    if low == high:
        return f"{_count(low)} ({low:,})"
    rounded = _count(low) if _count(low) == _count(high) else f"{_count(low)}–{_count(high)}"
    return f"{rounded} ({low:,}–{high:,} by cell)"


def setup_lines(setup: Mapping[str, Any]) -> list[str]:
    """The setup as a few markdown list lines (values that differ between cells joined by " / ")."""
    code = setup["normopt"]
    commit = code["commit"] and code["commit"][:12] + ("-dirty" if code["commit"].endswith("-dirty") else "")
    version = (
        " ".join(filter(None, [code["version"] and f"normopt {code['version']}", commit and f"commit `{commit}`"]))
        or "unknown"
    )
    sources = f" (from {', '.join(setup['parameters_from'])})" if setup["parameters_from"] else ""
    return [
        f"- **model**: {_parameters(setup['parameters'])} parameters{sources}; preset {_listed(setup['presets'])}",
        f"- **length**: {_listed(setup['steps'])} steps × {_listed(setup['global_batch_size'])} sequences × "
        f"{_listed(setup['seq_len'])} tokens = {_listed(setup['tokens'], _count)} training tokens per run",
        f"- **data**: {_listed(setup['data'])}",
        f"- **seeds**: {_listed(setup['seeds'])}",
        f"- **report written by**: {version}",
    ]
