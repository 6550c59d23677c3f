"""What the optimizer costs: NS FLOPs, time and rate in metrics.jsonl, the end-of-run cost line,
and the factorial report's cost table."""

from __future__ import annotations

import json

import pytest

from normopt.metrics.cost_summary import describe_cost, ns_window_fields, summarize_cost
from normopt.report.cells.cost import read_cost
from normopt.report.render.cost import cost_section
from tests.conftest import run_cli, tiny_run_args


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gram_run(tmp_path_factory, tiny_corpus):
    """A 6-step Muon run with Gram NS (float32 on CPU) logging every step."""
    run_dir = tmp_path_factory.mktemp("gram") / "run"
    proc = run_cli(
        tiny_run_args(
            run_dir,
            tiny_corpus,
            "optim.name=muon",
            "optim.ns_algorithm=gram",
            "diagnostics.interval=0",
            "train.peak_tflops=1000",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_windows_log_ns_time_and_a_rate_that_counts_every_ns_flop(gram_run):
    """One process computes every matrix: NS rate x NS time per step = NS FLOPs per step, the
    same in every window (the count is exact, not sampled); NS is part of the optimizer step."""
    run_dir, stdout = gram_run
    windows = [r for r in _records(run_dir) if "tokens_per_s" in r]
    assert len(windows) == 6
    flops = {round(r["ns_tflops"] * 1e12 * r["ns_s"]) for r in windows}
    assert flops == {round(windows[0]["ns_tflop_per_step"] * 1e12)} and flops.pop() > 0
    for r in windows:
        assert 0 < r["ns_share"] < r["optimizer_share"] < 1
        assert 0 < r["mfu"] < r["mfu_with_ns"] < 1
    assert "Newton-Schulz (gram):" in stdout
    assert "cost (median of 5 logging window(s)" in stdout and "TFLOP per step" in stdout


def test_report_cost_table_reads_the_windows(gram_run):
    run_dir, _ = gram_run
    cost = read_cost(run_dir / "metrics.jsonl")
    windows = [r for r in _records(run_dir) if "tokens_per_s" in r][1:]
    assert cost["windows"] == 5
    assert cost["tokens_per_s"] == sorted(r["tokens_per_s"] for r in windows)[2]
    lines = cost_section({"cells": [{"name": "cell-a", "cost": cost}, {"name": "cell-b", "cost": None}]})
    table = "\n".join(lines)
    assert lines[0] == "## Cost" and "| cell-a |" in table and "cell-b" not in table
    assert cost_section({"cells": [{"name": "x", "cost": None}]}) == []


def test_cost_summary_leaves_out_the_warm_up_window_and_missing_keys():
    windows = [
        {"tokens_per_s": 1.0, "mfu": None},
        {"tokens_per_s": 10.0, "mfu": 0.2},
        {"tokens_per_s": 30.0, "mfu": 0.4},
        {"tokens_per_s": 20.0},
    ]
    cost = summarize_cost(windows)
    assert cost["windows"] == 3 and cost["tokens_per_s"] == 20.0 and cost["mfu"] == pytest.approx(0.3)
    assert cost["ns_s"] is None and summarize_cost([]) is None
    assert summarize_cost(windows[:1])["tokens_per_s"] == 1.0  # one window: nothing to leave out
    assert "model MFU 30.0%" in describe_cost(cost, 0.0) and "Newton-Schulz" not in describe_cost(cost, 0.0)
    assert ns_window_fields(1e12, 0.0, 0.0, 2, 1.0) == {
        "ns_tflop_per_step": 1.0,
        "ns_s": 0.0,
        "ns_share": 0.0,
        "ns_tflops": None,
    }
    assert ns_window_fields(1e12, 0.5, 2e12, 2, 1.0)["ns_tflops"] == 4.0
