"""``normopt config``: the reference generated from the config sections (and the docs page
that holds it), every key's help, and ``--show``'s origins."""

from __future__ import annotations

import dataclasses

import pytest

from normopt.cli import main
from normopt.config import Config
from normopt.config_reference import BEGIN, END, REGENERATE, generated_block, reference_markdown, sections
from normopt.key_roles import EXECUTION, ROLES, help_of, role, role_of
from tests.conftest import REPO_ROOT

DOCS_PAGE = REPO_ROOT / "docs" / "configuration.md"


def _fields():
    return [(section, f) for section, cls in sections().items() for f in dataclasses.fields(cls)]


def test_docs_page_holds_the_generated_reference():
    block = generated_block(DOCS_PAGE.read_text(encoding="utf-8"))
    assert block is not None, f"docs/configuration.md lost its generated part: restore the lines {BEGIN} and {END}"
    assert block == reference_markdown(), f"docs/configuration.md is out of date: run {REGENERATE}"


def test_every_key_has_one_line_of_help_and_a_role():
    assert {f"{s}.{f.name}" for s, f in _fields()} == {
        f"{s}.{k}" for s, values in Config().to_dict().items() for k in values
    }
    for section, f in _fields():
        assert help_of(f).strip() and "\n" not in help_of(f), f"{section}.{f.name} has no help"
        assert role_of(f) in ROLES
    for section, cls in sections().items():
        assert not cls.__doc__.startswith(f"{cls.__name__}("), f"the {section} section has no docstring"


def test_a_field_cannot_be_declared_without_help():
    with pytest.raises(TypeError):
        role(EXECUTION, 1)  # the help is a required argument
    for bad in ("", "  ", "two\nlines"):
        with pytest.raises(ValueError, match="one non-empty line"):
            role(EXECUTION, 1, bad)
    with pytest.raises(ValueError, match="unknown key role"):
        role("speed", 1, "help")


def test_reference_rows_give_type_default_role_and_help():
    text = reference_markdown()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| `")}
    assert len(rows) == len(_fields())
    assert rows["`optim.muon_lr`"].startswith("| `optim.muon_lr` | float or null | `null` | math | ")
    assert "lr_matrix" in rows["`optim.muon_lr`"]
    assert rows["`train.steps`"].startswith("| `train.steps` | int | `300` | length | ")
    assert rows["`train.dtype`"].startswith("| `train.dtype` | auto, float32 or bfloat16 | `auto` | math | ")
    assert rows["`optim.muon_params`"].startswith("| `optim.muon_params` | str or list of str | `all` | math | ")
    assert rows["`checkpoint.keep_latest_k`"].startswith("| `checkpoint.keep_latest_k` | int | `2` | execution | ")
    assert rows["`data.path`"].startswith('| `data.path` | str | `""` | math | ')
    # run.dir's help holds <...>, which a markdown renderer would take for an HTML tag
    assert "\\<config file name>" in rows["`run.dir`"]
    assert all(line.count(" | ") == 4 for line in rows.values())  # no stray column breaks
    assert [line for line in text.splitlines() if line.startswith("### ")] == [f"### `{s}`" for s in sections()]


def _show(capsys, *argv):
    assert main(["config", "--show", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {}
    for line in out[1:]:
        if line:
            key, value, origin = line.split()
            rows[key] = (value, origin)
    return out[0], rows


def test_show_reports_each_value_with_its_origin(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  steps: 7\n  seed: 3\noptim:\n  name: muon\n")
    header, rows = _show(capsys, "--config", str(config), "optim.lr=0.01", "train.seed=4")
    assert str(config) in header
    assert rows["train.steps"] == ("7", "file")
    assert rows["train.seed"] == ("4", "override")  # an override wins over the file
    assert rows["optim.lr"] == ("0.01", "override")
    assert rows["optim.beta1"] == ("0.9", "default")
    assert rows["optim.muon_lr"] == ("null", "default")
    assert rows["run.dir"] == ("runs/mine-rmsnorm-muon", "derived")
    assert set(rows) == {f"{s}.{f.name}" for s, f in _fields()}
    _, rows = _show(capsys, "run.dir=somewhere")  # configs/demo.yaml
    assert rows["run.dir"] == ("somewhere", "override") and rows["model.preset"] == ("debug", "file")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--show", "--config", "no/such.yaml"], "normopt: error: config file not found: no/such.yaml"),
        (["--show", "optim.bogus=1"], "normopt: error: optim.bogus: unknown config key"),
        (["--show", "optim.lr"], "normopt: error: override 'optim.lr': expected dotted.key=value"),
        (["--show", "train.steps=many"], "normopt: error: train.steps: expected an integer, got 'many'"),
        (["--show", "train.steps=0"], "normopt: error: train.steps: must be positive"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    assert main(["config", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message] and captured.out == ""


@pytest.mark.parametrize(
    "argv", [[], ["--reference", "--show"], ["--reference", "optim.lr=1"], ["--show", "--write", "x.md"]]
)
def test_bad_command_lines_are_one_line_and_status_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(["config", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("normopt config: error: ")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["config", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normopt config") and "--reference" in out and "--show" in out


def test_write_replaces_only_the_generated_part(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(f"# Hand-written\n\nkept\n\n{BEGIN}\nstale table\n{END}\n\nkept too\n")
    assert main(["config", "--reference", "--write", str(page)]) == 0
    text = page.read_text()
    assert generated_block(text) == reference_markdown()
    assert text.startswith("# Hand-written\n\nkept\n\n") and text.endswith(f"{END}\n\nkept too\n")
    assert main(["config", "--reference", "--write", str(page)]) == 0 and page.read_text() == text
    assert "already up to date" in capsys.readouterr().err
    page.write_text("no markers\n")
    assert main(["config", "--reference", "--write", str(page)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"normopt: error: {page}: no generated part to replace")
    assert page.read_text() == "no markers\n"


def test_reference_prints_the_markdown(capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == reference_markdown() + "\n"


def test_a_reader_that_stops_early_gets_no_traceback():
    """``normopt config --reference | head -1``: the closed pipe ends the command quietly (the
    reading end is closed before the command writes, so its first write meets the closed pipe)."""
    import subprocess
    import sys

    from tests.processes import REPO_ROOT, child_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "normopt.cli", "config", "--reference"],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr and proc.returncode == 141, (proc.returncode, stderr)
