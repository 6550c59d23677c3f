"""Analytic scaling model of owner-based distributed Newton-Schulz (Muon's NS under FSDP2).

    python benchmarks/scaling_model.py                       # 1b, 2.8b, 8b, 70b at 8..1024 ranks
    python benchmarks/scaling_model.py --ranks 128 512 --json rows.json
    python benchmarks/scaling_model.py --measure --measure-scale 16   # time/FLOP measured here

Every block matrix has ONE owner (``assign_owners`` over ``ns_cost``, the framework's own
code). Per step: all_to_all #1 gathers each matrix's row shards (bf16) to its owner, the
owner runs NS, all_to_all #2 scatters the result rows back. With ``--row-blocks`` it also
prints, at 256 ranks and more, teams of ranks splitting each matrix's NS in row blocks
(``optim.ns_row_blocks``: ``member_shares``, ``team_allgather_bytes``). Buckets and overlap
(``optim.ns_bucket_mb``, ``ns_overlap``) change when bytes move, not how many. For every model x rank count
this prints the per-rank NS work and time, load balance, speedup over one rank, the
communication per rank, a training step time, and the "wall cost": the NS time the
slowest owner spends above the ideal even split (total / ranks), as a share of the step.
Nothing here runs a collective: it is arithmetic on the shapes, except ``--measure``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from normopt.models.presets import PRESETS, ModelArgs, count_parameters  # noqa: E402
from normopt.parallel.ns_plan import assign_owners, ns_cost  # noqa: E402
from normopt.parallel.row_layout import shard_rows  # noqa: E402

BF16_BYTES = 2
LLAMA3_VOCAB = 128256
DEFAULT_RANKS = (8, 64, 256, 1024)
WALL_THRESHOLD = 0.01  # flag a wall cost above 1% of the step


def model_zoo() -> dict[str, ModelArgs]:
    """1b and 2.8b from PRESETS; 8b (Llama-3-8B) and 70b (Llama-3-70B) derived from the 2.8b preset."""
    base = PRESETS["2.8b"]
    llama3 = dict(vocab_size=LLAMA3_VOCAB, rope_theta=500000.0, tie_embeddings=False)
    return {
        "1b": PRESETS["1b"],
        "2.8b": PRESETS["2.8b"],
        "8b": replace(base, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, **llama3),
        "70b": replace(base, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672, **llama3),
    }


def muon_shapes(args: ModelArgs) -> list[tuple[str, int, int]]:
    """(parameter name, rows, cols) of every block matrix, rows x cols = out x in:
    wq, wo (d, d); wk, wv (kv, d) with kv = n_kv_heads * head_dim; w1, w3 (f, d); w2 (d, f)."""
    d, kv, f = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden
    per_layer = [
        ("attn.wq", d, d),
        ("attn.wk", kv, d),
        ("attn.wv", kv, d),
        ("attn.wo", d, d),
        ("ffn.w1", f, d),
        ("ffn.w3", f, d),
        ("ffn.w2", d, f),
    ]
    return [(f"layers.{i}.{name}.weight", r, c) for i in range(args.n_layers) for name, r, c in per_layer]


def ns_flops(rows: int, cols: int, steps: int = 5) -> float:
    """FLOPs of ``newton_schulz`` on a rows x cols matrix, from ``ns_step`` with m = min, n = max
    (NS runs on the wide orientation): per step A = X X^T costs 2 m^2 n, A @ A 2 m^3, B @ X 2 m^2 n,
    so steps * (4 m^2 n + 2 m^3). Elementwise work (scalings, the normalization) is left out."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def rank_loads(values: list[float], owners: list[int], world: int) -> list[float]:
    """load[r] = sum of values[j] over the matrices j that rank r owns."""
    loads = [0.0] * world
    for v, r in zip(values, owners):
        loads[r] += v
    return loads


def team_gather_bytes(
    shapes: list[tuple[str, int, int]], teams: list[list[int]], world: int, itemsize: int = BF16_BYTES
) -> tuple[list[int], list[int]]:
    """``gather_bytes`` when each matrix goes to every rank of its team (``ns_row_blocks``):
    rank r sends its row shard to each team member other than itself."""
    sent, recv = [0] * world, [0] * world
    for (_, rows, cols), team in zip(shapes, teams):
        for r, (_, length) in enumerate(shard_rows(rows, world)):
            for member in team:
                if member != r and length:
                    sent[r] += length * cols * itemsize
                    recv[member] += length * cols * itemsize
    return sent, recv


def team_allgather_bytes(
    rows: int, cols: int, blocks: int, size: int, steps: int = 5, itemsize: int = BF16_BYTES
) -> int:
    """Bytes one member of a ``size``-rank team receives in the all-gathers of a row-block
    NS (``row_block_team``): per step A (m x m) and X (m x n), each member's blocks padded
    to the largest member's row count w, so (size - 1) * w * (m + n) elements per step."""
    m, n = min(rows, cols), max(rows, cols)
    layout = shard_rows(m, blocks)
    w = max(sum(layout[b][1] for b in range(i, blocks, size)) for i in range(size))
    return steps * (size - 1) * w * (m + n) * itemsize


def member_shares(rows: int, cols: int, blocks: int, size: int) -> list[float]:
    """Share of a matrix's NS FLOPs each team member computes: every product of a
    row-block step is linear in the block's rows, so member i does sum(r_b) / m of the
    work over its blocks b = i, i + size, ..."""
    m = min(rows, cols)
    layout = shard_rows(m, blocks)
    return [sum(layout[b][1] for b in range(i, blocks, size)) / m for i in range(size)]


def gather_bytes(
    shapes: list[tuple[str, int, int]], owners: list[int], world: int, itemsize: int = BF16_BYTES
) -> tuple[list[int], list[int]]:
    """(sent[r], received[r]) in all_to_all #1: rank r sends its torch.chunk row shard
    (``shard_rows``) of every matrix it does not own to the owner, rows_r * cols * itemsize
    bytes; an owner receives the shards of its matrices from every other rank. A rank's own
    shard is a local copy and not counted; the 16-byte alignment padding is left out.
    All_to_all #2 (the scatter of the result rows) is the mirror image: sent and received swap."""
    sent, recv = [0] * world, [0] * world
    for (_, rows, cols), owner in zip(shapes, owners):
        for r, (_, length) in enumerate(shard_rows(rows, world)):
            if r != owner and length:
                nbytes = length * cols * itemsize
                sent[r] += nbytes
                recv[owner] += nbytes
    return sent, recv


def comm_time_s(sent: list[int], recv: list[int], bandwidth_gbps: float) -> float:
    """Both all_to_alls on full-duplex links of ``bandwidth_gbps`` GB/s per rank: each one lasts
    max over ranks of max(sent, received) / bandwidth, and the scatter mirrors the gather: 2x."""
    worst = max(max(s, r) for s, r in zip(sent, recv))
    return 2.0 * worst / (bandwidth_gbps * 1e9)


def step_time_s(n_params: int, tokens_per_rank: int, mfu: float, peak_tflops: float) -> float:
    """Training step time per rank: 6 N tokens_per_rank / (MFU * peak) (weak scaling: the
    step time does not depend on the rank count)."""
    return 6.0 * n_params * tokens_per_rank / (mfu * peak_tflops * 1e12)


def matrix_ns_times(shapes: list[tuple[str, int, int]], seconds_per_flop) -> list[float]:
    """NS seconds of each matrix: ns_flops(rows, cols) * seconds_per_flop(rows, cols)."""
    return [ns_flops(r, c) * seconds_per_flop(r, c) for _, r, c in shapes]


def predict(name: str, args: ModelArgs, world: int, seconds_per_flop, opts, row_blocks: int = 1) -> dict:
    """One table row: model ``name`` on ``world`` ranks (see the module docstring). With
    ``row_blocks`` P > 1 each matrix goes to a team of s = min(P, world) ranks (teams of
    consecutive ranks, owners over teams by ``assign_owners``) that split its NS by rows."""
    shapes = muon_shapes(args)
    size = min(row_blocks, world)
    n_teams = world // size
    team_of = assign_owners([ns_cost(r, c) for _, r, c in shapes], n_teams)
    teams = [list(range(t * size, (t + 1) * size)) for t in team_of]
    owners = [team[0] for team in teams]
    flop_each, times = [ns_flops(r, c) for _, r, c in shapes], matrix_ns_times(shapes, seconds_per_flop)
    flops, loads, team_recv = [0.0] * world, [0.0] * world, [0] * world
    for (_, r, c), team, f, t in zip(shapes, teams, flop_each, times):
        for member, share in zip(team, member_shares(r, c, row_blocks, size) if size > 1 else [1.0]):
            flops[member] += f * share
            loads[member] += t * share
            if size > 1:
                team_recv[member] += team_allgather_bytes(r, c, row_blocks, size)
    total, ns_max = sum(times), max(loads)
    ideal = total / world
    sent, recv = team_gather_bytes(shapes, teams, world)
    moved = [2 * (s + r) + a for s, r, a in zip(sent, recv, team_recv)]  # both collectives + team all-gathers
    step = step_time_s(count_parameters(args), opts.tokens_per_rank, opts.mfu, opts.peak_tflops)
    wall = max(0.0, ns_max - ideal) / step  # clamp float round-off at an exact split
    return dict(
        model=name,
        ranks=world,
        matrices=len(shapes),
        params=count_parameters(args),
        mats_per_rank_max=max(rank_loads([1.0] * len(shapes), owners, world)),
        ns_tflop_max=max(flops) / 1e12,
        ns_tflop_mean=sum(flops) / world / 1e12,
        ns_ms_max=ns_max * 1e3,
        ns_ms_mean=ideal * 1e3,
        balance=ns_max / ideal if ideal else 1.0,
        speedup=total / ns_max if ns_max else 1.0,
        comm_mb_max=max(moved) / 1e6,
        comm_mb_mean=sum(moved) / world / 1e6,
        comm_ms=comm_time_s(sent, recv, opts.bandwidth_gbps) * 1e3,
        team_comm_ms=max(team_recv) / (opts.team_bandwidth_gbps * 1e9) * 1e3 if size > 1 else 0.0,
        row_blocks=row_blocks,
        owners=owners,
        step_s=step,
        wall_pct=100.0 * wall,
        floor_pct=100.0 * max(times) / step,
        over_threshold=wall > WALL_THRESHOLD,
    )


def wall_scan(name: str, args: ModelArgs, candidates: list[int], seconds_per_flop, opts) -> list[tuple[int, float]]:
    """(ranks, wall %) of ``name`` at every rank count in ``candidates``, ascending."""
    return [(w, predict(name, args, w, seconds_per_flop, opts)["wall_pct"]) for w in sorted(candidates)]


def crossover(scan: list[tuple[int, float]], threshold_pct: float = 100.0 * WALL_THRESHOLD) -> int | None:
    """Smallest rank count of an ascending ``wall_scan`` from which on (for it and every larger
    count) the wall cost exceeds ``threshold_pct`` % of the step; None if there is none."""
    first = None
    for world, wall_pct in scan:
        first = (first or world) if wall_pct > threshold_pct else None
    return first


def measure_seconds_per_flop(shapes: list[tuple[str, int, int]], scale: int, repeats: int, dtype_name: str):
    """Run the real ``newton_schulz`` on every distinct shape with each dim divided by ``scale``
    on the local device; returns (rows, cols) -> best seconds / ns_flops at that reduced shape."""
    import torch

    from normopt.optim.newton_schulz import newton_schulz

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {
        "auto": torch.bfloat16 if device == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[dtype_name]
    table = {}
    for rows, cols in sorted({(r, c) for _, r, c in shapes}):
        r, c = max(1, rows // scale), max(1, cols // scale)
        G = torch.randn(r, c, device=device)
        newton_schulz(G, 5, dtype=dtype)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            newton_schulz(G, 5, dtype=dtype)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        table[(rows, cols)] = best / ns_flops(r, c)
    note = (
        f"MEASURED here: newton_schulz on {device} in {dtype}, dims / {scale}, best of {repeats} "
        "(the step time still assumes --mfu x --peak-tflops)"
    )
    return (lambda rows, cols: table[(rows, cols)]), note


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':<6}{'ranks':>6}{'mats/rk':>8}{'NS TFLOP/rk':>12}{'(mean)':>8}{'NS ms/rk':>10}"
        f"{'(mean)':>10}{'max/mean':>9}{'speedup':>9}{'comm MB/rk':>11}{'(mean)':>8}{'comm ms':>9}"
        f"{'step s':>8}{'wall %':>8}{'floor %':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        flag = "  <-- wall > 1% of step" if r["over_threshold"] else ""
        print(
            f"{r['model']:<6}{r['ranks']:>6}{r['mats_per_rank_max']:>8.0f}{r['ns_tflop_max']:>12.2f}"
            f"{r['ns_tflop_mean']:>8.2f}{r['ns_ms_max']:>10.2f}{r['ns_ms_mean']:>10.2f}{r['balance']:>9.2f}"
            f"{r['speedup']:>9.1f}{r['comm_mb_max']:>11.0f}{r['comm_mb_mean']:>8.0f}{r['comm_ms']:>9.2f}"
            f"{r['step_s']:>8.3f}{r['wall_pct']:>8.2f}{r['floor_pct']:>8.2f}{flag}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["1b", "2.8b", "8b", "70b"], choices=list(model_zoo()))
    p.add_argument("--ranks", type=int, nargs="+", default=[], help="rank counts added to 8 64 256 1024")
    p.add_argument("--ns-tflops", type=float, default=400.0, help="ASSUMED effective bf16 NS TFLOP/s per GPU")
    p.add_argument("--bandwidth-gbps", type=float, default=50.0, help="ASSUMED GB/s per rank, each direction")
    p.add_argument(
        "--row-blocks",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="ns_row_blocks to compare against one owner per matrix at 256+ ranks",
    )
    p.add_argument(
        "--team-bandwidth-gbps",
        type=float,
        default=400.0,
        help="ASSUMED GB/s per rank inside a row-block team (consecutive ranks: one node)",
    )
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200: 989)")
    p.add_argument("--measure", action="store_true", help="time newton_schulz here instead of --ns-tflops")
    p.add_argument("--measure-scale", type=int, default=8, help="--measure: divide every dim by this")
    p.add_argument("--measure-repeats", type=int, default=1)
    p.add_argument("--measure-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--json", default=None, help="write the rows to this path")
    opts = p.parse_args(argv)
    zoo = {k: v for k, v in model_zoo().items() if k in opts.models}
    ranks = sorted(set(DEFAULT_RANKS) | set(opts.ranks))
    if opts.measure:
        all_shapes = [s for a in zoo.values() for s in muon_shapes(a)]
        spf, ns_note = measure_seconds_per_flop(
            all_shapes, opts.measure_scale, opts.measure_repeats, opts.measure_dtype
        )
    else:
        spf = lambda rows, cols: 1.0 / (opts.ns_tflops * 1e12)  # noqa: E731
        ns_note = f"ASSUMED {opts.ns_tflops:g} TFLOP/s effective bf16 NS throughput per GPU, every shape"

    print("Owner-based distributed Newton-Schulz: analytic scaling model (per optimizer step)")
    print(f"  NS: 5 quintic steps, FLOPs = 5 (4 m^2 n + 2 m^3), m/n = min/max dim; time: {ns_note}")
    print("  owners: normopt assign_owners(ns_cost) (greedy LPT); one owner per matrix")
    print(
        f"  comm: bf16 row shards, 2 all_to_alls (gather + scatter), own shard not counted; "
        f"ASSUMED {opts.bandwidth_gbps:g} GB/s per rank each direction, time = 2 max_r max(sent, recv) / BW"
    )
    print(
        f"  step: 6 N x {opts.tokens_per_rank} tokens/rank / ({opts.mfu:g} MFU x {opts.peak_tflops:g} TFLOP/s) "
        "(ASSUMED; N from count_parameters, vocab 32768 for 1b/2.8b, 128256 for 8b/70b)"
    )
    print(
        "  wall % = (max NS ms/rank - mean NS ms/rank) / step; floor % = largest matrix's NS / step; "
        "speedup = total NS / max NS per rank"
    )
    for name, a in zoo.items():
        shapes = muon_shapes(a)
        print(
            f"  {name}: dim {a.dim}, {a.n_layers} layers, kv {a.n_kv_heads * a.head_dim}, ffn {a.ffn_hidden}; "
            f"{len(shapes)} matrices, {count_parameters(a) / 1e9:.2f}B params"
        )
    print()
    rows = [predict(name, a, w, spf, opts) for name, a in zoo.items() for w in ranks]
    print_table(rows)
    candidates = sorted(set(ranks) | {2**k for k in range(1, max(ranks).bit_length())})
    print(f"\nCrossover (rank counts scanned: {' '.join(map(str, candidates))}):")
    for name, a in zoo.items():
        scan = wall_scan(name, a, candidates, spf, opts)
        n = crossover(scan)
        verdict = (
            f"the one-owner wall costs >1% of the step from {n} ranks on" if n else f"not within {max(ranks)} ranks"
        )
        print(f"  {name}: {verdict}  (wall %: " + ", ".join(f"{w}: {x:.2f}" for w, x in scan) + ")")
    big = [w for w in ranks if w >= 256]
    if big and opts.row_blocks:
        print(
            f"\nRow-block teams (optim.ns_row_blocks = P: a team of min(P, ranks) consecutive ranks splits each "
            f"matrix's NS; team all-gathers at ASSUMED {opts.team_bandwidth_gbps:g} GB/s):"
        )
        head = f"{'model':<6}{'ranks':>6}{'P':>4}{'NS ms/rk':>10}{'max/mean':>9}{'wall %':>8}{'team comm ms':>13}"
        print(head)
        print("-" * len(head))
        for name, a in zoo.items():
            for w in big:
                for P in [1, *opts.row_blocks]:
                    r = predict(name, a, w, spf, opts, row_blocks=P)
                    rows.append(r) if P > 1 else None
                    flag = "  <-- wall > 1% of step" if r["over_threshold"] else ""
                    print(
                        f"{name:<6}{w:>6}{P:>4}{r['ns_ms_max']:>10.2f}{r['balance']:>9.2f}{r['wall_pct']:>8.2f}"
                        f"{r['team_comm_ms']:>13.2f}{flag}"
                    )
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
        print(f"rows written to {opts.json}")


if __name__ == "__main__":
    main()
