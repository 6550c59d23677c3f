"""Per-head orthogonalisation (``optim.muon_split_heads``): a fused attention projection
orthogonalised one attention head at a time instead of as one matrix.

A projection of H heads of size h is H blocks of one matrix W (rows, cols):

    W_q, W_k, W_v  (H h, d):  rows    W = [W_1; ...; W_H],  W_i of shape (h, d)
    W_o            (d, H h):  cols    W = [W_1, ..., W_H],  W_i of shape (d, h)

(h = the head size; GQA's W_k, W_v have n_kv_heads blocks). Muon then orthogonalises each
block on its own and reassembles the update in the same layout:

    O = [NS(U_1); ...; NS(U_H)]   (rows)       O = [NS(U_1), ..., NS(U_H)]   (cols)

and scales it by the scale rule of one block's shape, scale(rows / H, cols) or
scale(rows, cols / H) (``normopt.optim.muon_update.update_scale``). Each NS(U_i) has its own Frobenius
normalisation, so every head's update has singular values near 1 whatever the size of its
gradient: per-head Muon equalises the heads, where whole-matrix Muon equalises the
directions of the fused matrix. The H blocks run as one batched NS over a new leading dim
(a (..., H, h, d) or (..., H, d, h) tensor), inside the job of the whole matrix, so they
travel, shard and split into row blocks like any matrix.

A layout is ``(axis, heads)`` with axis ``rows`` or ``cols``; None is the whole matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HEAD_AXES: tuple[str, ...] = ("rows", "cols")

HeadBlocks = tuple[str, int]


def check_head_blocks(layout: object, shape: Sequence[int] | None = None) -> None:
    """ValueError naming ``head_blocks`` unless ``layout`` is None or (axis, heads) with axis
    in HEAD_AXES and an integer heads >= 1 that divides that axis of ``shape`` (a matrix
    (rows, cols) or a stack (..., rows, cols))."""
    if layout is None:
        return
    if (
        not isinstance(layout, Sequence)
        or isinstance(layout, str)
        or len(layout) != 2
        or layout[0] not in HEAD_AXES
        or not isinstance(layout[1], int)
        or isinstance(layout[1], bool)
        or layout[1] < 1
    ):
        raise ValueError(
            f"head_blocks must be None or (axis, heads) with axis in {HEAD_AXES} and heads >= 1, got {layout!r}"
        )
    if shape is not None:
        axis, heads = layout
        size = int(shape[-2] if axis == "rows" else shape[-1])
        if size % heads:
            raise ValueError(f"head_blocks: {heads} heads do not divide the {size} {axis} of shape {tuple(shape)}")


def block_shape(rows: int, cols: int, layout: HeadBlocks | None) -> tuple[int, int]:
    """(rows, cols) of one head block: (rows / H, cols) for ("rows", H), (rows, cols / H)
    for ("cols", H); the matrix's own for None."""
    if layout is None:
        return rows, cols
    axis, heads = layout
    return (rows // heads, cols) if axis == "rows" else (rows, cols // heads)


def block_count(layout: HeadBlocks | None) -> int:
    """Matrices NS sees per matrix of the parameter: H, or 1 for None."""
    return 1 if layout is None else layout[1]


def split_heads(X: torch.Tensor, layout: HeadBlocks | None) -> torch.Tensor:
    """(..., rows, cols) -> the head blocks along a new dim before the last two:
    (..., H, rows / H, cols) for rows (a view), (..., H, rows, cols / H) for cols (a
    contiguous copy); X itself for None."""
    if layout is None:
        return X
    axis, heads = layout
    if axis == "rows":
        return X.unflatten(-2, (heads, -1))
    return X.unflatten(-1, (heads, -1)).movedim(-2, -3).contiguous()


def merge_heads(B: torch.Tensor, layout: HeadBlocks | None) -> torch.Tensor:
    """Inverse of ``split_heads``: the blocks back in the matrix layout (..., rows, cols)."""
    if layout is None:
        return B
    if layout[0] == "rows":
        return B.flatten(-3, -2)
    return B.movedim(-3, -2).flatten(-2)
