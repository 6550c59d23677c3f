"""Before a start writes anything: read and check everything in the run directory it will
rely on, so that a refused or failing start leaves an existing run byte for byte as it was.

A start (fresh, resumed or extended) rewrites ``config.yaml``, truncates ``metrics.jsonl``
and ``diagnostics.jsonl`` after the resume step and adds TensorBoard files. Each of those
writes assumes what it finds is what normopt wrote; :func:`check_run_dir` makes sure of it
first: each entry that exists has its kind (a folder, a regular file; no symlink loops), every
metrics and diagnostics line is a JSON object with an integer step (a torn last line, left by
a killed writer, is the one damage tolerated), and the checkpoint to resume from has a
trainer state that agrees with its folder (``checkpoint.verify.read_trainer_state``).
"""

from __future__ import annotations

import os
from pathlib import Path

from normopt.errors import UserError
from normopt.metrics.jsonl import step_lines
from normopt.run_dir import RunDir


def _kind(path: Path) -> str | None:
    """ "folder", "file", "missing" or None (something else: a device, a fifo, a broken or
    looping link)."""
    if not os.path.lexists(path):
        return "missing"
    try:
        if path.is_dir():
            return "folder"
        if path.is_file():
            return "file"
    except OSError:
        pass
    return None


def _require_kind(path: Path, wanted: str) -> None:
    kind = _kind(path)
    if kind not in (wanted, "missing"):
        what = {"folder": "a folder", "file": "a file"}.get(kind, "not a regular file or folder")
        raise UserError(f"{path}: must be a {wanted}, but it is {what} (move it away or choose another run.dir)")


def check_run_dir(run: RunDir) -> None:
    """Refuse (UserError, one line) a run directory that a start would damage (module doc;
    the resume point's trainer state is checked once it is known)."""
    _require_kind(run.path, "folder")
    if _kind(run.path) == "missing":
        return
    for path in (run.checkpoints, run.tensorboard, run.export):
        _require_kind(path, "folder")
    for path in (run.config, run.metrics, run.diagnostics, run.train_log, run.lock):
        _require_kind(path, "file")
    step_lines(run.metrics)  # every line readable, or a UserError naming it
    step_lines(run.diagnostics)
