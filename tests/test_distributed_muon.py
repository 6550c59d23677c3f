"""Distributed Muon/NorMuon under FSDP2 (torchrun, gloo) against a single process.

Tolerance: exact (torch.equal). The owner of a matrix receives the exact bits of every
rank's rows (cast to the NS dtype, which NS does first anyway), runs the same kernels on
the same full matrix as the single process, and the elementwise parts (momentum,
Nesterov, weight decay, the update) are computed per element identically on shards.
With injected gradients this isolates the optimizer; with real backward passes it also
relies on FSDP2 averaging identical per-rank gradients exactly, which holds here for 2
and 3 ranks. Worker and reference share a process, so kernels and threads match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from normopt.parallel.distributed_ns import RowShardedJob, run_row_sharded_jobs
from normopt.parallel.ns_plan import assign_owners, ns_cost
from normopt.parallel.row_layout import shard_rows
from tests.torchrun import run_torchrun
from tests.workers.muon_worker import (
    CASES,
    HEAD_BLOCKS,
    MATH_OPTIONS,
    OPTIMIZERS,
    REPLICATED_TOO,
    RUNS,
    VARIANTS,
    run_reference,
)

WORKER = Path(__file__).parent / "workers" / "muon_worker.py"
_RUNS: dict[int, dict] = {}


def worker_results(world: int, tmp_path_factory) -> dict:
    """Run the worker once per world size per session (the 2-rank run also checkpoints)."""
    if world not in _RUNS:
        out_dir = tmp_path_factory.mktemp(f"muon_{world}ranks")
        args = [str(out_dir / "results.pt")]
        if world == 2:
            args += ["--checkpoint-dir", str(out_dir / "ckpt")]
        run_torchrun(WORKER, world, args, timeout=300)
        _RUNS[world] = torch.load(out_dir / "results.pt", weights_only=False)
    return _RUNS[world]


@pytest.fixture(scope="module", params=[1, 2, pytest.param(3, marks=pytest.mark.slow)], ids=lambda n: f"{n}ranks")
def results(request, tmp_path_factory):
    return worker_results(request.param, tmp_path_factory)


def test_fsdp_muon_and_normuon_equal_single_process(results):
    modes = [2 if variant in REPLICATED_TOO else 1 for _, _, variant in RUNS]
    assert len(results["fsdp"]) == 2 * sum(modes)  # run x optimizer x ns_mode
    for (case, opt, source, mode, variant), params in results["fsdp"].items():
        math = tuple(sorted((k, v) for k, v in VARIANTS[variant].items() if k in MATH_OPTIONS))
        reference = results["reference"][(case, opt, source, math)]
        assert params.keys() == reference.keys()
        for name in reference:
            diff = (params[name] - reference[name]).abs().max().item()
            assert torch.equal(params[name], reference[name]), (
                f"{results['world_size']} ranks {case}/{opt}/{source}/{mode}/{variant} {name}: max diff {diff}"
            )
        # the comparison is not vacuous: every matrix moved away from its initialization
        for name, initial in results["initial"][case].items():
            assert (params[name] - initial).abs().max() > 1e-3, f"{case}/{opt}/{mode} {name} did not train"


def _per_step(results, key, field):
    """(rank 0, rank 1, ...) values of ``field`` for each step of run ``key``."""
    return [tuple(step[field] for step in ranks) for ranks in zip(*results["exchange"][key])]


def test_each_matrix_is_orthogonalized_once_per_step_when_distributed(results):
    world = results["world_size"]
    for (case, opt, source, mode, variant), _ in results["exchange"].items():
        if variant not in ("default", "buckets", "buckets_sync"):
            continue
        n_matrices = len(CASES[case])
        for counts in _per_step(results, (case, opt, source, mode, variant), "jobs"):
            if mode == "distributed":
                assert sum(counts) == n_matrices, counts
            else:
                assert list(counts) == [n_matrices] * world, counts


def test_batched_ns_stacks_same_shape_matrices(results):
    """Case "repeated": one matrix alone in its param group, then 2 + 2 + 2 of equal shapes
    (6 after the first): batches of 2 make 4 jobs; batches of 3 (with row blocks) also 4."""
    world = results["world_size"]
    for opt in OPTIMIZERS:
        for variant in ("batched", "row_blocks_batched"):
            counts = _per_step(results, ("repeated", opt, "inject", "distributed", variant), "jobs")
            team = min(VARIANTS[variant].get("ns_row_blocks", 1), world) if world > 1 else 1
            assert all(sum(c) == 4 * team for c in counts), (variant, counts)


def test_small_buckets_bound_the_exchange_buffers(results):
    """Tiny buckets (a job or two each): no rank holds more buffer bytes at once than with
    one bucket, which holds every matrix of the step; a rank whose peak is one big matrix
    keeps that peak."""
    if results["world_size"] == 1:
        pytest.skip("a 1-rank mesh computes locally, without buffers")
    for opt in ("muon", "normuon"):
        key = ("uneven", opt, "inject", "distributed")
        one = _per_step(results, key + ("default",), "peak")
        small = _per_step(results, key + ("buckets",), "peak")
        buckets = _per_step(results, key + ("buckets",), "buckets")
        assert all(1 < b[0] <= len(CASES["uneven"]) and len(set(b)) == 1 for b in buckets), buckets
        for step_small, step_one in zip(small, one):  # never more, and less in total over ranks
            assert all(a <= b for a, b in zip(step_small, step_one)), (small, one)
            assert sum(step_small) < sum(step_one), (small, one)


def test_row_blocks_put_every_rank_to_work_with_fewer_matrices_than_ranks(results):
    """Case "few" has 2 matrices: one owner each leaves a third rank idle; with 3 row
    blocks a team of min(3, ranks) ranks computes each matrix together."""
    world = results["world_size"]
    for opt in OPTIMIZERS:
        owners = _per_step(results, ("few", opt, "inject", "distributed", "default"), "jobs")
        teams = _per_step(results, ("few", opt, "inject", "distributed", "row_blocks"), "jobs")
        if world == 3:
            assert all(sorted(c) == [0, 1, 1] for c in owners), owners
        assert all(c == (2,) * world for c in teams), teams


def test_head_split_case_is_not_whole_matrix_muon(results, monkeypatch):
    """The per-head case does split: the worker's reference reproduces here, and the same
    run without head blocks ends elsewhere (so the torch.equal above checks per-head NS)."""
    if results["world_size"] != 1:
        pytest.skip("one in-process rerun suffices")
    for opt in OPTIMIZERS:
        split = run_reference("heads", opt, "inject")
        assert all(torch.equal(split[n], t) for n, t in results["reference"][("heads", opt, "inject", ())].items())
        with monkeypatch.context() as m:
            m.setitem(HEAD_BLOCKS, "heads", [None] * 4)
            whole = run_reference("heads", opt, "inject")
        assert (whole["layers.0.weight"] - split["layers.0.weight"]).abs().max() > 1e-3
        assert torch.equal(whole["layers.4.weight"], split["layers.4.weight"])  # the unsplit matrix


def test_checkpoint_round_trip_under_two_ranks(tmp_path_factory):
    results = worker_results(2, tmp_path_factory)
    assert set(results["checkpoint"]) == {"muon", "normuon"}
    for opt, outcome in results["checkpoint"].items():
        for name, continued in outcome["continued"].items():
            assert torch.equal(outcome["resumed"][name], continued), f"{opt} {name}"
        keys_rank0, keys_rank1 = outcome["state_keys_per_rank"]
        assert keys_rank0 == keys_rank1  # DCP needs the same keys on every rank
        fields = {f.split(":")[1] for f in keys_rank0[1]}
        expected = {"momentum_buffer"} | ({"row_second_moment"} if opt == "normuon" else set())
        assert fields == expected
        assert len(keys_rank0[0]) == len(CASES["uneven"])


# ------------------------------------------------- in-process helpers (no torchrun)


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 13, 48])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_rows_matches_torch_chunk(rows, world):
    chunks = torch.arange(rows).chunk(world) if rows else ()
    expected = [c.numel() for c in chunks] + [0] * (world - len(chunks))
    layout = shard_rows(rows, world)
    assert [length for _, length in layout] == expected
    assert all(start + length <= rows for start, length in layout)
    assert [s for s, n in layout if n] == [sum(expected[:r]) for r in range(world) if expected[r]]


def test_assign_owners_balances_llama_shapes():
    dim, kv, ffn = 2048, 512, 8192
    shapes = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (ffn, dim), (dim, ffn)] * 16
    costs = [ns_cost(r, c) for r, c in shapes]
    for world in (2, 3, 4, 8):
        owners = assign_owners(costs, world)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        assert max(loads) <= 1.05 * sum(costs) / world, (world, loads)
    assert assign_owners([1.0, 1.0], 3) == [0, 1]  # fewer jobs than ranks: rank 2 idles
    assert assign_owners([], 2) == []


def test_plain_jobs_run_locally_without_communication():
    a, v = torch.randn(4, 3), torch.randn(4)
    job = RowShardedJob(
        inputs=[a, v],
        rows=4,
        compute=lambda t, team: [t[0] * 2, t[1] + 1],
        output_specs=[((3,), torch.float32), ((), torch.float32)],
    )
    (out,), stats = run_row_sharded_jobs([job], mode="distributed")
    assert torch.equal(out[0], a * 2) and torch.equal(out[1], v + 1)
    assert stats.bytes_sent == 0 and stats.jobs_computed == 1
    bad = RowShardedJob(inputs=[a], rows=4, compute=lambda t, team: [t[0][:2]], output_specs=[((3,), torch.float32)])
    with pytest.raises(ValueError, match="compute returned"):
        run_row_sharded_jobs([bad])
    with pytest.raises(ValueError, match="ns_mode"):
        run_row_sharded_jobs([job], mode="gathered")


def test_gram_runs_reach_the_gram_iteration(results):
    """The gram variants are compared with a gram reference (above); that reference is not
    the standard one, so the option reached Newton-Schulz (same polynomial, other bits)."""
    for case, source in (("uneven", "backward"), ("few", "inject"), ("experts", "inject")):
        for opt in OPTIMIZERS:
            gram = results["fsdp"][(case, opt, source, "distributed", "gram")]
            standard = results["fsdp"][(case, opt, source, "distributed", "default")]
            assert any(not torch.equal(gram[name], standard[name]) for name in gram), (case, opt)
