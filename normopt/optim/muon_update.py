"""The pure functions of one Muon or NorMuon update, and the checks of a param group's
hyperparameters; the optimizers that run them, sharded and distributed, are
:mod:`normopt.optim.muon`.

Notation: a weight W of shape (rows, cols). For ``nn.Linear`` the weight is stored as
(out_features, in_features), so rows = out_features (one row per output neuron) and
cols = in_features. g is the gradient, m the momentum buffer, lr the learning rate.

Muon step (``momentum_update_``, ``nesterov_direction``, ``newton_schulz``,
``update_scale``, ``apply_update_``):

    m <- beta * m + g
    U  = g + beta * m            (nesterov=True)   |   U = m   (nesterov=False)
    O  = NS(U)                   (Newton-Schulz, ~ the polar factor of U)
    W <- W * (1 - lr * wd)       (decoupled weight decay)
    W <- W - lr * scale(rows, cols) * O

NorMuon (arXiv 2510.05491) inserts a per-neuron second moment between NS and the update
(``normuon_normalize``); v has one entry per ROW, i.e. per output feature:

    v     <- beta2 * v + (1 - beta2) * mean_over_row(O^2)       (shape (rows,))
    O_hat  = O / (sqrt(v) + eps)                                 (row-wise)
    O_hat <- O_hat * ||O||_F / ||O_hat||_F                       (keep the update norm)

and W is updated with O_hat in place of O.

Per-head orthogonalisation (param-group option ``head_blocks`` = (axis, H), set by
``optim.muon_split_heads``; ``normopt.optim.head_blocks``): the matrix is H equal blocks of
rows (W_q, W_k, W_v) or columns (W_o), one per attention head, and

    O = [NS(U_1); ...; NS(U_H)]  (rows)   |   O = [NS(U_1), ..., NS(U_H)]  (cols)
    W <- W - lr * scale(block rows, block cols) * O

(``orthogonalize``, ``update_scale`` of one block's shape). NorMuon is unchanged: v stays one
entry per row of the whole matrix, taken on the reassembled O (under a row split every row
lies in one head, so that is also the statistic of its head block; under W_o's column split
a row is one output feature, fed by every head), and the Frobenius rescale keeps the whole
matrix's ||O||_F. The state, and so checkpoints and resharding, keep their shapes.

A 3-D stack is E independent matrices: NS runs batched over the leading dim (each matrix
normalised and iterated on its own), the update scale is that of one (rows, cols) matrix,
and NorMuon keeps v of shape (E, rows) with the Frobenius rescale per matrix. FSDP2 shards
a stack along its leading (expert) dim, and the stack travels to its owner like any matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from normopt.dtypes import floating_dtype
from normopt.optim.head_blocks import HeadBlocks, block_count, block_shape, check_head_blocks, merge_heads, split_heads
from normopt.optim.newton_schulz import NS_ALGORITHMS, CoefficientSpec, coefficient_schedule, newton_schulz
from normopt.optim.ns_rules import is_step_count

SCALE_RULES: tuple[str, ...] = ("original", "match_adamw", "spectral")


# --------------------------------------------------------------------------- pure math


def matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a weight matrix, or of each matrix of a 3-D stack (experts, rows,
    cols): for nn.Linear, (out_features, in_features)."""
    if len(shape) not in (2, 3):
        raise ValueError(f"Muon optimizes 2-D matrices or 3-D stacks of them, got shape {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def stack_size(shape: Sequence[int]) -> int:
    """Matrices in a parameter: 1 for a matrix, E for an (E, rows, cols) stack."""
    return int(shape[0]) if len(shape) == 3 else 1


def update_scale(rows: int, cols: int, rule: str) -> float:
    """Multiplier on the orthogonalized update of a rows x cols matrix.

    original:    sqrt(max(1, rows / cols))      (Keller Jordan's Muon)
    match_adamw: 0.2 * sqrt(max(rows, cols))    (Moonlight: update RMS ~ AdamW's 0.2-0.4)
    spectral:    sqrt(rows / cols)              (spectral-norm / muP scaling)
    """
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "spectral":
        return math.sqrt(rows / cols)
    raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {rule!r}")


def ns_matrices(shape: Sequence[int], layout: HeadBlocks | None = None) -> tuple[int, int, int]:
    """(count, rows, cols) of the matrices NS orthogonalises for one parameter: every matrix
    of a stack times every head block (``layout``), each of one block's shape. The one place
    that says what NS runs on: FLOP counts and the owners' load balance read it."""
    rows, cols = matrix_dims(shape)
    return (stack_size(shape) * block_count(layout), *block_shape(rows, cols, layout))


def orthogonalize(
    U: torch.Tensor,
    steps: int,
    coefficients: CoefficientSpec,
    dtype: torch.dtype,
    team=None,
    layout: HeadBlocks | None = None,
    algorithm: str = "standard",
) -> torch.Tensor:
    """O = NS(U) for U of shape (..., rows, cols); with a head layout, each head block on its
    own, batched, and reassembled: O = merge(NS(split(U))) (``normopt.optim.head_blocks``).
    ``algorithm``: ``newton_schulz``'s 'standard' or 'gram'."""
    O = newton_schulz(split_heads(U, layout), steps, coefficients, dtype=dtype, team=team, algorithm=algorithm)
    return merge_heads(O, layout)


def momentum_update_(buf: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """In place: m <- beta * m + g. Returns ``buf``."""
    return buf.mul_(beta).add_(grad)


def nesterov_direction(buf: torch.Tensor, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """The matrix fed to NS: g + beta * m with Nesterov, else m (``buf`` itself, not a copy)."""
    return grad.add(buf, alpha=beta) if nesterov else buf


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NorMuon's per-row normalization of an orthogonalized update O of shape (rows, cols).

        v_new = beta2 * v + (1 - beta2) * mean(O^2, dim=cols)     (one value per row)
        O_hat = O / (sqrt(v_new) + eps)                            (each row by its own scale)
        O_hat = O_hat * ||O||_F / ||O_hat||_F

    For a stack O of shape (E, rows, cols), v is (E, rows) and the norms are per matrix.
    The last line keeps the Frobenius norm of the update, so the learning rate and the
    scale rule keep their Muon meaning; only the distribution across rows changes. The
    denominator is clamped at 1e-30 so an all-zero O gives zeros, not NaN.
    Returns (O_hat, v_new); inputs are not modified.
    """
    v_new = v * beta2 + O.square().mean(dim=-1) * (1.0 - beta2)
    O_hat = O / (v_new.sqrt() + eps).unsqueeze(-1)
    if O.ndim == 2:
        ratio = O.norm() / O_hat.norm().clamp_min(1e-30)
    else:  # a stack (..., rows, cols): each matrix keeps its own norm
        ratio = O.norm(dim=(-2, -1), keepdim=True) / O_hat.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    return O_hat * ratio, v_new


def apply_update_(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """In place: W <- W * (1 - lr * wd), then W <- W - lr * scale * update."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr * scale)


# ----------------------------------------------------------------------- validation


def resolve_ns_dtype(value: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or a name ('bfloat16', 'bf16', 'float32', ...; see
    ``normopt.dtypes``); ValueError naming ``ns_dtype`` otherwise."""
    return floating_dtype(value, "ns_dtype")


def is_real_number(x: Any) -> bool:
    """A real scalar: an int or float (not a bool), or a one-element tensor."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_muon_group(group: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first invalid hyperparameter of a param group."""
    if not is_real_number(group["lr"]) or float(group["lr"]) < 0.0:
        raise ValueError(f"lr must be a number >= 0, got {group['lr']!r}")
    if not is_real_number(group["momentum"]) or not 0.0 <= float(group["momentum"]) < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
    if not is_real_number(group["weight_decay"]) or float(group["weight_decay"]) < 0.0:
        raise ValueError(f"weight_decay must be a number >= 0, got {group['weight_decay']!r}")
    steps = group["ns_steps"]
    if not is_step_count(steps):
        raise ValueError(f"ns_steps must be an integer >= 1, got {steps!r}")
    coefficient_schedule(group["ns_coefficients"])  # raises ValueError naming ns_coefficients
    if group["ns_algorithm"] not in NS_ALGORITHMS:
        raise ValueError(f"ns_algorithm must be one of {NS_ALGORITHMS}, got {group['ns_algorithm']!r}")
    if group["scale_rule"] not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {group['scale_rule']!r}")
    resolve_ns_dtype(group["ns_dtype"])
    check_head_blocks(group.get("head_blocks"))
    if "beta2" in group and (not is_real_number(group["beta2"]) or not 0.0 <= float(group["beta2"]) < 1.0):
        raise ValueError(f"beta2 must be in [0, 1), got {group['beta2']!r}")
    if "eps" in group and (not is_real_number(group["eps"]) or not float(group["eps"]) > 0.0):
        raise ValueError(f"eps must be a number > 0, got {group['eps']!r}")
