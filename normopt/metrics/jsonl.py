"""Reading and truncating the run directory's JSON-lines logs (metrics, diagnostics).

Both are appended to one line at a time, so a killed writer can leave an unterminated last
line; that line is skipped. Any other line that does not parse is a UserError naming the
file and line, because it means the log is not what normopt wrote.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from normopt.errors import UserError, os_reason

T = TypeVar("T")


def read_step_records(path: Path, what: str, parse: Callable[[dict[str, Any]], T]) -> tuple[list[T], bool]:
    """``parse(record)`` of every line, in file order, and whether a partial last line was
    skipped. Each line must be a JSON object with a non-negative integer "step"; ``parse`` raises
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
            if step < 0:
                raise ValueError(f"step {step} is negative")
            parsed.append(parse(record))
        except ValueError as exc:
            if number == len(lines):
                partial = True
                continue
            raise UserError(f"{path}:{number}: unreadable {what} line ({exc})") from None
    return parsed, partial


def step_lines(path: Path) -> list[tuple[str, int]]:
    """(line, step) of every line of a metrics or diagnostics file, each a JSON object with a
    non-negative integer step; blank lines and a torn last line (a killed writer's) are
    skipped, any other damage is a UserError naming the line. A missing file has none."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    out = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                continue  # a torn last line: the writer was killed mid-line
            raise UserError(f"{path}: line {index + 1} is not JSON") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise UserError(f"{path}: line {index + 1} has no step (a non-negative integer)")
        out.append((line, step))
    return out


def truncate_after(path: Path, last_step: int) -> None:
    """Drop the lines logged after ``last_step`` (a resumed run logs them again) and a torn
    last line; a missing file is left missing."""
    if path.exists():
        path.write_text("".join(line + "\n" for line, step in step_lines(path) if step <= last_step))


def write_failure(what: str, exc: OSError, step=None) -> UserError:
    """The one line that ends a run whose log write the disk refused: the file, the reason
    (a full disk named as such, however the writer wrapped it) and when."""
    reason = os_reason(exc) or getattr(exc, "strerror", None) or type(exc).__name__
    when = f"at step {step}" if step is not None else "when closing it"
    return UserError(f"writing {what} failed ({reason}) {when}; the checkpoints written so far are kept")


@contextlib.contextmanager
def log_writes(what: str, step=None):
    """Turn an OSError of the writes inside (a log, TensorBoard's event file) into
    :func:`write_failure`'s one line."""
    try:
        yield
    except OSError as exc:
        raise write_failure(what, exc, step) from None


def append_record(file, line: str, step) -> None:
    """Append one JSON line to an open log; a write the disk refuses ends the run with one
    line naming the file and the reason (a full disk named as such), never a traceback."""
    with log_writes(file.name, step):
        file.write(line + "\n")


def close_log(file, what: str | None = None) -> None:
    """Close an open log (its last buffered bytes are written now): one line if refused."""
    with log_writes(what or file.name):
        file.close()
