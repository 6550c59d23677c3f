"""Whole-matrix computations on row-sharded (FSDP2 Shard(0)) matrices.

Newton-Schulz needs the whole matrix, while FSDP2 leaves each rank a slice of rows. The
pattern here (the one NorMuon's FSDP2 implementation uses) gives every matrix one owner:

    1. gather: one all_to_all_single sends each owner the row-slices of the matrices it owns,
    2. compute: each owner runs the computation on its whole matrices (nobody repeats that work),
    3. scatter: a second all_to_all_single sends every rank its rows of every result
       (``_gather``, ``_compute_mine`` and ``_scatter``, run in turn by ``_run_on_mesh``).

All matrices of one optimizer step travel in that single pair of collectives. Pieces of
mixed dtypes (a bf16 momentum, an fp32 per-row statistic) are packed as raw bytes into
one uint8 buffer with per-rank uneven splits, so nothing is up-cast, padded to a common
shape, or sent twice. Owners are chosen greedily so that NS FLOPs are balanced.

``mode="replicated"`` is the baseline: the first collective sends every slice to every
rank (an all-gather), every rank computes every matrix and keeps its own rows.

The module knows nothing about Muon: a ``RowShardedJob`` carries its inputs, its output
layout and a pure ``compute`` function from full inputs to full outputs.

Row layout: FSDP2 and DTensor ``Shard(0)`` split ``rows`` like ``torch.chunk``: every
rank gets ceil(rows / world) rows except the tail, which may be short or empty
(13 rows on 3 ranks: 5, 5, 3; 2 rows on 3 ranks: 1, 1, 0). ``shard_rows`` reproduces it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

NS_MODES: tuple[str, ...] = ("distributed", "replicated")

# Every piece starts at a multiple of this many bytes inside the packed buffer, so a
# received byte range can be reinterpreted in place as any dtype (view needs alignment).
_ALIGN = 16


@dataclass
class RowShardedJob:
    """One whole-matrix computation whose inputs and outputs are split by rows.

    inputs: this rank's row-slices (for a plain, unsharded job: the whole tensors); all
        share the leading dimension, and trailing shapes and dtypes agree on every rank.
    rows: the full leading dimension.
    compute: pure function from the full inputs to the full outputs, each output with
        ``rows`` as its leading dimension.
    output_specs: (trailing shape, dtype) of each output, known to every rank in advance
        so that receive sizes can be computed without an extra handshake.
    cost: relative compute cost, used to balance owners (see ``ns_cost``).
    mesh: 1-D DeviceMesh the rows are sharded over; None for an unsharded job.
    """

    inputs: list[torch.Tensor]
    rows: int
    compute: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    output_specs: list[tuple[tuple[int, ...], torch.dtype]]
    cost: float = 1.0
    mesh: DeviceMesh | None = None


@dataclass
class ExchangeStats:
    """What one ``run_row_sharded_jobs`` call did on this rank (wall seconds, bytes)."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    jobs_computed: int = 0
    cost_computed: float = 0.0
    owners: list[int] = field(default_factory=list)


def ns_cost(rows: int, cols: int) -> float:
    """Relative Newton-Schulz cost of a rows x cols matrix: rows * cols * min(rows, cols).

    Each NS step does ~4 m^2 n + 2 m^3 multiply-adds with m = min, n = max dimension,
    i.e. proportional to m^2 n (within a factor 1.5 for every aspect ratio).
    """
    return float(rows) * float(cols) * float(min(rows, cols))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each job: greedy longest-processing-time balancing.

    Jobs go heaviest first (ties: lower index first) to the currently least-loaded rank
    (ties: lower rank), which keeps the max load within 4/3 of optimal. Deterministic,
    so every rank computes the same assignment without communicating.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[j] = rank
        loads[rank] += costs[j]
    return owners


def shard_rows(rows: int, world_size: int) -> list[tuple[int, int]]:
    """(start, length) of each rank's rows under torch.chunk-style Shard(0) sharding.

    chunk = ceil(rows / world); rank r holds rows [r * chunk, min(rows, (r + 1) * chunk)),
    empty when r * chunk >= rows.
    """
    chunk = -(-rows // world_size) if rows else 0
    out = []
    for r in range(world_size):
        start = min(rows, r * chunk)
        out.append((start, min(rows, start + chunk) - start))
    return out


def _padded_nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes one piece occupies in a packed buffer: numel * itemsize, rounded up to _ALIGN."""
    n = numel * dtype.itemsize
    return -(-n // _ALIGN) * _ALIGN


def _numel(rows: int, trailing: tuple[int, ...]) -> int:
    n = rows
    for d in trailing:
        n *= d
    return n


def _pack(pieces: Sequence[torch.Tensor], total_bytes: int, device: torch.device) -> torch.Tensor:
    """Copy ``pieces`` back to back (each _ALIGN-aligned) into one uint8 buffer."""
    buf = torch.empty(total_bytes, dtype=torch.uint8, device=device)
    offset = 0
    for t in pieces:
        n = t.numel() * t.element_size()
        if n:
            buf[offset:offset + n].view(t.dtype).copy_(t.reshape(-1))
        offset += _padded_nbytes(t.numel(), t.dtype)
    assert offset == total_bytes, (offset, total_bytes)
    return buf


def _view(buf: torch.Tensor, offset: int, rows: int, trailing: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The piece of shape (rows, *trailing) stored at byte ``offset`` of ``buf`` (no copy)."""
    n = _numel(rows, trailing) * dtype.itemsize
    return buf[offset:offset + n].view(dtype).view(rows, *trailing)


def _input_layout(job: RowShardedJob) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape[1:]), t.dtype) for t in job.inputs]


def _check_local_rows(job: RowShardedJob, expected: int, rank: int) -> None:
    for t in job.inputs:
        if t.shape[0] != expected:
            raise ValueError(
                f"row-sharded job with {job.rows} rows: rank {rank} holds {t.shape[0]} rows, "
                f"expected {expected} (torch.chunk-style Shard(0) layout)"
            )


def _compute(job: RowShardedJob, full_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = job.compute(full_inputs)
    if len(outputs) != len(job.output_specs):
        raise ValueError(f"compute returned {len(outputs)} outputs, output_specs lists {len(job.output_specs)}")
    for out, (trailing, dtype) in zip(outputs, job.output_specs):
        if tuple(out.shape) != (job.rows, *trailing) or out.dtype != dtype:
            raise ValueError(
                f"compute returned {tuple(out.shape)} {out.dtype}, expected {(job.rows, *trailing)} {dtype}"
            )
    return outputs


def _all_to_all_bytes(
    send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, stats: ExchangeStats
) -> torch.Tensor:
    """One uneven all_to_all_single on uint8 buffers; times it into ``stats.comm_s``."""
    recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=send.device)
    t0 = time.perf_counter()
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    stats.comm_s += time.perf_counter() - t0
    stats.bytes_sent += sum(send_splits)
    stats.bytes_received += sum(recv_splits)
    return recv


@dataclass
class _MeshPlan:
    """Who holds and who computes what, for the jobs sharded over one 1-D mesh.

    Every rank derives the same plan from the same jobs, so no handshake is needed.
    layouts[j][r] = (start, length) of rank r's rows of job j; in_specs[j] = (trailing
    shape, dtype) of each input of job j; owners[j] = the rank computing job j
    (distributed mode; empty in replicated mode); computes_on[j] = every rank computing
    job j; mine = the jobs this rank computes, in job order.
    """

    jobs: list[RowShardedJob]
    world: int
    rank: int
    group: dist.ProcessGroup
    device: torch.device
    layouts: list[list[tuple[int, int]]]
    in_specs: list[list[tuple[tuple[int, ...], torch.dtype]]]
    owners: list[int]
    computes_on: list[list[int]]
    mine: list[int]

    def in_bytes(self, j: int, r: int) -> int:
        """Packed bytes of rank r's rows of job j's inputs."""
        return sum(_padded_nbytes(_numel(self.layouts[j][r][1], tr), dt) for tr, dt in self.in_specs[j])

    def out_bytes(self, j: int, r: int) -> int:
        """Packed bytes of rank r's rows of job j's outputs."""
        return sum(_padded_nbytes(_numel(self.layouts[j][r][1], tr), dt) for tr, dt in self.jobs[j].output_specs)

    def rows_of(self, outputs: list[torch.Tensor], j: int, r: int) -> list[torch.Tensor]:
        """Rank r's rows of job j's full outputs (views)."""
        start, length = self.layouts[j][r]
        return [o[start:start + length] for o in outputs]


def _plan(jobs: list[RowShardedJob], mesh: DeviceMesh, mode: str) -> _MeshPlan:
    """Check the local row counts and decide who computes each job (see ``_MeshPlan``)."""
    if mesh.ndim != 1:
        raise ValueError(f"row-sharded jobs need a 1-D DeviceMesh, got {mesh.ndim}-D")
    world, rank = mesh.size(), mesh.get_local_rank()
    layouts = [shard_rows(job.rows, world) for job in jobs]
    for job, layout in zip(jobs, layouts):
        _check_local_rows(job, layout[rank][1], rank)
    if mode == "distributed":
        owners = assign_owners([job.cost for job in jobs], world)
        computes_on = [[o] for o in owners]
    else:  # replicated: every rank computes every job
        owners = []
        computes_on = [list(range(world)) for _ in jobs]
    return _MeshPlan(
        jobs=jobs, world=world, rank=rank, group=mesh.get_group(), device=jobs[0].inputs[0].device,
        layouts=layouts, in_specs=[_input_layout(job) for job in jobs], owners=owners,
        computes_on=computes_on, mine=[j for j in range(len(jobs)) if rank in computes_on[j]],
    )


def _gather(plan: _MeshPlan, stats: ExchangeStats) -> tuple[torch.Tensor, list[int]]:
    """First collective: every rank sends each computing rank its row-slices of the inputs
    of the jobs that rank computes (in job order; to every rank in replicated mode).

    Returns this rank's receive buffer and its per-source byte counts: the slices of
    every job in ``plan.mine`` from source 0, then from source 1, and so on.
    """
    send_pieces, send_splits = [], []
    for d in range(plan.world):
        todo = [j for j in range(len(plan.jobs)) if d in plan.computes_on[j]]
        send_pieces += [t.contiguous() for j in todo for t in plan.jobs[j].inputs]
        send_splits.append(sum(plan.in_bytes(j, plan.rank) for j in todo))
    recv_splits = [sum(plan.in_bytes(j, s) for j in plan.mine) for s in range(plan.world)]
    t0 = time.perf_counter()
    send = _pack(send_pieces, sum(send_splits), plan.device)
    stats.comm_s += time.perf_counter() - t0
    recv = _all_to_all_bytes(send, send_splits, recv_splits, plan.group, stats)
    return recv, recv_splits


def _compute_mine(
    plan: _MeshPlan, recv: torch.Tensor, recv_splits: list[int], stats: ExchangeStats
) -> dict[int, list[torch.Tensor]]:
    """Rebuild each job this rank computes from the gathered slices and run it.

    Slices from source s of job j sit back to back in source s's part of ``recv``;
    concatenating them over s in rank order rebuilds the full inputs exactly (the chunk
    layout is contiguous and ordered). Moves nothing between ranks. Returns the full
    outputs of each job in ``plan.mine``, keyed by job index.
    """
    full_outputs: dict[int, list[torch.Tensor]] = {}
    src_offset = [sum(recv_splits[:s]) for s in range(plan.world)]
    for j in plan.mine:
        t0 = time.perf_counter()
        parts: list[list[torch.Tensor]] = [[] for _ in plan.in_specs[j]]
        for s in range(plan.world):
            n_rows = plan.layouts[j][s][1]
            for i, (tr, dt) in enumerate(plan.in_specs[j]):
                parts[i].append(_view(recv, src_offset[s], n_rows, tr, dt))
                src_offset[s] += _padded_nbytes(_numel(n_rows, tr), dt)
        full_inputs = [torch.cat(p, dim=0) for p in parts]
        t1 = time.perf_counter()
        full_outputs[j] = _compute(plan.jobs[j], full_inputs)
        stats.compute_s += time.perf_counter() - t1
        stats.comm_s += t1 - t0  # unpacking counts as communication overhead
        stats.jobs_computed += 1
        stats.cost_computed += plan.jobs[j].cost
    return full_outputs


def _scatter(
    plan: _MeshPlan, full_outputs: dict[int, list[torch.Tensor]], stats: ExchangeStats
) -> list[list[torch.Tensor]]:
    """Second collective (distributed mode): each owner sends every rank that rank's rows
    of every result it owns (in job order).

    Empties ``full_outputs`` once they are packed, so the full results are freed before
    the receive buffer is allocated. Returns this rank's rows of every job's outputs, as
    views into the receive buffer.
    """
    t0 = time.perf_counter()
    send_pieces, send_splits = [], []
    for d in range(plan.world):
        send_pieces += [t.contiguous() for j in plan.mine for t in plan.rows_of(full_outputs[j], j, d)]
        send_splits.append(sum(plan.out_bytes(j, d) for j in plan.mine))
    recv_splits = [sum(plan.out_bytes(j, plan.rank) for j in range(len(plan.jobs)) if plan.owners[j] == s)
                   for s in range(plan.world)]
    send = _pack(send_pieces, sum(send_splits), plan.device)
    stats.comm_s += time.perf_counter() - t0
    del send_pieces
    full_outputs.clear()
    recv = _all_to_all_bytes(send, send_splits, recv_splits, plan.group, stats)

    results: list[list[torch.Tensor]] = [[] for _ in plan.jobs]
    src_offset = [sum(recv_splits[:s]) for s in range(plan.world)]
    for j, job in enumerate(plan.jobs):
        s = plan.owners[j]
        n_mine = plan.layouts[j][plan.rank][1]
        for tr, dt in job.output_specs:
            results[j].append(_view(recv, src_offset[s], n_mine, tr, dt))
            src_offset[s] += _padded_nbytes(_numel(n_mine, tr), dt)
    return results


def _run_on_mesh(
    jobs: list[RowShardedJob], mesh: DeviceMesh, mode: str, stats: ExchangeStats
) -> list[list[torch.Tensor]]:
    """Gather -> compute on the computing ranks -> scatter, for the jobs sharded over one
    1-D mesh. Replicated mode skips the scatter: every rank already holds every result."""
    plan = _plan(jobs, mesh, mode)
    stats.owners.extend(plan.owners)
    recv, recv_splits = _gather(plan, stats)
    full_outputs = _compute_mine(plan, recv, recv_splits, stats)
    del recv
    if mode == "replicated":
        return [plan.rows_of(full_outputs[j], j, plan.rank) for j in range(len(jobs))]
    return _scatter(plan, full_outputs, stats)


def run_row_sharded_jobs(
    jobs: Sequence[RowShardedJob], mode: str = "distributed"
) -> tuple[list[list[torch.Tensor]], ExchangeStats]:
    """Run every job's ``compute`` on its full rows and return each rank's rows of the outputs.

    Jobs without a mesh (plain tensors) and jobs on a 1-rank mesh are computed locally
    with no communication. Jobs on a larger mesh are grouped by mesh; each group costs
    exactly two all_to_all_single calls in ``distributed`` mode (one in ``replicated``).
    Every rank of a mesh must call this with the same jobs in the same order (same
    shapes, dtypes, costs), which holds for optimizer steps over the same param groups.

    Returns (outputs, stats): outputs[j] lists job j's outputs restricted to this rank's
    rows (views into a receive buffer or the computed tensors: copy before keeping).
    """
    if mode not in NS_MODES:
        raise ValueError(f"ns_mode must be one of {NS_MODES}, got {mode!r}")
    stats = ExchangeStats()
    results: list[list[torch.Tensor] | None] = [None] * len(jobs)
    by_mesh: list[tuple[DeviceMesh, list[int]]] = []
    for j, job in enumerate(jobs):
        if job.mesh is None or job.mesh.size() == 1:
            _check_local_rows(job, job.rows, 0)
            t0 = time.perf_counter()
            results[j] = _compute(job, [t for t in job.inputs])
            stats.compute_s += time.perf_counter() - t0
            stats.jobs_computed += 1
            stats.cost_computed += job.cost
            continue
        for mesh, members in by_mesh:
            if mesh == job.mesh:
                members.append(j)
                break
        else:
            by_mesh.append((job.mesh, [j]))
    for mesh, members in by_mesh:
        outs = _run_on_mesh([jobs[j] for j in members], mesh, mode, stats)
        for j, out in zip(members, outs):
            results[j] = out
    return results, stats  # type: ignore[return-value]
