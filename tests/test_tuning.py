"""Tuned grids (a spec's ``tune`` block) and the interaction over training, on synthetic cells
with known answers: the choice per cell, the interaction at each common value and at the tuned
values, the stability rule, the schema's errors, the dry run's plan and cost, skipping on rerun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from normopt.config import Config
from normopt.errors import UserError
from normopt.factorial.spec import load_spec
from normopt.report.over_training import interaction_stability
from normopt.report.tuning import TUNING_DIR, TUNING_FILE, ValueOutcome, choose_value
from normopt.report.writer import write_report
from tests.conftest import REPO_ROOT
from tests.test_factorial import _spec

STEPS = 100


def fake_run(folder: Path, norm: str, optim: str, seed: int, evals: dict[int, float | str], *, lr: float = 1e-3,
             steps: int = STEPS, arm: str | None = None, complete: bool = True) -> Path:
    """A finished run directory as a factorial leaves it: config.yaml, cell.json, metrics.jsonl
    (an eval at step 0 and at each step of ``evals``, a train line beside each), and a final
    checkpoint marker."""
    cfg = Config().to_dict()
    cfg["run"]["dir"] = str(folder)
    cfg["model"]["norm"], cfg["optim"]["name"], cfg["optim"]["lr"] = norm, optim, lr
    cfg["train"]["seed"], cfg["train"]["steps"] = seed, steps
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "cell.json").write_text(json.dumps({"name": folder.name, "coords": {"norm": norm, "optim": optim},
                                                  "seed": seed, "arm": arm, "exit_code": 0}))
    lines = [{"step": 0, "eval_loss": 9.0}]
    for step, value in sorted(evals.items()):
        lines += [{"step": step, "loss": value if isinstance(value, str) else value + 0.05},
                  {"step": step, "eval_loss": value}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if complete:
        marker = folder / "checkpoints" / f"step_{steps:08d}"
        marker.mkdir(parents=True, exist_ok=True)
        (marker / "trainer_state.json").write_text("{}")
    return folder


# --------------------------------------------------------------------------- the choice


def test_choice_lowest_mean_ties_to_first_diverged_excluded_edges_flagged():
    outcomes = [ValueOutcome(1e-3, (3.2, 3.4)), ValueOutcome(3e-3, (3.0, 3.2)),
                ValueOutcome(1e-2, (3.1, 3.1)), ValueOutcome(3e-2, (2.0,), ("x-s1: diverged: loss was nan",))]
    choice = choose_value(outcomes, 2)
    assert choice.chosen == 3e-3 and choice.tied == (1e-2,) and choice.runner_up == 1e-2
    assert choice.margin == pytest.approx(0.0) and not choice.at_edge
    assert choice.excluded == {"0.03": "x-s1: diverged: loss was nan"}  # its one good run does not count
    edge = choose_value([ValueOutcome(1e-3, (3.0,)), ValueOutcome(3e-3, (3.5,))], 1)
    assert edge.chosen == 1e-3 and edge.at_edge and edge.margin == pytest.approx(0.5)
    waiting = choose_value([ValueOutcome(1e-3, (3.0,)), ValueOutcome(3e-3, (), ("incomplete: not run",))], 1)
    assert waiting.chosen is None and "not finished for 0.003" in waiting.reason
    none = choose_value([ValueOutcome(1e-3, (), ("diverged",)), ValueOutcome(3e-3, (), ("diverged",))], 1)
    assert none.chosen is None and "every value" in none.reason


# --------------------------------------------------------------------------- a tuned grid with known optima

VALUES = [1e-3, 3e-3, 1e-2, 3e-2]
# the loss at each cell's best value is additive in norm and optimizer (interaction 0 there),
# but the cells' best values differ, so at any common value the interaction is not 0
BASE = {("rmsnorm", "adamw"): 3.0, ("derf", "adamw"): 3.3, ("rmsnorm", "muon"): 2.9, ("derf", "muon"): 3.2}
BEST = {("rmsnorm", "adamw"): 1, ("derf", "adamw"): 1, ("rmsnorm", "muon"): 2, ("derf", "muon"): 0}
CURVATURE = 0.2


def tuning_loss(cell: tuple[str, str], index: int) -> float:
    return BASE[cell] + CURVATURE * (index - BEST[cell]) ** 2


def build_tuned_grid(root: Path) -> Path:
    """Tuning runs on seeds 100, 101 (±0.01: the mean is exact) at every value, Derf + Muon
    diverging at 3e-2; evaluation cells on seeds 0, 1 (±0.02) at each cell's best value."""
    tuning = root / TUNING_DIR
    tuning.mkdir(parents=True)
    (tuning / TUNING_FILE).write_text(json.dumps({"key": "optim.lr", "values": VALUES, "by": "final_eval_loss",
                                                  "seeds": [100, 101], "steps": None}))
    for (norm, optim) in BASE:
        for i, lr in enumerate(VALUES):
            for seed, noise in ((100, 0.01), (101, -0.01)):
                final: float | str = tuning_loss((norm, optim), i) + noise
                if (norm, optim, i) == ("derf", "muon", 3):
                    final = "nan"
                fake_run(tuning / f"{norm}-{optim}-lr{lr}-s{seed}", norm, optim, seed, {50: 5.0, STEPS: final}, lr=lr)
        for seed, noise in ((0, 0.02), (1, -0.02)):
            fake_run(root / f"{norm}-{optim}-s{seed}", norm, optim, seed,
                     {50: 5.0, STEPS: BASE[norm, optim] + noise}, lr=VALUES[BEST[norm, optim]])
    return root


def test_tuner_picks_each_cells_best_value_and_the_interaction_vanishes_after_tuning(tmp_path):
    summary = write_report(build_tuned_grid(tmp_path))
    tuning = summary["tuning"]
    chosen = {(c["variant"], c["optim"]): c for c in tuning["choices"]}
    for cell, best in BEST.items():
        assert chosen[cell]["chosen"] == VALUES[best]
        assert chosen[cell]["metric"] == pytest.approx(BASE[cell])
        assert chosen[cell]["evaluation_ran_at"] == [str(VALUES[best])]
        assert chosen[cell]["tuning_minus_evaluation"] == pytest.approx(0.0, abs=1e-12)
    assert chosen["derf", "muon"]["at_edge"] and not chosen["rmsnorm", "muon"]["at_edge"]
    assert list(chosen["derf", "muon"]["excluded"]) == ["0.03"]
    assert "diverged" in chosen["derf", "muon"]["excluded"]["0.03"]
    # the interaction at each common value: f(derf,muon) - f(rms,muon) - f(derf,adamw) + f(rms,adamw)
    for i, at_value in enumerate(tuning["per_value"]):
        found = [x for x in at_value["interactions"] if x["variant"] == "derf" and x["optim"] == "muon"]
        if i == 3:  # Derf + Muon diverged there: no interaction at 3e-2
            assert found == []
            continue
        expected = (tuning_loss(("derf", "muon"), i) - tuning_loss(("rmsnorm", "muon"), i)
                    - tuning_loss(("derf", "adamw"), i) + tuning_loss(("rmsnorm", "adamw"), i))
        assert found[0]["value"] == pytest.approx(expected) and found[0]["ci95"] is not None
    assert [x["value"] for v in tuning["per_value"][:3] for x in v["interactions"]] == \
        pytest.approx([-0.8, 0.0, 0.8])
    # at the tuned values the interaction vanishes (evaluation seeds, not the tuning runs)
    tuned = summary["interactions"][0]
    assert tuned["value"] == pytest.approx(0.0, abs=1e-12) and tuned["ci95"][0] < 0 < tuned["ci95"][1]
    assert "no selection bias" in tuning["selection_bias"]
    report = (tmp_path / "report.md").read_text()
    assert "## Tuning" in report and "at the edge of the range" in report and "![tuning](tuning.png)" in report
    assert "Every table below is at each cell's tuned `optim.lr`" in report
    assert ("derf × muon − adamw: at the tuned values +0.0000 [-0.1111, +0.1111]; at the common values "
            "from -0.8000 to +0.8000") in report
    assert (tmp_path / "tuning.png").is_file()


def test_overlapping_seeds_are_called_optimistic_with_a_bound(tmp_path):
    root = build_tuned_grid(tmp_path)
    # a hand-assembled folder: tuning seed 100 is also an evaluation seed
    fake_run(root / "rmsnorm-adamw-s100", "rmsnorm", "adamw", 100, {STEPS: 3.0}, lr=3e-3)
    statement = write_report(root)["tuning"]["selection_bias"]
    # sigma = the largest standard error of a tuning mean (0.01, from ±0.01), k = 4 values
    assert "optimistic" in statement and f"{0.01 * math.sqrt(2 * math.log(4)):.4f}" in statement


# --------------------------------------------------------------------------- over training

EVAL_STEPS = list(range(10, STEPS + 1, 10))


def transient(step: int) -> float:
    """Derf + Muon's extra loss: +0.4 early, crossing 0 between steps 20 and 30, -0.1 late."""
    return 0.5 * math.exp(-step / 15) - 0.1


def test_interaction_over_training_follows_a_known_trajectory(tmp_path):
    for norm, optim in BASE:
        for seed, noise in ((0, 0.01), (1, -0.01)):
            evals = {t: BASE[norm, optim] + 2.0 * math.exp(-t / 20) + noise
                     + (transient(t) if (norm, optim) == ("derf", "muon") else 0.0) for t in EVAL_STEPS}
            fake_run(tmp_path / f"{norm}-{optim}-s{seed}", norm, optim, seed, evals)
    summary = write_report(tmp_path)
    curves = summary["over_training"]
    (curve,) = curves["interactions"]
    assert [p["step"] for p in curve["points"]] == EVAL_STEPS
    expected = [BASE["derf", "muon"] - BASE["rmsnorm", "muon"] - BASE["derf", "adamw"] + BASE["rmsnorm", "adamw"]
                + transient(t) for t in EVAL_STEPS]
    assert [p["value"] for p in curve["points"]] == pytest.approx(expected)
    assert all(p["ci95"] is not None for p in curve["points"])
    stability = curve["stability"]
    assert stability["window_steps"] == [80, 90, 100]  # steps >= 0.75 x 100
    assert stability["verdict"] == "stable" and stability["sign_settled_at"] == 30
    gap = next(g for g in curves["gaps"] if g["variant"] == "derf" and g["optim"] == "muon")
    assert [p["value"] for p in gap["points"]] == pytest.approx([0.3 + transient(t) for t in EVAL_STEPS])
    report = (tmp_path / "report.md").read_text()
    assert "## Over training" in report and "stable, sign since step 30" in report
    assert (tmp_path / "over_training.png").is_file()


def _points(values, ci_half=None, steps=None):
    steps = steps or list(range(10, 10 * len(values) + 1, 10))
    return [{"step": s, "value": v, "ci95": None if ci_half is None else (v - ci_half, v + ci_half)}
            for s, v in zip(steps, values)]


@pytest.mark.parametrize("values, half, verdict", [
    ([0.5, 0.3, 0.2, 0.21, 0.2, 0.2, 0.19, 0.2], 0.05, "stable"),
    ([0.5, 0.3, 0.2, 0.21, 0.2, 0.2, -0.05, 0.2], 0.05, "sign changes"),
    ([0.5, 0.3, 0.2, 0.21, 0.2, 0.4, 0.3, 0.2], 0.05, "drifts"),  # 0.4 ± 0.05 misses 0.2 ± 0.05
    ([0.5, 0.3, 0.2, 0.21, 0.2, 0.4, 0.3, 0.2], None, "stable (sign only, no intervals)"),
    ([0.5, 0.2], 0.05, "too few evals (1 in the window, needs 3)"),
])
def test_stability_rule(values, half, verdict):
    assert interaction_stability(_points(values, half))["verdict"] == verdict


# --------------------------------------------------------------------------- the spec


TUNE = {"key": "optim.lr", "values": [1.0e-3, 3.0e-3, 1.0e-2], "seeds": [7], "steps": 2}


@pytest.mark.parametrize("tune, message", [
    ([1, 2], "tune must be a mapping"),
    ({**TUNE, "metric": "x"}, "unknown key 'metric'"),
    ({k: v for k, v in TUNE.items() if k != "seeds"}, "missing key 'seeds'"),
    ({**TUNE, "key": "lr"}, "dotted config key"),
    ({**TUNE, "key": "model.norm"}, "is an axis"),
    ({**TUNE, "key": "train.steps"}, "also in set"),
    ({**TUNE, "key": "model.alpha_init_attn"}, "set by arm 'alpha0.3'"),
    ({**TUNE, "values": [1e-3]}, "at least 2 plain values"),
    ({**TUNE, "values": [1e-3, 0.001]}, "lists 0.001 twice"),
    ({**TUNE, "by": "min_loss"}, "by must be one of final_eval_loss"),
    ({**TUNE, "seeds": [0, 7]}, "share 0 with seeds"),
    ({**TUNE, "seeds": [7, 7]}, "distinct integers"),
    ({**TUNE, "steps": 0}, "steps must be an integer >= 1"),
    ({**TUNE, "values": [1e-3, "fast"]}, "cell rmsnorm-adamw-lrfast-s7"),
])
def test_tune_schema_errors(tmp_path, tiny_corpus, tune, message):
    with pytest.raises(UserError, match=message):
        load_spec(_spec(tmp_path, tiny_corpus, tune=tune))


def _factorial(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "normopt.cli", "factorial", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_dry_run_plans_tuning_then_evaluation_with_its_cost(tmp_path, tiny_corpus):
    spec = _spec(tmp_path, tiny_corpus, tune=TUNE)  # 3 cells (rmsnorm, derf, alpha0.3 arm) x 3 values x 1 seed
    proc = _factorial(spec, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tuning: 9 runs" in out and "derf-adamw-lr0.003-s7: new, 2 steps" in out
    assert "derf-adamw-s0: new, 4 steps (at the optim.lr the tuning runs choose)" in out
    assert ("cost: 9 tuning runs, 18 steps; 3 evaluation runs, 12 steps; in all 12 runs, 30 steps "
            "(30 still to run)") in out
    assert not (tmp_path / "grid").exists()

    # the tuning runs of two cells are done: their evaluation cells show the chosen value
    root = tmp_path / "grid" / TUNING_DIR
    for name, norm in (("rmsnorm-adamw", "rmsnorm"), ("derf-adamw", "derf")):
        for lr, final in zip(TUNE["values"], (3.1, 3.0, 3.2)):
            fake_run(root / f"{name}-lr{lr}-s7", norm, "adamw", 7, {2: final}, lr=lr, steps=2)
    again = _factorial(spec, "--dry-run")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("complete, would skip") == 6
    assert "derf-adamw-s0: new, 4 steps (at the chosen optim.lr=0.003)" in again.stdout
    assert "optim.lr=0.003 run.dir=" in again.stdout
    assert "alpha0.3-adamw-s0: new, 4 steps (at the optim.lr the tuning runs choose)" in again.stdout
    assert "(18 still to run)" in again.stdout  # 3 tuning runs x 2 steps + 3 cells x 4 steps


def test_finished_tuned_grid_is_skipped_on_rerun_and_a_changed_choice_refused(tmp_path, tiny_corpus):
    tune = {**TUNE, "values": [1.0e-3, 3.0e-3]}
    spec_path = _spec(tmp_path, tiny_corpus, tune=tune, arms={})
    root = tmp_path / "grid"
    for norm in ("rmsnorm", "derf"):
        for lr, final in zip(tune["values"], (3.1, 3.0)):
            fake_run(root / TUNING_DIR / f"{norm}-adamw-lr{lr}-s7", norm, "adamw", 7, {2: final}, lr=lr, steps=2)
        fake_run(root / f"{norm}-adamw-s0", norm, "adamw", 0, {2: 3.5, 4: 3.0}, lr=3e-3, steps=4)
    proc = _factorial(spec_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("complete, skipped") == 6
    assert "[tuning] rmsnorm-adamw: optim.lr=0.003 (final_eval_loss 3.0000, 0.1000 nats ahead of 0.001" in proc.stdout
    assert not any((root / n / "train.log").stat().st_size for n in ("rmsnorm-adamw-s0", "derf-adamw-s0")
                   if (root / n / "train.log").exists())
    record = json.loads((root / TUNING_DIR / TUNING_FILE).read_text())
    assert record["choices"]["derf-adamw"]["chosen"] == 3e-3 and record["seeds"] == [7]
    assert "## Tuning" in (root / "report.md").read_text()

    # a tuning run now says 1e-3 is better: the cells that ran at 3e-3 are not mixed in
    fake_run(root / TUNING_DIR / "derf-adamw-lr0.001-s7", "derf", "adamw", 7, {2: 2.9}, lr=1e-3, steps=2)
    refused = _factorial(spec_path)
    assert refused.returncode == 2  # after the (skipped) tuning runs' progress bar, one line
    assert "cell derf-adamw-s0 ran at optim.lr=0.003 but the tuning runs choose 0.001" in \
        refused.stderr.strip().splitlines()[-1]
    # --slurm refuses it too, before it writes or submits anything (its dry run as well)
    for extra in (["--dry-run"], []):
        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        slurm = _factorial(spec_path, "--slurm", "--gpus-per-node=1", *extra)
        assert slurm.returncode == 2 and len(slurm.stderr.strip().splitlines()) == 1, slurm.stderr
        assert "cell derf-adamw-s0 ran at optim.lr=0.003 but the tuning runs choose 0.001" in slurm.stderr
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


@pytest.mark.slow
def test_tuned_grid_trains_chooses_and_reruns_as_a_skip(tmp_path, tiny_corpus):
    """A real tuned grid (2 cells x 2 rates x 1 tuning seed, then 2 evaluation cells): the
    evaluation cells run at the rate their tuning runs chose, and a rerun trains nothing.
    (The faked grid above carries the default claim; this one trains for real.)"""
    tune = {"key": "optim.lr", "values": [1.0e-3, 3.0e-2], "seeds": [7], "steps": 2}
    spec = _spec(tmp_path, tiny_corpus, tune=tune, arms={})
    proc = _factorial(spec, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "grid"
    record = json.loads((root / TUNING_DIR / TUNING_FILE).read_text())
    for cell in ("rmsnorm-adamw", "derf-adamw"):
        chosen = record["choices"][cell]["chosen"]
        assert chosen in tune["values"] and f"[tuning] {cell}: optim.lr={chosen}" in proc.stdout
        config = yaml.safe_load((root / f"{cell}-s0" / "config.yaml").read_text())
        assert config["optim"]["lr"] == chosen and config["train"]["steps"] == 4
        info = json.loads((root / f"{cell}-s0" / "cell.json").read_text())
        assert info["tuned"] == {"key": "optim.lr", "value": chosen, "by": "final_eval_loss"}
        tuning_info = json.loads((root / TUNING_DIR / f"{cell}-lr0.03-s7" / "cell.json").read_text())
        assert tuning_info["coords"]["optim.lr"] == 0.03 and tuning_info["tune"] == {"key": "optim.lr", "value": 0.03}
        tuning_config = yaml.safe_load((root / TUNING_DIR / f"{cell}-lr0.03-s7" / "config.yaml").read_text())
        assert tuning_config["train"]["steps"] == 2 and tuning_config["train"]["seed"] == 7
    report = (root / "report.md").read_text()
    assert "## Tuning" in report and "## Over training" in report
    again = _factorial(spec, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 6
