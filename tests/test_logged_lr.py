"""The logged learning rates: ``lr`` for the AdamW (or single-optimizer) groups and
``lr_matrix`` for the matrices of a Muon-family optimizer, each its own peak times the
schedule factor of the step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from normopt.config import load_config
from normopt.models.llama import build_model
from normopt.models.norm_layer import NormConfig
from normopt.models.presets import PRESETS
from normopt.optim.builder import build_optimizers
from normopt.optim.lr_schedule import lr_factor
from tests.conftest import run_cli, tiny_run_args


def _model():
    args = replace(
        PRESETS["debug"],
        vocab_size=300,
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        ffn_hidden=48,
        norm_config=NormConfig("rmsnorm"),
    )
    return build_model(args)


@pytest.mark.parametrize("optim", ["muon", "normuon"])
def test_muon_family_reports_the_matrix_rate_beside_the_adamw_rate(optim):
    cfg = load_config(
        None, [f"optim.name={optim}", "optim.lr=0.01", "optim.muon_lr=0.05", "optim.warmup_steps=4", "train.steps=20"]
    )
    opts = build_optimizers(_model(), cfg.optim)
    for step in (0, 2, 10, 19):  # warmup, warmup, cosine decay, the last step
        factor = opts.apply_schedule(cfg.optim, step, cfg.train.steps)
        assert factor < 1.0
        assert opts.current_lrs() == {"lr": 0.01 * factor, "lr_matrix": 0.05 * factor}


@pytest.mark.parametrize(
    "overrides", [["optim.name=adamw"], ["optim.name=lion"], ["optim.name=muon", "optim.muon_params=none"]]
)
def test_without_matrices_on_a_muon_family_optimizer_only_lr(overrides):
    cfg = load_config(None, [*overrides, "optim.lr=0.01", "optim.muon_lr=0.05", "optim.warmup_steps=4"])
    opts = build_optimizers(_model(), cfg.optim)
    factor = opts.apply_schedule(cfg.optim, 1, cfg.train.steps)
    assert opts.current_lrs() == {"lr": 0.01 * factor}


def test_muon_run_logs_both_rates_through_warmup_and_decay(tmp_path, tiny_corpus):
    run_dir = tmp_path / "run"
    args = tiny_run_args(
        run_dir,
        tiny_corpus,
        "optim.name=muon",
        "optim.lr=0.01",
        "optim.muon_lr=0.04",
        "train.eval_interval=0",
        "diagnostics.interval=0",
        "train.steps=5",
    )
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(None, args)
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    factors = [lr_factor(cfg.optim, r["step"] - 1, cfg.train.steps) for r in train]
    assert factors[0] == 0.5 and factors[-1] == cfg.optim.min_lr_ratio  # warmup 2, cosine to the end
    assert [r["lr"] for r in train] == [0.01 * f for f in factors]
    assert [r["lr_matrix"] for r in train] == [0.04 * f for f in factors]
