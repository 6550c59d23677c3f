"""HSDP (``train.dp_replicate`` x ``train.dp_shard``): exactness on real torchrun gloo ranks.

* Optimizer: Muon and NorMuon on 4 ranks as 2 x 2 (2 replicas of 2 shards) and 1 x 4
  equal one process bit for bit (torch.equal), on every rank, so the replicas agree bit for
  bit too; each shard group computes each NS job once (``tests/workers/hsdp_worker.py``).
* Trainer: a 2 x 2 run follows the one-process loss curve to 1e-5 (fp32; only the order of
  gradient summation differs), with the same clipped gradient norm and diagnostics; its
  checkpoint resumes on 1 x 4 and on one process (DCP reshards) on the same curve.
* A layout that does not fit the ranks is refused with one line and status 2, before any
  rank starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from normopt.config import check_world_size, load_config
from normopt.errors import UserError
from normopt.parallel.mesh_shape import data_parallel_shape
from tests.conftest import run_cli, tiny_run_args
from tests.processes import train_in_process
from tests.test_distributed_training import _assert_same_diagnostics, _assert_same_loss_curve, _records
from tests.torchrun import REPO_ROOT, run_torchrun
from tests.workers.hsdp_worker import REPLICATED_TOO, RUNS, math_key
from tests.workers.muon_worker import CASES, VARIANTS, build_model

WORKER = Path(__file__).parent / "workers" / "hsdp_worker.py"


@pytest.fixture(scope="module")
def optimizer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp_muon") / "results.pt"
    run_torchrun(WORKER, 4, [str(out)], timeout=400)
    return torch.load(out, weights_only=False)


def test_hsdp_and_fsdp_muon_and_normuon_equal_one_process_on_every_rank(optimizer_results):
    results = optimizer_results
    assert results["layouts"] == [(2, 2), (1, 4)]
    assert {key[0] for key in results["fsdp"]} == {(2, 2), (1, 4)}
    replicated = sum(1 for case, _, variant in RUNS if variant in REPLICATED_TOO and case == "uneven")
    assert len(results["fsdp"]) == 2 * 2 * (len(RUNS) + replicated)  # layouts x optimizers x runs and ns_modes
    for (layout, case, opt, source, mode, variant), per_rank in results["fsdp"].items():
        reference = results["reference"][(case, opt, source, math_key(variant))]
        assert len(per_rank) == 4
        for rank, params in enumerate(per_rank):  # every replica's copy, not only rank 0's
            assert params.keys() == reference.keys()
            for name, ref in reference.items():
                diff = (params[name] - ref).abs().max().item()
                assert torch.equal(params[name], ref), (
                    f"{layout} rank {rank} {case}/{opt}/{source}/{mode}/{variant} {name}: max diff {diff}"
                )
    # not vacuous: the reference moved every matrix away from its initialization
    for (case, opt, source, _), reference in results["reference"].items():
        initial = dict(build_model(case, seed=0).named_parameters())
        for name, ref in reference.items():
            assert (ref - initial[name].detach()).abs().max() > 1e-3, (case, opt, source, name)


def _jobs_per_step(results, key) -> list[tuple[int, ...]]:
    """(rank 0, ..., rank 3) NS jobs computed at each step of run ``key``."""
    return [tuple(step["jobs"] for step in ranks) for ranks in zip(*results["exchange"][key])]


def test_each_shard_group_computes_each_ns_job_once(optimizer_results):
    """A shard group is S consecutive ranks (2 x 2: {0, 1} and {2, 3}; 1 x 4: all four).
    Distributed NS: each group computes every job of the step exactly once (a row-block
    team of min(3, S) ranks: once per member), and both replicas follow the same plan.
    Replicated NS: every rank computes every job."""
    results = optimizer_results
    for key in results["exchange"]:
        (replicate, shard), case, _, _, mode, variant = key
        jobs = 4 if variant == "batched" else len(CASES[case])  # "repeated" in batches of 2: 4 jobs
        team = min(VARIANTS[variant].get("ns_row_blocks", 1), shard)
        for counts in _jobs_per_step(results, key):
            groups = [counts[g * shard : (g + 1) * shard] for g in range(replicate)]
            if mode == "replicated":
                assert counts == (jobs,) * 4, (key, counts)
                continue
            assert all(group == groups[0] for group in groups), (key, counts)
            assert sum(groups[0]) == jobs * team, (key, counts)


# ---------------------------------------------------------------- the trainer on 2 x 2

COMMON = [
    "optim.name=normuon",
    "model.norm=derf",
    "train.dtype=float32",
    "train.steps=8",
    "optim.lr=0.02",
    "diagnostics.interval=4",
    "checkpoint.interval=4",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus) -> dict[str, Path]:
    """One process and 2 x 2 HSDP ranks, 8 steps of the same config (checkpoints at 4 and 8)."""
    root = tmp_path_factory.mktemp("hsdp_train")
    single, hsdp = root / "single", root / "hsdp"
    proc = run_cli(tiny_run_args(single, tiny_corpus, *COMMON))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_torchrun(REPO_ROOT / "train.py", 4, tiny_run_args(hsdp, tiny_corpus, *COMMON, "train.dp_replicate=2"))
    assert "HSDP 2 replicas x 2 shards" in proc.stdout, proc.stdout[-2000:]
    return {"single": single, "hsdp": hsdp, "corpus": tiny_corpus}


def test_hsdp_training_matches_one_process(trained):
    """NorMuon + Derf, fp32: per-step losses and the clipped global gradient norm (which
    must count each replicated shard once) agree to 1e-5, and so do the diagnostics
    (power iteration summed over a shard group, NS spectra of gathered matrices)."""
    single, hsdp = trained["single"], trained["hsdp"]
    _assert_same_loss_curve(single, hsdp)
    norms, ref_norms = _records(hsdp, "grad_norm"), _records(single, "grad_norm")
    assert norms.keys() == ref_norms.keys()
    for step, ref in ref_norms.items():
        assert abs(norms[step] - ref) <= 1e-5 * max(1.0, ref), (step, norms[step], ref)
    _assert_same_diagnostics(single, hsdp)


@pytest.mark.parametrize("nproc", [pytest.param(4, marks=pytest.mark.slow), 1], ids=["1x4", "1process"])
def test_hsdp_checkpoint_resumes_on_another_layout(trained, tmp_path, nproc):
    """The 2 x 2 run's step-4 checkpoint, resumed on 1 x 4 FSDP ranks and on one process:
    DCP reshards the (Replicate, Shard(0)) tensors and steps 5-8 follow the same curve."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(trained["hsdp"], run_dir)
    args = tiny_run_args(run_dir, trained["corpus"], *COMMON, "checkpoint.resume=4")
    if nproc == 1:
        proc = run_cli(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        proc = run_torchrun(REPO_ROOT / "train.py", nproc, args)
    assert "HSDP" not in proc.stdout and "resum" in proc.stdout.lower(), proc.stdout[-2000:]
    resumed, reference = _records(run_dir, "loss"), _records(trained["single"], "loss")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(resumed[step] - reference[step]) < 1e-5, (step, resumed[step], reference[step])


# ---------------------------------------------------------------- refusals and the layout rule


@pytest.mark.parametrize(
    "replicate, shard, world, expected",
    [
        (1, 0, 4, (1, 4)),
        (2, 0, 4, (2, 2)),
        (0, 2, 4, (2, 2)),
        (0, 8, 32, (4, 8)),
        (4, 8, 32, (4, 8)),
        (1, 0, 1, (1, 1)),
    ],
)
def test_data_parallel_shape(replicate, shard, world, expected):
    assert data_parallel_shape(replicate, shard, world) == expected


@pytest.mark.parametrize(
    "overrides, world, words",
    [
        (["train.dp_shard=3"], 4, "train.dp_replicate x train.dp_shard: 1 x 3 = 3 ranks, but this run has 4"),
        (["train.dp_replicate=3"], 4, "train.dp_replicate: 3 does not divide the 4 ranks"),
        (["train.dp_replicate=0", "train.dp_shard=3"], 4, "train.dp_shard: 3 does not divide the 4 ranks"),
        (["train.dp_replicate=2"], 1, "train.dp_replicate: 2 does not divide the 1 ranks"),
    ],
)
def test_a_layout_that_does_not_fit_the_ranks_is_refused(overrides, world, words):
    cfg = load_config(None, overrides)  # the config itself is valid: only the rank count decides
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        check_world_size(cfg, world)


def test_both_layout_keys_zero_or_negative_are_refused():
    with pytest.raises(UserError, match="cannot both be 0"):
        load_config(None, ["train.dp_replicate=0", "train.dp_shard=0"])
    with pytest.raises(UserError, match="train.dp_shard: must be >= 0"):
        load_config(None, ["train.dp_shard=-1"])


def _one_line_exit_2(argv, capsys) -> str:
    from normopt.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def test_check_launch_and_train_refuse_a_mismatch_with_one_line(tmp_path, tiny_corpus, capsys):
    """``normopt check --nproc 4`` and ``normopt launch --nproc 4`` refuse 3 shards before any
    rank starts; the trainer itself refuses 2 replicas on 1 rank before writing anything."""
    words = "train.dp_replicate x train.dp_shard: 1 x 3 = 3 ranks, but this run has 4"
    assert words in _one_line_exit_2(["check", "--nproc", "4", "train.dp_shard=3"], capsys)
    assert words in _one_line_exit_2(["launch", "--nproc", "4", "train.dp_shard=3"], capsys)
    from normopt.cli import main

    assert main(["check", "--nproc", "4", "train.dp_replicate=2"]) == 0  # 2 x 2 fits
    run_dir = tmp_path / "run"
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, "train.dp_replicate=2"), capsys)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "train.dp_replicate: 2 does not divide the 1 ranks" in lines[0]
    assert not run_dir.exists()


def test_the_sub_groups_of_an_hsdp_mesh_follow_the_step_timeout(tmp_path):
    """A collective in a dp_shard group (or a row-block team) whose partner never comes ends
    within the step timeout (2 s here), not the start-up timeout (30 minutes) the groups were
    created under."""
    out = tmp_path / "seen.json"
    run_torchrun(
        REPO_ROOT / "tests" / "workers" / "phase_timeout_worker.py",
        4,
        [str(out)],
        timeout=120,
        env={"NORMOPT_STEP_TIMEOUT_S": "2"},
    )
    seen = json.loads(out.read_text())
    for group in ("dp_shard", "team"):
        assert seen[group]["failed"] is not None, seen
        assert 1.5 < seen[group]["seconds"] < 10, seen
