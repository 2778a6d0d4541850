"""What every command shares: error handling, JSON output, progress, common options."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from mimc.errors import MimcError

# Human-readable output goes to stderr so `--json` leaves stdout machine-readable.
console = Console(stderr=True)

MODEL_HELP = "A mimc artifact directory, a transformers model directory or hub id, a timm checkpoint file, or 'ref'."
JsonOption = typer.Option(False, "--json", help="Print a machine-readable result on stdout.")
SeedOption = typer.Option(0, "--seed", help="Seed for everything random.")


def echo_tensorrt(message: str) -> None:
    """Print a TensorRT error line as it is logged (the library's ``on_message`` callback)."""
    console.print(f"[yellow]TensorRT:[/] {escape(message)}", highlight=False, soft_wrap=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn MimcError into one line on stderr and its exit code; no traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MimcError as exc:
            # escape: messages name extras like `pip install 'mimc[gpu]'`, which rich would eat as markup
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


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
