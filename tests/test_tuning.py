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
from normopt.report.cells.tuning_runs import TUNING_DIR, TUNING_FILE
from normopt.report.stats.over_training import change_record, interaction_stability
from normopt.report.stats.student_t import t_critical
from normopt.report.stats.tuning_choice import (
    BOOTSTRAP_RESAMPLES,
    Choice,
    ValueOutcome,
    choice_reliability,
    choose_value,
)
from normopt.report.writer import write_report
from tests.conftest import REPO_ROOT
from tests.test_factorial import _spec
from tests.test_report import t95_by_integration

STEPS = 100


def fake_run(
    folder: Path,
    norm: str,
    optim: str,
    seed: int,
    evals: dict[int, float | str],
    *,
    lr: float = 1e-3,
    steps: int = STEPS,
    arm: str | None = None,
    complete: bool = True,
) -> Path:
    """A finished run directory as a factorial leaves it: config.yaml, cell.json, metrics.jsonl
    (an eval at step 0 and at each step of ``evals``, a train line beside each), and a final
    checkpoint marker."""
    cfg = Config().to_dict()
    cfg["run"]["dir"] = str(folder)
    cfg["model"]["norm"], cfg["optim"]["name"], cfg["optim"]["lr"] = norm, optim, lr
    cfg["train"]["seed"], cfg["train"]["steps"] = seed, steps
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "cell.json").write_text(
        json.dumps(
            {"name": folder.name, "coords": {"norm": norm, "optim": optim}, "seed": seed, "arm": arm, "exit_code": 0}
        )
    )
    lines = [{"step": 0, "eval_loss": 9.0}]
    for step, value in sorted(evals.items()):
        lines += [
            {"step": step, "loss": value if isinstance(value, str) else value + 0.05},
            {"step": step, "eval_loss": value},
        ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if complete:
        marker = folder / "checkpoints" / f"step_{steps:08d}"
        marker.mkdir(parents=True, exist_ok=True)
        (marker / "trainer_state.json").write_text("{}")
    return folder


# --------------------------------------------------------------------------- the choice


def test_choice_lowest_mean_ties_to_first_diverged_excluded_edges_flagged():
    outcomes = [
        ValueOutcome(1e-3, (3.2, 3.4)),
        ValueOutcome(3e-3, (3.0, 3.2)),
        ValueOutcome(1e-2, (3.1, 3.1)),
        ValueOutcome(3e-2, (2.0,), ("x-s1: diverged: loss was nan",)),
    ]
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


DERF_MUON_DIVERGES_AT_3E_2 = {("derf", "muon", 3, 100): "nan", ("derf", "muon", 3, 101): "nan"}


def build_tuned_grid(root: Path, broken: dict | None = None) -> Path:
    """Tuning runs on seeds 100, 101 (±0.01: the mean is exact) at every value, the runs named
    in ``broken`` ((norm, optim, value index, seed) -> "nan": diverged, "stopped": stopped at
    step 50 of 100) broken (default: Derf + Muon diverging at 3e-2 on both seeds); evaluation
    cells on seeds 0, 1 (±0.02) at each cell's best value."""
    broken = DERF_MUON_DIVERGES_AT_3E_2 if broken is None else broken
    tuning = root / TUNING_DIR
    tuning.mkdir(parents=True)
    (tuning / TUNING_FILE).write_text(
        json.dumps({"key": "optim.lr", "values": VALUES, "by": "final_eval_loss", "seeds": [100, 101], "steps": None})
    )
    for norm, optim in BASE:
        for i, lr in enumerate(VALUES):
            for seed, noise in ((100, 0.01), (101, -0.01)):
                final: float | str = tuning_loss((norm, optim), i) + noise
                how = broken.get((norm, optim, i, seed))
                evals = {50: 5.0} if how == "stopped" else {50: 5.0, STEPS: "nan" if how == "nan" else final}
                fake_run(
                    tuning / f"{norm}-{optim}-lr{lr}-s{seed}",
                    norm,
                    optim,
                    seed,
                    evals,
                    lr=lr,
                    complete=how != "stopped",
                )
        for seed, noise in ((0, 0.02), (1, -0.02)):
            fake_run(
                root / f"{norm}-{optim}-s{seed}",
                norm,
                optim,
                seed,
                {50: 5.0, STEPS: BASE[norm, optim] + noise},
                lr=VALUES[BEST[norm, optim]],
            )
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
        expected = (
            tuning_loss(("derf", "muon"), i)
            - tuning_loss(("rmsnorm", "muon"), i)
            - tuning_loss(("derf", "adamw"), i)
            + tuning_loss(("rmsnorm", "adamw"), i)
        )
        assert found[0]["value"] == pytest.approx(expected) and found[0]["ci95"] is not None
    assert [x["value"] for v in tuning["per_value"][:3] for x in v["interactions"]] == pytest.approx([-0.8, 0.0, 0.8])
    # at the tuned values the interaction vanishes (evaluation seeds, not the tuning runs)
    tuned = summary["interactions"][0]
    assert tuned["value"] == pytest.approx(0.0, abs=1e-12) and tuned["ci95"][0] < 0 < tuned["ci95"][1]
    assert "no selection bias" in tuning["selection_bias"]
    report = (tmp_path / "report.md").read_text()
    assert "## Tuning" in report and "at the edge of the range" in report and "![tuning](tuning.png)" in report
    assert "Every table below is at each cell's tuned `optim.lr`" in report
    assert (
        "derf × muon − adamw: at the tuned values +0.0000 [-0.1111, +0.1111]; at the common values "
        "from -0.8000 to +0.8000"
    ) in report
    assert (tmp_path / "tuning.png").is_file()


def test_overlapping_seeds_are_called_optimistic_with_a_bound(tmp_path):
    root = build_tuned_grid(tmp_path)
    # a hand-assembled folder: tuning seed 100 is also an evaluation seed
    fake_run(root / "rmsnorm-adamw-s100", "rmsnorm", "adamw", 100, {STEPS: 3.0}, lr=3e-3)
    statement = write_report(root)["tuning"]["selection_bias"]
    # sigma = the largest standard error of a tuning mean (0.01, from ±0.01), k = 4 values
    assert "optimistic" in statement and f"{0.01 * math.sqrt(2 * math.log(4)):.4f}" in statement


def test_a_tuning_run_left_out_of_a_common_value_is_flagged_and_kept_out_of_the_range(tmp_path):
    """Derf + Muon's seed 101 diverges at 1e-2 (and both at 3e-2): the interaction at 1e-2 rests on
    its seed 100 alone, 0.8 + 0.01 = 0.81 with no interval, and lost a diverged run of a group
    that enters with +, so it is biased low. The range at the common values is over 1e-3 and
    3e-3 only (-0.8 to 0); 1e-2 is named with its flag, 3e-2 as not computable."""
    broken = {**DERF_MUON_DIVERGES_AT_3E_2, ("derf", "muon", 2, 101): "nan"}
    summary = write_report(build_tuned_grid(tmp_path, broken))
    (k,) = summary["tuning"]["survival"]
    assert k["common_range"] == pytest.approx([-0.8, 0.0], abs=1e-12) and k["common_range_values"] == VALUES[:2]
    (flagged,) = k["flagged"]
    assert flagged["value"] == 1e-2 and flagged["estimate"] == pytest.approx(0.81) and flagged["ci95"] is None
    assert flagged["left_out"] == ["derf/muon: 1 cell left out (1 diverged)"]
    assert flagged["left_out_bias"] == [
        {"estimate": "interaction", "direction": "low", "plus": ["derf/muon"], "minus": []}
    ]
    assert k["not_computable"] == [3e-2]
    report = (tmp_path / "report.md").read_text()
    assert (
        "at the common values whose tuning runs all counted from -0.8000 to +0.0000 (point estimates at "
        "optim.lr=0.001, 0.003; their intervals in the table below); at optim.lr=0.01 +0.8100 (no interval) "
        "⚠ cells left out of its groups (derf/muon: 1 cell left out (1 diverged)): the interaction is biased "
        "low"
    ) in report
    assert "not computable at optim.lr=0.03" in report
    assert (
        "| derf | muon − adamw | -0.8000 [-0.8555, -0.7445] | +0.0000 [-0.0555, +0.0555] | "
        "+0.8100 (no interval) ⚠ | — |"
    ) in report
    assert "| derf | muon | 3.2000 | 3.4000 | diverged (excluded) | diverged (excluded) | 0.001 |" in report
    on_disk = json.loads((tmp_path / "summary.json").read_text())["tuning"]["survival"][0]
    assert on_disk["flagged"][0]["left_out"] == flagged["left_out"]


def test_a_stopped_tuning_run_makes_the_choice_wait_and_its_entry_is_marked(tmp_path):
    """RMSNorm + AdamW's seed 101 stops at step 50 of 100 at 1e-2: the value is neither excluded
    nor chosen among a subset; the choice waits, and the table shows seed 100's 3.21 marked as
    not the mean over the two tuning seeds."""
    broken = {**DERF_MUON_DIVERGES_AT_3E_2, ("rmsnorm", "adamw", 2, 101): "stopped"}
    summary = write_report(build_tuned_grid(tmp_path, broken))
    choice = next(c for c in summary["tuning"]["choices"] if (c["variant"], c["optim"]) == ("rmsnorm", "adamw"))
    assert choice["chosen"] is None and choice["excluded"] == {}
    assert choice["reason"] == "tuning runs not finished for 0.01" and choice["reliability"] is None
    entry = choice["by_value"][2]
    assert entry["n"] == 1 and not entry["complete"] and entry["mean"] == pytest.approx(3.21)
    assert all(b["complete"] for b in choice["by_value"] if b is not entry)
    report = (tmp_path / "report.md").read_text()
    assert "| rmsnorm | adamw | 3.2000 | 3.0000 | 3.2100† (1 of 2 seeds) | 3.8000 | none |" in report
    assert "† not the mean over the 2 tuning seeds" in report
    assert "a value with a tuning run not finished (not run yet, or stopped before its last step" in report
    assert "diverged or stopped tuning run is excluded" not in report
    stopped = ValueOutcome(3e-3, (3.0,), ("incomplete: x-s1: stopped_early: last logged step 50 < train.steps 100",))
    assert choose_value([ValueOutcome(1e-3, (3.2, 3.4)), stopped], 2).chosen is None


def test_choice_reliability_by_hand():
    """Two seeds: 1e-3 loses 3.0 / 3.2, 3e-3 loses 3.1 / 3.05 (means 3.1, 3.075: 3e-3 chosen).
    Resampling the two seeds gives {100, 100} (p = 1/4, 1e-3 wins), {101, 101} (1/4) and
    {100, 101} (1/2), so 3e-3 wins with probability 3/4. The runner-up's paired difference is
    (-0.1, +0.15): mean 0.025, se 0.125, 1 df, interval 0.025 ± 12.706 × 0.125: within the noise."""
    outcomes = [ValueOutcome(1e-3, (3.0, 3.2), (), (100, 101)), ValueOutcome(3e-3, (3.1, 3.05), (), (100, 101))]
    choice = choose_value(outcomes, 2)
    assert choice.chosen == 3e-3 and choice.runner_up == 1e-3
    r = choice_reliability(outcomes, choice)
    assert r["resamples"] == BOOTSTRAP_RESAMPLES == 2000 and r["paired"] and r["n_seeds"] == 2
    assert abs(r["share_chosen_wins"] - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 2000)
    assert choice_reliability(outcomes, choice) == r  # seeded: the same share every time
    diff = r["runner_up_difference"]
    assert diff["value"] == pytest.approx(0.025) and diff["se"] == pytest.approx(0.125) and diff["df"] == 1
    assert diff["ci95"] == pytest.approx([0.025 - 12.706204736 * 0.125, 0.025 + 12.706204736 * 0.125])
    assert diff["within_noise"]
    # three seeds, the chosen value better by 0.1 on each: every resample keeps it, the runner-up is out of the noise
    clear = [ValueOutcome(1e-3, (3.1, 3.3, 3.22), (), (1, 2, 3)), ValueOutcome(3e-3, (3.0, 3.21, 3.11), (), (1, 2, 3))]
    r = choice_reliability(clear, choose_value(clear, 3))
    assert r["share_chosen_wins"] == 1.0 and r["runner_up_difference"]["within_noise"] is False
    # unpaired runs (no shared seeds): each value resampled alone, a Welch interval
    unpaired = [ValueOutcome(1e-3, (3.1, 3.3), (), (1, 2)), ValueOutcome(3e-3, (3.0, 3.2), (), (3, 4))]
    r = choice_reliability(unpaired, choose_value(unpaired, 2))
    assert not r["paired"] and r["runner_up_difference"]["df"] == pytest.approx(2.0)
    assert r["runner_up_difference"]["within_noise"]
    # one seed: nothing to resample, no interval
    single = [ValueOutcome(1e-3, (3.1,), (), (1,)), ValueOutcome(3e-3, (3.0,), (), (1,))]
    r = choice_reliability(single, choose_value(single, 1))
    assert r["share_chosen_wins"] is None and r["runner_up_difference"] is None and "1 tuning seed" in r["reason"]
    assert choice_reliability(outcomes, Choice(None, None, reason="waiting")) is None


def test_the_report_shows_how_reliable_each_choice_is(tmp_path):
    """The tuned grid's seeds shift every value by the same ±0.01, so each runner-up's paired
    difference is exact (+0.2 for every cell) and every resample keeps the choice."""
    summary = write_report(build_tuned_grid(tmp_path))
    for c in summary["tuning"]["choices"]:
        r = c["reliability"]
        assert r["share_chosen_wins"] == 1.0 and r["paired"] and r["resamples"] == 2000
        assert r["runner_up_difference"]["value"] == pytest.approx(0.2)
        assert r["runner_up_difference"]["within_noise"] is False
    on_disk = json.loads((tmp_path / "summary.json").read_text())["tuning"]
    assert on_disk["resamples"] == 2000 and on_disk["resample_seed"] == 0
    assert on_disk["choices"][0]["reliability"]["share_chosen_wins"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "chosen still wins (share of 2000 seed resamples)" in report
    assert "| +0.2000 [+0.2000, +0.2000] (paired t; outside the noise) | 100.0% |" in report


# --------------------------------------------------------------------------- over training

EVAL_STEPS = list(range(10, STEPS + 1, 10))


def transient(step: int) -> float:
    """Derf + Muon's extra loss: +0.4 early, crossing 0 between steps 20 and 30, -0.1 late."""
    return 0.5 * math.exp(-step / 15) - 0.1


def test_interaction_over_training_follows_a_known_trajectory(tmp_path):
    for norm, optim in BASE:
        for seed, noise in ((0, 0.01), (1, -0.01)):
            evals = {
                t: BASE[norm, optim]
                + 2.0 * math.exp(-t / 20)
                + noise
                + (transient(t) if (norm, optim) == ("derf", "muon") else 0.0)
                for t in EVAL_STEPS
            }
            fake_run(tmp_path / f"{norm}-{optim}-s{seed}", norm, optim, seed, evals)
    summary = write_report(tmp_path)
    curves = summary["over_training"]
    (curve,) = curves["interactions"]
    assert [p["step"] for p in curve["points"]] == EVAL_STEPS
    expected = [
        BASE["derf", "muon"] - BASE["rmsnorm", "muon"] - BASE["derf", "adamw"] + BASE["rmsnorm", "adamw"] + transient(t)
        for t in EVAL_STEPS
    ]
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
    return [
        {"step": s, "value": v, "ci95": None if ci_half is None else (v - ci_half, v + ci_half)}
        for s, v in zip(steps, values)
    ]


M = 0.05  # the report's default equivalence margin
T90_4, T95_4 = t_critical(4, 0.90), t_critical(4)  # 95th and 97.5th percentiles of t with 4 df


@pytest.mark.parametrize(
    "values, change, verdict",
    [
        # stable <=> the 90% t interval of Δ lies inside (−M, M): Δ + t_{0.95,4}·se just below / above M
        ([0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], (M - T90_4 * 0.01 - 1e-4, 0.01), "stable"),
        ([0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], (M - T90_4 * 0.01 + 1e-4, 0.01), "drifts"),
        # drifts <=> not stable and the 95% t interval of Δ excludes 0: Δ − t_{0.975,4}·se just above / below 0
        ([0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], (T95_4 * 0.02 + 1e-4, 0.02), "drifts"),
        ([0.5, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], (T95_4 * 0.02 - 1e-4, 0.02), "change unresolved"),
        ([0.5, 0.3, 0.2, 0.21, 0.2, 0.2, -0.05, 0.2], (0.0, 0.001), "sign changes"),
        ([0.5, 0.3, 0.2, 0.21, 0.2, 0.4, 0.3, 0.2], (0.0, None), "sign kept, change not tested (1 seed)"),
        (
            [0.5, 0.3, 0.2, 0.21, 0.2, 0.4, 0.3, 0.2],
            None,
            "sign kept, change not computable (a group has no cell with an eval at both ends of the window)",
        ),
        ([0.5, 0.2], (0.0, 0.001), "too few evals (1 in the window, needs 3)"),
    ],
)
def test_stability_rule(values, change, verdict):
    """With Δ = I(t_final) − I(t_0) over the window (steps >= 0.75 t_final), se its standard error
    and 4 degrees of freedom: stable <=> no sign change and Δ ± t_{0.95,4}·se inside (−M, M);
    drifts <=> not stable and 0 outside Δ ± t_{0.975,4}·se; else change unresolved. Each pair
    of cases sits just either side of one boundary (1e-4 nats)."""
    record = (
        None if change is None else change_record(change[0], change[1], None if change[1] is None else 4.0, M, 60, 80)
    )
    assert interaction_stability(_points(values, 0.05), record)["verdict"] == verdict


A_NOISE, B_NOISE = 0.0065, 0.004  # per seed: a level offset, and a change of b over the window


def _drift_grid(root: Path) -> None:
    """Two seeds per group, eval every 10 steps to 100. Each cell's loss: the group's base, a
    shared decay, its extra loss, and seed noise ±(a + b (t − 80) / 20): the interaction's 95%
    half-width is t_{0.975,4} · 2a = 0.036 at step 80, and Δ over the window [80, 100] has
    se = 2b = 0.008 with 4 degrees of freedom (every group's variance equal).
    Derf × Muon moves 0.10 -> 0.17 (the window intervals overlap, Δ = 0.07: drifts);
    DyT × Muon moves 0.16 -> 0.17 (Δ = 0.01: stable at M = 0.05)."""
    base = {**BASE, ("dyt", "adamw"): 3.1, ("dyt", "muon"): 3.0}

    def extra(cell, t):
        frac = max(t - 80, 0) / 20
        return {("derf", "muon"): 0.10 + 0.07 * frac, ("dyt", "muon"): 0.16 + 0.01 * frac}.get(cell, 0.0)

    for cell in base:
        for seed, sign in ((0, 1.0), (1, -1.0)):
            evals = {
                t: base[cell] + 2.0 * math.exp(-t / 20) + extra(cell, t) + sign * (A_NOISE + B_NOISE * (t - 80) / 20)
                for t in EVAL_STEPS
            }
            fake_run(root / f"{cell[0]}-{cell[1]}-s{seed}", *cell, seed, evals)


def test_a_drifting_and_a_stable_curve_sit_either_side_of_the_stability_rule(tmp_path):
    """The issue's case: 0.10 -> 0.17 with half-width 0.036 passed the old overlap rule as
    "stable"; the change with its own interval says it drifts, and a move of 0.01 is stable."""
    _drift_grid(tmp_path)
    summary = write_report(tmp_path)
    curves = {c["variant"]: c for c in summary["over_training"]["interactions"]}
    derf, dyt = curves["derf"]["stability"], curves["dyt"]["stability"]
    first, last = curves["derf"]["points"][7], curves["derf"]["points"][9]
    assert (first["step"], last["step"]) == (80, 100)
    assert first["value"] == pytest.approx(0.10) and last["value"] == pytest.approx(0.17)
    assert first["ci95"][1] - first["value"] == pytest.approx(t95_by_integration(4.0) * 2 * A_NOISE, rel=1e-4)
    assert first["ci95"][1] >= last["ci95"][0]  # the intervals overlap: the old rule said "stable"
    t95 = t95_by_integration(4.0)
    change = derf["change"]
    assert (change["from_step"], change["to_step"]) == (80, 100) and change["n"] == [2, 2, 2, 2]
    assert change["value"] == pytest.approx(0.07) and change["se"] == pytest.approx(2 * B_NOISE)
    assert change["df"] == pytest.approx(4.0)
    assert change["ci95"] == pytest.approx([0.07 - t95 * 0.008, 0.07 + t95 * 0.008], rel=1e-4)
    assert change["excludes_0"] and not change["equivalent"] and derf["verdict"] == "drifts"
    assert dyt["change"]["value"] == pytest.approx(0.01) and dyt["change"]["equivalent"]
    assert dyt["verdict"] == "stable"
    assert summary["over_training"]["margin"] == M and "±0.05 nats" in summary["over_training"]["rule"]
    report = (tmp_path / "report.md").read_text()
    assert "stable = the 90% interval of Δ lies inside ±0.05 nats" in report
    assert (
        "| derf | muon | +0.1700 | +0.1000 … +0.1700 | 80, 90, 100 | +0.0700 [+0.0478, +0.0922] (step 80 → 100) |"
    ) in report
    line = next(ln for ln in report.splitlines() if ln.startswith("- **derf × muon**"))
    assert "over the last quarter of training: drifts; change Δ over the window +0.0700 [+0.0478, +0.0922]" in line
    # deterministic: the same cells give the same summary
    again = write_report(tmp_path)["over_training"]
    assert again["interactions"] == summary["over_training"]["interactions"]


def test_the_answer_carries_a_sign_change_beside_the_final_steps_test(tmp_path):
    """Derf × Muon's interaction is −0.05 at step 80 and +0.30 from step 90: at the final step it
    is distinguishable from 0 in the family, and the answer says its sign changed in the window."""
    for cell in BASE:
        for seed, noise in ((0, 0.01), (1, -0.01)):
            evals = {
                t: BASE[cell]
                + 2.0 * math.exp(-t / 20)
                + noise
                + ((-0.05 if t == 80 else 0.3) if cell == ("derf", "muon") else 0.0)
                for t in EVAL_STEPS
            }
            fake_run(tmp_path / f"{cell[0]}-{cell[1]}-s{seed}", *cell, seed, evals)
    summary = write_report(tmp_path)
    (item,) = summary["interactions"]
    assert item["value"] == pytest.approx(0.3) and item["p_holm"] < 0.05
    assert summary["over_training"]["interactions"][0]["stability"]["verdict"] == "sign changes"
    line = next(ln for ln in (tmp_path / "report.md").read_text().splitlines() if ln.startswith("- **derf × muon**"))
    assert (
        "distinguishable from 0 in the family at the final step; over the last quarter of training: sign changes"
    ) in line
    assert "its sign is not settled" in line or "sign is not settled" in line


# --------------------------------------------------------------------------- the spec


TUNE = {"key": "optim.lr", "values": [1.0e-3, 3.0e-3, 1.0e-2], "seeds": [7], "steps": 2}


@pytest.mark.parametrize(
    "tune, message",
    [
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
    ],
)
def test_tune_schema_errors(tmp_path, tiny_corpus, tune, message):
    with pytest.raises(UserError, match=message):
        load_spec(_spec(tmp_path, tiny_corpus, tune=tune))


def _factorial(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", "factorial", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_dry_run_plans_tuning_then_evaluation_with_its_cost(tmp_path, tiny_corpus):
    spec = _spec(tmp_path, tiny_corpus, tune=TUNE)  # 3 cells (rmsnorm, derf, alpha0.3 arm) x 3 values x 1 seed
    proc = _factorial(spec, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tuning: 9 runs" in out and "derf-adamw-lr0.003-s7: new, 2 steps" in out
    assert "derf-adamw-s0: new, 4 steps (at the optim.lr the tuning runs choose)" in out
    assert (
        "cost: 9 tuning runs, 18 steps; 3 evaluation runs, 12 steps; in all 12 runs, 30 steps (30 still to run)"
    ) in out
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
    assert not any(
        (root / n / "train.log").stat().st_size
        for n in ("rmsnorm-adamw-s0", "derf-adamw-s0")
        if (root / n / "train.log").exists()
    )
    record = json.loads((root / TUNING_DIR / TUNING_FILE).read_text())
    assert record["choices"]["derf-adamw"]["chosen"] == 3e-3 and record["seeds"] == [7]
    assert "## Tuning" in (root / "report.md").read_text()

    # a tuning run now says 1e-3 is better: the cells that ran at 3e-3 are not mixed in
    fake_run(root / TUNING_DIR / "derf-adamw-lr0.001-s7", "derf", "adamw", 7, {2: 2.9}, lr=1e-3, steps=2)
    refused = _factorial(spec_path)
    assert refused.returncode == 2  # after the (skipped) tuning runs' progress bar, one line
    assert (
        "cell derf-adamw-s0 ran at optim.lr=0.003 but the tuning runs choose 0.001"
        in refused.stderr.strip().splitlines()[-1]
    )
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
