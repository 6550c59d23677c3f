"""How long the rest of a grid will take, when its cells differ in cost.

A progress bar over all steps extrapolates the grid from the average rate so far; that is
wrong as soon as cells cost different amounts per step (a Muon step adds Newton-Schulz to
the same model work an AdamW step does, MoE or MLA cells differ again). Here each cell has a
prior cost per training step, in FLOPs, from its config alone (:func:`cell_step_flops`), and
measured rates take over as they come:

* a cell's **overhead** is the time from its start to its first logged step (start-up, data
  load, compilation); its **rate** is seconds per step after that;
* a cell not yet run is predicted from the cells already measured whose prior cost per step
  is the same as its own (same model, same optimizer work: only a seed or the norm differs);
  where none is, from its prior cost times the median measured seconds per FLOP;
* its overhead is predicted as the mean of the measured ones.

Before the first step of the first cell there is nothing to go on, and the clock says so
(None) rather than guess.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

SAME_COST_RTOL = 1e-9


def cell_step_flops(base: Path, overrides: list[str]) -> float:
    """A cell's FLOPs per training step, from its config alone: the model's forward and
    backward over the step's tokens, the optimizer's Newton-Schulz work (Muon family), and the
    evaluation forwards spread over the steps between them. The model is built on the meta
    device (no memory, no initialisation) so that the optimizer's own count is used."""
    from normopt.config import load_config
    from normopt.models.llama import build_model
    from normopt.models.presets import count_flops_per_token, resolve_model_args
    from normopt.optim.builder import build_optimizers

    cfg = load_config(base, overrides)
    t = cfg.train
    args = resolve_model_args(cfg.model, vocab_size=cfg.data.vocab_size)
    per_token = count_flops_per_token(args, t.seq_len)  # forward + backward: 3 forwards
    flops = per_token * t.global_batch_size * t.seq_len
    flops += build_optimizers(build_model(args, "meta"), cfg.optim, "cpu").ns_flops_per_step()
    if t.eval_interval > 0:
        flops += per_token / 3.0 * t.eval_sequences * t.seq_len / t.eval_interval
    return flops


def predicted_seconds_per_step(cost: float, measured: list[tuple[float, float]]) -> float | None:
    """Seconds per step of a cell of prior ``cost`` (FLOPs per step) from ``measured`` (cost,
    seconds per step) pairs: the mean over the cells of the same cost, else ``cost`` times
    the median seconds per FLOP; None with nothing measured."""
    if not measured:
        return None
    same = [rate for flops, rate in measured if math.isclose(flops, cost, rel_tol=SAME_COST_RTOL)]
    if same:
        return statistics.fmean(same)
    per_flop = [rate / flops for flops, rate in measured if flops > 0]
    return cost * statistics.median(per_flop) if per_flop else None


@dataclass
class _Progress:
    started: float
    first_step: tuple[float, int] | None = None  # (time, steps done then) at the first logged progress
    latest: tuple[float, int] | None = None
    finished: bool = False

    def overhead(self) -> float | None:
        return None if self.first_step is None else self.first_step[0] - self.started

    def seconds_per_step(self) -> float | None:
        if self.first_step is None or self.latest is None or self.latest[1] <= self.first_step[1]:
            return None
        return (self.latest[0] - self.first_step[0]) / (self.latest[1] - self.first_step[1])


@dataclass
class GridClock:
    """Seconds left in a grid. ``step_flops[i]`` and ``steps_left[i]`` are cell i's prior cost
    per step and the steps it still has to run (0 for a complete cell)."""

    step_flops: list[float]
    steps_left: list[int]
    progress: dict[int, _Progress] = field(default_factory=dict)

    def start(self, index: int, now: float) -> None:
        self.progress[index] = _Progress(started=now)

    def observe(self, index: int, steps_done: int, now: float) -> None:
        """Cell ``index`` has run ``steps_done`` steps in this invocation by ``now``."""
        p = self.progress[index]
        if p.latest is not None and steps_done < p.latest[1]:
            # a resumed cell's log is cut back to its checkpoint at start: measure from there
            p.first_step = p.latest = None
        if steps_done <= 0:
            return
        if p.first_step is None:
            p.first_step = (now, steps_done)
        p.latest = (now, steps_done)

    def finish(self, index: int, now: float) -> None:
        self.progress[index].finished = True

    def _measured(self) -> list[tuple[float, float]]:
        """(prior FLOPs per step, measured seconds per step) of every cell with a rate."""
        return [
            (self.step_flops[i], rate) for i, p in self.progress.items() if (rate := p.seconds_per_step()) is not None
        ]

    def predicted_seconds_per_step(self, index: int) -> float | None:
        return predicted_seconds_per_step(self.step_flops[index], self._measured())

    def seconds_left(self, now: float) -> float | None:
        """The whole grid's remaining wall time (None until a first rate is measured)."""
        overheads = [o for p in self.progress.values() if (o := p.overhead()) is not None]
        mean_overhead = statistics.fmean(overheads) if overheads else 0.0
        total = 0.0
        for index, steps in enumerate(self.steps_left):
            p = self.progress.get(index)
            if steps <= 0 or (p is not None and p.finished):
                continue
            own = p.seconds_per_step() if p is not None else None
            rate = own if own is not None else self.predicted_seconds_per_step(index)
            if rate is None:
                return None
            done = p.latest[1] if p is not None and p.latest is not None else 0
            if p is None:
                total += mean_overhead
            elif p.first_step is None:  # started, still in its start-up
                total += max(mean_overhead - (now - p.started), 0.0)
            total += max(steps - done, 0) * rate
        return total


def format_duration(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``42s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
