"""What every command shares: error handling, JSON output, progress, common options."""
from __future__ import annotations

import functools
import inspect
import json
import sys
from typing import Any, Callable, Mapping

import typer
from typer.models import OptionInfo
from rich.console import Console
from rich.markup import escape

from mimc.api import MimcError

# Results (tables, summaries) go to stdout, so `mimc profiles | grep h100` works; progress, notes and
# errors to stderr. `--json` prints only JSON on stdout. Emoji codes off: `2:4x` is a pattern, and
# rich would print `:M:` as an emoji.
console = Console(stderr=True, emoji=False)


class _Results:
    """Prints results on stdout. A console is made per call (stdout may be swapped, as by test
    runners) and, when stdout is not a terminal (a pipe, a file), is wide enough that no table or
    line is cut to 80 columns: columns take the width their content needs."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        wide = {} if sys.stdout.isatty() else {"width": 100_000}
        Console(emoji=False, **wide).print(*objects, **kwargs)


out = _Results()

MODEL_HELP = ("A mimc artifact directory, a transformers model directory or hub id, a timm checkpoint file, 'ref', "
              "or random:vit-b/16 (also vit-ti/16, vit-s/16, vit-l/16, vit-h/14: random weights, seed 0).")
JsonOption = typer.Option(False, "--json", help="Print a machine-readable result on stdout.")
SeedOption = typer.Option(0, "--seed", help="Seed for everything random.")


def handle_errors(fn: Callable | None = None, *, flags: Mapping[str, str] | None = None) -> Callable:
    """Turn MimcError into one line on stderr and its exit code; no traceback for user mistakes.

    Library errors name options (``ratio``, ``data``); the line names this command's flags instead:
    each option the error carries becomes the flag of the command parameter of that name
    (``hist_bins`` -> ``--hist-bins``), or ``flags[option]`` where the flag differs from the
    library's option (``@handle_errors(flags={"data": "--calib"})``).
    """
    if fn is None:
        return functools.partial(handle_errors, flags=flags)
    names = {**command_flags(fn), **(flags or {})}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MimcError as exc:
            message = exc.phrased(names)
            # escape: messages name extras like `pip install 'mimc[gpu]'`, which rich would eat as markup
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            if kwargs.get("json_out"):
                emit_json({"error": message, "exit_code": exc.exit_code})
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def usage_error(exc: Any, json_out: bool) -> None:
    """A click usage error as one line (``error: No such option: --x (see `mimc prune --help`)``)."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if json_out:
        emit_json({"error": message, "exit_code": exc.exit_code})


def command_flags(fn: Callable) -> dict[str, str]:
    """Parameter name -> its long flag, for a typer command's options (``fuse`` -> ``--fuse``)."""
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        if isinstance(param.default, OptionInfo):
            decls = [d.split("/")[0] for d in param.default.param_decls or () if d.startswith("--")]
            if decls:
                out[name] = decls[0]
    return out


def echo_tensorrt(message: str) -> None:
    """Print a TensorRT error line as it is logged (the library's ``on_message`` callback)."""
    console.print(f"[yellow]TensorRT:[/] {escape(message)}", highlight=False, soft_wrap=True)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress(description: str, total: int | None = None):
    """A rich progress bar on stderr (transient); use as a context manager."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def status(text: str):
    """A transient spinner on stderr while a verb works."""
    return console.status(text)


def int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``3,5`` -> (3, 5); None stays None."""
    from mimc.api import ConfigError

    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated whole numbers like 3,5, got '{text}'") from None
    if not values:
        raise ConfigError(f"{flag} is empty: pass e.g. {flag} 4,7,10")
    return values


def float_list(text: str, flag: str) -> tuple[float, ...]:
    from mimc.api import ConfigError

    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers like 0,0.25,0.5, got '{text}'") from None
