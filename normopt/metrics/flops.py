"""Hardware peak FLOP/s for model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from
:func:`normopt.models.presets.count_flops_per_token`. On a GPU the peak is the datasheet's
dense bf16 figure; on a CPU it is measured by a short matmul probe at start.
"""

from __future__ import annotations

import time

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


def gpu_peak_flops(device_name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 1024,
                         seconds: float = 0.5) -> float:
    """FLOP/s of repeated (size x size) @ (size x size) matmuls: 2 n^3 per product."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: thread pools, kernels
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * count / elapsed


def peak_flops(device: torch.device, dtype: torch.dtype, probe: bool = True) -> tuple[float | None, str]:
    """(peak FLOP/s of one rank, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"{name} bf16 datasheet"
        return measure_matmul_flops(torch.bfloat16, device, size=8192), f"{name} bf16 matmul probe"
    if not probe:
        return None, "not measured"
    flops = measure_matmul_flops(dtype, device)
    return flops, f"CPU {str(dtype).removeprefix('torch.')} matmul probe, {torch.get_num_threads()} thread(s)"
