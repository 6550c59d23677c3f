"""The GPU path's options, tested where CI runs (a CPU): train.deterministic,
train.activation_checkpointing, the memory estimate, NS FLOPs in MFU, the optimizer-step
timing, optim.ns_batch_size=auto, and the GPU configs' compile default."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from normopt.config import load_config
from normopt.errors import UserError
from normopt.memory_budget import GIB, activation_bytes_per_token, estimate_memory, memory_advice
from normopt.metrics.device_stats import SectionTimer, pop_peak_memory
from normopt.metrics.flops import MfuMeter
from normopt.models.derf import commit_running_scales
from normopt.models.llama import build_model
from normopt.models.moe import commit_expert_loads
from normopt.models.presets import count_parameters, resolve_model_args
from normopt.optim.muon import Muon
from normopt.optim.newton_schulz import ns_flops
from normopt.optim.ns_batches import resolve_ns_batch_size
from tests.conftest import REPO_ROOT, TINY_MODEL, run_cli, tiny_run_args


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- train.deterministic


def test_deterministic_is_an_execution_key_refusing_non_booleans():
    from normopt.config import keys_with_role
    from normopt.key_roles import EXECUTION

    assert "train.deterministic" in keys_with_role(EXECUTION)
    assert load_config(None, ["train.deterministic=true"]).train.deterministic is True
    with pytest.raises(UserError, match="train.deterministic"):
        load_config(None, ["train.deterministic=sometimes"])


def test_deterministic_kernels_change_nothing_on_cpu_and_set_every_cuda_flag(monkeypatch):
    from normopt.determinism import CUBLAS_WORKSPACE, use_deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert use_deterministic_kernels("cpu") == []
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        assert use_deterministic_kernels("cuda")  # the flags can be set without a GPU
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


# ---------------------------------------------------------------- activation checkpointing


def _train_model(norm: str, ffn: str, checkpointing: bool, compiled: bool = False, steps: int = 3):
    cfg = load_config(
        None,
        [
            f"model.norm={norm}",
            f"model.ffn={ffn}",
            "model.n_experts=4",
            "model.moe_top_k=2",
            "model.moe_balance=aux_free",
            "model.moe_bias_rate=0.01",
            *TINY_MODEL,
        ],
    )
    torch.manual_seed(0)
    model = build_model(resolve_model_args(cfg.model, vocab_size=300))
    for block in model.layers:
        block.activation_checkpointing = checkpointing
        if compiled:
            block.compile_forward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 300, (2, 33), generator=gen)
        logits, aux = model(tokens[:, :-1], with_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + aux
        loss.backward()
        opt.step()
        opt.zero_grad()
        commit_running_scales(model)
        commit_expert_loads(model, 0.01)
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm,ffn", [("rmsnorm", "dense"), ("derf_ema", "moe")])
def test_activation_checkpointing_is_bit_identical(norm, ffn):
    """Recomputed blocks give the same losses and weights, and the forward statistics
    (derf_ema's running scale, the aux-free routing bias fed by expert loads) count each
    real forward once, not again in the recomputation."""
    plain_losses, plain_state = _train_model(norm, ffn, checkpointing=False)
    ckpt_losses, ckpt_state = _train_model(norm, ffn, checkpointing=True)
    assert ckpt_losses == plain_losses
    assert plain_state.keys() == ckpt_state.keys()  # no wrapper in the parameter names
    for key in plain_state:
        assert torch.equal(plain_state[key], ckpt_state[key]), key


@pytest.mark.slow  # ~10 s of inductor compilation on 2 cores
def test_activation_checkpointing_of_compiled_blocks_is_bit_identical():
    torch._dynamo.reset()
    plain, plain_state = _train_model("derf_ema", "moe", checkpointing=False, compiled=True)
    ckpt, ckpt_state = _train_model("derf_ema", "moe", checkpointing=True, compiled=True)
    assert ckpt == plain
    assert all(torch.equal(plain_state[k], ckpt_state[k]) for k in plain_state)
    torch._dynamo.reset()


def test_training_run_with_checkpointed_blocks_and_deterministic_flag_matches(tmp_path, tiny_corpus):
    """Through the trainer (FSDP2, derf_ema, Muon): the two execution options change no bit."""
    common = ["model.norm=derf_ema", "optim.name=muon", "diagnostics.interval=0"]
    plain = run_cli(tiny_run_args(tmp_path / "plain", tiny_corpus, *common))
    other = run_cli(
        tiny_run_args(
            tmp_path / "other", tiny_corpus, *common, "train.activation_checkpointing=block", "train.deterministic=true"
        )
    )
    assert plain.returncode == 0 and other.returncode == 0, (plain.stderr + other.stderr)[-3000:]
    assert "activation_checkpointing=block" in other.stdout and "deterministic=True" in other.stdout
    losses = [[r.get("loss"), r.get("eval_loss"), r.get("grad_norm")] for r in _metrics(tmp_path / "plain")]
    assert losses == [[r.get("loss"), r.get("eval_loss"), r.get("grad_norm")] for r in _metrics(tmp_path / "other")]
    record = next(r for r in _metrics(tmp_path / "other") if "loss" in r)
    assert 0 < record["optimizer_step_s"] and 0 < record["optimizer_share"] < 1
    assert "mem_peak_allocated_gib" not in record  # CPU: no allocator statistics


# ---------------------------------------------------------------- memory estimate


def _args_1b():
    cfg = load_config(REPO_ROOT / "configs" / "gpu" / "llama_1b.yaml", ["data.path="])
    return resolve_model_args(cfg.model, vocab_size=cfg.data.vocab_size)


def test_activation_estimate_counts_the_saved_tensors_of_a_dense_block():
    args = _args_1b()  # dim 2048, 8 KV heads of 64, ffn 8192, 32 heads
    d, kv, f = 2048, 512, 8192
    expected = 2 * (8 * d + 2 * d) + 2 * (3 * d + 2 * kv) + 4 * 32 + 8 * f
    assert activation_bytes_per_token(args, compute_bytes=2) == expected


def test_memory_estimate_of_the_1b_preset_against_its_measured_peak():
    """Measured on an H200 (bf16, micro-batch 8 x 2048, 1 rank, eager): peak allocated 51.5
    GiB with AdamW, 47.9 with Muon, 24.0 with activation checkpointing. The estimate sits
    below each peak (it leaves out the gathered layer and temporaries) by less than the
    share the trainer prints."""
    from normopt.memory_budget import ESTIMATE_UNDERCOUNT

    args, params = _args_1b(), count_parameters(_args_1b())
    for optimizer, checkpointing, measured in (
        ("adamw", "none", 51.5),
        ("muon", "none", 47.9),
        ("adamw", "block", 24.0),
    ):
        est = estimate_memory(params, optimizer, 1, 8, 2048, 32768, args, 2, checkpointing)
        assert (1 - ESTIMATE_UNDERCOUNT) * measured < est.expected_bytes / GIB < measured, optimizer
    est = estimate_memory(params, "adamw", 1, 8, 2048, 32768, args, 2)
    assert est.total_bytes / GIB == pytest.approx(19.5, abs=0.01)  # the lower bound it printed
    checkpointed = estimate_memory(params, "adamw", 1, 8, 2048, 32768, args, 2, "block")
    assert checkpointed.activation_bytes < est.activation_bytes / 8
    assert checkpointed.total_bytes == est.total_bytes


def test_memory_advice_names_a_micro_batch_that_fits_and_checkpointing():
    args = _args_1b()
    est = estimate_memory(count_parameters(args), "adamw", 1, 8, 2048, 32768, args, 2)
    assert memory_advice(est, est.expected_bytes, 8, "none") is None
    advice = memory_advice(est, 40 * GIB, 8, "none")  # an H100 with 40 GiB free
    assert advice.startswith("memory: the estimate 49.0 GiB exceeds the 40.0 GiB")
    assert "train.micro_batch_size=5" in advice and "train.activation_checkpointing=block" in advice
    assert "activation_checkpointing" not in memory_advice(est, 40 * GIB, 8, "block")
    assert memory_advice(est, None, 8, "none") is None


# ---------------------------------------------------------------- NS FLOPs and MFU


def test_ns_flops_of_the_1b_matrices():
    """5 quintic steps over the 112 block matrices of the 1B preset: 4.57e13 FLOP per step."""
    per_layer = (
        2 * ns_flops(2048, 2048, 5) + 2 * ns_flops(512, 2048, 5) + 2 * ns_flops(8192, 2048, 5) + ns_flops(2048, 8192, 5)
    )
    assert 16 * per_layer == pytest.approx(4.574e13, rel=1e-3)
    assert ns_flops(3, 7, 1) == ns_flops(7, 3, 1) == 4 * 9 * 7 + 2 * 27


def test_muon_counts_every_matrix_and_expert_once():
    params = [torch.nn.Parameter(torch.zeros(8, 16)), torch.nn.Parameter(torch.zeros(4, 6, 10))]
    opt = Muon([{"params": params, "ns_steps": 3}], lr=0.01)
    assert opt.ns_flops_per_step() == ns_flops(8, 16, 3) + 4 * ns_flops(6, 10, 3)


def test_mfu_with_extra_flops():
    meter = MfuMeter(peak=1e12, source="test", flops_per_token=1e6, world_size=2, log=lambda *_: None)
    assert meter(1e5) == pytest.approx(0.05)
    assert meter(1e5, extra_flops_per_token=1e6) == pytest.approx(0.10)


def test_section_timer_and_memory_on_cpu():
    timer = SectionTimer(torch.device("cpu"))
    with timer.section():
        sum(range(10000))
    first = timer.pop_seconds()
    assert first > 0 and timer.pop_seconds() == 0.0
    assert pop_peak_memory(torch.device("cpu")) == {}


# ---------------------------------------------------------------- defaults for CUDA


def test_ns_batch_size_auto_batches_on_cuda_only():
    assert load_config(None, []).optim.ns_batch_size == "auto"
    assert resolve_ns_batch_size("auto", "cuda") == 8 and resolve_ns_batch_size("auto", "cpu") == 1
    assert resolve_ns_batch_size(3, "cuda") == 3
    with pytest.raises(UserError, match="optim.ns_batch_size"):
        load_config(None, ["optim.ns_batch_size=0"])


@pytest.mark.parametrize("name", ["llama_124m", "llama_1b"])
def test_gpu_configs_compile_by_default_and_can_turn_it_off(name):
    path = REPO_ROOT / "configs" / "gpu" / f"{name}.yaml"
    assert load_config(path, []).train.compile is True
    assert load_config(path, ["train.compile=false"]).train.compile is False
