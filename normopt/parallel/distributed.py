"""Process group and device mesh setup, and the teardown that keeps gloo runs from aborting."""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from normopt.errors import UserError
from normopt.parallel import collectives
from normopt.parallel.timeouts import collective_timeout


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_replicate(self) -> int:
        """Copies of the sharded weights: 1 under FSDP, the replica groups under HSDP."""
        return self.mesh.size(0) if self.mesh.ndim == 2 else 1

    @property
    def dp_shard(self) -> int:
        """Ranks each parameter is split over: all of them under FSDP, one row under HSDP."""
        return self.mesh.size(self.mesh.ndim - 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device_type(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda was asked for but no CUDA device is available")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join (or, under plain ``python``, create) the process group: nccl on CUDA, gloo on CPU.

    A plain ``python train.py`` becomes a one-rank job so that one code path (FSDP2 on a
    device mesh) serves 1 and N ranks alike.
    """
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = pick_device_type(device_preference)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # start-up's timeout until the loop begins (``normopt.parallel.timeouts``); gloo's
        # default would hold a rank for 30 minutes on a peer that never arrives
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            device_id=device if device_type == "cuda" else None,
            timeout=collective_timeout("start-up"),
        )
    mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    collectives.follow_phase(mesh.get_group("dp"))
    return DistInfo(rank, world_size, local_rank, device, mesh)


def data_parallel_mesh(device_type: str, replicate: int, shard: int) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D ``("dp",)`` of ``shard`` ranks for FSDP
    (``replicate`` 1); 2-D ``("dp_replicate", "dp_shard")`` for HSDP, on which
    ``fully_shard`` splits parameters over the last dimension and replicates them over the
    first (torch's ``HSDPMeshInfo(shard_mesh_dim=1, replicate_mesh_dim=0)``). Rank
    r * shard + s sits at (r, s): a shard group is ``shard`` consecutive ranks (one node's
    GPUs when shard = GPUs per node). Collective: every rank calls it in the same order."""
    if replicate == 1:
        mesh = init_device_mesh(device_type, (shard,), mesh_dim_names=("dp",))
    else:
        mesh = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    for name in mesh.mesh_dim_names:  # their collectives are bounded by the phase's timeout too
        collectives.follow_phase(mesh.get_group(name))
    return mesh


def with_data_parallel_layout(info: DistInfo, replicate: int, shard: int) -> DistInfo:
    """``info`` on the data-parallel layout ``replicate`` x ``shard`` (= its world size):
    as it is for FSDP (its 1-D mesh already spans every rank), with a 2-D mesh for HSDP."""
    if replicate * shard != info.world_size:
        raise ValueError(f"a {replicate} x {shard} layout does not fit {info.world_size} ranks")
    if replicate == 1:
        return info
    return dataclasses.replace(info, mesh=data_parallel_mesh(info.device.type, replicate, shard))


def shutdown_distributed() -> None:
    """Collect released FSDP modules, then destroy the process group.

    On gloo, destroying the group (or exiting) while FSDP2 modules are alive aborts the
    interpreter in a large share of runs. Callers drop every reference to the model and
    optimizers first (tracebacks included); the collection here frees what cycles remain.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
