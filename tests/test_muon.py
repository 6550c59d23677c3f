"""Muon / NorMuon on plain tensors: steps equal the formulas, arguments are validated."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from normopt.optim.muon import Muon, NorMuon
from normopt.optim.muon_update import normuon_normalize, update_scale
from normopt.optim.newton_schulz import newton_schulz
from normopt.optim.ns_rules import ns_steps_param_groups

QUINTIC = [(3.4445, -4.7750, 2.0315)] * 5


# --------------------------------------------------- independent reference formulas


def polar_poly(M: torch.Tensor, coeffs) -> torch.Tensor:
    """NS evaluated through the SVD: U p_k(...p_1(S / (||M||_F + 1e-7))) V^T."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    s = S / (torch.linalg.matrix_norm(M) + 1e-7)
    for a, b, c in coeffs:
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag(s) @ Vh


def scale_of(rows, cols, rule):
    return {
        "original": math.sqrt(max(1.0, rows / cols)),
        "match_adamw": 0.2 * math.sqrt(max(rows, cols)),
        "spectral": math.sqrt(rows / cols),
    }[rule]


def reference_run(W0, grads, lr, beta, nesterov, wd, rule, normuon=None):
    """Muon / NorMuon written out step by step for one matrix (float64)."""
    W, m = W0.clone(), torch.zeros_like(W0)
    v = torch.zeros(W0.shape[0], dtype=W0.dtype)
    for g in grads:
        m = beta * m + g
        u = g + beta * m if nesterov else m
        O = polar_poly(u, QUINTIC)
        if normuon is not None:
            beta2, eps = normuon
            v = beta2 * v + (1 - beta2) * (O**2).mean(dim=1)
            O_hat = O / (v.sqrt() + eps)[:, None]
            O = O_hat * (torch.linalg.matrix_norm(O) / torch.linalg.matrix_norm(O_hat))
        W = W * (1 - lr * wd)
        W = W - lr * scale_of(*W.shape, rule) * O
    return W, m, v


def toy(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    return W0, [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def run_optimizer(cls, W0, grads, **kwargs):
    p = torch.nn.Parameter(W0.clone())
    opt = cls([p], ns_dtype=torch.float64, **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


# ------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("shape", [(6, 4), (3, 5)])
@pytest.mark.parametrize("rule", ["original", "match_adamw", "spectral"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_equal_formula(shape, rule, nesterov):
    W0, grads = toy(shape, steps=3)
    kw = dict(lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=0.1, scale_rule=rule)
    W, state = run_optimizer(Muon, W0, grads, **kw)
    W_ref, m_ref, _ = reference_run(W0, grads, 0.03, 0.9, nesterov, 0.1, rule)
    torch.testing.assert_close(W, W_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(state["momentum_buffer"], m_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5)])
def test_normuon_steps_equal_formula(shape):
    W0, grads = toy(shape, steps=3, seed=1)
    kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.05, scale_rule="match_adamw", beta2=0.9, eps=1e-8)
    W, state = run_optimizer(NorMuon, W0, grads, **kw)
    W_ref, m_ref, v_ref = reference_run(W0, grads, 0.02, 0.95, True, 0.05, "match_adamw", normuon=(0.9, 1e-8))
    torch.testing.assert_close(W, W_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(state["momentum_buffer"], m_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(state["row_second_moment"], v_ref, rtol=0, atol=1e-12)
    assert state["row_second_moment"].shape == (shape[0],)  # one entry per output row


def test_default_bf16_step_uses_library_ns():
    W0, (g,) = toy((8, 5), steps=1)
    W0, g = W0.float(), g.float()
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=0.02)  # defaults: momentum 0.95, nesterov, quintic 5 steps, bf16, match_adamw
    p.grad = g.clone()
    opt.step()
    expected = W0 - 0.02 * (0.2 * math.sqrt(8)) * newton_schulz(g + 0.95 * g)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize("nesterov", [True, False])
def test_ns_input_is_the_matrix_the_step_orthogonalized(cls, nesterov):
    W0, grads = toy((6, 4), steps=2, seed=3)
    p, idle = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = cls([p, idle], lr=0.02, momentum=0.9, nesterov=nesterov, ns_dtype="float64")
    assert opt.ns_input(p) is None and opt.momentum_buffer(p) is None  # not stepped yet
    for g in grads:
        p.grad = g.clone()
        opt.step()
    m = opt.momentum_buffer(p)
    assert m is opt.state[p]["momentum_buffer"]
    torch.testing.assert_close(m, 0.9 * grads[0] + grads[1], rtol=0, atol=1e-12)
    U = opt.ns_input(p)
    if nesterov:
        assert torch.equal(U, grads[1].add(m, alpha=0.9))
    else:
        assert U is m
    assert opt.ns_input(idle) is None  # no gradient, never stepped
    p.grad = None
    assert opt.ns_input(p) is None


def test_normuon_normalize_keeps_norm_and_equalizes_rows():
    O = torch.randn(5, 7, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10, 0.5], dtype=torch.float64)[:, None]
    O_hat, v = normuon_normalize(O, torch.zeros(5, dtype=torch.float64), beta2=0.0, eps=0.0)
    torch.testing.assert_close(O_hat.norm(), O.norm())
    row_rms = O_hat.square().mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, row_rms.mean().expand(5))  # beta2 = 0: all rows equal RMS
    torch.testing.assert_close(v, O.square().mean(dim=1))
    zero, _ = normuon_normalize(torch.zeros(3, 4), torch.zeros(3), 0.95, 1e-8)
    assert torch.equal(zero, torch.zeros(3, 4))


def test_update_scale_values():
    assert update_scale(8192, 2048, "original") == pytest.approx(2.0)
    assert update_scale(2048, 8192, "original") == 1.0
    assert update_scale(2048, 8192, "match_adamw") == pytest.approx(0.2 * math.sqrt(8192))
    assert update_scale(512, 2048, "spectral") == pytest.approx(0.5)


def test_params_without_grad_are_skipped_and_state_round_trips():
    W0, grads = toy((6, 4), steps=4, seed=2)
    a, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone().T.contiguous())
    opt = NorMuon([a, b], ns_dtype="float64")
    a.grad = grads[0].clone()
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), W0.T)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() aliases the live buffers
    # continue in the original and in a fresh optimizer that loaded the state
    a2 = torch.nn.Parameter(a.detach().clone())
    opt2 = NorMuon([a2, torch.nn.Parameter(b.detach().clone())], ns_dtype="float64")
    opt2.load_state_dict(saved)
    for g in grads[1:]:
        a.grad, a2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(a.detach(), a2.detach())


def test_ns_steps_param_groups_and_per_group_overrides():
    named = [(f"layers.{i}.attention.wq.weight", torch.nn.Parameter(torch.randn(4, 4))) for i in range(3)]
    groups = ns_steps_param_groups(named, [("layers.0.*", 8)], default_steps=5, lr=0.01)
    assert [(g["ns_steps"], len(g["params"]), g["lr"]) for g in groups] == [(8, 1, 0.01), (5, 2, 0.01)]
    opt = Muon(groups, lr=0.5)
    assert [g["ns_steps"] for g in opt.param_groups] == [8, 5]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    assert opt.param_groups[0]["ns_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(nesterov="yes"), "nesterov"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(ns_coefficients="cubic"), "ns_coefficients"),
        (dict(ns_coefficients=[(1.0, 2.0)]), "ns_coefficients"),
        (dict(scale_rule="adam"), "scale_rule"),
        (dict(ns_mode="sharded"), "ns_mode"),
        (dict(ns_dtype="int8"), "ns_dtype"),
        (dict(ns_dtype=torch.int32), "ns_dtype"),
    ],
)
def test_invalid_arguments_are_named(kwargs, name):
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=name):
        Muon([p], **kwargs)
    with pytest.raises(ValueError, match=name):
        NorMuon([p], **kwargs)


@pytest.mark.parametrize("kwargs, name", [(dict(beta2=1.0), "beta2"), (dict(eps=0.0), "eps"), (dict(eps=-1.0), "eps")])
def test_invalid_normuon_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NorMuon([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_param_group_given_as_generator_keeps_its_params():
    layers = [torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False)]
    opt = Muon([{"params": (layer.weight for layer in layers)}])
    assert len(opt.param_groups[0]["params"]) == 2


def test_non_matrix_params_and_bad_group_overrides_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.randn(2, 3, 4, 5))])
    with pytest.raises(ValueError, match="scale_rule"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(3, 3))], "scale_rule": "nope"}])
