"""The interaction against model size: the weighted fit of each interaction against
ln(parameters) on synthetic grids with known per-size interactions (slope, interval and verdict
recomputed here by hand), the tokens-per-parameter statement, ``train.tokens_per_param``'s
arithmetic and refusals, the norm-free parameter count, and the two ladder specs' dry runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from normopt.cli import main
from normopt.config import (
    REPO_ROOT,
    Config,
    load_config,
    resolve_config,
    size_parameters,
    tokens_per_param_steps,
)
from normopt.errors import UserError
from normopt.factorial.spec import load_spec
from normopt.models.norm_layer import NormConfig
from normopt.models.presets import (
    PRESETS,
    count_parameters,
    count_parameters_without_norms,
)
from normopt.report.cells.axes import (
    axes_from_levels,
    read_experiment_file,
    write_experiment_file,
)
from normopt.report.cells.cell_reading import discover_cells
from normopt.report.render.model_size import size_section
from normopt.report.stats.line_fit import FLAT, GROWS, NOT_TESTED, SHRINKS, weighted_line_fit
from normopt.report.stats.model_size import size_analysis
from normopt.report.stats.summary import build_summary
from normopt.report.writer import write_report
from tests.test_report import t95_by_integration

DIM = "model.dim"
DEMO = REPO_ROOT / "configs" / "demo.yaml"
BASE_LOSS = {("rmsnorm", "adamw"): 3.0, ("rmsnorm", "muon"): 2.9, ("derf", "adamw"): 3.2, ("derf", "muon"): 3.1}


def metrics(final: float, steps: int) -> str:
    lines = [{"step": 0, "eval_loss": 9.0}]
    lines += [
        {
            "step": s,
            "loss": final + 5 * math.exp(-s / 15),
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens": s * 4096,
            "tokens_per_s": 1e4,
        }
        for s in range(10, steps + 1, 10)
    ]
    lines.append({"step": steps, "eval_loss": final})
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def write_size_grid(
    root: Path, dims, interactions, half_spreads, *, seeds=(0, 1), steps=None, ratio=None, report=None
) -> Path:
    """RMSNorm / Derf x AdamW / Muon at each width: every group is mean +/- d (one cell per
    seed), so its sample std is d sqrt(2), its standard error d, and the Derf x Muon interaction
    at dims[i] is exactly interactions[i] with se 2 d_i; ``steps`` per dim (default 100)."""
    for i, dim in enumerate(dims):
        for (norm, optim), base in BASE_LOSS.items():
            mean = base + (interactions[i] if (norm, optim) == ("derf", "muon") else 0.0)
            for j, seed in enumerate(seeds):
                offset = 0.0 if len(seeds) == 1 else (-half_spreads[i] if j == 0 else half_spreads[i])
                name = f"{norm}-{optim}-{dim}-s{seed}"
                folder = root / name
                folder.mkdir(parents=True)
                cfg = Config().to_dict()
                cfg["model"].update(norm=norm, dim=dim)
                cfg["optim"]["name"] = optim
                cfg["train"].update(
                    seed=seed,
                    steps=100 if steps is None else steps[i],
                    tokens_per_param=0.0 if ratio is None else ratio,
                )
                (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
                (folder / "cell.json").write_text(
                    json.dumps(
                        {"name": name, "seed": seed, "arm": None, "coords": {"norm": norm, "optim": optim, DIM: dim}}
                    )
                )
                (folder / "metrics.jsonl").write_text(metrics(mean + offset, cfg["train"]["steps"]))
    write_experiment_file(
        root, {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"], DIM: list(dims)}, report
    )
    return root


def size_summary(root: Path) -> dict:
    """The report's summary with its size section, without the plots (write_report draws them)."""
    cells, axes = discover_cells(root), read_experiment_file(root)
    summary = build_summary(cells, axes=axes)
    summary["model_size"] = size_analysis(cells, summary, axes)
    return summary


def n_of(dim: int) -> int:
    return size_parameters(load_config(DEMO, [f"model.dim={dim}", "data.vocab_size=8192"]))


def fit_by_hand(x, y, w):
    """Weighted least squares from the normal equations (X'WX) beta = X'Wy, with
    cov(beta) = s^2 (X'WX)^-1 and s^2 = sum w r^2 / (k - 2)."""
    sw, swx, swxx = sum(w), sum(a * b for a, b in zip(w, x)), sum(a * b * b for a, b in zip(w, x))
    swy, swxy = sum(a * c for a, c in zip(w, y)), sum(a * b * c for a, b, c in zip(w, x, y))
    det = sw * swxx - swx * swx
    intercept, slope = (swxx * swy - swx * swxy) / det, (sw * swxy - swx * swy) / det
    k = len(x)
    s2 = sum(a * (c - intercept - slope * b) ** 2 for a, b, c in zip(w, x, y)) / (k - 2)
    se = math.sqrt(s2 * sw / det)
    half = t95_by_integration(k - 2) * se
    return intercept, slope, se, (slope - half, slope + half)


DIMS = (64, 96, 128, 192)
SPREADS = (0.004, 0.006, 0.005, 0.008)  # se of each size's interaction = 2 d


@pytest.mark.parametrize(
    "true_slope, wiggle, verdict",
    [
        (0.2, (0.0, 0.004, -0.004, 0.002), GROWS),
        (-0.2, (0.0, 0.004, -0.004, 0.002), SHRINKS),
        (0.0, (0.03, -0.03, -0.03, 0.03), FLAT),
    ],
)
def test_fitted_slope_interval_and_verdict_match_a_hand_computation(tmp_path, true_slope, wiggle, verdict):
    x = [math.log(n_of(d)) for d in DIMS]
    values = [0.1 + true_slope * (xi - x[0]) + e for xi, e in zip(x, wiggle)]
    root = write_size_grid(tmp_path, DIMS, values, SPREADS)
    summary = write_report(root) if verdict == GROWS else size_summary(root)
    section = summary["model_size"]
    assert section["axes"] == [DIM]
    (fit,) = section["fits"]
    assert (fit["variant"], fit["optim"], fit["k"], fit["weights"], fit["df"]) == (
        "derf",
        "muon",
        4,
        "inverse variance",
        2,
    )
    w = [1 / (2 * d) ** 2 for d in SPREADS]
    intercept, slope, se, ci = fit_by_hand(x, values, w)
    assert fit["values"] == pytest.approx(values, abs=1e-9)
    assert fit["se"] == pytest.approx([2 * d for d in SPREADS], rel=1e-6)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-6, abs=1e-9)
    assert fit["slope"] == pytest.approx(slope, rel=1e-6, abs=1e-9)
    assert fit["slope_se"] == pytest.approx(se, rel=1e-6)
    assert fit["ci95"] == pytest.approx(ci, rel=1e-4, abs=1e-7)
    assert fit["slope_per_doubling"] == pytest.approx(slope * math.log(2))
    assert fit["verdict"] == verdict
    assert (ci[0] > 0, ci[1] < 0) == (verdict == GROWS, verdict == SHRINKS)  # the design holds
    assert abs(slope - true_slope) < 0.02 if verdict != FLAT else ci[0] < 0 < ci[1]
    assert fit["family"] == "exploratory"
    sizes = section["sizes"]
    assert [s["size"] for s in sizes] == [{DIM: str(d)} for d in DIMS]  # smallest to largest
    # the per-size tables follow the spec's levels, not the folder names (128 sorts before 64)
    assert [i["stratum"] for i in summary["interactions"]] == [{DIM: str(d)} for d in DIMS]
    assert [s["parameters"] for s in sizes] == [n_of(d) for d in DIMS]
    assert [s["tokens"] for s in sizes] == [100 * 16 * 256] * 4
    words = {GROWS: "grows with size", SHRINKS: "shrinks with size", FLAT: "cannot be told apart from flat"}
    assert words[verdict] in fit["sentence"]
    if verdict == GROWS:
        report = (tmp_path / "report.md").read_text()
        assert "## Interaction against model size" in report and words[verdict] in report.split("## Answer")[1]
        assert "| size | parameters N | ln N | steps | tokens T | T / N |" in report
        assert Path(summary["files"]["model_size"]).is_file() and "![model_size](interaction_vs_size.png)" in report


def test_an_exact_line_is_recovered_with_zero_scatter():
    fit = weighted_line_fit([0.0, 1.0, 3.0], [0.5, 0.75, 1.25], [0.1, 0.2, 0.1])
    assert fit["slope"] == pytest.approx(0.25) and fit["intercept"] == pytest.approx(0.5)
    assert fit["slope_se"] == pytest.approx(0.0, abs=1e-12) and fit["df"] == 1
    x_w = (0 * 100 + 1 * 25 + 3 * 100) / 225  # weights 1 / se^2 = 100, 25, 100
    assert fit["slope_se_from_seeds"] == pytest.approx(
        1 / math.sqrt(sum(w * (x - x_w) ** 2 for w, x in zip((100, 25, 100), (0.0, 1.0, 3.0))))
    )
    assert weighted_line_fit([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])["slope"] is None  # one N: no slope


def test_two_sizes_leave_the_slope_untested_and_give_the_welch_difference(tmp_path):
    dims, values, spreads = (64, 128), (0.05, 0.15), (0.01, 0.02)
    summary = size_summary(write_size_grid(tmp_path, dims, values, spreads))
    (fit,) = summary["model_size"]["fits"]
    x = [math.log(n_of(d)) for d in dims]
    assert fit["slope"] == pytest.approx((values[1] - values[0]) / (x[1] - x[0]))
    assert (fit["df"], fit["slope_se"], fit["ci95"], fit["p"], fit["verdict"]) == (0, None, None, None, NOT_TESTED)
    diff = fit["difference"]
    # 8 independent groups, each with standard error d_i: se^2 = 4 d_1^2 + 4 d_2^2, Welch df
    # (sum w)^2 / sum(w^2 / (n - 1)) with n = 2
    weights = [spreads[0] ** 2] * 4 + [spreads[1] ** 2] * 4
    df = sum(weights) ** 2 / sum(w * w for w in weights)
    se = math.sqrt(sum(weights))
    assert diff["value"] == pytest.approx(0.10) and diff["se"] == pytest.approx(se) and diff["df"] == pytest.approx(df)
    assert diff["ci95"] == pytest.approx(
        (0.10 - t95_by_integration(df) * se, 0.10 + t95_by_integration(df) * se), rel=1e-4
    )
    assert "not tested" in fit["sentence"] and "k − 2 = 0" in fit["sentence"]


def test_one_seed_weighs_every_size_the_same(tmp_path):
    dims, values = (64, 96, 128), (0.1, 0.3, 0.2)
    summary = size_summary(write_size_grid(tmp_path, dims, values, (0, 0, 0), seeds=(0,)))
    (fit,) = summary["model_size"]["fits"]
    x = [math.log(n_of(d)) for d in dims]
    _, slope, se, ci = fit_by_hand(x, list(values), [1.0, 1.0, 1.0])
    assert fit["weights"] == "equal" and fit["df"] == 1
    assert fit["slope"] == pytest.approx(slope) and fit["slope_se"] == pytest.approx(se)
    assert fit["ci95"] == pytest.approx(ci, rel=1e-4)
    assert fit["slope_se_from_seeds"] is None and "equal weights" in fit["sentence"]


def test_tokens_per_parameter_are_named_when_they_change_and_when_held(tmp_path):
    dims = (64, 96, 128)
    changing = size_summary(write_size_grid(tmp_path / "a", dims, (0.1, 0.1, 0.1), (0.01,) * 3))
    (tokens,) = changing["model_size"]["tokens_per_param"]
    ratios = [100 * 16 * 256 / n_of(d) for d in dims]
    assert tokens["held"] == "no" and [r["ratio"] for r in tokens["ratios"]] == pytest.approx(ratios)
    assert tokens["spread"] == pytest.approx(ratios[0] / ratios[-1])
    assert "change with size" in tokens["sentence"] and "train.tokens_per_param" in tokens["sentence"]
    assert "Tokens per parameter change with size" in "\n".join(size_section(changing))

    steps = [
        load_config(DEMO, [f"model.dim={d}", "train.seq_len=256", "train.tokens_per_param=0.5"]).train.steps
        for d in dims
    ]
    held = size_summary(write_size_grid(tmp_path / "b", dims, (0.1, 0.1, 0.1), (0.01,) * 3, steps=steps, ratio=0.5))
    (tokens,) = held["model_size"]["tokens_per_param"]
    assert tokens["held"] == "setting" and tokens["setting"] == 0.5
    assert all(0.5 <= r["ratio"] < 0.5 + 16 * 256 / r["parameters"] for r in tokens["ratios"])
    assert "held fixed by train.tokens_per_param = 0.5" in tokens["sentence"]
    assert [s["steps"] for s in held["model_size"]["sizes"]] == [[s] for s in steps]


def test_which_axes_are_sizes():
    levels = {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"], "model.preset": ["124m", "1b"]}
    assert axes_from_levels(levels).size_keys == ("model.preset",)
    assert axes_from_levels(levels, {"size": "none"}).size_keys == ()
    assert axes_from_levels({**levels, "data.path": ["a", "b"]}, {"size": ["data.path"]}).size_keys == ("data.path",)
    # a preset axis compared or across (mla_moe_cpu.yaml) is no size axis
    assert (
        axes_from_levels(
            {"model.preset": ["debug", "debug-mla"], "optim.name": ["adamw", "muon"]},
            {"compare": "optim.name", "across": "model.preset"},
        ).size_keys
        == ()
    )
    with pytest.raises(UserError, match="report.size: 'model.norm' is the compared axis"):
        axes_from_levels(levels, {"size": "model.norm"})
    with pytest.raises(UserError, match="is not an axis"):
        axes_from_levels(levels, {"size": "model.dim"})


def test_report_size_none_leaves_the_section_out(tmp_path):
    summary = size_summary(write_size_grid(tmp_path, (64, 96), (0.1, 0.2), (0.01, 0.01), report={"size": "none"}))
    assert summary["model_size"] is None and size_section(summary) == []
    assert len(summary["interactions"]) == 2  # the per-size interactions stay, as strata


# --------------------------------------------------------------------------- train.tokens_per_param


def test_tokens_per_param_sets_the_steps():
    cfg, origins = resolve_config(DEMO, ["data.vocab_size=4096", "model.dim=64", "train.tokens_per_param=0.1"])
    # N by hand: embedding and untied head 2 V d, 4 blocks of 2 d^2 + 2 d (2 KV heads x 32) + 3 d 512
    n = 2 * 4096 * 64 + 4 * (2 * 64 * 64 + 2 * 64 * 2 * 32 + 3 * 64 * 512)
    assert size_parameters(cfg) == n == 983_040
    assert cfg.train.steps == math.ceil(n * 0.1 / (16 * 128)) == 48 == tokens_per_param_steps(cfg)
    assert origins["train.steps"] == "derived"  # demo.yaml's 300 replaced
    derf = load_config(DEMO, ["data.vocab_size=4096", "model.dim=64", "train.tokens_per_param=0.1", "model.norm=derf"])
    assert derf.train.steps == 48  # norm weights are not counted: every norm of a size trains alike
    assert load_config(DEMO, ["train.tokens_per_param=0"]).train.steps == 300


def test_tokens_per_param_refuses_a_disagreeing_steps(tmp_path):
    with pytest.raises(
        UserError,
        match=r"train.steps: 5 disagrees with train.tokens_per_param=0.1, which gives "
        r"48 steps \(983,040 parameters x 0.1 / 2,048 tokens per step\)",
    ):
        load_config(DEMO, ["data.vocab_size=4096", "model.dim=64", "train.tokens_per_param=0.1", "train.steps=5"])
    assert (
        load_config(
            DEMO, ["data.vocab_size=4096", "model.dim=64", "train.steps=48", "train.tokens_per_param=0.1"]
        ).train.steps
        == 48
    )  # agreeing is fine
    both = tmp_path / "both.yaml"
    both.write_text(
        yaml.safe_dump(
            {"data": {"vocab_size": 4096}, "model": {"dim": 64}, "train": {"steps": 10, "tokens_per_param": 0.1}}
        )
    )
    with pytest.raises(UserError, match="train.steps: 10 disagrees"):
        load_config(both)
    ratio = tmp_path / "ratio.yaml"
    ratio.write_text(
        yaml.safe_dump(
            {"data": {"vocab_size": 4096}, "model": {"dim": 64}, "train": {"tokens_per_param": 0.1, "seq_len": 128}}
        )
    )
    assert load_config(ratio).train.steps == 48
    with pytest.raises(UserError, match="train.steps: 10 disagrees"):  # the ratio in the file, steps over it
        load_config(ratio, ["train.steps=10"])
    with pytest.raises(UserError, match="train.tokens_per_param: must be >= 0"):
        load_config(DEMO, ["train.tokens_per_param=-1"])


def test_tuning_runs_keep_their_own_horizon_under_tokens_per_param(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(DEMO),
                "root": str(tmp_path / "grid"),
                "set": {"train.tokens_per_param": 0.1, "data.vocab_size": 4096, "model.dim": 64},
                "axes": {"model.norm": ["rmsnorm", "derf"], "optim.name": ["adamw", "muon"]},
                "seeds": [0],
                "tune": {"key": "optim.lr", "values": [1e-3, 3e-3], "seeds": [100], "steps": 12},
            }
        )
    )
    _, base, cells = load_spec(spec)
    assert {load_config(base, c.overrides).train.steps for c in cells} == {48}
    from normopt.factorial.tuning import read_tune_section, tuning_cells

    tune = read_tune_section(yaml.safe_load(spec.read_text()), spec)
    assert {load_config(base, r.overrides).train.steps for r in tuning_cells(cells, tune, tmp_path)} == {12}


def test_the_norm_free_count_is_the_same_for_every_norm():
    for preset in ("debug", "debug-mla", "124m", "1b"):
        args = replace(PRESETS[preset], vocab_size=4096)
        counts = {
            count_parameters_without_norms(replace(args, norm_config=NormConfig(norm), embed_scale=scale))
            for norm in ("rmsnorm", "dyt", "derf", "derf_ema")
            for scale in (None, 13.0)
        }
        assert len(counts) == 1
        # RMSNorm (a gain per feature): 2 per block and the final one, and MLA's latent norms
        latent = args.n_layers * (args.q_lora_rank + args.kv_lora_rank) if args.attention == "mla" else 0
        rms = replace(args, norm_config=NormConfig("rmsnorm"), embed_scale=None)
        assert counts.pop() == count_parameters(rms) - (2 * args.n_layers + 1) * args.dim - latent


# --------------------------------------------------------------------------- the ladder specs


@pytest.mark.parametrize(
    "spec, steps, total",
    [
        ("size_ladder_cpu.yaml", {"64": 48, "96": 75, "128": 100}, "cost: 24 runs, 1784 steps"),
        ("size_ladder_gpu.yaml", {"124m": 4800, "350m": 13360, "1b": 39680}, "cost: 24 runs, 462720 steps"),
    ],
)
def test_the_ladder_specs_dry_run(spec, steps, total, capsys):
    path = REPO_ROOT / "configs" / "factorial" / spec
    assert main(["factorial", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert total in out
    loaded, base, cells = load_spec(path)
    size_key = next(k for k in loaded["axes"] if k in ("model.dim", "model.preset"))
    for cell in cells:
        cfg = load_config(base, cell.overrides)
        assert cfg.train.steps == steps[str(cell.settings[size_key])]
        tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.train.seq_len
        ratio = loaded["set"]["train.tokens_per_param"]
        assert ratio <= tokens / size_parameters(cfg) < ratio * 1.01
    assert axes_from_levels(loaded["axes"], loaded.get("report")).size_keys == (size_key,)
