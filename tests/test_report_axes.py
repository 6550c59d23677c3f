"""normopt report over axes other than norm x optimizer, strata, and the head/tail split by token
frequency: synthetic cells with known losses, statistics recomputed here by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from normopt.config import Config
from normopt.errors import UserError
from normopt.report.cells.axes import (
    ReportAxes,
    axes_from_levels,
    infer_axes,
    read_experiment_file,
    write_experiment_file,
)
from normopt.report.cells.cell_reading import discover_cells
from normopt.report.stats.student_t import t_quantile
from normopt.report.writer import report_main, write_report
from tests.test_report import metrics_lines, t95_by_integration

STEPS = 100
MUON_PARAMS = "optim.muon_params"


def write_cell(
    root: Path, settings: dict, seed: int, final: float, coords: dict, buckets: list[float] | None = None
) -> Path:
    """One finished cell: config.yaml with ``settings`` (dotted keys), cell.json with
    ``coords``, metrics ending at ``final``, and optionally a tail_tokens record."""
    name = "-".join(str(v) for v in coords.values()) + f"-s{seed}"
    folder = root / name
    folder.mkdir(parents=True)
    cfg = Config().to_dict()
    cfg["train"]["steps"], cfg["train"]["seed"] = STEPS, seed
    for key, value in settings.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (folder / "cell.json").write_text(json.dumps({"name": name, "coords": coords, "seed": seed, "arm": None}))
    (folder / "metrics.jsonl").write_text("\n".join(metrics_lines(final)) + "\n")
    if buckets is not None:
        record = {
            "step": STEPS,
            "kind": "tail_tokens",
            "bucket_loss": buckets,
            "bucket_token_share": [1 / len(buckets)] * len(buckets),
            "bucket_vocab_size": [5] * len(buckets),
        }
        (folder / "diagnostics.jsonl").write_text(json.dumps(record) + "\n")
    return folder


# component ablation: Muon on a subset of the matrices (levels of optim.muon_params), crossed
# with the optimizer; under adamw the assignment does nothing, so those cells tie
FINALS = {
    ("all", "muon"): (2.80, 2.84),
    ("vo_ffn", "muon"): (2.83, 2.85),
    ("qk", "muon"): (3.01, 3.05),
    ("all", "adamw"): (3.00, 3.02),
    ("vo_ffn", "adamw"): (3.00, 3.03),
    ("qk", "adamw"): (2.99, 3.02),
}


def mean(xs):
    return sum(xs) / len(xs)


def var_of_mean(xs):
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)


def welch(first, second):
    """(value, half-width) of mean(first) - mean(second), Welch t, by hand."""
    v1, v2 = var_of_mean(first), var_of_mean(second)
    df = (v1 + v2) ** 2 / (v1**2 / (len(first) - 1) + v2**2 / (len(second) - 1))
    return mean(first) - mean(second), t95_by_integration(df) * math.sqrt(v1 + v2)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    for (subset, optim), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_cell(
                root, {MUON_PARAMS: subset, "optim.name": optim}, seed, final, {MUON_PARAMS: subset, "optim": optim}
            )
    write_experiment_file(
        root,
        {MUON_PARAMS: ["all", "vo_ffn", "qk"], "optim.name": ["adamw", "muon"]},
        {"baseline": "all", "fixes": {"vo_ffn": "qk"}},
    )
    return root, write_report(root)


def by(items, **keys):
    found = [item for item in items if all(item[k] == v for k, v in keys.items())]
    assert len(found) == 1, (keys, found)
    return found[0]


def test_axes_come_from_the_experiment_file(ablation):
    _, summary = ablation
    axes = summary["settings"]["axes"]
    assert (axes["compare"], axes["baseline"], axes["across"], axes["reference"]) == (
        MUON_PARAMS,
        "all",
        "optim.name",
        "adamw",
    )
    assert summary["variants"] == ["all", "vo_ffn", "qk"] and summary["optims"] == ["adamw", "muon"]


def test_gaps_and_interactions_on_a_non_norm_axis(ablation):
    _, summary = ablation
    value, half = welch(FINALS["qk", "muon"], FINALS["all", "muon"])
    gap = by(summary["gaps"], variant="qk", optim="muon")
    assert gap["value"] == pytest.approx(value, abs=1e-9)
    assert (gap["ci95"][1] - gap["ci95"][0]) / 2 == pytest.approx(half, rel=1e-6)
    # interaction of qk with muon: (L[qk,muon] - L[all,muon]) - (L[qk,adamw] - L[all,adamw])
    cells = [FINALS["qk", "muon"], FINALS["all", "muon"], FINALS["qk", "adamw"], FINALS["all", "adamw"]]
    expected = mean(cells[0]) - mean(cells[1]) - mean(cells[2]) + mean(cells[3])
    variances = [var_of_mean(c) for c in cells]
    df = sum(variances) ** 2 / sum(v**2 for v in variances)  # n - 1 = 1 for every group
    item = by(summary["interactions"], variant="qk", optim="muon")
    assert item["value"] == pytest.approx(expected, abs=1e-9)
    assert item["df"] == pytest.approx(df, rel=1e-9)
    assert (item["ci95"][1] - item["ci95"][0]) / 2 == pytest.approx(
        t95_by_integration(df) * math.sqrt(sum(variances)), rel=1e-6
    )
    assert t_quantile(0.975, df) == pytest.approx(t95_by_integration(df), rel=1e-6)


def test_declared_fix_gives_the_share_carried(ablation):
    _, summary = ablation
    # vo_ffn declared a fix of qk: the share of qk's gap to all (under muon) that vo_ffn recovers
    item = by(summary["recoveries"], fix="vo_ffn", optim="muon")
    gain = mean(FINALS["qk", "muon"]) - mean(FINALS["vo_ffn", "muon"])
    gap = mean(FINALS["qk", "muon"]) - mean(FINALS["all", "muon"])
    assert item["share"] == pytest.approx(gain / gap, abs=1e-9)


def test_markdown_names_the_axes(ablation):
    root, summary = ablation
    text = (root / "report.md").read_text()
    assert f"Compared: `{MUON_PARAMS}` against `all`, across `optim.name` with reference `adamw`" in text
    assert f"| {MUON_PARAMS} | adamw final eval loss |" in text
    assert "**qk × muon**: interaction" in text
    assert "## Interaction" in text and (root / "gaps.png").is_file()


def test_single_axis_report_has_gaps_only(tmp_path):
    finals = {"all": (2.80, 2.84), "none": (3.00, 3.02), "vo_ffn": (2.83, 2.85)}
    for subset, values in finals.items():
        for seed, final in enumerate(values):
            write_cell(tmp_path, {MUON_PARAMS: subset, "optim.name": "muon"}, seed, final, {MUON_PARAMS: subset})
    write_experiment_file(tmp_path, {MUON_PARAMS: ["all", "none", "vo_ffn"]}, {"fixes": {"vo_ffn": "none"}})
    summary = write_report(tmp_path)
    assert summary["settings"]["axes"]["across"] is None and summary["interactions"] == []
    gap = by(summary["gaps"], variant="none")
    value, half = welch(finals["none"], finals["all"])
    assert gap["value"] == pytest.approx(value, abs=1e-9)
    assert (gap["ci95"][1] - gap["ci95"][0]) / 2 == pytest.approx(half, rel=1e-6)
    # the share of Muon's advantage over AdamW (= none) that Muon on VO and FFN carries
    share = by(summary["recoveries"], fix="vo_ffn")["share"]
    assert share == pytest.approx(
        (mean(finals["none"]) - mean(finals["vo_ffn"])) / (mean(finals["none"]) - mean(finals["all"])), abs=1e-9
    )
    text = (tmp_path / "report.md").read_text()
    assert "## Interaction" not in text and "**none**: gap to all" in text


def test_third_axis_is_a_stratum(tmp_path):
    """model.norm x optim.name x optim.muon_params: one norm x optimizer analysis per subset."""
    finals = {}
    for k, subset in enumerate(("all", "vo")):
        for norm, shift in (("rmsnorm", 0.0), ("derf", 0.3)):
            for optim, extra in (("adamw", 0.0), ("muon", 0.2 * (k + 1))):
                values = (3.0 + shift + extra * (norm == "derf"), 3.03 + shift + extra * (norm == "derf"))
                finals[norm, optim, subset] = values
                for seed, final in enumerate(values):
                    write_cell(
                        tmp_path,
                        {"model.norm": norm, "optim.name": optim, MUON_PARAMS: subset},
                        seed,
                        final,
                        {"norm": norm, "optim": optim, MUON_PARAMS: subset},
                    )
    write_experiment_file(
        tmp_path, {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"], MUON_PARAMS: ["all", "vo"]}, None
    )
    summary = write_report(tmp_path)
    assert summary["settings"]["axes"]["strata"] == [MUON_PARAMS]
    for subset, expected in (("all", 0.2), ("vo", 0.4)):
        item = by(summary["interactions"], variant="derf", optim="muon", stratum={MUON_PARAMS: subset})
        assert item["value"] == pytest.approx(expected, abs=1e-9)
    text = (tmp_path / "report.md").read_text()
    assert f"### {MUON_PARAMS}=all" in text and f"### {MUON_PARAMS}=vo" in text
    assert "| adamw | muon" not in text  # the plots' panel labels stay out of the tables


def test_command_line_overrides_the_axes(ablation, tmp_path, capsys):
    root, _ = ablation
    report_main(
        [
            str(root),
            "--out",
            str(tmp_path),
            "--compare",
            "optim.name",
            "--baseline",
            "adamw",
            "--across",
            MUON_PARAMS,
            "--reference",
            "all",
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["axes"]["compare"] == "optim.name"
    assert summary["variants"] == ["adamw", "muon"] and summary["optims"] == ["all", "vo_ffn", "qk"]
    gap = by(summary["gaps"], variant="muon", optim="qk")
    assert gap["value"] == pytest.approx(mean(FINALS["qk", "muon"]) - mean(FINALS["qk", "adamw"]), abs=1e-9)
    assert "wrote" in capsys.readouterr().out


def test_axes_inferred_from_cell_json_without_experiment_file(ablation, tmp_path):
    root, _ = ablation
    axes = infer_axes(discover_cells(root))
    assert (axes.compare, axes.across) == (MUON_PARAMS, "optim.name")
    # levels in order of first appearance (cells sorted by folder name): all, qk, vo_ffn
    assert (axes.baseline, axes.reference) == ("all", "adamw")
    assert read_experiment_file(tmp_path) is None
    assert infer_axes([]) == ReportAxes()


def test_bad_report_settings_are_user_errors():
    levels = {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"]}
    assert axes_from_levels(levels) == ReportAxes(
        order={"model.norm": ("rmsnorm", "derf"), "optim.name": ("adamw", "muon")}
    )
    with pytest.raises(UserError, match="unknown key 'basline'"):
        axes_from_levels(levels, {"basline": "derf"})
    with pytest.raises(UserError, match="'layernorm' is not a level of model.norm"):
        axes_from_levels(levels, {"baseline": "layernorm"})
    with pytest.raises(UserError, match="is not an axis"):
        axes_from_levels(levels, {"compare": "optim.lr"})
    with pytest.raises(UserError, match="same axis"):
        axes_from_levels(levels, {"compare": "optim.name", "across": "optim.name"})


# --------------------------------------------------------------------------- head and tail

# loss per bucket (head -> tail) of each cell: Muon gains 0.05 in the head and 0.5 in the tail
BUCKETS = {
    ("adamw", 0): [2.0, 4.0, 7.0],
    ("adamw", 1): [2.1, 4.2, 7.2],
    ("muon", 0): [1.96, 3.8, 6.6],
    ("muon", 1): [2.04, 3.9, 6.6],
}


def test_bucket_differences_and_tail_minus_head(tmp_path):
    for (optim, seed), buckets in BUCKETS.items():
        write_cell(
            tmp_path,
            {"model.norm": "rmsnorm", "optim.name": optim},
            seed,
            buckets[1],
            {"norm": "rmsnorm", "optim": optim},
            buckets=buckets,
        )
    summary = write_report(tmp_path)
    item = by(summary["tail_classes"], kind="across")
    assert item["first_label"] == "adamw (rmsnorm)" and item["second_label"] == "muon (rmsnorm)"
    for b in range(3):
        value, half = welch([BUCKETS["adamw", s][b] for s in (0, 1)], [BUCKETS["muon", s][b] for s in (0, 1)])
        got = item["buckets"][b]
        assert got["value"] == pytest.approx(value, abs=1e-9)
        assert (got["ci95"][1] - got["ci95"][0]) / 2 == pytest.approx(half, rel=1e-6)
    spread = [[BUCKETS[o, s][2] - BUCKETS[o, s][0] for s in (0, 1)] for o in ("adamw", "muon")]
    value, half = welch(*spread)
    assert item["tail_minus_head"]["value"] == pytest.approx(value, abs=1e-9)
    assert (item["tail_minus_head"]["ci95"][1] - item["tail_minus_head"]["ci95"][0]) / 2 == pytest.approx(
        half, rel=1e-6
    )
    assert (item["head_bucket"], item["tail_bucket"]) == (0, 2)
    assert "the tail bucket gains more than the head bucket" in item["sentence"]
    text = (tmp_path / "report.md").read_text()
    assert "## Head and tail" in text and item["sentence"] in text


def test_buckets_that_do_not_line_up_are_not_compared(tmp_path):
    write_cell(
        tmp_path, {"optim.name": "adamw"}, 0, 3.0, {"norm": "rmsnorm", "optim": "adamw"}, buckets=[2.0, 4.0, 7.0]
    )
    write_cell(tmp_path, {"optim.name": "muon"}, 0, 3.0, {"norm": "rmsnorm", "optim": "muon"}, buckets=[2.0, 4.0])
    assert write_report(tmp_path)["tail_classes"] == []


def test_no_share_of_a_gap_that_is_not_there(tmp_path):
    """A 'fix' of a level that is no worse than the baseline recovers nothing: no share, a note."""
    finals = {"all": (3.00, 3.02), "none": (2.90, 2.92), "vo_ffn": (2.95, 2.97)}
    for subset, values in finals.items():
        for seed, final in enumerate(values):
            write_cell(tmp_path, {MUON_PARAMS: subset}, seed, final, {MUON_PARAMS: subset})
    write_experiment_file(tmp_path, {MUON_PARAMS: ["all", "none", "vo_ffn"]}, {"fixes": {"vo_ffn": "none"}})
    summary = write_report(tmp_path)
    item = by(summary["recoveries"], fix="vo_ffn")
    assert item["share"] is None and item["ci95"] is None and item["gap_base"] < 0
    assert any("none has no gap to recover" in note for note in summary["notes"])
    assert "recovers" not in (tmp_path / "report.md").read_text().split("## Final eval loss")[0]


def test_isotropy_is_reported_per_cell_and_type(tmp_path):
    folder = write_cell(tmp_path, {"optim.name": "muon"}, 0, 3.0, {"norm": "rmsnorm", "optim": "muon"})
    groups = {"attn.wq/early": (0.9, 0.5), "attn.wq/late": (0.7, 0.3), "ffn.w2/early": (0.95, None)}
    record = {
        "step": 100,
        "kind": "isotropy",
        "groups": {
            key: {"update_entropy": u, "update_erank": 3.0, "weight_entropy": w, "weight_erank": 2.0}
            for key, (u, w) in groups.items()
        },
    }
    (folder / "diagnostics.jsonl").write_text(json.dumps(record) + "\n")
    summary = write_report(tmp_path)
    numbers = summary["cells"][0]["diagnostics"]
    assert numbers["update_isotropy"] == {k: u for k, (u, _) in groups.items()}
    text = (tmp_path / "report.md").read_text()
    # attn.wq: update mean (0.9 + 0.7) / 2, weight mean (0.5 + 0.3) / 2; ffn.w2's weight is undefined
    assert "| cell | variant | optimizer | step | attn.wq | ffn.w2 |" in text
    assert "| 100 | 0.80 / 0.40 | 0.95 / — |" in text
