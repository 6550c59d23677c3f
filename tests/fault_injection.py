"""Faults injected into a real multi-rank run under ``normopt launch``, at seeded points.

A :class:`FaultChain` drives one run directory through a sequence of faults: each segment
starts (or resumes) the run under the launcher, a fault strikes at a step drawn from the
seed (plus a sub-step delay, so it lands in a step or in a checkpoint write), and the
segment's end is checked against the contract for that fault:

- ``kill_rank``: SIGKILL of one rank: the launcher ends with exit 1 and one line;
- ``kill_launcher``: SIGKILL of the launcher: every rank ends with it;
- ``term_launcher`` / ``term_rank``: SIGTERM to the launcher or to one rank: every rank
  agrees to stop, checkpoints and exits 75 with one line;
- ``full_disk_sync`` / ``full_disk_async``: the checkpoints' file system (a tmpfs) fills
  to a seeded number of bytes short of the next checkpoint: exit 2, one line naming the
  full disk, no partial checkpoint left;
- ``corrupt_newest``: between segments, one piece of the newest complete checkpoint is
  damaged (a flipped byte, a truncation, a symlink loop, garbage state): the resume is
  refused with exit 2 and one line naming the piece, and the run directory keeps every
  byte; the damaged step folder is then moved away, as the line advises.

Every segment must end within a bound and leave no process behind. When the faults are
spent the run is resumed to its end, and its losses (training and evaluation, every step)
must be bit-identical to an uninterrupted run's. Any failure names the seed and the fault;
``NORMOPT_FAULT_SEED=<seed>`` reruns that very sequence.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from normopt.errors import PREEMPTED_EXIT_CODE
from normopt.launch import CRASH_EXIT_CODE
from tests.processes import REPO_ROOT, child_env, child_pids, normopt_lines, rank_pid

PROCESS_FAULTS = ("kill_rank", "kill_launcher", "term_launcher", "term_rank")
DISK_FAULTS = ("full_disk_sync", "full_disk_async")
KINDS = (*PROCESS_FAULTS, *DISK_FAULTS, "corrupt_newest")
DAMAGES = (
    "flip_shard",
    "flip_rng",
    "flip_metadata",
    "flip_non_tensor",
    "truncate_shard",
    "loop_rng",
    "garbage_trainer_state",
    "folder_loop",
)
# from the fault to the launcher's exit; measured 4-12 s on 2 shared cores (a full disk found
# by the next save, a rank's death by its peer's collective), with room for a loaded machine
SEGMENT_BOUND_S = 90
ORPHAN_GRACE_S = 15
FILLER = "zz-filler"  # on the checkpoints' tmpfs, beside the step folders


def seed_from_env(default: int) -> int:
    value = os.environ.get("NORMOPT_FAULT_SEED")
    return int(value) if value else default


def logged(run_dir: Path) -> dict[int, dict]:
    """Every metrics record with a loss, by step (a step logged twice is a failure)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"a step was logged twice: {steps}"
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    return {
        r["step"]: {"loss": r["loss"], "grad_norm": r.get("grad_norm"), "eval_loss": evals.get(r["step"])}
        for r in records
        if "loss" in r
    }


def processes_naming(needle: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle.encode() not in (entry / "cmdline").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def hang_report(launcher_pid: int) -> str:
    """Where a hung launcher and its ranks are: each rank's last progress record (phase, step,
    age of its beat) and, where py-spy is installed, every process's Python stack."""
    from normopt.progress import PROGRESS_DIR_ENV, progress_file, read_progress

    pids = [launcher_pid, *child_pids(launcher_pid)]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    lines = []
    for pid in pids:
        try:
            environ = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except OSError:
            continue
        what = "launcher" if pid == launcher_pid else f"rank {environ.get('RANK', '?')}"
        record = None
        if pid != launcher_pid and environ.get(PROGRESS_DIR_ENV):
            record = read_progress(progress_file(Path(environ[PROGRESS_DIR_ENV]), int(environ.get("RANK", 0))))
            if record and "beat" in record:
                record = {**record, "beat_age_s": round(time.time() - float(record["beat"]), 1)}
        lines.append(f"-- {what} (pid {pid}): {record}")
        if os.path.exists(spy):
            dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            lines.append(dump.stdout.strip() or dump.stderr.strip())
    return "\n".join(lines)


def tree_bytes(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a link's target (links are not followed)."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


@dataclass
class FaultChain:
    run_dir: Path
    base_args: list[str]
    steps: int
    seed: int
    nproc: int = 2
    disk: Path | None = None  # the checkpoints' tmpfs, when full-disk faults run
    logs: Path = field(default_factory=Path)
    survived: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.logs.mkdir(parents=True, exist_ok=True)

    # ---- the plan ------------------------------------------------------------------------
    def plan(self, kinds: tuple[str, ...], rounds: int = 1) -> list[str]:
        """``kinds`` ``rounds`` times in a seeded order, a damage never first (it needs a
        checkpoint written by an earlier segment)."""
        order = [kind for _ in range(rounds) for kind in kinds]
        self.rng.shuffle(order)
        if order and order[0] == "corrupt_newest":
            swap = next((i for i, kind in enumerate(order) if kind != "corrupt_newest"), 0)
            order[0], order[swap] = order[swap], order[0]
        return order

    def fail(self, kind: str, message: str) -> AssertionError:
        return AssertionError(
            f"fault {len(self.survived) + 1} ({kind}) with NORMOPT_FAULT_SEED={self.seed}: "
            f"{message} [survived before it: {', '.join(self.survived) or 'none'}]"
        )

    # ---- one segment ---------------------------------------------------------------------
    def _start(self, async_save: bool, tag: str) -> tuple[subprocess.Popen, Path, Path]:
        out, err = self.logs / f"{len(self.survived):02d}-{tag}.out", self.logs / f"{len(self.survived):02d}-{tag}.err"
        args = [*self.base_args, f"checkpoint.async_save={str(async_save).lower()}"]
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "normopt.cli", "launch", "--nproc", str(self.nproc), *args],
                cwd=REPO_ROOT,
                env=child_env(),
                stdout=stdout,
                stderr=stderr,
                text=True,
            )
        return proc, out, err

    def _last_step(self) -> int:
        return max(logged(self.run_dir), default=0)

    def _wait_for_step(self, proc: subprocess.Popen, step: int, kind: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._last_step() >= step:
                return
            if proc.poll() is not None:
                raise self.fail(kind, f"the run ended (exit {proc.returncode}) before step {step}")
            time.sleep(0.01)
        raise self.fail(kind, f"step {step} never came within {timeout} s")

    def _end(self, proc: subprocess.Popen, kind: str, bound: float) -> float:
        started = time.monotonic()
        try:
            proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            where = hang_report(proc.pid)
            proc.kill()
            proc.wait()
            raise self.fail(
                kind, f"no exit within {bound} s of the fault (a hang); where each process was:\n{where}"
            ) from None
        return time.monotonic() - started

    def _no_orphans(self, kind: str) -> None:
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while processes_naming(str(self.run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_naming(str(self.run_dir))
        if left:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise self.fail(kind, f"processes {left} outlived their launcher")

    def _one_line(self, kind: str, err: Path, pattern: str) -> str:
        text = err.read_text()
        lines = normopt_lines(text)
        if "Traceback" in text or len(lines) != 1 or not re.search(pattern, lines[0]):
            raise self.fail(kind, f"expected one line matching {pattern!r}, got:\n{text[-3000:]}")
        return lines[0]

    def strike(self, kind: str) -> str:
        """Run one segment with ``kind`` striking at a seeded point; return what happened."""
        if kind == "corrupt_newest":
            return self._corrupt_newest()
        async_save = {"full_disk_sync": False, "full_disk_async": True}.get(kind, self.rng.random() < 0.5)
        resume_step = self._last_step()
        at = min(resume_step + self.rng.randint(1, 6), self.steps - 6)
        delay = self.rng.uniform(0.0, 0.05)
        victim = self.rng.randrange(self.nproc)
        proc, _, err = self._start(async_save, kind)
        filling = None
        try:
            self._wait_for_step(proc, at, kind)
            time.sleep(delay)
            if kind in DISK_FAULTS:
                filling = threading.Thread(
                    target=self._keep_full, args=(proc, self.rng.randint(0, 200_000)), daemon=True
                )
                filling.start()
            elif kind == "kill_launcher":
                proc.send_signal(signal.SIGKILL)
            elif kind == "term_launcher":
                proc.send_signal(signal.SIGTERM)
            else:
                pid = rank_pid(proc.pid, victim)
                if pid is None:
                    raise self.fail(kind, f"rank {victim} not found under the launcher")
                os.kill(pid, signal.SIGKILL if kind == "kill_rank" else signal.SIGTERM)
            took = self._end(proc, kind, SEGMENT_BOUND_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if filling is not None:
                filling.join()
        self._no_orphans(kind)
        names_rank = kind in ("kill_rank", "term_rank")
        where = f"{kind}@{at}{f'/rank {victim}' if names_rank else ''}"
        if kind == "kill_launcher":
            if proc.returncode != -signal.SIGKILL:
                raise self.fail(kind, f"the launcher was not killed (exit {proc.returncode}; the run ended first?)")
        elif kind == "kill_rank":
            if proc.returncode != CRASH_EXIT_CODE:
                raise self.fail(kind, f"exit {proc.returncode}, expected {CRASH_EXIT_CODE}:\n{err.read_text()[-3000:]}")
            self._one_line(kind, err, rf"^normopt launch: .*\brank {victim}: status 137\b.*; exit {CRASH_EXIT_CODE}$")
        elif kind in ("term_launcher", "term_rank"):
            if proc.returncode != PREEMPTED_EXIT_CODE:
                raise self.fail(
                    kind, f"exit {proc.returncode}, expected {PREEMPTED_EXIT_CODE}:\n{err.read_text()[-3000:]}"
                )
            self._one_line(kind, err, r"^normopt: stopped by .* run the same command to resume$")
        else:
            if proc.returncode != 2:
                raise self.fail(kind, f"exit {proc.returncode}, expected 2:\n{err.read_text()[-3000:]}")
            self._one_line(
                kind,
                err,
                r"^normopt: error: writing checkpoint step \d+ (on rank \d+ )?failed "
                r"\(no space left on device\); the partial checkpoint was removed",
            )
            partial = [p.name for p in self.disk.iterdir() if p.name.endswith(".tmp")]
            if partial:
                raise self.fail(kind, f"partial checkpoints left behind: {partial}")
            (self.disk / FILLER).unlink()
        self.survived.append(f"{where} ({took:.1f} s)")
        return where

    def _keep_full(self, proc: subprocess.Popen, leave: int) -> None:
        """Fill the checkpoints' tmpfs to ``leave`` bytes short of full, and keep it so while
        the run lives (as another job writing to a shared disk would): space that retention
        frees is taken again, so a save must meet the full disk."""
        with open(self.disk / FILLER, "ab") as f:
            while proc.poll() is None:
                info = os.statvfs(self.disk)
                size = info.f_bavail * info.f_frsize - leave
                while size > 0:
                    try:
                        size -= f.write(b"\0" * min(size, 1 << 20))
                        f.flush()
                    except OSError:  # the save in flight took the rest first
                        break
                time.sleep(0.005)

    # ---- damage between segments ---------------------------------------------------------
    def _corrupt_newest(self) -> str:
        kind = "corrupt_newest"
        checkpoints = self.run_dir / "checkpoints"
        complete = sorted(
            p
            for p in checkpoints.iterdir()
            if re.fullmatch(r"step_\d{8}", p.name) and (p / "trainer_state.json").is_file()
        )
        if not complete:
            raise self.fail(kind, "no complete checkpoint to damage")
        newest = complete[-1]
        damage = self.rng.choice(DAMAGES)
        piece = self._damage(newest, damage)
        before = tree_bytes(self.run_dir)
        proc, _, err = self._start(self.rng.random() < 0.5, kind)
        try:
            took = self._end(proc, kind, SEGMENT_BOUND_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._no_orphans(kind)
        if proc.returncode != 2:
            raise self.fail(
                kind, f"{damage} of {piece}: exit {proc.returncode}, expected a refusal (2):\n{err.read_text()[-3000:]}"
            )
        self._one_line(kind, err, re.escape(str(piece)))
        if tree_bytes(self.run_dir) != before:
            raise self.fail(kind, f"{damage}: the refused resume changed the run directory")
        quarantine = self.logs / f"damaged-{newest.name}-{len(self.survived)}"
        shutil.move(str(newest), quarantine)
        where = f"{kind}:{damage}@{newest.name}"
        self.survived.append(f"{where} ({took:.1f} s)")
        return where

    def _damage(self, checkpoint: Path, damage: str) -> Path:
        """Damage one piece of ``checkpoint``; return the path the refusal must name."""
        shard = sorted(checkpoint.glob("__*_*.distcp"))[0]
        rng_file = sorted((checkpoint / "rng").iterdir())[0]
        if damage.startswith("flip_"):
            piece = {
                "flip_shard": shard,
                "flip_rng": rng_file,
                "flip_metadata": checkpoint / ".metadata",
                "flip_non_tensor": checkpoint / "non_tensor_state.json",
            }[damage]
            data = bytearray(piece.read_bytes())
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            piece.write_bytes(bytes(data))
            return piece
        if damage == "truncate_shard":
            data = shard.read_bytes()
            shard.write_bytes(data[: self.rng.randrange(len(data))])
            return shard
        if damage == "loop_rng":
            rng_file.unlink()
            os.symlink(rng_file.name, rng_file)
            return rng_file
        if damage == "garbage_trainer_state":
            (checkpoint / "trainer_state.json").write_bytes(os.urandom(64))
            return checkpoint / "trainer_state.json"
        # folder_loop: the step folder replaced by a symlink to itself
        moved = self.logs / f"folder-loop-original-{checkpoint.name}-{len(self.survived)}"
        shutil.move(str(checkpoint), moved)
        os.symlink(checkpoint.name, checkpoint)
        return checkpoint

    # ---- the end -------------------------------------------------------------------------
    def finish(self) -> None:
        """Resume the run to its end (exit 0)."""
        proc, _, err = self._start(self.rng.random() < 0.5, "finish")
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._no_orphans("finish")
        if proc.returncode != 0:
            raise self.fail("finish", f"the last resume ended with exit {proc.returncode}:\n{err.read_text()[-3000:]}")


def reference_run(run_dir: Path, base_args: list[str], nproc: int) -> dict[int, dict]:
    """The same run, uninterrupted, under the launcher."""
    proc = subprocess.run(
        [sys.executable, "-m", "normopt.cli", "launch", "--nproc", str(nproc), *base_args],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logged(run_dir)
