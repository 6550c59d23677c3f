"""Norm layers against direct evaluations of their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from normopt.models.derf import Derf, DerfEMA, commit_running_scales
from normopt.models.dyt import DyT
from normopt.models.rmsnorm import RMSNorm

torch.manual_seed(0)


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)


def _check_grads(module, x, reference_fn) -> None:
    """Autograd through the module equals autograd through ``reference_fn`` (float64)."""
    x1 = x.clone().requires_grad_(True)
    module(x1).pow(2).sum().backward()
    params64 = {n: p.detach().double().requires_grad_(True) for n, p in module.named_parameters()}
    x2 = x.detach().double().requires_grad_(True)
    reference_fn(x2, params64).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-4, atol=1e-5)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad.double(), params64[name].grad, rtol=1e-4, atol=1e-5)


def test_rmsnorm_matches_formula_and_grads():
    norm = RMSNorm(16, eps=1e-5)
    _randomise(norm)
    x = torch.randn(3, 5, 16) * 4

    def ref(x, p):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * p["weight"]

    torch.testing.assert_close(norm(x).double(), ref(x.double(), {"weight": norm.weight.double()}),
                               rtol=1e-5, atol=1e-6)
    _check_grads(norm, x, ref)


def test_dyt_matches_formula_and_grads():
    norm = DyT(16, alpha_init=0.7)
    assert norm.alpha.item() == pytest.approx(0.7)
    _randomise(norm)
    x = torch.randn(3, 5, 16) * 3

    def ref(x, p):
        return p["weight"] * torch.tanh(p["alpha"] * x) + p["bias"]

    params = {n: p.detach().double() for n, p in norm.named_parameters()}
    torch.testing.assert_close(norm(x).double(), ref(x.double(), params), rtol=1e-5, atol=1e-6)
    _check_grads(norm, x, ref)


def test_derf_matches_formula_and_grads():
    norm = Derf(16, alpha_init=0.5, shift_init=0.1)
    assert norm.shift.item() == pytest.approx(0.1)
    _randomise(norm)
    x = torch.randn(3, 5, 16) * 3

    def ref(x, p):
        return p["weight"] * torch.erf(p["alpha"] * x + p["shift"]) + p["bias"]

    params = {n: p.detach().double() for n, p in norm.named_parameters()}
    torch.testing.assert_close(norm(x).double(), ref(x.double(), params), rtol=1e-5, atol=1e-6)
    _check_grads(norm, x, ref)


@pytest.mark.parametrize("cls", [DyT, Derf])
def test_alpha_and_shift_are_learned(cls):
    """One optimizer step moves the scalars: they receive gradients and are parameters."""
    norm = cls(8)
    scalars = {n: p.detach().clone() for n, p in norm.named_parameters() if p.numel() == 1}
    assert set(scalars) == ({"alpha", "shift"} if cls is Derf else {"alpha"})
    opt = torch.optim.SGD(norm.parameters(), lr=0.1)
    x, target = torch.randn(4, 8) * 2, torch.randn(4, 8)
    (norm(x) - target).pow(2).mean().backward()
    opt.step()
    for name, before in scalars.items():
        assert not torch.equal(getattr(norm, name).detach(), before), name


@pytest.mark.parametrize("cls", [RMSNorm, DyT, Derf, DerfEMA])
def test_bf16_is_safe_for_large_inputs(cls):
    """bf16 activations far outside erf/tanh's linear range stay finite and close to fp32."""
    norm = cls(32)
    x = torch.randn(4, 32) * 1e4
    y32, y16 = norm(x), norm(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


def test_derf_ema_starts_as_derf_and_follows_the_formula():
    torch.manual_seed(1)
    ema, plain = DerfEMA(16, momentum=0.9, blend=0.5), Derf(16)
    plain.load_state_dict({k: v for k, v in ema.state_dict().items() if k != "running_mean_square"})
    x = torch.randn(6, 16) * 5
    ema.eval()
    torch.testing.assert_close(ema(x), plain(x))  # r = 1 at init -> c = 1
    ema.train()
    batches = [torch.randn(6, 16) * 5, torch.randn(6, 16) * 3]
    for b in batches:
        ema(b)
    commit_running_scales(ema)
    observed = sum(b.pow(2).mean() for b in batches) / 2
    expected_r = 0.9 * 1.0 + 0.1 * observed
    torch.testing.assert_close(ema.running_mean_square, expected_r.reshape(1))
    c = 0.5 + 0.5 * expected_r.sqrt()
    p = {n: t.detach() for n, t in ema.named_parameters()}
    ref = p["weight"] * torch.erf(p["alpha"] * x / c + p["shift"]) + p["bias"]
    torch.testing.assert_close(ema.eval()(x), ref)
    assert "running_mean_square" in ema.state_dict()
    assert "pending_sum" not in ema.state_dict()


def test_derf_ema_eval_mode_collects_nothing():
    ema = DerfEMA(8).eval()
    ema(torch.randn(2, 8) * 10)
    commit_running_scales(ema)
    assert ema.running_mean_square.item() == 1.0


def test_derf_ema_rescales_large_inputs_away_from_saturation():
    """With inputs of RMS 20, plain Derf (alpha 0.5) saturates most features; derf_ema does
    not once its running scale has adapted."""
    torch.manual_seed(2)
    ema, plain = DerfEMA(64, momentum=0.0, blend=1.0), Derf(64)
    x = torch.randn(32, 64) * 20
    ema.train()
    ema(x)
    commit_running_scales(ema)

    def saturated(module):
        arg = module.alpha * x / (ema.running_mean_square.sqrt() if module is ema else 1.0)
        slope = torch.exp(-arg.pow(2))  # erf'(z) / erf'(0)
        return (slope < 0.1).float().mean().item()

    assert saturated(plain) > 0.8
    assert saturated(ema) < 0.05
    assert math.isclose(ema.running_mean_square.item(), x.pow(2).mean().item(), rel_tol=1e-5)
