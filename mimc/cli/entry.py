"""What makes ``mimc`` keep its promise before a command runs: Ctrl-C while the command modules
import, and click's usage errors (one line, ``--json`` on stdout)."""
from __future__ import annotations

import os
import signal
import sys

def _interrupted_while_starting(signum, frame):  # noqa: ARG001
    """Ctrl-C while the command modules import: nothing has been done, so leave at once, quietly
    (a KeyboardInterrupt here became an import traceback, or a half-imported module's ImportError)."""
    os.write(2, b"interrupted\n")
    os._exit(130)

# Only while the command modules import (app.py imports this first), and only in the main thread (signal handlers live there); the
# default handler is back before any command runs, so work is interrupted with cleanup (exit 130).
STARTING = bool(sys.argv) and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if STARTING:
    try:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    except ValueError:  # not the main thread
        STARTING = False

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

# click's exceptions, wherever this typer keeps click (0.29 vendors it as typer._click)
_click = sys.modules[typer.BadParameter.__module__]

class OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown flag, a bad number) keep the promise every other error keeps: one
    ``error:`` line on stderr, exit 2, and with ``--json`` the same JSON on stdout."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(_click, "NoArgsIsHelpError", ()) as exc:  # `mimc` alone: the help, as before
            from typer import rich_utils

            rich_utils.rich_format_error(exc)
            sys.exit(exc.exit_code)
        except _click.ClickException as exc:  # one line: ``error: No such option: --x (see `mimc prune --help`)``
            from mimc.cli.common import print_error

            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print_error(" ".join(exc.format_message().split()) + where, exc.exit_code, json_out="--json" in argv)
            sys.exit(exc.exit_code)
        except typer.Abort:  # EOF at a prompt
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

def started() -> None:
    """The command modules are imported: Ctrl-C interrupts work again (with cleanup, exit 130)."""
    if STARTING:
        signal.signal(signal.SIGINT, signal.default_int_handler)
