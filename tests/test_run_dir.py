"""The run directory layout: names, complete checkpoints, and the config a checkpoint used."""

from __future__ import annotations

import pytest

from normopt.errors import UserError
from normopt.run_dir import RunDir


def _checkpoint(run: RunDir, step: int, complete: bool = True, config: str | None = None) -> None:
    folder = run.checkpoint(step) if complete else run.partial_checkpoint(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text('{"step": %d}' % step)
    if config is not None:
        (folder / "config.yaml").write_text(config)


def test_layout_names(tmp_path):
    run = RunDir(tmp_path)  # a plain str works too
    assert RunDir(str(tmp_path)) == run and str(run) == str(tmp_path)
    names = {
        attr: getattr(run, attr).relative_to(tmp_path).as_posix()
        for attr in (
            "config",
            "metrics",
            "diagnostics",
            "tensorboard",
            "checkpoints",
            "cell_json",
            "train_log",
            "export",
            "lock",
        )
    }
    assert names == {
        "config": "config.yaml",
        "metrics": "metrics.jsonl",
        "diagnostics": "diagnostics.jsonl",
        "tensorboard": "tensorboard",
        "checkpoints": "checkpoints",
        "cell_json": "cell.json",
        "train_log": "train.log",
        "export": "export",
        "lock": ".lock",
    }
    assert run.checkpoint(7).relative_to(tmp_path).as_posix() == "checkpoints/step_00000007"
    assert run.partial_checkpoint(7).name == "step_00000007.tmp"


def test_markers(tmp_path):
    run = RunDir(tmp_path)
    assert not run.has_marker()
    run.cell_json.write_text("{}")
    assert run.has_marker()


def test_complete_steps_skip_partial_and_unfinished_folders(tmp_path):
    run = RunDir(tmp_path)
    assert run.complete_steps() == []
    _checkpoint(run, 6)
    _checkpoint(run, 3)
    _checkpoint(run, 9, complete=False)  # still being written
    run.checkpoint(12).mkdir()  # renamed but without its trainer state
    (run.checkpoints / "notes").mkdir()
    assert run.complete_steps() == [3, 6]
    assert run.partial_checkpoints() == [run.partial_checkpoint(9)]


def test_find_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(UserError, match="no complete checkpoint under"):
        run.find_checkpoint(None, "--step")
    with pytest.raises(UserError, match=r"--step: no complete checkpoint for step 3 .*\(have: none\)"):
        run.find_checkpoint(3, "--step")
    _checkpoint(run, 3)
    _checkpoint(run, 6)
    assert run.find_checkpoint(None, "--step") == run.checkpoint(6)
    assert run.find_checkpoint(3, "--step") == run.checkpoint(3)
    with pytest.raises(UserError, match=r"checkpoint.resume: no complete checkpoint for step 4 .*\(have: 3, 6\)"):
        run.find_checkpoint(4, "checkpoint.resume")


def test_config_of_a_checkpoint_falls_back_to_the_runs(tmp_path):
    run = RunDir(tmp_path)
    _checkpoint(run, 3, config="own: 1\n")
    _checkpoint(run, 6)
    assert run.config_of(run.checkpoint(3)) == run.checkpoint(3) / "config.yaml"
    assert run.config_of(run.checkpoint(6)) is None
    run.config.write_text("run: 1\n")
    assert run.config_of(run.checkpoint(6)) == run.config


def test_a_damaged_newest_checkpoint_is_refused_never_skipped(tmp_path):
    """Only a partial checkpoint (no trainer_state.json) is passed over; a trainer state that
    exists but does not read, or a step folder that loops, is damage."""
    import os

    run = RunDir(tmp_path)
    _checkpoint(run, 3)
    run.checkpoint(6).mkdir()  # partial: no completion marker
    assert run.find_checkpoint(None, "--step") == run.checkpoint(3)
    assert run.skipped_partials(run.checkpoint(3)) == ["step_00000006"]
    os.symlink("trainer_state.json", run.checkpoint(6) / "trainer_state.json")  # a loop
    with pytest.raises(
        UserError, match=r"cannot load checkpoint: .*step_00000006/trainer_state.json is a symlink loop"
    ):
        run.find_checkpoint(None, "--step")
    with pytest.raises(UserError, match="is a symlink loop"):
        run.find_checkpoint(6, "--step")
    os.symlink("step_00000009", run.checkpoint(9))
    with pytest.raises(UserError, match=r"cannot load checkpoint: .*step_00000009 is a symlink loop"):
        run.find_checkpoint(None, "--step")
    assert run.find_checkpoint(3, "--step") == run.checkpoint(3)
