"""Newton-Schulz time per optimizer step on the 1B preset's 112 block matrices: standard vs
Gram NS, and on CUDA each with and without the Triton symmetric kernel.

    python benchmarks/bench_ns.py                    # full 1B shapes (CPU: ~45 TFLOP per variant, slow)
    python benchmarks/bench_ns.py --quick            # dims / 4 (CPU: about a minute per variant)
    python benchmarks/bench_ns.py --shapes 512x2048x32,2048x8192x16 --repeats 5
    python benchmarks/bench_ns.py --quick --threads 1   # a tiny check: --shapes 64x256x4 --repeats 1

The 1B preset (dim 2048, 16 layers, 8 KV heads of 64, ffn 8192) has per layer wq, wo
2048x2048, wk, wv 512x2048, w1, w3 8192x2048 and w2 2048x8192 (rows x cols = out x in):
4 distinct shapes, 112 matrices. Each distinct shape is timed as one NS call on one matrix
(or a batch of --batch equal matrices), median of --repeats after a warm-up call, and the
step time is the sum over shapes of time x count. NS dtype: float32 on CPU, bfloat16 on
CUDA (--dtype to override); Gram NS runs its Gram side in float32 either way
(normopt/optim/gram_newton_schulz.py). FLOPs per call are exact per algorithm
(``ns_flops``: every matmul 2 m n k, the symmetric kernel's skipped triangle still counted,
so rates compare like for like); the achieved rate is FLOPs / time, printed next to a
square-matmul probe of the same dtype (``measure_matmul_flops``). Timings taken while other
work runs on the machine are not comparable: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from normopt.metrics.flops import measure_matmul_flops  # noqa: E402
from normopt.models.presets import PRESETS  # noqa: E402
from normopt.optim import symmetric_matmul  # noqa: E402
from normopt.optim.newton_schulz import newton_schulz, ns_flops  # noqa: E402


def preset_shapes(scale: int) -> list[tuple[int, int, int]]:
    """(rows, cols, count) of the 1B preset's block matrices, every dimension / ``scale``."""
    a = PRESETS["1b"]
    d, kv, f = a.dim // scale, a.n_kv_heads * a.head_dim // scale, a.ffn_hidden // scale
    layers = a.n_layers
    return [(d, d, 2 * layers), (kv, d, 2 * layers), (f, d, 2 * layers), (d, f, layers)]


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'RxC[xN],...' -> (rows, cols, count); N defaults to 1."""
    shapes = []
    for item in text.split(","):
        parts = [int(p) for p in item.lower().split("x")]
        if len(parts) not in (2, 3) or min(parts) < 1:
            raise SystemExit(f"--shapes: expected RxC or RxCxN, got {item!r}")
        shapes.append((parts[0], parts[1], parts[2] if len(parts) == 3 else 1))
    return shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(device: torch.device) -> list[tuple[str, str, bool]]:
    """(label, algorithm, symmetric kernel allowed)."""
    out = [("standard", "standard", False), ("gram", "gram", False)]
    if device.type == "cuda" and symmetric_matmul.triton_available():
        out += [("standard+sym", "standard", True), ("gram+sym", "gram", True)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1B shapes with every dimension / 4")
    p.add_argument("--scale", type=int, default=None, help="divide every 1B dimension by this (default 1)")
    p.add_argument("--shapes", default=None, help="RxC[xN],... instead of the 1B shapes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--coefficients", default="quintic", choices=["quintic", "polar_express"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1, help="equal matrices per NS call (ns_batch_size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default: torch's); on a shared machine 1 avoids OpenMP "
        "threads spinning against other work",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[args.dtype]
    scale = args.scale or (4 if args.quick else 1)
    shapes = parse_shapes(args.shapes) if args.shapes else preset_shapes(scale)
    what = f"shapes {args.shapes}" if args.shapes else f"1B block matrices, dims / {scale}"
    print(
        f"bench_ns: {what}; {sum(n for *_, n in shapes)} matrices; {args.steps} {args.coefficients} steps; "
        f"{str(dtype).removeprefix('torch.')} on {device.type}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
        f"batch {args.batch}; median of {args.repeats} after a warm-up; {torch.get_num_threads()} CPU thread(s)"
    )
    probe = measure_matmul_flops(dtype, device, size=4096 if device.type == "cuda" else 1024)
    print(f"square matmul probe ({str(dtype).removeprefix('torch.')}): {probe / 1e12:.3g} TFLOP/s")

    labels = variants(device)
    step_s = {label: 0.0 for label, *_ in labels}
    step_flops = {label: 0.0 for label, *_ in labels}
    header = f"{'rows x cols':>13s} {'count':>5s} " + " ".join(
        f"{label + ' ms':>15s} {'TFLOP/s':>8s}" for label, *_ in labels
    )
    print(header)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for rows, cols, count in shapes:
        G = torch.randn(args.batch, rows, cols, generator=gen).to(device=device, dtype=dtype)
        calls = count / args.batch  # NS calls per optimizer step for this shape
        cells = []
        for label, algorithm, kernel in labels:
            previous = symmetric_matmul.set_kernel_enabled(kernel)
            try:
                seconds = time_call(
                    lambda G=G, algorithm=algorithm: newton_schulz(
                        G, args.steps, args.coefficients, dtype=dtype, algorithm=algorithm
                    ),
                    device,
                    args.repeats,
                )
            finally:
                symmetric_matmul.set_kernel_enabled(previous)
            flops = args.batch * ns_flops(rows, cols, args.steps, algorithm, args.coefficients)
            step_s[label] += seconds * calls
            step_flops[label] += flops * calls
            cells.append(f"{1e3 * seconds / args.batch:15.3f} {flops / seconds / 1e12:8.3g}")
        print(f"{f'{rows}x{cols}':>13s} {count:5d} " + " ".join(cells))
        del G

    print("per optimizer step (sum over the matrices):")
    base = step_s["standard"]
    for label, *_ in labels:
        print(
            f"  {label:>13s}: {step_s[label]:9.4f} s, {step_flops[label] / 1e12:8.4g} TFLOP, "
            f"{step_flops[label] / step_s[label] / 1e12:7.3g} TFLOP/s "
            f"({step_flops[label] / step_s[label] / probe:.0%} of the probe), "
            f"time vs standard {step_s[label] / base:.3f}x"
        )


if __name__ == "__main__":
    main()
