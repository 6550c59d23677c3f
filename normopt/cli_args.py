"""The command-line arguments every training command shares (``--config`` and overrides),
used by ``normopt train`` / ``train.py``, ``normopt check`` and ``normopt launch``."""

from __future__ import annotations

import argparse


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config keys, e.g. model.norm=derf optim.lr=1e-3")
    return parser
