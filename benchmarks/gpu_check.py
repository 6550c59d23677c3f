"""Everything a GPU check needs, in one command, offline; prints one table.

    python benchmarks/gpu_check.py --prepare .gpu_cache     # any machine with network, once
    python benchmarks/gpu_check.py --cache .gpu_cache       # on the GPU machine (~7 minutes)

``--prepare`` downloads the built-in corpus and tokenizes it with the 32768-token BPE into
``DIR`` (``data.cache_dir``); copy that folder (about 15 MB) to the GPU machine, which then
needs no network and no HF ``datasets``. The check then runs, on one CUDA device:

1. the GPU test module ``tests/test_gpu.py`` (bf16 training, bit-identical resume with
   ``train.deterministic``, compile against eager, Muon / NorMuon with the bounded norms,
   MLA + MoE with async checkpoints, export and sample, the NaN stop);
2. the 1B preset at ``seq_len`` 2048 and 32 x 2048 = 65k tokens per optimizer step
   (micro-batch 8, 4 accumulation steps, one rank) for AdamW, Muon and NorMuon, eager and
   compiled, plus AdamW with per-block activation checkpointing: tokens/s, MFU against the
   device's bf16 datasheet peak (model FLOPs only; ``mfu+ns`` adds the Newton-Schulz FLOPs),
   peak memory allocated and reserved, the optimizer step's share of the step, and the
   start-up memory estimate next to the measured peak;
3. Newton-Schulz alone over the 1B preset's 112 block matrices (bf16, 5 quintic steps) at
   several ``optim.ns_batch_size`` values: seconds per step and the achieved matmul rate;
4. resume exactness of the 124M preset (Derf + Muon, ``train.deterministic``): a 12-step
   run against one resumed from its step-6 checkpoint.

It exits non-zero when a test fails, a run crashes, a resumed loss differs, or the compiled
1B AdamW MFU is under 50%. ``--out FILE`` also writes every number as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CONFIG_1B = REPO_ROOT / "configs" / "gpu" / "llama_1b.yaml"
VOCAB = 32768
MIN_COMPILED_ADAMW_MFU = 0.50
BENCH_1B = [  # (name, optimizer, compile, activation checkpointing)
    ("adamw eager", "adamw", False, "none"),
    ("muon eager", "muon", False, "none"),
    ("normuon eager", "normuon", False, "none"),
    ("adamw compiled", "adamw", True, "none"),
    ("muon compiled", "muon", True, "none"),
    ("normuon compiled", "normuon", True, "none"),
    ("adamw eager AC", "adamw", False, "block"),
    ("adamw compiled AC", "adamw", True, "block"),
]
NS_BATCH_SIZES = (1, 4, 8, 16)


def data_overrides(cache: Path) -> list[str]:
    """The built-in corpus with the 32768-token BPE, read from ``cache``."""
    return [
        "data.path=",
        f"data.cache_dir={cache}",
        f"data.vocab_size={VOCAB}",
        "data.max_tokens=0",
        "data.streaming=false",
    ]


def prepare(cache: Path) -> int:
    from normopt.config import load_config
    from normopt.data.token_cache import prepare_corpus

    cfg = load_config(CONFIG_1B, data_overrides(cache.resolve()))
    folder = prepare_corpus(cfg.data)
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "downloads" not in p.parts)
    print(
        f"prepared {folder} ({size / 1e6:.1f} MB under {cache}); copy {cache} to the GPU machine and run "
        f"python benchmarks/gpu_check.py --cache {cache}"
    )
    return 0


# ---------------------------------------------------------------- 1. the GPU test module


def run_test_module(cache: Path, out_dir: Path) -> dict:
    env = {**os.environ, "NORMOPT_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    junit = out_dir / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", f"--junitxml={junit}"]
    try:
        import xdist  # noqa: F401  (tests are independent processes: run four at a time)

        cmd += ["-n", "4", "--dist", "loadgroup"]
    except ImportError:
        pass
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out_dir / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(proc.stdout[-4000:] if proc.returncode else summary, flush=True)
    return {"ok": proc.returncode == 0, "summary": summary, "seconds": seconds}


# ---------------------------------------------------------------- 2. the 1B preset


def bench_1b(cache: Path, dist_info, name: str, optim: str, compiled: bool, ac: str, warmup: int, steps: int) -> dict:
    import torch

    from normopt.config import load_config
    from normopt.memory_budget import GIB
    from normopt.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_1b_"))
    cfg = load_config(
        CONFIG_1B,
        [
            f"run.dir={run_dir}",
            *data_overrides(cache),
            f"optim.name={optim}",
            f"train.compile={str(compiled).lower()}",
            f"train.activation_checkpointing={ac}",
            "train.global_batch_size=32",
            "train.micro_batch_size=8",
            "train.seq_len=2048",
            f"train.steps={warmup + steps}",
            "train.eval_interval=0",
            "diagnostics.interval=0",
            "diagnostics.tail_buckets=0",
            "checkpoint.interval=0",
            "checkpoint.async_save=false",
            "checkpoint.resume=never",
        ],
    )
    trainer = Trainer(cfg, dist_info)
    try:
        for step in range(warmup):
            trainer.optimizers.apply_schedule(cfg.optim, step, cfg.train.steps)
            trainer._train_step(step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.optimizer_timer.pop_seconds()
        t0 = time.perf_counter()
        for step in range(warmup, warmup + steps):
            trainer.optimizers.apply_schedule(cfg.optim, step, cfg.train.steps)
            trainer._train_step(step)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        tokens_per_s = steps * cfg.train.global_batch_size * cfg.train.seq_len / elapsed
        ns_per_token = trainer.ns_flops_per_step / (cfg.train.global_batch_size * cfg.train.seq_len)
        return {
            "name": name,
            "ok": True,
            "tokens_per_s": tokens_per_s,
            "step_s": elapsed / steps,
            "mfu": trainer.mfu(tokens_per_s),
            "mfu_with_ns": trainer.mfu(tokens_per_s, ns_per_token),
            "optimizer_share": trainer.optimizer_timer.pop_seconds() / elapsed,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "estimate_gib": trainer.memory.expected_bytes / GIB,
            "parameters": trainer.num_params,
        }
    finally:
        trainer.checkpointer.wait()
        trainer.close()
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------- 3. Newton-Schulz batching


def bench_ns_batching(repeats: int = 5) -> list[dict]:
    """Muon steps over random matrices of the 1B preset's block shapes (bf16 NS, one
    process), timed with CUDA events: the optimizer work alone at each batch size."""
    import torch

    from normopt.optim.muon import Muon
    from normopt.optim.newton_schulz import ns_flops

    d, kv, f, layers = 2048, 512, 8192, 16
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)] * layers
    params = [torch.nn.Parameter(torch.randn(*s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    flops = sum(ns_flops(r, c, 5) for r, c in shapes)
    rows = []
    for batch in NS_BATCH_SIZES:
        opt = Muon(params, lr=1e-3, ns_dtype=torch.bfloat16, ns_batch_size=batch)
        opt.step()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        seconds = statistics.median(times)
        rows.append({"ns_batch_size": batch, "step_s": seconds, "tflops": flops / seconds / 1e12})
        del opt
    del params
    torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- 4. resume exactness


def check_resume(cache: Path, out_dir: Path) -> dict:
    common = [
        *data_overrides(cache),
        "model.preset=124m",
        "model.norm=derf",
        "optim.name=muon",
        "train.deterministic=true",
        "train.steps=12",
        "checkpoint.interval=6",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "train.seq_len=1024",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.eval_sequences=16",
        "diagnostics.interval=0",
        "train.compile=false",
    ]
    root = Path(tempfile.mkdtemp(prefix="gpu_check_resume_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def train(run_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "train.py", f"run.dir={run_dir}", *common],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
        )

    def losses(run_dir: Path) -> dict[int, float]:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r}

    try:
        full = train(root / "full")
        if full.returncode:
            (out_dir / "resume_full.log").write_text(full.stdout + full.stderr)
            return {"ok": False, "detail": f"uninterrupted run exit {full.returncode}"}
        shutil.copytree(root / "full", root / "resumed")
        shutil.rmtree(root / "resumed" / "checkpoints" / "step_00000012")
        again = train(root / "resumed")
        if again.returncode:
            (out_dir / "resume_again.log").write_text(again.stdout + again.stderr)
            return {"ok": False, "detail": f"resumed run exit {again.returncode}"}
        a, b = losses(root / "full"), losses(root / "resumed")
        diffs = [abs(a[s] - b[s]) for s in range(7, 13)]
        return {
            "ok": max(diffs) == 0.0,
            "max_abs_loss_difference": max(diffs),
            "steps_compared": "7-12",
            "detail": f"max |loss difference| over steps 7-12: {max(diffs):.3g}",
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- the table


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def print_table(results: dict) -> None:
    print("\n=== normopt GPU check: " + results["device"] + f" (torch {results['torch']})")
    tests = results.get("tests")
    if tests:
        print(f"GPU test module        {'PASS' if tests['ok'] else 'FAIL'}  {tests['summary']}")
    resume = results.get("resume")
    if resume:
        print(f"resume (deterministic) {'PASS' if resume['ok'] else 'FAIL'}  {resume['detail']}")
    bench = results.get("bench_1b")
    if bench:
        print(
            f"\n1B preset ({bench[0].get('parameters', 0) / 1e9:.2f}B), seq 2048, 32 x 2048 tokens/step "
            f"(micro 8 x 4), 1 GPU; MFU vs {results['peak_tflops']:.0f} TFLOP/s bf16"
        )
        print(
            f"{'run':20s} {'tok/s':>9s} {'step s':>7s} {'MFU':>6s} {'MFU+ns':>7s} {'optim':>6s} "
            f"{'alloc GiB':>9s} {'resv GiB':>8s} {'est GiB':>7s}"
        )
        for r in bench:
            if not r.get("ok"):
                print(f"{r['name']:20s} FAILED: {r.get('error', '')[:90]}")
                continue
            print(
                f"{r['name']:20s} {r['tokens_per_s']:9,.0f} {r['step_s']:7.3f} {_percent(r['mfu']):>6s} "
                f"{_percent(r['mfu_with_ns']):>7s} {_percent(r['optimizer_share']):>6s} {r['peak_allocated_gib']:9.1f} "
                f"{r['peak_reserved_gib']:8.1f} {r['estimate_gib']:7.1f}"
            )
    ns = results.get("ns_batching")
    if ns:
        print("\nNewton-Schulz over the 1B block matrices (112, bf16, 5 quintic steps), one GPU")
        for r in ns:
            print(
                f"ns_batch_size {r['ns_batch_size']:2d}: {r['step_s'] * 1e3:7.1f} ms/step  {r['tflops']:6.1f} TFLOP/s"
            )
    for line in results["checks"]:
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", metavar="DIR", help="prepare the corpus into DIR (needs network) and stop")
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=os.environ.get("NORMOPT_CACHE", ""),
        help="the prepared cache (data.cache_dir) to read offline",
    )
    parser.add_argument("--out", metavar="FILE", help="also write every number as JSON here")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per 1B run (default 4, after 2 warm-up)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["tests", "bench", "ns", "resume"],
        help="leave a part out (repeatable)",
    )
    args = parser.parse_args()
    if args.prepare:
        return prepare(Path(args.prepare))

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (this check is for a GPU machine)", file=sys.stderr)
        return 2
    if not args.cache:
        print(
            "gpu_check: --cache DIR is required (prepare it with --prepare DIR on a machine with network)",
            file=sys.stderr,
        )
        return 2
    cache = Path(args.cache).resolve()
    if not (cache / "prepared").is_dir():
        print(
            f"gpu_check: {cache} holds no prepared corpus; run --prepare {args.cache} where there is network",
            file=sys.stderr,
        )
        return 2
    os.environ["NORMOPT_CACHE"] = str(cache)
    out_dir = Path(args.out).resolve().parent if args.out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    from normopt.metrics.flops import gpu_peak_flops

    name = torch.cuda.get_device_name()
    results: dict = {
        "device": name,
        "torch": torch.__version__,
        "peak_tflops": (gpu_peak_flops(name) or 0) / 1e12,
        "checks": [],
    }
    ok = True
    t_start = time.perf_counter()
    if "tests" not in args.skip:
        print("[tests] tests/test_gpu.py ...", flush=True)
        results["tests"] = run_test_module(cache, out_dir)
        ok &= results["tests"]["ok"]
    if "resume" not in args.skip:
        print(f"[resume] 124M Derf + Muon, deterministic ({time.perf_counter() - t_start:.0f} s) ...", flush=True)
        results["resume"] = check_resume(cache, out_dir)
        ok &= results["resume"]["ok"]
    if "ns" not in args.skip:
        print(f"[ns] Newton-Schulz batching ({time.perf_counter() - t_start:.0f} s) ...", flush=True)
        results["ns_batching"] = bench_ns_batching()
    if "bench" not in args.skip:
        from normopt.parallel.distributed import init_distributed, shutdown_distributed

        dist_info = init_distributed("cuda")
        results["bench_1b"] = []
        for bench_name, optim, compiled, ac in BENCH_1B:
            print(f"[1B] {bench_name} ({time.perf_counter() - t_start:.0f} s) ...", flush=True)
            try:
                results["bench_1b"].append(bench_1b(cache, dist_info, bench_name, optim, compiled, ac, 2, args.steps))
            except Exception as exc:  # a crashed configuration is a result to report, not the end
                results["bench_1b"].append({"name": bench_name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                ok = False
        shutdown_distributed()
        compiled_adamw = next((r for r in results["bench_1b"] if r["name"] == "adamw compiled" and r["ok"]), None)
        mfu_ok = compiled_adamw is not None and (compiled_adamw["mfu"] or 0) >= MIN_COMPILED_ADAMW_MFU
        results["checks"].append(
            f"compiled 1B AdamW MFU >= {MIN_COMPILED_ADAMW_MFU:.0%}: {'PASS' if mfu_ok else 'FAIL'}"
        )
        ok &= mfu_ok
    results["seconds"] = time.perf_counter() - t_start
    results["checks"].append(f"gpu_check: {'PASS' if ok else 'FAIL'} in {results['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
