"""normopt report: statistics over synthetic factorial cells, checked against hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from normopt.config import Config
from normopt.errors import UserError
from normopt.report.cells.cell_assessment import assess_cell, divergence_reason
from normopt.report.cells.cell_reading import Metrics, discover_cells, read_metrics
from normopt.report.plots import losses
from normopt.report.render.notes import collapse_notes
from normopt.report.stats.contrasts import describe
from normopt.report.stats.smoothing import centred_half_width, centred_smooth, ema_smooth
from normopt.report.stats.summary import build_summary
from normopt.report.writer import report_main, write_report

T1 = 12.706204736174698  # two-sided 95% t quantile, 1 degree of freedom (tables)


def t95_by_integration(df: float) -> float:
    """The 97.5% t quantile found independently of normopt's incomplete beta: bisection on
    Simpson's rule over the density from 0 (P(0 < T < t) = 0.475)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def mass(t: float, n: int = 4000) -> float:
        h = t / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 60.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


STEPS = 100

# final eval losses of the included cells, seeds 0 and 1 (the published pattern: Derf trails
# RMSNorm by 0.31 under AdamW and 0.97 under Muon; derf_ema and alpha 0.3 close most of it)
FINALS = {
    ("rmsnorm", "adamw"): (3.00, 3.02),
    ("rmsnorm", "muon"): (2.90, 2.94),
    ("derf", "adamw"): (3.30, 3.34),
    ("derf", "muon"): (3.88, 3.90),
    ("dyt", "adamw"): (3.10, 3.14),
    ("dyt", "muon"): (3.20, 3.22),
    ("derf_ema", "adamw"): (3.05, 3.07),
    ("derf_ema", "muon"): (3.06, 3.08),
}
ALPHA_ARM = "derf[alpha_init_attn=0.3,alpha_init_ffn=0.3,alpha_init_final=0.3]"


def write_config(folder: Path, norm: str, optim: str, seed: int, alpha: float = 0.5) -> None:
    cfg = Config().to_dict()
    cfg["run"]["dir"] = str(folder)
    cfg["model"]["norm"] = norm
    cfg["optim"]["name"] = optim
    cfg["train"]["seed"] = seed
    cfg["train"]["steps"] = STEPS
    for where in ("attn", "ffn", "final"):
        cfg["model"][f"alpha_init_{where}"] = alpha
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def metrics_lines(final: float, last: int = STEPS, nan_at: int | None = None) -> list[str]:
    """Eval at 0, 50 and 100; train every 10 steps, falling towards ``final`` (never diverging)."""
    lines = [json.dumps({"step": 0, "eval_loss": 9.0})]
    for step in range(10, last + 1, 10):
        loss = "nan" if step == nan_at else final + 0.05 + 5 * math.exp(-step / 15)
        lines.append(
            json.dumps(
                {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens": step * 4096, "tokens_per_s": 1e4}
            )
        )
        if step in (50, STEPS):
            eval_loss = "nan" if nan_at is not None and step == STEPS else final + (0.2 if step == 50 else 0.0)
            lines.append(json.dumps({"step": step, "eval_loss": eval_loss}))
    return lines


def write_cell(
    root: Path,
    norm: str,
    optim: str,
    seed: int,
    final: float | None,
    *,
    alpha: float = 0.5,
    last: int = STEPS,
    nan_at: int | None = None,
    cell_json: dict | None = None,
) -> Path:
    folder = root / f"{norm}{'-a' + str(alpha) if alpha != 0.5 else ''}-{optim}-s{seed}"
    write_config(folder, norm, optim, seed, alpha)
    if cell_json is not None:
        (folder / "cell.json").write_text(json.dumps(cell_json))
    if final is not None:
        (folder / "metrics.jsonl").write_text("\n".join(metrics_lines(final, last, nan_at)) + "\n")
    return folder


def build_factorial(root: Path) -> Path:
    for (norm, optim), finals in FINALS.items():
        for seed, final in enumerate(finals):
            # derf_ema cells carry a runner's cell.json (coordinates and an explicit base arm)
            info = (
                {
                    "name": f"derf_ema-{optim}-s{seed}",
                    "coords": {"norm": norm, "optim": optim},
                    "seed": seed,
                    "arm": None,
                }
                if norm == "derf_ema"
                else None
            )
            write_cell(root, norm, optim, seed, final, cell_json=info)
    for seed, final in enumerate((3.10, 3.12)):  # Derf alpha 0.3 under Muon only: an inferred arm
        write_cell(root, "derf", "muon", seed, final, alpha=0.3)
    # flagged seed-2 cells, with values that would move the means if they were counted
    write_cell(root, "rmsnorm", "adamw", 2, None)  # missing: config.yaml only
    write_cell(root, "derf", "muon", 2, 3.0, nan_at=60)  # diverged: NaN loss
    write_cell(root, "dyt", "adamw", 2, 5.0, last=50)  # stopped early at step 50 of 100
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = build_factorial(tmp_path_factory.mktemp("factorial"))
    return root, write_report(root)


def by(items, **keys):
    found = [item for item in items if all(item[k] == v for k, v in keys.items())]
    assert len(found) == 1, (keys, found)
    return found[0]


def sample_std(a: float, b: float) -> float:
    return abs(a - b) / math.sqrt(2)  # sqrt(((a-m)^2 + (b-m)^2) / (2-1)) for two values


def var_of_mean(pair) -> float:
    return sample_std(*pair) ** 2 / 2


# --------------------------------------------------------------------------- statistics


def test_group_means_and_sample_std(report):
    _, summary = report
    for (norm, optim), pair in FINALS.items():
        group = by(summary["groups"], variant=norm, optim=optim)
        assert group["n"] == 2 and group["seeds"] == [0, 1]
        assert group["mean"] == pytest.approx(sum(pair) / 2)
        assert group["std"] == pytest.approx(sample_std(*pair))
    assert by(summary["groups"], variant="rmsnorm", optim="adamw")["std"] == pytest.approx(0.0141421356)


def test_gaps_with_welch_standard_error(report):
    _, summary = report
    gap = by(summary["gaps"], variant="derf", optim="adamw")
    assert gap["value"] == pytest.approx(3.32 - 3.01)
    assert gap["se"] == pytest.approx(math.sqrt(0.0008 / 2 + 0.0002 / 2))  # s^2 = 0.04^2/2, 0.02^2/2
    # Welch-Satterthwaite: (4e-4 + 1e-4)^2 / ((4e-4)^2 / 1 + (1e-4)^2 / 1) = 1.4706 degrees of freedom
    assert gap["df"] == pytest.approx(2.5e-7 / 1.7e-7)
    t = t95_by_integration(gap["df"])
    assert gap["ci95"] == pytest.approx([0.31 - t * gap["se"], 0.31 + t * gap["se"]], rel=1e-5)
    assert by(summary["gaps"], variant="derf", optim="muon")["value"] == pytest.approx(0.97)
    assert by(summary["gaps"], variant="dyt", optim="muon")["value"] == pytest.approx(0.29)
    assert not [g for g in summary["gaps"] if g["variant"] == "rmsnorm"]


def test_interaction_and_its_intervals(report):
    _, summary = report
    item = by(summary["interactions"], variant="derf", optim="muon")
    assert item["reference_optim"] == "adamw"
    assert item["value"] == pytest.approx(0.97 - 0.31)  # 0.66 nats
    # four independent means: var = sum s^2/n = (0.0001 + 0.0004 + 0.0004 + 0.0001) / 1
    se = math.sqrt(
        sum(
            var_of_mean(FINALS[k])
            for k in [("derf", "muon"), ("rmsnorm", "muon"), ("derf", "adamw"), ("rmsnorm", "adamw")]
        )
    )
    assert se == pytest.approx(math.sqrt(0.001))
    assert item["se"] == pytest.approx(se)
    # Welch-Satterthwaite over four groups of 2: 0.001^2 / (1e-8 + 1.6e-7 + 1.6e-7 + 1e-8) = 2.94 df
    assert item["df"] == pytest.approx(1e-6 / 3.4e-7)
    t = t95_by_integration(item["df"])
    assert item["ci95"] == pytest.approx([0.66 - t * se, 0.66 + t * se], rel=1e-5)
    # paired per seed: s0 = 3.88-2.90-3.30+3.00 = 0.68, s1 = 3.90-2.94-3.34+3.02 = 0.64
    paired = item["paired"]
    assert paired["n_seeds"] == 2
    assert paired["per_seed"] == pytest.approx({"0": 0.68, "1": 0.64})
    assert paired["value"] == pytest.approx(0.66)
    assert paired["se"] == pytest.approx(0.02)  # stdev(0.68, 0.64) / sqrt(2)
    assert paired["df"] == 1
    assert paired["ci95"] == pytest.approx([0.66 - T1 * 0.02, 0.66 + T1 * 0.02])
    assert by(summary["interactions"], variant="dyt", optim="muon")["value"] == pytest.approx(0.29 - 0.11)
    assert not [i for i in summary["interactions"] if i["optim"] == "adamw"]


def test_fix_recovery_share(report):
    _, summary = report
    ema = by(summary["recoveries"], fix="derf_ema", optim="muon")
    assert ema["base_norm"] == "derf"
    assert ema["gap_base"] == pytest.approx(0.97) and ema["gap_fix"] == pytest.approx(0.15)
    assert ema["share"] == pytest.approx((0.97 - 0.15) / 0.97)  # 84.5%
    # Fieller over a = L[derf], b = L[rmsnorm], c = L[derf_ema] under Muon, variances of the
    # means 1e-4, 4e-4, 1e-4: N = a - c, D = a - b, var N = 2e-4, var D = 5e-4, cov = 1e-4;
    # df = Welch for N - R D = (1 - R) a + R b - c at R = share
    r = ema["share"]
    w = [(1 - r) ** 2 * 1e-4, r**2 * 4e-4, 1e-4]
    df = sum(w) ** 2 / sum(x * x for x in w)
    assert ema["df"] == pytest.approx(df)
    t2 = t95_by_integration(df) ** 2
    n, d = 3.89 - 3.07, 3.89 - 2.92
    A, B, C = d * d - t2 * 5e-4, n * d - t2 * 1e-4, n * n - t2 * 2e-4
    roots = sorted([(B - math.sqrt(B * B - A * C)) / A, (B + math.sqrt(B * B - A * C)) / A])
    assert ema["ci95"] == pytest.approx(roots, rel=1e-5)
    assert roots[0] < r < roots[1]
    # share of the interaction: gain / ((a - b) - (L[derf, adamw] - L[rmsnorm, adamw]))
    assert ema["interaction"] == pytest.approx(0.66)
    assert ema["interaction_share"] == pytest.approx(0.82 / 0.66)
    assert ema["paired"]["n_seeds"] == 2 and ema["paired"]["value"] == pytest.approx(r)
    alpha = by(summary["recoveries"], fix=ALPHA_ARM, optim="muon")
    assert alpha["base_norm"] == "derf"
    assert alpha["share"] == pytest.approx((3.89 - 3.11) / 0.97)  # 80.4%
    assert {r["optim"] for r in summary["recoveries"]} == {"muon"}  # only non-reference optimizers


def test_arm_is_inferred_from_config_differences(report):
    _, summary = report
    arm_cells = [c for c in summary["cells"] if c["variant"] == ALPHA_ARM]
    assert len(arm_cells) == 2 and all(c["norm"] == "derf" and c["fix_of"] == "derf" for c in arm_cells)
    # the arm's cells stay out of the base derf group, whose mean is 3.89
    assert by(summary["groups"], variant="derf", optim="muon")["cells"] == ["derf-muon-s0", "derf-muon-s1"]
    assert by(summary["groups"], variant=ALPHA_ARM, optim="muon")["mean"] == pytest.approx(3.11)
    # no AdamW cells for the arm: no interaction, and a note says why
    assert not [i for i in summary["interactions"] if i["variant"] == ALPHA_ARM]
    assert f"interaction {ALPHA_ARM} x muon: not computable (no usable cells in {ALPHA_ARM}/adamw)" in summary["notes"]
    assert by(summary["cells"], name="derf_ema-muon-s0")["arm"] is None  # from cell.json


def test_flagged_cells_are_left_out(report):
    _, summary = report
    missing = by(summary["cells"], name="rmsnorm-adamw-s2")
    diverged = by(summary["cells"], name="derf-muon-s2")
    early = by(summary["cells"], name="dyt-adamw-s2")
    assert missing["flags"] == ["missing"] and missing["final_eval_loss"] is None
    assert diverged["flags"] == ["diverged"] and "loss was nan at step 60" in diverged["reasons"][0]
    assert early["flags"] == ["stopped_early"] and early["last_step"] == 50 and early["steps"] == STEPS
    assert not (missing["included"] or diverged["included"] or early["included"])
    flagged = {c["name"] for c in summary["cells"] if c["flags"]}
    assert flagged == {"rmsnorm-adamw-s2", "derf-muon-s2", "dyt-adamw-s2"}
    for name in flagged:
        assert any(note.startswith(f"{name} left out:") for note in summary["notes"])
    # their seed-2 values are not in the groups (means were checked against seeds 0 and 1 only)
    assert all(2 not in g["seeds"] for g in summary["groups"])


def test_files_written(report):
    root, _ = report
    for name in ("report.md", "summary.json", "loss_curves.png", "final_eval_loss.png", "gaps.png"):
        assert (root / name).is_file(), name
    for png in ("loss_curves.png", "final_eval_loss.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((root / "summary.json").read_text())  # strict JSON: NaN written as "nan"
    assert by(on_disk["interactions"], variant="derf", optim="muon")["value"] == pytest.approx(0.66)
    assert by(on_disk["cells"], name="derf-muon-s2")["flags"] == ["diverged"]
    text = (root / "report.md").read_text()
    assert "![loss_curves](loss_curves.png)" in text and "![final_eval_loss](final_eval_loss.png)" in text
    assert "| derf | muon − adamw | +0.6600 |" in text
    assert "stopped_early" in text and "diverged" in text and "missing" in text
    assert "84.5%" in text and "80.4%" in text


def test_cli_prints_table_and_paths(report, tmp_path, capsys):
    root, _ = report
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out), "--smoothing", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "3.0100 ± 0.0141 (n=2)" in printed and "+0.3100 [+0.1716, +0.4484]" in printed
    assert (
        printed.startswith("- **dyt × muon**: interaction +0.180 nats")
        and "**derf × muon**: interaction +0.660" in printed
    )
    assert f"wrote {out / 'report.md'}" in printed and f"wrote {out / 'summary.json'}" in printed
    assert json.loads((out / "summary.json").read_text())["settings"]["smoothing"] == 0.5


# --------------------------------------------------------------------------- small pieces


def test_one_seed_gives_no_interval(tmp_path):
    for (norm, optim), (final, _) in FINALS.items():
        if norm in ("rmsnorm", "derf"):
            write_cell(tmp_path, norm, optim, 0, final)
    write_cell(tmp_path, "derf", "muon", 1, 3.90)
    summary = build_summary(discover_cells(tmp_path))
    gap = by(summary["gaps"], variant="derf", optim="muon")
    assert gap["value"] == pytest.approx(3.89 - 2.90) and gap["se"] is None and gap["ci95"] is None
    item = by(summary["interactions"], variant="derf", optim="muon")
    assert item["value"] == pytest.approx(3.89 - 2.90 - 3.30 + 3.00) and item["ci95"] is None
    assert item["paired"]["n_seeds"] == 1 and item["paired"]["se"] is None  # only seed 0 is in all four
    one_seed = [note for note in summary["notes"] if "without an interval" in note]
    assert len(one_seed) == 1 and summary["notes"][0] == one_seed[0]  # one sentence, first
    assert "1 seed in" in one_seed[0] and "derf/adamw" in one_seed[0] and "derf/muon" not in one_seed[0]


def test_explicit_arm_from_cell_json_wins(tmp_path):
    for optim in ("adamw", "muon"):
        write_cell(tmp_path, "rmsnorm", optim, 0, 3.0)
        write_cell(tmp_path, "derf", optim, 0, 3.3)
    write_cell(
        tmp_path,
        "derf",
        "muon",
        1,
        3.1,
        alpha=0.3,
        cell_json={"name": "a03", "coords": {"model.norm": "derf", "optim.name": "muon"}, "seed": 1, "arm": "alpha0.3"},
    )
    summary = build_summary(discover_cells(tmp_path), fixes={})
    cell = by(summary["cells"], name="a03")
    assert cell["variant"] == "derf[alpha0.3]" and cell["fix_of"] == "derf"
    assert by(summary["recoveries"], fix="derf[alpha0.3]")["share"] == pytest.approx((3.3 - 3.1) / 0.3)


def test_unplaced_cell_still_gives_a_report(tmp_path):
    folder = tmp_path / "mystery"
    folder.mkdir()
    (folder / "cell.json").write_text(json.dumps({"coords": {}, "seed": 0}))
    (folder / "metrics.jsonl").write_text("\n".join(metrics_lines(3.0)) + "\n")
    summary = write_report(tmp_path)
    assert summary["cells"][0]["flags"] == ["unplaced"] and summary["groups"] == []
    assert any(note.startswith("no rmsnorm cells") for note in summary["notes"])
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss_curves.png").is_file()


def test_divergence_rule():
    def metrics(train, evals=((0, 9.0),)):
        return Metrics(tuple(enumerate(train, 1)), tuple(evals), len(train))

    assert divergence_reason(metrics([9.0, 5.0, 4.0, 3.5, 4.4])) is None  # 0.9 nats above the best
    assert "1.50 nats above its best 3.500" in divergence_reason(metrics([9.0, 5.0, 4.0, 3.5, 5.0]))
    assert "inf" in divergence_reason(metrics([9.0, float("inf"), 4.0]))
    assert "eval_loss" in divergence_reason(metrics([9.0, 4.0], [(0, 9.0), (1, 3.5), (2, 4.6)]))


def test_exit_status_3_marks_divergence(tmp_path):
    write_cell(
        tmp_path,
        "derf",
        "muon",
        0,
        3.5,
        last=40,
        cell_json={"coords": {"norm": "derf", "optim": "muon"}, "seed": 0, "exit_code": 3},
    )
    assessment = assess_cell(discover_cells(tmp_path)[0])
    # the trainer stops before logging the NaN: only the exit status tells (no eval after step 0 yet)
    assert assessment.flags == ("missing", "diverged", "stopped_early")
    assert "exit status 3" in assessment.reasons[1]


def test_read_metrics_strings_duplicates_and_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 0, "eval_loss": 9.0}\n{"step": 10, "loss": 5.0}\n{"step": 10, "loss": 4.0}\n'
        '{"step": 20, "loss": "-inf"}\n{"step": 20, "eval_'
    )
    m = read_metrics(path)
    assert m.train[0] == (10, 4.0) and m.train[1][1] == float("-inf")
    assert m.evals == ((0, 9.0),) and m.last_step == 20 and m.partial_last_line
    path.write_text('{"step": 0, "eval_loss": 9.0}\nnot json\n{"step": 10, "loss": 5.0}\n')
    with pytest.raises(UserError, match="metrics.jsonl:2: unreadable"):
        read_metrics(path)


def test_describe_and_smoothing():
    stats = describe([1.0, 2.0, 4.0], [0, 1, 2])
    assert stats.mean == pytest.approx(7 / 3) and stats.std == pytest.approx(math.sqrt((16 + 1 + 25) / 9 / 2))
    assert describe([3.0]).std is None
    # debiased EMA = weighted mean with weights beta^(t-i): (0.5*1 + 2) / 1.5, (0.25*1 + 0.5*2 + 3) / 1.75
    assert ema_smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 2.5 / 1.5, 4.25 / 1.75])
    assert ema_smooth([4.0, 2.0], 0.0) == [4.0, 2.0]


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        write_report(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no cells found"):
        write_report(tmp_path)
    run_dir = write_cell(tmp_path / "single", "rmsnorm", "adamw", 0, 3.0)
    with pytest.raises(UserError, match="single run directory"):
        write_report(run_dir)
    (run_dir / "metrics.jsonl").write_text("[1, 2]\n{}\n")
    with pytest.raises(UserError, match="unreadable metrics line"):
        write_report(tmp_path / "single")


def test_cells_that_learned_no_context_are_flagged(tmp_path):
    """Eval lines carry the unigram entropy of the training tokens; a cell whose final loss
    is not 0.1 nats below it is flagged (kept in the statistics) and named in one note and
    in the report's answer."""
    for (norm, optim), (final, _) in FINALS.items():
        folder = write_cell(tmp_path, norm, optim, 0, final)
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for record in lines:
            if "eval_loss" in record:
                record["unigram_entropy"] = 3.35  # derf/muon (3.88) above, derf/adamw (3.30) within 0.1
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    summary = write_report(tmp_path)
    flagged = {c["name"] for c in summary["cells"] if c["learned_no_context"]}
    assert flagged == {"derf-muon-s0", "derf-adamw-s0"}
    assert by(summary["cells"], name="rmsnorm-adamw-s0")["unigram_entropy"] == 3.35
    assert by(summary["groups"], variant="derf", optim="muon")["n"] == 1  # kept in the statistics
    notes = [n for n in summary["notes"] if "learned almost no context" in n]
    assert len(notes) == 1 and "2 of 8 cells" in notes[0]
    report = (tmp_path / "report.md").read_text()
    answer = report.split("## Answer", 1)[1].split("##", 1)[0]
    assert "**Caution**: 2 of 8 cells learned almost no context" in answer
    assert "+0.530 (learned no context)" in report  # 3.88 - 3.35 in the cell table


def test_no_interaction_share_without_an_interaction_penalty(tmp_path):
    """When the norm's gap is smaller under the optimizer than under the reference, there is
    no penalty to recover: no interaction share is reported, and a note says why."""
    finals = {**FINALS, ("derf", "adamw"): (3.90, 3.94)}  # gap 0.91 under AdamW
    finals[("derf", "muon")] = (3.50, 3.52)  # gap 0.59 under Muon: interaction -0.33
    for (norm, optim), pair in finals.items():
        for seed, final in enumerate(pair):
            write_cell(tmp_path, norm, optim, seed, final)
    summary = build_summary(discover_cells(tmp_path))
    ema = by(summary["recoveries"], fix="derf_ema", optim="muon")
    assert ema["interaction"] == pytest.approx(0.59 - 0.91)
    assert ema["interaction_share"] is None and ema["interaction_ci95"] is None
    assert ema["share"] is not None  # the share of the gap is still reported
    assert any("no interaction penalty under muon" in note for note in summary["notes"])


# --------------------------------------------------------------------------- plots and report that cannot mislead


def drawn_figures(monkeypatch) -> list:
    """Every Figure the plot functions create, kept for inspection."""
    made = []

    def keep(**kwargs):
        made.append(figure(**kwargs))
        return made[-1]

    figure = losses.figure
    monkeypatch.setattr(losses, "figure", keep)
    return made


def test_centred_smoothing_has_no_lag():
    line = [10.0 - 0.1 * t for t in range(200)]  # a falling straight line: a centred mean is exact
    assert centred_smooth(line, 9) == pytest.approx(line)
    assert all(a > b for a, b in zip(ema_smooth(line, 0.9)[1:], line[1:]))  # the trailing EMA lags above
    assert centred_half_width(0.9) == 9 and centred_half_width(0.0) == 0
    assert centred_smooth([5.0, 1.0, 3.0], 9) == [5.0, 1.0, 3.0]  # a tenth of 3 points: no window
    noisy = [1.0, 3.0] * 50
    assert centred_smooth(noisy, 2)[10] == pytest.approx(sum(noisy[8:13]) / 5)


def test_loss_curves_show_logged_points_units_and_styles(report, monkeypatch, tmp_path):
    root, summary = report
    made = drawn_figures(monkeypatch)
    losses.plot_loss_curves(discover_cells(root), summary, tmp_path / "curves.png", 0.9)
    (fig,) = made
    assert "centred mean" in fig._suptitle.get_text() and "no lag" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "loss (nats)" and ax.get_xlabel() == "step"
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 10]  # train: 10 logged points
    logged = [line for line in lines if line.get_linewidth() < 0.5]
    assert logged and all(line.get_marker() == "." for line in logged)
    smoothed = [line for line in lines if line.get_linewidth() == 1.0]
    assert len({line.get_marker() for line in smoothed}) > 1  # not told apart by color alone
    assert len({str(line.get_linestyle()) for line in smoothed}) > 1  # seeds differ in line style


def test_one_seed_group_has_no_error_bar(tmp_path, monkeypatch):
    for norm in ("rmsnorm", "derf"):
        write_cell(tmp_path, norm, "adamw", 0, 3.0 if norm == "rmsnorm" else 3.3)
    summary = build_summary(discover_cells(tmp_path))
    made = drawn_figures(monkeypatch)
    losses.plot_final_losses(summary, tmp_path / "final.png")
    losses.plot_gaps(summary, tmp_path / "gaps.png")
    for fig in made:
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert texts and all(t == "1 seed:\nno interval" for t in texts)
    final_ax = made[0].axes[0]
    assert not final_ax.containers  # no errorbar container: no bar drawn


def test_report_opens_with_the_setup(report):
    root, summary = report
    setup = summary["setup"]
    assert setup["steps"] == [STEPS] and setup["tokens"] == [STEPS * 16 * 256]
    assert setup["data"] == ["built-in corpus"] and setup["seeds"] == [0, 1, 2]
    assert setup["parameters_from"] == ["config.yaml"] and all(4e6 < n < 5e6 for n in setup["parameters"])
    assert setup["normopt"]["version"] or setup["normopt"]["commit"]
    assert json.loads((root / "summary.json").read_text())["setup"]["tokens"] == [409600]
    text = (root / "report.md").read_text()
    head = text.split("## Answer")[0]
    assert "parameters (from config.yaml)" in head
    assert "100 steps × 16 sequences × 256 tokens = 410k training tokens" in head
    assert "built-in corpus" in head and "seeds**: 0 / 1 / 2" in head and "normopt" in head.split("# normopt")[1]
    assert text.index("## Answer") < text.index("## Final eval loss")


def test_repeated_notes_collapse_into_one_line():
    names = ["a-s1", "a-s10", "b-s1"]
    notes = [
        "first",
        "a-s1: skipped an unterminated last line of metrics.jsonl",
        "a-s10 left out: diverged: exit status 3",
        "b-s1 left out: diverged: exit status 3",
        "a-s10: skipped an unterminated last line of metrics.jsonl",
        "b-s1: something else",
    ]
    assert collapse_notes(notes, names) == [
        "first",
        "skipped an unterminated last line of metrics.jsonl — 2 cells: a-s1, a-s10",
        "left out: diverged: exit status 3 — 2 cells: a-s10, b-s1",
        "b-s1: something else",
    ]
    assert collapse_notes(["a-s1 left out: missing: no metrics.jsonl"], names) == [
        "a-s1 left out: missing: no metrics.jsonl"
    ]
