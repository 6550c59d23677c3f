"""Who computes which whole-matrix job, and in which bucket: pure planning, no torch.

Every rank derives the same plan from the same job costs and sizes, so distributed
Newton-Schulz needs no handshake. ``benchmarks/scaling_model.py`` predicts from these
functions too.
"""

from __future__ import annotations

from collections.abc import Sequence

# MiB of whole matrices per all_to_all bucket (optim.ns_bucket_mb)
DEFAULT_BUCKET_MB = 16.0


def ns_cost(rows: int, cols: int) -> float:
    """Relative Newton-Schulz cost of a rows x cols matrix: rows * cols * min(rows, cols).

    Each NS step does ~4 m^2 n + 2 m^3 multiply-adds with m = min, n = max dimension,
    i.e. proportional to m^2 n (within a factor 1.5 for every aspect ratio).
    """
    return float(rows) * float(cols) * float(min(rows, cols))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each job: greedy longest-processing-time balancing.

    Jobs go heaviest first (ties: lower index first) to the currently least-loaded rank
    (ties: lower rank), which keeps the max load within 4/3 of optimal. Deterministic, so every
    rank computes the same assignment without communicating.
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


def bucket_jobs(nbytes: Sequence[int], bucket_bytes: float) -> list[list[int]]:
    """Consecutive job indices whose whole inputs add up to at most ``bucket_bytes``; a job
    larger than that is a bucket of its own; ``bucket_bytes <= 0``: one bucket."""
    buckets: list[list[int]] = [[]]
    total = 0
    for j, n in enumerate(nbytes):
        if buckets[-1] and bucket_bytes > 0 and total + n > bucket_bytes:
            buckets.append([])
            total = 0
        buckets[-1].append(j)
        total += n
    return buckets if buckets[0] else []


def plan_teams(
    costs: Sequence[float], nbytes: Sequence[int], world: int, row_blocks: int, bucket_bytes: float
) -> tuple[list[list[int]], list[list[int]]]:
    """(buckets, computes_on) of distributed mode.

    computes_on[j]: the ranks computing job j: one owner, or a team of
    s = min(row_blocks, world) consecutive ranks (ranks past the last whole team compute
    nothing); jobs go to teams by ``assign_owners`` over the whole step.

    buckets: K = ceil(total bytes / bucket_bytes) buckets (1 when bucket_bytes <= 0). Each
    team's jobs, in job order, are spread over the K buckets by their cumulative cost
    (a job goes to the bucket holding the midpoint of its cost), so every bucket asks
    about 1/K of every team's work: ranks that wait for each other at every bucket wait
    little. Buckets hold about ``bucket_bytes`` of whole inputs each.
    """
    size = min(row_blocks, world)
    n_teams = world // size
    team_of = assign_owners(costs, n_teams)
    computes_on = [list(range(t * size, (t + 1) * size)) for t in team_of]
    total = sum(nbytes)
    k_count = max(1, -(-total // int(bucket_bytes))) if bucket_bytes > 0 and total else 1
    loads = [0.0] * n_teams
    for j, t in enumerate(team_of):
        loads[t] += costs[j]
    done = [0.0] * n_teams
    bucket_of = []
    for j, t in enumerate(team_of):
        mid = (done[t] + costs[j] / 2) / loads[t] if loads[t] > 0 else 0.0
        bucket_of.append(min(k_count - 1, int(mid * k_count)))
        done[t] += costs[j]
    buckets = [[j for j in range(len(costs)) if bucket_of[j] == k] for k in range(k_count)]
    return [b for b in buckets if b], computes_on
