"""The report's notes as lines: a note said of several cells becomes one line naming them
(``collapse_notes``), for report.md's Notes section.
"""

from __future__ import annotations

from collections.abc import Sequence


def collapse_notes(notes: Sequence[str], cell_names: Sequence[str]) -> list[str]:
    """The notes with those that say the same of several cells ("a: skipped ...", "b: skipped
    ...", or "a left out: diverged: ...") merged into one line naming the cells, at the place of
    the first; a note said of one cell, or of no cell, stays as it is. Eight identical lines hide
    the ninth, different one; one line per distinct statement does not."""
    names = sorted(cell_names, key=len, reverse=True)  # "a-s10" must not be read as "a-s1"
    said: dict[str, list[str]] = {}  # statement -> the cells it is said of, in order
    order: list[tuple[str, str]] = []  # ("note", text) or ("statement", key)
    for note in notes:
        name = next((n for n in names if note.startswith((f"{n}: ", f"{n} left out: "))), None)
        if name is None:
            order.append(("note", note))
            continue
        rest = note[len(name) :]
        key = rest.removeprefix(" ") if rest.startswith(" left out: ") else rest.removeprefix(": ")
        if key not in said:
            said[key] = []
            order.append(("statement", key))
        said[key].append(name)
    lines = []
    for kind, text in order:
        if kind == "note":
            lines.append(text)
        elif len(said[text]) == 1:
            lines.append(f"{said[text][0]} {text}" if text.startswith("left out: ") else f"{said[text][0]}: {text}")
        else:
            lines.append(f"{text} — {len(said[text])} cells: {', '.join(said[text])}")
    return lines
