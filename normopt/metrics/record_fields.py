"""Reading the fields of a logged record back (metrics.jsonl, diagnostics.jsonl): numbers as
the loggers write them (non-finite floats spelled "nan"/"inf"/"-inf", null for undefined).
Each raises ValueError naming the field; the readers add the file and line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def parse_metric(value: Any) -> float:
    """A logged number as a float: JSON numbers as they are; the strings "nan", "inf" and
    "-inf" (how the metrics logger writes non-finite floats) as the matching float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)  # float("nan") / float("-inf") parse; other strings raise ValueError


def optional_metric(value: Any) -> float | None:
    """null -> None, else :func:`parse_metric`."""
    return None if value is None else parse_metric(value)


def mapping_field(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = record.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"'{key}' is not an object")
    return value


def number_list(record: Mapping[str, Any], key: str, required: bool = True) -> tuple[float | None, ...]:
    if key not in record and not required:
        return ()
    value = record.get(key)
    if not isinstance(value, list):
        raise ValueError(f"'{key}' is not a list")
    return tuple(optional_metric(v) for v in value)
