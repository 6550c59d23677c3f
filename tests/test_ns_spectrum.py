"""Spectrum of the NS input and the NS response, checked against planted spectra and real NS."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normopt.diagnostics.ns_spectrum import (
    DEFAULT_BANDS,
    default_band,
    fewest_ns_steps,
    fewest_ns_steps_joint,
    fewest_ns_steps_many,
    ns_output_deviation,
    ns_spectrum_record,
    singular_value_quantiles,
)
from normopt.optim.newton_schulz import QUINTIC, newton_schulz, ns_scalar_map

LEVELS = (0.01, 0.1, 0.5, 0.9, 0.99)


def planted(s: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (rows x r) and V (cols x r), r = len(s)."""
    gen = torch.Generator().manual_seed(seed)
    r = s.numel()
    U, _ = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    return U @ torch.diag(s.double()) @ V.T


def test_quantiles_of_a_planted_spectrum():
    # s_i = (i + 1) / 101, i = 0..100: linear in i, so the linear-rule quantile at level p
    # (position 100 p in the sorted list) is exactly (100 p + 1) / 101
    s = (torch.arange(101, dtype=torch.float64) + 1) / 101
    G = planted(s, rows=130)
    out = singular_value_quantiles(G, LEVELS)
    expected_rel_max = [(100 * p + 1) / 101 for p in LEVELS]  # sigma_max = 1
    fro = math.sqrt(sum(((i + 1) / 101) ** 2 for i in range(101)))
    assert out["sv_rel_max"] == pytest.approx(expected_rel_max, rel=1e-10)
    assert out["sv_rel_fro"] == pytest.approx([v / fro for v in expected_rel_max], rel=1e-10)


def test_quantiles_interpolate_between_neighbours_and_accept_wide_bf16():
    s = torch.tensor([4.0, 1.0, 2.0, 8.0])  # sorted 1, 2, 4, 8; level 0.5 -> position 1.5
    G = planted(s, rows=6).T.contiguous()  # 4 x 6: min(m, n) = 4 singular values
    out = singular_value_quantiles(G, (0.0, 0.5, 1 / 3, 1.0))
    assert out["sv_rel_max"] == pytest.approx([1 / 8, 3 / 8, 2 / 8, 1.0], rel=1e-10)
    assert out["sv_rel_fro"] == pytest.approx([v / math.sqrt(85) for v in (1, 3, 2, 8)], rel=1e-10)
    low = singular_value_quantiles(G.to(torch.bfloat16), (0.5,))
    assert low["sv_rel_max"][0] == pytest.approx(3 / 8, rel=2e-2)


def test_zero_matrix_gives_zeros_not_nan():
    out = singular_value_quantiles(torch.zeros(5, 3), LEVELS)
    assert out == {"sv_rel_max": [0.0] * 5, "sv_rel_fro": [0.0] * 5}
    record = ns_spectrum_record(torch.zeros(5, 3), 5, "quintic", LEVELS)
    assert record["ns_out_dev"] == [1.0] * 5 and record["ns_out_max_dev"] == 1.0
    assert record["min_ns_steps"] == [None] * 5 and record["min_ns_steps_all"] is None
    json.dumps(record, allow_nan=False)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("steps", [0, 1, 3, 5, 8])
def test_scalar_map_matches_newton_schulz_on_diagonal_matrices(dtype, rtol, coefficients, steps):
    # NS of diag(s) is diag(p_k(s / ||s||)): odd matrix polynomials of a diagonal stay diagonal
    s = torch.tensor([1.0, 0.7, 0.3, 0.1, 0.03, 0.01], dtype=torch.float64)
    G = torch.zeros(6, 9, dtype=dtype)
    G[range(6), range(6)] = s.to(dtype)
    out = newton_schulz(G, steps, coefficients, dtype=dtype, eps=0.0)
    expected = ns_scalar_map(s / s.norm(), steps, coefficients)
    assert torch.allclose(out.diagonal().double(), expected, rtol=rtol, atol=rtol * 1e-2)
    off = out.clone()
    off[range(6), range(6)] = 0
    assert off.abs().max() == 0
    # and the singular values of the output (a tall G runs transposed inside NS)
    tall = newton_schulz(G.T.contiguous(), steps, coefficients, dtype=dtype, eps=0.0)
    sv = torch.linalg.svdvals(tall.double())
    assert torch.allclose(sv.sort().values, expected.abs().sort().values, rtol=rtol, atol=rtol * 1e-2)


def test_output_deviation():
    p1 = 0.5 * (3.4445 - 4.7750 * 0.25 + 2.0315 * 0.0625)  # one quintic step at 0.5: 0.5 p(0.5)/0.5
    assert float(ns_output_deviation(0.5, 1, "quintic")) == pytest.approx(abs(p1 - 1), rel=1e-12)
    dev = ns_output_deviation(torch.tensor([0.0, 1.0]), 0)
    assert dev.tolist() == [1.0, 0.0]
    assert ns_output_deviation([0.2, 0.4], 5, QUINTIC).shape == (2,)


def test_default_bands():
    assert DEFAULT_BANDS == {"quintic": (0.6, 1.25), "polar_express": (0.8, 1.2)}
    assert default_band("Polar-Express") == (0.8, 1.2)
    with pytest.raises(ValueError, match="no default band"):
        default_band(QUINTIC)
    # the quintic band is mapped into itself: once in, a singular value stays in
    grid = torch.linspace(0.6, 1.25, 10001, dtype=torch.float64)
    image = ns_scalar_map(grid, 1, "quintic")
    assert image.min() >= 0.6 and image.max() <= 1.25
    # 5 steps (the default) are enough for sigma >= 1.4e-3 with either schedule
    sigma = torch.logspace(math.log10(1.4e-3), 0, 2001, dtype=torch.float64)
    for name, (lo, hi) in DEFAULT_BANDS.items():
        out = ns_scalar_map(sigma, 5, name)
        assert out.min() >= lo and out.max() <= hi, name


def test_fewest_steps_hand_checked_quintic():
    assert fewest_ns_steps(0.9) == 0  # already in (0.6, 1.25)
    assert fewest_ns_steps(1.0) == 0
    assert fewest_ns_steps(0.5) == 1  # p(0.5) = 1.1893
    assert fewest_ns_steps(0.2) == 1  # p(0.2) = 0.6511
    p = 0.1 * (3.4445 - 4.7750 * 0.01 + 2.0315 * 1e-4)  # 0.33967: still below 0.6
    assert p < 0.6 and 0.6 <= float(ns_scalar_map(p, 1)) <= 1.25
    assert fewest_ns_steps(0.1) == 2
    assert fewest_ns_steps(0.01) == 4 and fewest_ns_steps(1e-3) == 6 and fewest_ns_steps(1e-4) == 8
    assert fewest_ns_steps(0.0) is None
    assert fewest_ns_steps(1e-4, max_steps=7) is None
    assert fewest_ns_steps(0.1, band=(0.99, 1.0)) == 2  # p_2(0.1) = 0.9921


def test_fewest_steps_fall_monotonically_with_sigma():
    sigma = torch.logspace(-6, 0, 400, dtype=torch.float64)
    steps = fewest_ns_steps_many(sigma)
    assert None not in steps
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert steps[0] > steps[-1] == 0
    assert steps[:3] == [fewest_ns_steps(float(v)) for v in sigma[:3]]
    # for the self-mapped quintic band the joint answer is the slowest sigma's
    assert fewest_ns_steps_joint(sigma[::7]) == max(steps[::7])


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_fewest_steps_agree_with_brute_force(coefficients):
    band = DEFAULT_BANDS[coefficients]

    def brute(sigma: float) -> int | None:
        for k in range(31):
            if band[0] <= float(ns_scalar_map(torch.tensor(sigma, dtype=torch.float64), k, coefficients)) <= band[1]:
                return k
        return None

    sigma = [1e-5, 3e-4, 2e-3, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0]
    assert fewest_ns_steps_many(sigma, band, coefficients) == [brute(v) for v in sigma]


def test_polar_express_overshoot_makes_joint_larger():
    band = DEFAULT_BANDS["polar_express"]
    assert fewest_ns_steps(1.0, band, "polar_express") == 0
    assert fewest_ns_steps(0.5, band, "polar_express") == 3  # 0.5 -> 1.754, 0.300, 1.097
    # at 3 steps 0.9 has been thrown to 0.375; both are in the band from step 4 on
    assert fewest_ns_steps_joint([0.5, 0.9], band, "polar_express") == 4
    assert fewest_ns_steps_joint([1e-3, 0.1, 0.5, 1.0], band, "polar_express") == 5
    assert fewest_ns_steps_joint([], band, "polar_express") is None


def test_record_of_a_planted_matrix():
    s = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.01, 0.002, 0.0005], dtype=torch.float64)
    G = planted(s, rows=12, seed=3)
    record = ns_spectrum_record(G, 5, "quintic", LEVELS)
    assert set(record) == {
        "sv_rel_max",
        "sv_rel_fro",
        "momentum_sv_rel_max",
        "momentum_sv_rel_fro",
        "ns_steps",
        "ns_out_dev",
        "ns_out_max_dev",
        "min_ns_steps",
        "min_ns_steps_all",
        "rank",
    }
    assert record["rank"] == min(G.shape) == 7
    q = singular_value_quantiles(G, LEVELS)
    assert record["sv_rel_fro"] == q["sv_rel_fro"] and record["sv_rel_max"] == q["sv_rel_max"]
    # no momentum given: G is the momentum buffer (no Nesterov), its quantiles are repeated
    assert record["momentum_sv_rel_fro"] == q["sv_rel_fro"] and record["momentum_sv_rel_max"] == q["sv_rel_max"]
    assert record["ns_out_dev"] == pytest.approx(
        [abs(float(ns_scalar_map(v, 5)) - 1) for v in q["sv_rel_fro"]], rel=1e-12
    )
    # the worst singular value is the smallest one, 0.0005 / ||s||, which 5 steps leave far from 1
    worst = abs(float(ns_scalar_map(0.0005 / float(s.norm()), 5)) - 1)
    assert record["ns_out_max_dev"] == pytest.approx(worst, rel=1e-9) and worst > 0.5
    assert record["min_ns_steps"] == [fewest_ns_steps(v) for v in q["sv_rel_fro"]]
    assert record["min_ns_steps_all"] == max(record["min_ns_steps"])
    assert record["ns_steps"] == 5
    json.dumps(record, allow_nan=False)


def test_record_with_a_separate_momentum_buffer():
    """Nesterov: NS gets U = g + beta m; the record adds m's own quantiles beside U's, and
    everything about NS (deviations, steps) stays U's."""
    m = planted(torch.tensor([1.0, 0.3, 0.1, 0.03, 0.01], dtype=torch.float64), rows=8, seed=1)
    g = planted(torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6], dtype=torch.float64), rows=8, seed=2)
    U = g + 0.95 * m
    record = ns_spectrum_record(U, 5, "quintic", LEVELS, momentum=m)
    assert record == {
        **ns_spectrum_record(U, 5, "quintic", LEVELS),
        "momentum_sv_rel_fro": singular_value_quantiles(m, LEVELS)["sv_rel_fro"],
        "momentum_sv_rel_max": singular_value_quantiles(m, LEVELS)["sv_rel_max"],
    }
    assert record["momentum_sv_rel_fro"][0] < record["sv_rel_fro"][0]  # m alone is the worse conditioned
    # m's sorted spectrum 0.01, 0.03, 0.1, 0.3, 1: level p reads position 4 p
    assert record["momentum_sv_rel_max"] == pytest.approx(
        [0.01 + 0.04 * 0.02, 0.01 + 0.4 * 0.02, 0.1, 0.3 + 0.6 * 0.7, 0.3 + 0.96 * 0.7], rel=1e-9
    )
    json.dumps(record, allow_nan=False)
