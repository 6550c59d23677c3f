"""Symmetric products of Newton-Schulz: X X^T and b A + c A A (A symmetric), one triangle each.

Both algorithms spend much of their time in products whose result is symmetric:

    gram_matrix(X)     = X X^T             (m x m from m x n)
    gram_poly(A, b, c) = b A + c A A       (A = A^T, so A A = A A^T)

On CUDA, with Triton importable and the result at least ``MIN_TRITON_SIZE`` wide,
``_sym_kernel`` computes only the tiles on and below the diagonal (half the FLOPs of a full
product) and writes each off-diagonal tile to both triangles; everywhere else (CPU, no
Triton, small matrices) the plain torch expressions run, bit for bit what NS computed before
this module existed. The kernel's tile sizes are fixed (no autotuning), so every process
with the same GPU type and Triton version computes the same bits: distributed NS stays equal
to one process. The choice is made per call from the shape and the device only.

Triton is optional (``pip install triton``; CUDA torch wheels bring it); CPU users never
need it. Its correctness is tested on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

try:  # optional: CUDA torch wheels ship Triton, CPU installs normally do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

MIN_TRITON_SIZE = 256  # below this the launch and the half-empty tiles cost more than cuBLAS
CUDA_TILE = (128, 64)  # (output tile, K step) on CUDA; fixed so the bits never depend on tuning


_enabled = True  # benchmarks/bench_ns.py switches the kernel off to time the torch path


def triton_available() -> bool:
    return triton is not None


def set_kernel_enabled(enabled: bool) -> bool:
    """Allow (True) or forbid the Triton kernel process-wide; returns the previous setting.
    For benchmarks comparing both paths; training never calls it."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def use_triton(X: torch.Tensor) -> bool:
    """Whether the symmetric kernel serves an m x k operand X (result m x m)."""
    return _enabled and triton is not None and X.is_cuda and X.size(-2) >= MIN_TRITON_SIZE


def gram_matrix(X: torch.Tensor) -> torch.Tensor:
    """X X^T over the last two dims (batched)."""
    if use_triton(X):
        return symmetric_product(X, alpha=1.0)
    return X @ X.mT


def gram_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b A + c A A for a symmetric A (batched)."""
    if use_triton(A):
        return symmetric_product(A, alpha=c, add=A, beta=b)
    return b * A + c * (A @ A)


if triton is not None:

    @triton.jit
    def _sym_kernel(x_ptr, out_ptr, add_ptr, M, K, sxb, sxr, sxc, sob, sor, soc, sab, sar, sac, alpha, beta,
                    HAS_ADD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
        """out = alpha X X^T (+ beta ADD) for one batch entry and one tile (i, j) with j <= i;
        the tile is stored at (i, j) and, off the diagonal, transposed at (j, i)."""
        i, j, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if j > i:
            return
        rows = i * BLOCK + tl.arange(0, BLOCK)
        cols = j * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        x = x_ptr + batch.to(tl.int64) * sxb
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            left = tl.load(x + rows[:, None] * sxr + k[None, :] * sxc,
                           mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            right = tl.load(x + k[:, None] * sxc + cols[None, :] * sxr,
                            mask=(k[:, None] < K) & (cols[None, :] < M), other=0.0)
            acc = tl.dot(left, right, acc, input_precision=PRECISION)
        acc = acc * alpha
        inside = (rows[:, None] < M) & (cols[None, :] < M)
        if HAS_ADD:
            a = add_ptr + batch.to(tl.int64) * sab
            acc += beta * tl.load(a + rows[:, None] * sar + cols[None, :] * sac, mask=inside, other=0.0).to(tl.float32)
        tile = acc.to(out_ptr.dtype.element_ty)
        o = out_ptr + batch.to(tl.int64) * sob
        tl.store(o + rows[:, None] * sor + cols[None, :] * soc, tile, mask=inside)
        if i != j:
            tl.store(o + cols[:, None] * sor + rows[None, :] * soc, tl.trans(tile),
                     mask=(cols[:, None] < M) & (rows[None, :] < M))


def symmetric_product(X: torch.Tensor, alpha: float = 1.0, add: torch.Tensor | None = None, beta: float = 0.0,
                      tile: tuple[int, int] | None = None) -> torch.Tensor:
    """alpha X X^T (+ beta ``add``, which must be symmetric) with the Triton kernel, batched
    over leading dims. Accumulates in float32 (float32 inputs at full precision, not TF32);
    the result has X's dtype. ``tile`` = (output tile, K step), at least 16 each; the CUDA
    default otherwise."""
    if triton is None:
        raise RuntimeError("symmetric_product needs Triton (pip install triton)")
    m, k = X.shape[-2:]
    x3 = X.reshape(-1, m, k)
    out = torch.empty(x3.size(0), m, m, dtype=X.dtype, device=X.device)
    a3 = out if add is None else add.reshape(-1, m, m)
    block, block_k = tile or CUDA_TILE
    tiles = triton.cdiv(m, block)
    _sym_kernel[(tiles, tiles, x3.size(0))](
        x3, out, a3, m, k, *x3.stride(), *out.stride(), *a3.stride(), float(alpha), float(beta),
        HAS_ADD=add is not None, BLOCK=block, BLOCK_K=block_k,
        PRECISION="ieee" if X.dtype == torch.float32 else "tf32",
        **({"num_warps": 8, "num_stages": 3} if X.is_cuda else {}),
    )
    return out.reshape(*X.shape[:-2], m, m)
