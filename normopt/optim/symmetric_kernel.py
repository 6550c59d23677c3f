"""The Triton kernel behind ``normopt.optim.symmetric_matmul`` (imported only when it is used,
so that importing NS never imports Triton): alpha X X^T (+ beta ADD) over the tiles on and
below the diagonal, each off-diagonal tile written to both triangles."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CUDA_TILE = (128, 64)  # (output tile, K step) on CUDA; fixed so the bits never depend on tuning


@triton.jit
def _sym_kernel(
    x_ptr,
    out_ptr,
    add_ptr,
    M,
    K,
    sxb,
    sxr,
    sxc,
    sob,
    sor,
    soc,
    sab,
    sar,
    sac,
    alpha,
    beta,
    HAS_ADD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
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
        left = tl.load(
            x + rows[:, None] * sxr + k[None, :] * sxc, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0
        )
        right = tl.load(
            x + k[:, None] * sxc + cols[None, :] * sxr, mask=(k[:, None] < K) & (cols[None, :] < M), other=0.0
        )
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
        tl.store(
            o + cols[:, None] * sor + rows[None, :] * soc,
            tl.trans(tile),
            mask=(cols[:, None] < M) & (rows[None, :] < M),
        )


def symmetric_product(
    X: torch.Tensor,
    alpha: float = 1.0,
    add: torch.Tensor | None = None,
    beta: float = 0.0,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """alpha X X^T (+ beta ``add``, which must be symmetric) with the Triton kernel, batched
    over leading dims. Accumulates in float32 (float32 inputs at full precision, not TF32);
    the result has X's dtype. ``tile`` = (output tile, K step), at least 16 each; the CUDA
    default otherwise."""
    m, k = X.shape[-2:]
    x3 = X.reshape(-1, m, k)
    out = torch.empty(x3.size(0), m, m, dtype=X.dtype, device=X.device)
    a3 = out if add is None else add.reshape(-1, m, m)
    block, block_k = tile or CUDA_TILE
    tiles = triton.cdiv(m, block)
    _sym_kernel[(tiles, tiles, x3.size(0))](
        x3,
        out,
        a3,
        m,
        k,
        *x3.stride(),
        *out.stride(),
        *a3.stride(),
        float(alpha),
        float(beta),
        HAS_ADD=add is not None,
        BLOCK=block,
        BLOCK_K=block_k,
        PRECISION="ieee" if X.dtype == torch.float32 else "tf32",
        **({"num_warps": 8, "num_stages": 3} if X.is_cuda else {}),
    )
    return out.reshape(*X.shape[:-2], m, m)
