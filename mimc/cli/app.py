"""The ``mimc`` command. Each command lives in its own module with a ``register(app)`` function."""
from __future__ import annotations

# First, before typer: it catches Ctrl-C while the rest imports.
from mimc.cli.entry import OneLineUsageErrors, started  # isort: skip

import importlib  # noqa: E402
import sys  # noqa: E402

import typer  # noqa: E402

app = typer.Typer(
    cls=OneLineUsageErrors,
    name="mimc",
    help="Compress masked-image-modeling encoders into small, fast, validated ONNX models and engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per command, in the order `mimc --help` lists them.
COMMAND_MODULES = [
    "inspect",
    "prune",
    "width",
    "tokens",
    "export",
    "quantize",
    "profile",
    "profiles",
    "build",
    "eval",
    "embed",
    "sparsify",
    "distill",
    "run",
    "search",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)

started()

from mimc.cli.common import interrupted, terminate_as_interrupt  # noqa: E402


def main() -> None:
    terminate_as_interrupt()
    try:
        app()
    except KeyboardInterrupt as exc:  # while typer builds the commands or parses, before one runs (a command's own: handle_errors)
        print("interrupted", file=sys.stderr)
        sys.exit(interrupted(exc))


if __name__ == "__main__":
    main()
