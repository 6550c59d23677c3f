"""Model shapes, parameter counts per preset, initialisation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from normopt.models.llama import build_model
from normopt.models.norm_layer import NormConfig
from normopt.models.norms import NORMS
from normopt.models.presets import PRESETS, count_parameters

BOUNDED = [name for name, cls in NORMS.items() if cls.bounded()]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("norm", NORMS.names())
def test_parameter_count_matches_analytic_formula(preset, norm):
    for bias, scale in ((True, None), (False, 3.0)):
        args = replace(PRESETS[preset], vocab_size=32768, norm_config=NormConfig(norm, bias=bias), embed_scale=scale)
        model = build_model(args, "meta")  # no memory: even 2.8B builds instantly
        assert sum(p.numel() for p in model.parameters()) == count_parameters(args)


def _resolved(*overrides, vocab_size=8192):
    from normopt.config import load_config
    from normopt.models.presets import resolve_model_args

    return resolve_model_args(load_config(None, list(overrides)).model, vocab_size=vocab_size)


def test_auto_settings_follow_the_reference_models():
    """DyT: LLaMA code (no bias, alpha 0.8/0.2/0.2); Derf: GPT-2 code (bias) at alpha 0.5;
    bounded norms scale the embedding by sqrt(dim), RMSNorm and LayerNorm do not; LayerNorm
    keeps its bias."""
    dyt, derf, ema, rms, ln = (
        _resolved(f"model.norm={n}") for n in ("dyt", "derf", "derf_ema", "rmsnorm", "layernorm")
    )
    d, e = dyt.norm_config, derf.norm_config
    assert (d.bias, d.alpha_init_attn, d.alpha_init_ffn, d.alpha_init_final) == (False, 0.8, 0.2, 0.2)
    assert (e.bias, e.alpha_init_attn, e.alpha_init_ffn) == (True, 0.5, 0.5)
    assert ema.norm_config.bias and ema.embed_scale == derf.embed_scale == dyt.embed_scale == math.sqrt(192)
    assert rms.embed_scale is None and not rms.norm_config.bias
    assert ln.embed_scale is None and ln.norm_config.bias
    assert _resolved("model.norm=derf", "model.embed_scale=none").embed_scale is None
    assert _resolved("model.norm=rmsnorm", "model.embed_scale=2.5").embed_scale == 2.5
    # sqrt_dim: the bounded norms' embedding scale on any norm (RMSNorm with it, to separate the two)
    assert _resolved("model.norm=rmsnorm", "model.embed_scale=sqrt_dim").embed_scale == math.sqrt(192)
    assert _resolved("model.norm=rmsnorm", "model.dim=256", "model.embed_scale=sqrt_dim").embed_scale == 16.0
    assert _resolved("model.norm=dyt", "model.dim=256").embed_scale == 16.0


@pytest.mark.parametrize("norm", BOUNDED)
def test_embed_scale_sets_the_first_norms_input_rms(norm):
    """At init the first norm sees RMS ~ sqrt(dim) * init_std, not init_std."""
    torch.manual_seed(0)
    args = _resolved(f"model.norm={norm}")
    model = build_model(args)
    seen = {}
    model.layers[0].attn_norm.register_forward_hook(lambda m, a, out: seen.setdefault("x", a[0]))
    model(torch.randint(0, args.vocab_size, (4, 64)))
    rms = seen["x"].pow(2).mean().sqrt().item()
    assert rms == pytest.approx(math.sqrt(args.dim) * args.init_std, rel=0.05)
    assert isinstance(model.embed_scale, torch.nn.Parameter) and model.embed_scale.shape == (1,)


def test_embed_scale_none_is_the_unscaled_model_bit_for_bit():
    """embed_scale=none: no extra parameter, the same initial weights (the RNG stream is
    untouched) and the same outputs as the scaled model with its scale set to 1."""
    explicit = (
        "model.norm=derf",
        "model.norm_bias=true",
        "model.alpha_init_attn=0.5",
        "model.alpha_init_ffn=0.5",
        "model.alpha_init_final=0.5",
    )
    torch.manual_seed(0)
    plain = build_model(_resolved(*explicit, "model.embed_scale=none"))
    torch.manual_seed(0)
    unit = build_model(_resolved(*explicit, "model.embed_scale=1"))
    assert plain.embed_scale is None and "embed_scale" not in plain.state_dict()
    plain_state = plain.state_dict()
    assert {k: v for k, v in unit.state_dict().items() if k != "embed_scale"}.keys() == plain_state.keys()
    for key, value in unit.state_dict().items():
        if key != "embed_scale":
            assert torch.equal(value, plain_state[key]), key
    tokens = torch.randint(0, 8192, (2, 32))
    assert torch.equal(plain(tokens), unit(tokens))


def test_preset_names_match_their_size():
    """Each ladder preset's name ends in its (total) parameter count at a 32768 vocab,
    within 6%."""
    for name, args in PRESETS.items():
        if name.startswith("debug"):
            continue
        size = name.rsplit("-", 1)[-1]
        scale = 1e9 if size.endswith("b") else 1e6
        nominal = float(size[:-1]) * scale
        assert abs(count_parameters(args) / nominal - 1) < 0.06, name


def test_1b_preset_is_llama_3_2_1b_shaped():
    a = PRESETS["1b"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden, a.tie_embeddings) == (2048, 16, 32, 8, 8192, True)


def test_debug_preset_has_a_few_million_parameters():
    assert 2e6 < count_parameters(replace(PRESETS["debug"], vocab_size=8192)) < 10e6


@pytest.mark.parametrize("tie", [False, True])
def test_forward_shapes_and_tying(tie):
    args = replace(
        PRESETS["debug"], vocab_size=500, dim=64, n_heads=4, n_kv_heads=2, n_layers=2, ffn_hidden=96, tie_embeddings=tie
    )
    model = build_model(args)
    logits = model(torch.randint(0, 500, (3, 17)))
    assert logits.shape == (3, 17, 500)
    assert (model.output.weight is model.tok_embeddings.weight) == tie


def test_depth_scaled_init_of_output_projections():
    torch.manual_seed(0)
    args = replace(PRESETS["124m"], vocab_size=1000, n_layers=8)
    model = build_model(args)
    std = args.init_std
    wq, wo, w2 = model.layers[0].attn.wq.weight, model.layers[0].attn.wo.weight, model.layers[0].ffn.w2.weight
    assert wq.std().item() == pytest.approx(std, rel=0.02)
    assert wo.std().item() == pytest.approx(std / math.sqrt(2 * 8), rel=0.02)
    assert w2.std().item() == pytest.approx(std / math.sqrt(2 * 8), rel=0.02)


def test_attention_is_causal():
    torch.manual_seed(0)
    args = replace(PRESETS["debug"], vocab_size=100, dim=32, n_heads=4, n_kv_heads=2, n_layers=2, ffn_hidden=64)
    model = build_model(args).eval()
    tokens = torch.randint(0, 100, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    torch.testing.assert_close(model(tokens)[0, :8], model(changed)[0, :8])
    assert not torch.allclose(model(tokens)[0, 8:], model(changed)[0, 8:])


def test_config_overrides_reach_the_model_args():
    from normopt.config import load_config
    from normopt.models.presets import resolve_model_args

    cfg = load_config(None, ["model.norm=dyt", "model.alpha_init_ffn=0.2", "model.dim=256"])
    args = resolve_model_args(cfg.model, vocab_size=1000)
    assert (args.vocab_size, args.norm, args.norm_config.alpha_init_ffn, args.dim) == (1000, "dyt", 0.2, 256)
    assert args.head_dim == PRESETS["debug"].head_dim  # width override keeps the head size
    args = resolve_model_args(load_config(None, ["model.n_heads=3"]).model, vocab_size=1000)
    assert args.n_kv_heads == 3  # the preset's 2 KV heads cannot group 3 heads


@pytest.mark.parametrize("norm", NORMS.names())
def test_a_model_builds_and_runs_for_every_registered_norm(norm):
    """The config's name reaches every norm location as the registered class, with the
    resolved settings, and the model trains (finite loss, gradients on the norms)."""
    torch.manual_seed(0)
    args = _resolved(f"model.norm={norm}", "model.dim=32", "model.n_heads=4", "model.n_layers=2", vocab_size=100)
    model = build_model(args)
    layers = [model.norm] + [m for block in model.layers for m in (block.attn_norm, block.ffn_norm)]
    assert all(type(m) is NORMS[norm] for m in layers)
    tokens = torch.randint(0, 100, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for m in layers for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)


def test_norm_bias_only_where_the_layer_can_have_one():
    from normopt.config import load_config
    from normopt.errors import UserError

    with pytest.raises(UserError, match="model.norm_bias: rmsnorm has no bias"):
        load_config(None, ["model.norm=rmsnorm", "model.norm_bias=true"])
    plain = build_model(_resolved("model.norm=layernorm", "model.norm_bias=false"))
    assert plain.norm.bias is None and [n for n, _ in plain.norm.named_parameters()] == ["weight"]
