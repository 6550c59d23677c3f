"""How evenly a matrix spreads its energy over its singular directions.

For M (m x n) with singular values s_1..s_r, r = min(m, n), the energy shares

    p_i = s_i^2 / sum_j s_j^2        (sum_i p_i = 1; sum_j s_j^2 = ||M||_F^2)

define the singular-value entropy H(M) = -sum_i p_i log p_i (nats, 0 log 0 = 0) and

    normalised entropy   h(M)     = H(M) / log r      in [0, 1]
    effective rank       erank(M) = exp(H(M))         in [1, r]

h = 1 and erank = r when all r singular values are equal (an isotropic matrix: a multiple
of a semi-orthogonal one, what Muon's Newton-Schulz step aims its update at); h = 0 and
erank = 1 for a rank-one matrix.

Energy shares, not Roy & Vetterli's p_i = s_i / sum_j s_j ("The effective rank", 2007,
whose exp-entropy form erank keeps): with s_i^2, p_i is the share of ||M||_F^2 (for an
update: of its squared step length) along singular direction i, the trace-normalised
spectrum of M M^T. It is the stricter of the two: for one spectrum the entropy of
p ~ s^beta never rises with beta (dH/dbeta = -beta Var_p(log p) <= 0), so the energy
version is at most the s_i version, with equality exactly when the nonzero singular values
are equal; both give 1 and r for isotropic matrices and 0 and 1 for rank-one ones.

Undefined cases are None, never a made-up number: an all-zero matrix has no energy to
share (h and erank None), and for r = 1 log r = 0, so h is None (erank is 1). A non-finite
matrix gives nan. Pure math on tensors: no distributed code, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from normopt.diagnostics.ns_spectrum import singular_values

MEASURES = ("entropy", "erank")


def energy_shares(sigma: torch.Tensor) -> torch.Tensor | None:
    """p_i = s_i^2 / sum_j s_j^2 in float64, or None when every s_i is 0."""
    energy = sigma.detach().double().square()
    total = energy.sum()
    return None if total == 0 else energy / total


def spectral_entropy(p: torch.Tensor) -> float:
    """H = -sum_i p_i log p_i in nats, with 0 log 0 = 0 (``xlogy``), clipped to [0, log r]:
    rounding may otherwise leave it a hair outside (-0.0, or log r + 1e-16)."""
    h = float(-torch.special.xlogy(p, p).sum())
    return min(max(0.0, h), math.log(p.numel()))


def normalised_entropy(sigma: torch.Tensor) -> float | None:
    """h = H / log r from the r singular values ``sigma``; None for r = 1 or all zeros."""
    p = energy_shares(sigma)
    if p is None or p.numel() == 1:
        return None
    return min(spectral_entropy(p) / math.log(p.numel()), 1.0)


def effective_rank(sigma: torch.Tensor) -> float | None:
    """erank = exp(H) from the singular values ``sigma``; None when all are zero."""
    p = energy_shares(sigma)
    return None if p is None else min(math.exp(spectral_entropy(p)), float(p.numel()))


def isotropy(matrix: torch.Tensor) -> dict[str, float | None]:
    """{"entropy": h, "erank": erank} of a matrix, from one ``torch.linalg.svdvals`` in
    float32 (float64 stays float64; ``ns_spectrum.singular_values``)."""
    if not bool(torch.isfinite(matrix).all()):  # svdvals refuses such input
        return {"entropy": math.nan, "erank": math.nan}
    sigma = singular_values(matrix)
    return {"entropy": normalised_entropy(sigma), "erank": effective_rank(sigma)}


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def cell_means(
    matrices: Mapping[str, Mapping[str, float | None]], cell_of: Mapping[str, str], fields: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per cell, the mean of each of ``fields`` over the cell's matrices (``mean_or_none``:
    a matrix whose value is None, e.g. an all-zero update, is left out of that mean).

    ``matrices``: name -> {field: value}; ``cell_of``: name -> cell label. Cells keep the
    order in which their first matrix appears."""
    members: dict[str, list[str]] = {}
    for name in matrices:
        members.setdefault(cell_of[name], []).append(name)
    return {cell: {k: mean_or_none(matrices[n][k] for n in names) for k in fields} for cell, names in members.items()}
