"""Peak FLOP/s for MFU: an explicit peak, the best-of-several CPU probe, no MFU above 100%."""

from __future__ import annotations

import time

import pytest
import torch

from normopt.config import keys_with_role, load_config
from normopt.errors import UserError
from normopt.key_roles import EXECUTION
from normopt.metrics import flops
from normopt.metrics.flops import MfuMeter, measure_matmul_flops, peak_flops

CPU = torch.device("cpu")


def test_explicit_peak_wins_and_says_so():
    assert peak_flops(CPU, torch.float32, probe=True, peak_tflops=2.5) == (2.5e12, "train.peak_tflops")
    assert peak_flops(CPU, torch.float32, probe=False) == (None, "not measured")


def test_peak_tflops_is_an_execution_key():
    assert "train.peak_tflops" in keys_with_role(EXECUTION)
    assert load_config(overrides=["train.peak_tflops=1.5"]).train.peak_tflops == 1.5
    with pytest.raises(UserError, match="train.peak_tflops"):
        load_config(overrides=["train.peak_tflops=-1"])


def test_probe_keeps_the_fastest_timing(monkeypatch):
    """A timing slowed by other load does not lower the peak: the best of the repeats counts."""
    clock = iter(
        [
            0.0,
            10.0,  # repeat 1: one product in 10 s (the loaded one)
            10.0,
            11.0,  # repeat 2: one product in 1 s
            11.0,
            15.0,
        ]
    )
    monkeypatch.setattr(flops.time, "perf_counter", lambda: next(clock))
    assert measure_matmul_flops(torch.float32, CPU, size=8, seconds=0.5, repeats=3) == pytest.approx(2 * 8**3)


def test_probe_is_short_and_source_names_it():
    started = time.perf_counter()
    peak, source = peak_flops(CPU, torch.float32)
    assert time.perf_counter() - started < 1.5 and peak > 0
    assert f"best of {flops.PROBE_REPEATS}" in source


def test_mfu_above_one_is_null_and_said_once():
    said = []
    meter = MfuMeter(peak=1e9, source="probe", flops_per_token=1e6, world_size=2, log=said.append)
    assert meter(1000.0) == pytest.approx(0.5)  # 1e9 FLOP/s of 2e9
    assert meter(3000.0) is None and meter(5000.0) is None  # 150%, 250%: not logged
    assert len(said) == 1 and "underestimated" in said[0] and "150%" in said[0] and "train.peak_tflops" in said[0]
    assert meter(2000.0) == pytest.approx(1.0)  # exactly the peak is still possible
    assert MfuMeter(None, "not measured", 1e6).__call__(1000.0) is None
