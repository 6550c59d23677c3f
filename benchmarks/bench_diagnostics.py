"""What diagnostics cost: the share of training wall time spent collecting them.

    python benchmarks/bench_diagnostics.py                         # demo config, derf + muon, 200 steps
    python benchmarks/bench_diagnostics.py --steps 400 --set model.preset=124m model.norm=derf optim.name=muon

Runs the same training twice in fresh processes: with diagnostics at their configured
(default) interval and with them off. Reports, per kind, the time recorded in
``diagnostics.jsonl`` (every record carries the ``seconds`` its collection took), its share
of the diagnosed run's training time, and the wall-clock difference of the two runs (noisier:
it also holds any machine noise). Training itself is identical with and without
diagnostics (``tests/test_diagnostics.py`` checks the losses bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normopt.run_dir import RunDir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(run_dir: Path, config: str, settings: list[str]) -> float:
    """Train once in a fresh process; return its wall time."""
    args = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "--config",
        config,
        f"run.dir={run_dir}",
        "checkpoint.resume=never",
        "checkpoint.interval=0",
        *settings,
    ]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def seconds_by_kind(path: Path) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        totals[record["kind"]] += float(record.get("seconds", 0.0))
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--set", nargs="*", default=["model.norm=derf", "optim.name=muon"], help="extra config overrides for both runs"
    )
    args = parser.parse_args()
    common = [f"train.steps={args.steps}", "train.mfu_probe=false", *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        on_dir, off_dir = Path(tmp) / "on", Path(tmp) / "off"
        wall_on = run(on_dir, args.config, common)
        wall_off = run(off_dir, args.config, [*common, "diagnostics.interval=0", "diagnostics.tail_buckets=0"])
        kinds = seconds_by_kind(RunDir(on_dir).diagnostics)
        diagnostics = yaml.safe_load((on_dir / "config.yaml").read_text())["diagnostics"]
    total = sum(kinds.values())
    print(f"config {args.config} {' '.join(common)}  (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"diagnostics: {diagnostics}")
    print(f"{'kind':<16}{'seconds':>10}{'share of run':>14}")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<16}{seconds:>10.2f}{seconds / wall_on:>14.2%}")
    print(f"{'all':<16}{total:>10.2f}{total / wall_on:>14.2%}")
    print(
        f"wall clock: with diagnostics {wall_on:.1f} s, without {wall_off:.1f} s "
        f"(difference {wall_on - wall_off:+.1f} s = {(wall_on - wall_off) / wall_off:+.2%})"
    )


if __name__ == "__main__":
    main()
