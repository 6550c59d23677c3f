"""Command line: ``normopt train`` (same as ``python train.py``) and friends.

Exit status: 0 done; 2 user error (one line on stderr, no traceback); 3 the loss diverged.
"""

from __future__ import annotations

import argparse
import sys

from normopt.errors import USER_ERROR_EXIT_CODE, UserError


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a Llama-style model (plain python = 1 rank; under torchrun = N ranks).",
    )
    parser.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config keys, e.g. model.norm=derf optim.lr=1e-3")
    args = parser.parse_args(argv)
    return _guarded(lambda: _train(args.config, args.overrides))


def _train(config_path, overrides) -> int:
    from normopt.config import load_config

    cfg = load_config(config_path, overrides)  # refuses bad configs before any heavy import

    from normopt.parallel.distributed import init_distributed, shutdown_distributed
    from normopt.trainer import DIVERGED_EXIT_CODE, Trainer, TrainingDiverged

    dist_info = init_distributed(cfg.train.device)
    trainer = None
    try:
        trainer = Trainer(cfg, dist_info)
        trainer.fit()
        return 0
    except TrainingDiverged as exc:
        print(f"normopt: {exc}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        shutdown_distributed()


def _guarded(fn) -> int:
    try:
        return fn()
    except UserError as exc:
        print(f"normopt: error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("normopt: interrupted", file=sys.stderr, flush=True)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: normopt {train} ...\n\n"
              "  train   train a model (same as python train.py; see normopt train --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else USER_ERROR_EXIT_CODE
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
