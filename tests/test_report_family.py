"""The report's main family (Holm), equivalence tests, left-out cells per group and factor
effects, on synthetic cells with answers computed by hand."""

from __future__ import annotations

import math
import shutil

import pytest

from normopt.errors import UserError
from normopt.report.cells.axes import DEFAULT_EQUIVALENCE_MARGIN, ReportAxes, axes_from_levels
from normopt.report.cells.cell_reading import discover_cells
from normopt.report.render.markdown import render_markdown
from normopt.report.stats.contrasts import contrast, describe
from normopt.report.stats.multiplicity import holm, t_p_value, tost
from normopt.report.stats.student_t import t_cdf, t_critical
from normopt.report.stats.summary import build_summary
from tests.test_report import by, write_cell

# ---------------------------------------------------------------------------- Holm, p, TOST


def test_holm_matches_a_hand_computation():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # untested members (None) are not counted in m: m = 2 here
    assert holm([0.02, None, 0.04]) == [pytest.approx(0.04), None, pytest.approx(0.04)]
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1


def test_p_value_is_the_dual_of_the_95_interval():
    """A contrast whose 95% t interval ends exactly at 0 has p = 0.05."""
    df, se = 3.4, 0.02
    value = t_critical(df) * se
    assert t_p_value(value, se, df) == pytest.approx(0.05, abs=1e-9)
    assert t_p_value(-value, se, df) == pytest.approx(0.05, abs=1e-9)
    assert t_p_value(0.0, se, df) == pytest.approx(1.0)
    assert t_p_value(0.1, None, None) is None


def test_tost_is_the_90_interval_inside_the_margin():
    # value 0.01, se 0.01, 10 df, margin 0.05: t = 6 and -4; p = max(P(T > 6), P(T < -4)) = P(T < -4)
    out = tost(0.01, 0.01, 10, 0.05)
    assert out["p"] == pytest.approx(t_cdf(-4.0, 10))
    assert out["equivalent"] and out["ci90"] == pytest.approx((0.01 - 1.8124611 * 0.01, 0.01 + 1.8124611 * 0.01))
    for value in (-0.06, -0.04, -0.02, 0.0, 0.02, 0.03, 0.04, 0.06):
        for se in (0.005, 0.01, 0.02):
            r = tost(value, se, 4.0, 0.05)
            inside = -0.05 < r["ci90"][0] and r["ci90"][1] < 0.05
            assert r["equivalent"] == inside, (value, se, r)
    assert tost(0.2, None, None, 0.05) is None


def test_dominant_variance_group_gets_welch_df_from_that_group():
    """One group's variance dominates: nu -> that group's n - 1 (here by hand)."""
    groups = [describe([3.0, 3.4]), describe([2.0, 2.001]), describe([2.5, 2.501]), describe([1.0, 1.001])]
    c = contrast(list(zip((1.0, -1.0, -1.0, 1.0), groups)))
    w = [g.std**2 / 2 for g in groups]
    nu = sum(w) ** 2 / sum(x * x / 1 for x in w)
    assert c.df == pytest.approx(nu) and 1.0 < c.df < 1.001
    assert c.ci95[1] - c.value == pytest.approx(t_critical(nu) * math.sqrt(sum(w)))


# ---------------------------------------------------------------------------- a grid


FINALS = {  # (variant, optim) -> seeds 0, 1
    ("rmsnorm", "adamw"): (3.00, 3.02),
    ("rmsnorm", "muon"): (2.90, 2.94),
    ("derf", "adamw"): (3.30, 3.34),
    ("derf", "muon"): (3.88, 3.90),
    ("dyt", "adamw"): (3.10, 3.14),
    ("dyt", "muon"): (3.00, 3.06),
}
DYT_ALPHA = {("adamw", 0): 3.20, ("adamw", 1): 3.22, ("muon", 0): 3.40, ("muon", 1): 3.44}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    for (norm, optim), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_cell(root, norm, optim, seed, final)
    for (optim, seed), final in DYT_ALPHA.items():  # Derf with DyT's alphas: an explicit arm
        write_cell(
            root,
            "derf",
            optim,
            seed,
            final,
            alpha=0.8,
            cell_json={
                "name": f"dyt_alpha-{optim}-s{seed}",
                "coords": {"norm": "derf", "optim": optim},
                "seed": seed,
                "arm": "dyt_alpha",
            },
        )
    write_cell(root, "derf", "muon", 2, 3.0, nan_at=60)  # diverged
    write_cell(root, "dyt", "adamw", 2, 5.0, last=50)  # stopped early
    axes = ReportAxes(factors={"dyt_alphas_on_derf": ("derf", "derf[dyt_alpha]")}, equivalence_margin=0.1)
    return build_summary(discover_cells(root), axes=axes)


def test_main_family_is_holm_adjusted_over_interactions_shares_and_factors(grid):
    family = grid["family"]
    members = [*grid["interactions"], *grid["factor_effects"]]
    shares = [r for r in grid["recoveries"] if r["interaction_share"] is not None]
    assert family["size"] == len(members) + len(shares) == 3 + 1 + 1  # derf, dyt, derf[dyt_alpha]; 1 factor; 1 share
    expected = holm([m["p"] for m in members] + [r["p"] for r in shares])
    got = [m["p_holm"] for m in members] + [r["interaction_share_p_holm"] for r in shares]
    assert got == pytest.approx(expected)
    assert all(g["family"] == "exploratory" for g in grid["gaps"])
    assert family["simultaneous_level"] == pytest.approx(1 - 0.05 / 5)
    inter = by(grid["interactions"], variant="derf", optim="muon")
    half = t_critical(inter["df"], 1 - 0.05 / 5) * inter["se"]
    assert inter["ci_simultaneous"] == pytest.approx((inter["value"] - half, inter["value"] + half))


def test_factor_effect_by_hand(grid):
    effect = by(grid["factor_effects"], factor="dyt_alphas_on_derf", optim="muon")
    mean = {k: sum(v) / 2 for k, v in FINALS.items()}
    with_muon, with_adamw = (3.40 + 3.44) / 2, (3.20 + 3.22) / 2
    expected = (with_muon - with_adamw) - (mean["derf", "muon"] - mean["derf", "adamw"])
    assert effect["value"] == pytest.approx(expected)  # -0.38: DyT's alphas remove most of Derf's interaction
    assert effect["ci95"][1] < 0 and effect["equivalence"]["margin"] == 0.1
    assert effect["paired"]["n_seeds"] == 2


def test_left_out_cells_are_counted_per_group_and_flag_their_contrasts(grid):
    counts = {(r["variant"], r["optim"]): r["flags"] for r in grid["left_out_by_group"]}
    assert counts == {("derf", "muon"): {"diverged": 1}, ("dyt", "adamw"): {"stopped_early": 1}}
    assert by(grid["interactions"], variant="derf", optim="muon")["left_out"] == [
        "derf/muon: 1 cell left out (1 diverged)"
    ]
    assert by(grid["interactions"], variant="dyt", optim="muon")["left_out"] == [
        "dyt/adamw: 1 cell left out (1 stopped_early)"
    ]
    assert by(grid["factor_effects"], factor="dyt_alphas_on_derf")["left_out"] == [
        "derf/muon: 1 cell left out (1 diverged)"
    ]
    assert by(grid["groups"], variant="derf", optim="muon")["left_out"] == {"diverged": 1}
    assert sorted(len(r["cells"]) for r in grid["left_out_by_group"]) == [1, 1]


def test_markdown_names_the_family_flags_and_the_carrier(grid):
    text = render_markdown(grid, {})
    assert "## The main family of comparisons" in text and "Holm" in text
    assert "exploratory" in text.lower()
    line = next(ln for ln in text.splitlines() if ln.startswith("- **derf × muon**"))
    assert "⚠" in line and "1 diverged" in line and "Holm p=" in line
    assert "## Cells left out, per group" in text and "2 cells left out, 1 of them diverged" in text
    assert "**Which factor carries the interaction**" in text


def test_no_penalty_needs_equivalence(tmp_path):
    """DyT x Muon with a tiny interaction: negligible only within a margin its 90% interval fits."""
    finals = {
        ("rmsnorm", "adamw"): (3.00, 3.01),
        ("rmsnorm", "muon"): (2.90, 2.91),
        ("dyt", "adamw"): (3.10, 3.11),
        ("dyt", "muon"): (3.00, 3.012),
    }
    for (norm, optim), pair in finals.items():
        for seed, final in enumerate(pair):
            write_cell(tmp_path, norm, optim, seed, final)
    cells = discover_cells(tmp_path)
    wide = by(build_summary(cells, axes=ReportAxes(equivalence_margin=0.1))["interactions"], variant="dyt")
    narrow = by(build_summary(cells, axes=ReportAxes(equivalence_margin=0.001))["interactions"], variant="dyt")
    assert wide["equivalence"]["equivalent"] and not narrow["equivalence"]["equivalent"]
    assert wide["ci95"][0] < 0 < wide["ci95"][1]


def test_report_block_validates_factors_and_margin():
    levels = {"model.norm": ["rmsnorm", "dyt", "derf"], "optim.name": ["adamw", "muon"]}
    axes = axes_from_levels(levels, {"factors": {"f": ["derf", "derf[dyt_alpha]"]}})
    assert axes.factors == {"f": ("derf", "derf[dyt_alpha]")}
    assert axes.equivalence_margin == DEFAULT_EQUIVALENCE_MARGIN
    assert axes_from_levels(levels, {"equivalence_margin": 0.02}).equivalence_margin == 0.02
    for bad in (
        {"factors": {"f": ["derf"]}},
        {"factors": {"f": ["layernorm", "derf"]}},
        {"factors": {"f": ["derf", "derf"]}},
        {"factors": ["derf"]},
        {"equivalence_margin": 0},
        {"equivalence_margin": "small"},
    ):
        with pytest.raises(UserError):
            axes_from_levels(levels, bad)
    for margin in (math.inf, -math.inf, math.nan):  # an infinite margin would call every contrast negligible
        with pytest.raises(UserError, match="report.equivalence_margin must be a positive finite number of nats"):
            axes_from_levels(levels, {"equivalence_margin": margin})


def test_a_factor_naming_an_arm_no_cell_has_is_refused(tmp_path, capsys):
    import json

    from normopt.cli import main

    for optim in ("adamw", "muon"):
        for norm in ("rmsnorm", "derf"):
            write_cell(tmp_path, norm, optim, 0, 3.0)
        write_cell(
            tmp_path,
            "derf",
            optim,
            0,
            3.1,
            alpha=0.8,
            cell_json={
                "name": f"dyt_alpha-{optim}-s0",
                "coords": {"norm": "derf", "optim": optim},
                "seed": 0,
                "arm": "dyt_alpha",
            },
        )
    axes = ReportAxes(factors={"f": ("derf", "derf[dyt_alhpa]")})
    with pytest.raises(
        UserError,
        match=r"report.factors.f: 'derf\[dyt_alhpa\]' names an arm 'dyt_alhpa' that no "
        r"cell has \(arms: dyt_alpha\)",
    ):
        build_summary(discover_cells(tmp_path), axes=axes)
    (tmp_path / "experiment.json").write_text(
        json.dumps(
            {
                "axes": {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"]},
                "report": {"factors": {"f": ["derf", "derf[nope]"]}},
            }
        )
    )
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "normopt: error: report.factors.f: 'derf[nope]' names an arm 'nope' that no cell has (arms: dyt_alpha)"
    ], err


@pytest.mark.parametrize("name", ["confounds_cpu.yaml", "confounds_gpu_124m.yaml"])
def test_confound_specs_name_factors_their_cells_have(name):
    """Every factor of the shipped confound specs names variants the spec's cells will have."""
    from normopt.config import REPO_ROOT
    from normopt.factorial.spec import load_spec
    from normopt.report.cells.cell_reading import variant_label

    spec, _, cells = load_spec(REPO_ROOT / "configs" / "factorial" / name)
    axes = axes_from_levels(spec["axes"], spec["report"])
    variants = {variant_label(c.settings["model.norm"], c.arm) for c in cells}
    assert len(axes.factors) == 6
    for without, with_ in axes.factors.values():
        assert {without, with_} <= variants, (without, with_, variants)


def test_coverage_simulation_measures_what_it_says():
    """benchmarks/interval_coverage.py runs the report's own estimators: an interaction's
    interval covers the truth at about its nominal rate (cheap: 400 reps, 3 seeds, equal
    spreads; binomial se ~1%), and Holm never rejects more often than the unadjusted tests."""
    import importlib.util
    import random
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "interval_coverage.py"
    spec = importlib.util.spec_from_file_location("interval_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    coverage = module.contrast_coverage(random.Random(0), 400, 3, [1.0] * 4, module.INTERACTION)
    assert 0.92 <= coverage <= 0.995
    raw, adjusted = module.family_error(random.Random(1), 200, 3)
    assert adjusted <= raw


def test_a_metrics_line_with_a_negative_step_is_refused_and_the_report_kept(tmp_path, capsys):
    import hashlib

    from normopt.cli import main

    for optim in ("adamw", "muon"):
        for seed, norm in enumerate(("rmsnorm", "derf")):
            write_cell(tmp_path, norm, optim, seed, 3.0 + seed)
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    damaged = tmp_path / "derf-muon-s1" / "metrics.jsonl"
    lines = damaged.read_text().splitlines()
    damaged.write_text("\n".join([lines[0], '{"step": -5, "loss": 1.0}', *lines[1:]]) + "\n")

    def digest():
        return {
            p.relative_to(tmp_path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp_path.rglob("*"))
            if p.is_file()
        }

    before = digest()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"normopt: error: {damaged}:2: unreadable metrics line (step -5 is negative)"], err
    assert digest() == before  # report.md, summary.json and the plots as they were


# ---------------------------------------------------------------------------- which way a lost cell pushes


def _write_metrics(folder, evals: dict[int, float]) -> None:
    """metrics.jsonl with an eval at step 0 and at each step of ``evals`` (a train line beside each)."""
    import json

    lines = [{"step": 0, "eval_loss": 9.0}]
    for step, value in sorted(evals.items()):
        lines += [{"step": step, "loss": value + 0.05}, {"step": step, "eval_loss": value}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_lost_diverged_cell_biases_each_contrast_by_the_sign_its_group_enters_with(tmp_path):
    """The baseline under Muon (coefficient −1 in the interaction and in Derf's gap under Muon)
    loses a seed that rose 1.5 nats (diverged): its mean over the survivors is lower than it
    trained, so both contrasts are biased high (overstated), not understated. Counting the lost
    cell (a divergence rule it passes) lowers both: the known answer for "high". Derf under Muon
    (coefficient +1) losing one instead biases them low."""
    for (norm, optim), pair in FINALS.items():
        if norm in ("rmsnorm", "derf"):
            for seed, final in enumerate(pair):
                write_cell(tmp_path, norm, optim, seed, final)
    lost = write_cell(tmp_path, "rmsnorm", "muon", 2, 3.0)
    _write_metrics(lost, {50: 3.0, 100: 4.5})  # 1.5 nats above its best: diverged at 1 nat
    cells = discover_cells(tmp_path)
    summary = build_summary(cells)
    inter = by(summary["interactions"], variant="derf", optim="muon")
    gap = by(summary["gaps"], variant="derf", optim="muon")
    assert inter["left_out"] == ["rmsnorm/muon: 1 cell left out (1 diverged)"]
    assert inter["left_out_bias"] == [
        {"estimate": "interaction", "direction": "high", "plus": [], "minus": ["rmsnorm/muon"]}
    ]
    assert gap["left_out_bias"][0]["direction"] == "high"
    assert by(summary["gaps"], variant="derf", optim="adamw")["left_out_bias"] == []
    counted = build_summary(cells, divergence_nats=10.0)  # the same cell, counted
    assert by(counted["interactions"], variant="derf", optim="muon")["value"] < inter["value"]
    assert by(counted["gaps"], variant="derf", optim="muon")["value"] < gap["value"]
    text = render_markdown(summary, {})
    line = next(ln for ln in text.splitlines() if ln.startswith("- **derf × muon**"))
    assert "the interaction is biased high, a positive value overstated: rmsnorm/muon (entering with −)" in line
    assert "understated" not in line
    assert (
        "- interaction derf × muon − adamw: the interaction is biased high, a positive value overstated: "
        "rmsnorm/muon (entering with −)"
    ) in text

    write_cell(tmp_path, "derf", "muon", 2, 3.9, nan_at=60)  # Derf under Muon (+1) loses one too: both ways
    both = by(build_summary(discover_cells(tmp_path))["interactions"], variant="derf", optim="muon")
    assert both["left_out_bias"] == [
        {"estimate": "interaction", "direction": "unknown", "plus": ["derf/muon"], "minus": ["rmsnorm/muon"]}
    ]
    shutil.rmtree(lost)  # only Derf under Muon's loss is left: biased low
    low = by(build_summary(discover_cells(tmp_path))["interactions"], variant="derf", optim="muon")
    assert low["left_out_bias"] == [{"estimate": "interaction", "direction": "low", "plus": ["derf/muon"], "minus": []}]


def test_a_recovery_share_is_biased_by_the_sign_of_a_minus_b_times_r(tmp_path):
    """share of the gap R = (L[derf] − L[ema]) / (L[derf] − L[rms]) under Muon: the fix losing a
    diverged seed lowers L[ema], which raises R (dR/dL[ema] = −1/D < 0): biased high."""
    for optim in ("adamw", "muon"):
        for seed, (rms, derf, ema) in enumerate([(3.0, 3.5, 3.1), (3.02, 3.52, 3.12)]):
            write_cell(tmp_path, "rmsnorm", optim, seed, rms)
            write_cell(tmp_path, "derf", optim, seed, derf + (0.4 if optim == "muon" else 0.0))
            write_cell(tmp_path, "derf_ema", optim, seed, ema)
    write_cell(tmp_path, "derf_ema", "muon", 2, 3.1, nan_at=60)
    r = by(build_summary(discover_cells(tmp_path))["recoveries"], fix="derf_ema", optim="muon")
    assert r["left_out"] == ["derf_ema/muon: 1 cell left out (1 diverged)"]
    assert {b["estimate"]: b["direction"] for b in r["left_out_bias"]} == {
        "share of the gap": "high",
        "share of the interaction": "high",
    }


def test_one_cell_with_two_flags_reads_as_one_cell(tmp_path):
    """A cell that diverged at step 60 and logged nothing after is one cell with two flags."""
    for (norm, optim), pair in FINALS.items():
        if norm in ("rmsnorm", "derf"):
            for seed, final in enumerate(pair):
                write_cell(tmp_path, norm, optim, seed, final)
    write_cell(tmp_path, "derf", "muon", 2, 3.0, nan_at=60, last=60)
    summary = build_summary(discover_cells(tmp_path))
    assert by(summary["cells"], name="derf-muon-s2")["flags"] == ["diverged", "stopped_early"]
    (group,) = summary["left_out_by_group"]
    assert group["flags"] == {"diverged": 1, "stopped_early": 1}
    assert group["by_flags"] == {"diverged + stopped_early": 1}
    assert by(summary["interactions"], variant="derf")["left_out"] == [
        "derf/muon: 1 cell left out (1 diverged + stopped_early)"
    ]
    text = render_markdown(summary, {})
    assert "1 cell left out, 1 of them diverged" in text
    assert "| — | derf | muon | 1 diverged + stopped_early | derf-muon-s2 |" in text
    assert "1 diverged, 1 stopped_early" not in text


def test_a_stopped_cell_implies_no_direction(tmp_path):
    for (norm, optim), pair in FINALS.items():
        if norm in ("rmsnorm", "derf"):
            for seed, final in enumerate(pair):
                write_cell(tmp_path, norm, optim, seed, final)
    write_cell(tmp_path, "rmsnorm", "muon", 2, 2.5, last=50)
    summary = build_summary(discover_cells(tmp_path))
    inter = by(summary["interactions"], variant="derf")
    assert inter["left_out"] == ["rmsnorm/muon: 1 cell left out (1 stopped_early)"] and inter["left_out_bias"] == []
    line = next(ln for ln in render_markdown(summary, {}).splitlines() if ln.startswith("- **derf × muon**"))
    assert "no direction implied" in line and "biased" not in line


def test_an_interaction_of_exactly_zero_reads_as_the_same_gap(tmp_path):
    """Means 3.0, 2.5, 3.5, 3.0 (exact in binary): interaction 3.0 − 2.5 − 3.5 + 3.0 = 0."""
    finals = {
        ("rmsnorm", "adamw"): (2.75, 3.25),
        ("rmsnorm", "muon"): (2.25, 2.75),
        ("derf", "adamw"): (3.25, 3.75),
        ("derf", "muon"): (2.75, 3.25),
    }
    for (norm, optim), pair in finals.items():
        for seed, final in enumerate(pair):
            write_cell(tmp_path, norm, optim, seed, final)
    summary = build_summary(discover_cells(tmp_path))
    assert by(summary["interactions"], variant="derf")["value"] == 0.0
    line = next(ln for ln in render_markdown(summary, {}).splitlines() if ln.startswith("- **derf × muon**"))
    assert "interaction +0.000 nats" in line
    assert "is the same under muon as under adamw (to the 0.001 nats shown)" in line
    assert "smaller" not in line and "larger" not in line


def test_factor_carriers_name_their_optimizer(tmp_path):
    """One factor, two non-reference optimizers: its effect is −0.40 under Muon and −0.30 under
    NorMuon (by construction), and the carriers line says which number belongs to which."""
    base = {"adamw": 3.0, "muon": 2.9, "normuon": 2.95}
    derf_extra = {"adamw": 0.3, "muon": 0.9, "normuon": 0.8}
    arm_extra = {"adamw": 0.3, "muon": 0.5, "normuon": 0.5}  # effect = (0.5 − 0.3) − (extra − 0.3)
    for optim in base:
        for seed, noise in enumerate((-0.005, 0.005)):
            write_cell(tmp_path, "rmsnorm", optim, seed, base[optim] + noise)
            write_cell(tmp_path, "derf", optim, seed, base[optim] + derf_extra[optim] + noise)
            write_cell(
                tmp_path,
                "derf",
                optim,
                seed,
                base[optim] + arm_extra[optim] + noise,
                alpha=0.8,
                cell_json={
                    "name": f"arm-{optim}-s{seed}",
                    "coords": {"norm": "derf", "optim": optim},
                    "seed": seed,
                    "arm": "dyt_alpha",
                },
            )
    axes = ReportAxes(factors={"alphas": ("derf", "derf[dyt_alpha]")}, order={"optim.name": tuple(base)})
    summary = build_summary(discover_cells(tmp_path), axes=axes)
    assert by(summary["factor_effects"], optim="muon")["value"] == pytest.approx(-0.4)
    assert by(summary["factor_effects"], optim="normuon")["value"] == pytest.approx(-0.3)
    text = render_markdown(summary, {})
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Which factor carries the interaction**"))
    assert (
        "switching alphas under muon (effect on the muon − adamw interaction -0.400 nats), alphas under "
        "normuon (effect on the normuon − adamw interaction -0.300 nats) changes it"
    ) in line
