"""optim.muon_split_heads: per-head orthogonalisation of the attention projections.

The pure functions against heads orthogonalised one by one, Muon and NorMuon steps against
the formulas written out per head (float64), which matrices split under GQA, sliding-window,
MLA and MoE models, the torch param groups the builder makes, and the config key.
Tolerances: float64 NS, batched over heads or not, agrees to ~1e-15; 1e-12 leaves room for
the reassociation of batched kernels and nothing else.
"""

from __future__ import annotations

import json
import typing
from dataclasses import replace

import pytest
import torch

from normopt.config import Config, keys_with_role, load_config
from normopt.diagnostics.ns_spectrum import relative_singular_values, singular_value_quantiles
from normopt.errors import UserError
from normopt.factorial.spec import load_spec
from normopt.key_roles import MATH
from normopt.models.llama import build_model
from normopt.models.matrix_roles import SPLIT_HEADS_SETS, head_blocks_by_name, matrix_type
from normopt.models.norm_layer import NormConfig
from normopt.models.presets import PRESETS
from normopt.optim.builder import build_optimizers
from normopt.optim.config import OptimConfig
from normopt.optim.head_blocks import block_shape, merge_heads, split_heads
from normopt.optim.muon import Muon, NorMuon
from normopt.optim.muon_update import ns_matrices, orthogonalize
from normopt.optim.newton_schulz import newton_schulz, ns_flops
from normopt.optim.param_groups import describe_head_blocks
from normopt.report.cells.axes import write_experiment_file
from normopt.report.writer import write_report
from normopt.resume_policy import check_resume_compatible
from tests.conftest import REPO_ROOT, run_cli, tiny_run_args
from tests.test_factorial import _factorial, _spec
from tests.test_muon import QUINTIC, polar_poly, scale_of, toy
from tests.test_report_axes import by, mean, welch, write_cell

F64 = torch.float64


def heads_one_by_one(U: torch.Tensor, axis: str, heads: int, steps: int = 5) -> torch.Tensor:
    """Each head's block through NS on its own (no batching), concatenated back."""
    dim = -2 if axis == "rows" else -1
    blocks = U.split(U.shape[dim] // heads, dim=dim)
    return torch.cat([newton_schulz(b, steps, "quintic", dtype=F64) for b in blocks], dim=dim)


# ------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    "shape, axis, heads",
    [
        ((12, 8), "rows", 3),
        ((8, 12), "cols", 3),
        ((8, 8), "rows", 2),
        ((2, 12, 8), "rows", 4),
        ((2, 8, 12), "cols", 4),
    ],
)
def test_split_matrix_equals_heads_orthogonalised_separately(shape, axis, heads):
    U = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    O = orthogonalize(U, 5, "quintic", F64, layout=(axis, heads))
    assert O.shape == U.shape
    torch.testing.assert_close(O, heads_one_by_one(U, axis, heads), rtol=0, atol=1e-12)
    assert (O - orthogonalize(U, 5, "quintic", F64)).abs().max() > 1e-2  # not whole-matrix NS
    assert torch.equal(merge_heads(split_heads(U, (axis, heads)), (axis, heads)), U)


def test_block_shapes_and_ns_matrices():
    assert block_shape(12, 8, ("rows", 3)) == (4, 8) and block_shape(8, 12, ("cols", 3)) == (8, 4)
    assert block_shape(8, 12, None) == (8, 12)
    assert ns_matrices((12, 8), ("rows", 3)) == (3, 4, 8)
    assert ns_matrices((5, 8, 12), ("cols", 2)) == (10, 8, 6)  # a stack: experts x heads
    assert ns_matrices((8, 12)) == (1, 8, 12)


def _muon_reference(W0, grads, axis, heads, rule, lr=0.03, beta=0.9, wd=0.1, normuon=None):
    """Muon / NorMuon per head written out: NS of each head's block (SVD polynomial), one
    block's scale; NorMuon's v per row of the reassembled O, its rescale over the matrix."""
    W, m, v = W0.clone(), torch.zeros_like(W0), torch.zeros(W0.shape[0], dtype=F64)
    dim = -2 if axis == "rows" else -1
    for g in grads:
        m = beta * m + g
        u = g + beta * m
        O = torch.cat([polar_poly(b, QUINTIC) for b in u.split(u.shape[dim] // heads, dim=dim)], dim=dim)
        if normuon is not None:
            beta2, eps = normuon
            v = beta2 * v + (1 - beta2) * (O**2).mean(dim=1)
            O_hat = O / (v.sqrt() + eps)[:, None]
            O = O_hat * (torch.linalg.matrix_norm(O) / torch.linalg.matrix_norm(O_hat))
        W = W * (1 - lr * wd) - lr * scale_of(*block_shape(*W.shape, (axis, heads)), rule) * O
    return W, v


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize(
    "shape, axis, heads, rule",
    [
        ((12, 6), "rows", 3, "original"),
        ((6, 12), "cols", 3, "original"),
        ((6, 12), "cols", 2, "spectral"),
        ((12, 6), "rows", 4, "match_adamw"),
    ],
)
def test_muon_and_normuon_steps_follow_the_per_head_formula(cls, shape, axis, heads, rule):
    W0, grads = toy(shape, steps=3, seed=2)
    p = torch.nn.Parameter(W0.clone())
    extra = dict(beta2=0.9, eps=1e-8) if cls is NorMuon else {}
    opt = cls(
        [{"params": [p], "head_blocks": (axis, heads)}],
        lr=0.03,
        momentum=0.9,
        weight_decay=0.1,
        scale_rule=rule,
        ns_dtype=F64,
        **extra,
    )
    for g in grads:
        p.grad = g.clone()
        opt.step()
    W_ref, v_ref = _muon_reference(W0, grads, axis, heads, rule, normuon=(0.9, 1e-8) if cls is NorMuon else None)
    torch.testing.assert_close(p.detach(), W_ref, rtol=0, atol=1e-10)
    if cls is NorMuon:  # the state keeps its shape: one entry per row of the whole matrix
        torch.testing.assert_close(opt.state[p]["row_second_moment"], v_ref, rtol=0, atol=1e-12)
    count, rows, cols = ns_matrices(shape, (axis, heads))
    assert opt.ns_flops_per_step() == count * ns_flops(rows, cols, 5) != ns_flops(*shape, 5)


@pytest.mark.parametrize(
    "layout, message",
    [
        (("rows", 5), "5 heads do not divide the 12 rows"),
        (("cols", 0), "heads >= 1"),
        (("heads", 2), "axis in"),
        ("rows", "head_blocks must be"),
    ],
)
def test_bad_head_blocks_are_refused(layout, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(12, 8))], "head_blocks": layout}])


# --------------------------------------------------------- which matrices split


def _model(preset="debug", **shape):
    args = replace(PRESETS[preset], vocab_size=300, norm_config=NormConfig("rmsnorm"), n_layers=2, **shape)
    return build_model(args, "meta")


def _layouts(model, setting):
    """matrix type -> layout of layer 0's matrices that split."""
    return {matrix_type(n): v for n, v in head_blocks_by_name(model, setting).items() if n.startswith("layers.0.")}


@pytest.mark.parametrize("attention", ["gqa", "swa"])
def test_gqa_splits_queries_by_heads_and_keys_values_by_kv_heads(attention):
    model = _model(dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, attention=attention)
    q, kv, o = ("rows", 4), ("rows", 2), ("cols", 4)
    assert _layouts(model, "none") == {}
    assert _layouts(model, "qk") == {"attn.wq": q, "attn.wk": kv}
    assert _layouts(model, "qkv") == {"attn.wq": q, "attn.wk": kv, "attn.wv": kv}
    assert _layouts(model, "qkvo") == {"attn.wq": q, "attn.wk": kv, "attn.wv": kv, "attn.wo": o}
    assert len(head_blocks_by_name(model, "qkvo")) == 2 * 4  # every layer
    for name, layout in head_blocks_by_name(model, "qkvo").items():  # one block per head of head_dim
        assert block_shape(*dict(model.named_parameters())[name].shape, layout) in ((8, 32), (32, 8))


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_latent_attention_splits_up_projections_only(q_lora_rank):
    """MLA: the query up-projection (W_qb, or W_q without a query latent) by rows per head,
    W_kvb (each head's [k_nope | v] rows) once both k and v split, W_o by columns; the
    latent down-projections W_qa, W_kva never."""
    model = _model("debug-mla", q_lora_rank=q_lora_rank)
    heads = model.args.n_heads
    q = "attn.wq_b" if q_lora_rank else "attn.wq"
    assert _layouts(model, "qk") == {q: ("rows", heads)}
    assert _layouts(model, "qkv") == {q: ("rows", heads), "attn.wkv_b": ("rows", heads)}
    assert _layouts(model, "qkvo") == {q: ("rows", heads), "attn.wkv_b": ("rows", heads), "attn.wo": ("cols", heads)}
    wkv_b = dict(model.named_parameters())["layers.0.attn.wkv_b.weight"]
    a = model.args
    assert block_shape(*wkv_b.shape, ("rows", heads)) == (a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)


def test_experts_never_split_and_only_muon_matrices_carry_layouts():
    model = _model("debug-moe")
    assert {matrix_type(n) for n in head_blocks_by_name(model, "qkvo")} == {"attn.wq", "attn.wk", "attn.wv", "attn.wo"}
    cfg = load_config(None, ["optim.name=muon", "optim.muon_params=vo_ffn", "optim.muon_split_heads=qkvo"]).optim
    opt = next(o for o in build_optimizers(model, cfg).optimizers if isinstance(o, Muon))
    layouts = {g.get("head_blocks") for g in opt.param_groups}
    heads = model.args.n_heads
    assert layouts == {None, ("rows", model.args.n_kv_heads), ("cols", heads)}  # W_v, W_o; W_q, W_k on AdamW


def test_adamw_and_lion_ignore_the_setting():
    model = _model(dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    for name in ("adamw", "lion"):
        split = build_optimizers(model, load_config(None, [f"optim.name={name}", "optim.muon_split_heads=qkvo"]).optim)
        plain = build_optimizers(model, load_config(None, [f"optim.name={name}"]).optim)
        assert [g.names for g in split.groups] == [g.names for g in plain.groups]
        assert all(not g.head_blocks for g in split.groups)
        assert [{k: v for k, v in g.items() if k != "params"} for o in split.optimizers for g in o.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for o in plain.optimizers for g in o.param_groups
        ]


def test_builder_groups_by_layout_and_leaves_unsplit_runs_as_they_were():
    model = _model(dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    base = ["optim.name=normuon", "optim.ns_steps_per_layer=layers.0.*=7"]
    plain = next(o for o in build_optimizers(model, load_config(None, base).optim).optimizers if isinstance(o, NorMuon))
    assert all("head_blocks" not in g for g in plain.param_groups)  # checkpoints keep their entries
    split = next(
        o
        for o in build_optimizers(model, load_config(None, [*base, "optim.muon_split_heads=qk"]).optim).optimizers
        if isinstance(o, NorMuon)
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    by_layout = {}
    for g in split.param_groups:
        for p in g["params"]:
            by_layout[name_of[id(p)]] = (g.get("head_blocks"), g["ns_steps"])
    assert by_layout["layers.0.attn.wq.weight"] == (("rows", 4), 7)
    assert by_layout["layers.1.attn.wk.weight"] == (("rows", 2), 5)
    assert by_layout["layers.1.attn.wv.weight"] == (None, 5)
    assert sorted(by_layout) == sorted(n for g in plain.param_groups for n in (name_of[id(p)] for p in g["params"]))


# ------------------------------------------------------------------ the config key


def test_config_key_is_math_and_lists_every_set():
    assert typing.get_args(typing.get_type_hints(OptimConfig)["muon_split_heads"]) == tuple(SPLIT_HEADS_SETS)
    assert "optim.muon_split_heads" in keys_with_role(MATH)
    assert load_config(None).optim.muon_split_heads == "none"
    with pytest.raises(UserError, match="optim.muon_split_heads: 'qko' is not one of"):
        load_config(None, ["optim.muon_split_heads=qko"])
    saved, current = Config(), load_config(None, ["optim.muon_split_heads=qk"])
    with pytest.raises(UserError, match="optim.muon_split_heads: the run being resumed used 'none'"):
        check_resume_compatible(saved, current)


def test_start_up_line_names_the_split_matrices():
    model = _model(dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    groups = build_optimizers(model, load_config(None, ["optim.name=muon", "optim.muon_split_heads=qkvo"]).optim).groups
    assert describe_head_blocks(groups) == "attn.wq rows/4, attn.wk rows/2, attn.wv rows/2, attn.wo cols/4 (8 matrices)"
    assert describe_head_blocks(build_optimizers(model, load_config(None, ["optim.name=muon"]).optim).groups) is None


# ---------------------------------------------------------- a report axis over it

SPLIT = "optim.muon_split_heads"


def test_report_reads_norm_x_optimizer_per_split_setting(tmp_path):
    """configs/factorial/split_heads_cpu.yaml's axes: the split is a stratum, one norm x
    optimizer analysis per setting (synthetic finals: Derf x Muon interaction 0.1 whole,
    -0.2 per head)."""
    effect = {"none": 0.1, "qkvo": -0.2}
    for split, extra in effect.items():
        for norm in ("rmsnorm", "derf"):
            for optim in ("adamw", "muon"):
                base = 3.0 + 0.05 * (norm == "derf") - 0.2 * (optim == "muon")
                for seed, noise in enumerate((0.0, 0.02)):
                    final = base + extra * (norm == "derf" and optim == "muon") + noise
                    write_cell(
                        tmp_path,
                        {"model.norm": norm, "optim.name": optim, SPLIT: split},
                        seed,
                        final,
                        {"norm": norm, "optim": optim, SPLIT: split},
                    )
    spec = load_spec(REPO_ROOT / "configs" / "factorial" / "split_heads_cpu.yaml")[0]
    write_experiment_file(tmp_path, spec["axes"], spec.get("report"))
    summary = write_report(tmp_path)
    assert summary["settings"]["axes"]["strata"] == [SPLIT]
    for split, expected in effect.items():
        item = by(summary["interactions"], variant="derf", optim="muon", stratum={SPLIT: split})
        assert item["value"] == pytest.approx(expected, abs=1e-9)
    text = (tmp_path / "report.md").read_text()
    assert f"### {SPLIT}=none" in text and f"### {SPLIT}=qkvo" in text


def test_component_ablation_across_split_setting(tmp_path):
    """The component ablation with the split as its across axis (the change the README gives
    for ablation_cpu.yaml): gap of each Muon subset to all, whole vs per head, and whether
    per-head NS changes it (interaction, Welch t by hand)."""
    finals = {
        ("all", "none"): (2.80, 2.84),
        ("qk", "none"): (3.01, 3.05),
        ("all", "qkvo"): (2.78, 2.80),
        ("qk", "qkvo"): (2.90, 2.93),
    }
    for (subset, split), values in finals.items():
        for seed, final in enumerate(values):
            write_cell(
                tmp_path,
                {"optim.muon_params": subset, SPLIT: split, "optim.name": "muon"},
                seed,
                final,
                {"optim.muon_params": subset, SPLIT: split},
            )
    write_experiment_file(
        tmp_path,
        {"optim.muon_params": ["all", "qk"], SPLIT: ["none", "qkvo"]},
        {"baseline": "all", "across": SPLIT, "reference": "none"},
    )
    summary = write_report(tmp_path)
    axes = summary["settings"]["axes"]
    assert (axes["compare"], axes["across"], axes["reference"]) == ("optim.muon_params", SPLIT, "none")
    value, half = welch(finals["qk", "qkvo"], finals["all", "qkvo"])
    gap = by(summary["gaps"], variant="qk", optim="qkvo")
    assert gap["value"] == pytest.approx(value, abs=1e-9)
    assert (gap["ci95"][1] - gap["ci95"][0]) / 2 == pytest.approx(half, rel=1e-6)
    cells = [finals["qk", "qkvo"], finals["all", "qkvo"], finals["qk", "none"], finals["all", "none"]]
    item = by(summary["interactions"], variant="qk", optim="qkvo")
    assert item["value"] == pytest.approx(mean(cells[0]) - mean(cells[1]) - mean(cells[2]) + mean(cells[3]), abs=1e-9)


@pytest.mark.slow  # ~1 min on 2 cores; the report tests above and test_resume's runs carry the claims
def test_tiny_grid_over_the_split_setting(tmp_path, tiny_corpus):
    """A real 4-step grid optim.name x optim.muon_split_heads: AdamW ignores the setting (its
    two cells log the same losses bit for bit), Muon's per-head cell trains differently,
    and the report reads the split as its across axis."""
    spec = _spec(
        tmp_path,
        tiny_corpus,
        axes={"optim.name": ["adamw", "muon"], SPLIT: ["none", "qkvo"]},
        arms={},
        report={"compare": "optim.name", "baseline": "adamw", "across": SPLIT, "reference": "none"},
    )
    proc = _factorial(spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "grid"
    losses = {
        name: [json.loads(line).get("loss") for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("none-adamw-s0", "qkvo-adamw-s0", "none-muon-s0", "qkvo-muon-s0")
    }
    assert losses["none-adamw-s0"] == losses["qkvo-adamw-s0"]
    assert losses["none-muon-s0"] != losses["qkvo-muon-s0"]
    assert (
        "per-head Newton-Schulz (optim.muon_split_heads=qkvo): attn.wq rows/4"
        in (root / "qkvo-muon-s0" / "train.log").read_text()
    )
    summary = json.loads((root / "summary.json").read_text())
    assert summary["settings"]["axes"]["across"] == SPLIT
    assert {item["optim"] for item in summary["gaps"]} == {"none", "qkvo"}


# ------------------------------------------------------------ the NS spectrum record


def test_spectrum_of_a_stack_pools_each_matrix_on_its_own():
    g = torch.Generator().manual_seed(3)
    blocks = torch.randn(3, 4, 8, generator=g) * torch.tensor([1.0, 10.0, 100.0])[:, None, None]
    pooled = [torch.cat(v).sort().values for v in zip(*(relative_singular_values(b) for b in blocks))]
    for got, expected in zip(relative_singular_values(blocks), pooled):
        assert torch.equal(got, expected)
    assert relative_singular_values(blocks)[1].max() <= 1.0 and len(pooled[1]) == 12


def test_run_logs_the_spectrum_of_the_head_blocks(tmp_path, tiny_corpus):
    """No Nesterov, so NS receives the momentum the checkpoint holds: the logged quantiles of
    a split W_q are those of its head blocks, each normalised on its own."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    run_dir = tmp_path / "run"
    proc = run_cli(
        tiny_run_args(
            run_dir,
            tiny_corpus,
            "optim.name=muon",
            "optim.nesterov=false",
            "optim.muon_split_heads=qk",
            "train.dtype=float32",
            "train.steps=3",
            "diagnostics.interval=3",
            "checkpoint.interval=3",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["kind"] == "ns_spectrum" and r["step"] == 3)
    ns = record["matrices"]
    names = ("layers.0.attn.wq.weight", "layers.0.attn.wv.weight")
    checkpoint = run_dir / "checkpoints" / "step_00000003"
    momenta = _load_state_dict_from_keys(
        {f"optim.state.{n}.momentum_buffer" for n in names}, checkpoint_id=str(checkpoint)
    )["optim"]["state"]
    for name, layout in zip(names, (("rows", 4), None)):
        assert ns[name].get("head_blocks") == (None if layout is None else list(layout))
        expected = singular_value_quantiles(
            split_heads(momenta[name]["momentum_buffer"].float(), layout), record["levels"]
        )
        assert ns[name]["sv_rel_fro"] == pytest.approx(expected["sv_rel_fro"], rel=1e-4, abs=1e-7), name
