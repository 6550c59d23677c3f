"""Gram Newton-Schulz (``optim.ns_algorithm: gram``) against standard NS and an SVD reference.

The reference: G = U diag(s) V^T built in float64 with singular values log-spaced over a
condition number; the exact result of K NS steps is U diag(p_K(s / (||G||_F + eps))) V^T
with p_K the scalar map (``ns_scalar_map`` in float64), and the polar factor is U V^T.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from normopt.errors import UserError
from normopt.optim.config import OptimConfig
from normopt.optim.gram_newton_schulz import RESTART_Q_SPREAD, gram_ns_flops, gram_restarts, q_spread
from normopt.optim.muon import Muon
from normopt.optim.newton_schulz import coefficients_for_steps, newton_schulz, ns_flops, ns_scalar_map
from normopt.parallel.row_block_team import RowBlockTeam
from tests.test_newton_schulz import svd_matrix

COEFFICIENTS = ("quintic", "polar_express")
# wide, tall, and a mildly rectangular one (n < 1.5 m, where Gram saves no FLOPs but must
# still be right)
SHAPES = [(40, 136), (136, 40), (64, 90)]
CONDITIONS = (1e1, 1e2, 1e4)


def exact_result(U, s, V, G, steps, coefficients):
    """U diag(p(s / (||G||_F + eps))) V^T in float64: what K exact NS steps give."""
    mapped = ns_scalar_map(s / (G.norm() + 1e-7), steps, coefficients)
    return (U * mapped) @ V.mT, mapped


@pytest.mark.parametrize("coefficients", COEFFICIENTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cond", CONDITIONS, ids=lambda c: f"cond{c:g}")
def test_gram_float32_is_the_exact_iteration_to_float32_rounding(coefficients, shape, cond):
    """float32 NS dtype: both algorithms land on the exact result U p(S) V^T.

    Bounds, on every singular value and relative (Frobenius) on the matrix: standard 1e-4,
    Gram 5e-3. float32 rounds to 6e-8; standard NS re-forms X X^T every step (measured
    <= 1e-5 here), Gram carries R and Q, whose eigenvalue spread (<= 1e3 by the restart
    rule; 631 for Polar Express) amplifies that rounding in the directions of the smallest
    singular values: measured up to 1.5e-4 on singular values and 1.3e-3 on the matrix
    (Polar Express, condition 1e4; quintic <= 1e-5), below bf16's 2^-8 = 4e-3 per step of
    the default NS dtype. A wrong restart, a missing step or a swapped coefficient moves
    singular values by > 1e-2 (consecutive steps differ by that much)."""
    U, s, V, G = svd_matrix(*shape, cond, seed=int(cond) + shape[0])
    exact, mapped = exact_result(U, s, V, G, 5, coefficients)
    for algorithm, bound in (("standard", 1e-4), ("gram", 5e-3)):
        O = newton_schulz(G.float(), 5, coefficients, dtype=torch.float32, algorithm=algorithm).double()
        sv = torch.linalg.svdvals(O)
        assert (sv - mapped.sort(descending=True).values).abs().max() < bound, algorithm
        assert (O - exact).norm() / exact.norm() < bound, algorithm


@pytest.mark.parametrize("coefficients", COEFFICIENTS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("cond", (1e2, 1e4), ids=lambda c: f"cond{c:g}")
def test_gram_with_a_bf16_ns_dtype_stays_in_the_standard_band(coefficients, shape, cond):
    """bfloat16 NS dtype (the CUDA default): standard NS computes in bf16, Gram NS (input
    rounded to bf16 like standard's, then the Gram iteration in float32) lands in the same
    singular-value band: every singular value within [min p, max p] of the exact scalar map
    +- 0.02 (bf16's step-wise rounding, 2^-8 per step, is what widens standard's band; Gram
    only sees it once, in the input) and Gram's distance to the polar factor U V^T is no
    larger than standard's + 0.01. Both distances are printed (orthogonality error against
    the SVD reference)."""
    U, s, V, G = svd_matrix(*shape, cond, seed=7 + shape[0])
    exact, mapped = exact_result(U, s, V, G, 5, coefficients)
    polar = U @ V.mT
    low, high = mapped.min().item(), mapped.max().item()
    error = {}
    for algorithm in ("standard", "gram"):
        O = newton_schulz(G, 5, coefficients, dtype=torch.bfloat16, algorithm=algorithm).double()
        sv = torch.linalg.svdvals(O)
        lo_tol = 0.02 if algorithm == "gram" else 0.4  # bf16 standard lifts the smallest values (2^-8 noise)
        assert low - lo_tol <= sv.min() and sv.max() <= high + 0.02, (algorithm, sv.min(), sv.max(), low, high)
        error[algorithm] = ((O - polar).norm() / polar.norm()).item()
    print(
        f"{coefficients} {shape} cond {cond:g}: ||O - UV^T||_F / ||UV^T||_F standard {error['standard']:.4f}, "
        f"gram {error['gram']:.4f}"
    )
    assert error["gram"] <= error["standard"] + 0.01


def test_published_restart_rule_gives_one_restart_for_five_steps():
    """5 steps: one restart for each shipped set (the authors' recommendation), placed
    where Q's eigenvalue spread is smallest; without a restart the spread exceeds the
    bound by orders of magnitude. Longer schedules need more."""
    for name, expected in (("quintic", (3,)), ("polar_express", (1,))):
        schedule = tuple(coefficients_for_steps(name, 5))
        assert gram_restarts(schedule) == expected
        assert q_spread(schedule, expected) <= RESTART_Q_SPREAD < q_spread(schedule, ())
        assert all(q_spread(schedule, (r,)) >= q_spread(schedule, expected) for r in range(1, 5))
    assert len(gram_restarts(tuple(coefficients_for_steps("polar_express", 8)))) == 2
    assert gram_restarts(tuple(coefficients_for_steps("quintic", 3))) == ()


@pytest.mark.parametrize("coefficients", COEFFICIENTS)
@pytest.mark.parametrize("shape,steps", [((24, 72), 5), ((72, 24), 3), ((30, 30), 5), ((20, 50), 8)])
def test_ns_flops_counts_the_matmuls_gram_runs(coefficients, shape, steps):
    """``ns_flops(..., 'gram', coefficients)`` equals torch's count of the matmuls (square:
    the standard iteration's count)."""
    G = torch.randn(*shape)
    with FlopCounterMode(display=False) as counter:
        newton_schulz(G, steps, coefficients, dtype=torch.float32, algorithm="gram")
    assert counter.get_total_flops() == ns_flops(*shape, steps, "gram", coefficients)
    if shape[0] == shape[1]:
        assert ns_flops(*shape, steps, "gram", coefficients) == ns_flops(*shape, steps)


def test_gram_flops_on_the_1b_shapes():
    """5 steps, one restart: 8 m^2 n + 28 m^3 against 20 m^2 n + 10 m^3 (m = min side)."""
    for rows, cols in ((512, 2048), (8192, 2048), (2048, 8192)):
        m, n = min(rows, cols), max(rows, cols)
        gram = ns_flops(rows, cols, 5, "gram", "quintic")
        assert gram == gram_ns_flops(m, n, 5, 1) == 8 * m * m * n + 28 * m**3
        assert gram < ns_flops(rows, cols, 5) == 20 * m * m * n + 10 * m**3
    assert ns_flops(2048, 8192, 5, "gram", "polar_express") / ns_flops(2048, 8192, 5) == pytest.approx(60 / 90)


def test_square_matrices_run_the_standard_iteration_bit_for_bit():
    G = torch.randn(2, 33, 33, generator=torch.Generator().manual_seed(3))
    for coefficients in COEFFICIENTS:
        assert torch.equal(
            newton_schulz(G, 5, coefficients, dtype=torch.float32, algorithm="gram"),
            newton_schulz(G, 5, coefficients, dtype=torch.float32),
        )


def test_gram_is_batched_and_keeps_dtype_and_zeros():
    g = torch.Generator().manual_seed(4)
    G = torch.randn(3, 20, 52, generator=g)
    batched = newton_schulz(G, 5, "polar_express", dtype=torch.float32, algorithm="gram")
    for i in range(3):
        one = newton_schulz(G[i], 5, "polar_express", dtype=torch.float32, algorithm="gram")
        torch.testing.assert_close(batched[i], one, rtol=0, atol=1e-5)
    bf16 = newton_schulz(G.bfloat16(), 5, "quintic", algorithm="gram")
    assert bf16.dtype == torch.bfloat16
    zero = newton_schulz(torch.zeros(6, 14), 5, "quintic", dtype=torch.float32, algorithm="gram")
    assert torch.equal(zero, torch.zeros(6, 14))


def test_gram_refuses_row_blocks_everywhere():
    """Each Gram step chains m x m products whose row blocks need the whole other factor:
    row-block teams are refused rather than run with extra all-gathers."""
    with pytest.raises(ValueError, match="ns_row_blocks"):
        newton_schulz(torch.randn(8, 20), 5, algorithm="gram", team=RowBlockTeam(2))
    with pytest.raises(ValueError, match="ns_row_blocks"):
        Muon([torch.nn.Parameter(torch.randn(8, 20))], ns_algorithm="gram", ns_row_blocks=2)
    with pytest.raises(ValueError, match="ns_algorithm"):
        Muon([torch.nn.Parameter(torch.randn(8, 20))], ns_algorithm="fast")
    with pytest.raises(UserError, match="optim.ns_row_blocks"):
        OptimConfig(name="muon", ns_algorithm="gram", ns_row_blocks=2).validate()
    OptimConfig(name="muon", ns_algorithm="gram").validate()


def test_muon_step_counts_gram_flops_and_trains_like_standard():
    """One Muon step with gram, float32: the update equals standard's to float32 rounding
    (same polynomial), and ns_flops_per_step counts the Gram FLOPs."""
    g = torch.Generator().manual_seed(5)
    init, grad = torch.randn(16, 48, generator=g), torch.randn(16, 48, generator=g)
    weights = {}
    for algorithm in ("standard", "gram"):
        p = torch.nn.Parameter(init.clone())
        opt = Muon([p], lr=0.1, ns_algorithm=algorithm, ns_dtype="float32")
        p.grad = grad.clone()
        opt.step()
        weights[algorithm] = p.detach()
        assert opt.ns_flops_per_step() == ns_flops(16, 48, 5, algorithm, "quintic")
    torch.testing.assert_close(weights["gram"], weights["standard"], rtol=0, atol=1e-5)
    assert not math.isclose(ns_flops(16, 48, 5, "gram"), ns_flops(16, 48, 5))


def test_a_state_dict_saved_before_ns_algorithm_existed_loads_as_standard():
    p = torch.nn.Parameter(torch.randn(6, 10))
    opt = Muon([p], ns_dtype="float32")
    p.grad = torch.randn(6, 10)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["ns_algorithm"]
    fresh = Muon([p], ns_dtype="float32", ns_algorithm="gram")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["ns_algorithm"] == "standard"
    fresh.step()  # runs: no KeyError
