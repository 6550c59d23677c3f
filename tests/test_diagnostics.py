"""Diagnostics with known answers: norm-layer saturation and scale blindness, power
iteration, token-frequency buckets, and a run's diagnostics against its checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from normopt.diagnostics.norm_stats import (
    SATURATION_THRESHOLD,
    linearity_within_token,
    norm_layer_stats,
    saturation_share,
    scale_across_tokens,
)
from normopt.diagnostics.ns_spectrum import singular_value_quantiles
from normopt.diagnostics.spectral_norm import SpectralNormTracker, power_iteration, start_vector
from normopt.diagnostics.tail_tokens import bucket_losses, bucket_sums, frequency_buckets
from normopt.export import load_model_weights
from normopt.models.derf import Derf, DerfEMA, commit_running_scales
from normopt.models.dyt import DyT
from normopt.models.layernorm import LayerNorm
from normopt.models.norm_layer import NormConfig
from normopt.models.norms import NORMS, build_norm
from normopt.models.rmsnorm import RMSNorm
from tests.conftest import run_cli, tiny_run_args


def _tokens_with_scales(n_tokens=512, dim=256, seed=0):
    """Gaussian features, token t scaled by a log-uniform factor in [0.25, 4]."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.empty(n_tokens, 1).uniform_(math.log(0.25), math.log(4), generator=g))
    return torch.randn(n_tokens, dim, generator=g) * scales


# --------------------------------------------------------------------------- saturation


def test_saturation_thresholds_are_where_the_slope_is_a_tenth():
    t, e = SATURATION_THRESHOLD["tanh"], SATURATION_THRESHOLD["erf"]
    assert 1 - math.tanh(t) ** 2 == pytest.approx(0.1, abs=1e-12)
    assert math.exp(-e * e) == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("function", ["tanh", "erf"])
def test_saturation_of_a_planted_uniform_distribution(function):
    """z evenly spaced on [-4, 4]: the saturated share is (4 - threshold) / 4."""
    z = torch.linspace(-4, 4, 800_001)
    expected = (4 - SATURATION_THRESHOLD[function]) / 4
    assert saturation_share(z, function) == pytest.approx(expected, abs=1e-5)


def test_layer_saturation_uses_the_layers_own_preactivation():
    """Derf with alpha 2, shift 1 on x evenly spaced in [-2, 2]: z = 2x + 1 in [-3, 5];
    saturated where |z| > 1.517."""
    layer = Derf(4, alpha_init=2.0, shift_init=1.0)
    x = torch.linspace(-2, 2, 400_001).reshape(-1, 1).expand(-1, 4)
    record, _ = norm_layer_stats(layer, x)
    thr = SATURATION_THRESHOLD["erf"]
    expected = ((-thr - (-3)) + (5 - thr)) / 8
    assert record["saturation"] == pytest.approx(expected, abs=1e-4)
    assert record["alpha"] == 2.0 and record["shift"] == 1.0 and record["type"] == "derf"
    dyt, _ = norm_layer_stats(DyT(4, alpha_init=2.0), x)  # z = 2x in [-4, 4]
    assert dyt["saturation"] == pytest.approx((4 - SATURATION_THRESHOLD["tanh"]) / 4, abs=1e-4)


def test_derf_ema_divides_by_its_running_scale():
    layer = DerfEMA(4, alpha_init=1.0, momentum=0.0)
    layer.train()
    for scale in (1.0, 2.0):  # the input RMS doubles: c = 0.5 + 0.5 * 2 = 1.5
        layer(torch.full((3, 4), scale))
        commit_running_scales(layer)
    x = torch.full((3, 4), 3.0)
    record, z = norm_layer_stats(layer, x)
    assert torch.allclose(z, torch.full_like(x, 2.0)) and record["running_scale"] == pytest.approx(1.5)
    assert record["effective_alpha"] == pytest.approx(1.0 / 1.5)


# --------------------------------------------------------------------------- scale blindness


def test_scale_blindness_of_identity_rmsnorm_and_saturated_erf():
    x = _tokens_with_scales()
    # identity: every token's scale and every feature's relative size pass through
    assert scale_across_tokens(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linearity_within_token(x, x) == pytest.approx(1.0, abs=1e-9)
    # RMSNorm: the token's scale is removed, the map within a token is linear
    rms, _ = norm_layer_stats(RMSNorm(256, eps=1e-12), x)
    assert rms["scale_across_tokens"] == pytest.approx(0.0, abs=1e-6)
    assert rms["linearity_within_token"] == pytest.approx(1.0, abs=1e-9)
    assert rms["saturation"] is None and rms["alpha"] is None
    # erf saturated to a sign: scale gone, and within a token R^2 = corr(x, sign x)^2 = 2/pi
    erf, _ = norm_layer_stats(Derf(256, alpha_init=1e4), x)
    assert erf["saturation"] > 0.99
    assert erf["scale_across_tokens"] == pytest.approx(0.0, abs=1e-3)
    assert erf["linearity_within_token"] == pytest.approx(2 / math.pi, abs=0.02)
    # unsaturated Derf (small alpha) is close to linear: scale survives
    small, _ = norm_layer_stats(Derf(256, alpha_init=0.01), x)
    assert small["scale_across_tokens"] == pytest.approx(1.0, abs=1e-3)
    assert small["linearity_within_token"] == pytest.approx(1.0, abs=1e-3)


def test_layernorm_is_scale_blind_and_linear_without_saturation():
    """LayerNorm, like RMSNorm, removes each token's scale (here: the centred features'
    scale) and is affine within a token; it has no pre-activation to saturate."""
    x = _tokens_with_scales()
    ln, z = norm_layer_stats(LayerNorm(256, eps=1e-12), x)
    assert z is None and ln["type"] == "layernorm"
    assert ln["saturation"] is None and ln["alpha"] is None and ln["shift"] is None
    assert ln["scale_across_tokens"] == pytest.approx(0.0, abs=1e-2)
    assert ln["linearity_within_token"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", NORMS.names())
def test_every_registered_norm_has_a_record_under_its_name(name):
    record, z = norm_layer_stats(build_norm(NormConfig(name), 16, "attn"), torch.randn(8, 16))
    assert record["type"] == name
    assert (z is None) == (record["saturation"] is None)
    assert 0.0 <= record["linearity_within_token"] <= 1.0 + 1e-9


def test_scale_across_tokens_is_undefined_without_scale_variation():
    x = torch.randn(64, 32)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # every token has rms 1
    assert math.isnan(scale_across_tokens(x, x))


# --------------------------------------------------------------------------- power iteration


def test_power_iteration_matches_svd():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 64, generator=g)
    sigma, v = power_iteration(W, start_vector(64, 0, W.device), 300)
    assert sigma == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-5)
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert power_iteration(torch.zeros(5, 3), start_vector(3, 0, W.device), 5)[0] == 0.0


def test_warm_start_converges_across_calls_and_tracks_a_moving_matrix():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(80, 40, generator=g))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    s = torch.linspace(3.0, 0.1, 40)
    s[1] = 2.7  # sigma_2 / sigma_1 = 0.9: slow for a cold start
    W = U @ torch.diag(s) @ V.T
    tracker = SpectralNormTracker(iterations=2, cold_iterations=2, max_iterations=2)
    estimates = [tracker([("w", W)])["w"] for _ in range(60)]
    assert estimates[0] < 3.0 and estimates[-1] == pytest.approx(3.0, rel=1e-4)
    assert all(b >= a - 1e-5 for a, b in zip(estimates, estimates[1:]))  # monotone: Rayleigh quotient
    tracked = tracker([("w", 1.1 * W)])["w"]  # the weight grew: the warm vector still fits
    assert tracked == pytest.approx(3.3, rel=1e-4)


# --------------------------------------------------------------------------- tail tokens


def test_frequency_buckets_on_a_toy_corpus():
    # token:        0   1   2   3  4  5  6
    counts = np.array([10, 50, 20, 10, 5, 5, 0])  # total 100
    # most frequent first: 1 (share before 0.0), 2 (0.5), 0 (0.7), 3 (0.8), 4 (0.9), 5 (0.95), 6 (unseen)
    buckets = frequency_buckets(counts, 4)
    assert buckets.tolist() == [2, 0, 2, 3, 3, 3, 3]
    assert frequency_buckets(counts, 1).tolist() == [0] * 7


def test_bucket_losses_are_weighted_means():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    ids = torch.tensor([[0, 1, 1], [2, 0, 0]])
    sums = bucket_sums(loss, ids, torch.tensor([1.0, 0.0]), 4)  # the second window is padding
    means, shares = bucket_losses(sums)
    assert means == [1.0, 2.5, None, None]
    assert shares == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])


# --------------------------------------------------------------------------- a real run


def _diagnostics(run_dir):
    return [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]


def test_run_diagnostics_match_its_checkpoint_and_leave_training_unchanged(tmp_path, tiny_corpus):
    """Derf + Muon (no Nesterov, so NS receives exactly the momentum saved in the
    checkpoint): the step-6 diagnostics equal the same quantities recomputed from the
    step-6 checkpoint; the losses equal those of a run without diagnostics."""
    common = [
        "model.norm=derf",
        "optim.name=muon",
        "optim.nesterov=false",
        "optim.lr=0.02",
        "train.dtype=float32",
        "diagnostics.interval=3",
        "checkpoint.interval=3",
    ]
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_run_args(run_dir, tiny_corpus, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _diagnostics(run_dir)
    kinds = {(r["step"], r["kind"]) for r in records}
    for step in (0, 3, 6):
        assert {(step, "norm"), (step, "spectral_norm"), (step, "tail_tokens")} <= kinds
    assert {(3, "ns_spectrum"), (6, "ns_spectrum")} <= kinds
    run = next(r for r in records if r["kind"] == "run")
    assert run["n_layers"] == 2 and run["norm"] == "derf" and run["optim"] == "muon"

    checkpoint = run_dir / "checkpoints" / "step_00000006"
    weights = load_model_weights(checkpoint)
    spectral = next(r for r in records if r["kind"] == "spectral_norm" and r["step"] == 6)["matrices"]
    assert set(spectral) == {n for n, t in weights.items() if t.ndim == 2}
    for name, sigma in spectral.items():
        exact = float(torch.linalg.svdvals(weights[name].double())[0])
        assert sigma <= exact * (1 + 1e-5) and sigma >= 0.97 * exact, name  # a Rayleigh quotient

    norm = next(r for r in records if r["kind"] == "norm" and r["step"] == 6)["layers"]
    assert set(norm) == {"layers.0.attn_norm", "layers.0.ffn_norm", "layers.1.attn_norm", "layers.1.ffn_norm", "norm"}
    for name, stats in norm.items():
        assert stats["alpha"] == pytest.approx(float(weights[f"{name}.alpha"]), abs=1e-6)
        assert stats["shift"] == pytest.approx(float(weights[f"{name}.shift"]), abs=1e-6)
        assert 0.0 <= stats["saturation"] <= 1.0

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    ns = next(r for r in records if r["kind"] == "ns_spectrum" and r["step"] == 6)
    names = [f"optim.state.{n}.momentum_buffer" for n in ns["matrices"]]
    momenta = _load_state_dict_from_keys(set(names), checkpoint_id=str(checkpoint))
    for name, logged in ns["matrices"].items():
        buf = momenta["optim"]["state"][name]["momentum_buffer"]
        expected = singular_value_quantiles(buf.float(), ns["levels"])
        assert logged["sv_rel_fro"] == pytest.approx(expected["sv_rel_fro"], rel=1e-4, abs=1e-7), name
        assert logged["sv_rel_max"] == pytest.approx(expected["sv_rel_max"], rel=1e-4, abs=1e-7), name

    quiet = tmp_path / "quiet"
    proc = run_cli(tiny_run_args(quiet, tiny_corpus, *common, "diagnostics.interval=0", "diagnostics.tail_buckets=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["kind"] for r in _diagnostics(quiet)] == ["run"]

    def losses(d):
        return [
            (r["step"], r.get("loss"), r.get("eval_loss"))
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        ]

    assert losses(quiet) == losses(run_dir)


def test_moe_experts_are_in_the_spectral_norms_and_the_ns_spectrum():
    """An expert stack (E, rows, cols) is E matrices <stack>.<e> in both records, each expert's
    spectral norm its own (checked against svdvals), the NS spectrum per expert."""
    from types import SimpleNamespace

    from normopt.config import Config
    from normopt.diagnostics.collector import Diagnostics
    from normopt.diagnostics.config import DiagnosticsConfig
    from normopt.models.llama import build_model
    from normopt.models.presets import resolve_model_args
    from normopt.optim.builder import build_optimizers

    cfg = Config()
    cfg.model.preset, cfg.model.n_layers, cfg.optim.name = "debug-moe", 1, "muon"
    torch.manual_seed(0)
    model = build_model(resolve_model_args(cfg.model, vocab_size=64))
    optimizers = build_optimizers(model, cfg.optim)
    tokens = torch.randint(0, 64, (2, 8))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    optimizers.step()
    diag = Diagnostics(DiagnosticsConfig(), model, optimizers, tokens, SimpleNamespace(write=lambda r: None), 0, 1)
    stacks = {n: p for n, p in model.named_parameters() if p.ndim == 3}
    assert stacks, "the debug-moe preset has expert stacks"
    spectral = diag.collectors["spectral_norm"].collect(1)
    ns = diag.collectors["ns_spectrum"].collect(1)
    for name, stack in stacks.items():
        for e in range(stack.shape[0]):
            exact = float(torch.linalg.svdvals(stack[e].detach().double())[0])
            assert 0.97 * exact <= spectral["matrices"][f"{name}.{e}"] <= exact * (1 + 1e-5)
            assert f"{name}.{e}" in ns["matrices"]
        assert name not in spectral["matrices"] and name not in ns["matrices"]
    assert spectral["experts"] == ns["experts"] == "per expert (<stack>.<e>)"
