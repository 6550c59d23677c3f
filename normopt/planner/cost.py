"""What a spec costs at a number of seeds per cell: runs, optimizer steps, training tokens and
GPU-hours.

* runs = cells per seed x seeds (+ the tuning runs of a spec with ``tune``: every cell without
  its seed x values x tuning seeds, whatever the evaluation seeds);
* steps = the sum of each run's ``train.steps`` (a tuning run's own ``tune.steps``), and
  tokens = steps x ``train.global_batch_size`` x ``train.seq_len``, from each run's config
  (:func:`normopt.factorial.plan.plan_step_costs`);
* GPU-hours = the sum over runs of steps x GPU-seconds per step / 3600, the GPU-seconds per
  step from, first found:

  - ``--tokens-per-s T`` (a run's training tokens per second on all its GPUs, as metrics.jsonl
    logs ``tokens_per_s``): tokens per step / T x GPUs per run;
  - ``--mfu M --peak-tflops P`` (model FLOPs utilisation as metrics.jsonl logs ``mfu``, per
    GPU peak): the model's forward and backward FLOPs per step
    (:func:`normopt.models.presets.count_flops_per_token` x tokens per step) / (M x P);
  - the measured cells of ``--from`` (each cell's median ``tokens_per_s``, the report's cost
    table): GPU-seconds per step = tokens per step / tokens_per_s x GPUs per run, carried to a
    planned run by the grid clock's rule (:func:`normopt.factorial.grid_clock.predicted_seconds_per_step`:
    the mean over measured cells of the same FLOPs per step, else its FLOPs per step x the
    median measured seconds per FLOP);
  - none: GPU-hours are not given.

GPUs per run: ``--gpus-per-run``, else the spec's ``slurm`` section (gpus_per_node x nodes),
else 1; a measured rate is taken to have been measured on that many GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normopt.errors import UserError
from normopt.factorial.cells import CellSpec
from normopt.factorial.grid_clock import cell_step_flops, predicted_seconds_per_step
from normopt.factorial.plan import plan_step_costs
from normopt.factorial.slurm import spec_gpus_per_node, spec_nodes
from normopt.report.cells.cell_reading import Cell


@dataclass(frozen=True)
class RunCost:
    name: str
    steps: int
    tokens_per_step: int
    step_flops: float  # model + Newton-Schulz + evaluation FLOPs per step (the grid clock's prior)
    model_flops_per_step: float  # the model's forward and backward only (what MFU counts)


def _settings_key(overrides: Sequence[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if not o.startswith(("train.seed=", "run.dir=")))


def run_costs(base: Path, runs: Sequence[CellSpec]) -> list[RunCost]:
    """Each run's steps, tokens per step and FLOPs per step, computed once per distinct setting."""
    from normopt.config import load_config
    from normopt.models.presets import count_flops_per_token, resolve_model_args

    steps, flops = plan_step_costs(base, list(runs))
    cache: dict[tuple[str, ...], tuple[int, float]] = {}
    out = []
    for run in runs:
        key = _settings_key(run.overrides)
        if key not in cache:
            cfg = load_config(base, run.overrides)
            tokens = cfg.train.global_batch_size * cfg.train.seq_len
            args = resolve_model_args(cfg.model, vocab_size=cfg.data.vocab_size)
            cache[key] = (tokens, count_flops_per_token(args, cfg.train.seq_len) * tokens)
        tokens, model_flops = cache[key]
        out.append(RunCost(run.name, steps[run.name], tokens, flops[run.name], model_flops))
    return out


@dataclass(frozen=True)
class Rate:
    """Where GPU-seconds per step come from (module docstring)."""

    source: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_tflops: float | None = None
    measured: tuple[tuple[float, float], ...] = ()  # (FLOPs per step, GPU-seconds per step) per measured cell
    gpus_per_run: int = 1

    def gpu_seconds_per_step(self, run: RunCost) -> float | None:
        if self.tokens_per_s is not None:
            return run.tokens_per_step / self.tokens_per_s * self.gpus_per_run
        if self.mfu is not None and self.peak_tflops is not None:
            return run.model_flops_per_step / (self.mfu * self.peak_tflops * 1e12)
        return predicted_seconds_per_step(run.step_flops, list(self.measured))

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "peak_tflops": self.peak_tflops,
            "measured_cells": len(self.measured),
            "gpus_per_run": self.gpus_per_run,
        }


def measured_rate(cells: Sequence[Cell], root: Path, gpus_per_run: int) -> Rate | None:
    """The measured GPU-seconds per step of ``cells`` (those with a config and a cost summary);
    None when no cell measured one."""
    measured, cache = [], {}
    for cell in cells:
        config = cell.path / "config.yaml"
        batch, seq_len = cell.config.get("train.global_batch_size"), cell.config.get("train.seq_len")
        if not cell.cost or not cell.cost.get("tokens_per_s") or not config.is_file() or not batch or not seq_len:
            continue
        key = tuple(sorted((k, repr(v)) for k, v in cell.config.items() if k not in ("train.seed", "run.dir")))
        if key not in cache:
            try:
                cache[key] = cell_step_flops(config, [])
            except UserError as exc:
                raise UserError(f"{config}: cannot count its FLOPs per step ({exc})") from None
        tokens = int(batch) * int(seq_len)
        measured.append((cache[key], tokens / cell.cost["tokens_per_s"] * gpus_per_run))
    if not measured:
        return None
    return Rate(
        f"measured: the median tokens/s of {len(measured)} cell{'s' if len(measured) != 1 else ''} of "
        f"{root}, taken as run on {gpus_per_run} GPU{'s' if gpus_per_run != 1 else ''} each; a planned run "
        "gets the mean of the measured cells with its FLOPs per step, else its FLOPs times the median "
        "measured seconds per FLOP",
        measured=tuple(measured),
        gpus_per_run=gpus_per_run,
    )


@dataclass(frozen=True)
class Cost:
    seeds: int
    runs: int
    tuning_runs: int
    steps: int
    tokens: int
    gpu_hours: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "runs": self.runs,
            "tuning_runs": self.tuning_runs,
            "steps": self.steps,
            "tokens": self.tokens,
            "gpu_hours": self.gpu_hours,
        }


def _gpu_hours(runs: Sequence[RunCost], rate: Rate | None) -> float | None:
    if rate is None:
        return None
    total = 0.0
    for run in runs:
        per_step = rate.gpu_seconds_per_step(run)
        if per_step is None:
            return None
        total += run.steps * per_step
    return total / 3600.0


def grid_cost(per_seed: Sequence[RunCost], tuning: Sequence[RunCost], seeds: int, rate: Rate | None) -> Cost:
    """The cost of the spec at ``seeds`` seeds per cell: ``per_seed`` = one seed's evaluation
    runs (every seed's cost the same), ``tuning`` = the tuning runs (run once)."""
    runs = len(per_seed) * seeds + len(tuning)
    steps = sum(r.steps for r in per_seed) * seeds + sum(r.steps for r in tuning)
    tokens = sum(r.steps * r.tokens_per_step for r in per_seed) * seeds + sum(
        r.steps * r.tokens_per_step for r in tuning
    )
    hours = None
    one_seed, tuned = _gpu_hours(per_seed, rate), _gpu_hours(tuning, rate)
    if one_seed is not None and tuned is not None:
        hours = one_seed * seeds + tuned
    return Cost(seeds, runs, len(tuning), steps, tokens, hours)


def gpus_per_run(spec: Mapping[str, Any], given: int | None) -> int:
    """``--gpus-per-run``, else the spec's slurm gpus_per_node x nodes, else 1."""
    if given is not None:
        return given
    if isinstance(spec.get("slurm"), Mapping):
        return spec_gpus_per_node(dict(spec)) * spec_nodes(dict(spec))
    return 1
