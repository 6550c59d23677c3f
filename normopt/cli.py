"""Command line: ``normopt train`` (same as ``python train.py``) and friends.

Exit status: 0 done; 2 user error (one line on stderr, no traceback); 3 the loss diverged;
75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (resume with the same command);
69 another rank or node of the job was lost (a collective failed): one line, no traceback
(under ``normopt launch`` the launcher's line, naming the node), resume from the last checkpoint.
"""

from __future__ import annotations

import os
import sys

from normopt.checkpoint.preemption import StopRequest
from normopt.cli_args import CommandParser, config_parser
from normopt.errors import (
    DIVERGED_EXIT_CODE,
    NODE_LOST_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    UserError,
)
from normopt.peer_loss import is_peer_loss, report_peer_loss


def train_main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    parser = config_parser(prog, "Train a Llama-style model (plain python = 1 rank; under torchrun = N ranks).")
    args = parser.parse_args(argv)
    return _guarded(lambda: _train(args.config, args.overrides))


def check_main(argv: list[str] | None = None) -> int:
    """Validate a config without training (launch scripts run this before torchrun, so a
    bad config ends with one line and status 2 instead of torchrun's failure report)."""
    parser = config_parser("normopt check", "Validate a config and print the resolved run.dir.")
    parser.add_argument("--nproc", type=int, default=1, help="validate for this many ranks (default 1)")
    args = parser.parse_args(argv)

    def check() -> int:
        from normopt.config import check_world_size, load_config

        if args.nproc < 1:
            raise UserError(f"--nproc must be at least 1, got {args.nproc}")
        cfg = load_config(args.config, args.overrides)
        micro, accum = check_world_size(cfg, args.nproc)
        print(cfg.run.dir)
        print(
            f"batch: {cfg.train.global_batch_size} sequences/step = {micro} micro x {accum} accumulation "
            f"x {args.nproc} ranks",
            file=sys.stderr,
        )
        return 0

    return _guarded(check)


def _train(config_path, overrides) -> int:
    # stop signals are caught from the first moment: one during start-up ends the run with
    # status 75 and one line at the first step boundary, not with the default 143
    stop_request = StopRequest()
    from normopt import progress

    progress.mark("start-up", 0)  # for normopt launch's watchdog (nothing without it)
    try:
        return _train_until_stopped(config_path, overrides, stop_request)
    finally:
        stop_request.close()
        progress.progress().close()


def _train_until_stopped(config_path, overrides, stop_request) -> int:
    from normopt.config import load_config

    cfg = load_config(config_path, overrides)  # refuses bad configs before any rank starts work

    from normopt.determinism import use_deterministic_kernels
    from normopt.parallel.distributed import (
        init_distributed,
        pick_device_type,
        shutdown_distributed,
    )
    from normopt.trainer import Preempted, Trainer, TrainingDiverged

    if cfg.train.deterministic:  # before CUDA starts (cuBLAS reads its workspace setting once)
        use_deterministic_kernels(pick_device_type(cfg.train.device))
    dist_info = init_distributed(cfg.train.device)
    failure: tuple[int, str] | None = None
    try:
        trainer = Trainer(cfg, dist_info, stop_request)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except TrainingDiverged as exc:
        failure = (DIVERGED_EXIT_CODE, f"normopt: {exc}")
    except Preempted as exc:
        failure = (PREEMPTED_EXIT_CODE, f"normopt: {exc}; run the same command to resume")
    except UserError as exc:
        # keep only the text: the traceback would keep FSDP modules alive past teardown
        failure = (USER_ERROR_EXIT_CODE, f"normopt: error: {exc}")
    except Exception as exc:
        if not is_peer_loss(exc):
            raise
        report_peer_loss(exc)  # a peer is gone: its own line (or the launcher's), not a traceback
        failure = (NODE_LOST_EXIT_CODE, None)
    trainer = None
    shutdown_distributed()
    if failure is None:
        return 0
    code, message = failure
    if message is not None and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    return code


def export_main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="normopt export",
        description="Write a run's model weights as one safetensors file with its config and tokenizer beside it "
        "(--format safetensors), or as a folder that transformers loads (--format hf), checked "
        "against normopt's own forward before it is reported written.",
    )
    parser.add_argument("run_dir", help="the run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    parser.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="safetensors (default): normopt's names; hf: the Hugging Face format",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="hf: the weights' dtype (default float32)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output file (default: RUN_DIR/export/step_N.safetensors); with --format hf, a new "
        "folder (default: RUN_DIR/export/step_N_hf)",
    )
    args = parser.parse_args(argv)

    def export() -> int:
        from pathlib import Path

        if not Path(args.run_dir).is_dir():
            raise UserError(f"{args.run_dir}: no such run directory")
        out = Path(args.out) if args.out else None
        if args.format == "hf":
            from normopt.hf.export import export_hf

            folder, parity = export_hf(Path(args.run_dir), args.step, args.dtype or "float32", out)
            print(f"parity gate passed: {parity.describe()}", file=sys.stderr)
            print(folder)
            return 0
        if args.dtype is not None:
            raise UserError("--dtype applies to --format hf (the safetensors export keeps the checkpoint's dtypes)")
        from normopt.export import export_safetensors

        print(export_safetensors(Path(args.run_dir), args.step, out))
        return 0

    return _guarded(export)


def sample_cli(argv: list[str]) -> int:
    from normopt.sample import sample_main

    return _guarded(lambda: sample_main(argv))


def factorial_cli(argv: list[str]) -> int:
    from normopt.factorial.runner import factorial_main

    return _guarded(lambda: factorial_main(argv))


def launch_cli(argv: list[str]) -> int:
    from normopt.launch import launch_main

    return _guarded(lambda: launch_main(argv))


def report_cli(argv: list[str]) -> int:
    from normopt.report.writer import report_main

    return _guarded(lambda: report_main(argv))


def plan_cli(argv: list[str]) -> int:
    from normopt.planner.command import plan_main

    return _guarded(lambda: plan_main(argv))


def status_cli(argv: list[str]) -> int:
    from normopt.factorial.status import status_main

    return _guarded(lambda: status_main(argv))


def spectrum_cli(argv: list[str]) -> int:
    from normopt.spectrum.report import spectrum_main

    return _guarded(lambda: spectrum_main(argv))


def config_cli(argv: list[str]) -> int:
    from normopt.config_reference import config_main

    return _guarded(lambda: config_main(argv))


def _guarded(fn) -> int:
    try:
        return fn()
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike; one line is enough
            print(f"normopt: error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("normopt: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        # the reader went away (``normopt config --reference | head``): no traceback, and none
        # from the interpreter's final flush of stdout either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe ended


USAGE = """usage: normopt {train,launch,check,config,export,sample,report,factorial,plan,status,spectrum} ...

  train   train a model (same as python train.py; see normopt train --help)
  launch  train on N ranks (a torchrun that keeps the exit statuses 0/2/3/75; 69 a lost node,
          124 no progress for --watchdog-timeout seconds)
  check   validate a config and print its run directory
  config  the reference of every config key (--reference), or a config as resolved with each
          value's origin (--show)
  export  write a run's model weights as one safetensors file (with its tokenizer and config) or,
          with --format hf, as a folder transformers loads (checked against normopt's forward)
  sample  generate text from a run's latest (or exported) checkpoint on the CPU
  report  statistics and plots over a folder of runs (norm x optimizer cells)
  factorial  run every cell of a norm x optimizer spec (here, or as a chain of SLURM jobs), then report
  plan    what a spec's grid can detect (minimum detectable interaction, seeds needed, cost) from a
          seed-to-seed spread, by simulating the report's own tests
  status  where a grid stands: each run done, running, queued, preempted, diverged or failed, and the time left
  spectrum  power laws of the NS-input spectrum in model size; NS steps per layer

Every command takes --plugin FILE_OR_MODULE (repeatable): your own norm, optimizer, attention,
feed-forward, diagnostic or report axis, loaded first (docs/extending.md)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "train": lambda rest: train_main(rest, prog="normopt train"),
        "check": check_main,
        "export": export_main,
        "sample": sample_cli,
        "report": report_cli,
        "factorial": factorial_cli,
        "plan": plan_cli,
        "status": status_cli,
        "spectrum": spectrum_cli,
        "launch": launch_cli,
        "config": config_cli,
    }
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in commands:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        # one line, like every user error; normopt --help shows the whole usage
        print(f"normopt: error: {problem} (commands: {', '.join(commands)}; see normopt --help)", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
