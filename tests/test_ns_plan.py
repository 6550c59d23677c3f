"""Planning of distributed Newton-Schulz (buckets, teams), row-block NS and NS batches,
in one process: the pieces the torchrun exactness tests rely on."""

from __future__ import annotations

import pytest
import torch

from normopt.optim.muon import Muon
from normopt.optim.newton_schulz import newton_schulz
from normopt.optim.ns_batches import batch_by_shape
from normopt.parallel.ns_plan import bucket_jobs, ns_cost, plan_teams
from normopt.parallel.row_block_team import RowBlockTeam


def test_bucket_jobs_keeps_order_and_bounds_bytes():
    assert bucket_jobs([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert bucket_jobs([4, 4, 4], 0) == [[0, 1, 2]]
    assert bucket_jobs([], 8) == []


def test_plan_teams_balances_every_bucket():
    """1b-like mix (16 layers x 7 matrices) on 4 ranks in 8 buckets: each bucket asks every
    rank for about 1/8 of its work, and the owners are the whole-step LPT owners."""
    shapes = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)] * 16
    costs = [ns_cost(r, c) for r, c in shapes]
    nbytes = [r * c * 2 for r, c in shapes]
    buckets, computes_on = plan_teams(costs, nbytes, 4, 1, sum(nbytes) / 8)
    assert sorted(j for b in buckets for j in b) == list(range(len(shapes)))
    assert len(buckets) == 8 and all(len(team) == 1 for team in computes_on)
    for bucket in buckets:
        loads = [sum(costs[j] for j in bucket if computes_on[j] == [r]) for r in range(4)]
        assert max(loads) <= 1.6 * sum(loads) / 4, loads  # job-order buckets would leave ranks idle


def test_plan_teams_makes_teams_of_consecutive_ranks():
    buckets, computes_on = plan_teams([3.0, 2.0, 1.0], [8, 8, 8], world=5, row_blocks=2, bucket_bytes=0)
    assert buckets == [[0, 1, 2]]
    assert computes_on == [[0, 1], [2, 3], [2, 3]]  # rank 4 is past the last whole team
    _, solo = plan_teams([3.0, 2.0], [8, 8], world=3, row_blocks=8, bucket_bytes=0)
    assert solo == [[0, 1, 2], [0, 1, 2]]  # team size min(P, ranks)


@pytest.mark.parametrize("shape", [(13, 40), (40, 13), (2, 6, 10), (3, 5)])
@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_row_block_ns_is_ns(shape, blocks):
    """P row blocks compute the same iteration (equal up to float rounding: a block of a
    matmul need not sum in the whole product's order)."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(blocks))
    plain = newton_schulz(G, 5, dtype=torch.float64)
    blocked = newton_schulz(G, 5, dtype=torch.float64, team=RowBlockTeam(blocks))
    torch.testing.assert_close(blocked, plain, rtol=1e-12, atol=1e-12)
    assert not torch.equal(plain, torch.zeros_like(plain))


def test_batch_by_shape_depends_on_keys_only():
    keys = ["a", "b", "a", "a", "b", "c", "a"]
    assert batch_by_shape(keys, 1) == [[0], [2], [3], [6], [1], [4], [5]]
    assert batch_by_shape(keys, 3) == [[0, 2, 3], [6], [1, 4], [5]]
    with pytest.raises(ValueError, match="ns_batch_size"):
        batch_by_shape(keys, 0)


def test_batched_muon_matches_one_at_a_time_to_rounding():
    """Stacked NS runs batched matmuls instead of one matmul per matrix: other kernels, so
    equality is only up to float rounding (the distributed step is exact against a single
    process for the same ns_batch_size: the batches do not depend on the ranks)."""

    def run(batch: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(5)] + [torch.nn.Parameter(torch.randn(6, 9))]
        opt = Muon(params, lr=0.02, ns_dtype=torch.float32, ns_batch_size=batch)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            opt.step()
        assert opt.last_step_stats.jobs_computed == (6 if batch == 1 else 3)  # 5 = 4 + 1, plus the 6x9
        return [p.detach().clone() for p in params]

    for a, b in zip(run(1), run(4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(ns_row_blocks=0), "ns_row_blocks"),
        (dict(ns_bucket_mb=-1), "ns_bucket_mb"),
        (dict(ns_batch_size=0), "ns_batch_size"),
    ],
)
def test_invalid_distribution_options_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Muon([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)
