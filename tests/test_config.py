"""Config parsing and refusal of bad configs (exit 2, one line, no run touched)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from normopt.config import DEFAULT_CONFIG, check_world_size, load_config
from normopt.errors import UserError
from tests.conftest import REPO_ROOT, run_cli


def test_demo_config_is_the_default_and_overrides_apply():
    cfg = load_config(None, ["model.norm=derf", "optim.lr=1e-3", "train.steps=7", "data.path="])
    assert cfg.model.norm == "derf" and cfg.optim.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.data.path == ""
    assert load_config(DEFAULT_CONFIG).to_dict() == load_config(None).to_dict()


def test_empty_run_dir_is_derived_from_config_norm_and_optimizer():
    assert load_config(None).run.dir == "runs/demo-rmsnorm-adamw"
    assert load_config(None, ["model.norm=derf", "optim.name=muon"]).run.dir == "runs/demo-derf-muon"
    assert load_config(None, ["run.dir=elsewhere"]).run.dir == "elsewhere"


def test_contract_keys_exist():
    d = load_config(None).to_dict()
    for key in [
        "run.dir",
        "data.path",
        "model.preset",
        "model.norm",
        "optim.name",
        "optim.lr",
        "train.steps",
        "train.global_batch_size",
        "train.micro_batch_size",
        "train.seq_len",
        "train.seed",
        "train.eval_interval",
        "checkpoint.interval",
        "checkpoint.keep_latest_k",
        "checkpoint.resume",
    ]:
        section, name = key.split(".")
        assert name in d[section], key
    assert d["checkpoint"]["resume"] == "auto"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("bogus.key=1", "bogus.key"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=fast", "optim.lr"),
        ("train.steps=1.5", "train.steps"),
        ("model.norm=batchnorm", "model.norm"),
        ("model.n_heads=5", "model.n_heads"),
        ("model.n_kv_heads=4", "model.n_kv_heads"),
        ("train.compile=maybe", "train.compile"),
        ("model.preset=huge", "model.preset"),
        ("checkpoint.resume=sometimes", "checkpoint.resume"),
        ("data.val_fraction=0.9", "data.val_fraction"),
        ("optim.ns_steps_per_layer=layers.0", "optim.ns_steps_per_layer"),
        ("optim.ns_mode=sometimes", "optim.ns_mode"),
        ("optim.momentum=1.0", "optim.momentum"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(key)


def test_micro_batch_is_an_upper_bound_and_only_the_rank_split_must_divide():
    cfg = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=4"])
    assert check_world_size(cfg, 2) == (4, 2)  # 8 per rank: 4 x 2
    assert check_world_size(load_config(None, ["train.global_batch_size=16"]), 2) == (8, 1)  # demo x 2 ranks
    assert check_world_size(load_config(None, ["train.global_batch_size=24", "train.micro_batch_size=5"]), 2) == (
        4,
        3,
    )  # 12 per rank: the largest divisor <= 5
    assert check_world_size(load_config(None, ["train.global_batch_size=64", "train.micro_batch_size=32"]), 8) == (8, 1)
    with pytest.raises(UserError, match="16 sequences cannot be split evenly over 3 ranks .*1, 2, 4, 8, 16"):
        check_world_size(cfg, 3)


def test_unknown_yaml_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"norm": "dyt", "normm": 1}}))
    with pytest.raises(UserError, match="model.normm"):
        load_config(path)


BROKEN = [
    (["optim.lr=-0.1"], "optim.lr"),
    (["model.n_heads=7"], "model.n_heads"),
    (["nonsense"], "override"),
    (["train.dtype=float8"], "train.dtype"),
    (["data.path=/no/such/corpus.txt"], "data.path"),
    (["data.path=/no/such/folder/"], "data.path"),
    (["data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer"),
]


@pytest.mark.parametrize("args, key", BROKEN)
def test_cli_exits_2_with_one_line_and_leaves_runs_alone(tmp_path, args, key):
    existing = tmp_path / "existing_run"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    proc = run_cli([f"run.dir={existing}", *args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before


def test_cli_missing_config_file_exits_2():
    proc = run_cli(["--config", "/no/such.yaml"], timeout=60)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_launcher_refuses_a_bad_config_before_starting_ranks():
    proc = subprocess.run(
        [sys.executable, "-m", "normopt.cli", "launch", "--nproc", "2", "model.n_heads=7"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "normopt: error: model.n_heads: 7 heads do not divide dim 192"
