"""``normopt plan``: the simulated power against an exact computation, the planner's family
against the report's own, seeds needed, the spread of a finished grid, the cost arithmetic and
the refused inputs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from normopt.cli import main
from normopt.config import load_config, save_config
from normopt.factorial.cells import CellSpec, write_cell_json
from normopt.factorial.spec import load_spec
from normopt.models.presets import count_flops_per_token, resolve_model_args
from normopt.planner.command import _parser, make_plan, render_text
from normopt.planner.family import family_plan, group_key, skeleton_summary
from normopt.planner.power import (
    Batches,
    minimum_detectable,
    power_at,
    seeds_needed,
    simulate,
    target_test,
)
from normopt.planner.spread import (
    chi2_quantile,
    grid_cells,
    pooled_spread,
    regularized_gamma,
    sigma_interval,
)
from normopt.report.cells.axes import axes_from_levels
from normopt.report.cells.cell_reading import discover_cells
from normopt.report.stats.student_t import t_quantile
from normopt.report.stats.summary import build_summary
from normopt.run_dir import RunDir
from tests.processes import REPO_ROOT

SPECS = REPO_ROOT / "configs" / "factorial"


def plan_of(spec: Path, target: str | None = None):
    spec_dict, _, cells = load_spec(spec)
    axes = axes_from_levels(spec_dict["axes"], spec_dict.get("report"))
    summary = skeleton_summary(cells, axes)
    return family_plan(summary, target), summary, cells, axes


def run_plan(*argv: str) -> dict:
    return make_plan(_parser().parse_args([*argv]))


def one_axis_spec(tmp_path: Path, seeds: int = 3) -> Path:
    """Two norms, no across axis: the report's family is the one gap derf - rmsnorm."""
    spec = tmp_path / "gap.yaml"
    spec.write_text(
        f"base: {REPO_ROOT / 'configs' / 'demo.yaml'}\nroot: {tmp_path / 'grid'}\n"
        f"axes:\n  model.norm: [rmsnorm, derf]\nseeds: {list(range(seeds))}\n"
    )
    return spec


# ---------------------------------------------------------------------------- power


def exact_welch_power(delta: float, n: int = 3, alpha: float = 0.05) -> float:
    """P(Welch t > t_{1-alpha/2, nu}) for two groups of n normal values (sigma 1, true
    difference delta), integrated numerically: with U = (n-1)(s1^2 + s2^2) ~ chi2_{2(n-1)} and
    B = s1^2 / (s1^2 + s2^2) ~ Beta((n-1)/2, (n-1)/2) independent, se = sqrt(U / ((n-1) n)),
    nu = (n-1) / (B^2 + (1-B)^2), and the difference of means is N(delta, 2/n) independent of
    both. n = 3: B is uniform, U has density u e^{-u/2} / 4."""
    assert n == 3

    def phi(x):
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    sd = math.sqrt(2.0 / n)
    b_points, u_max, u_points = 200, 60.0, 3000
    du = u_max / u_points
    total = 0.0
    for i in range(b_points):  # midpoints of (0, 1)
        b = (i + 0.5) / b_points
        c = t_quantile(1.0 - alpha / 2.0, (n - 1) / (b * b + (1 - b) ** 2))
        inner = 0.0
        for j in range(1, u_points):  # trapezoid, the density is 0 at both ends
            u = j * du
            se = math.sqrt(u / ((n - 1) * n))
            inner += u * math.exp(-u / 2.0) / 4.0 * (1.0 - phi((c * se - delta) / sd))
        total += inner * du
    return total / b_points


def test_simulated_power_matches_the_exact_welch_power(tmp_path):
    """A family of one (one gap, two groups of 3 seeds): Holm is the plain test, and the
    simulated power of the report's Welch test agrees with the exact one within 4 Monte Carlo
    standard errors, at two effects and at the minimum detectable effect."""
    plan, *_ = plan_of(one_axis_spec(tmp_path))
    assert [m.kind for m in plan.members] == ["gap"] and plan.size_range() == (1, 1)
    batch = simulate(plan, 3, 4000, seed=1)
    for delta in (1.5, 3.0):
        simulated = power_at(plan, batch, delta)
        exact = exact_welch_power(delta)
        assert abs(simulated.power - exact) < 4 * simulated.mcse + 1e-3, (delta, simulated, exact)
    mde = minimum_detectable(plan, batch, 0.8)
    assert mde.power.power == pytest.approx(0.8, abs=1e-3)
    assert abs(exact_welch_power(mde.effect) - 0.8) < 4 * mde.power.mcse
    assert mde.mc_range[0] < mde.effect < mde.mc_range[1]


@pytest.mark.parametrize(
    "spec,n,delta,target",
    [
        ("gpu_124m.yaml", 3, 1.0, None),
        ("confounds_cpu.yaml", 2, 12.0, "derf/muon"),
        ("ablation_cpu.yaml", 3, 3.0, None),
    ],
)
def test_planner_family_is_the_reports(tmp_path, spec, n, delta, target):
    """For grids drawn as the planner draws them, the report itself (cells on disk,
    build_summary) gives the target the same Holm-adjusted p-value and the family the same size
    as the planner's evaluation at delta."""
    plan, skeleton, cells, axes = plan_of(SPECS / spec, target)
    grids = 6
    batch = simulate(plan, n, grids, seed=3)
    rng = random.Random(f"3/{n}")  # simulate's draws, in its order
    group_of = {c["name"]: group_key(c) for c in skeleton["cells"]}
    first_seed = min(c.seed for c in cells)
    target_group = plan.target_member.terms[0][0]
    for grid in range(grids):
        noise = {g: [rng.gauss(0.0, 1.0) for _ in range(n)] for g in plan.groups}
        root = tmp_path / f"{spec}-{grid}"
        for cell in (c for c in cells if c.seed == first_seed):
            group = group_of[cell.name]
            for seed in range(n):
                copy = CellSpec(f"{cell.group}-s{seed}", cell.settings, cell.coords, seed, cell.arm, group=cell.group)
                run = RunDir(root / copy.name)
                write_cell_json(run, copy)
                loss = 3.0 + noise[group][seed] + plan.shift.get(group, 0.0) * delta
                run.metrics.write_text(json.dumps({"step": 1, "eval_loss": loss}) + "\n")
        summary = build_summary(discover_cells(root), axes=axes)
        reported = next(r for r in summary["gaps" if plan.single else "interactions"] if group_key(r) == target_group)
        p_holm, estimate, size = target_test(plan, batch, grid, delta)
        assert estimate == pytest.approx(reported["value"], abs=1e-9)
        assert size == summary["family"]["size"]
        assert p_holm == pytest.approx(reported["p_holm"], rel=1e-6, abs=1e-12)


def test_minimum_detectable_effect_scales_with_sigma():
    """Every estimator of the report is scale-equivariant: with the same draws the MDE in nats
    is proportional to sigma, exactly."""
    spec = str(SPECS / "cpu_2seeds.yaml")
    a = run_plan(spec, "--sigma", "0.01", "--simulations", "150", "--effect", "10")
    b = run_plan(spec, "--sigma", "0.02", "--simulations", "150", "--effect", "10")
    assert a["minimum_detectable"]["effect_sigmas"] == b["minimum_detectable"]["effect_sigmas"]
    assert b["minimum_detectable"]["effect"] == pytest.approx(2 * a["minimum_detectable"]["effect"], rel=1e-12)
    assert a["minimum_detectable"]["effect_at_sigma_upper"] is None  # a stated sigma has no interval


def test_seeds_needed_fall_as_the_effect_grows():
    plan, *_ = plan_of(SPECS / "cpu_2seeds.yaml")
    batches = Batches(plan, 200, seed=0)
    needed = [seeds_needed(batches, effect, 0.8, 64).n for effect in (1.0, 2.0, 4.0, 8.0, 30.0)]
    assert all(n is not None for n in needed)
    assert needed == sorted(needed, reverse=True) and needed[0] > needed[-1], needed
    for effect, n in zip((1.0, 2.0, 4.0, 8.0, 30.0), needed):  # the smallest such n
        assert power_at(plan, batches.at(n), effect).power >= 0.8
        if n > 2:
            assert power_at(plan, batches.at(n - 1), effect).power < 0.8
    tiny = seeds_needed(Batches(plan, 50, seed=0), 0.05, 0.8, 4)
    assert tiny.n is None and tiny.max_seeds == 4  # beyond the cap: said, not guessed


# ---------------------------------------------------------------------------- the spread


def test_chi_square_quantiles():
    # df = 2: P(X <= x) = 1 - exp(-x / 2), so the quantile is -2 ln(1 - p)
    for p in (0.025, 0.5, 0.975):
        assert chi2_quantile(p, 2) == pytest.approx(-2 * math.log(1 - p), rel=1e-10)
    # table values
    assert chi2_quantile(0.975, 1) == pytest.approx(5.023886, rel=1e-6)
    assert chi2_quantile(0.025, 10) == pytest.approx(3.246973, rel=1e-6)
    assert chi2_quantile(0.975, 6) == pytest.approx(14.449375, rel=1e-6)
    assert regularized_gamma(1.0, 3.0) == pytest.approx(1 - math.exp(-3.0), rel=1e-12)


def write_grid(
    root: Path,
    spec: Path,
    losses: dict[str, list[float]],
    tokens_per_s: float | None = None,
    diverged: str | None = None,
) -> None:
    """A finished grid of ``spec``'s cells: cell.json, the resolved config.yaml and a
    metrics.jsonl ending at train.steps with ``losses[group][seed]``, training windows at
    ``tokens_per_s``; ``diverged``: one more cell of that group, exit status 3."""
    _, base, cells = load_spec(spec)
    for cell in cells:
        run = RunDir(root / cell.name)
        write_cell_json(run, cell)
        cfg = load_config(base, cell.overrides)
        save_config(cfg, run.config)
        steps = cfg.train.steps
        lines = [{"step": s, "loss": 3.5, "tokens_per_s": tokens_per_s} for s in (10, 20, 30)] if tokens_per_s else []
        lines += [{"step": steps, "loss": 3.4}, {"step": steps, "eval_loss": losses[cell.group][cell.seed]}]
        run.metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    if diverged is not None:
        cell = next(c for c in cells if c.group == diverged)
        copy = CellSpec(f"{diverged}-s9", cell.settings, cell.coords, 9, cell.arm, group=diverged)
        write_cell_json(RunDir(root / copy.name), copy, exit_code=3)


def test_sigma_pooled_from_a_finished_grid(tmp_path):
    """Six groups of two seeds, each pair x -/+ 0.01 (s = 0.01 sqrt 2): the pooled sigma is
    0.01 sqrt 2 on 6 degrees of freedom, with the chi-square interval from the table values;
    the diverged cell is left out as in the report."""
    spec = SPECS / "cpu_2seeds.yaml"
    groups = ["rmsnorm-adamw", "rmsnorm-muon", "dyt-adamw", "dyt-muon", "derf-adamw", "derf-muon"]
    losses = {g: [3.0 + 0.1 * i - 0.01, 3.0 + 0.1 * i + 0.01] for i, g in enumerate(groups)}
    write_grid(tmp_path / "grid", spec, losses, diverged="derf-muon")
    _, summary = grid_cells(tmp_path / "grid")
    spread = pooled_spread(tmp_path / "grid", summary)
    s = 0.01 * math.sqrt(2)
    assert spread.sigma == pytest.approx(s, rel=1e-9) and spread.df == 6
    assert (spread.groups, spread.cells, spread.left_out) == (6, 12, 1)
    assert spread.ci95 == pytest.approx((s * math.sqrt(6 / 14.449375), s * math.sqrt(6 / 1.237344)), rel=1e-5)
    assert sigma_interval(s, 6) == pytest.approx(spread.ci95)


def test_from_a_grid_gives_the_spread_its_upper_end_and_the_measured_cost(tmp_path):
    """--from: the spread and the measured tokens/s of the grid's cells. Every cell ran at 2048
    tokens/s = one 2048-token step a second, so 2 seeds of the 6 cells (200 steps each) take
    2400 GPU-seconds; the MDE at sigma's upper bound is the MDE in sigmas times that bound."""
    spec = SPECS / "cpu_2seeds.yaml"
    groups = ["rmsnorm-adamw", "rmsnorm-muon", "dyt-adamw", "dyt-muon", "derf-adamw", "derf-muon"]
    write_grid(tmp_path / "grid", spec, {g: [3.0, 3.02] for g in groups}, tokens_per_s=2048)
    plan = run_plan(str(spec), "--from", str(tmp_path / "grid"), "--simulations", "100", "--effect", "1")
    spread = plan["spread"]
    assert spread["sigma"] == pytest.approx(0.02 / math.sqrt(2)) and spread["df"] == 6
    mde = plan["minimum_detectable"]
    assert mde["effect_at_sigma_upper"] == pytest.approx(mde["effect_sigmas"] * spread["ci95"][1])
    assert plan["seeds_needed"][0]["at_sigma_upper"] is not None
    assert plan["cost"]["rate"]["source"].startswith("measured: the median tokens/s of 12 cells")
    two = next(c for c in plan["cost"]["options"] if c["seeds"] == 2)
    assert two["gpu_hours"] == pytest.approx(2400 / 3600)
    text = render_text(plan)
    assert "95% chi-square interval" in text and "at sigma's upper 95% bound" in text


# ---------------------------------------------------------------------------- cost


def test_cost_of_a_known_spec():
    """cpu_2seeds: 6 cells per seed, 200 steps of 16 x 128 tokens each."""
    spec = str(SPECS / "cpu_2seeds.yaml")
    plan = run_plan(spec, "--sigma", "0.02", "--simulations", "50", "--effect", "100", "--tokens-per-s", "1024")
    assert plan["cells_per_seed"] == 6 and plan["spec_seeds"] == 2
    assert plan["cost"]["options"] == [
        {
            "seeds": 2,
            "runs": 12,
            "tuning_runs": 0,
            "steps": 2400,
            "tokens": 12 * 200 * 16 * 128,
            "gpu_hours": pytest.approx(4800 / 3600),
        }
    ]
    plan = run_plan(
        spec,
        "--sigma",
        "0.02",
        "--simulations",
        "50",
        "--effect",
        "100",
        "--mfu",
        "0.5",
        "--peak-tflops",
        "2",
        "--gpus-per-run",
        "4",
    )
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", ["data.vocab_size=4096", "model.init_std=0.072"])
    per_step = count_flops_per_token(resolve_model_args(cfg.model, vocab_size=4096), 128) * 16 * 128
    assert plan["cost"]["options"][0]["gpu_hours"] == pytest.approx(2400 * per_step / 1e12 / 3600)
    assert plan["cost"]["rate"]["gpus_per_run"] == 4  # MFU counts per GPU: the GPU count does not matter


def test_cost_of_a_tuned_spec_counts_its_tuning_runs_once():
    """tuned_tiny_cpu: 6 cells x 5 values x 1 tuning seed at 40 steps, then 6 cells of 80 steps per
    seed (1 seed in the spec; its dry run says 30 tuning runs, 1200 steps; 6 runs, 480 steps)."""
    plan = run_plan(str(SPECS / "tuned_tiny_cpu.yaml"), "--sigma", "0.02", "--simulations", "50", "--effect", "100")
    by_seeds = {c["seeds"]: c for c in plan["cost"]["options"]}
    assert by_seeds[1] == {
        "seeds": 1,
        "runs": 36,
        "tuning_runs": 30,
        "steps": 1680,
        "tokens": 1680 * 16 * 128,
        "gpu_hours": None,
    }
    assert by_seeds[2]["runs"] == 42 and by_seeds[2]["steps"] == 2160
    assert plan["minimum_detectable"]["seeds"] == 2  # 1 seed tests nothing: the MDE is at 2
    assert "at the spec's 1 seed nothing is tested" in render_text(plan)


# ---------------------------------------------------------------------------- the command line


def test_text_output_names_the_family_the_alternative_and_the_assumptions(capsys):
    assert main(["plan", str(SPECS / "gpu_124m.yaml"), "--sigma", "0.02", "--simulations", "100"]) == 0
    out = capsys.readouterr().out
    assert "interaction derf × muon − adamw   <- planned for" in out
    assert "2 to 4 tests" in out and "derf_ema/muon" in out
    for part in (
        "(a) the smallest interaction derf × muon − adamw detected",
        "(b) seeds per cell",
        "(c) cost",
        "assumptions:",
        "+0.66 nats",
        "+0.2 nats",
        "simulation: 100 simulated grids",
    ):
        assert part in out
    assert (
        main(
            [
                "plan",
                str(SPECS / "gpu_124m.yaml"),
                "--sigma",
                "0.02",
                "--simulations",
                "100",
                "--target",
                "dyt/muon",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["target"] == "interaction dyt × muon − adamw" and plan["family"]["shift"] == {"dyt/muon": 1.0}


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "no seed-to-seed spread to plan with: pass --from ROOT"),
        (["--sigma", "0"], "--sigma must be a positive number"),
        (["--sigma", "-0.1"], "--sigma must be a positive number"),
        (["--sigma", "0.02", "--effect", "0"], "--effect must be a positive number"),
        (["--sigma", "0.02", "--power", "1"], "--power must be in (0, 1)"),
        (["--sigma", "0.02", "--simulations", "0"], "--simulations must be a positive integer"),
        (["--sigma", "0.02", "--max-seeds", "1"], "--max-seeds must be at least 2"),
        (["--sigma", "0.02", "--mfu", "0.4"], "--mfu and --peak-tflops go together"),
        (["--sigma", "0.02", "--mfu", "1.5", "--peak-tflops", "900"], "--mfu must be in (0, 1]"),
        (["--sigma", "0.02", "--tokens-per-s", "1e5", "--mfu", "0.4", "--peak-tflops", "900"], "give one rate"),
        (["--from", "no/such/grid"], "no/such/grid: no such folder"),
        (["--sigma", "0.02", "--target", "layernorm/muon"], "--target layernorm/muon: not an interaction"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(capsys, argv, message):
    assert main(["plan", str(SPECS / "cpu_2seeds.yaml"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normopt: error: ") and "\n" not in err and message in err, err


def test_refused_spreads_and_specs(tmp_path, capsys):
    spec = SPECS / "tiny_cpu.yaml"  # one seed: no spread to pool
    _, _, cells = load_spec(spec)
    write_grid(tmp_path / "grid", spec, {c.group: [3.0] for c in cells})
    assert main(["plan", str(spec), "--from", str(tmp_path / "grid")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no group has 2 or more included seeds" in err and "pass --sigma" in err and "\n" not in err
    assert main(["plan", str(tmp_path / "missing.yaml"), "--sigma", "0.02"]) == 2
    assert "spec file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal, through normopt's CommandParser
        main(["plan", str(SPECS / "cpu_2seeds.yaml"), "--sigma", "abc"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("normopt plan: error: argument --sigma")
