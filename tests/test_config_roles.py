"""Config key roles: the keys a resumed run may change and the keys that never make an arm
both come from the tags on the config fields."""

from __future__ import annotations

import shutil

import pytest

from normopt.config import Config, keys_with_role, load_config
from normopt.errors import UserError
from normopt.key_roles import EVALUATION, EXECUTION, LENGTH, MATH, ROLES
from normopt.report.cells.arms import COORDINATE_KEYS, NON_ARM_KEYS, NON_ARM_SECTIONS, reference_settings
from normopt.resume_policy import RESUME_SAFE_KEYS, check_resume_compatible, find_resume_point
from normopt.run_dir import RunDir
from tests.conftest import FINISHED_RUN_ARGS, tiny_run_args


def test_every_key_has_one_role():
    all_keys = {f"{section}.{key}" for section, values in Config().to_dict().items() for key in values}
    by_role = {r: keys_with_role(r) for r in ROLES}
    assert set().union(*by_role.values()) == all_keys
    assert sum(len(keys) for keys in by_role.values()) == len(all_keys)


def test_resume_safe_and_non_arm_keys_come_from_the_tags():
    tagged = keys_with_role(EXECUTION, LENGTH, EVALUATION)
    assert RESUME_SAFE_KEYS == tagged  # every tagged key may change on resume
    assert NON_ARM_KEYS == keys_with_role(EXECUTION) | COORDINATE_KEYS
    assert NON_ARM_KEYS - COORDINATE_KEYS <= RESUME_SAFE_KEYS
    # the two sets differ by design: a longer run or one measured on other validation
    # sequences may continue a checkpoint, but is not comparable with the other cells
    assert RESUME_SAFE_KEYS - NON_ARM_KEYS == keys_with_role(LENGTH, EVALUATION)
    assert keys_with_role(LENGTH, EVALUATION) == {"train.steps", "train.tokens_per_param", "train.eval_sequences"}
    assert not keys_with_role(MATH) & (RESUME_SAFE_KEYS | NON_ARM_KEYS) - COORDINATE_KEYS


def test_roles_of_keys_that_were_decided_case_by_case():
    assert "optim.ns_mode" in keys_with_role(EXECUTION)  # bit-identical updates in both modes
    assert "train.micro_batch_size" in keys_with_role(EXECUTION)
    assert {"train.dtype", "optim.ns_dtype", "train.global_batch_size", "optim.lr"} <= keys_with_role(MATH)
    # whole sections of bookkeeping and observation: also their keys unknown to this schema
    assert NON_ARM_SECTIONS == {"run", "checkpoint", "diagnostics"}
    assert all(key in keys_with_role(EXECUTION) for key in RESUME_SAFE_KEYS if key.split(".")[0] in NON_ARM_SECTIONS)


def test_non_arm_keys_define_no_arm():
    configs = [
        {
            "model.norm": "rmsnorm",
            "optim.ns_mode": "distributed",
            "diagnostics.future_key": 1,
            "train.eval_sequences": 64,
            "train.steps": 10,
        },
        {
            "model.norm": "derf",
            "optim.ns_mode": "replicated",
            "diagnostics.future_key": 2,
            "train.eval_sequences": 128,
            "train.steps": 20,
        },
    ]
    shared, disputed = reference_settings(configs)
    assert shared == {} and disputed == ["train.eval_sequences", "train.steps"]


def test_check_resume_compatible():
    saved, current = Config(), Config()
    current.optim.ns_mode = "replicated"
    current.train.eval_sequences = 64
    current.train.steps = 900
    current.diagnostics.interval = 0
    check_resume_compatible(saved, current)
    current.optim.lr = 1e-3
    with pytest.raises(UserError, match=r"optim.lr: the run being resumed used 0.003, this config says 0.001"):
        check_resume_compatible(saved, current)


def test_find_resume_point(tmp_path, finished_run, tiny_corpus):
    assert find_resume_point(RunDir(tmp_path / "new"), Config()) is None  # a new run
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_run, run.path)  # whole checkpoints at steps 3 and 6
    cfg = load_config(None, tiny_run_args(run.path, tiny_corpus, *FINISHED_RUN_ARGS))
    assert find_resume_point(run, cfg) == run.checkpoint(6)
    cfg.checkpoint.resume = "never"
    with pytest.raises(UserError, match="already holds a run"):
        find_resume_point(run, cfg)
    cfg.checkpoint.resume = "5"
    with pytest.raises(UserError, match=r"checkpoint.resume: no complete checkpoint for step 5 .*\(have: 3, 6\)"):
        find_resume_point(run, cfg)
    cfg.checkpoint.resume = "auto"
    cfg.model.norm = "derf"
    with pytest.raises(UserError, match="model.norm: the run being resumed used 'rmsnorm'"):
        find_resume_point(run, cfg)
    (run.checkpoint(6) / "config.yaml").write_text("a: [\n")
    with pytest.raises(UserError, match="cannot read the saved config"):
        find_resume_point(run, cfg)
