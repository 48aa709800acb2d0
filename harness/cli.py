"""Command line entry point: ``migstall`` / ``python -m harness``.

Each subcommand lives in ``harness/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
This module owns the exit-code contract:

* 0   success
* 1   infrastructure failure (message names the log)
* 2   bad input (one line: the problem and the fix)
* 130 interrupted (after cleanup)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from typing import Any, List, NoReturn, Optional, Sequence, Tuple

from harness import __version__
from harness.errors import MigstallError

COMMANDS = ("doctor", "run", "calibrate", "demo", "demo_series", "kernel", "vhost", "compare", "nightly")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage already; keep its message to one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"migstall: {message} (see '{self.prog} --help')\n")


def _named_command(argv: Optional[List[str]]) -> Optional[str]:
    """The module of the subcommand ``argv`` runs (``demo-series`` is ``demo_series``), when
    nothing before it but -v can print the top-level help or usage (then only that command's
    module needs importing: ``compare`` does not pay for asyncio, the hosts and doctor).
    None: register every command."""
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.replace("-", "_") in COMMANDS:
            return arg.replace("-", "_")
        if not (arg == "--verbose" or (arg.startswith("-v") and set(arg[1:]) == {"v"})):
            return None
    return None


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    named = _named_command(argv)
    if named is not None:
        parser, sub = _parser_with((named,))
        if sub.choices:                   # else (no such module installed): all of them, as argparse expects
            return parser
    return _parser_with(COMMANDS)[0]


def _parser_with(names: Sequence[str]) -> Tuple[argparse.ArgumentParser, Any]:
    parser = _Parser(prog="migstall", description="Measure vCPU stalls when QEMU/KVM live migration starts.")
    parser.add_argument("--version", action="version", version=f"migstall {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in names:
        try:
            module = importlib.import_module(f"harness.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"harness.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser, sub


def _setup_logging(verbose: int) -> None:
    if verbose == 0:  # warnings only, worded for the user
        logging.basicConfig(level=logging.WARNING, format="migstall: %(message)s")
        return
    level = logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM -> whatever handles SIGINT now: asyncio's runner cancels the main
    task (the runs clean up at their await points), Python's default raises
    KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:                                # SIGINT set to SIG_DFL/SIG_IGN by an embedding program
        raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    # SIGTERM (a CI job cancelled, `kill`) takes Ctrl-C's path: every QEMU, SSH
    # session and L1 VM is stopped by its context manager and the row is written.
    # So does SIGHUP (the terminal went away: an SSH connection dropped, a tmux
    # pane closed), which used to kill migstall on the spot and leave its L1
    # running; not where it is ignored (nohup).
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    previous_hup = signal.getsignal(signal.SIGHUP)
    if previous_hup != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminate_as_interrupt)
    # A background job of a non-interactive shell (`migstall run ... &` in a
    # script) starts with SIGINT ignored; asyncio then installs no SIGINT handler
    # and SIGTERM would have nothing to go through.  Python's default handler
    # back in place, asyncio's cancels the main task on SIGTERM as on Ctrl-C.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.func(args) or 0)
    except MigstallError as exc:
        print(f"migstall: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):      # stderr may be a terminal that hung up
            print("migstall: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)   # main() may run inside another program
        signal.signal(signal.SIGHUP, previous_hup)
        if previous_int == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
