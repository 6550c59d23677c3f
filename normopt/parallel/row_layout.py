"""How FSDP2 (DTensor ``Shard(0)``) splits the rows of a parameter over ranks.

Shard(0) splits ``rows`` like ``torch.chunk``: every rank gets ceil(rows / world) rows
except the tail, which may be short or empty (13 rows on 3 ranks: 5, 5, 3; 2 rows on 3
ranks: 1, 1, 0). Row blocks of a split Newton-Schulz use the same rule.
"""

from __future__ import annotations


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
