"""How the data-parallel ranks are laid out: FSDP over all ranks, or HSDP (``train.dp_shard``,
``train.dp_replicate``).

Every rank takes its own share of each global batch either way; the layout decides which
ranks hold which slice of the weights:

* FSDP (the default, ``dp_replicate = 1``): every parameter is split by rows over all
  ranks, so every layer's all-gather and reduce-scatter spans every rank.
* HSDP (``dp_replicate = R > 1``): the ranks form an R x S grid (replicate x shard; rank
  r * S + s sits at (r, s), so a row is S consecutive ranks, e.g. one node's GPUs).
  Parameters are split over the S ranks of a row and replicated over the R rows: every
  all-gather and reduce-scatter stays within a row, and only the all-reduce of each
  rank's gradient shard crosses rows.

The layout changes the order in which gradients are summed (losses agree to float
rounding), not the math: it is an EXECUTION key, and a checkpoint resumes on another one.
"""

from __future__ import annotations

from normopt.errors import UserError


def data_parallel_shape(replicate: int, shard: int, world_size: int) -> tuple[int, int]:
    """(R, S) with R * S = ``world_size``; a 0 stands for world_size divided by the other
    (both 0 is refused by the config's own check).

    A one-line UserError naming the keys when no such grid exists (checked before any rank
    starts by ``normopt check --nproc N`` and the launcher, and again by the trainer)."""
    if shard == 0 or replicate == 0:
        given, key = (replicate, "dp_replicate") if shard == 0 else (shard, "dp_shard")
        if given == 0 or world_size % given:
            raise UserError(f"train.{key}: {given} does not divide the {world_size} ranks of this run")
        rest = world_size // given
        return (given, rest) if shard == 0 else (rest, given)
    if replicate * shard != world_size:
        raise UserError(
            f"train.dp_replicate x train.dp_shard: {replicate} x {shard} = {replicate * shard} "
            f"ranks, but this run has {world_size} (set one of them to 0 for the rest)"
        )
    return replicate, shard
