"""Singular-value isotropy: entropy and effective rank on known spectra, and the trainer's
isotropy record against the update and weights recomputed from its checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normopt.diagnostics.collector import DiagnosticsWriter
from normopt.diagnostics.isotropy import (
    ISOTROPY_FIELDS,
    cell_means,
    effective_rank,
    isotropy,
    isotropy_cell,
    normalised_entropy,
)
from normopt.errors import UserError
from normopt.export import load_model_weights
from normopt.report.cells.cell_reading import read_diagnostics
from normopt.report.stats.cell_records import diagnostics_numbers
from normopt.run_dir import RunDir
from tests.conftest import run_cli, tiny_run_args

# --------------------------------------------------------------------------- known spectra


def test_identity_is_isotropic():
    result = isotropy(torch.eye(7))
    assert result["entropy"] == pytest.approx(1.0, abs=1e-12)
    assert result["erank"] == pytest.approx(7.0, abs=1e-9)
    # any multiple of a semi-orthogonal matrix too: all r = 5 singular values equal
    Q, _ = torch.linalg.qr(torch.randn(9, 5, generator=torch.Generator().manual_seed(0)))
    assert isotropy(3.0 * Q.T) == pytest.approx({"entropy": 1.0, "erank": 5.0}, abs=1e-5)


def test_rank_one_has_no_spread():
    result = isotropy(torch.outer(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 1.0, 1.5, 2.0])))
    assert result["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert result["erank"] == pytest.approx(1.0, abs=1e-6)


def test_diagonal_matches_a_hand_computation():
    """s = (2, 1, 1): energy shares p = (4, 1, 1) / 6 = (2/3, 1/6, 1/6), so
    H = (2/3) log(3/2) + (1/3) log 6 = 0.867563 nats, h = H / log 3 = 0.789690,
    erank = exp(H) = 2.381102."""
    H = (2 / 3) * math.log(3 / 2) + (1 / 3) * math.log(6)
    result = isotropy(torch.diag(torch.tensor([2.0, 1.0, 1.0])))
    assert result["entropy"] == pytest.approx(H / math.log(3), rel=1e-6)
    assert result["erank"] == pytest.approx(math.exp(H), rel=1e-6)
    assert result["entropy"] == pytest.approx(0.789690, abs=1e-6)
    assert result["erank"] == pytest.approx(2.381102, abs=1e-6)
    # a rectangular matrix has r = min(m, n) singular values: padding with zero rows changes nothing
    padded = torch.cat([torch.diag(torch.tensor([2.0, 1.0, 1.0])), torch.zeros(4, 3)])
    assert isotropy(padded) == pytest.approx(result)


def test_undefined_cases_are_none_or_nan():
    assert isotropy(torch.zeros(4, 6)) == {"entropy": None, "erank": None}
    assert isotropy(torch.tensor([[3.0, 4.0]])) == {"entropy": None, "erank": 1.0}  # r = 1: log r = 0
    assert normalised_entropy(torch.tensor([0.0, 0.0])) is None and effective_rank(torch.zeros(3)) is None
    nan = isotropy(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    assert math.isnan(nan["entropy"]) and math.isnan(nan["erank"])


def test_energy_shares_are_stricter_than_singular_value_shares():
    """The module's claim: the entropy of p ~ s^2 is at most that of Roy & Vetterli's
    p ~ s, with equality for equal nonzero singular values."""

    def entropy(p):
        p = p / p.sum()
        return float(-(p * p.log()).sum())

    for seed in range(5):
        s = torch.rand(20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.01
        assert math.log(effective_rank(s)) <= entropy(s) + 1e-12
    flat = torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    assert math.log(effective_rank(flat)) == pytest.approx(entropy(flat[:3]), abs=1e-12)


def test_cell_means_leave_out_undefined_values():
    matrices = {"a": {"x": 0.2, "y": None}, "b": {"x": 0.4, "y": 1.0}, "c": {"x": 0.9, "y": None}}
    means = cell_means(matrices, {"a": "q/early", "b": "q/early", "c": "k/early"}, ("x", "y"))
    assert list(means) == ["q/early", "k/early"]
    assert means["q/early"] == pytest.approx({"x": 0.3, "y": 1.0})
    assert means["k/early"] == {"x": 0.9, "y": None}


def test_depth_groups_are_thirds_or_one_per_block():
    groups = [isotropy_cell(f"layers.{i}.attn.wq.weight", 6)[2] for i in range(6)]
    assert groups == ["early", "early", "mid", "mid", "late", "late"]
    assert [isotropy_cell(f"layers.{i}.ffn.w2.weight", 2)[2] for i in range(2)] == ["early", "late"]
    assert isotropy_cell("layers.0.ffn.w2.weight", 1) == (0, "ffn.w2", "all")


def test_group_means_reach_tensorboard(tmp_path):
    class Board:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = value

    board = Board()
    writer = DiagnosticsWriter(tmp_path / "d.jsonl", board, enabled=True, histograms=False)
    writer.write(
        {
            "step": 3,
            "kind": "isotropy",
            "measure": "energy",
            "groups": {"attn.wq/early": {"update_entropy": 0.9, "weight_erank": None}},
            "matrices": {"layers.0.attn.wq.weight": {"type": "attn.wq", "update_entropy": 0.9}},
        }
    )
    writer.close()
    assert board.scalars["diag_isotropy/attn.wq/early/update_entropy"] == 0.9
    assert board.scalars["diag_isotropy/layers.0.attn.wq.weight/update_entropy"] == 0.9
    assert not any(tag.endswith("weight_erank") or tag.endswith("/type") for tag in board.scalars)


# --------------------------------------------------------------------------- a real run


def _records(run_dir, kind):
    lines = [json.loads(line) for line in RunDir(run_dir).diagnostics.read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == kind}


def _check_record(record, matrix_names):
    assert record["measure"] == "energy" and record["seconds"] > 0
    assert list(record["matrices"]) == matrix_names
    cells: dict[str, list[dict]] = {}
    for name, values in record["matrices"].items():
        layer, mtype, group = isotropy_cell(name, 2)
        assert (values["layer"], values["type"], values["group"]) == (layer, mtype, group)
        for source in ("update", "weight"):
            assert 0.0 <= values[f"{source}_entropy"] <= 1.0
            assert 1.0 <= values[f"{source}_erank"] <= 128
        cells.setdefault(f"{mtype}/{group}", []).append(values)
    assert set(record["groups"]) == set(cells) and len(cells) == 14  # 7 types x 2 blocks
    for cell, members in cells.items():
        for field in ISOTROPY_FIELDS:
            expected = sum(m[field] for m in members) / len(members)
            assert record["groups"][cell][field] == pytest.approx(expected, rel=1e-12)


def test_adamw_run_measures_the_applied_update(tmp_path, tiny_corpus):
    """The step-6 record equals the isotropy of W6 - W5 and of W6 from the checkpoints of
    steps 5 and 6 (the same float32 numbers the trainer subtracted); the update's spread
    differs from the weights'. A run with the switch off writes no such record."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        tiny_run_args(run_dir, tiny_corpus, "train.dtype=float32", "diagnostics.interval=3", "checkpoint.interval=5")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(run_dir, "isotropy")
    assert sorted(records) == [3, 6]  # after updates only: step 0 has none
    w5, w6 = (load_model_weights(RunDir(run_dir).checkpoint(step)) for step in (5, 6))
    names = [n for n, t in w6.items() if t.ndim == 2 and n.startswith("layers.")]
    for record in records.values():
        _check_record(record, names)
    for name, values in records[6]["matrices"].items():
        update, weight = isotropy(w6[name] - w5[name]), isotropy(w6[name])
        assert values["update_entropy"] == pytest.approx(update["entropy"], rel=1e-6), name
        assert values["update_erank"] == pytest.approx(update["erank"], rel=1e-6), name
        assert values["weight_entropy"] == pytest.approx(weight["entropy"], rel=1e-6), name
        assert values["weight_erank"] == pytest.approx(weight["erank"], rel=1e-6), name
        assert abs(values["update_entropy"] - values["weight_entropy"]) > 1e-3, name

    # the report reads the last record's cell means
    numbers = diagnostics_numbers(read_diagnostics(RunDir(run_dir).diagnostics))
    groups = records[6]["groups"]
    assert numbers["isotropy_step"] == 6
    assert numbers["update_isotropy"] == {cell: v["update_entropy"] for cell, v in groups.items()}
    assert numbers["weight_isotropy"] == {cell: v["weight_entropy"] for cell, v in groups.items()}
    assert numbers["update_effective_rank"] == {cell: v["update_erank"] for cell, v in groups.items()}
    assert numbers["weight_effective_rank"] == {cell: v["weight_erank"] for cell, v in groups.items()}

    off = tmp_path / "off"
    proc = run_cli(
        tiny_run_args(off, tiny_corpus, "train.steps=3", "diagnostics.interval=3", "diagnostics.isotropy=false")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _records(off, "isotropy") and _records(off, "spectral_norm")


def test_report_reads_isotropy_and_refuses_a_malformed_record(tmp_path):
    path = tmp_path / "diagnostics.jsonl"
    path.write_text(
        '{"step": 3, "kind": "isotropy", "groups": {"ffn.w2/all": {"update_entropy": 0.5, '
        '"update_erank": 2.0, "weight_entropy": null, "weight_erank": "nan"}}}\n'
    )
    iso = read_diagnostics(path).isotropy
    assert iso.step == 3 and iso.update_entropy == {"ffn.w2/all": 0.5} and iso.weight_entropy == {"ffn.w2/all": None}
    assert math.isnan(iso.weight_erank["ffn.w2/all"])
    assert diagnostics_numbers(read_diagnostics(path))["update_effective_rank"] == {"ffn.w2/all": 2.0}
    path.write_text('{"step": 3, "kind": "isotropy", "groups": {"ffn.w2/all": 0.5}}\n')
    with pytest.raises(UserError, match="groups"):
        read_diagnostics(path)
    path.write_text('{"step": 3, "kind": "norm", "layers": {}}\n')
    without = read_diagnostics(path)
    assert without.isotropy is None and diagnostics_numbers(without)["update_isotropy"] is None


# min(rows, cols) of each block matrix of the tiny model (dim 64, 4 heads of 16, 2 KV heads, ffn 128)
TINY_RANKS = {"attn.wq": 64, "attn.wk": 32, "attn.wv": 32, "attn.wo": 64, "ffn.w1": 64, "ffn.w3": 64, "ffn.w2": 64}


def test_muon_update_is_as_isotropic_as_its_newton_schulz_output(tmp_path, tiny_corpus):
    """Without weight decay Muon applies Delta W = -lr * scale * NS(U), whose singular values
    are those of NS's output. Where the same step's ns_spectrum record says every output
    singular value lies within d of 1 (``ns_out_max_dev``, through NS's scalar map), they
    span at most a ratio (1 + d) / (1 - d), so every energy share p_i <= ((1 + d) / (1 - d))^2 / r
    and h >= 1 - 2 log((1 + d) / (1 - d)) / log r. The quintic settles NS outputs in
    [0.68, 1.13] (d ~ 0.32), so the bound is loose (h >= 0.62 for r = 32); 1e-3 covers
    float32 NS arithmetic against the scalar map."""
    run_dir = tmp_path / "muon"
    proc = run_cli(
        tiny_run_args(
            run_dir,
            tiny_corpus,
            "optim.name=muon",
            "optim.muon_weight_decay=0",
            "train.dtype=float32",
            "diagnostics.interval=3",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    isotropy_records, ns_records = _records(run_dir, "isotropy"), _records(run_dir, "ns_spectrum")
    assert sorted(isotropy_records) == sorted(ns_records) == [3, 6]
    checked = 0
    for step, record in isotropy_records.items():
        for name, values in record["matrices"].items():
            d = ns_records[step]["matrices"][name]["ns_out_max_dev"]
            if d > 0.35:  # some direction NS left far from 1 (tiny input singular values)
                continue
            bound = 1 - 2 * math.log((1 + d) / (1 - d)) / math.log(TINY_RANKS[values["type"]])
            assert values["update_entropy"] >= bound - 1e-3, (step, name, d, values["update_entropy"])
            checked += 1
    assert checked >= 8
