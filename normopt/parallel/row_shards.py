"""Which ranks a parameter's rows are split over, on a 1-D (FSDP) or 2-D (HSDP) mesh.

FSDP2 on a 1-D mesh gives every parameter the placement ``(Shard(0),)``: the rows are
split over every rank. On a 2-D mesh ``(dp_replicate, dp_shard)`` (HSDP) the placement is
``(Replicate(), Shard(0))``: the rows are split over the ``dp_shard`` ranks of one replica,
and every replica holds the same split. Whole-matrix work (Newton-Schulz, a power
iteration, a norm over shards) therefore runs within one shard group, and each replica
group runs the same work on the same bits.

:class:`RowShards` names that group without slicing the mesh: the mesh and the dimension
the rows are split along. Its ``rank_groups`` lists the global ranks of *every* replica's
shard group, identically on every rank, which is what a collective call such as
``new_group`` needs (every rank of the default group creates every group, in one order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from normopt.parallel import collectives


@dataclass(frozen=True)
class RowShards:
    """The rows of a tensor split (torch.chunk style) along dimension ``dim`` of ``mesh``,
    replicated along every other dimension."""

    mesh: DeviceMesh
    dim: int = 0

    def size(self) -> int:
        """Ranks the rows are split over (the shard degree)."""
        return self.mesh.size(self.dim)

    def local_rank(self) -> int:
        """This rank's index within its shard group (which rows it holds)."""
        return self.mesh.get_local_rank(self.dim)

    def group(self) -> dist.ProcessGroup:
        """This rank's shard group."""
        return self.mesh.get_group(self.dim)

    @property
    def device_type(self) -> str:
        return self.mesh.device_type

    def rank_groups(self) -> list[list[int]]:
        """Global ranks of every shard group (one per replica), each in shard order; the
        same list on every rank. The mesh tensor holds the global rank at each coordinate:
        moving ``dim`` last and flattening the rest enumerates the groups."""
        ranks = self.mesh.mesh.movedim(self.dim, -1).reshape(-1, self.size())
        return [[int(r) for r in row] for row in ranks.tolist()]


def row_shards_of(t: torch.Tensor) -> RowShards | None:
    """The :class:`RowShards` of a DTensor whose placements are one ``Shard(0)`` and
    otherwise ``Replicate()`` (FSDP2 and HSDP parameters, gradients and row statistics);
    None for a plain tensor. Any other layout is a ValueError: whole-matrix work could not
    find the whole matrix in one group."""
    if not isinstance(t, DTensor):
        return None
    placements = tuple(t.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    others_replicate = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in shard_dims)
    if len(shard_dims) != 1 or placements[shard_dims[0]].dim != 0 or not others_replicate:
        raise ValueError(
            f"expected a DTensor with one Shard(0) placement and Replicate() on every other mesh dimension "
            f"(FSDP2 or HSDP); got placements {placements} on a {t.device_mesh.ndim}-D mesh"
        )
    return RowShards(t.device_mesh, shard_dims[0])


def as_row_shards(mesh: DeviceMesh | RowShards | None) -> RowShards | None:
    """A 1-D DeviceMesh as the RowShards of its only dimension; RowShards and None as given."""
    if mesh is None or isinstance(mesh, RowShards):
        return mesh
    if mesh.ndim != 1:
        raise ValueError(f"a DeviceMesh of row shards must be 1-D, got {mesh.ndim}-D (pass RowShards(mesh, dim))")
    return RowShards(mesh, 0)


_TEAM_GROUPS: dict[tuple[dist.ProcessGroup, int], list[dist.ProcessGroup]] = {}


def team_groups(shards: RowShards, size: int) -> list[dist.ProcessGroup]:
    """This shard group's teams: one process group per ``size`` consecutive ranks of the
    group (a team splits one matrix's NS in row blocks, ``row_block_team``).

    ``new_group`` is collective over the default group, so every rank creates the teams of
    every replica's shard group, in replica order, and keeps those of its own group.
    Created once per (shard group, size); keyed by the process group, so a new process
    group never reuses the teams of an old one."""
    key = (shards.group(), size)
    if key not in _TEAM_GROUPS:
        mine = None
        me = collectives.rank()
        for ranks in shards.rank_groups():
            teams = [collectives.new_group(ranks[t * size : (t + 1) * size]) for t in range(len(ranks) // size)]
            if me in ranks:
                mine = teams
        _TEAM_GROUPS[key] = mine if mine is not None else []
    return _TEAM_GROUPS[key]
