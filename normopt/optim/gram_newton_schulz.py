"""Gram Newton-Schulz: the same polynomial as Newton-Schulz, iterated on the small Gram matrix.

Standard NS (``newton_schulz.ns_step``) on a wide X (m x n, m <= n) repeats

    R = X X^T,   Z = b R + c R^2,   X <- (a I + Z) X

so every step pays two m x m x n products. Every factor (a I + Z) is a polynomial in R
and commutes with R, which gives the Gram form (Zhang, Amsel, Chen, Dao, "Gram
Newton-Schulz", 2026): keep X fixed, carry the Gram matrix of the current iterate and the
accumulated left factor Q, and apply Q to X once at the end:

    R_0 = X_0 X_0^T,   Q_0 = I
    Z_k = b_k R_k + c_k R_k^2
    Q_{k+1} = Q_k (a_k I + Z_k)                        (= a_k Q_k + Q_k Z_k)
    R_{k+1} = (a_k I + Z_k) R_k (a_k I + Z_k)          (= X_{k+1} X_{k+1}^T; RZ = a R + R Z, R <- a RZ + Z RZ)
    result  = Q_K X_0

In exact arithmetic this equals K standard steps (the singular vectors are those of X_0,
each singular value goes through ``ns_scalar_map``). In finite precision Q's eigenvalues
spread (Q maps sigma to p(sigma) / sigma, large for small sigma), so the method *restarts*:
before step r (0-based) of ``restarts``, X <- Q X, R <- X X^T, Q <- I, and the next segment starts
from an exact Gram matrix again.

Where to restart is the published procedure (the authors' ``find_best_restarts``):
simulate the scalar recursion on singular values sigma in [1e-10, 1] with every Gram
eigenvalue sigma^2 perturbed by -4e-4 (the size of a half-precision Gram matrix's
rounding), and among the restart sets of a given size take the one with the smallest worst
ratio max|q| / min|q| of Q's eigenvalues over all steps. Here the size is the smallest
whose worst ratio is at most ``RESTART_Q_SPREAD`` (1e3): 5 steps of either shipped
coefficient set need one restart (the authors' recommendation for 5 steps), longer
schedules more. ``gram_restarts`` does this once per (coefficients, steps).

Cost on an m x n matrix (m <= n), K steps, s segments (restarts + 1), in FLOPs of the
matmuls (2 per multiply-add, ``gram_ns_flops``): 4 s m^2 n (the first Gram matrix, each restart's
X <- Q X and new Gram matrix, the final Q X) plus (8 K - 6 s) m^3 (Z every step; Q and R
updates except where a segment starts or ends). Standard NS costs K (4 m^2 n + 2 m^3).
For 5 steps and one restart: 8 m^2 n + 28 m^3 against 20 m^2 n + 10 m^3, i.e. cheaper
when n > 1.5 m; for a square matrix the Gram form is 20% dearer, so, as in the
published code, square matrices run the standard iteration.

Precision: the Gram side carries the whole iteration in a few m x m matrices (R, Z, Q) whose
rounding is never washed out by a fresh X X^T (standard NS recomputes it every step), and Q's
eigenvalue spread amplifies it. The published code runs it in float16 after a float32
normalisation; with this project's Polar Express schedule (safety factor 1.01, not the
authors' 1.05) and the restart the rule above picks, float16 measured unstable here
(singular values up to ~17 instead of <= 1.13 at condition number 1e4; float16 needs a
restart placement the published rule does not find). So ``gram_compute_dtype`` runs the
Gram iteration in float32 for 16- and 32-bit NS dtypes (float64 stays float64): the
singular values land on the scalar map's prediction to ~1e-5 (quintic) and 1.5e-4 (Polar
Express at condition number 1e4; tests/test_gram_newton_schulz.py). On a GPU its speed is then
that of float32 matmuls (TF32 where torch allows it), which ``benchmarks/bench_ns.py``
measures against bfloat16 standard NS.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from itertools import combinations

import torch

from normopt.optim.symmetric_matmul import gram_matrix, gram_poly

Coefficients = tuple[float, float, float]

RESTART_Q_SPREAD = 1e3  # the largest max|q| / min|q| a segment may reach (module docstring)
GRAM_PERTURBATION = -4e-4  # the simulated error on each Gram eigenvalue (half precision)
_SIGMA_GRID = 4000  # log-spaced singular values in [1e-10, 1] for the restart simulation


def q_spread(
    schedule: Sequence[Coefficients], restarts: Sequence[int], perturbation: float = GRAM_PERTURBATION
) -> float:
    """Worst max|q| / min|q| over the steps of the Gram iteration's scalar recursion.

    For each singular value sigma of X_0 (a log grid on [1e-10, 1]): at step 0 and at each
    restart, x <- x q (after a restart), r = x^2 + perturbation, q = 1; every step k:
    z = a_k + b_k r + c_k r^2, q <- q z, r <- r z^2. Computed in float64; inf when the
    recursion overflows.
    """
    sigma = torch.logspace(0, -10, _SIGMA_GRID, dtype=torch.float64)
    x, r, q, worst = sigma, sigma, sigma, 0.0
    for k, (a, b, c) in enumerate(schedule):
        if k == 0 or k in restarts:
            if k:
                x = x * q
            r, q = x * x + perturbation, torch.ones_like(x)
        z = a + r * (b + c * r)
        q, r = q * z, r * z * z
        spread = float(q.abs().max() / q.abs().min())
        worst = max(worst, spread if spread == spread else float("inf"))  # NaN (inf / inf) -> inf
    return worst


@lru_cache(maxsize=64)
def gram_restarts(schedule: tuple[Coefficients, ...]) -> tuple[int, ...]:
    """The steps before which the Gram iteration restarts (ascending, each in 1..K-1).

    The fewest restarts whose best placement keeps ``q_spread`` <= RESTART_Q_SPREAD, and
    among placements of that count the one with the smallest spread (ties: the first in
    lexicographic order). K - 1 restarts (one segment per step) always qualify: a
    one-step segment's q is a single polynomial of a bounded r.
    """
    steps = len(schedule)
    for count in range(steps):
        best = min(
            ((q_spread(schedule, places), places) for places in combinations(range(1, steps), count)),
            key=lambda t: t[0],
        )
        if best[0] <= RESTART_Q_SPREAD:
            return best[1]
    return tuple(range(1, steps))


def gram_compute_dtype(ns_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Gram iteration for an NS dtype: float32, or float64 for float64
    (module docstring: why not float16)."""
    return torch.promote_types(ns_dtype, torch.float32)


def uses_gram_form(rows: int, cols: int) -> bool:
    """Whether ``gram`` runs the Gram form on a rows x cols matrix: only when it is not
    square (a square matrix runs the standard iteration, which is cheaper there)."""
    return rows != cols


def gram_ns_flops(m: int, n: int, steps: int, restarts: int) -> float:
    """Matmul FLOPs of ``gram_iterate`` on a wide m x n matrix (m <= n) with ``steps``
    steps and ``restarts`` restarts: 4 s m^2 n + (8 K - 6 s) m^3, s = restarts + 1."""
    segments = restarts + 1
    return 4.0 * segments * m * m * n + (8.0 * steps - 6.0 * segments) * m**3


def gram_iterate(X: torch.Tensor, schedule: Sequence[Coefficients], restarts: Sequence[int]) -> torch.Tensor:
    """``len(schedule)`` NS steps on a normalised wide X (..., m, n), m <= n, in Gram form
    (module docstring), restarting before each step in ``restarts``.

    Products whose operands commute (polynomials in R) are written in the order above;
    the first step of a segment forms Q = a I + Z without a matmul, and R is not updated
    after the last step of a segment (nothing reads it). X X^T and b R + c R^2 go through
    ``symmetric_matmul`` (one triangle on CUDA with Triton).
    """
    steps = len(schedule)
    R = gram_matrix(X)
    eye = torch.eye(X.size(-2), dtype=X.dtype, device=X.device)
    Q: torch.Tensor | None = None
    for k, (a, b, c) in enumerate(schedule):
        if k in restarts:
            X = Q @ X
            R = gram_matrix(X)
            Q = None
        Z = gram_poly(R, b, c)
        Q = Z + a * eye if Q is None else a * Q + Q @ Z
        if k + 1 < steps and k + 1 not in restarts:
            RZ = a * R + R @ Z
            R = a * RZ + Z @ RZ
    return X if Q is None else Q @ X
