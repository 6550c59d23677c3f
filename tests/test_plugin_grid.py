"""The example plugins through everything a built-in goes through: a grid crossing the plugin
norm (ScaleNorm) with AdamW, Muon and the plugin optimizer (AdEMAMix) with the plugin
diagnostic (update_rms) on, its report, a kill and resume, 2 ranks against one process, and
the export of the plugin-norm model loaded in transformers."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml

from normopt.plugins import forget_all, load_plugins
from tests.conftest import REPO_ROOT, TINY_MODEL, run_cli, tiny_run_args
from tests.processes import start, wait_for_step
from tests.test_plugins import ALL, EXAMPLES, _cli, _one_line
from tests.torchrun import run_torchrun

PLUGIN_ARGS = [f"--plugin={path}" for path in ALL]
NORMS, OPTIMS = ["rmsnorm", "scalenorm"], ["adamw", "muon", "ademamix"]


def _metrics(run_dir, key):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if key in r}


def _update_rms(run_dir):
    records = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    return {r["step"]: r["matrices"] for r in records if r["kind"] == "update_rms"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_corpus):
    """``normopt factorial`` over the 2 x 3 spec, the plugins named by the spec only."""
    folder = tmp_path_factory.mktemp("plugin-grid")
    base = {
        "data": {"path": str(tiny_corpus), "vocab_size": 300},
        "model": dict(item.split("=", 1) for item in TINY_MODEL),
        "train": {
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "seq_len": 32,
            "eval_interval": 3,
            "eval_sequences": 8,
            "log_interval": 1,
            "mfu_probe": False,
        },
        "optim": {"warmup_steps": 2},
    }
    base["model"] = {k.split(".")[1]: int(v) for k, v in base["model"].items()}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "base": "base.yaml",
        "root": str(folder / "grid"),
        "plugins": [str(EXAMPLES / "scalenorm.py"), str(EXAMPLES / "ademamix.py"), str(EXAMPLES / "update_rms.py")],
        "set": {"train.steps": 6, "diagnostics.interval": 3, "optim.ademamix_warmup": 4},
        "axes": {"model.norm": NORMS, "optim.name": OPTIMS},
        "seeds": [0, 1],
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _cli("factorial", folder / "spec.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder / "grid"


# the grid's 12 cells take about 1.5 minutes on 2 cores: with -m slow; the default run covers
# the plugins in single runs (tests/test_plugins.py) and in the kill-and-resume below
@pytest.mark.slow
def test_the_grid_runs_every_cell_with_the_plugins_and_reports_them(grid):
    cells = sorted(p for p in grid.iterdir() if p.is_dir())
    assert len(cells) == 12
    for cell in cells:
        names = [p["name"] for p in json.loads((cell / "plugins.json").read_text())["plugins"]]
        assert names == ["scalenorm", "ademamix", "update_rms"], cell
        assert sorted(_update_rms(cell)) == [1, 2, 3, 4, 5, 6]  # every step
    config = yaml.safe_load((grid / "scalenorm-ademamix-s0" / "config.yaml").read_text())
    assert config["optim"]["ademamix_alpha"] == 5.0 and config["optim"]["ademamix_warmup"] == 4
    report = (grid / "report.md").read_text()
    for level in (*NORMS, *OPTIMS):
        assert f"{level}" in report
    assert "### Update-to-weight RMS ratio per matrix type (last diagnosed step) (`update_rms`)" in report
    table = report.split("(`update_rms`)")[1].split("\n\n")[1].splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == [c.name for c in cells]
    summary = json.loads((grid / "summary.json").read_text())
    assert [t["kind"] for t in summary["diagnostic_tables"]] == ["update_rms"]
    assert [(g["variant"], g["optim"]) for g in summary["gaps"]] == [("scalenorm", o) for o in OPTIMS]


@pytest.mark.slow
def test_the_report_needs_the_same_plugins(grid, tmp_path):
    line = _one_line(_cli("report", grid, "--out", tmp_path / "without"))
    assert "trained with plugin scalenorm" in line and "name it to report this run" in line
    proc = _cli("report", grid, "--out", tmp_path / "with", *PLUGIN_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "with" / "report.md").read_text() == (grid / "report.md").read_text()


@pytest.mark.slow
def test_the_plugin_norm_exports_and_loads_in_transformers(grid, tmp_path):
    transformers = pytest.importorskip("transformers")
    cell = grid / "scalenorm-ademamix-s0"
    out = tmp_path / "hf"
    proc = _cli("export", cell, "--format", "hf", "--out", out, *PLUGIN_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity gate passed" in proc.stderr
    assert (out / "normopt_plugin_scalenorm.py").read_text() == (EXAMPLES / "scalenorm.py").read_text()
    assert json.loads((out / "config.json").read_text())["norm"] == "scalenorm"
    load_plugins(ALL)
    try:
        from normopt.sample import load_run

        model = load_run(cell).model
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-5)
        assert type(hf.model.layers[0].attn_norm).__name__ == "ScaleNorm"
    finally:
        forget_all()


def test_a_killed_plugin_run_resumes_to_the_same_numbers(tmp_path, tiny_corpus):
    extra = ["model.norm=scalenorm", "optim.name=ademamix", "train.steps=12", "checkpoint.interval=3"]
    extra += ["train.dtype=float32", "optim.schedule=constant", "diagnostics.interval=0"]
    reference = tmp_path / "reference"
    proc = run_cli([*PLUGIN_ARGS, *tiny_run_args(reference, tiny_corpus, *extra)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    args = [*PLUGIN_ARGS, *tiny_run_args(run_dir, tiny_corpus, *extra)]
    killed = start(args)
    wait_for_step(killed, run_dir, 7)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # without its plugins, the run's own config is refused before the checkpoint is read
    assert "name its plugin with --plugin" in _one_line(run_cli(tiny_run_args(run_dir, tiny_corpus, *extra)))
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    for key in ("loss", "grad_norm", "eval_loss"):
        assert _metrics(run_dir, key) == _metrics(reference, key), key
    assert _update_rms(run_dir) == _update_rms(reference)


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_plugins(tmp_path, tiny_corpus):
    """FSDP2 shards ScaleNorm's scalar, AdEMAMix's three states and the update RMS sums:
    per-step losses agree with one process to 1e-5, the logged ratios to 1e-4 (relative)."""
    common = ["model.norm=scalenorm", "optim.name=ademamix", "train.dtype=float32", "train.steps=8"]
    single = tmp_path / "single"
    proc = run_cli([*PLUGIN_ARGS, *tiny_run_args(single, tiny_corpus, *common)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = tmp_path / "double"
    run_torchrun(REPO_ROOT / "train.py", 2, [*PLUGIN_ARGS, *tiny_run_args(double, tiny_corpus, *common)])
    reference, losses = _metrics(single, "loss"), _metrics(double, "loss")
    assert losses.keys() == reference.keys() and len(reference) == 8
    for step, loss in reference.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)
    assert reference[8] < reference[1] - 0.1  # it trained
    one, two = _update_rms(single), _update_rms(double)
    assert one.keys() == two.keys()
    for step in one:
        for name, ratio in one[step].items():
            assert two[step][name] == pytest.approx(ratio, rel=1e-4), (step, name)
