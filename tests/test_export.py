"""``normopt export``: a sharded checkpoint written by 2 ranks -> one safetensors file."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from normopt.config import config_from_dict
from normopt.models.llama import build_model
from normopt.models.presets import resolve_model_args
from tests.conftest import REPO_ROOT, tiny_run_args
from tests.torchrun import run_torchrun


def test_export_consolidates_two_rank_checkpoint(tmp_path, tiny_corpus):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir = tmp_path / "run"
    run_torchrun(
        REPO_ROOT / "train.py",
        2,
        tiny_run_args(run_dir, tiny_corpus, "model.norm=derf_ema", "model.tie_embeddings=true"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "normopt.cli", "export", str(run_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "export" / "step_00000006.safetensors"
    assert proc.stdout.strip() == str(out) and proc.stderr == ""
    weights = load_file(str(out))

    # an independent reading of the same checkpoint
    dcp_to_torch_save(run_dir / "checkpoints" / "step_00000006", tmp_path / "full.pt")
    reference = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name

    cfg = config_from_dict(yaml.safe_load(out.with_suffix(".config.yaml").read_text()))
    vocab = weights["tok_embeddings.weight"].shape[0]
    model = build_model(resolve_model_args(cfg.model, vocab), "meta")
    model.to_empty(device="cpu")
    model.load_state_dict(weights, strict=True)  # every parameter and derf_ema buffer present
    assert weights["layers.0.attn_norm.commits"].item() == 6  # one commit per step
    assert weights["layers.0.attn_norm.reference_mean_square"].item() > 0
    assert "embed_scale" in weights  # derf_ema scales its embedding (model.embed_scale: auto)

    # self-contained: the tokenizer the run trained with beside the weights and config, shareable modes
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out.with_suffix(".tokenizer.json")))
    assert (
        tokenizer.get_vocab_size() == vocab and tokenizer.decode(tokenizer.encode("to be or not").ids) == "to be or not"
    )
    for path in (out, out.with_suffix(".config.yaml"), out.with_suffix(".tokenizer.json")):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert out.parent.stat().st_mode & 0o777 == 0o755


def test_export_without_checkpoint_exits_2(tmp_path):
    (tmp_path / "run").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "normopt.cli", "export", str(tmp_path / "run")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr


def test_a_file_system_that_refuses_the_export_is_one_line_and_leaves_nothing(finished_run, tmp_path, capsys):
    from normopt.cli import main
    from tests.mounts import tmpfs

    for read_only, reason in ((True, "read-only file system"), (False, "no space left on device")):
        with tmpfs(tmp_path / "disk", size="64k", read_only=read_only) as disk:
            out = disk / "model.safetensors"
            capsys.readouterr()
            assert main(["export", str(finished_run), "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.splitlines() == [f"normopt: error: --out {out}: cannot write ({reason}); nothing was written"], (
                err
            )
            assert list(disk.iterdir()) == []
