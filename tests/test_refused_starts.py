"""A refused start never touches the run: everything is checked before anything is written.

Each case damages a copy of a finished run the way a careless or unlucky user might, starts
it again (in-process: the exit status and one-line contract of real processes is tested in
test_damaged_inputs.py and test_launcher.py) and checks exit 2, one line, and that every
byte of the run directory is as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import FINISHED_RUN_ARGS, rerecord_digest, tiny_run_args
from tests.processes import train_in_process


def snapshot(folder) -> dict[str, str]:
    """Relative path -> sha256 (or the kind, for what is not a regular file) of everything
    below ``folder``, links not followed."""
    state = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                state[rel] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    state[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                state[rel] = "folder"
    return state


def _copy(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, symlinks=True)
    return run_dir


def _set_trainer_state(run_dir, **changes):
    path = run_dir / "checkpoints" / "step_00000006" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _replace_with_file(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.write_text("not what normopt wrote\n")


def _replace_with_folder(path):
    path.unlink()
    path.mkdir()


def _looping_link(path):
    shutil.rmtree(path)
    os.symlink(path.name, path)  # points at itself


def _looping_file(path):
    path.unlink()
    os.symlink(path.name, path)  # points at itself


def _link_to_its_folder(path):
    shutil.rmtree(path)
    os.symlink(".", path)  # checkpoints/step_00000006 -> checkpoints/


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(100)


LAST = "checkpoints/step_00000006"


def _insert_metrics_line(run_dir, line):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")


DAMAGES = {
    "negative step in trainer_state": (lambda r: _set_trainer_state(r, step=-3), "is not its checkpoint's step"),
    "trainer_state step of another folder": (lambda r: _set_trainer_state(r, step=5), "is not its checkpoint's step"),
    "world_size not an integer": (lambda r: _set_trainer_state(r, world_size="two"), "is not a rank count"),
    "checkpoints/ is a file": (lambda r: _replace_with_file(r / "checkpoints"), "must be a folder"),
    "checkpoints/ is a symlink loop": (lambda r: _looping_link(r / "checkpoints"), "must be a folder"),
    "tensorboard/ is a file": (lambda r: _replace_with_file(r / "tensorboard"), "must be a folder"),
    "metrics.jsonl is a folder": (lambda r: _replace_with_folder(r / "metrics.jsonl"), "must be a file"),
    "diagnostics.jsonl is a folder": (lambda r: _replace_with_folder(r / "diagnostics.jsonl"), "must be a file"),
    "non-integer step in a metrics line": (
        lambda r: _insert_metrics_line(r, '{"step": "2", "loss": 1.0}'),
        "has no step",
    ),
    "non-JSON middle metrics line": (lambda r: _insert_metrics_line(r, "{not json"), "is not JSON"),
    # the resume point is used whole or not at all: each damaged piece is named, never skipped
    "RNG state is a symlink loop": (
        lambda r: _looping_file(r / LAST / "rng" / "rank_00000.safetensors"),
        f"cannot load checkpoint: {{run}}/{LAST}/rng/rank_00000.safetensors is a symlink loop",
    ),
    "trainer_state is a symlink loop": (
        lambda r: _looping_file(r / LAST / "trainer_state.json"),
        f"cannot load checkpoint: {{run}}/{LAST}/trainer_state.json is a symlink loop",
    ),
    "checkpoint folder links to itself": (
        lambda r: _looping_link(r / LAST),
        f"cannot load checkpoint: {{run}}/{LAST} is a symlink loop",
    ),
    "checkpoint folder links to its parent": (
        lambda r: _link_to_its_folder(r / LAST),
        "is a symlink to a folder that holds it",
    ),
    "non-tensor state is a folder": (
        lambda r: _replace_with_folder(r / LAST / "non_tensor_state.json"),
        "non_tensor_state.json is a folder, not a file",
    ),
    "RNG folder is a file": (lambda r: _replace_with_file(r / LAST / "rng"), "/rng is a file, not a folder"),
    "RNG state missing": (
        lambda r: (r / LAST / "rng" / "rank_00000.safetensors").unlink(),
        "rng/rank_00000.safetensors is missing",
    ),
    "model shard truncated": (
        lambda r: _truncate(r / LAST / "__0_0.distcp"),
        "__0_0.distcp is truncated (100 bytes, the metadata needs",
    ),
    "model shard is a folder": (
        lambda r: _replace_with_folder(r / LAST / "__0_0.distcp"),
        "__0_0.distcp is a folder, not a file",
    ),
    "metadata is a symlink loop": (lambda r: _looping_file(r / LAST / ".metadata"), ".metadata is a symlink loop"),
    "a fifo inside the checkpoint": (
        lambda r: os.mkfifo(r / LAST / "rng" / "extra"),
        "rng/extra is not a regular file",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_is_refused_before_anything_is_written(finished_run, tmp_path, tiny_corpus, capsys, damage):
    run_dir = _copy(finished_run, tmp_path)
    change, words = DAMAGES[damage]
    change(run_dir)
    before = snapshot(run_dir)
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "train.steps=9"), capsys)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words.format(run=run_dir) in lines[0], proc.stderr
    assert snapshot(run_dir) == before


def test_a_checkpoint_of_another_model_is_refused_whatever_the_configs_say(finished_run, tmp_path, tiny_corpus, capsys):
    """The configs beside the checkpoint are gone, so only the tensors can tell: an RMSNorm
    checkpoint resumed as DyT lacks DyT's alphas and the embedding scale."""
    run_dir = _copy(finished_run, tmp_path)
    for config in run_dir.rglob("config.yaml"):
        config.unlink()
    before = snapshot(run_dir)
    proc = train_in_process(
        tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "model.norm=dyt", "train.steps=9"), capsys
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "holds another model than this config builds: it lacks embed_scale, layers.0.attn_norm.alpha" in lines[0]
    assert snapshot(run_dir) == before


def test_a_refused_fresh_run_leaves_no_run_dir(tmp_path, tiny_corpus, capsys):
    run_dir = tmp_path / "new" / "run"
    proc = train_in_process(tiny_run_args(run_dir, tmp_path / "no-such-corpus"), capsys)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    assert not run_dir.exists()


def test_re_running_a_finished_run_changes_no_byte(finished_run, tmp_path, tiny_corpus, capsys):
    run_dir = _copy(finished_run, tmp_path)
    before = snapshot(run_dir)
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS), capsys)
    assert proc.returncode == 0 and "run already complete" in proc.stdout
    assert snapshot(run_dir) == before  # no new TensorBoard events file, no .lock rewrite


# ---------------------------------------------------------------- bad command lines


def _one_line_exit_2(argv, capsys) -> str:
    from normopt.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's error path exits
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["export"], "the following arguments are required: run_dir (see normopt export --help)"),
        (["sample", "runs/x", "--prompt", "a", "--seed", "1e23"], "argument --seed: invalid int value"),
        (["sample", "runs/x", "--prompt", "a", "--seed", str(10**23)], "--seed must be in [0, 2^63)"),
        (["sample", "runs/x", "--prompt", "a", "--temperature", "nan"], "--temperature must be a number"),
        (["report", "--smoothing"], "expected one argument (see normopt report --help)"),
        (["launch", "--master-port", "70000"], "--master-port 70000 is not a TCP port"),
        (["train", "checkpoint.resume=\u00b2"], "checkpoint.resume: '\u00b2' is not auto, never or a step number"),
        (["train", "optim.lr=1e39"], "cannot be represented in float32"),
        (
            ["train", f"train.steps={10**23}"],
            "train.steps: 100000000000000000000000 is out of the 64-bit integer range",
        ),
    ],
)
def test_a_bad_command_line_is_one_line_and_exit_2(argv, words, capsys):
    assert words in _one_line_exit_2(argv, capsys)


def test_a_slurm_node_id_that_is_no_index_is_refused_before_any_rank(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_NODEID", "node-3")
    assert "SLURM_NODEID='node-3' is not a node index" in _one_line_exit_2(["launch"], capsys)


# ---------------------------------------------------------------- signals during start-up


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (Linux: SigCgt)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def test_a_stop_signal_during_start_up_ends_with_75_and_one_line(tmp_path, tiny_corpus):
    """SIGTERM (SIGUSR1 and SIGINT share the handler) while torch is being imported. SIGINT
    itself is not sent here: Python catches it from interpreter start, so SigCgt cannot
    tell when normopt's handler replaced Python's."""
    import signal
    import time

    from tests.processes import start

    proc = start(tiny_run_args(tmp_path / "run", tiny_corpus, *FINISHED_RUN_ARGS))
    sig, signum = "SIGTERM", signal.SIGTERM
    deadline = time.time() + 60
    while not _catches(proc.pid, signum) and time.time() < deadline:  # the handler is the first thing set
        time.sleep(0.005)
    proc.send_signal(signum)  # torch is still being imported: start-up takes seconds more
    _, stderr = proc.communicate(timeout=240)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("train:")]
    assert proc.returncode == 75, stderr[-2000:]
    assert lines == [
        f"normopt: stopped by {sig} before the first step (nothing trained since step 0); "
        f"run the same command to resume"
    ], stderr[-2000:]


# ---------------------------------------------------------------- output paths and report options


def test_export_refuses_paths_it_must_not_write(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    before = snapshot(run_dir)
    for out, words in (
        (tmp_path / "a-folder", "exists and is not a regular file"),
        (tmp_path / "a-file" / "w.safetensors", "is not a folder"),
        (run_dir / "metrics.jsonl", "a file of the run"),
        (Path("/dev/null"), "exists and is not a regular file"),
    ):
        line = _one_line_exit_2(["export", str(run_dir), "--out", str(out)], capsys)
        assert words in line, line
    assert snapshot(run_dir) == before


def test_report_refuses_a_fix_that_names_no_level_and_an_out_that_is_a_file(finished_run, tmp_path, capsys):
    root = tmp_path / "grid"
    root.mkdir()
    shutil.copytree(finished_run, root / "rmsnorm-muon")
    line = _one_line_exit_2(["report", str(root), "--fix", "foo=bar"], capsys)
    assert "--fix foo=bar: no cell has model.norm=foo" in line
    (tmp_path / "out").write_text("x")
    assert "exists and is not a folder" in _one_line_exit_2(
        ["report", str(root), "--out", str(tmp_path / "out")], capsys
    )


@pytest.mark.parametrize("arm, words", [("../../x", "arm name '../../x' must be"), ("a/b", "arm name 'a/b' must be")])
def test_factorial_names_that_escape_the_root_are_refused(tmp_path, capsys, arm, words):
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": "../configs/demo.yaml",
                "root": str(tmp_path / "grid"),
                "axes": {"model.norm": ["rmsnorm"]},
                "seeds": [0],
                "arms": {arm: {"model.norm": "derf"}},
            }
        )
    )
    assert words in _one_line_exit_2(["factorial", str(spec), "--dry-run"], capsys)
    assert not (tmp_path / "grid").exists() and not (tmp_path.parent / "x").exists()


def _edit_non_tensor_state(run_dir, change):
    path = run_dir / "checkpoints" / "step_00000006" / "non_tensor_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    rerecord_digest(path.parent, path.name)


def _lr_key(state):
    return next(k for k in state if k.endswith('0, "lr"]}'))


NON_TENSOR_DAMAGES = {
    "an lr that is a string": (lambda s: s.__setitem__(_lr_key(s), "fast"), "is a string"),
    "an lr that is NaN": (lambda s: s.__setitem__(_lr_key(s), float("nan")), "expected a number"),
    "a param group that does not exist": (
        lambda s: s.__setitem__(_lr_key(s).replace(", 0,", ", 99,"), 0.1),
        "has an unknown entry",
    ),
    "a hyperparameter gone": (lambda s: s.pop(_lr_key(s)), "lacks"),
}


@pytest.mark.parametrize("damage", list(NON_TENSOR_DAMAGES))
def test_a_damaged_non_tensor_state_is_refused(finished_run, tmp_path, tiny_corpus, capsys, damage):
    run_dir = _copy(finished_run, tmp_path)
    change, words = NON_TENSOR_DAMAGES[damage]
    _edit_non_tensor_state(run_dir, change)
    before = snapshot(run_dir)
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS, "train.steps=9"), capsys)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert snapshot(run_dir) == before


def test_a_full_disk_while_logging_is_one_line_naming_it(tmp_path):
    import errno

    from normopt.errors import UserError
    from normopt.metrics.logger import MetricsLogger
    from normopt.run_dir import RunDir

    logger = MetricsLogger(RunDir(tmp_path), enabled=True)

    class FullDisk:
        name = str(tmp_path / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    real, logger._file = logger._file, FullDisk()
    with pytest.raises(
        UserError,
        match=r"metrics.jsonl failed \(no space left on device\) at step 7; the "
        r"checkpoints written so far are kept",
    ):
        logger.log({"step": 7, "loss": 1.0})
    logger._file = real
    logger.close()

    from normopt.diagnostics.collector import DiagnosticsWriter

    writer = DiagnosticsWriter(tmp_path / "diagnostics.jsonl", None, enabled=True, histograms=False)
    real, writer._file = writer._file, FullDisk()
    with pytest.raises(UserError, match=r"failed \(no space left on device\) at step 3"):
        writer.write({"step": 3, "kind": "norm", "layers": {}})
    writer._file = real
    writer.close()


def test_disk_full_is_recognised_through_wrappers():
    import errno

    from normopt.checkpoint.manager import is_disk_full

    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert is_disk_full(wrapped) and is_disk_full(OSError(errno.ENOSPC, "x"))
    outer = RuntimeError("write failed")
    outer.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(outer) and not is_disk_full(RuntimeError("other"))


def _children(pid: int) -> list[int]:
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("when", ["before the ranks start", "while the ranks start"])
def test_a_stop_signal_to_the_launcher_during_start_up_ends_with_75(tmp_path, tiny_corpus, when):
    import signal
    import time

    from tests.processes import start

    proc = start(tiny_run_args(tmp_path / "run", tiny_corpus), launcher=True)
    deadline = time.time() + 120
    while not _catches(proc.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.005)
    if when == "while the ranks start":  # the ranks exist but may not have their handlers yet
        while len(_children(proc.pid)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "did not agree" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip().startswith("normopt")]
    assert len(lines) == 1, stderr[-3000:]  # one line, not a rank's and the launcher's saying the same
    assert (
        "before any rank started; nothing to resume" in lines[0]
        if when == "before the ranks start"
        else lines[0].startswith("normopt: stopped by SIGTERM before the first step")
    ), stderr[-3000:]


def test_a_finished_run_with_an_odd_metrics_line_is_still_reported(finished_run, tmp_path, tiny_corpus, capsys):
    run_dir = _copy(finished_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "note": "eval_loss"}\n')  # names the field without holding it
    proc = train_in_process(tiny_run_args(run_dir, tiny_corpus, *FINISHED_RUN_ARGS), capsys)
    assert proc.returncode == 0 and "run already complete" in proc.stdout and "final validation loss" in proc.stdout
