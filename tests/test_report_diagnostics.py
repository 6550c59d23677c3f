"""normopt report: the cells' diagnostics.jsonl (saturation, spectral norms, loss by token bucket)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from normopt.errors import UserError
from normopt.report.cells.cell_reading import TailTokens, discover_cells, read_diagnostics
from normopt.report.plots import style
from normopt.report.plots.diagnostics import plot_saturation_layers
from normopt.report.stats.cell_records import diagnostics_numbers
from normopt.report.stats.summary import build_summary
from normopt.report.writer import write_report
from tests.test_report import write_cell

PNG = b"\x89PNG\r\n\x1a\n"
DIAGNOSTIC_PLOTS = ("saturation.png", "saturation_layers.png", "spectral_norm.png", "tail_tokens.png")


def norm_record(step: int, saturations: dict[str, float | str | None], kind: str = "derf") -> dict:
    layers = {
        name: {
            "type": kind,
            "saturation": sat,
            "alpha": None if sat is None else 0.5,
            "shift": None if sat is None else 0.0,
            "scale_across_tokens": 0.3,
            "linearity_within_token": 0.95,
            "input_rms": 1.2,
        }
        for name, sat in saturations.items()
    }
    return {"step": step, "kind": "norm", "layers": layers}


def spectral_record(step: int, matrices: dict[str, float | str | None]) -> dict:
    return {"step": step, "kind": "spectral_norm", "matrices": matrices}


def tail_record(step: int, losses: list, shares: list | None = None, sizes: list | None = None) -> dict:
    return {
        "step": step,
        "kind": "tail_tokens",
        "bucket_loss": losses,
        "bucket_token_share": shares or [1 / len(losses)] * len(losses),
        "bucket_vocab_size": sizes or [10 * (i + 1) for i in range(len(losses))],
    }


def run_record(norm: str, optim: str) -> dict:
    return {"step": 0, "kind": "run", "n_params": 12345678, "n_layers": 2, "norm": norm, "optim": optim}


def write_diagnostics(folder: Path, records: list[dict], tail: str = "\n") -> None:
    (folder / "diagnostics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + tail)


LAYERS = ("layers.0.attn_norm", "layers.0.ffn_norm", "norm")


def build(root: Path) -> Path:
    """Five cells, one seed each: four with diagnostics, dyt-adamw without."""
    cell = write_cell(root, "derf", "muon", 0, 3.9)
    write_diagnostics(
        cell,
        [
            run_record("derf", "muon"),
            norm_record(50, dict(zip(LAYERS, (0.2, 0.4, 0.6)))),  # mean 0.4
            spectral_record(50, {"layers.0.attn.wq.weight": 10.0}),  # replaced by the next line (resumed run)
            spectral_record(50, {"layers.0.attn.wq.weight": 1.0, "layers.0.ffn.w1.weight": 3.0}),  # mean 2
            {"step": 50, "kind": "ns_spectrum", "singular_values": [[1.0, 0.5]]},
            tail_record(50, [4.0, 5.0, 6.0, 9.0]),
            norm_record(100, dict(zip(LAYERS, (0.5, 0.7, None)))),  # null left out: mean 0.6
            spectral_record(
                100, {"layers.0.attn.wq.weight": 2.0, "layers.0.ffn.w1.weight": "6.0", "layers.0.ffn.w2.weight": None}
            ),  # mean 4: growth 4 / 2 = 2
            tail_record(100, [3.0, 4.5, None, 8.0], [0.6, 0.3, 0.0, 0.1], [3, 10, 0, 50]),
            {"step": 100, "kind": "some_future_kind", "payload": {"x": [1, 2]}},
        ],
        tail='\n{"step": 150, "kind": "norm", "layers": {"layers.0.at',
    )  # killed writer: unterminated
    cell = write_cell(root, "derf", "adamw", 0, 3.3)
    write_diagnostics(
        cell,
        [
            run_record("derf", "adamw"),
            norm_record(50, dict(zip(LAYERS, (0.1, 0.2, 0.3)))),
            spectral_record(50, {"layers.0.attn.wq.weight": 1.0, "layers.1.attn.wq.weight": 1.0}),
            norm_record(100, dict(zip(LAYERS, (0.2, 0.3, 0.4)))),  # mean 0.3
            spectral_record(
                100,
                {
                    "layers.0.attn.wq.weight": 1.0,
                    "layers.1.attn.wq.weight": 2.0,
                    "tok_embeddings.weight": 5.6,
                    "output.weight": 6.0,
                },
            ),  # blocks: mean 1.5, growth 1.5
            tail_record(100, [3.0, 4.0, 5.0, 6.0]),
        ],
    )
    cell = write_cell(root, "rmsnorm", "adamw", 0, 3.0)
    write_diagnostics(
        cell,
        [
            run_record("rmsnorm", "adamw"),
            norm_record(50, dict.fromkeys(LAYERS), kind="rmsnorm"),  # unbounded: no saturation
            spectral_record(50, {"layers.0.ffn.w1.weight": 1.0}),
            spectral_record(100, {"layers.0.ffn.w1.weight": 1.2}),
            tail_record(100, [2.9, 3.9, 4.9, 5.9]),
        ],
    )
    cell = write_cell(root, "rmsnorm", "muon", 0, 2.9)
    write_diagnostics(
        cell,
        [
            norm_record(100, dict.fromkeys(LAYERS), kind="rmsnorm"),
            spectral_record(100, {"layers.0.ffn.w1.weight": "inf"}),  # one record: no growth
            tail_record(100, [2.8, 3.8, None, 5.8]),
        ],
    )
    write_cell(root, "dyt", "adamw", 0, 3.1)  # no diagnostics.jsonl
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = build(tmp_path_factory.mktemp("diagnostics"))
    return root, write_report(root)


def cell(summary, name):
    (found,) = [c for c in summary["cells"] if c["name"] == name]
    return found


def test_summary_numbers(report):
    _, summary = report
    derf_muon = cell(summary, "derf-muon-s0")["diagnostics"]
    assert derf_muon["final_saturation"] == pytest.approx(0.6) and derf_muon["saturation_step"] == 100
    assert derf_muon["saturation_by_layer"] == pytest.approx({"layers.0.attn_norm": 0.5, "layers.0.ffn_norm": 0.7})
    assert derf_muon["final_spectral_norm"] == pytest.approx(4.0)
    assert derf_muon["spectral_norm_growth"] == pytest.approx(2.0) and derf_muon["spectral_norm_steps"] == [50, 100]
    assert derf_muon["tail_tokens_step"] == 100
    assert derf_muon["tail_bucket_loss"] == [3.0, 4.5, None, 8.0]
    assert derf_muon["tail_bucket_token_share"] == [0.6, 0.3, 0.0, 0.1]
    assert derf_muon["tail_bucket_vocab_size"] == [3, 10, 0, 50]
    assert derf_muon["partial_last_line"] is True

    derf_adamw = cell(summary, "derf-adamw-s0")["diagnostics"]
    assert derf_adamw["final_saturation"] == pytest.approx(0.3)
    assert derf_adamw["final_spectral_norm"] == pytest.approx(1.5)
    assert derf_adamw["spectral_norm_growth"] == pytest.approx(1.5)
    # embedding and output are reported apart, never in the block mean; blocks by type/depth group
    assert derf_adamw["embedding_spectral_norm"] == 5.6 and derf_adamw["output_spectral_norm"] == 6.0
    assert derf_adamw["spectral_norm_by_cell"] == {"attn.wq/early": 1.0, "attn.wq/late": 2.0}
    assert derf_adamw["tail_bucket_loss"] == [3.0, 4.0, 5.0, 6.0] and derf_adamw["partial_last_line"] is False

    rms_adamw = cell(summary, "rmsnorm-adamw-s0")["diagnostics"]
    assert rms_adamw["final_saturation"] is None and rms_adamw["saturation_by_layer"] == {}
    assert rms_adamw["spectral_norm_growth"] == pytest.approx(1.2)

    rms_muon = cell(summary, "rmsnorm-muon-s0")["diagnostics"]
    assert rms_muon["final_spectral_norm"] == math.inf and rms_muon["spectral_norm_growth"] is None
    assert rms_muon["spectral_norm_steps"] == [100, 100]

    assert cell(summary, "dyt-adamw-s0")["diagnostics"] is None  # no diagnostics.jsonl: fine
    assert "derf-muon-s0: skipped an unterminated last line of diagnostics.jsonl" in summary["notes"]
    # the diagnostics change none of the statistics
    assert all(c["included"] for c in summary["cells"])


def test_files_and_markdown(report):
    root, summary = report
    for png in DIAGNOSTIC_PLOTS:
        assert (root / png).read_bytes()[:8] == PNG, png
        assert summary["files"][png.removesuffix(".png")] == str(root / png)
    on_disk = json.loads((root / "summary.json").read_text())  # strict JSON: inf written as "inf"
    assert cell(on_disk, "rmsnorm-muon-s0")["diagnostics"]["final_spectral_norm"] == "inf"
    assert cell(on_disk, "derf-muon-s0")["diagnostics"]["spectral_norm_growth"] == pytest.approx(2.0)
    text = (root / "report.md").read_text()
    assert "## Diagnostics" in text
    for png in DIAGNOSTIC_PLOTS:
        assert f"![{png.removesuffix('.png')}]({png})" in text
    row = next(line for line in text.splitlines() if line.startswith("| derf-muon-s0 | derf | muon |"))
    assert "0.6000 (step 100)" in row and "4.000 (step 100)" in row and "×2.000 (step 50 → 100)" in row
    assert "3.00, 4.50, —, 8.00 (step 100)" in row
    # spectral norms per block-matrix type and depth group, embedding and output apart
    row = next(line for line in text.splitlines() if line.startswith("| derf-adamw-s0 |") and "| 5.60 |" in line)
    # 2-block cells group early/late, 1-block cells all (depth_group with fewer than 3 blocks)
    assert "| 1.00 / 2.00 / — |" in row and row.endswith("| 5.60 | 6.00 |") and "attn.wq (early / late / all)" in text
    diagnostics_section = text.split("## Diagnostics")[1].split("\n## ")[0]  # up to the next section
    assert not any(line.startswith("| dyt-adamw-s0 |") for line in diagnostics_section.splitlines())


def test_no_diagnostics_no_section_no_plots(tmp_path):
    for norm in ("rmsnorm", "derf"):
        write_cell(tmp_path, norm, "adamw", 0, 3.0)
    summary = write_report(tmp_path)
    assert all(c["diagnostics"] is None for c in summary["cells"])
    assert "## Diagnostics" not in (tmp_path / "report.md").read_text()
    assert not any((tmp_path / png).exists() for png in DIAGNOSTIC_PLOTS)
    assert not set(summary["files"]) & {"saturation", "spectral_norm", "tail_tokens"}


def test_only_unknown_kinds_gives_an_empty_entry_and_no_plots(tmp_path):
    folder = write_cell(tmp_path, "derf", "muon", 0, 3.5)
    write_diagnostics(folder, [run_record("derf", "muon"), {"step": 50, "kind": "ns_spectrum", "x": 1}])
    summary = write_report(tmp_path)
    numbers = summary["cells"][0]["diagnostics"]
    assert numbers["final_saturation"] is None and numbers["final_spectral_norm"] is None
    assert numbers["tail_bucket_loss"] is None and numbers["spectral_norm_growth"] is None
    assert not any((tmp_path / png).exists() for png in DIAGNOSTIC_PLOTS)
    assert "## Diagnostics" in (tmp_path / "report.md").read_text()


def test_only_saturation_draws_only_that_plot(tmp_path):
    folder = write_cell(tmp_path, "dyt", "adamw", 0, 3.1)
    write_diagnostics(folder, [norm_record(10, {"norm": 0.9}, kind="dyt")])
    summary = write_report(tmp_path)
    assert (tmp_path / "saturation.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "spectral_norm.png").exists() and not (tmp_path / "tail_tokens.png").exists()
    assert summary["cells"][0]["diagnostics"]["final_saturation"] == pytest.approx(0.9)


def test_read_diagnostics_series(tmp_path):
    root = build(tmp_path)
    diagnostics = read_diagnostics(root / "derf-muon-s0" / "diagnostics.jsonl")
    assert [s for s, _ in diagnostics.saturation] == [50, 100]
    assert [v for _, v in diagnostics.saturation] == pytest.approx([0.4, 0.6])
    assert diagnostics.spectral_norm == ((50, 2.0), (100, 4.0))
    assert diagnostics.tail_tokens == TailTokens(100, (3.0, 4.5, None, 8.0), (0.6, 0.3, 0.0, 0.1), (3, 10, 0, 50))
    assert diagnostics.partial_last_line and not diagnostics.empty
    cells = {c.name: c for c in discover_cells(root)}
    assert cells["dyt-adamw-s0"].diagnostics is None
    assert diagnostics_numbers(cells["derf-adamw-s0"].diagnostics)["final_saturation"] == pytest.approx(0.3)
    # build_summary alone (no files written) carries the same numbers
    assert cell(build_summary(list(cells.values())), "derf-adamw-s0")["diagnostics"]["spectral_norm_growth"] == 1.5


def test_nan_propagates_into_the_mean(tmp_path):
    path = tmp_path / "diagnostics.jsonl"
    write_diagnostics(
        tmp_path, [norm_record(10, {"a": 0.5, "b": "nan"}), spectral_record(10, {"layers.0.ffn.w1.weight": "-inf"})]
    )
    diagnostics = read_diagnostics(path)
    assert math.isnan(diagnostics.saturation[0][1]) and diagnostics.spectral_norm == ((10, -math.inf),)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"step": 10, "kind": "norm", "layers": [1]}', "'layers' is not an object"),
        ('{"step": 10, "kind": "spectral_norm", "matrices": {"w": "big"}}', "could not convert"),
        ('{"step": "10", "kind": "norm"}', "is not an integer"),
        ('{"step": 10}', "kind None is not a string"),
        ('{"step": 10, "kind": "tail_tokens", "bucket_loss": [1.0], "bucket_vocab_size": [1.5]}', "not a list of int"),
        ("not json", "unreadable diagnostics line"),
    ],
)
def test_bad_lines_are_user_errors(tmp_path, line, message):
    path = tmp_path / "diagnostics.jsonl"
    path.write_text(f'{{"step": 0, "kind": "run"}}\n{line}\n{{"step": 20, "kind": "run"}}\n')
    with pytest.raises(
        UserError,
        match=rf"diagnostics.jsonl:2: unreadable diagnostics line \(.*{message}"
        if message != "unreadable diagnostics line"
        else "diagnostics.jsonl:2: unreadable",
    ):
        read_diagnostics(path)
    path.write_text(f'{{"step": 0, "kind": "run"}}\n{line}')  # the same line, unterminated and last: skipped
    assert read_diagnostics(path).partial_last_line


def test_per_layer_saturation_and_run_record_are_read(tmp_path):
    root = build(tmp_path)
    diagnostics = read_diagnostics(root / "derf-muon-s0" / "diagnostics.jsonl")
    assert [s for s, _ in diagnostics.saturation_by_step] == [50, 100]
    assert diagnostics.saturation_by_step[1][1] == {"layers.0.attn_norm": 0.5, "layers.0.ffn_norm": 0.7}
    assert diagnostics.run["n_params"] == 12345678 and diagnostics.run["norm"] == "derf"
    assert read_diagnostics(root / "rmsnorm-muon-s0" / "diagnostics.jsonl").run is None


def test_saturation_heat_map_shows_every_layer(report, monkeypatch, tmp_path):
    """One saturated layer among unsaturated ones is visible per layer, not averaged away."""
    root, summary = report
    made = []

    def keep(**kwargs):
        made.append(figure(**kwargs))
        return made[-1]

    figure = style.figure
    monkeypatch.setattr("normopt.report.plots.diagnostics.figure", keep)
    assert plot_saturation_layers(discover_cells(root), summary, tmp_path / "layers.png")
    (fig,) = made
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 2  # the two derf cells; RMSNorm cells have no bounded layer
    grid = maps[1].images[0].get_array()  # derf-muon-s0: layers x steps
    assert grid.shape == (3, 2) and grid[1, 1] == pytest.approx(0.7) and grid.mask[2, 1]  # null: grey
    assert [t.get_text() for t in maps[1].get_yticklabels()] == list(LAYERS)
    assert [t.get_text() for t in maps[1].get_xticklabels()] == ["50", "100"]


def test_setup_takes_parameters_from_the_run_record(report):
    _, summary = report
    assert 12345678 in summary["setup"]["parameters"]
    assert summary["setup"]["parameters_from"] == ["config.yaml", "run record"]  # dyt-adamw, rmsnorm-muon: no record


def test_dropped_bucket_comparisons_are_said(report, tmp_path):
    """A pair whose bucket rows are missing or misaligned is left out with a note saying why."""
    _, summary = report
    assert any(
        "head/tail comparison rmsnorm/adamw vs dyt/adamw left out: no tail_tokens record in dyt-adamw-s0" in note
        for note in summary["notes"]
    )
    for norm, losses in (("rmsnorm", [3.0, 4.0, 5.0, 6.0]), ("derf", [3.0, 4.0, 5.0])):  # 4 vs 3 buckets
        write_diagnostics(write_cell(tmp_path, norm, "adamw", 0, 3.0), [tail_record(100, losses)])
    notes = build_summary(discover_cells(tmp_path), fixes={})["notes"]
    assert any(
        "head/tail comparison rmsnorm/adamw vs derf/adamw left out: the cells logged different bucket "
        "counts (3, 4)" in note
        for note in notes
    ), notes
