"""optim.muon_params: which block matrices the Muon-family optimizer takes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from normopt.config import load_config
from normopt.errors import UserError
from normopt.models.llama import build_model
from normopt.models.matrix_roles import COMPONENTS, MUON_SETS, component, matrix_type, parse_muon_params
from normopt.models.norm_layer import NormConfig
from normopt.models.presets import PRESETS
from normopt.optim.builder import build_optimizers
from normopt.optim.param_groups import build_param_groups, format_group_table

# per named set, the matrix types (of normopt's Llama block) that Muon must take
GQA_DENSE = {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3"}
EXPECTED = {
    "all": GQA_DENSE,
    "none": set(),
    "qk": {"attn.wq", "attn.wk"},
    "vo": {"attn.wv", "attn.wo"},
    "ffn": {"ffn.w1", "ffn.w2", "ffn.w3"},
    "vo_ffn": {"attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3"},
    "attn": {"attn.wq", "attn.wk", "attn.wv", "attn.wo"},
}


def _model(preset="debug", **shape):
    shape = shape or dict(dim=32, n_heads=4, n_kv_heads=2, n_layers=3, ffn_hidden=48)
    args = replace(PRESETS[preset], vocab_size=300, norm_config=NormConfig("rmsnorm"), **shape)
    with torch.device("meta" if preset != "debug" else "cpu"):
        return build_model(args)


def _groups(model, *overrides):
    return {g.role: g for g in build_param_groups(model, load_config(None, list(overrides)).optim)}


def test_every_named_set_is_tested():
    assert set(EXPECTED) == set(MUON_SETS)


@pytest.mark.parametrize("preset", ["debug", "124m", "1b"])
@pytest.mark.parametrize("subset", sorted(MUON_SETS))
def test_named_sets_pick_matrices_by_role(preset, subset):
    model = _model(preset) if preset == "debug" else _model(preset, n_layers=2)
    groups = _groups(model, "optim.name=muon", f"optim.muon_params={subset}")
    on_muon = groups["matrix"].names if "matrix" in groups else []
    on_adamw = groups["matrix_adamw"].names if "matrix_adamw" in groups else []
    assert {matrix_type(n) for n in on_muon} == EXPECTED[subset]
    assert {matrix_type(n) for n in on_adamw} == GQA_DENSE - EXPECTED[subset]
    assert all(component(n) is not None for n in on_muon + on_adamw)
    n_layers = model.args.n_layers
    assert len(on_muon) == n_layers * len(EXPECTED[subset])
    if on_adamw:
        g = groups["matrix_adamw"]
        cfg = load_config(None).optim
        assert (g.optimizer, g.lr, g.weight_decay) == ("adamw", cfg.lr, cfg.weight_decay)
    # embeddings, head (untied) and norms never move
    assert "tok_embeddings.weight" in groups["embedding"].names
    assert groups["head"].names == ["output.weight"] if not model.args.tie_embeddings else "head" not in groups


LATENT_EXPERTS = {
    "attn.wq_a",
    "attn.wq_b",
    "attn.wkv_a",
    "attn.wkv_b",
    "attn.wo",
    "ffn.experts.w1",
    "ffn.experts.w2",
    "ffn.experts.w3",
    "ffn.shared.w1",
    "ffn.shared.w2",
    "ffn.shared.w3",
}
EXPECTED_LATENT = {
    "all": LATENT_EXPERTS,
    "none": set(),
    "qk": {"attn.wq_a", "attn.wq_b"},
    "vo": {"attn.wo"},
    "ffn": {t for t in LATENT_EXPERTS if t.startswith("ffn.")},
    "vo_ffn": {"attn.wo"} | {t for t in LATENT_EXPERTS if t.startswith("ffn.")},
    "attn": {t for t in LATENT_EXPERTS if t.startswith("attn.")},
}


@pytest.mark.parametrize("subset", sorted(MUON_SETS))
def test_named_sets_on_latent_attention_and_experts(subset):
    """MLA's joint key-value matrices are the component kv: only attn and all take them;
    routed and shared experts are ffn; the router is never a block matrix."""
    assert set(EXPECTED_LATENT) == set(MUON_SETS) and LATENT_EXPERTS <= set(COMPONENTS)
    args = replace(PRESETS["debug-mla-moe"], vocab_size=300, n_layers=2, n_shared_experts=1)
    groups = _groups(build_model(args, "meta"), "optim.name=normuon", f"optim.muon_params={subset}")
    on_muon = groups["matrix"].names if "matrix" in groups else []
    on_adamw = groups["matrix_adamw"].names if "matrix_adamw" in groups else []
    assert {matrix_type(n) for n in on_muon} == EXPECTED_LATENT[subset]
    assert {matrix_type(n) for n in on_adamw} == LATENT_EXPERTS - EXPECTED_LATENT[subset]
    assert groups["router"].names == ["layers.0.ffn.router.gate.weight", "layers.1.ffn.router.gate.weight"]


@pytest.mark.parametrize("optim", ["muon", "normuon", "adamw"])
def test_all_is_todays_grouping(optim):
    model = _model()
    default = build_param_groups(model, load_config(None, [f"optim.name={optim}"]).optim)
    explicit = build_param_groups(model, load_config(None, [f"optim.name={optim}", "optim.muon_params=all"]).optim)
    assert [(g.role, g.optimizer, g.lr, g.weight_decay, g.names) for g in default] == [
        (g.role, g.optimizer, g.lr, g.weight_decay, g.names) for g in explicit
    ]
    assert [g.role for g in default] == ["matrix", "head", "embedding", "norm"]


def test_adamw_ignores_the_assignment():
    groups = _groups(_model(), "optim.name=adamw", "optim.muon_params=qk")
    assert "matrix_adamw" not in groups and groups["matrix"].optimizer == "adamw"


def test_group_table_shows_the_split():
    groups = build_param_groups(_model(), load_config(None, ["optim.name=muon", "optim.muon_params=vo"]).optim)
    table = format_group_table(groups).splitlines()
    matrix = next(line for line in table if line.startswith("matrix "))
    adamw = next(line for line in table if line.startswith("matrix_adamw"))
    assert matrix.split()[1:3] == ["muon", "6"] and adamw.split()[1:3] == ["adamw", "15"]


def test_globs_and_their_errors():
    model = _model()
    groups = _groups(model, "optim.name=muon", "optim.muon_params=layers.0.*,layers.*.attn.wv.weight")
    assert sorted(groups["matrix"].names) == sorted(
        [f"layers.0.{m}.weight" for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")]
        + ["layers.1.attn.wv.weight", "layers.2.attn.wv.weight"]
    )
    cfg = load_config(None, ["optim.name=muon"]).optim
    cfg.muon_params = ["layers.2.ffn.*"]  # a YAML list
    assert {n for n in next(g for g in build_param_groups(model, cfg) if g.role == "matrix").names} == {
        "layers.2.ffn.w1.weight",
        "layers.2.ffn.w2.weight",
        "layers.2.ffn.w3.weight",
    }
    with pytest.raises(UserError, match="match no block matrix .*layers.0.attn.wq.weight"):
        _groups(model, "optim.name=muon", "optim.muon_params=blocks.*.wq")
    with pytest.raises(UserError, match="unknown set 'vo_fnn'"):
        load_config(None, ["optim.muon_params=vo_fnn"])
    assert parse_muon_params(["a.*", " b.* "]) == ("a.*", "b.*")


def test_config_accepts_a_yaml_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: muon\n  muon_params: [layers.*.attn.wv.weight, layers.*.attn.wo.weight]\n")
    assert load_config(path).optim.muon_params == ["layers.*.attn.wv.weight", "layers.*.attn.wo.weight"]
    path.write_text("optim:\n  muon_params: []\n")
    with pytest.raises(UserError, match="muon_params"):
        load_config(path)


def _train(overrides, steps=3):
    torch.manual_seed(0)
    model = _model()
    optimizers = build_optimizers(model, load_config(None, overrides).optim)
    data = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        optimizers.step()
        optimizers.zero_grad()
    return model


def test_muon_on_no_matrix_is_adamw_bit_for_bit():
    adamw = _train(["optim.name=adamw"])
    none = _train(["optim.name=muon", "optim.muon_params=none"])
    for (name, a), (_, b) in zip(adamw.named_parameters(), none.named_parameters()):
        assert torch.equal(a, b), name
    vo = _train(["optim.name=muon", "optim.muon_params=vo"])  # and a real split does differ
    assert not torch.equal(vo.layers[0].attn.wv.weight, adamw.layers[0].attn.wv.weight)
