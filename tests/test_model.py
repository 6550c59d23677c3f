"""Model shapes, parameter counts per preset, initialisation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from normopt.models.llama import build_model
from normopt.models.presets import PRESETS, count_parameters


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("norm", ["rmsnorm", "dyt", "derf", "derf_ema"])
def test_parameter_count_matches_analytic_formula(preset, norm):
    args = replace(PRESETS[preset], vocab_size=32768, norm=norm)
    model = build_model(args, "meta")  # no memory: even 2.8B builds instantly
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)


def test_preset_names_match_their_size():
    """Each ladder preset's name is its parameter count at a 32768 vocab, within 6%."""
    for name, args in PRESETS.items():
        if name == "debug":
            continue
        scale = 1e9 if name.endswith("b") else 1e6
        nominal = float(name[:-1]) * scale
        assert abs(count_parameters(args) / nominal - 1) < 0.06, name


def test_1b_preset_is_llama_3_2_1b_shaped():
    a = PRESETS["1b"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden, a.tie_embeddings) == \
        (2048, 16, 32, 8, 8192, True)


def test_debug_preset_has_a_few_million_parameters():
    assert 2e6 < count_parameters(replace(PRESETS["debug"], vocab_size=8192)) < 10e6


@pytest.mark.parametrize("tie", [False, True])
def test_forward_shapes_and_tying(tie):
    args = replace(PRESETS["debug"], vocab_size=500, dim=64, n_heads=4, n_kv_heads=2, n_layers=2,
                   ffn_hidden=96, tie_embeddings=tie)
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
    assert (args.vocab_size, args.norm, args.alpha_init_ffn, args.dim) == (1000, "dyt", 0.2, 256)
    assert args.head_dim == PRESETS["debug"].head_dim  # width override keeps the head size
    args = resolve_model_args(load_config(None, ["model.n_heads=3"]).model, vocab_size=1000)
    assert args.n_kv_heads == 3  # the preset's 2 KV heads cannot group 3 heads
