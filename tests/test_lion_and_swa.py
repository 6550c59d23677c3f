"""The registries' proof variants: Lion (optim/lion.py) and sliding-window attention
(models/sliding_window.py), each one module and one registry line, trained like the others."""

from __future__ import annotations

import json

import pytest
import torch

from normopt.config import load_config
from normopt.memory_budget import estimate_memory
from normopt.models.components import ATTENTIONS, attention_class
from normopt.models.llama import build_model
from normopt.models.presets import count_flops_per_token, count_parameters, resolve_model_args
from normopt.models.sliding_window import DEFAULT_WINDOW, band_mask
from normopt.optim.builder import build_optimizers
from normopt.optim.lion import Lion, lion_update_
from normopt.optim.registry import OPTIMIZERS
from tests.conftest import TINY_MODEL, run_cli, tiny_run_args
from tests.torchrun import REPO_ROOT, run_torchrun

# ---------------------------------------------------------------- Lion


def test_lion_step_is_the_published_update():
    gen = torch.Generator().manual_seed(0)
    p, g, m = (torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    expected_p = p * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
    expected_m = b2 * m + (1 - b2) * g
    lion_update_(p, g, m, lr, b1, b2, wd)
    torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-15)
    torch.testing.assert_close(m, expected_m, rtol=0, atol=1e-15)


def test_lion_optimizer_moves_every_element_by_lr():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.randn(3, 4).abs() + 0.1
    Lion([w], lr=0.5, betas=(0.9, 0.99)).step()
    assert torch.equal(w.detach(), torch.full((3, 4), -0.5))


def test_lion_takes_every_group_and_counts_one_state_tensor():
    cfg = load_config(None, ["optim.name=lion", *TINY_MODEL])
    model = build_model(resolve_model_args(cfg.model, vocab_size=300))
    optimizers = build_optimizers(model, cfg.optim)
    assert [type(o) for o in optimizers.optimizers] == [Lion]
    assert {g.optimizer for g in optimizers.groups} == {"lion"}
    no_decay = {g.role: g.weight_decay for g in optimizers.groups}
    assert no_decay["norm"] == 0.0 and no_decay["matrix"] == cfg.optim.weight_decay  # AdamW's decay rules
    assert OPTIMIZERS["lion"].state_bytes == 4
    assert estimate_memory(1000, "lion", 1, 1, 1, 1).state_bytes == 12_000


# ---------------------------------------------------------------- sliding-window attention


def test_band_mask():
    mask = band_mask(5, 2)
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


def _attention_pair(window: int):
    cfg = load_config(None, [*TINY_MODEL, "model.attention=swa", f"model.attention_window={window}"])
    args = resolve_model_args(cfg.model, vocab_size=300)
    swa = attention_class("swa")(args)
    gqa = attention_class("gqa")(args)
    gqa.load_state_dict(swa.state_dict())
    return args, swa, gqa


def test_a_window_as_long_as_the_sequence_is_causal_attention():
    args, swa, gqa = _attention_pair(window=16)
    x = torch.randn(2, 16, args.dim)
    cos, sin = build_model(args).rope(16, "cpu")
    torch.testing.assert_close(swa(x, cos, sin), gqa(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_a_window_of_one_attends_to_the_token_itself():
    args, swa, _ = _attention_pair(window=1)
    x = torch.randn(1, 6, args.dim)
    cos, sin = build_model(args).rope(6, "cpu")
    v = swa.wv(x).view(1, 6, args.n_kv_heads, args.head_dim).repeat_interleave(args.n_heads // args.n_kv_heads, 2)
    torch.testing.assert_close(swa(x, cos, sin), swa.wo(v.reshape(1, 6, -1)), rtol=1e-5, atol=1e-6)


def test_swa_shapes_counts_and_config():
    assert set(ATTENTIONS) >= {"gqa", "mla", "swa"}
    cfg = load_config(None, [*TINY_MODEL, "model.attention=swa"])
    args = resolve_model_args(cfg.model, vocab_size=300)
    assert args.attention_window == DEFAULT_WINDOW
    gqa = resolve_model_args(load_config(None, TINY_MODEL).model, vocab_size=300)
    assert count_parameters(args) == count_parameters(gqa)
    # scores over min(T, w) keys: below the window the FLOPs equal GQA's, above it they stop growing
    assert count_flops_per_token(args, 64) == count_flops_per_token(gqa, 64)
    assert count_flops_per_token(args, 1024) - count_flops_per_token(args, 512) == 0
    with pytest.raises(Exception, match="model.attention_window"):
        load_config(None, ["model.attention=swa", "model.attention_window=0"])


# ---------------------------------------------------------------- trained like the others


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_lion_with_sliding_windows_trains_and_two_ranks_match_one_process(tmp_path, tiny_corpus):
    common = [
        "optim.name=lion",
        "optim.lr=3e-3",
        "optim.weight_decay=0.3",
        "model.attention=swa",
        "model.attention_window=8",
        "train.dtype=float32",
        "train.steps=8",
        "diagnostics.interval=0",
    ]
    single = tmp_path / "single"
    proc = run_cli(tiny_run_args(single, tiny_corpus, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention: swa window=8" in proc.stdout and "lion" in proc.stdout
    run_torchrun(REPO_ROOT / "train.py", 2, tiny_run_args(tmp_path / "double", tiny_corpus, *common))
    one, two = _losses(single), _losses(tmp_path / "double")
    assert one.keys() == two.keys() == set(range(1, 9))
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    assert one[8] < one[1] - 0.1
