"""Hardware peak FLOP/s for model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from
:func:`normopt.models.presets.count_flops_per_token`. The peak comes from, in order:
``train.peak_tflops`` when set; on a GPU the datasheet's dense bf16 figure; else a short
matmul probe at start.

A probe on a loaded CPU can read far below what the cores reach a moment later (28 to 150
GFLOP/s were seen on one machine), and an underestimated peak gives an MFU above 100%. So the
probe keeps the best of several short timings, and :class:`MfuMeter` logs no MFU (null) for
a window whose MFU would exceed 100% and says once that the peak is underestimated, rather
than clamping the number or logging an impossible one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}

PROBE_REPEATS = 5  # timings per probe; the fastest one counts
PROBE_SECONDS = 0.12  # per timing: the whole probe stays well under a second


def gpu_peak_flops(device_name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def measure_matmul_flops(
    dtype: torch.dtype,
    device: torch.device,
    size: int = 1024,
    seconds: float = PROBE_SECONDS,
    repeats: int = PROBE_REPEATS,
) -> float:
    """FLOP/s of repeated (size x size) @ (size x size) matmuls (2 n^3 per product): the best of
    ``repeats`` timings of about ``seconds`` each. The best, not the mean: other load only ever
    slows a timing down, so the fastest is the closest to what the hardware can do."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: thread pools, kernels
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, 2 * size**3 * count / elapsed)
    return best


def peak_flops(
    device: torch.device, dtype: torch.dtype, probe: bool = True, peak_tflops: float = 0.0
) -> tuple[float | None, str]:
    """(peak FLOP/s of one rank, how it was obtained). ``peak_tflops`` > 0 (``train.peak_tflops``)
    is taken as given; 0 = look the device up or measure it."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"{name} bf16 datasheet"
        return measure_matmul_flops(torch.bfloat16, device, size=8192), f"{name} bf16 matmul probe"
    if not probe:
        return None, "not measured"
    flops = measure_matmul_flops(dtype, device)
    return flops, (
        f"CPU {str(dtype).removeprefix('torch.')} matmul probe, best of {PROBE_REPEATS}, "
        f"{torch.get_num_threads()} thread(s)"
    )


class MfuMeter:
    """MFU of a logging window, or None where it cannot be trusted (no peak, or a value above
    1, which means the peak was underestimated). The first such window is reported through
    ``log`` once; later ones stay silent (their MFU is still null)."""

    def __init__(
        self,
        peak: float | None,
        source: str,
        flops_per_token: float,
        world_size: int = 1,
        log: Callable[[str], object] = print,
    ):
        self.peak, self.source = peak, source
        self.flops_per_token, self.world_size = flops_per_token, world_size
        self.log = log
        self.warned = False

    def __call__(self, tokens_per_s: float, extra_flops_per_token: float = 0.0) -> float | None:
        """MFU of the model's FLOPs, plus ``extra_flops_per_token`` (the optimizer's Newton-
        Schulz FLOPs per token, for ``mfu_with_ns``)."""
        if not self.peak:
            return None
        mfu = (self.flops_per_token + extra_flops_per_token) * tokens_per_s / (self.peak * self.world_size)
        if mfu <= 1.0:
            return mfu
        if not self.warned:
            self.warned = True
            fix = "too low" if self.source == "train.peak_tflops" else "a way to give the peak"
            self.log(
                f"MFU would be {100 * mfu:.0f}%: the peak ({self.peak / 1e9:,.4g} GFLOP/s per rank, "
                f"{self.source}) is underestimated; MFU is logged as null where it exceeds 100% "
                f"(train.peak_tflops is {fix})"
            )
        return None
