"""Command-line parsing shared by every command: one-line usage errors, and the arguments
every training command takes (``--config`` and overrides: ``normopt train`` / ``train.py``,
``normopt check`` and ``normopt launch``)."""

from __future__ import annotations

import argparse
import sys

from normopt.errors import USER_ERROR_EXIT_CODE


class CommandParser(argparse.ArgumentParser):
    """argparse with normopt's user-error contract: a bad command line ends with exit 2 and
    one line naming the problem and pointing to --help, not argparse's usage block."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config keys, e.g. model.norm=derf optim.lr=1e-3",
    )
    return parser
