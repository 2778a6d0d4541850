"""What every command shares: error handling, JSON output, progress, common options."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional

import typer
from typer.models import OptionInfo
from rich.console import Console
from rich.markup import escape

from mimc.api import ConfigError, ImageSource, MimcError

# Results (tables, summaries) go to stdout, so `mimc profiles | grep h100` works; progress, notes and
# errors to stderr. `--json` prints only JSON on stdout. Emoji codes off: `2:4x` is a pattern, and
# rich would print `:M:` as an emoji.
console = Console(stderr=True, emoji=False)  # errors: each torchrun rank names its own
# Notes, warnings, spinners and progress bars: under torchrun rank 0's alone (every rank would repeat them).
chatter = Console(stderr=True, emoji=False, quiet=os.environ.get("RANK", "0") != "0")
status = chatter.status  # a transient spinner on stderr while a verb works

MODEL_HELP = ("A mimc artifact directory, a transformers model directory or hub id, a timm checkpoint file, 'ref', "
              "or random:vit-b/16 (also vit-ti/16, vit-s/16, vit-l/16, vit-h/14: random weights, seed 0).")
ModelArgument = typer.Argument("ref", help=MODEL_HELP)
OverwriteOption = typer.Option(False, "--overwrite", help="Replace a non-empty output directory.")
JsonOption = typer.Option(False, "--json", help="Print a machine-readable result on stdout.")
SeedOption = typer.Option(0, "--seed", help="Seed for everything random.")
# A learning run's length in passes over the images, and how it computes (the same result).
EpochsOption = typer.Option(None, "--epochs", help="Passes over the images instead of --steps (steps = ceil(epochs x images / batch)).")
PrecisionOption = typer.Option(None, "--precision", help="fp32 (default) or bf16 (CUDA autocast; refused on CPU).")
WorkersOption = typer.Option(None, "--workers", help="Processes loading the next batches (0: in this process; default: the cores, shared by this node's ranks).")
FsdpOption = typer.Option(False, "--fsdp", help="Under torchrun: shard weights and optimizer state over the ranks (FSDP2) instead of replicating them.")
CheckpointActivationsOption = typer.Option(False, "--checkpoint-activations", help="Recompute each block's activations in the backward pass (less memory).")


READING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "workers": (Optional[int], typer.Option(None, "--workers", help="Processes that decode images (default: cores - 1, at most 8, none below 256 images; 0: this process).")),
    "skip_corrupt": (bool, typer.Option(False, "--skip-corrupt", help="Skip unreadable images (and say how many) instead of stopping.")),
    "image_column": (Optional[str], typer.Option(None, "--image-column", help="Image column of a saved datasets folder (default: its Image column).")),
    "label_column": (Optional[str], typer.Option(None, "--label-column", help="Label column of a saved datasets folder (default: its ClassLabel column).")),
}


def reads_images(*params: str) -> Callable:
    """Give a command the image-reading options (``--workers``, ``--skip-corrupt``, ``--image-column``,
    ``--label-column``) once: each of ``params`` (default ``data``) reaches the verb as an
    ``ImageSource`` carrying them (a plain spec when every one is left at its default)."""
    params = params or ("data",)

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = set(sig.parameters)  # a command that declares one itself (the learning commands' --workers) keeps it
        extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
                 for k, (kind, opt) in READING_OPTIONS.items() if k not in own]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            reading = {k: kwargs.get(k) if k in own else kwargs.pop(k, None) for k in READING_OPTIONS}
            given = [k for k, v in reading.items() if v is not None and v is not False and k not in own]
            if given and all(kwargs.get(p) is None for p in params):  # no images for them to read: they would do nothing
                raise ConfigError(f"{', '.join(given)} read the images of {params[0]} and no {params[0]} is given: "
                                  f"drop {'them' if len(given) > 1 else 'it'} or give {params[0]}", option=(*given, params[0]))
            if any(v is not None and v is not False for v in reading.values()):  # not `in (None, False)`: --workers 0 == False
                for p in params:
                    if kwargs.get(p) is not None:
                        kwargs[p] = ImageSource(kwargs[p], kwargs.get("seed", 0), **reading)
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {**{k: kind for k, (kind, _) in READING_OPTIONS.items()}, **fn.__annotations__}
        return command

    return wrap


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
            print_error(exc.phrased(names), exc.exit_code, kwargs.get("json_out", False))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated (exit 143)
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(interrupted(exc)) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a scheduler, torchrun stopping the other ranks) raised where the command stands, so it
    leaves the way Ctrl-C does: every temporary removed, nothing half-written, a checkpoint kept; exit 128 + 15."""
    exit_code = 128 + signal.SIGTERM
    caught = False  # the command has taken its way out: a repeat is not raised again


def _terminated(signum, frame):  # noqa: ARG001
    exc = sys.exc_info()[1]
    while exc is not None and not isinstance(exc, Terminated):
        exc = exc.__context__
    if Terminated.caught or exc is not None:  # on its way out: let the clean-up run
        return
    # Raised again every 0.2 s until it is caught: Python drops an exception raised in an at-fork hook or a __del__
    signal.signal(signal.SIGALRM, _terminated)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    raise Terminated


def terminate_as_interrupt() -> None:
    """SIGTERM becomes :class:`Terminated` (the command's entry point calls this; an importer's handlers are left alone)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread
            return
        default = sys.unraisablehook  # a dropped Terminated (raised again later) is no traceback
        sys.unraisablehook = lambda unraisable: None if isinstance(unraisable.exc_value, Terminated) else default(unraisable)


def interrupted(exc: KeyboardInterrupt) -> int:
    """The exit code of Ctrl-C (130) or SIGTERM (143), once the command has cleaned up."""
    if isinstance(exc, Terminated):
        Terminated.caught = True
        signal.setitimer(signal.ITIMER_REAL, 0)
    return getattr(exc, "exit_code", 130)


def print_error(message: str, exit_code: int, json_out: bool) -> None:
    """One ``error:`` line on stderr; with ``--json`` also ``{"error", "exit_code"}`` on stdout."""
    # escape: messages name extras like `pip install 'mimc[gpu]'`, which rich would eat as markup
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if json_out:
        emit_json({"error": message, "exit_code": exit_code})


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


@contextlib.contextmanager
def rate_progress(description: str, unit: str = "images"):
    """A rich progress bar on stderr with a rate (``unit``/s); yields ``tick(done, total)`` for a verb's
    ``on_progress`` callback. Transient: gone once the verb returns."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s", style="progress.data.speed")

    bar = Progress(TextColumn(f"{description} {unit}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=chatter, transient=True)
    task: list[Any] = []

    def tick(done: int, total: int) -> None:
        if not task:  # started by the first batch: a refusal before any work prints no empty bar
            bar.start()
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done)

    try:
        yield tick
    finally:
        if task:
            bar.stop()


def int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``3,5`` -> (3, 5); None stays None."""
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
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers like 0,0.25,0.5, got '{text}'") from None
