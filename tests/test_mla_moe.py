"""Latent attention and mixture-of-experts layers against direct computations from their
formulas, their routing and balance loss, the analytic parameter and FLOP counts, and
Muon/NorMuon on 3-D expert stacks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from normopt.config import load_config
from normopt.models.llama import build_model
from normopt.models.moe import balance_loss, commit_expert_loads, router_scores, top_k_routing
from normopt.models.presets import (
    PRESETS,
    count_active_parameters,
    count_flops_per_token,
    count_parameters,
    resolve_model_args,
)
from normopt.optim.builder import build_optimizers
from normopt.optim.muon import Muon, NorMuon
from normopt.optim.muon_update import normuon_normalize
from normopt.optim.newton_schulz import newton_schulz
from normopt.optim.param_groups import build_param_groups

NEW_PRESETS = ("debug-mla", "debug-moe", "debug-mla-moe", "mla-moe-1b")


def _args(*overrides, vocab=97):
    return resolve_model_args(load_config(None, list(overrides)).model, vocab)


def _model(*overrides, seed=0):
    torch.manual_seed(seed)
    return build_model(_args(*overrides))


def _rope(x, theta=10000.0):
    """Rotate-half RoPE of x (..., seq, d), written out from its definition."""
    seq, d = x.shape[-2], x.shape[-1]
    out = torch.empty_like(x)
    for t in range(seq):
        for i in range(d // 2):
            angle = t * theta ** (-2 * i / d)
            a, b = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_mla_equals_a_direct_computation_from_its_formulas():
    model = _model("model.preset=debug-mla", "model.norm=derf")
    attn = model.layers[0].attn
    x = torch.randn(2, 7, 192, generator=torch.Generator().manual_seed(1))
    cos, sin = model.rope(7, x.device)
    with torch.no_grad():
        got = attn(x, cos, sin)
        h, dn, dr, dv = attn.n_heads, attn.d_nope, attn.d_rope, attn.d_v
        q = attn.q_norm(x @ attn.wq_a.weight.T) @ attn.wq_b.weight.T
        latent = x @ attn.wkv_a.weight.T
        c_kv, k_rope = latent[..., : attn.kv_lora_rank], latent[..., attn.kv_lora_rank :]
        kv = attn.kv_norm(c_kv) @ attn.wkv_b.weight.T
        k_rope = _rope(k_rope)  # one RoPE key shared by every head
        heads = []
        for i in range(h):
            qi = q[..., i * (dn + dr) : (i + 1) * (dn + dr)]
            qi = torch.cat([qi[..., :dn], _rope(qi[..., dn:])], dim=-1)
            ki = torch.cat([kv[..., i * (dn + dv) : i * (dn + dv) + dn], k_rope], dim=-1)
            vi = kv[..., i * (dn + dv) + dn : (i + 1) * (dn + dv)]
            scores = qi @ ki.transpose(-1, -2) / math.sqrt(dn + dr)
            scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ vi)
        want = torch.cat(heads, dim=-1) @ attn.wo.weight.T
    assert (dn, dr, dv, attn.kv_lora_rank, attn.q_lora_rank) == (32, 16, 32, 128, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_moe_equals_a_per_token_loop_over_the_chosen_experts(score):
    model = _model("model.preset=debug-moe", "model.n_shared_experts=1", f"model.moe_score={score}")
    ffn = model.layers[1].ffn
    x = torch.randn(3, 5, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, _ = ffn(x)
        ex = ffn.experts
        want = torch.zeros_like(x)
        for b in range(3):
            for t in range(5):
                s = router_scores(x[b, t] @ ffn.router.gate.weight.T, score)
                chosen = sorted(range(8), key=lambda e: -float(s[e]))[:2]
                total = sum(float(s[e]) for e in chosen)
                for e in chosen:
                    y = (F.silu(ex.w1[e] @ x[b, t]) * (ex.w3[e] @ x[b, t])) @ ex.w2[e].T
                    want[b, t] += float(s[e]) / total * y
                want[b, t] += ffn.shared(x[b, t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_routing_takes_the_top_k_and_the_bias_only_changes_the_choice():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.05, 0.05], [0.4, 0.1, 0.1, 0.2, 0.2]])
    idx, weights = top_k_routing(scores, None, 2)
    assert idx.tolist() == [[1, 2], [0, 3]]
    torch.testing.assert_close(weights, torch.tensor([[0.625, 0.375], [2 / 3, 1 / 3]]))
    bias = torch.tensor([0.0, 0.0, 0.0, 0.6, 0.0])  # lifts expert 3 above everything
    idx, weights = top_k_routing(scores, bias, 2)
    assert idx.tolist() == [[3, 1], [3, 0]]
    # weights from the scores, not the biased scores
    torch.testing.assert_close(weights, torch.tensor([[0.05 / 0.55, 0.5 / 0.55], [1 / 3, 2 / 3]]))


def test_balance_loss_equals_its_formula_on_a_known_case():
    # one sequence of 2 tokens, 2 experts, top-1: both tokens go to expert 0
    scores = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    idx = torch.tensor([[[0], [0]]])
    # f = E / (k T) * counts = [2, 0]; P = mean of normalised scores = [0.625, 0.375]
    assert balance_loss(scores, idx, 2).item() == pytest.approx(2 * 0.625)
    # per sequence, then the mean: a second, perfectly balanced sequence averages in 1.0
    scores2 = torch.cat([scores, torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])])
    idx2 = torch.cat([idx, torch.tensor([[[0], [1]]])])
    assert balance_loss(scores2, idx2, 2).item() == pytest.approx((1.25 + 1.0) / 2)
    # sigmoid scores are normalised per token before averaging
    assert balance_loss(torch.tensor([[[0.9, 0.3]]]), torch.tensor([[[1]]]), 2).item() == pytest.approx(2 * 0.25)


def test_aux_free_bias_steps_against_the_load_and_aux_loss_reaches_the_gradient():
    model = _model("model.preset=debug-moe", "model.moe_balance=aux_free", "model.moe_bias_rate=0.01")
    model.train()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    _, aux = model(tokens, with_aux=True)
    assert aux.item() == 0.0  # aux_free: no balance loss
    counts = commit_expert_loads(model, 0.01)
    assert counts.shape == (4, 8) and counts.sum(dim=1).tolist() == [2 * 16 * 2] * 4
    for router, layer in zip([b.ffn.router for b in model.layers], counts):
        want = 0.01 * torch.sign(layer.mean() - layer)
        assert torch.equal(router.expert_bias, want) and router.load_counts.sum() == 0
    lossy = _model("model.preset=debug-moe", "model.moe_aux_coef=0.5")
    lossy.train()
    _, aux = lossy(tokens, with_aux=True)
    assert aux.item() >= 4 * 0.5 - 1e-6  # each layer's loss is at least coef (even routing)
    aux.backward()
    assert lossy.layers[0].ffn.router.gate.weight.grad.abs().sum() > 0
    lossy.eval()  # evaluation neither counts loads nor computes a balance loss
    counted = lossy.layers[0].ffn.router.load_counts.clone()
    assert lossy(tokens, with_aux=True)[1].item() == 0.0
    assert torch.equal(lossy.layers[0].ffn.router.load_counts, counted)


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_analytic_parameter_counts_equal_the_built_model(preset):
    for extra in ([], ["model.n_shared_experts=2", "model.norm=derf", "model.q_lora_rank=0"]):
        args = _args(f"model.preset={preset}", *extra, vocab=1000)
        if preset == "mla-moe-1b":
            args = replace(args, n_layers=1)  # the shape of one block, built quickly
        model = build_model(args, "meta")
        total = sum(p.numel() for p in model.parameters())
        assert count_parameters(args) == total
        if args.ffn == "moe":
            expert = 3 * args.dim * args.moe_hidden
            assert count_active_parameters(args) == total - args.n_layers * (args.n_experts - args.moe_top_k) * expert
        else:
            assert count_active_parameters(args) == total


def test_preset_sizes():
    big = PRESETS["mla-moe-1b"]
    assert 0.9e9 < count_parameters(big) < 1.1e9 and 0.2e9 < count_active_parameters(big) < 0.35e9
    assert count_active_parameters(PRESETS["debug-moe"]) == count_parameters(PRESETS["debug"]) + 4 * 8 * 192


@pytest.mark.parametrize("preset", ["debug-mla", "debug-mla-moe", "debug-moe"])
def test_flops_per_token_equal_three_times_the_counted_forward(preset):
    """Training FLOPs = 3 x forward; the forward's matmul and attention FLOPs counted by
    torch on the built model (every routed token costs exactly k experts: none dropped).
    torch's counter does not see the GQA layer's SDPA call (with ``enable_gqa``), so for
    GQA its score and value products, 12 d T per token and layer, are added here."""
    args = _args(f"model.preset={preset}", "model.n_shared_experts=1", "model.tie_embeddings=true", vocab=300)
    model = build_model(args)
    seq = 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 300, (2, seq)))
    unseen = 0 if args.attention == "mla" else 12 * args.dim * seq * args.n_layers * 2 * seq
    assert 3 * counter.get_total_flops() + unseen == pytest.approx(count_flops_per_token(args, seq) * 2 * seq, rel=1e-9)


def test_router_goes_to_adamw_and_expert_stacks_to_muon():
    model = _model("model.preset=debug-mla-moe", "model.n_shared_experts=1")
    cfg = load_config(None, ["optim.name=muon"]).optim
    groups = {g.role: g for g in build_param_groups(model, cfg)}
    assert groups["router"].optimizer == "adamw" and all("router" in n for n in groups["router"].names)
    assert (
        "layers.0.ffn.experts.w1" in groups["matrix"].names and "layers.0.attn.wkv_b.weight" in groups["matrix"].names
    )
    vo_ffn = {
        g.role: g
        for g in build_param_groups(model, load_config(None, ["optim.name=muon", "optim.muon_params=vo_ffn"]).optim)
    }
    assert "layers.0.attn.wkv_a.weight" in vo_ffn["matrix_adamw"].names  # kv is neither v nor k
    assert "layers.0.ffn.shared.w2.weight" in vo_ffn["matrix"].names
    named = {
        g.role: g
        for g in build_param_groups(
            model,
            load_config(
                None, ["optim.name=muon", "optim.muon_params=layers.*.ffn.router.gate.weight,layers.*.ffn.experts.*"]
            ).optim,
        )
    }
    assert "layers.1.ffn.router.gate.weight" in named["matrix"].names and "router" not in named
    assert all(isinstance(o, (Muon, torch.optim.AdamW)) for o in build_optimizers(model, cfg).optimizers)


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_muon_on_a_stack_equals_muon_on_each_matrix(cls):
    """A (E, rows, cols) stack is E independent matrices: the batched step matches stepping
    each expert as its own 2-D parameter (NS batched vs one at a time: float32 rounding)."""
    gen = torch.Generator().manual_seed(4)
    stack = torch.nn.Parameter(torch.randn(3, 12, 20, generator=gen))
    singles = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    kw = dict(lr=0.05, weight_decay=0.1, ns_dtype="float32")
    opt_stack, opt_single = cls([stack], **kw), cls(singles, **kw)
    for _ in range(3):
        grad = torch.randn(3, 12, 20, generator=gen)
        stack.grad = grad.clone()
        for e, p in enumerate(singles):
            p.grad = grad[e].clone()
        opt_stack.step()
        opt_single.step()
    for e in range(3):
        torch.testing.assert_close(stack.detach()[e], singles[e].detach(), rtol=1e-5, atol=1e-6)
    if cls is NorMuon:
        assert opt_stack.state[stack]["row_second_moment"].shape == (3, 12)


def test_batched_ns_and_normuon_normalise_each_matrix_on_its_own():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(4, 6, 9, generator=gen)
    G[1] *= 1000.0  # a matrix of another scale must not change its neighbours' results
    batched = newton_schulz(G, dtype=torch.float32)
    for e in range(4):
        torch.testing.assert_close(batched[e], newton_schulz(G[e], dtype=torch.float32), rtol=1e-5, atol=1e-6)
    O_hat, v = normuon_normalize(batched, torch.zeros(4, 6), 0.9, 1e-8)
    for e in range(4):
        one, v_one = normuon_normalize(batched[e], torch.zeros(6), 0.9, 1e-8)
        torch.testing.assert_close(O_hat[e], one)
        torch.testing.assert_close(v[e], v_one)
        torch.testing.assert_close(O_hat[e].norm(), batched[e].norm())


@pytest.mark.slow  # ~20 s of inductor compilation on 2 cores
def test_compiled_mla_moe_blocks_match_eager():
    """``train.compile`` compiles each block; the expert loop stays eager (its per-expert
    token counts change with every batch), the rest is compiled and gives the same output."""
    torch._dynamo.reset()
    model = _model(
        "model.preset=debug-mla-moe",
        "model.dim=64",
        "model.n_heads=4",
        "model.n_layers=1",
        "model.ffn_hidden=64",
        "model.n_shared_experts=1",
    )
    eager = [model(torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(s))) for s in range(3)]
    for block in model.layers:
        block.compile_forward()
    for s in range(3):
        compiled = model(torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(s)))
        torch.testing.assert_close(compiled, eager[s], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
