"""Symmetric products of Newton-Schulz: X X^T and b A + c A A (A symmetric), one triangle each.

Both algorithms spend much of their time in products whose result is symmetric:

    gram_matrix(X)     = X X^T             (m x m from m x n)
    gram_poly(A, b, c) = b A + c A A       (A = A^T, so A A = A A^T)

On CUDA, with Triton importable and the result at least ``MIN_TRITON_SIZE`` wide,
``symmetric_kernel._sym_kernel`` computes only the tiles on and below the diagonal (half the FLOPs of a full
product) and writes each off-diagonal tile to both triangles; everywhere else (CPU, no
Triton, small matrices) the plain torch expressions run, bit for bit what NS computed before
this module existed. The kernel's tile sizes are fixed (no autotuning), so every process
with the same GPU type and Triton version computes the same bits: distributed NS stays equal
to one process. The choice is made per call from the shape and the device only.

Triton is optional (``pip install triton``; CUDA torch wheels bring it); CPU users never
need it. Its correctness is tested on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

MIN_TRITON_SIZE = 256  # below this the launch and the half-empty tiles cost more than cuBLAS
_enabled = True  # benchmarks/bench_ns.py switches the kernel off to time the torch path


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def set_kernel_enabled(enabled: bool) -> bool:
    """Allow (True) or forbid the Triton kernel process-wide; returns the previous setting.
    For benchmarks comparing both paths; training never calls it."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def use_triton(X: torch.Tensor) -> bool:
    """Whether the symmetric kernel serves an m x k operand X (result m x m)."""
    return _enabled and X.is_cuda and X.size(-2) >= MIN_TRITON_SIZE and triton_available()


def gram_matrix(X: torch.Tensor) -> torch.Tensor:
    """X X^T over the last two dims (batched)."""
    if use_triton(X):
        from normopt.optim.symmetric_kernel import symmetric_product

        return symmetric_product(X, alpha=1.0)
    return X @ X.mT


def gram_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b A + c A A for a symmetric A (batched)."""
    if use_triton(A):
        from normopt.optim.symmetric_kernel import symmetric_product

        return symmetric_product(A, alpha=c, add=A, beta=b)
    return b * A + c * (A @ A)
