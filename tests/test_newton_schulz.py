"""Newton-Schulz: the singular-value band, the polar factor, the scalar map, the schedules."""

from __future__ import annotations

import math

import pytest
import torch

from normopt.optim.newton_schulz import (
    POLAR_EXPRESS,
    QUINTIC,
    coefficient_schedule,
    coefficients_for_steps,
    newton_schulz,
    ns_scalar_map,
)

# What 5 quintic steps do to singular values of the normalized input that exceed ~1.5e-3
# (worked out from the scalar map: the polynomial's max on [0, 1] is p(0.5546) = 1.2024).
QUINTIC_BAND = (0.68, 1.21)
QUINTIC_THRESHOLD = 1.6e-3


def svd_matrix(m: int, n: int, cond: float, batch: tuple[int, ...] = (), seed: int = 0):
    """G = U diag(s) V^T in float64 with singular values log-spaced over ``cond``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    s = 3.7 * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return U, s, V, (U * s) @ V.mT


SHAPES = [(64, 64), (96, 48), (48, 96)]


def test_scalar_map_band_for_quintic():
    sigma = torch.logspace(math.log10(QUINTIC_THRESHOLD), 0, 20001, dtype=torch.float64)
    out = ns_scalar_map(sigma, 5, "quintic")
    assert out.min() >= QUINTIC_BAND[0] and out.max() <= QUINTIC_BAND[1]
    # ... and below the threshold 5 steps are not enough: the map stays well under 0.68.
    assert ns_scalar_map(1e-4, 5, "quintic") < 0.1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_singular_values_in_quintic_band(shape):
    U, s, V, G = svd_matrix(*shape, cond=30)
    X = newton_schulz(G.float())  # defaults: quintic, 5 steps, bf16
    assert X.dtype == torch.float32 and X.shape == G.shape
    sv = torch.linalg.svdvals(X.double())
    # bf16 rounding moves singular values by ~1%; the band itself is [0.68, 1.21].
    assert sv.min() >= 0.66 and sv.max() <= 1.23, (sv.min(), sv.max())
    # The singular directions are those of G: X v_i points along u_i.
    cos = torch.nn.functional.cosine_similarity((X.double() @ V).mT, U.mT, dim=-1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ns_is_the_scalar_map_applied_to_the_svd(shape):
    """NS(G) = U p(S / ||G||_F) V^T: in float64 the match is to rounding error, and
    directions above the threshold end within the band's distance of U V^T."""
    U, s, V, G = svd_matrix(*shape, cond=1e4)
    X = newton_schulz(G, dtype=torch.float64)
    mapped = ns_scalar_map(s / (s.norm() + 1e-7), 5, "quintic")
    torch.testing.assert_close(X, (U * mapped) @ V.mT, rtol=0, atol=1e-10)
    above = s / s.norm() > QUINTIC_THRESHOLD
    assert above.sum() >= min(shape) // 2  # the test exercises both sides of the threshold
    assert (~above).any()
    err = (X @ V - U).norm(dim=-2)  # per direction: |p(sigma_i) - 1|
    assert err[above].max() <= 0.33
    assert err[~above].max() > 0.33  # small directions are not orthogonalized


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_polar_express_converges_to_polar_factor(shape):
    U, s, V, G = svd_matrix(*shape, cond=100)
    polar = U @ V.mT
    x32 = newton_schulz(G.float(), steps=8, coefficients="polar_express", dtype=torch.float32).double()
    assert (x32 - polar).norm() / polar.norm() < 1e-3
    x16 = newton_schulz(G.float(), steps=8, coefficients=POLAR_EXPRESS).double()  # bf16
    sv = torch.linalg.svdvals(x16)
    assert sv.min() > 0.98 and sv.max() < 1.02
    assert (x16 - polar).norm() / polar.norm() < 0.06  # bf16 noise, not the method


def test_scalar_map_matches_ns_on_diagonal_matrices():
    d = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.01, 1e-3, 0.0], dtype=torch.float64)
    for shape, steps, coeffs in [((7, 7), 5, "quintic"), ((7, 11), 3, "polar_express"), ((12, 7), 9, QUINTIC)]:
        G = torch.zeros(shape, dtype=torch.float64)
        G[range(7), range(7)] = d
        X = newton_schulz(G, steps=steps, coefficients=coeffs, dtype=torch.float64)
        expected = torch.zeros_like(G)
        expected[range(7), range(7)] = ns_scalar_map(d / (d.norm() + 1e-7), steps, coeffs)
        torch.testing.assert_close(X, expected, rtol=0, atol=1e-12)
    # float arithmetic works too (diagnostics call it on Python numbers).
    assert ns_scalar_map(0.5, 1, "quintic") == pytest.approx(3.4445 * 0.5 - 4.775 * 0.125 + 2.0315 * 0.03125)


def test_tall_and_wide_are_transposes_of_each_other():
    G = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(newton_schulz(G), newton_schulz(G.mT.contiguous()).mT, rtol=0, atol=2e-2)
    torch.testing.assert_close(
        newton_schulz(G, dtype=torch.float64), newton_schulz(G.mT, dtype=torch.float64).mT, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("shape", [(3, 20, 12), (2, 2, 12, 20)])
def test_batched_equals_per_matrix(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X = newton_schulz(G, dtype=torch.float64)
    flat_G, flat_X = G.reshape(-1, *shape[-2:]), X.reshape(-1, *shape[-2:])
    for g, x in zip(flat_G, flat_X):
        torch.testing.assert_close(x, newton_schulz(g, dtype=torch.float64), rtol=0, atol=1e-12)
    # Each matrix is normalized by its own Frobenius norm: scaling one changes nothing
    # (up to the eps = 1e-7 added to the norm, a ~1e-8 relative change here).
    scaled = G.clone()
    scaled.reshape(-1, *shape[-2:])[0] *= 1000.0
    torch.testing.assert_close(newton_schulz(scaled, dtype=torch.float64), X, rtol=0, atol=1e-6)


def test_batched_bf16_singular_values_in_band():
    _, _, _, G = svd_matrix(32, 48, cond=20, batch=(4,))
    sv = torch.linalg.svdvals(newton_schulz(G.float()).double())
    assert sv.min() >= 0.66 and sv.max() <= 1.23


def test_zero_matrix_gives_zeros_and_dtype_is_preserved():
    assert torch.equal(newton_schulz(torch.zeros(5, 3)), torch.zeros(5, 3))
    G = torch.randn(6, 4, dtype=torch.float64)
    assert newton_schulz(G).dtype == torch.float64
    assert newton_schulz(G.bfloat16()).dtype == torch.bfloat16
    # Casting first and then calling gives the same bits as letting NS cast
    # (distributed NS ships matrices already in the compute dtype).
    assert torch.equal(newton_schulz(G.float()).bfloat16(), newton_schulz(G.float().bfloat16()))


def test_coefficient_schedules():
    assert coefficient_schedule("quintic") == (QUINTIC,)
    assert coefficient_schedule("Polar-Express") == POLAR_EXPRESS
    assert coefficient_schedule((1.5, -0.5, 0.0)) == ((1.5, -0.5, 0.0),)
    assert coefficient_schedule([[2, -1, 0], [1.5, -0.5, 0]]) == ((2.0, -1.0, 0.0), (1.5, -0.5, 0.0))
    steps = coefficients_for_steps("polar_express", 10)
    assert steps[:8] == list(POLAR_EXPRESS) and steps[8:] == [POLAR_EXPRESS[-1]] * 2
    assert POLAR_EXPRESS[0][0] == pytest.approx(8.28721201814563 / 1.01)
    assert POLAR_EXPRESS[-1] == (1.875, -1.25, 0.375)
    for bad in ["cubic", (1.0, 2.0), [], [(1, 2, 3), "x"], 3.0]:
        with pytest.raises(ValueError, match="ns_coefficients"):
            coefficient_schedule(bad)
    with pytest.raises(ValueError, match="ns_steps"):
        coefficients_for_steps("quintic", -1)
    with pytest.raises(ValueError, match="shape"):
        newton_schulz(torch.ones(3))


def test_public_function_is_exported_from_the_package():
    import normopt.optim
    from normopt.optim.newton_schulz import QUINTIC

    G = torch.randn(8, 5)
    assert callable(normopt.optim.newton_schulz)
    torch.testing.assert_close(normopt.optim.newton_schulz(G, steps=5, coefficients=QUINTIC), newton_schulz(G))
