"""Numbers, intervals and strata as report text, shared by report.md's sections and the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def number(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def interval(ci: Sequence[float] | None, digits: int = 4) -> str:
    return "no interval" if ci is None else f"[{number(ci[0], digits, True)}, {number(ci[1], digits, True)}]"


def percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def percent_interval(ci: Sequence[float] | None, note: str | None = None) -> str:
    if ci is None:
        return f"no interval ({note})" if note else "no interval"
    return f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]"


def strata(summary: Mapping[str, Any]) -> list[dict[str, str] | None]:
    """The summary's strata in order ([None] for a report without strata)."""
    if not summary["settings"]["axes"]["strata"]:
        return [None]
    found: list[dict[str, str]] = []
    for group in summary["groups"]:
        if group["stratum"] not in found:
            found.append(group["stratum"])
    return found


def stratum_label(stratum: Mapping[str, str] | None) -> str:
    return "" if not stratum else ", ".join(f"{k}={v}" for k, v in stratum.items())


def in_stratum(records: Sequence[Mapping[str, Any]], stratum: Mapping[str, str] | None) -> list[Mapping[str, Any]]:
    return [r for r in records if stratum is None or r.get("stratum") == stratum]


def stratum_prefix(record: Mapping[str, Any]) -> str:
    label = stratum_label(record.get("stratum"))
    return f"[{label}] " if label else ""


def nouns(summary: Mapping[str, Any]) -> tuple[str, str]:
    s = summary["settings"]
    return s.get("compare_noun", "norm"), s.get("across_noun", "optimizer") or ""


def per_stratum(summary: Mapping[str, Any], table) -> list[str]:
    """``table`` once, or once per stratum under its own heading."""
    out = []
    for stratum in strata(summary):
        if stratum is not None:
            out += [f"### {stratum_label(stratum)}", ""]
        out += [table(summary, stratum), ""]
    return out
