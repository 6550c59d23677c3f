"""What every diagnostic is (:class:`Diagnostic`): the interface the collector
(diagnostics/collector.py) and the report use instead of naming diagnostics, and what a
diagnostic may look at while the run trains (:class:`DiagnosticRun`).

A diagnostic is one class in its own module plus one line in the registry
(:mod:`normopt.diagnostics.registry`), or ``DIAGNOSTICS.register`` in a plugin. The class
says in one place: its record kind (``name``), its config keys, when it runs, how it
collects a record, how the report reads a record back, and (optionally) the rows it adds to
the report. Diagnostics observe the run and never change it: a run's losses are the same
with every diagnostic on or off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# when a diagnostic runs, on a diagnosed step (every diagnostics.interval steps and the last):
STEP = "step"  # after the step (weights after the update; the gradients are gone)
OPTIMIZER_STEP = "optimizer_step"  # right after optimizer.step(), gradients and optimizer state at hand
EVALUATION = "evaluation"  # after every evaluation, with the evaluation's per-bucket loss sums
WHEN = (STEP, OPTIMIZER_STEP, EVALUATION)


@dataclass
class DiagnosticRun:
    """What a diagnostic may use: the ``diagnostics`` config section (``cfg``; a plugin's own
    keys are ``cfg.<name>_<field>``, or ``component_options(cfg, name)``), the model (FSDP2
    shards its parameters: see :func:`full_matrix`), the run's optimizers (``Optimizers``:
    ``.optimizers``, ``.specs``, ``.reporting(kind)``), the probe batch of validation
    tokens (the same on every rank), this rank and the world size, and ``histogram(tag,
    values, step)`` into TensorBoard."""

    cfg: Any
    model: nn.Module
    optimizers: Any
    probe_inputs: torch.Tensor | None
    rank: int
    world_size: int
    histogram: Any = None
    tail: Any = None  # TailTokenBuckets, when diagnostics.tail_buckets > 0


class Diagnostic:
    """Base of every diagnostic. Every rank builds one per run and calls it in the same
    order (a diagnostic may use collectives); rank 0 writes what :meth:`collect` returns as
    one diagnostics.jsonl record ``{"step", "kind": name, ..., "seconds"}``."""

    name: ClassVar[str]  # the record kind in diagnostics.jsonl; the registry name
    when: ClassVar[str] = STEP  # one of WHEN
    help: ClassVar[str] = ""  # one line: what it measures
    # the diagnostics-section keys it reads: its own config dataclass's fields join the
    # section as diagnostics.<name>_<field> (normopt/registry.py); built-ins list theirs in ``keys``
    config: ClassVar[type | None] = None
    keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, run: DiagnosticRun):
        self.run = run

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether it runs at all under the ``diagnostics`` section ``cfg``."""
        return True

    @classmethod
    def interval(cls, cfg) -> int:
        """Every how many steps it runs (and on the run's last step); 0 = never. Default:
        ``diagnostics.interval``. Evaluation diagnostics run after every evaluation."""
        return cfg.interval

    def before_optimizer_step(self) -> float:
        """On a diagnosed step, just before ``optimizer.step()``; returns the seconds spent
        (counted into the record's ``seconds``)."""
        return 0.0

    def collect(self, step: int, **inputs) -> dict | None:
        """The record's fields (without step and kind), or None for nothing to write.
        Evaluation diagnostics get ``sums``: the evaluation's loss sums per frequency bucket."""
        raise NotImplementedError

    @classmethod
    def mirror(cls, record: Mapping[str, Any], tensorboard, histograms: bool) -> None:
        """Numbers of ``record`` worth a TensorBoard scalar beyond what every record's
        ``layers``/``matrices``/``groups`` give."""

    # -- the report -------------------------------------------------------------------

    @staticmethod
    def read(record: Mapping[str, Any]) -> Any:
        """What the report keeps of one record (None: the report ignores the kind). A
        malformed record raises ValueError; the report names the file and line."""
        return None

    @classmethod
    def report_rows(cls, cells: Sequence[tuple[str, Any]]) -> tuple[str, list[str], list[list[str]]] | None:
        """Rows for the report: given (cell name, :meth:`read` of its last record) of every
        cell that has one, a (title, header, rows) table; None to add nothing."""
        return None


# ---------------------------------------------------------------- helpers for diagnostics


def full_matrix(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (sharded) DTensor: a collective, every rank calls it in turn."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def block_index(name: str) -> int | None:
    """``layers.3.attn.wq.weight`` -> 3; None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def block_matrices(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every block matrix (2-D, and 3-D expert stacks), leaving out
    what a module declares another role for (an MoE router's gate: the model protocol)."""
    from normopt.optim.param_groups import declared_roles

    declared = declared_roles(model)
    return [
        (n, p)
        for n, p in model.named_parameters()
        if p.ndim in (2, 3) and block_index(n) is not None and id(p) not in declared
    ]
