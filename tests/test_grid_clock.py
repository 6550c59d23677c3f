"""The grid's time left: cells weighted by their cost per step, measured rates taking over."""

from __future__ import annotations

import pytest

from normopt.config import REPO_ROOT, load_config
from normopt.factorial.grid_clock import GridClock, cell_step_flops, format_duration
from normopt.models.llama import build_model
from normopt.models.presets import resolve_model_args
from normopt.optim.builder import build_optimizers

ADAMW, MUON = 100.0, 125.0  # prior FLOPs per step: Muon adds a quarter


def _run(clock: GridClock, index: int, steps: int, overhead: float, rate: float, t0: float) -> float:
    """Cell ``index`` starts at t0, logs its first step after ``overhead`` seconds and then
    one step every ``rate`` seconds; returns the time it ends."""
    clock.start(index, t0)
    t = t0 + overhead
    for step in range(1, steps + 1):
        clock.observe(index, step, t)
        t += rate
    clock.finish(index, t - rate)
    return t - rate


def test_nothing_is_guessed_before_a_first_rate():
    clock = GridClock([ADAMW, MUON], [10, 10])
    assert clock.seconds_left(0.0) is None
    clock.start(0, 0.0)
    clock.observe(0, 1, 5.0)  # one step logged: no rate yet
    assert clock.seconds_left(5.0) is None
    clock.observe(0, 3, 7.0)
    assert clock.seconds_left(7.0) == pytest.approx(7 * 1.0 + 5.0 + 10 * 1.0 * MUON / ADAMW)


def test_cells_of_another_cost_are_predicted_from_flops_then_from_their_own_class():
    # AdamW steps take 1 s, Muon steps 2 s (NS is slower per FLOP than the model here), 5 s start-up each
    clock = GridClock([ADAMW, MUON, ADAMW, MUON], [10, 10, 10, 10])
    end = _run(clock, 0, 10, overhead=5.0, rate=1.0, t0=0.0)
    # only AdamW measured: Muon cells from their FLOPs (1.25 s per step), each with the 5 s start-up
    assert clock.seconds_left(end) == pytest.approx(3 * 5.0 + 2 * 10 * 1.25 + 10 * 1.0)
    end = _run(clock, 1, 10, overhead=5.0, rate=2.0, t0=end)
    # the Muon cell measured: the last Muon cell now at its class's 2 s per step, not a pooled rate
    assert clock.seconds_left(end) == pytest.approx(2 * 5.0 + 10 * 1.0 + 10 * 2.0)
    # a uniform extrapolation (seconds so far / steps so far) would say 1.5 s for every step
    clock.start(2, end)
    clock.observe(2, 1, end + 5.0)
    clock.observe(2, 5, end + 9.0)  # the running cell at its own rate, 5 steps to go
    assert clock.seconds_left(end + 9.0) == pytest.approx(5 * 1.0 + 5.0 + 10 * 2.0)


def test_complete_cells_cost_nothing_and_a_resumed_log_restarts_the_measurement():
    clock = GridClock([ADAMW, ADAMW], [0, 10])  # cell 0 was complete and skipped
    clock.start(1, 0.0)
    clock.observe(1, 6, 1.0)  # the old log, before the resume cut it back
    clock.observe(1, 1, 20.0)
    clock.observe(1, 3, 22.0)
    assert clock.seconds_left(22.0) == pytest.approx(7 * 1.0)


def test_cell_step_flops_counts_the_optimizer_and_not_the_norm():
    base = REPO_ROOT / "configs" / "demo.yaml"
    small = ["data.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2"]
    adamw = cell_step_flops(base, [*small, "optim.name=adamw"])
    muon = cell_step_flops(base, [*small, "optim.name=muon"])
    assert cell_step_flops(base, [*small, "optim.name=muon", "model.norm=dyt"]) == muon
    cfg = load_config(base, [*small, "optim.name=muon"])
    model = build_model(resolve_model_args(cfg.model, vocab_size=cfg.data.vocab_size), "meta")
    ns = build_optimizers(model, cfg.optim, "cpu").ns_flops_per_step()
    assert ns > 0 and muon - adamw == pytest.approx(ns)


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (42.4, 725, 3725)] == ["42s", "12m05s", "1h02m"]
