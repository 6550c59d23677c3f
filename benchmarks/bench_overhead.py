"""Framework overhead: normopt's training step against a minimal hand-written FSDP2 loop.

    python benchmarks/bench_overhead.py                       # 2 ranks, AdamW and Muon
    python benchmarks/bench_overhead.py --nproc 1 --optim muon --rounds 6

Both loops run in the same torchrun job on the same mesh, the same model shape (built twice
from one seed), the same micro-batches and the same optimizer settings, interleaved: each
round times ``--steps`` steps of normopt's ``Trainer._train_step`` (the step ``fit`` runs:
micro-batch forward/backward with gradient sync on the last one only, gradient clipping,
the one all-reduce carrying the loss and the stop request, the NaN check, the optimizer
step, zero_grad, the derf_ema and MoE-load commits), then ``--steps`` steps of the minimal
loop: the same micro-batches, ``fully_shard`` per block and the root, cross-entropy,
backward, ``clip_grad_norm_``, the optimizer step, zero_grad, and nothing else. Each step is
timed between barriers on every rank; the slowest rank counts. Printed: the median step
time of each, and the ratio minimal / normopt (1.0 = no overhead; target >= 0.95), then
what normopt's step does that the minimal one does not, and why.

Not included on either side: evaluation, diagnostics and checkpoints (periodic, each with
its own measured cost: ``bench_diagnostics.py`` and README), the lr schedule and the
metrics line (a few microseconds of Python per step).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from normopt.parallel.distributed import free_port  # noqa: E402

EXTRA_WORK = (
    "one all-reduce of 3 numbers per step (loss, stop request, MoE balance loss): every rank "
    "learns the global loss and whether any rank got a stop signal before weights change, so "
    "a preempted or diverged job stops on every rank with no bad update checkpointed",
    "float(grad_norm): one host read of the clipped norm for the NaN stop and the log "
    "(free on CPU; a sync on GPU, which the loss read needs anyway)",
    "commit_running_scales / commit_expert_loads: no-ops without derf_ema or MoE layers",
)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    from normopt.config import load_config
    from normopt.models.llama import build_model
    from normopt.optim.builder import build_optimizers
    from normopt.parallel.distributed import init_distributed, shutdown_distributed
    from normopt.trainer import Trainer

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    cfg = load_config(
        None,
        [
            f"run.dir={args.run_dir}",
            f"optim.name={args.optim}",
            f"model.preset={args.preset}",
            f"data.vocab_size={args.vocab}",
            "train.mfu_probe=false",
            "diagnostics.interval=0",
            "diagnostics.tail_buckets=0",
            "train.eval_interval=0",
            f"train.steps={10**6}",
        ],
    )
    trainer = Trainer(cfg, info)

    torch.manual_seed(cfg.train.seed)
    minimal = build_model(trainer.model_args)
    for block in minimal.layers:
        fully_shard(block, mesh=info.mesh)
    fully_shard(minimal, mesh=info.mesh)
    minimal_optim = build_optimizers(minimal, cfg.optim, "cpu")  # the same optimizer math
    accum = trainer.accum_steps

    def minimal_step(step: int) -> None:
        minimal.train()
        micro = list(trainer.batches.micro_batches(step))
        for index, (inputs, targets) in enumerate(micro):
            minimal.set_requires_gradient_sync(index == len(micro) - 1)
            loss = F.cross_entropy(minimal(inputs).float().flatten(0, 1), targets.flatten()) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(minimal.parameters(), cfg.optim.grad_clip)
        minimal_optim.step()
        minimal_optim.zero_grad()

    def timed(step_fn, step: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        step_fn(step)
        dist.barrier()
        return time.perf_counter() - start

    times = {"normopt": [], "minimal": []}
    step = 0
    for _ in range(2):  # warm-up of both
        trainer._train_step(step)
        minimal_step(step)
        step += 1
    for _ in range(args.rounds):
        for name, fn in (("normopt", lambda s: trainer._train_step(s)), ("minimal", minimal_step)):
            for k in range(args.steps):
                times[name].append(timed(fn, step + k))
        step += args.steps
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, times)
    if info.is_main:
        Path(args.worker_out).write_text(json.dumps(gathered))
    # free both models' state before the process group goes (the closures above are done with them)
    trainer = minimal = minimal_optim = None
    shutdown_distributed()


def run(args, optim: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            str(Path(__file__).resolve()),
            "--worker-out",
            str(out),
            "--run-dir",
            str(Path(tmp) / "run"),
            "--optim",
            optim,
            "--preset",
            args.preset,
            "--vocab",
            str(args.vocab),
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"benchmark failed ({optim}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        per_rank = json.loads(out.read_text())
    # the slowest rank's time per step (every step ends at a barrier, so they agree closely)
    summary = {}
    for name in ("normopt", "minimal"):
        steps = zip(*(r[name] for r in per_rank))
        summary[name] = statistics.median(max(s) for s in steps)
    summary["ratio"] = summary["minimal"] / summary["normopt"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--optim", choices=["adamw", "muon", "normuon", "both"], default="both")
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="steps per loop per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--worker-out")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return
    optims = ["adamw", "muon"] if args.optim == "both" else [args.optim]
    print(
        f"normopt step vs minimal FSDP2 loop: preset {args.preset}, vocabulary {args.vocab}, demo batch "
        f"(16 x 128 tokens), {args.nproc} gloo rank(s) x 1 thread, {args.rounds} rounds x {args.steps} steps "
        f"of each, interleaved; median step time of the slowest rank"
    )
    for optim in optims:
        s = run(args, optim)
        verdict = "meets" if s["ratio"] >= 0.95 else "misses"
        print(
            f"  {optim:8s} normopt {s['normopt']:.4f} s  minimal {s['minimal']:.4f} s  "
            f"ratio minimal/normopt {s['ratio']:.3f} ({verdict} the 0.95 target)"
        )
    print("what normopt's step does beyond the minimal loop:")
    for line in EXTRA_WORK:
        print(f"  - {line}")
    gc.collect()


if __name__ == "__main__":
    main()
