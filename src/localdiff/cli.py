"""The ``localdiff`` command: one sub-command per job (sample, ...)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
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


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``); 0 where the start time cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) onwards
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. From the command line (``argv`` None) its wall-clock budgets (``--minutes``)
    count from the process's start, imports included; called with ``argv``, from this call."""
    started_at = time.perf_counter() - (process_age_s() if argv is None else 0.0)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started_at = started_at
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
