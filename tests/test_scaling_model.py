"""benchmarks/scaling_model.py: its shapes, FLOP formula, loads and traffic against the framework."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from normopt.models.llama import build_model
from normopt.models.presets import PRESETS
from normopt.optim.newton_schulz import newton_schulz
from normopt.parallel.ns_plan import assign_owners, ns_cost

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling_model.py"
_spec = importlib.util.spec_from_file_location("scaling_model", _PATH)
sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm)

OPTS = Namespace(tokens_per_rank=8192, mfu=0.4, peak_tflops=989.0, bandwidth_gbps=50.0)
SPF = lambda rows, cols: 1.0 / 400e12  # noqa: E731


def test_1b_shapes_match_the_built_models_muon_matrices():
    model = build_model(PRESETS["1b"], "meta")
    built = [(n, *p.shape) for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2]
    assert sm.muon_shapes(PRESETS["1b"]) == built
    assert len(built) == 16 * 7


@pytest.mark.parametrize("rows, cols", [(24, 40), (40, 24), (32, 32)])
def test_ns_flops_equals_a_direct_count_of_newton_schulz(rows, cols):
    with FlopCounterMode(display=False) as counter:
        newton_schulz(torch.randn(rows, cols), steps=5, dtype=torch.float32)
    assert sm.ns_flops(rows, cols) == counter.get_total_flops()


def test_loads_equal_what_assign_owners_gives():
    args = PRESETS["debug"]  # 4 layers: 28 matrices of 4 shapes
    shapes = sm.muon_shapes(args)
    owners = assign_owners([ns_cost(r, c) for _, r, c in shapes], 3)
    flops = [0.0] * 3
    for (_, r, c), o in zip(shapes, owners):
        flops[o] += sm.ns_flops(r, c)
    row = sm.predict("debug", args, 3, SPF, OPTS)
    assert row["ns_tflop_max"] * 1e12 == pytest.approx(max(flops), rel=1e-12)
    assert row["ns_tflop_mean"] * 1e12 == pytest.approx(sum(flops) / 3, rel=1e-12)
    assert row["balance"] == pytest.approx(max(flops) / (sum(flops) / 3), rel=1e-12)
    assert row["speedup"] == pytest.approx(sum(flops) / max(flops), rel=1e-12)


def test_gather_traffic_is_every_shard_not_held_by_its_owner():
    shapes = [("a", 13, 4), ("b", 2, 6)]  # 13 rows on 3 ranks: 5, 5, 3; 2 rows: 1, 1, 0
    sent, recv = sm.gather_bytes(shapes, owners=[0, 2], world=3)
    assert sent == [1 * 6 * 2, (5 * 4 + 1 * 6) * 2, 3 * 4 * 2]
    assert recv == [(5 + 3) * 4 * 2, 0, (1 + 1) * 6 * 2]


def test_one_rank_has_speedup_one_and_no_communication():
    row = sm.predict("1b", PRESETS["1b"], 1, SPF, OPTS)
    assert row["speedup"] == 1.0 and row["balance"] == 1.0
    assert row["comm_mb_max"] == 0.0 and row["comm_ms"] == 0.0
    assert row["wall_pct"] == 0.0


def test_crossover_needs_every_larger_count_over_the_threshold():
    assert sm.crossover([(8, 0.5), (64, 1.2), (256, 0.9), (1024, 1.1)]) == 1024
    assert sm.crossover([(8, 0.5), (64, 0.9)]) is None


def test_row_block_teams_split_the_largest_matrix():
    """1b on 256 ranks: one owner per matrix leaves the slowest rank one whole FFN matrix;
    teams of 4 (P = 4) each split one, a quarter per member, at the price of all-gathers."""
    opts = Namespace(**vars(OPTS), team_bandwidth_gbps=400.0)
    one = sm.predict("1b", PRESETS["1b"], 256, SPF, opts, row_blocks=1)
    four = sm.predict("1b", PRESETS["1b"], 256, SPF, opts, row_blocks=4)
    assert four["ns_ms_max"] == pytest.approx(one["ns_ms_max"] / 4, rel=1e-9)
    assert four["wall_pct"] < one["wall_pct"]
    assert one["team_comm_ms"] == 0.0 and four["team_comm_ms"] > 0.0
    # blocks of 683, 683, 682 rows: member 0 computes blocks 0 and 2, member 1 block 1
    assert sm.member_shares(2048, 8192, 3, 2) == pytest.approx([1365 / 2048, 683 / 2048])
    # per step: (size - 1) * w * (m + n) elements, w = the largest member's rows
    assert sm.team_allgather_bytes(2048, 8192, 3, 2, steps=1) == 1 * 1365 * (2048 + 8192) * 2
