"""benchmarks/hsdp_traffic.py: its byte counts obey the identities of the ring model."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from normopt.models.presets import PRESETS, count_parameters

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "hsdp_traffic.py"
_spec = importlib.util.spec_from_file_location("hsdp_traffic", _PATH)
ht = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("hsdp_traffic", ht)  # its dataclass looks its module up there
_spec.loader.exec_module(ht)

NODES, GPUS = 4, 8


@pytest.fixture(scope="module", params=[1, 4], ids=lambda a: f"accum{a}")
def rows(request):
    return ht.model_rows("1b", NODES, GPUS, request.param)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-6)


def test_units_add_up_to_the_preset(rows):
    assert rows["params"] == count_parameters(PRESETS["1b"]) == sum(rows["block_params"]) + rows["root_params"]
    assert len(rows["block_params"]) == PRESETS["1b"].n_layers


def test_per_rank_bytes_are_the_ring_factors_times_the_parameter_bytes(rows):
    p, n_all, accum = rows["block_params"][0], rows["params"], rows["accum"]
    in_blocks = sum(rows["block_params"])
    for layout in rows["layouts"].values():
        r, s = layout["replicate"], layout["shard"]
        assert r * s == NODES * GPUS
        layer, step = layout["layer"], layout["step"]
        assert close(layer["all_gather_forward"]["per_rank"], accum * (s - 1) / s * p * ht.PARAM_BYTES)
        assert close(layer["all_gather_backward"]["per_rank"], accum * (s - 1) / s * p * ht.PARAM_BYTES)
        assert close(layer["reduce_scatter"]["per_rank"], (s - 1) / s * p * ht.GRAD_BYTES)
        assert close(layer["all_reduce"]["per_rank"], 2 * (r - 1) / r * p / s * ht.GRAD_BYTES)
        # per step: every unit gathered in forward, the blocks again in backward, one reduction
        assert close(step["all_gather_forward"]["per_rank"], accum * (s - 1) / s * n_all * ht.PARAM_BYTES)
        assert close(step["all_gather_backward"]["per_rank"], accum * (s - 1) / s * in_blocks * ht.PARAM_BYTES)
        assert close(step["reduce_scatter"]["per_rank"], (s - 1) / s * n_all * ht.GRAD_BYTES)
        assert close(step["all_reduce"]["per_rank"], 2 * (r - 1) / r * n_all / s * ht.GRAD_BYTES)


def test_cross_node_bytes(rows):
    fsdp, hsdp = rows["layouts"]["FSDP 32"], rows["layouts"]["HSDP 4 x 8"]
    n_all = rows["params"]
    for scope in ("layer", "step"):
        for kind, v in fsdp[scope].items():  # a flat ring crosses into each node once
            assert close(v["cross_node"], NODES * v["per_rank"]), (scope, kind)
        for kind in ("all_gather_forward", "all_gather_backward", "reduce_scatter"):  # within a node
            assert hsdp[scope][kind]["cross_node"] == 0.0 < fsdp[scope][kind]["cross_node"], (scope, kind)
        # every member of a replica group receives from another node
        assert close(hsdp[scope]["all_reduce"]["cross_node"], NODES * GPUS * hsdp[scope]["all_reduce"]["per_rank"])
    assert close(hsdp["step"]["all_reduce"]["cross_node"], 2 * (NODES - 1) * n_all * ht.GRAD_BYTES)
    total = {name: sum(v["cross_node"] for v in layout["step"].values()) for name, layout in rows["layouts"].items()}
    assert total["HSDP 4 x 8"] < total["FSDP 32"]
    # Muon's NS exchange stays within a node under HSDP; under FSDP 3 of 4 shards of every
    # matrix (rows divisible by 32) live on other nodes than the owner, both ways, in bf16
    matrices = sum(r * c for r, c in ht.fsdp_units("1b")[2])
    assert hsdp["muon_ns"]["cross_node"] == 0.0
    assert close(fsdp["muon_ns"]["cross_node"], 2 * ht.NS_BYTES * matrices * (NODES - 1) / NODES)


def test_only_the_all_gathers_grow_with_micro_batches():
    one, four = (ht.model_rows("1b", NODES, GPUS, accum) for accum in (1, 4))
    for name in one["layouts"]:
        a, b = one["layouts"][name]["step"], four["layouts"][name]["step"]
        for kind in a:
            factor = 4 if kind.startswith("all_gather") else 1
            assert close(b[kind]["per_rank"], factor * a[kind]["per_rank"]), (name, kind)


def test_the_report_prints_both_layouts_and_its_assumptions(rows):
    text = "\n".join(ht.report(rows))
    assert "FSDP 32" in text and "HSDP 4 x 8" in text and "bf16" in text and "fp32" in text
    assert "not a measurement" in text
