"""Norm layers against direct evaluations of their formulas, and the norm registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from normopt.models.derf import Derf, DerfEMA, commit_running_scales
from normopt.models.dyt import DyT
from normopt.models.layernorm import LayerNorm
from normopt.models.norm_layer import NormConfig
from normopt.models.norms import NORMS, build_norm, norm_class
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

    torch.testing.assert_close(
        norm(x).double(), ref(x.double(), {"weight": norm.weight.double()}), rtol=1e-5, atol=1e-6
    )
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


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch_layer_norm_and_grads(bias):
    norm = LayerNorm(16, eps=1e-5, bias=bias)
    assert [n for n, _ in norm.named_parameters()] == (["weight", "bias"] if bias else ["weight"])
    _randomise(norm)
    x = torch.randn(3, 5, 16) * 4 + 2

    def ref(x, p):
        return F.layer_norm(x, (16,), p["weight"], p.get("bias"), 1e-5)

    def formula(x, p):
        centred = x - x.mean(-1, keepdim=True)
        y = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * p["weight"]
        return y + p["bias"] if "bias" in p else y

    params = {n: p.detach().double() for n, p in norm.named_parameters()}
    torch.testing.assert_close(norm(x).double(), ref(x.double(), params), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm(x).double(), formula(x.double(), params), rtol=1e-5, atol=1e-6)
    _check_grads(norm, x, ref)


@pytest.mark.parametrize("cls", tuple(NORMS.values()))
def test_bf16_is_safe_for_large_inputs(cls):
    """bf16 activations far outside erf/tanh's linear range stay finite and close to fp32."""
    norm = cls(32)
    x = torch.randn(4, 32) * 1e4
    y32, y16 = norm(x), norm(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2)


def _commit_steps(ema, inputs):
    """One optimizer step per input: a training forward, then the commit."""
    ema.train()
    for x in inputs:
        ema(x)
        commit_running_scales(ema)


def test_derf_ema_starts_as_derf_and_follows_the_formula():
    torch.manual_seed(1)
    ema, plain = DerfEMA(16, momentum=0.9, blend=0.5), Derf(16)
    plain.load_state_dict({k: v for k, v in ema.state_dict().items() if k in dict(plain.named_parameters())})
    x = torch.randn(6, 16) * 5
    torch.testing.assert_close(ema.eval()(x), plain(x), rtol=0, atol=0)  # no commit yet: c = 1
    steps = [[torch.randn(6, 16) * 5, torch.randn(6, 16) * 3], [torch.randn(6, 16) * 7]]
    ema.train()
    r, v1 = 0.0, None
    for micro_batches in steps:
        for b in micro_batches:
            ema(b)
        commit_running_scales(ema)
        v = sum(b.double().pow(2).mean() for b in micro_batches) / len(micro_batches)
        v1 = v if v1 is None else v1
        r = 0.9 * r + 0.1 * v
    assert ema.commits.item() == 2
    torch.testing.assert_close(ema.reference_mean_square, v1.reshape(1))
    torch.testing.assert_close(ema.running_mean_square, r.reshape(1))
    c = 0.5 + 0.5 * (r / (1 - 0.9**2) / v1).sqrt()
    torch.testing.assert_close(ema.input_scale(), c.float().reshape(1))
    p = {n: t.detach() for n, t in ema.named_parameters()}
    ref = p["weight"] * torch.erf(p["alpha"] * x / c.float() + p["shift"]) + p["bias"]
    torch.testing.assert_close(ema.eval()(x), ref)
    state = ema.state_dict()
    assert {"running_mean_square", "reference_mean_square", "commits"} <= set(state)
    assert "pending_sum" not in state


def test_derf_ema_stationary_inputs_keep_c_at_one():
    """The same statistic every step: bias correction and r* make c = 1 at every step."""
    torch.manual_seed(3)
    ema = DerfEMA(32, momentum=0.99, blend=0.5)
    x = torch.randn(8, 32) * 0.03
    for _ in range(2000):
        _commit_steps(ema, [x])
        assert abs(ema.input_scale().item() - 1.0) < 1e-6


def test_derf_ema_is_scale_equivariant():
    """Scaling every input by a constant changes no c."""
    torch.manual_seed(4)
    small, large = DerfEMA(16, momentum=0.9), DerfEMA(16, momentum=0.9)
    inputs = [torch.randn(4, 16) * (1 + 0.05 * t) for t in range(50)]
    _commit_steps(small, inputs)
    _commit_steps(large, [x * 1000 for x in inputs])
    torch.testing.assert_close(small.input_scale(), large.input_scale())
    assert small.input_scale().item() > 1.5  # the inputs grew 3.45-fold


@pytest.mark.parametrize("k", [4.0, 0.25])
def test_derf_ema_follows_k_fold_growth(k):
    """Inputs whose RMS changes k-fold and stays: c -> (1 - lambda) + lambda k."""
    torch.manual_seed(5)
    ema = DerfEMA(16, momentum=0.95, blend=0.7)
    x = torch.randn(8, 16)
    _commit_steps(ema, [x] * 5 + [x * k] * 600)
    assert math.isclose(ema.input_scale().item(), 0.3 + 0.7 * k, rel_tol=1e-5)


def test_derf_ema_eval_mode_collects_nothing():
    ema = DerfEMA(8).eval()
    ema(torch.randn(2, 8) * 10)
    commit_running_scales(ema)
    assert ema.commits.item() == 0 and ema.input_scale().item() == 1.0


def test_derf_ema_state_round_trip():
    torch.manual_seed(6)
    ema, copy = DerfEMA(16, momentum=0.9), DerfEMA(16, momentum=0.9)
    _commit_steps(ema, [torch.randn(4, 16) * s for s in (1.0, 2.0, 3.0)])
    copy.load_state_dict(ema.state_dict())
    x = torch.randn(4, 16) * 3
    torch.testing.assert_close(copy.eval()(x), ema.eval()(x), rtol=0, atol=0)
    _commit_steps(ema, [x])
    _commit_steps(copy, [x])
    assert torch.equal(copy.running_mean_square, ema.running_mean_square)


def test_derf_ema_rescales_grown_inputs_away_from_saturation():
    """Inputs that grow from RMS 1 to RMS 20: plain Derf (alpha 0.5) saturates most features;
    derf_ema (blend 1) brings the argument back to its starting size."""
    torch.manual_seed(2)
    ema, plain = DerfEMA(64, momentum=0.0, blend=1.0), Derf(64)
    start, x = torch.randn(32, 64), torch.randn(32, 64) * 20
    _commit_steps(ema, [start, x])

    def saturated(module):
        arg = module.alpha * x / module.input_scale()
        slope = torch.exp(-arg.pow(2))  # erf'(z) / erf'(0)
        return (slope < 0.1).float().mean().item()

    assert saturated(plain) > 0.8
    assert saturated(ema) < 0.05
    assert math.isclose(ema.input_scale().item(), (x.pow(2).mean() / start.pow(2).mean()).sqrt().item(), rel_tol=1e-5)


# --------------------------------------------------------------------------- registry


def test_registry_lists_the_five_norms_by_their_own_names():
    assert NORMS.names() == ("rmsnorm", "dyt", "derf", "derf_ema", "layernorm")
    assert all(cls.name == name and norm_class(name) is cls for name, cls in NORMS.items())
    assert {name for name, cls in NORMS.items() if cls.bounded()} == {"dyt", "derf", "derf_ema"}
    assert {name: cls.fix_of for name, cls in NORMS.items() if cls.fix_of} == {"derf_ema": "derf"}
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        norm_class("batchnorm")


@pytest.mark.parametrize("name", NORMS.names())
@pytest.mark.parametrize("bias", [True, False])
def test_param_count_is_the_layers_real_parameter_count(name, bias):
    cfg = NormConfig(name, bias=bias)
    for location in ("attn", "ffn", "final"):
        layer = build_norm(cfg, 24, location)
        assert type(layer) is NORMS[name]
        assert sum(p.numel() for p in layer.parameters()) == NORMS[name].param_count(24, cfg)


def test_layers_read_their_settings_from_the_norm_config():
    cfg = NormConfig(
        "derf_ema",
        eps=1e-3,
        alpha_init_attn=0.7,
        alpha_init_ffn=0.3,
        alpha_init_final=0.2,
        shift_init=0.1,
        ema_momentum=0.9,
        ema_blend=0.25,
        bias=False,
    )
    ema = build_norm(cfg, 8, "ffn")
    assert (ema.alpha.item(), ema.shift.item(), ema.momentum, ema.blend, ema.bias) == (
        pytest.approx(0.3),
        pytest.approx(0.1),
        0.9,
        0.25,
        None,
    )
    assert build_norm(cfg, 8, "attn").alpha.item() == pytest.approx(0.7)
    assert build_norm(NormConfig("dyt", alpha_init_final=0.2), 8, "final").alpha.item() == pytest.approx(0.2)
    assert build_norm(NormConfig("rmsnorm", eps=1e-3), 8, "attn").eps == 1e-3
    assert build_norm(NormConfig("layernorm", eps=1e-3, bias=False), 8, "attn").eps == 1e-3


@pytest.mark.parametrize("name", NORMS.names())
def test_output_is_the_affine_of_the_core_the_diagnostics_read(name):
    """y = g * core(x) + b, with core = f(preactivation) for a bounded layer."""
    torch.manual_seed(7)
    layer = build_norm(NormConfig(name), 16, "attn")
    _randomise(layer)
    x = torch.randn(4, 16) * 3
    p = dict(layer.named_parameters())
    expected = layer.core(x) * p["weight"] + (p["bias"] if "bias" in p else 0)
    torch.testing.assert_close(layer(x), expected)
    z = layer.preactivation(x)
    if layer.bounded():
        f = {"tanh": torch.tanh, "erf": torch.erf}[layer.saturating_function]
        torch.testing.assert_close(layer.core(x), f(z))
    else:
        assert z is None
