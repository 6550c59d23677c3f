"""Parameter roles and optimizer groups."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from normopt.config import load_config
from normopt.models.llama import build_model
from normopt.models.norm_layer import NormConfig
from normopt.models.norms import NORMS
from normopt.models.presets import PRESETS
from normopt.optim.builder import build_optimizers
from normopt.optim.muon import Muon, NorMuon
from normopt.optim.param_groups import build_param_groups, format_group_table


def _model(norm="derf", tie=False, embed_scale=None):
    args = replace(
        PRESETS["debug"],
        vocab_size=300,
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        ffn_hidden=48,
        norm_config=NormConfig(norm),
        tie_embeddings=tie,
        embed_scale=embed_scale,
    )
    return build_model(args)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_embed_scale_goes_to_adamw_without_decay(optim):
    model = _model(embed_scale=32**0.5)
    cfg = load_config(None, [f"optim.name={optim}", "optim.weight_decay=0.1"])
    groups = {g.role: g for g in build_param_groups(model, cfg.optim)}
    embedding = groups["embedding"]
    assert sorted(embedding.names) == ["embed_scale", "tok_embeddings.weight"]
    assert embedding.optimizer == "adamw" and embedding.weight_decay == 0


@pytest.mark.parametrize("optim", ["adamw", "muon", "normuon"])
def test_groups_by_role(optim):
    model = _model()
    cfg = load_config(None, [f"optim.name={optim}", "optim.muon_lr=0.05", "optim.weight_decay=0.1"])
    groups = {g.role: g for g in build_param_groups(model, cfg.optim)}
    assert set(groups) == {"matrix", "head", "embedding", "norm"}
    assert all(p.ndim == 2 for p in groups["matrix"].params) and len(groups["matrix"].params) == 14
    assert groups["embedding"].names == ["tok_embeddings.weight"]
    assert groups["head"].names == ["output.weight"]
    assert {n.rsplit(".", 1)[-1] for n in groups["norm"].names} == {"alpha", "shift", "weight", "bias"}
    assert groups["norm"].weight_decay == 0 and groups["embedding"].weight_decay == 0
    assert groups["matrix"].optimizer == optim
    assert groups["matrix"].lr == (0.05 if optim != "adamw" else cfg.optim.lr)
    assert sum(g.numel for g in groups.values()) == sum(p.numel() for p in model.parameters())
    assert "matrix" in format_group_table(list(groups.values()))


@pytest.mark.parametrize("norm", NORMS.names())
def test_every_registered_norms_parameters_are_norm_parameters(norm):
    """Whatever the norm, every parameter of its layers lands in the no-decay norm group."""
    model = _model(norm)
    groups = {g.role: g for g in build_param_groups(model, load_config(None).optim)}
    layer_params = {
        f"{name}.{p}" for name, m in model.named_modules() if name.endswith("norm") for p, _ in m.named_parameters()
    }
    assert layer_params and set(groups["norm"].names) == layer_params
    assert groups["norm"].weight_decay == 0


def test_tied_head_is_an_embedding():
    groups = {g.role: g for g in build_param_groups(_model(tie=True), load_config(None).optim)}
    assert "head" not in groups and groups["embedding"].names == ["tok_embeddings.weight"]


def test_decay_norms_and_embeddings_switch():
    cfg = load_config(None, ["optim.decay_norms_and_embeddings=true", "optim.weight_decay=0.2"])
    groups = {g.role: g for g in build_param_groups(_model(), cfg.optim)}
    assert groups["norm"].weight_decay == 0.2 == groups["embedding"].weight_decay


def test_muon_optimizer_gets_matrices_and_per_layer_steps():
    model = _model()
    cfg = load_config(None, ["optim.name=normuon", "optim.ns_steps=5", "optim.ns_steps_per_layer=layers.0.*=8,re:w2=6"])
    opts = build_optimizers(model, cfg.optim, "cpu")
    adamw, normuon = opts.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(normuon, NorMuon)
    steps = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in normuon.param_groups:
        for p in group["params"]:
            steps[names[id(p)]] = group["ns_steps"]
    assert steps["layers.0.attn.wq.weight"] == 8 and steps["layers.0.ffn.w2.weight"] == 8
    assert steps["layers.1.ffn.w2.weight"] == 6 and steps["layers.1.attn.wq.weight"] == 5
    assert normuon.param_groups[0]["ns_dtype"] == "float32"  # auto on CPU
    opts.set_lr_factor(0.5)
    assert all(g["lr"] == 0.5 * g["peak_lr"] for o in opts.optimizers for g in o.param_groups)
    assert not isinstance(build_optimizers(model, load_config(None).optim).optimizers[-1], Muon)
