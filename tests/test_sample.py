"""``normopt sample``: text from a trained run's checkpoint or export, on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "normopt.cli", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sample_prints_the_prompt_and_its_continuation(finished_run, capsys):
    from normopt.cli import main

    greedy = ["sample", str(finished_run), "--prompt", "to be or", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(greedy) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("to be or") and len(text) > len("to be or")
    # the same text from the export, and from an earlier step on request
    assert main(["export", str(finished_run)]) == 0 and capsys.readouterr()
    assert main(greedy) == 0 and capsys.readouterr().out.rstrip("\n") == text
    assert main(["sample", str(finished_run), "--prompt", "to be", "--step", "3", "--top-k", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("to be")
    assert main(["sample", str(finished_run), "--prompt", "x", "--step", "4"]) == 2
    assert "no complete checkpoint for step 4" in capsys.readouterr().err


def _renamed(weights):
    return {"x." + name: t for name, t in weights.items()}


def _with_extra(weights):
    return {**weights, "extra.weight": torch.zeros(2)}


@pytest.mark.parametrize(
    "damage, words",
    [
        (None, "step_00000006.safetensors: not a readable safetensors file (Error while deserializing header"),
        (
            _renamed,
            "step_00000006.safetensors: no 2-D tok_embeddings.weight, so these are not the weights of a "
            "normopt model (its tensors: x.",
        ),
        (
            _with_extra,
            "step_00000006.safetensors: the weights do not fit the run's config: they have extra extra.weight",
        ),
    ],
)
def test_an_export_that_is_not_the_runs_weights_is_one_line_and_exit_2(finished_run, tmp_path, capsys, damage, words):
    import shutil

    from safetensors.torch import load_file, save_file

    from normopt.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main(["export", str(run_dir)]) == 0
    weights_file = run_dir / "export" / "step_00000006.safetensors"
    if damage is None:
        weights_file.write_bytes(b"garbage, not safetensors\n")
    else:
        weights = {name: t.clone() for name, t in damage(load_file(str(weights_file))).items()}
        save_file(weights, str(weights_file))
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--prompt", "to be", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err


def test_generation_keeps_to_the_context_and_stops_at_eos():
    from normopt.sample import generate

    seen = []

    class Last(torch.nn.Module):  # next token = last token + 1 (mod 10); records its input lengths
        def forward(self, tokens):
            seen.append(tokens.shape[1])
            return torch.nn.functional.one_hot((tokens + 1) % 10, 10).float() * 50

    assert generate(Last(), [1, 2], 6, context=3, temperature=0) == [3, 4, 5, 6, 7, 8]
    assert max(seen) == 3
    assert generate(Last(), [1], 6, context=3, temperature=1.0, top_k=1, stop_id=4) == [2, 3, 4]


def test_unknown_command_and_train_prog():
    proc = _cli("bogus", timeout=60)
    # one line (the usage block is normopt --help's), naming the command and the ones there are
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "normopt: error: unknown command 'bogus' (commands: train, check, export, sample, report, factorial, "
        "plan, status, spectrum, launch, config; see normopt --help)"
    ], proc.stderr
    no_command = _cli(timeout=60)
    assert no_command.returncode == 2 and len(no_command.stderr.splitlines()) == 1
    assert no_command.stderr.startswith("normopt: error: no command given (commands: train,")
    assert _cli("--help", timeout=60).stdout.startswith("usage: normopt")
    help_text = _cli("train", "--help", timeout=60)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: normopt train")
