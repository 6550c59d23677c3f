"""README.md and docs/*.md are checked like code: links, code paths and every ```bash command.

The rules (also in docs/contributing.md, "The docs"):

1. **Links.** Every relative link ``[text](target)`` outside code resolves to a file or folder
   of the repository; a ``#anchor`` (on its own or after a ``.md`` target) names a heading of
   that page, slugged as GitHub does (lower case, every character but letters, digits, ``_``,
   ``-`` and spaces dropped, spaces as ``-``, ``-1``, ``-2`` ... for repeated headings).
2. **Paths.** Every code path in backticks, or in a command, whose first part is a top-level
   entry of the repository (``normopt/launch.py``, ``configs/factorial/tiny_cpu.yaml``) exists.
3. **Commands.** Every line of a ```bash block is one command (a trailing ``\\`` continues it).
   It runs from a scratch folder that links the repository's ``configs``, ``launch``,
   ``scripts``, ``benchmarks``, ``examples`` and ``train.py`` (so ``runs/`` and the corpus cache land there),
   and must exit 0, unless its trailing comment carries a marker:

   * ``# exit: N``: it runs and must exit with status N (a refused input);
   * ``# needs: WHAT[, WHAT]`` with WHAT one of ``gpu``, ``slurm``, ``network``, ``long`` (trains,
     or takes more than a few seconds) and ``run`` (an existing run directory or grid): it is
     not run as written; its cheap form runs instead where it has one:

     - a training command (``python train.py``, ``normopt train``, ``normopt launch``,
       ``torchrun ... train.py``) -> ``normopt check`` with its ``--config``, its overrides and
       its total rank count (``--nproc`` x ``--nnodes``, or ``--nproc_per_node``);
     - ``normopt factorial SPEC ...`` -> the same with ``--dry-run``;
     - ``sbatch [options] launch/slurm.sbatch ARGS`` -> ``NORMOPT_DRY_RUN=1 bash
       launch/slurm.sbatch ARGS`` (with the line's environment assignments);
     - a ``needs: run`` command of ``normopt`` (export, sample, report, status, spectrum) runs
       as written in the scratch folder, where its run does not exist: it must be refused with
       status 2 for that, not for its options;
     - anything else (a benchmark, ``lm_eval``, a shell pipeline) is skipped, and listed in the
       test's output.

   An unknown marker fails. README's opening block (the two commands: the CPU grid and this
   test suite, minutes each) is checked by its own test instead. Commands of ``normopt`` and
   ``train.py`` run in a child forked from
   one server process that has imported normopt (and torch) once, through the same entry points
   as the installed commands (``normopt.cli.main``, ``normopt.cli.train_main``); other commands
   run under bash. Identical commands run once. The whole test stays well under a minute on 2
   cores: keep the runnable commands cheap (``--help``, ``check``, ``--dry-run``, refused
   inputs) and mark everything else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT, child_env

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
TOP_LEVEL = (
    "normopt",
    "tests",
    "configs",
    "benchmarks",
    "scripts",
    "launch",
    "docs",
    ".ci",
    "train.py",
    "pyproject.toml",
    "README.md",
)
SCRATCH_LINKS = ("configs", "launch", "scripts", "benchmarks", "examples", "train.py")
NEEDS = frozenset({"gpu", "slurm", "network", "long", "run"})
COMMAND_TIMEOUT_S = 60
# how an argument error reads (argparse and normopt's CommandParser): a `needs: run` command
# must be refused for its missing run, never for these
ARGUMENT_ERRORS = (
    "unrecognized arguments",
    "invalid choice",
    "the following arguments are required",
    "expected one argument",
    "usage:",
)
PATH_RE = re.compile(
    r"(?<![\w./~$-])((?:%s)/[\w./-]*)" % "|".join(re.escape(t) for t in TOP_LEVEL if "." not in t or t == ".ci")
)


# ---------------------------------------------------------------------------- reading pages


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    lines: list[tuple[int, str]]  # (line number, text)


@dataclass
class Page:
    path: Path
    prose: str  # the text outside fenced blocks (fenced lines blanked, line numbers kept)
    blocks: list[Block] = field(default_factory=list)
    headings: list[str] = field(default_factory=list)


def read_page(path: Path) -> Page:
    prose_lines, blocks, headings = [], [], []
    block: Block | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w-]*)", line)
        if block is None and fence:
            block = Block(path, number, fence.group(2).lower(), [])
            prose_lines.append("")
        elif block is not None and fence and not fence.group(2) and line.strip().strip("`~") == "":
            blocks.append(block)
            block = None
            prose_lines.append("")
        elif block is not None:
            block.lines.append((number, line))
            prose_lines.append("")
        else:
            prose_lines.append(line)
            heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if heading:
                headings.append(heading.group(1))
    assert block is None, f"{path.name}: the code block opened at line {block.line} is never closed"
    return Page(path, "\n".join(prose_lines), blocks, headings)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's rendered text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"(`+)(.*?)\1", r"\2", text)  # code spans' text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Page) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in page.headings:
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


_PAGES: dict[Path, Page] = {}


def page_of(path: Path) -> Page:
    path = path.resolve()
    if path not in _PAGES:
        _PAGES[path] = read_page(path)
    return _PAGES[path]


def line_of(page: Page, offset: int) -> int:
    return page.prose.count("\n", 0, offset) + 1


def code_spans(text: str):
    """(offset, content) of every inline code span."""
    for match in re.finditer(r"(`+)(.+?)\1", text, re.DOTALL):
        yield match.start(), match.group(2)


def without_code_spans(text: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.DOTALL)


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# ---------------------------------------------------------------------------- 1. links


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_links_resolve(path):
    page = page_of(path)
    text = without_code_spans(page.prose)
    problems = []
    links = list(re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text))
    for match in links:
        target = match.group(1)
        where = f"{page_id(path)}:{line_of(page, match.start())}"
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not resolved.exists():
            problems.append(f"{where}: {target}: no such file")
            continue
        if REPO_ROOT.resolve() not in (resolved, *resolved.parents):
            problems.append(f"{where}: {target}: outside the repository")
            continue
        if anchor:
            if resolved.suffix != ".md":
                problems.append(f"{where}: {target}: an anchor into a file that is not a page")
            elif anchor not in anchors(page_of(resolved)):
                problems.append(f"{where}: {target}: no heading of {resolved.name} has the anchor #{anchor}")
    assert not problems, "\n".join(problems)


def test_every_page_is_linked():
    """Each page under docs/ is reachable from README.md or from another page."""
    linked = set()
    for path in PAGES:
        for match in re.finditer(r"\]\(([^)#\s]+)", without_code_spans(page_of(path).prose)):
            linked.add((path.parent / match.group(1)).resolve())
    orphans = [page_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"pages no other page links to: {orphans}"


# ---------------------------------------------------------------------------- 2. code paths


def repo_paths(text: str) -> list[str]:
    return [m.group(1).rstrip(".") for m in PATH_RE.finditer(text)]


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_code_paths_exist(path):
    page = page_of(path)
    problems = []
    for offset, span in code_spans(page.prose):
        for found in repo_paths(span):
            if not (REPO_ROOT / found).exists():
                problems.append(f"{page_id(path)}:{line_of(page, offset)}: `{found}` does not exist")
    for block in page.blocks:
        if block.language not in ("bash", "sh", "shell"):
            continue
        for number, line in block.lines:
            for found in repo_paths(split_comment(line)[0]):
                if not (REPO_ROOT / found).exists():
                    problems.append(f"{page_id(path)}:{number}: {found} does not exist")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- 3. commands


@dataclass
class Command:
    where: str  # page:line
    text: str  # the command without its comment, continuations joined
    needs: frozenset[str]
    exit_status: int


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment): the comment starts at the first unquoted ``#`` after a blank."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def parse_markers(comment: str, where: str) -> tuple[frozenset[str], int]:
    needs: set[str] = set()
    exit_status = 0
    match = re.search(r"\bneeds:\s*([a-z][a-z, ]*[a-z])", comment)
    if match:
        words = [w.strip() for w in match.group(1).split(",")]
        for word in words:
            name = word.split()[0] if word else word
            assert name in NEEDS, f"{where}: unknown marker needs: {name!r} (known: {sorted(NEEDS)})"
            needs.add(name)
    status = re.search(r"\bexit:\s*(\d+)", comment)
    if status:
        exit_status = int(status.group(1))
    return frozenset(needs), exit_status


def commands_of(path: Path) -> list[Command]:
    out = []
    for index, block in enumerate(page_of(path).blocks):
        if block.language not in ("bash", "sh", "shell"):
            continue
        if path.name == "README.md" and index == 0:
            continue  # the two commands: test_readme_starts_with_the_two_commands
        pending, first = "", 0
        for number, raw in block.lines:
            code, comment = split_comment(raw)
            if not pending:
                first = number
            if code.endswith("\\"):
                pending += code[:-1] + " "
                continue
            text = (pending + code).strip()
            pending = ""
            if not text:
                continue
            where = f"{page_id(path)}:{first}"
            needs, exit_status = parse_markers(comment, where)
            out.append(Command(where, text, needs, exit_status))
    return out


ALL_COMMANDS = [c for p in PAGES for c in commands_of(p)]

SHELL_SYNTAX = re.compile(r"&&|\|\||[|;<>`]|\$\(|&\s*$")


def tokens(text: str) -> list[str] | None:
    """The words of a simple command, or None for one that needs a shell."""
    if SHELL_SYNTAX.search(text):
        return None
    try:
        return shlex.split(text)
    except ValueError:
        return None


def program(words: list[str]) -> tuple[str | None, list[str]]:
    """('normopt' | 'train' | None, the arguments) for a command's words: ``[.venv/bin/]normopt``,
    ``[.venv/bin/]python train.py`` and ``python -m normopt.cli`` run in the command server."""
    if not words:
        return None, []
    head = Path(words[0]).name
    if head == "normopt":
        return "normopt", words[1:]
    if head in ("python", "python3") and len(words) > 1:
        if words[1] == "train.py":
            return "train", words[2:]
        if words[1:3] == ["-m", "normopt.cli"]:
            return "normopt", words[3:]
    return None, words


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def config_args(args: list[str]) -> list[str]:
    """--plugin and --config PATH and the section.key=value overrides of a training command."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "--plugin") and i + 1 < len(args):
            out += [arg, args[i + 1]]
            i += 2
            continue
        if arg.startswith(("--config=", "--plugin=")):
            out.append(arg)
        elif re.match(r"[a-z_]+\.[a-z_0-9]+=", arg):
            out.append(arg)
        i += 1
    return out


def cheap_form(command: Command) -> tuple[str, list[str] | str] | None:
    """What runs in place of a command marked `needs`: ('normopt', argv), ('bash', text), or None."""
    text = re.sub(r"\s*&\s*$", "", command.text)
    words = tokens(text)
    if words is None:
        return None
    env = [w for w in words if re.match(r"[A-Z_][A-Z0-9_]*=", w)]
    words = words[len(env) :] if words[: len(env)] == env else words
    kind, args = program(words)
    if kind == "train":
        return "normopt", ["check", *config_args(args)]
    if kind == "normopt" and args and args[0] in ("train", "launch"):
        nproc = int(option(args, "--nproc") or 1) * int(option(args, "--nnodes") or 1)
        return "normopt", ["check", "--nproc", str(nproc), *config_args(args[1:])]
    if words and Path(words[0]).name == "torchrun" and "train.py" in words:
        at = words.index("train.py")
        nproc = int(option(words[1:at], "--nproc_per_node", "--nproc-per-node") or 1)
        nproc *= int(option(words[1:at], "--nnodes") or 1)
        return "normopt", ["check", "--nproc", str(nproc), *config_args(words[at + 1 :])]
    if kind == "normopt" and args and args[0] == "factorial":
        return "normopt", [*args, *([] if "--dry-run" in args else ["--dry-run"])]
    if words and words[0] == "sbatch" and "launch/slurm.sbatch" in words:
        rest = words[words.index("launch/slurm.sbatch") + 1 :]
        return "bash", " ".join(["NORMOPT_DRY_RUN=1", *env, "bash", "launch/slurm.sbatch", *map(shlex.quote, rest)])
    if (
        kind == "normopt"
        and "run" in command.needs
        and args
        and args[0] in ("export", "sample", "report", "status", "spectrum")
    ):
        return "normopt-missing-run", args
    return None


SERVER = r"""
import json, os, signal, sys, time, traceback
import normopt.cli as cli
import normopt.config  # torch and the config sections, imported once for every child

while True:
    line = sys.stdin.readline()
    if not line:
        break
    request = json.loads(line)
    out_path, err_path = request["out"], request["err"]
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(request["cwd"])
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            entry = cli.main if request["entry"] == "normopt" else cli.train_main
            sys.argv = [request["entry"], *request["argv"]]
            try:
                code = entry(request["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    deadline = time.monotonic() + request["timeout"]
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.01)
    print(json.dumps({"status": status}), flush=True)
"""


class Runner:
    """Runs normopt commands in forked children of one server, the rest under bash."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.env = child_env(
            {
                "NORMOPT_CACHE": str(scratch / ".cache"),
                "HF_DATASETS_OFFLINE": "1",
                "HF_HUB_OFFLINE": "1",
                "NORMOPT_PYTHON": sys.executable,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            cwd=scratch,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.count = 0

    def normopt(self, entry: str, argv: list[str]) -> tuple[int | str, str, str]:
        self.count += 1
        out, err = self.scratch / f".out{self.count}", self.scratch / f".err{self.count}"
        request = {
            "entry": entry,
            "argv": argv,
            "cwd": str(self.scratch),
            "out": str(out),
            "err": str(err),
            "timeout": COMMAND_TIMEOUT_S,
        }
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        assert reply, "the command server died"
        return json.loads(reply)["status"], out.read_text(errors="replace"), err.read_text(errors="replace")

    def bash(self, text: str) -> tuple[int | str, str, str]:
        try:
            proc = subprocess.run(
                ["bash", "-c", text],
                cwd=self.scratch,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return "timeout", "", ""
        return proc.returncode, proc.stdout, proc.stderr

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("docs")
    for name in SCRATCH_LINKS:
        (scratch / name).symlink_to(REPO_ROOT / name)
    (scratch / ".venv").symlink_to(Path(sys.prefix))
    r = Runner(scratch)
    yield r
    r.close()


def plan(command: Command):
    """(how, what, expected status) for one command, or None when it is skipped."""
    if not command.needs:
        words = tokens(command.text)
        if words is not None:
            kind, args = program(words)
            if kind is not None:
                return kind, args, command.exit_status
        return "bash", command.text, command.exit_status
    form = cheap_form(command)
    if form is None:
        return None
    how, what = form
    if how == "normopt-missing-run":
        return how, what, 2
    return how, what, 0


def test_commands_are_marked_and_cheap_ones_run(runner):
    started = time.monotonic()
    done: dict[str, tuple] = {}
    problems, ran, skipped = [], [], []
    for command in ALL_COMMANDS:
        step = plan(command)
        if step is None:
            skipped.append(f"{command.where}: [{', '.join(sorted(command.needs))}] {command.text}")
            continue
        how, what, expected = step
        key = json.dumps([how, what])
        if key not in done:
            if how == "bash":
                done[key] = runner.bash(what)
            else:
                done[key] = runner.normopt("train" if how == "train" else "normopt", what)
            ran.append(f"{command.where}: {what if isinstance(what, str) else ' '.join(what)}")
        status, out, err = done[key]
        shown = what if isinstance(what, str) else shlex.join(what)
        if status != expected:
            problems.append(
                f"{command.where}: `{shown}` exited {status}, expected {expected}\n"
                f"  stdout: {out[-800:]}\n  stderr: {err[-800:]}"
            )
        elif how == "normopt-missing-run" and any(e in err for e in ARGUMENT_ERRORS):
            problems.append(
                f"{command.where}: `{shown}` was refused for its arguments, not for the missing run:\n  {err[-800:]}"
            )
    took = time.monotonic() - started
    print(f"\n{len(ran)} commands run in {took:.1f} s:\n  " + "\n  ".join(ran))
    print(f"{len(skipped)} skipped (no cheap form):\n  " + "\n  ".join(skipped))
    assert not problems, "\n".join(problems)
    assert ran, "no command ran"


def test_readme_starts_with_the_two_commands():
    """CI (.ci/run) runs README's command 2 verbatim; the README opens with both commands."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "# normopt"
    block = page_of(REPO_ROOT / "README.md").blocks[0]
    assert block.line == 3 and block.language == "bash"
    first = [split_comment(text)[0] for _, text in block.lines]
    assert first == [
        "bash scripts/setup_env.sh && .venv/bin/normopt factorial configs/factorial/tiny_cpu.yaml",
        "bash scripts/setup_env.sh && .venv/bin/python -m pytest -q",
    ]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert first[1] in ci


def test_marker_rules():
    """The parser behind the rules above, on the cases the pages use."""
    assert split_comment('normopt sample R --prompt "a # b"   # needs: run') == (
        'normopt sample R --prompt "a # b"',
        "needs: run",
    )
    assert parse_markers("needs: gpu, network (one rank per GPU)", "x") == (frozenset({"gpu", "network"}), 0)
    assert parse_markers("exit: 2 (unknown key)", "x") == (frozenset(), 2)
    with pytest.raises(AssertionError, match="unknown marker"):
        parse_markers("needs: quantum", "x")
    train = Command(
        "x", ".venv/bin/normopt launch --nnodes 2 --nproc 4 --config c.yaml model.norm=dyt", frozenset({"long"}), 0
    )
    assert cheap_form(train) == ("normopt", ["check", "--nproc", "8", "--config", "c.yaml", "model.norm=dyt"])
    torchrun = Command("x", "torchrun --nproc_per_node=2 train.py --config c.yaml", frozenset({"long"}), 0)
    assert cheap_form(torchrun) == ("normopt", ["check", "--nproc", "2", "--config", "c.yaml"])
    grid = Command("x", "normopt factorial s.yaml --slurm", frozenset({"slurm"}), 0)
    assert cheap_form(grid) == ("normopt", ["factorial", "s.yaml", "--slurm", "--dry-run"])
    sbatch = Command(
        "x", "NCCL_DEBUG=WARN sbatch --nodes=4 launch/slurm.sbatch --config c.yaml", frozenset({"slurm"}), 0
    )
    assert cheap_form(sbatch) == ("bash", "NORMOPT_DRY_RUN=1 NCCL_DEBUG=WARN bash launch/slurm.sbatch --config c.yaml")
    assert cheap_form(Command("x", "python benchmarks/bench_muon.py", frozenset({"long"}), 0)) is None
    assert (
        slug("HSDP: hybrid sharding (`train.dp_replicate`, `train.dp_shard`)")
        == "hsdp-hybrid-sharding-traindp_replicate-traindp_shard"
    )
