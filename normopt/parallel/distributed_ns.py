"""Whole-matrix computations on row-sharded (FSDP2 Shard(0)) matrices.

Newton-Schulz needs the whole matrix, while FSDP2 leaves each rank a slice of rows. Each
matrix goes to the rank (or the team of ranks, ``row_blocks > 1``) that computes it:

    1. gather: an all_to_all sends each computing rank the row-slices of its matrices,
    2. compute: each computing rank runs the job's pure ``compute`` on whole matrices,
    3. scatter: a second all_to_all sends every rank its rows of every result.

The step's jobs go in buckets of about ``bucket_bytes`` of whole inputs each (job order
in replicated mode; by cost per rank in distributed mode, see below). With ``overlap`` the
gather of bucket k+1 and the scatter of bucket k-1 are in flight (async collectives) while
bucket k computes, and each bucket's results are handed to ``on_result`` (which applies the
update) as soon as they arrive, so the buffers held at once are those of about three
buckets, not of the model (``ExchangeStats.peak_buffer_bytes``).

Owners are chosen greedily over the whole step (longest job first to the least-loaded
rank), and each rank's jobs are then spread over the buckets by cost, so that every
bucket holds about the same share of every rank's NS FLOPs (``plan_teams``). Who
computes a job never changes its result: a computing rank sees the exact bits of the
whole matrix. ``mode="replicated"`` is the baseline in which every rank computes
every job (the first collective becomes an all-gather, there is no scatter).

With ``row_blocks = P > 1`` a job is computed by a team of s = min(P, ranks) ranks that
all receive the whole input and split NS row block by row block
(``normopt.parallel.row_block_team``); member i of a team scatters the result rows to
the ranks d with d % s == i. A single process runs the same P blocks in a loop, so the
bits do not depend on the rank count.

Under HSDP (a 2-D mesh, placements (Replicate(), Shard(0))) the rows are split over the
ranks of one replica's shard group (``normopt.parallel.row_shards``): "rank" above means the
rank within that group, every collective runs on it, and each replica group computes the
same jobs on the same bits, so the update is identical on every replica.

The module knows nothing about Muon: a ``RowShardedJob`` carries its inputs, its output
layout and a pure ``compute`` function from full inputs to full outputs. Row layout:
``shard_rows`` (torch.chunk style, like Shard(0)).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from normopt.parallel.ns_plan import DEFAULT_BUCKET_MB, bucket_jobs, plan_teams
from normopt.parallel.packed_exchange import PendingExchange, numel_of, pack, padded_nbytes, post_all_to_all, view_piece
from normopt.parallel.row_block_team import GroupTeam, RowBlockTeam
from normopt.parallel.row_layout import shard_rows
from normopt.parallel.row_shards import RowShards, as_row_shards, team_groups

NS_MODES: tuple[str, ...] = ("distributed", "replicated")

Spec = tuple[tuple[int, ...], torch.dtype]  # (trailing shape, dtype) of a row-sharded tensor
OnResult = Callable[[int, list[torch.Tensor]], None]

__all__ = ["NS_MODES", "RowShardedJob", "ExchangeStats", "run_row_sharded_jobs"]


@dataclass
class RowShardedJob:
    """One whole-matrix computation whose inputs and outputs are split by rows.

    inputs: this rank's row-slices (for a plain, unsharded job: the whole tensors), or a
        function returning them, called when the job's bucket is sent (so inputs built
        from momentum need not all exist at once); all share the leading dimension.
    rows: the full leading dimension.
    compute: pure function (full inputs, team) -> full outputs, each output with ``rows``
        as its leading dimension; ``team`` is the ``RowBlockTeam`` to hand to
        ``newton_schulz`` (None unless ``row_blocks > 1``).
    output_specs: (trailing shape, dtype) of each output, known to every rank in advance
        so that receive sizes can be computed without an extra handshake.
    cost: relative compute cost, used to balance owners (see ``ns_cost``).
    mesh: the ranks the rows are sharded over: a ``RowShards`` (``row_shards_of`` a
        DTensor, HSDP included) or a 1-D DeviceMesh; None for an unsharded job.
    input_specs: (trailing shape, dtype) of each input; required when ``inputs`` is a
        function, derived from the tensors otherwise.
    """

    inputs: list[torch.Tensor] | Callable[[], list[torch.Tensor]]
    rows: int
    compute: Callable[[list[torch.Tensor], RowBlockTeam | None], list[torch.Tensor]]
    output_specs: list[Spec]
    cost: float = 1.0
    mesh: RowShards | DeviceMesh | None = None
    input_specs: list[Spec] | None = None

    def specs(self) -> list[Spec]:
        if self.input_specs is not None:
            return self.input_specs
        if callable(self.inputs):
            raise ValueError("a RowShardedJob whose inputs are a function needs input_specs")
        return [(tuple(t.shape[1:]), t.dtype) for t in self.inputs]

    def load(self, expected_rows: int, rank: int) -> list[torch.Tensor]:
        """This rank's input slices, checked against the Shard(0) layout."""
        tensors = list(self.inputs() if callable(self.inputs) else self.inputs)
        for t in tensors:
            if t.shape[0] != expected_rows:
                raise ValueError(
                    f"row-sharded job with {self.rows} rows: rank {rank} holds {t.shape[0]} rows, "
                    f"expected {expected_rows} (torch.chunk-style Shard(0) layout)"
                )
        return tensors


@dataclass
class ExchangeStats:
    """What one ``run_row_sharded_jobs`` call did on this rank.

    compute_s: seconds inside ``compute`` (NS), minus a team's all-gathers.
    comm_s: visible communication: packing, unpacking and time blocked waiting on
        collectives (transfers that finish while this rank computes are not counted).
    peak_buffer_bytes: most bytes held at once by the exchange's send and receive
        buffers, whole inputs and whole outputs.
    """

    compute_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    jobs_computed: int = 0
    cost_computed: float = 0.0
    owners: list[int] = field(default_factory=list)
    buckets: int = 0
    peak_buffer_bytes: int = 0
    _held: int = 0

    def hold(self, nbytes: int) -> int:
        self._held += nbytes
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._held)
        return nbytes

    def release(self, nbytes: int) -> None:
        self._held -= nbytes


def _compute(job: RowShardedJob, full_inputs: list[torch.Tensor], team: RowBlockTeam | None) -> list[torch.Tensor]:
    outputs = job.compute(full_inputs, team)
    if len(outputs) != len(job.output_specs):
        raise ValueError(f"compute returned {len(outputs)} outputs, output_specs lists {len(job.output_specs)}")
    for out, (trailing, dtype) in zip(outputs, job.output_specs):
        if tuple(out.shape) != (job.rows, *trailing) or out.dtype != dtype:
            raise ValueError(
                f"compute returned {tuple(out.shape)} {out.dtype}, expected {(job.rows, *trailing)} {dtype}"
            )
    return outputs


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _MeshPlan:
    """Who holds and who computes what, for the jobs sharded over one shard group.

    Every rank derives the same plan from the same jobs, so no handshake is needed.
    layouts[j][r] = (start, length) of rank r's rows of job j; buckets = job indices per
    bucket, in order; computes_on[j] = the ranks computing job j (its owner, its team, or
    every rank when replicated); team = this rank's ``RowBlockTeam`` (None: plain NS).
    """

    jobs: list[RowShardedJob]
    world: int
    rank: int
    group: dist.ProcessGroup
    device: torch.device
    layouts: list[list[tuple[int, int]]]
    in_specs: list[list[Spec]]
    buckets: list[list[int]]
    computes_on: list[list[int]]
    team: RowBlockTeam | None
    replicated: bool

    def in_bytes(self, j: int, r: int) -> int:
        """Packed bytes of rank r's rows of job j's inputs."""
        return sum(padded_nbytes(numel_of(self.layouts[j][r][1], tr), dt) for tr, dt in self.in_specs[j])

    def out_bytes(self, j: int, r: int) -> int:
        """Packed bytes of rank r's rows of job j's outputs."""
        return sum(padded_nbytes(numel_of(self.layouts[j][r][1], tr), dt) for tr, dt in self.jobs[j].output_specs)

    def rows_of(self, outputs: list[torch.Tensor], j: int, r: int) -> list[torch.Tensor]:
        """Rank r's rows of job j's full outputs (views)."""
        start, length = self.layouts[j][r]
        return [o[start : start + length] for o in outputs]

    def mine(self, k: int) -> list[int]:
        """The jobs of bucket k this rank computes, in job order."""
        return [j for j in self.buckets[k] if self.rank in self.computes_on[j]]

    def source(self, j: int, d: int) -> int:
        """The rank that sends rank d its rows of job j's result: team member d % size."""
        team = self.computes_on[j]
        return team[d % len(team)]


def _plan(jobs: list[RowShardedJob], mesh: RowShards, mode: str, row_blocks: int, bucket_bytes: float) -> _MeshPlan:
    world, rank = mesh.size(), mesh.local_rank()
    in_specs = [job.specs() for job in jobs]
    full_bytes = [
        sum(padded_nbytes(numel_of(job.rows, tr), dt) for tr, dt in specs) for job, specs in zip(jobs, in_specs)
    ]
    team: RowBlockTeam | None = RowBlockTeam(row_blocks) if row_blocks > 1 else None
    if mode == "distributed":
        buckets, computes_on = plan_teams([job.cost for job in jobs], full_bytes, world, row_blocks, bucket_bytes)
        size = min(row_blocks, world)
        if size > 1:
            groups = team_groups(mesh, size)
            t = rank // size
            team = GroupTeam(row_blocks, groups[t], rank % size, size) if t < len(groups) else None
    else:  # replicated: every rank computes every job, every block
        buckets = bucket_jobs(full_bytes, bucket_bytes)
        computes_on = [list(range(world)) for _ in jobs]
    first = jobs[0].inputs if not callable(jobs[0].inputs) else None
    device = first[0].device if first else torch.device(mesh.device_type)
    return _MeshPlan(
        jobs=jobs,
        world=world,
        rank=rank,
        group=mesh.group(),
        device=device,
        layouts=[shard_rows(job.rows, world) for job in jobs],
        in_specs=in_specs,
        buckets=buckets,
        computes_on=computes_on,
        team=team,
        replicated=mode == "replicated",
    )


def _post(
    send_pieces: list[torch.Tensor],
    send_splits: list[int],
    recv_splits: list[int],
    plan: _MeshPlan,
    stats: ExchangeStats,
) -> PendingExchange:
    """Pack and start one all_to_all; counts packing as visible communication."""
    t0 = time.perf_counter()
    send = pack(send_pieces, sum(send_splits), plan.device)
    pending = post_all_to_all(send, send_splits, recv_splits, plan.group)
    stats.comm_s += time.perf_counter() - t0
    stats.hold(sum(send_splits) + sum(recv_splits))
    stats.bytes_sent += sum(send_splits)
    stats.bytes_received += sum(recv_splits)
    return pending


def _wait(pending: PendingExchange, stats: ExchangeStats) -> None:
    sent = pending.send.numel() if pending.send is not None else 0
    stats.comm_s += pending.wait()
    stats.release(sent)


def _post_gather(plan: _MeshPlan, k: int, stats: ExchangeStats) -> PendingExchange:
    """Send each computing rank this rank's row-slices of bucket k's jobs it computes."""
    bucket = plan.buckets[k]
    local = {j: plan.jobs[j].load(plan.layouts[j][plan.rank][1], plan.rank) for j in bucket}
    pieces, send_splits = [], []
    for d in range(plan.world):
        todo = [j for j in bucket if d in plan.computes_on[j]]
        pieces += [t.contiguous() for j in todo for t in local[j]]
        send_splits.append(sum(plan.in_bytes(j, plan.rank) for j in todo))
    recv_splits = [sum(plan.in_bytes(j, s) for j in plan.mine(k)) for s in range(plan.world)]
    return _post(pieces, send_splits, recv_splits, plan, stats)


def _compute_bucket(
    plan: _MeshPlan, k: int, gathered: PendingExchange, stats: ExchangeStats
) -> dict[int, list[torch.Tensor]]:
    """Rebuild each job of bucket k this rank computes from the gathered slices (source
    s's slices sit back to back in its part of the buffer; concatenating over s in rank
    order rebuilds the exact matrix) and run it. Returns the full outputs by job index."""
    recv, outputs = gathered.recv, {}
    src_offset = [sum(gathered.recv_splits[:s]) for s in range(plan.world)]
    for j in plan.mine(k):
        t0 = time.perf_counter()
        parts: list[list[torch.Tensor]] = [[] for _ in plan.in_specs[j]]
        for s in range(plan.world):
            n_rows = plan.layouts[j][s][1]
            for i, (tr, dt) in enumerate(plan.in_specs[j]):
                parts[i].append(view_piece(recv, src_offset[s], n_rows, tr, dt))
                src_offset[s] += padded_nbytes(numel_of(n_rows, tr), dt)
        full_inputs = [torch.cat(p, dim=0) for p in parts]
        held = stats.hold(_nbytes(full_inputs))
        team_comm = plan.team.comm_s if plan.team else 0.0
        t1 = time.perf_counter()
        outputs[j] = _compute(plan.jobs[j], full_inputs, plan.team)
        t2 = time.perf_counter()
        team_comm = (plan.team.comm_s if plan.team else 0.0) - team_comm
        stats.compute_s += t2 - t1 - team_comm
        stats.comm_s += t1 - t0 + team_comm  # unpacking and a team's all-gathers
        stats.release(held)
        stats.hold(_nbytes(outputs[j]))
        stats.jobs_computed += 1
        stats.cost_computed += plan.jobs[j].cost
    stats.release(recv.numel())
    return outputs


def _post_scatter(
    plan: _MeshPlan, k: int, outputs: dict[int, list[torch.Tensor]], stats: ExchangeStats
) -> PendingExchange:
    """Send every rank its rows of each result of bucket k this rank is the source of.
    Empties ``outputs`` once packed, so the full results are freed."""
    mine = plan.mine(k)
    pieces, send_splits = [], []
    for d in range(plan.world):
        todo = [j for j in mine if plan.source(j, d) == plan.rank]
        pieces += [t.contiguous() for j in todo for t in plan.rows_of(outputs[j], j, d)]
        send_splits.append(sum(plan.out_bytes(j, d) for j in todo))
    recv_splits = [
        sum(plan.out_bytes(j, plan.rank) for j in plan.buckets[k] if plan.source(j, plan.rank) == s)
        for s in range(plan.world)
    ]
    pending = _post(pieces, send_splits, recv_splits, plan, stats)
    stats.release(sum(_nbytes(o) for o in outputs.values()))
    outputs.clear()
    return pending


def _finish_scatter(
    plan: _MeshPlan, k: int, pending: PendingExchange, on_result: OnResult, stats: ExchangeStats
) -> None:
    """Wait for bucket k's result rows and hand each job's rows to ``on_result``."""
    _wait(pending, stats)
    src_offset = [sum(pending.recv_splits[:s]) for s in range(plan.world)]
    n_mine = lambda j: plan.layouts[j][plan.rank][1]  # noqa: E731
    for j in plan.buckets[k]:
        s = plan.source(j, plan.rank)
        rows = []
        for tr, dt in plan.jobs[j].output_specs:
            rows.append(view_piece(pending.recv, src_offset[s], n_mine(j), tr, dt))
            src_offset[s] += padded_nbytes(numel_of(n_mine(j), tr), dt)
        on_result(j, rows)
    stats.release(pending.recv.numel())


def _run_on_mesh(
    jobs: list[RowShardedJob],
    mesh: RowShards,
    mode: str,
    row_blocks: int,
    bucket_bytes: float,
    overlap: bool,
    stats: ExchangeStats,
    on_result: OnResult,
) -> None:
    """Bucket by bucket: gather -> compute -> scatter; with ``overlap`` the next gather and
    the previous scatter are in flight during the compute. Every rank posts the
    collectives in the same order: G0, G1, S0, G2, S1, ... (G0, S0, G1, S1, ... without)."""
    plan = _plan(jobs, mesh, mode, row_blocks, bucket_bytes)
    stats.buckets += len(plan.buckets)
    if not plan.replicated:
        stats.owners.extend(c[0] for c in plan.computes_on)
    n = len(plan.buckets)
    gather = _post_gather(plan, 0, stats) if n else None
    in_flight: tuple[int, PendingExchange] | None = None
    for k in range(n):
        current = gather
        _wait(current, stats)
        if overlap and k + 1 < n:
            gather = _post_gather(plan, k + 1, stats)
        outputs = _compute_bucket(plan, k, current, stats)
        del current
        if plan.replicated:
            for j in plan.buckets[k]:
                on_result(j, plan.rows_of(outputs[j], j, plan.rank))
            stats.release(sum(_nbytes(o) for o in outputs.values()))
        else:
            scatter = _post_scatter(plan, k, outputs, stats)
            if in_flight is not None:
                _finish_scatter(plan, *in_flight, on_result, stats)
                in_flight = None
            if overlap:
                in_flight = (k, scatter)
            else:
                _finish_scatter(plan, k, scatter, on_result, stats)
        if not overlap and k + 1 < n:
            gather = _post_gather(plan, k + 1, stats)
    if in_flight is not None:
        _finish_scatter(plan, *in_flight, on_result, stats)


def run_row_sharded_jobs(
    jobs: Sequence[RowShardedJob],
    mode: str = "distributed",
    *,
    row_blocks: int = 1,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    overlap: bool = True,
    on_result: OnResult | None = None,
) -> tuple[list[list[torch.Tensor]] | None, ExchangeStats]:
    """Run every job's ``compute`` on its full rows and give each rank its rows of the outputs.

    Jobs without a mesh (plain tensors) and jobs on a 1-rank shard group are computed
    locally with no communication. Jobs on a larger group are grouped by it and exchanged in
    buckets of ``bucket_mb`` MiB of whole inputs (0: one bucket), with ``overlap`` of
    communication and compute. Every rank of a mesh must call this with the same jobs in
    the same order (same shapes, dtypes, costs), which holds for optimizer steps over the
    same param groups. ``row_blocks`` splits every job's NS (see the module docstring).

    ``on_result(j, rows)`` receives job j's outputs restricted to this rank's rows as soon
    as they arrive (views into a buffer that is freed afterwards: copy to keep). Without
    it, the rows of every job are returned as outputs[j] (every buffer stays alive).
    Returns (outputs or None, stats).
    """
    if mode not in NS_MODES:
        raise ValueError(f"ns_mode must be one of {NS_MODES}, got {mode!r}")
    if not isinstance(row_blocks, int) or row_blocks < 1:
        raise ValueError(f"ns_row_blocks must be an integer >= 1, got {row_blocks!r}")
    stats = ExchangeStats()
    collected: list[list[torch.Tensor] | None] = [None] * len(jobs)
    deliver = on_result or collected.__setitem__
    local_team = RowBlockTeam(row_blocks) if row_blocks > 1 else None
    by_mesh: list[tuple[RowShards, list[int]]] = []
    for j, job in enumerate(jobs):
        shards = as_row_shards(job.mesh)
        if shards is None or shards.size() == 1:
            inputs = job.load(job.rows, 0)
            t0 = time.perf_counter()
            out = _compute(job, inputs, local_team)
            stats.compute_s += time.perf_counter() - t0
            stats.jobs_computed += 1
            stats.cost_computed += job.cost
            deliver(j, out)
            continue
        for mesh, members in by_mesh:
            if mesh == shards:
                members.append(j)
                break
        else:
            by_mesh.append((shards, [j]))
    for mesh, members in by_mesh:
        _run_on_mesh(
            [jobs[j] for j in members],
            mesh,
            mode,
            row_blocks,
            bucket_mb * 2**20,
            overlap,
            stats,
            lambda i, rows, members=members: deliver(members[i], rows),
        )
    return (None if on_result else collected), stats  # type: ignore[return-value]
