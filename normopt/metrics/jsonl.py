"""Reading the run directory's JSON-lines logs (metrics.jsonl, diagnostics.jsonl).

Both are appended to one line at a time, so a killed writer can leave an unterminated last
line; that line is skipped. Any other line that does not parse is a UserError naming the
file and line, because it means the log is not what normopt wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from normopt.errors import UserError

T = TypeVar("T")


def read_step_records(path: Path, what: str, parse: Callable[[dict[str, Any]], T]) -> tuple[list[T], bool]:
    """``parse(record)`` of every line, in file order, and whether a partial last line was
    skipped. Each line must be a JSON object with an integer "step"; ``parse`` raises
    ValueError for anything else it finds wrong. ``what`` names the log in messages."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read {what} ({exc})") from None
    lines = text.split("\n")  # a terminated file ends with "", so only a partial line can be last
    parsed: list[T] = []
    partial = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            if "step" not in record:
                raise ValueError("no 'step'")
            step = record["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"step {step!r} is not an integer")
            parsed.append(parse(record))
        except ValueError as exc:
            if number == len(lines):
                partial = True
                continue
            raise UserError(f"{path}:{number}: unreadable {what} line ({exc})") from None
    return parsed, partial
