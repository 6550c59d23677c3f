"""Where a command may write: the one check of every output path a user names
(``export --out``, ``report --out``, ``spectrum --out``), before anything is written.

An output file must be a regular file or not exist yet, and every existing folder above it
must be a folder (not a file: "a file inside a file"); an output folder likewise. An export
into a run directory may only replace files of its ``export/`` folder, never the run's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from normopt.errors import UserError, os_reason
from normopt.run_dir import RunDir


def _check_parents(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is not a folder")
            return


def check_output_file(path: Path, what: str, run: RunDir | None = None) -> None:
    """Refuse (UserError naming ``what``) a file path that cannot or must not be written."""
    _check_parents(path, what)
    if os.path.lexists(path) and not path.is_file():
        raise UserError(f"{what} {path}: exists and is not a regular file")
    if run is not None and path.exists():
        inside_run = run.path.resolve() in path.resolve().parents
        inside_export = run.export.resolve() in path.resolve().parents
        if inside_run and not inside_export:
            raise UserError(f"{what} {path}: a file of the run {run.path}, not an export; choose another path")


def check_output_folder(path: Path, what: str) -> None:
    """Refuse a folder path that exists as something else, or lies below a file."""
    _check_parents(path, what)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a folder")


def write_failed(what: str, path: Path, exc: BaseException) -> UserError | None:
    """The one-line UserError of a write the file system refused, or None when ``exc`` is
    not one (a bug keeps its traceback)."""
    reason = os_reason(exc)
    if reason is None:
        return None
    return UserError(f"{what} {path}: cannot write ({reason}); nothing was written")
