"""Every collective normopt issues, with its tensors on the device the process group needs.

nccl reduces CUDA tensors only and gloo (normopt's CPU backend) CPU tensors only: a flag
built with ``torch.tensor([...])`` lands on the CPU and an nccl all-reduce of it fails
("No backend type associated with device type cpu"), which once crashed every GPU run at
its first checkpoint. So no module calls ``torch.distributed``'s collectives itself (a test
over the source enforces it); they call the functions here, which move a tensor to
:func:`group_device` when it is elsewhere and copy the result back in place.

Asynchronous collectives (the Muon exchange) cannot copy back after the caller's ``wait``,
so they require their buffers on the group's device and say so when they are not.
Every function is a no-op (or the identity) when no process group is initialised, so a
one-process caller needs no branch of its own.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# the device whose tensors each backend accepts (None: the current CUDA device)
BACKEND_DEVICE_TYPE = {"nccl": "cuda", "gloo": "cpu"}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def device_for_backend(backend: str) -> torch.device:
    """The device whose tensors ``backend`` takes: the current CUDA device for nccl, the
    CPU for gloo. A backend string naming both (``cpu:gloo,cuda:nccl``) takes either; the
    CUDA device is chosen then, as the faster path."""
    backend = backend.lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    raise ValueError(f"no device known for process-group backend {backend!r}")


def group_device(group: ProcessGroup | None = None) -> torch.device:
    """The device of ``group``'s backend (the default group when None); the CPU without one."""
    if not is_distributed():
        return torch.device("cpu")
    return device_for_backend(str(dist.get_backend(group)))


def _on_group_device(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    device = group_device(group)
    return tensor if tensor.device == device else tensor.to(device)


def _require_group_device(tensor: torch.Tensor, group: ProcessGroup | None, what: str) -> None:
    device = group_device(group)
    if tensor.device != device:
        raise RuntimeError(f"{what}: buffer on {tensor.device}, but the {dist.get_backend(group)} group needs {device}")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup | None = None) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` in place (``op``: sum, max or min); returns it.
    The identity with one rank or none."""
    if world_size(group) <= 1:
        return tensor
    work = _on_group_device(tensor, group)
    dist.all_reduce(work, op=REDUCE_OPS[op], group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    return all_reduce(tensor, "sum", group)


def any_rank(flag: bool, group: ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is true on any."""
    return bool(all_reduce(torch.tensor([int(flag)]), "max", group).item())


def barrier(group: ProcessGroup | None = None) -> None:
    if is_distributed():
        # nccl's barrier takes the current device from set_device; gloo's needs nothing
        dist.barrier(group=group)


def all_gather(tensor: torch.Tensor, group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in rank order, on ``tensor``'s device."""
    if world_size(group) <= 1:
        return [tensor]
    work = _on_group_device(tensor, group)
    gathered = [torch.empty_like(work) for _ in range(world_size(group))]
    dist.all_gather(gathered, work, group=group)
    return [g if g.device == tensor.device else g.to(tensor.device) for g in gathered]


def all_to_all_single(
    recv: torch.Tensor,
    send: torch.Tensor,
    recv_splits: list[int],
    send_splits: list[int],
    group: ProcessGroup | None = None,
    async_op: bool = False,
):
    """Uneven all_to_all of ``send`` into ``recv`` (both already on the group's device, as
    the caller reads ``recv`` after an asynchronous wait); returns the work handle when
    ``async_op``."""
    _require_group_device(send, group, "all_to_all_single")
    _require_group_device(recv, group, "all_to_all_single")
    return dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group, async_op=async_op)


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a small picklable value that this process made
    itself; never use it for data read from disk)."""
    if world_size(group) <= 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group, device=group_device(group))
    return holder[0]


def all_gather_object(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj`` in rank order (small values this process computed itself)."""
    if world_size(group) <= 1:
        return [obj]
    gathered: list[Any] = [None] * world_size(group)
    # under nccl the objects are staged through the current CUDA device (set at start-up)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def new_group(ranks: list[int] | None = None, backend: str | None = None, timeout=None) -> ProcessGroup | None:
    """A process group (collective: every rank of the default group calls it in the same
    order), its collectives bounded by ``timeout`` (a timedelta), else by the phase's timeout
    as the default group's are (``follow_phase``); None without a default group."""
    if not is_distributed():
        return None
    group = dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
    if timeout is None:
        follow_phase(group)
    return group


_phase = ["start-up"]  # the phase whose timeout the default group has now
_following: list[ProcessGroup] = []  # groups besides the default one whose timeout follows the phase


def follow_phase(group) -> None:
    """Bound ``group``'s collectives by the phase's timeout from now on, as the default
    group's are (the sub-groups of an HSDP mesh, row-block teams): a step that hangs in any
    of them ends within the step timeout, not the start-up one it was created with. A group
    this rank is not in is left alone."""
    if not isinstance(group, ProcessGroup) or any(group is known for known in _following):
        return
    if is_distributed() and group is dist.group.WORLD:
        return
    _following.append(group)
    _apply_phase(group)


def _apply_phase(group: ProcessGroup | None) -> None:
    from normopt.parallel.timeouts import collective_timeout

    dist.distributed_c10d._set_pg_timeout(collective_timeout(_phase[0]), group)


def set_phase_timeout(phase: str) -> None:
    """Bound the collectives of the default group and of the groups that follow it by
    ``phase``'s timeout (``normopt.parallel.timeouts``) from now on; nothing without a group."""
    _phase[0] = phase
    if is_distributed():
        _apply_phase(None)
        for group in _following:
            _apply_phase(group)


@contextlib.contextmanager
def phase_timeout(phase: str):
    """``phase``'s timeout on the default group for the body of the ``with``, then the one before."""
    before = _phase[0]
    set_phase_timeout(phase)
    try:
        yield
    finally:
        if is_distributed():
            set_phase_timeout(before)
        else:
            _phase[0] = before
