"""``normopt export --format hf``: every registered norm x attention x feed-forward loads in
transformers with normopt's logits, greedy generation equals ``normopt sample``, and a
failed parity gate leaves nothing behind.

transformers is imported once per session (it is slow to import); the models are tiny
(dim 32, 2 layers) and built directly, with every parameter moved off its init.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from itertools import product
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from normopt.hf.export import TEMPLATE, write_hf_folder
from normopt.hf.parity import MAX_ABS_LOGIT_DIFF, MAX_KL, compare_logits, load_exported
from normopt.models.components import ATTENTIONS, FEED_FORWARDS
from normopt.models.derf import DerfEMA
from normopt.models.llama import build_model
from normopt.models.norm_layer import NormConfig
from normopt.models.norms import NORMS, reference_bias, reference_embed_scale
from normopt.models.presets import ModelArgs, fill_derived_shapes
from tests.conftest import run_cli, tiny_run_args

# the modeling files transformers caches per loaded folder go to a temporary folder, not ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="normopt-test-hf-modules-"))

COMBINATIONS = list(product(NORMS.names(), ATTENTIONS.names(), FEED_FORWARDS.names()))
MAX_POSITIONS = 32
DIM = 32


@pytest.fixture(scope="module")
def tokenizer():
    from normopt.data.tokenizer import train_bpe

    phrases = ["to be or not to be that is the question", "the quick brown fox jumps over the lazy dog"]
    return train_bpe(phrases * 20, 300)


def tiny_model(norm: str, attention: str, ffn: str, vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer model of the combination with matrices of unit gain, vectors and scalars
    perturbed off their init, derf_ema's running scales away from 1 and the aux-free routing
    bias non-zero, so that a misplaced tensor shows in the logits."""
    shape = dict(
        tie_embeddings=attention != "mla",
        norm_config=NormConfig(name=norm, bias=reference_bias(norm), eps=1e-5 if norm == "rmsnorm" else 1e-6),
        embed_scale=reference_embed_scale(norm, DIM),
        rope_theta=500.0,
        attention=attention,
        attention_window=5 if attention == "swa" else 0,
        q_lora_rank=16 if ffn == "moe" else 0,
        ffn=ffn,
        n_experts=4 if ffn == "moe" else 0,
        n_shared_experts=1 if ffn == "moe" else 0,
        moe_score="sigmoid" if attention == "swa" else "softmax",
        moe_balance="aux_free",
    )
    args = fill_derived_shapes(ModelArgs(vocab, DIM, 2, 4, 2, 64, **{**shape, **overrides}))
    torch.manual_seed(seed)
    model = build_model(args)
    with torch.no_grad():  # weights of a trained model's scale (logits of order 1), not init's ~0.02
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(std=parameter.shape[-1] ** -0.5)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.2 * parameter.abs().clamp_min(0.5))
        for module in model.modules():
            if isinstance(module, DerfEMA):
                for observed in (1.0, 4.0 + torch.rand(()).item(), 9.0):
                    module.commit(torch.tensor([observed], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
            if hasattr(module, "expert_bias"):
                module.expert_bias.normal_(std=0.1)
    return model.eval()


def assert_parity(model, exported, tokens, attention_mask=None):
    with torch.no_grad():
        parity = compare_logits(model(tokens), exported(tokens, attention_mask=attention_mask).logits)
    assert parity.max_abs <= MAX_ABS_LOGIT_DIFF * parity.scale and parity.kl <= MAX_KL, parity.describe()
    return parity


@pytest.mark.parametrize("norm,attention,ffn", COMBINATIONS)
def test_every_combination_loads_in_transformers_with_normopt_logits(norm, attention, ffn, tokenizer, tmp_path):
    model = tiny_model(norm, attention, ffn, tokenizer.get_vocab_size())
    out, _ = write_hf_folder(model, tokenizer, MAX_POSITIONS, torch.float32, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    llama = (norm, attention, ffn) == ("rmsnorm", "gqa", "dense")
    assert config["architectures"] == ["LlamaForCausalLM" if llama else "NormoptForCausalLM"]
    assert (out / "modeling_normopt.py").is_file() != llama and ("auto_map" in config) != llama
    assert config["tie_word_embeddings"] == (attention != "mla")

    # an independent batch, longer than the gate's and past the sliding window
    exported = load_exported(out, remote_code=not llama)
    tokens = torch.randint(model.args.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    assert_parity(model, exported, tokens)
    if norm == "derf_ema":  # the frozen scales are the layers' own c, not 1
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            scale = f.get_tensor("model.layers.0.attn_norm.input_scale")
        assert scale.dtype == torch.float64 and scale.item() > 1.1
        assert torch.equal(scale.float(), model.layers[0].attn_norm.input_scale().reshape(1))
    if not llama and attention == "swa":  # left padding changes nothing for the real tokens
        padded = torch.cat([torch.zeros(3, 4, dtype=torch.long), tokens], dim=1)
        mask = torch.cat([torch.zeros(3, 4, dtype=torch.long), torch.ones_like(tokens)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = exported(padded, attention_mask=mask, position_ids=positions).logits[:, 4:]
            parity = compare_logits(model(tokens), logits)
        assert parity.ok, parity.describe()


def test_llama_export_is_stock_transformers_and_rmsnorm_with_embed_scale_is_not(tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    vocab = tokenizer.get_vocab_size()
    out, _ = write_hf_folder(
        tiny_model("rmsnorm", "gqa", "dense", vocab, tie_embeddings=False),
        tokenizer,
        MAX_POSITIONS,
        torch.float32,
        tmp_path / "llama",
    )
    exported = load_exported(out, remote_code=False)
    assert type(exported) is LlamaForCausalLM
    assert exported.config.rope_parameters["rope_theta"] == 500.0 and exported.config.rms_norm_eps == 1e-5
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 500.0  # where transformers 4 reads it
    assert not exported.config.tie_word_embeddings
    assert not torch.equal(exported.lm_head.weight, exported.model.embed_tokens.weight)
    scaled, _ = write_hf_folder(
        tiny_model("rmsnorm", "gqa", "dense", vocab, embed_scale=3.0),
        tokenizer,
        MAX_POSITIONS,
        torch.float32,
        tmp_path / "scaled",
    )
    assert json.loads((scaled / "config.json").read_text())["embed_scale"] is True


def test_bfloat16_export_is_sharded_and_keeps_buffers_exact(tokenizer, tmp_path):
    model = tiny_model("derf_ema", "gqa", "moe", tokenizer.get_vocab_size())
    out, _ = write_hf_folder(model, tokenizer, MAX_POSITIONS, torch.bfloat16, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    dtypes = {}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            dtypes.update({name: f.get_tensor(name).dtype for name in f.keys()})
    assert dtypes.keys() == index["weight_map"].keys()
    assert dtypes["model.layers.0.ffn.experts.w1"] == torch.bfloat16
    assert dtypes["model.layers.0.attn_norm.input_scale"] == torch.float64
    assert dtypes["model.layers.0.ffn.router.expert_bias"] == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tokens = torch.randint(model.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    assert_parity(model, load_exported(out, remote_code=True), tokens)  # the model's weights were rounded alike

    from transformers import AutoModelForCausalLM

    in_bf16 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    norm = in_bf16.model.layers[0].attn_norm
    assert norm.weight.dtype == torch.bfloat16 and norm.input_scale.dtype == torch.float64
    assert in_bf16.model.layers[0].ffn.router.expert_bias.dtype == torch.float32


def _swap_gate_and_up(tensors):
    gate, up = "model.layers.0.ffn.w1.weight", "model.layers.0.ffn.w3.weight"
    tensors[gate], tensors[up] = tensors[up], tensors[gate]


def _forget_frozen_scales(tensors):
    for name in tensors:
        if name.endswith("input_scale"):
            tensors[name] = torch.ones(1)


# slips a converter can make: two matrices' names swapped; derf_ema's scales left at c = 1
SLIPS = {"dyt": _swap_gate_and_up, "derf_ema": _forget_frozen_scales}


@pytest.mark.parametrize("norm", SLIPS)
def test_failed_gate_refuses_and_leaves_nothing(norm, tokenizer, tmp_path, monkeypatch):
    import normopt.hf.export as hf_export
    from normopt.errors import UserError

    converted = hf_export.hf_tensors

    def with_slip(model, dtype):
        tensors = converted(model, dtype)
        SLIPS[norm](tensors)
        return tensors

    monkeypatch.setattr(hf_export, "hf_tensors", with_slip)
    model = tiny_model(norm, "gqa", "dense", tokenizer.get_vocab_size())
    with pytest.raises(UserError, match="failed its parity gate.*max \\|logit difference\\|.*nothing was written"):
        write_hf_folder(model, tokenizer, MAX_POSITIONS, torch.float32, tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its staging copy
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_hf_folder(model, tokenizer, MAX_POSITIONS, torch.float32, tmp_path / "taken")


def test_template_depends_only_on_torch_and_transformers():
    imported = set()
    for node in ast.walk(ast.parse(TEMPLATE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"__future__", "torch", "transformers"}


# -- from a trained run, through the command line ---------------------------------------------


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, tiny_corpus) -> Path:
    """A 2-step run of the non-Llama kind with the most parts: derf_ema, MLA, aux-free MoE."""
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    proc = run_cli(
        tiny_run_args(
            run_dir,
            tiny_corpus,
            "model.norm=derf_ema",
            "model.attention=mla",
            "model.q_lora_rank=16",
            "model.ffn=moe",
            "model.moe_balance=aux_free",
            "train.steps=2",
            "checkpoint.interval=2",
            "train.eval_interval=2",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def greedy_equals_normopt_sample(run_dir: Path, folder: Path, remote_code: bool, capsys, new_tokens: int) -> None:
    """``normopt sample --temperature 0`` and transformers' greedy ``generate`` on the export
    give the same tokens and the same text."""
    from transformers import AutoTokenizer

    from normopt.cli import main
    from normopt.sample import generate, load_run

    prompt = "to be or"
    assert (
        main(["sample", str(run_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(new_tokens)])
        == 0
    )
    printed = capsys.readouterr().out.rstrip("\n")
    loaded = load_run(run_dir)
    prompt_ids = loaded.tokenizer.encode(prompt).ids
    expected = generate(
        loaded.model,
        prompt_ids,
        new_tokens,
        loaded.cfg.train.seq_len,
        temperature=0,
        stop_id=loaded.tokenizer.token_to_id("<|endoftext|>"),
    )

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code)
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt_ids
    exported = load_exported(folder, remote_code)
    generated = exported.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, len(prompt_ids) :].tolist()
    assert generated == expected
    assert printed == prompt + tokenizer.decode(generated, skip_special_tokens=True)


def test_cli_exports_a_llama_run_that_generates_as_normopt_sample(finished_run, tmp_path, capsys):
    from normopt.cli import main

    out = tmp_path / "llama"
    assert main(["export", str(finished_run), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(out) and printed.err.startswith("parity gate passed: max |logit difference| ")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir()) and out.stat().st_mode & 0o777 == 0o755
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|endoftext|>" and tokenizer_config["model_max_length"] == 32
    # within train.seq_len (32): past it normopt sample slides its window, stock Llama does not
    greedy_equals_normopt_sample(finished_run, out, remote_code=False, capsys=capsys, new_tokens=12)
    assert main(["export", str(finished_run), "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to --format hf" in capsys.readouterr().err

    # an earlier step on request: its own weights
    from normopt.export import load_model_weights

    assert main(["export", str(finished_run), "--format", "hf", "--step", "3", "--out", str(tmp_path / "s3")]) == 0
    with safe_open(str(tmp_path / "s3" / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    checkpoint = load_model_weights(finished_run / "checkpoints" / "step_00000003")
    assert torch.equal(embedding, checkpoint["tok_embeddings.weight"])


def test_without_transformers_the_hf_export_says_how_to_install_it(finished_run, tmp_path, monkeypatch, capsys):
    import sys

    from normopt.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert main(["export", str(finished_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "--format hf needs transformers: pip install" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_cli_exports_a_derf_ema_mla_moe_run_that_generates_as_normopt_sample(custom_run, capsys):
    from normopt.cli import main

    assert main(["export", str(custom_run), "--format", "hf"]) == 0
    out = custom_run / "export" / "step_00000002_hf"
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["norm"], config["attention"], config["ffn"], config["moe_routing_bias"]) == (
        "derf_ema",
        "mla",
        "moe",
        True,
    )
    # past train.seq_len (32) too: the modeling file slides its context as normopt sample does
    greedy_equals_normopt_sample(custom_run, out, remote_code=True, capsys=capsys, new_tokens=40)

    # a left-padded batch generates what each prompt generates alone
    from transformers import AutoTokenizer

    exported = load_exported(out, remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True, padding_side="left")
    prompts = ["to be or", "the quick brown fox jumps over"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"].min() == 0
    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    together = exported.generate(**batch, **greedy)[:, -5:]
    for row, prompt in zip(together, prompts):
        assert torch.equal(row, exported.generate(**tokenizer(prompt, return_tensors="pt"), **greedy)[0, -5:])
    assert main(["export", str(custom_run), "--format", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("read_only, reason", [(True, "read-only file system"), (False, "no space left on device")])
def test_a_file_system_that_refuses_the_export_is_one_line_and_leaves_nothing(
    finished_run, tmp_path, read_only, reason
):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.mounts import tmpfs

    with tmpfs(tmp_path / "disk", size="64k", read_only=read_only) as disk:
        out = disk / "hf"
        proc = subprocess.run(
            [sys.executable, "-m", "normopt.cli", "export", str(finished_run), "--format", "hf", "--out", str(out)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"normopt: error: --out {out}: cannot write ({reason}); nothing was written"
        ], proc.stderr
        assert list(disk.iterdir()) == []
