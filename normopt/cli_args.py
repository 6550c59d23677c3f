"""Command-line parsing shared by every command: one-line usage errors, and the arguments
every training command takes (``--config`` and overrides: ``normopt train`` / ``train.py``,
``normopt check`` and ``normopt launch``)."""

from __future__ import annotations

import argparse
import sys

from normopt.errors import USER_ERROR_EXIT_CODE


class CommandParser(argparse.ArgumentParser):
    """argparse with normopt's user-error contract: a bad command line ends with exit 2 and
    one line naming the problem and pointing to --help, not argparse's usage block.

    Every command takes ``--plugin PATH_OR_MODULE`` (repeatable; :mod:`normopt.plugins`),
    loaded as the arguments are parsed, before the command reads any config or run. A
    command that hands its remaining arguments on (``normopt launch``) passes
    ``plugins=False`` so that they reach its children instead."""

    def __init__(self, *args, plugins: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.takes_plugins = plugins
        if plugins:
            self.add_argument(
                "--plugin",
                action="append",
                default=[],
                metavar="PATH_OR_MODULE",
                help="load a plugin first: a .py file, a package folder or a module name registering "
                "norms, optimizers, attentions, feed-forwards or diagnostics (repeatable)",
            )

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if self.takes_plugins:
            from normopt.errors import UserError
            from normopt.plugins import load_plugins

            try:
                load_plugins(parsed.plugin)
            except UserError as exc:
                print(f"normopt: error: {exc}", file=sys.stderr)
                sys.exit(USER_ERROR_EXIT_CODE)
        return parsed, rest

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
