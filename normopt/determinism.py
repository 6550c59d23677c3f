"""``train.deterministic``: the settings under which a CUDA run repeats itself bit for bit.

GPU kernels may pick reduction orders at run time (cuBLAS split-K workspaces, atomics in
scatter-style backward kernels, cuDNN autotuning), so a run resumed from a checkpoint
matches the uninterrupted run only to float rounding: on an H200 (124M, Derf + Muon) the
resumed losses differed by 5e-7 to 3.4e-5. With these settings every resumed loss was
bit-identical, at roughly 15% lower throughput there.

cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its first handle is created, so
:func:`use_deterministic_kernels` runs before the process group and CUDA start. CPU
kernels normopt uses are deterministic already (its CPU resume tests are bit-exact), so on
a CPU run the flag changes nothing.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # a fixed workspace: cuBLAS then never splits reductions differently


def use_deterministic_kernels(device_type: str) -> list[str]:
    """Make CUDA kernels deterministic; returns what was set (empty on CPU)."""
    if device_type != "cuda":
        return []
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # inductor follows use_deterministic_algorithms; its autotuning must not time kernels
    # differently in a resumed process
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = False
    inductor_config.max_autotune = False
    return [
        f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}",
        "torch.use_deterministic_algorithms(True)",
        "cudnn.deterministic",
        "no cudnn/inductor autotuning",
    ]
