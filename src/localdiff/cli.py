"""The ``localdiff`` command: one sub-command per job (sample, ...)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .commands import COMMANDS
from .commands.common import Terminated, sigterm_raises
from .errors import LocaldiffError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localdiff",
        description="Analytical diffusion denoisers, sensitivity fields and locality from data statistics.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"localdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.simplefilter("default", RuntimeWarning)
    try:
        with sigterm_raises():  # SIGTERM cleans up like Ctrl-C
            return int(args.func(args) or 0)
    except LocaldiffError as exc:
        print(f"localdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"localdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"localdiff {args.command}: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
