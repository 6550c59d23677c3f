"""Muon optimizer-step time on the 1B Llama preset's matrix shapes: single process,
replicated NS and distributed NS under FSDP2 at several rank counts.

    python benchmarks/bench_muon.py                      # dims / 4, 16 layers, ranks 1 2 3
    python benchmarks/bench_muon.py --scale 1 --layers 1 --ranks 2

The 1B preset (dim 2048, 16 layers) has per layer q, o: 2048x2048; k, v: 512x2048;
gate, up: 8192x2048; down: 2048x8192 (rows x cols = out x in). On CPU its 960M matrix
parameters need ~15 GB per copy and ~45 TFLOP of NS per step, so by default every
dimension is divided by --scale 4 (the mix of shapes and the 112 matrices, which matter
for owner balancing, are kept); the header says what ran.

Each rank count runs as one torchrun job (gloo, one intra-op thread per rank) with random
gradients. Inside the job every configuration is timed round robin, one step each per
round after a warm-up step, so drift of the machine hits all of them alike; the
single-process baseline ("1 process") runs in the same job on rank 0 alone, on an
unsharded copy, while the other ranks wait at a barrier. NS runs in bf16 where the CPU has
native bf16 matmuls and in fp32 where bf16 is emulated (--ns-dtype auto, printed).

Configurations (--variants): "replicated" (every rank runs every NS), "overlap" (the
default distributed step: buckets of --bucket-mb with async gather/scatter overlapping
NS), "no overlap" (same buckets, each collective waited for at once), "one bucket" (the
whole step in one gather/scatter pair, as before buckets existed), "batched" (overlap
plus ns_batch_size 4). Reported per configuration: median over rounds of the slowest
rank's step time, per-rank NS compute time (max and mean over ranks), visible
communication (packing, unpacking, time blocked on a collective), MiB sent, buckets and the
peak bytes of exchange buffers held at once. The last lines print the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from normopt.optim.muon import Muon  # noqa: E402
from normopt.parallel.ns_plan import DEFAULT_BUCKET_MB  # noqa: E402

FULL = dict(dim=2048, kv_dim=512, ffn_dim=8192, layers=16)


def layer_shapes(dim: int, kv_dim: int, ffn_dim: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of one Llama block's matrices."""
    return [
        ("attention.wq", (dim, dim)),
        ("attention.wk", (kv_dim, dim)),
        ("attention.wv", (kv_dim, dim)),
        ("attention.wo", (dim, dim)),
        ("feed_forward.w1", (ffn_dim, dim)),
        ("feed_forward.w3", (ffn_dim, dim)),
        ("feed_forward.w2", (dim, ffn_dim)),
    ]


class Block(nn.Module):
    """A block's bias-free matrices; forward is never called (fully_shard wants one)."""

    def __init__(self, shapes):
        super().__init__()
        self.mats = nn.ModuleDict({n.replace(".", "_"): nn.Linear(i, o, bias=False) for n, (o, i) in shapes})

    def forward(self, x):
        return x


class Stack(nn.Module):
    def __init__(self, args):
        super().__init__()
        shapes = layer_shapes(args.dim, args.kv_dim, args.ffn_dim)
        self.layers = nn.ModuleList(Block(shapes) for _ in range(args.layers))

    def forward(self, x):
        return x


def scaled_config(args) -> argparse.Namespace:
    for key, value in FULL.items():
        if key != "layers":
            setattr(args, key, value // args.scale)
    return args


def attach_random_grads(model: nn.Module, seed: int) -> None:
    """Fill every parameter's (local) gradient with N(0, 1) noise."""
    from torch.distributed.tensor import DTensor, Shard

    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if isinstance(p, DTensor):
            local = torch.randn(p.to_local().shape, generator=g)
            p.grad = DTensor.from_local(
                local, p.device_mesh, [Shard(0)], shape=p.shape, stride=p.stride(), run_check=False
            )
        else:
            p.grad = torch.randn(p.shape, generator=g)


# What each timed configuration passes to Muon besides the NS settings. "overlap" is the
# default distributed step; the others switch one thing off (or on) against it.
VARIANTS = {
    "replicated": dict(ns_mode="replicated"),
    "overlap": dict(ns_mode="distributed"),
    "no overlap": dict(ns_mode="distributed", ns_overlap=False),
    "one bucket": dict(ns_mode="distributed", ns_bucket_mb=0, ns_overlap=False),
    "batched": dict(ns_mode="distributed", ns_batch_size=4),
}
SINGLE_VARIANTS = ("overlap", "batched")  # a single process has nothing to distribute or overlap


def timed_step(optimizer: Muon, barrier=lambda: None) -> dict:
    """One optimizer step after a barrier: wall time and the step's NS stats."""
    barrier()
    t0 = time.perf_counter()
    optimizer.step()
    wall = time.perf_counter() - t0
    s = optimizer.last_step_stats
    return dict(
        step_s=wall,
        ns_s=s.compute_s,
        comm_s=s.comm_s,
        bytes_sent=s.bytes_sent,
        jobs=s.jobs_computed,
        buckets=s.buckets,
        peak=s.peak_buffer_bytes,
    )


def optimizer_for(model: nn.Module, args, variant: str) -> Muon:
    options = dict(VARIANTS[variant])
    options.setdefault("ns_bucket_mb", args.bucket_mb)
    return Muon(model.parameters(), lr=1e-4, ns_steps=args.ns_steps, ns_dtype=args.ns_dtype, **options)


def matmul_gflops(dtype: torch.dtype, n: int = 512, repeats: int = 3) -> float:
    """Single-thread throughput of an n x n matmul in ``dtype`` (best of ``repeats``)."""
    a = torch.randn(n, n).to(dtype)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def choose_ns_dtype(requested: str) -> tuple[str, str]:
    """NS dtype for the run and a line explaining the choice.

    'auto' takes bf16 (Muon's default) only where this CPU multiplies bf16 at least as
    fast as fp32; CPUs without native bf16 dot products (no AVX512-BF16 / AMX) emulate
    it 10-50x slower, which would benchmark the emulation instead of the distribution.
    """
    if requested != "auto":
        return requested, f"NS dtype {requested} (requested)"
    torch.set_num_threads(1)
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    choice = "bfloat16" if bf16 >= fp32 else "float32"
    return choice, (
        f"NS dtype {choice} (auto: 1-thread 512^3 matmul bf16 {bf16:.1f} vs fp32 {fp32:.1f} GFLOP/s"
        f"{'; bf16 is emulated on this CPU' if choice == 'float32' else ''})"
    )


# ------------------------------------------------------------------------ worker side


def worker(args) -> None:
    """Under torchrun: FSDP2-shard the stack and time every variant, round robin: one step
    of each variant per round, then (rank 0 alone, the others waiting at a barrier) one
    step of each single-process variant on an unsharded copy. Interleaving keeps the
    ratios honest on a machine whose speed drifts between runs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = Stack(args)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    attach_random_grads(model, seed=rank)
    optimizers = {v: optimizer_for(model, args, v) for v in args.variants}
    singles = {}
    if rank == 0:
        torch.manual_seed(0)
        plain = Stack(args)
        attach_random_grads(plain, seed=0)
        singles = {v: optimizer_for(plain, args, v) for v in SINGLE_VARIANTS if v in args.variants}
    for optimizer in [*optimizers.values(), *singles.values()]:  # warm-up
        optimizer.step()
    dist.barrier()
    timings: dict[str, list[dict]] = {v: [] for v in [*optimizers, *(f"1 process {v}" for v in SINGLE_VARIANTS)]}
    for _ in range(args.steps):
        for variant, optimizer in optimizers.items():
            timings[variant].append(timed_step(optimizer, dist.barrier))
        for variant, optimizer in singles.items():
            timings[f"1 process {variant}"].append(timed_step(optimizer))
        dist.barrier()
    report = {}
    for name, steps in timings.items():
        per_rank = [None] * world
        dist.all_gather_object(per_rank, steps)
        if per_rank[0]:
            report[name] = per_rank[:1] if name.startswith("1 process") else per_rank
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(report))
    dist.barrier()
    del model, optimizers, singles
    gc.collect()
    dist.destroy_process_group()


# ------------------------------------------------------------------ orchestrator side


def summarize(per_rank: list[list[dict]]) -> dict:
    """Median over steps of: slowest rank's step time, max / mean per-rank NS time, ..."""
    steps = list(zip(*per_rank))  # per step: one dict per rank
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return dict(
        ranks=len(per_rank),
        step_s=med([max(r["step_s"] for r in s) for s in steps]),
        ns_max_s=med([max(r["ns_s"] for r in s) for s in steps]),
        ns_mean_s=med([statistics.mean(r["ns_s"] for r in s) for s in steps]),
        comm_s=med([max(r["comm_s"] for r in s) for s in steps]),
        mb_sent=med([max(r["bytes_sent"] for r in s) for s in steps]) / 2**20,
        peak_mb=max(r["peak"] for s in steps for r in s) / 2**20,
        buckets=steps[0][0]["buckets"],
        jobs=[r["jobs"] for r in steps[0]],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            __file__,
            "--worker-out",
            str(out),
            "--scale",
            str(args.scale),
            "--layers",
            str(args.layers),
            "--steps",
            str(args.steps),
            "--ns-steps",
            str(args.ns_steps),
            "--ns-dtype",
            args.ns_dtype,
            "--bucket-mb",
            str(args.bucket_mb),
            "--variants",
            *args.variants,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"torchrun with {nproc} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        report = json.loads(out.read_text())
    return {mode: summarize(per_rank) for mode, per_rank in report.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=4, help="divide dim, kv_dim and ffn_dim by this")
    parser.add_argument("--layers", type=int, default=FULL["layers"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds after one warm-up step")
    parser.add_argument("--ns-steps", type=int, default=5)
    parser.add_argument("--ns-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="optim.ns_bucket_mb")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = scaled_config(parser.parse_args())
    if args.worker_out is not None:
        worker(args)
        return

    args.ns_dtype, dtype_note = choose_ns_dtype(args.ns_dtype)
    shapes = layer_shapes(args.dim, args.kv_dim, args.ffn_dim)
    n_params = args.layers * sum(o * i for _, (o, i) in shapes)
    print(
        "Muon step benchmark on the 1B Llama preset's matrix shapes "
        "(full: dim 2048, 16 layers; q/o 2048x2048, k/v 512x2048, gate/up 8192x2048, down 2048x8192)"
    )
    if args.scale != 1 or args.layers != FULL["layers"]:
        print(
            f"SCALED DOWN for CPU: dims / {args.scale}, {args.layers} layers -> "
            + ", ".join(f"{n.split('.')[1]} {o}x{i}" for n, (o, i) in shapes)
        )
    print(
        f"{args.layers * len(shapes)} matrices, {n_params / 1e6:.1f}M matrix params; {args.ns_steps} quintic NS "
        f"steps; {dtype_note}"
    )
    print(
        f"gloo; 1 intra-op thread per process; {os.cpu_count()} CPU cores; median of {args.steps} steps after 1 warm-up"
    )
    print(f"timing {len(args.variants)} configurations x {args.steps} rounds at {args.ranks} ranks ...", flush=True)
    rows, results = [], {}
    for nproc in args.ranks:
        t0 = time.perf_counter()
        results[nproc] = run_ranks(args, nproc)
        print(f"  {nproc} rank(s) timed in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += [(v, r) for v, r in results[nproc].items()]
    print(
        f"{'configuration':<22}{'ranks':>6}{'step_s':>9}{'NS_s/rank(max)':>16}{'(mean)':>8}"
        f"{'comm_s':>9}{'comm%':>7}{'MiB_sent/rank':>15}{'buckets':>8}{'peak_MiB':>9}  jobs/rank"
    )
    for label, r in rows:
        print(
            f"{label:<22}{r['ranks']:>6}{r['step_s']:>9.3f}{r['ns_max_s']:>16.3f}{r['ns_mean_s']:>8.3f}"
            f"{r['comm_s']:>9.3f}{100 * r['comm_s'] / r['step_s']:>7.1f}{r['mb_sent']:>15.1f}{r['buckets']:>8}"
            f"{r['peak_mb']:>9.1f}  {r['jobs']}"
        )
    print(
        "Each torchrun job times its configurations round robin; '1 process' rows ran in the same job on "
        "rank 0 alone (unsharded copy) while the other ranks waited."
    )
    print(
        "comm_s: visible communication (packing, unpacking, time blocked on collectives) on the slowest "
        "rank; peak_MiB: most exchange buffers held at once"
    )
    for nproc, result in results.items():
        note = "  (more ranks than cores: ranks time-share)" if nproc > (os.cpu_count() or 1) else ""
        ratio = lambda a, b, key="step_s", result=result: result[a][key] / result[b][key]  # noqa: E731
        line = []
        if {"replicated", "overlap"} <= result.keys():
            line.append(f"distributed/replicated NS per rank {ratio('overlap', 'replicated', 'ns_max_s'):.2f}")
        if {"overlap", "1 process overlap"} <= result.keys():
            line.append(f"step / 1 process {ratio('overlap', '1 process overlap'):.2f}")
        if {"overlap", "no overlap"} <= result.keys():
            line.append(f"overlap on/off step {ratio('overlap', 'no overlap'):.2f}")
        if {"batched", "overlap"} <= result.keys():
            line.append(f"batched on/off step {ratio('batched', 'overlap'):.2f}")
        if {"1 process batched", "1 process overlap"} <= result.keys():
            line.append(f"1 process batched on/off {ratio('1 process batched', '1 process overlap'):.2f}")
        if "overlap" in result:
            line.append(
                f"comm visible {100 * result['overlap']['comm_s'] / result['overlap']['step_s']:.1f}% of the step"
            )
        print(f"{nproc} ranks: " + ", ".join(line) + note)


if __name__ == "__main__":
    main()
