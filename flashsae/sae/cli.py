"""The ``flashsae`` command line: ``train``, ``rank``, ``eval``, ``export``, ``import``.

Each subcommand lives in the module that does its work and registers itself through an
``add_*_command(subparsers)`` function that sets ``func`` (namespace -> exit code). Errors a user
can fix (`flashsae.errors.UserError`: bad arguments, bad inputs) end the program with one line naming
the culprit and exit code 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from ..errors import UserError
from .evaluate import add_eval_command
from .interop.cli import add_interop_commands
from .paper.command import add_paper_command
from .rank import add_rank_command
from .run.command import add_train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashsae",
        description="Train, analyse and convert TopK sparse autoencoders on transformer activations.",
    )
    parser.add_argument("--version", action="version", version=f"flashsae {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_command(subparsers)
    add_rank_command(subparsers)
    add_eval_command(subparsers)
    add_interop_commands(subparsers)
    add_paper_command(subparsers)
    return parser


def _version() -> str:
    """The installed distribution's version (the package's own where it runs from a source tree)."""
    try:
        return importlib.metadata.version("flashsae")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:  # its message names the culprit; a traceback would bury it
        print(f"flashsae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
