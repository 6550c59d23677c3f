"""What an experiment's runs were, for the head of the report: model size, length, tokens,
data, seeds and the code that wrote the report.

A reader judges a loss difference by the setup that produced it (a 0.05 nats gap means one
thing for a 2M-parameter model trained on 1M tokens and another for 1B parameters on 20B), so
the report opens with it. Values that differ between cells are listed, not averaged.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.report.cells.cell_reading import Cell

BUILT_IN_CORPUS = "built-in corpus"


def parameter_count(cell: Cell) -> tuple[int | None, str]:
    """(parameters, where the number comes from): the "run" record of diagnostics.jsonl (the
    trainer's count for the actual vocabulary), else computed from config.yaml with
    ``data.vocab_size`` as the vocabulary (approximate: a given tokenizer's size may differ),
    else (None, "unknown")."""
    run = cell.diagnostics.run if cell.diagnostics is not None else None
    if run is not None and isinstance(run.get("n_params"), int):
        return run["n_params"], "run record"
    if not cell.config:
        return None, "unknown"
    from normopt.config import config_from_dict, nested_config
    from normopt.models.presets import count_parameters, resolve_model_args

    try:
        cfg = config_from_dict(nested_config(cell.config))
        return count_parameters(resolve_model_args(cfg.model, vocab_size=cfg.data.vocab_size)), "config.yaml"
    except (UserError, ValueError, TypeError, KeyError, AttributeError):
        return None, "unknown"


def code_version() -> dict[str, str | None]:
    """The normopt package version and, when the source is a git checkout, its commit (with
    "-dirty" when tracked files differ from it)."""
    try:
        version = importlib.metadata.version("normopt")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            or None
        )
        if (
            commit
            and subprocess.run(
                ["git", "diff", "--quiet", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, timeout=5
            ).returncode
            == 1
        ):
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": version, "commit": commit}


def _distinct(values: Iterable[Any]) -> list[Any]:
    found = [v for v in dict.fromkeys(values) if v is not None]
    try:
        return sorted(found)
    except TypeError:
        return found


def _tokens(cell: Cell) -> int | None:
    c = cell.config
    parts = [c.get("train.steps"), c.get("train.global_batch_size"), c.get("train.seq_len")]
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        return None
    return parts[0] * parts[1] * parts[2]


def experiment_setup(cells: Sequence[Cell]) -> dict[str, Any]:
    """The setup block of summary.json: per quantity the distinct values over the cells
    (sorted; a single value means all cells agree). tokens = train.steps x
    train.global_batch_size x train.seq_len (tokens the run was meant to see)."""
    counts = [parameter_count(c) for c in cells]
    return {
        "parameters": _distinct(n for n, _ in counts),
        "parameters_from": _distinct(source for n, source in counts if n is not None),
        "presets": _distinct(c.config.get("model.preset") for c in cells),
        "steps": _distinct(c.steps for c in cells),
        "global_batch_size": _distinct(c.config.get("train.global_batch_size") for c in cells),
        "seq_len": _distinct(c.config.get("train.seq_len") for c in cells),
        "tokens": _distinct(_tokens(c) for c in cells),
        "data": _distinct((c.config.get("data.path") or BUILT_IN_CORPUS) for c in cells if c.config),
        "seeds": _distinct(c.seed for c in cells),
        "normopt": code_version(),
    }
