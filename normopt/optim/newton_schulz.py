"""Newton-Schulz orthogonalization: the matrix iteration Muon uses instead of an SVD.

Given a matrix G = U S V^T, Muon wants the polar factor U V^T. The iteration here works
on X_0 = G / (||G||_F + eps), so every singular value of X_0 lies in [0, 1], and applies
an odd quintic polynomial to the singular values at every step:

    A = X X^T
    X <- a X + (b A + c A^2) X        (= U p(S) V^T with p(s) = a s + b s^3 + c s^5)

Only odd powers of X appear, so the left and right singular vectors never change; only
the singular values travel through the scalar map s -> p(s). ``ns_scalar_map`` applies
that map to numbers, which is how tests and diagnostics predict what NS does to a given
singular value without building a matrix.

Two coefficient choices ship:

- ``QUINTIC`` (Keller Jordan's Muon): (a, b, c) = (3.4445, -4.7750, 2.0315) at every
  step. It does not converge to U V^T: after 5 steps every singular value above
  ~1.5e-3 (of the normalized input) lands in [0.68, 1.21]. The upper edge is the
  polynomial's maximum on [0, 1], p(0.5546) = 1.2024, reached when the previous iterate
  sits near 0.55; values already inside the band stay in [0.68, 1.135].
- ``POLAR_EXPRESS`` (Amsel et al., arXiv 2505.16932, Algorithm 1): a per-step schedule
  of minimax-optimal quintics that does converge to U V^T. The first seven triples are
  divided by (1.01, 1.01^3, 1.01^5), the paper's safety factor for bf16; steps beyond
  the schedule repeat the last triple. (The paper additionally shrinks the initial
  normalization by 1.01; here every schedule shares the plain Frobenius normalization.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from normopt.optim.gram_newton_schulz import (
    gram_compute_dtype,
    gram_iterate,
    gram_ns_flops,
    gram_restarts,
    uses_gram_form,
)
from normopt.optim.symmetric_matmul import gram_matrix, gram_poly
from normopt.parallel.row_block_team import RowBlockTeam, blocked_ns_step

Coefficients = tuple[float, float, float]
CoefficientSpec = Union[str, Coefficients, Sequence[Coefficients]]

QUINTIC: Coefficients = (3.4445, -4.7750, 2.0315)

_POLAR_EXPRESS_RAW: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PE_SAFETY = 1.01
POLAR_EXPRESS: tuple[Coefficients, ...] = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

NAMED_COEFFICIENTS: dict[str, tuple[Coefficients, ...]] = {
    "quintic": (QUINTIC,),
    "polar_express": POLAR_EXPRESS,
}

DEFAULT_EPS = 1e-7

# how the iteration is computed (optim.ns_algorithm): the plain matrix iteration, or the
# Gram form (``normopt.optim.gram_newton_schulz``); equal in exact arithmetic, not in bits
NS_ALGORITHMS: tuple[str, ...] = ("standard", "gram")


def _as_triple(value: object) -> Coefficients:
    """Check that ``value`` is an (a, b, c) triple of numbers and return it as floats."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise ValueError(f"ns_coefficients: expected an (a, b, c) triple, got {value!r}")
    try:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise ValueError(f"ns_coefficients: triple {value!r} holds a non-number") from None


def coefficient_schedule(coefficients: CoefficientSpec) -> tuple[Coefficients, ...]:
    """Resolve a coefficient spec to a non-empty schedule of (a, b, c) triples.

    Accepts a name ('quintic' | 'polar_express'), one (a, b, c) triple (used at every
    step), or a sequence of triples (step k uses triple k; steps past the end reuse the
    last). Raises ValueError naming ``ns_coefficients`` for anything else.
    """
    if isinstance(coefficients, str):
        key = coefficients.strip().lower().replace("-", "_")
        if key not in NAMED_COEFFICIENTS:
            raise ValueError(
                f"ns_coefficients: unknown name {coefficients!r}; "
                f"choose one of {sorted(NAMED_COEFFICIENTS)} or give (a, b, c) triples"
            )
        return NAMED_COEFFICIENTS[key]
    if not isinstance(coefficients, Sequence) or len(coefficients) == 0:
        raise ValueError(f"ns_coefficients: expected a name or (a, b, c) triples, got {coefficients!r}")
    if all(isinstance(v, (int, float)) for v in coefficients):
        return (_as_triple(coefficients),)
    return tuple(_as_triple(t) for t in coefficients)


def coefficients_for_steps(coefficients: CoefficientSpec, steps: int) -> list[Coefficients]:
    """The (a, b, c) triple used at each of ``steps`` iterations.

    Schedule k -> triple k for k < len(schedule), then the last triple repeated.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"ns_steps: expected an integer >= 0, got {steps!r}")
    schedule = coefficient_schedule(coefficients)
    return [schedule[min(k, len(schedule) - 1)] for k in range(steps)]


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: CoefficientSpec = "quintic",
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = DEFAULT_EPS,
    team: RowBlockTeam | None = None,
    algorithm: str = "standard",
) -> torch.Tensor:
    """Approximate the polar factor U V^T of G (or of each matrix in a batch).

    X_0 = G / (||G||_F + eps), Frobenius norm per matrix over the last two dims; then for
    each step k with (a, b, c) = coefficients[k]:

        A = X X^T,   X <- a X + (b A + c A^2) X

    which maps every singular value s of X to a s + b s^3 + c s^5 (see ``ns_scalar_map``).
    When rows > cols the iteration runs on X^T, so the Gram matrix A is always the
    smaller (min(m, n) x min(m, n)) side; the result is transposed back.

    Args:
        G: tensor of shape (..., m, n).
        steps: number of iterations (0 returns the normalized input).
        coefficients: 'quintic', 'polar_express', one (a, b, c) triple, or a per-step list.
        dtype: compute dtype (bf16 by default, as in Muon); None computes in G's dtype.
        eps: added to the Frobenius norm so an all-zero G maps to zeros, not NaN.
        team: run every step in row blocks (``blocked_ns_step``): the blocks this process
            computes and how it gathers the rest (``normopt.parallel.row_block_team``).
            None runs the plain ``ns_step``.
        algorithm: 'standard' (``ns_step`` every step) or 'gram' (``gram_iterate``: the
            same polynomial iterated on the Gram matrix, in ``gram_compute_dtype(dtype)``
            (float32 for a 16-bit dtype); square matrices run 'standard'). 'gram' takes
            no row-block team: each step of it chains m x m products whose every row block
            needs the whole other factor, so a split would gather m x m matrices several
            times per step to divide work that is mostly m^3 (``ns_row_blocks`` is refused
            with it).

    Returns:
        Tensor of G's shape and dtype. The cast to ``dtype`` happens before anything else,
        so feeding an already-cast G gives bit-identical output (distributed NS relies on
        this to ship matrices in the compute dtype).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: expected a tensor of shape (..., m, n), got {tuple(G.shape)}")
    if algorithm not in NS_ALGORITHMS:
        raise ValueError(f"ns_algorithm must be one of {NS_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "gram" and team is not None:
        raise ValueError("ns_algorithm 'gram' runs each matrix on one process; use ns_row_blocks=1")
    schedule = coefficients_for_steps(coefficients, steps)
    X = G.to(dtype) if dtype is not None else G
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if algorithm == "gram" and uses_gram_form(X.size(-2), X.size(-1)) and schedule:
        wide = frobenius_normalize(X.to(gram_compute_dtype(X.dtype)), eps)
        X = gram_iterate(wide, schedule, gram_restarts(tuple(schedule)))
    else:
        X = frobenius_normalize(X, eps)
        for a, b, c in schedule:
            X = ns_step(X, a, b, c) if team is None else blocked_ns_step(X, a, b, c, team)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def ns_flops(
    rows: int, cols: int, steps: int, algorithm: str = "standard", coefficients: CoefficientSpec = "quintic"
) -> float:
    """Floating-point operations of ``steps`` NS steps on one rows x cols matrix, on its
    smaller Gram side (m = min, n = max dimension). 'standard':

        A = X X^T: 2 m^2 n;   b A + c A A: 2 m^3;   (...) X: 2 m^2 n   ->  steps (4 m^2 n + 2 m^3)

    'gram' on a non-square matrix: ``gram_ns_flops`` with the restarts of ``coefficients``
    (4 s m^2 n + (8 steps - 6 s) m^3, s = restarts + 1); on a square one, 'standard'.
    Every matmul counts 2 m n k, whether or not a kernel skips a symmetric triangle; the
    elementwise terms, O(m^2 + m n), are left out."""
    m, n = min(rows, cols), max(rows, cols)
    if algorithm == "gram" and uses_gram_form(rows, cols) and steps > 0:
        restarts = gram_restarts(tuple(coefficients_for_steps(coefficients, steps)))
        return gram_ns_flops(m, n, steps, len(restarts))
    return float(steps) * (4.0 * m * m * n + 2.0 * m**3)


def frobenius_normalize(X: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """X_0 = X / (||X||_F + eps), the norm taken per matrix over the last two dims.

    Every singular value of X_0 lies in [0, 1]; eps keeps an all-zero X at zero.
    """
    return X / (X.norm(dim=(-2, -1), keepdim=True) + eps)


def ns_step(X: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One iteration: A = X X^T, X <- a X + (b A + c A^2) X.

    Maps each singular value s of X to a s + b s^3 + c s^5 and keeps the singular vectors.
    Cheapest when X is wide (rows <= cols), since A is rows x rows. Both symmetric products
    go through ``symmetric_matmul`` (one triangle on CUDA with Triton, plain torch otherwise).
    """
    A = gram_matrix(X)
    B = gram_poly(A, b, c)
    return a * X + B @ X


def ns_scalar_map(
    sigma: torch.Tensor | float,
    steps: int = 5,
    coefficients: CoefficientSpec = "quintic",
) -> torch.Tensor | float:
    """What ``steps`` NS iterations do to one singular value of the normalized input.

    sigma_{k+1} = a_k sigma_k + b_k sigma_k^3 + c_k sigma_k^5, starting from sigma_0 =
    sigma, a singular value of X_0 = G / (||G||_F + eps) (so 0 <= sigma <= 1). Exact in
    the arithmetic of ``sigma`` (float or tensor; use float64 for a reference curve).
    """
    for a, b, c in coefficients_for_steps(coefficients, steps):
        sq = sigma * sigma
        sigma = sigma * (a + sq * (b + c * sq))
    return sigma
