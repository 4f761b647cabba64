"""The ``localdiff`` command: one sub-command per job (sample, ...)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager

from . import distributed
from .commands import COMMANDS, SINGLE_PROCESS
from .commands.common import Terminated, sigterm_raises
from .errors import ConfigError, DistributedError, LocaldiffError


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


ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchrun for each process; it reads the file when one fails
SECONDARY_DELAY_S = 1.5  # how long a rank that may only have seen another's failure waits before reporting


def record_cause(line: str, *, secondary: bool = False) -> None:
    """Under torchrun, write this rank's one-line cause where torchrun looks for it (``$TORCHELASTIC_ERROR_FILE``,
    ``{"message", "timestamp"}``): the failure summary torchrun prints last then shows the cause on its
    "Root Cause" entry's ``traceback :`` line, just above its closing rule, instead of a link.

    torchrun takes the failure with the earliest timestamp (whole seconds) as the root cause. A ``secondary``
    failure (a collective that failed because another rank stopped; an unexpected exception) first waits
    ``SECONDARY_DELAY_S``: torchrun stops it in the meantime when another rank failed first, and otherwise
    it records its cause a second later than any failure it followed."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    if secondary:
        time.sleep(SECONDARY_DELAY_S)
    try:
        from .fileio import write_json

        write_json(path, {"message": line, "timestamp": int(time.time())})
    except OSError:
        pass  # the message is on stderr anyway


@contextmanager
def rank_output(w: distributed.World):
    """Rank 0 (and a plain run) reports; the other ranks of a torchrun job print no results or warnings
    (they run the same command), only their own errors, on stderr."""
    if w.main:
        yield
        return
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.close()
        sys.stdout = stdout


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. From the command line (``argv`` None) its wall-clock budgets (``--minutes``)
    count from the process's start, imports included; called with ``argv``, from this call.

    Started by torchrun (``torchrun --nproc-per-node P --no-python -- localdiff COMMAND ...``), every
    process joins the job's process group first (:mod:`localdiff.distributed`); a process that fails
    prints which rank it is and why, and exits non-zero, which makes torchrun stop the others."""
    started_at = time.perf_counter() - (process_age_s() if argv is None else 0.0)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started_at = started_at
    warnings.simplefilter("default", RuntimeWarning)
    w, failed, who = distributed.world(), True, ""
    try:
        with sigterm_raises():  # SIGTERM cleans up like Ctrl-C
            w = distributed.init_from_env()
            who = f" on {w.where()}" if w.backend is not None else ""
            with rank_output(w):
                if w.active and args.command in SINGLE_PROCESS:
                    raise ConfigError(f"{args.command} runs in one process ({SINGLE_PROCESS[args.command]}); "
                                      "start it without torchrun")
                code = int(args.func(args) or 0)
            failed = code != 0
            return code
    except LocaldiffError as exc:
        cause = f"localdiff {args.command}: error{who}: {exc}"
        print(cause, file=sys.stderr)
        record_cause(cause, secondary=isinstance(exc, DistributedError))
        return 2
    except KeyboardInterrupt:
        print(f"localdiff {args.command}: interrupted{who}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"localdiff {args.command}: terminated{who}", file=sys.stderr)
        return 143
    except Exception as exc:
        if not who:  # a plain run: the usual traceback
            raise
        traceback.print_exc()
        cause = f"localdiff {args.command}: {w.where()} failed: {type(exc).__name__}: {exc}"
        print(cause, file=sys.stderr)
        record_cause(cause, secondary=True)  # perhaps a peer's exit seen by the communication library
        return 1
    finally:
        distributed.shutdown(failed=failed)


if __name__ == "__main__":
    sys.exit(main())
