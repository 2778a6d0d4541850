"""``mimc inspect MODEL [--data DIR]``: every block criterion side by side, a plot, and with data the
oracle sensitivity and how well each data-free criterion ranks blocks like it (Spearman)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, console, emit_json, handle_errors


def inspect_blocks(encoder, batches=None, dtype: str = "fp16", hist_bins: int = 65536, seed: int = 0) -> dict[str, Any]:
    """Scores of every criterion per block; with batches also ``sensitivity`` and Spearman vs it."""
    from mimc.compression.block_scores import DATA_FREE_CRITERIA, data_free_scores, removal_order, sensitivity_scores, spearman

    scores, warnings = data_free_scores(encoder.blocks, DATA_FREE_CRITERIA, dtype, hist_bins, seed)
    result: dict[str, Any] = {
        "block_ids": encoder.config.kept_block_ids(),
        "scores": scores,
        "removal_order": {c: [encoder.config.kept_block_ids()[i] for i in removal_order(s)] for c, s in scores.items()},
        "warnings": warnings,
    }
    if batches:
        oracle = sensitivity_scores(encoder, batches)
        result["scores"]["sensitivity"] = oracle
        result["removal_order"]["sensitivity"] = [result["block_ids"][i] for i in removal_order(oracle)]
        # Every score means "low = remove first", so +1 is perfect agreement with the oracle.
        result["spearman_vs_sensitivity"] = {c: spearman(s, oracle) for c, s in scores.items() if c != "sensitivity"}
    return result


def _pyplot():
    from mimc.errors import MissingExtraError

    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("the inspect plot needs matplotlib, which is not installed: pip install matplotlib, or pass --no-plot") from None
    matplotlib.use("Agg")  # no display needed; also keeps tests headless
    import matplotlib.pyplot as plt

    return plt


def plot_scores(result: dict[str, Any], path: Path, title: str) -> None:
    """Min-max normalised scores per criterion against the block index (PNG), written atomically."""
    from mimc.artifact import atomic_file

    plt = _pyplot()

    ids = result["block_ids"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    rho = result.get("spearman_vs_sensitivity", {})
    for name, values in result["scores"].items():
        lo, hi = min(values), max(values)
        norm = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values]
        label = name if name not in rho or rho[name] is None else f"{name} (ρ={rho[name]:+.2f})"
        style = dict(lw=3, color="black") if name == "sensitivity" else dict(lw=1.3, marker="o", ms=3)
        ax.plot(ids, norm, label=label, **style)
    ax.set_xlabel("block (original index)")
    ax.set_ylabel("score, min-max normalised (low = removed first)")
    ax.set_xticks(ids)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    def inspect(
        model: str = typer.Argument("ref", help=MODEL_HELP),
        data: Optional[str] = typer.Option(None, "--data", help="Images for the oracle (sensitivity): a folder, .npy/.npz or 'builtin'."),
        n: int = typer.Option(256, "--n", help="Use at most this many images from --data."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG plot to write (default ./<model>-blocks.png)."),
        no_plot: bool = typer.Option(False, "--no-plot", help="Do not write the PNG plot."),
        dtype: str = typer.Option("fp16", "--dtype", help="Precision the entropy criterion counts values in (fp16, bf16, fp32)."),
        hist_bins: int = typer.Option(65536, "--hist-bins", help="Bins of the entropy_hist criterion."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Per-block scores of every pruning criterion (low = removed first), a table and a PNG plot."""
        from rich.table import Table

        from mimc.compression.block_scores import ENTROPY_DTYPES
        from mimc.data import load_images
        from mimc.errors import BadInputError, ConfigError
        from mimc.models.resolve import load_model
        from mimc.models.resolve import model_slug
        from mimc.cli.prune import score_formatter

        if dtype not in ENTROPY_DTYPES:
            raise ConfigError(f"unknown entropy dtype '{dtype}': choose one of {', '.join(ENTROPY_DTYPES)}")
        if hist_bins < 2:
            raise ConfigError(f"--hist-bins must be >= 2, got {hist_bins}")
        plot_path = None if no_plot else (output if output is not None else Path(f"{model_slug(model)}-blocks.png"))
        if plot_path is not None and plot_path.suffix.lower() != ".png":
            raise BadInputError(f"plot path {plot_path} does not end in .png: pass -o NAME.png")
        if plot_path is not None and not plot_path.parent.is_dir():
            raise BadInputError(f"folder {plot_path.parent} does not exist: create it or pass another -o")
        if plot_path is not None:
            _pyplot()  # a missing matplotlib fails before the work, not after
        with console.status(f"loading {model}"):
            encoder = load_model(model)
        batches = None
        if data is not None:
            with console.status(f"reading {data}"):
                batches = list(load_images(data, encoder.config, n=n, seed=seed).batches(batch_size))
        with console.status(f"scoring {encoder.config.depth} blocks" + (" (oracle: one forward pass per block)" if batches else "")):
            result = inspect_blocks(encoder, batches, dtype, hist_bins, seed)
        result["model"] = model
        result["data"] = data
        if plot_path is not None:
            plot_scores(result, plot_path, f"block scores: {model}")
            result["plot"] = str(plot_path)
        if json_out:
            emit_json(result)
            return

        scores = result["scores"]
        console.print(f"block scores (low = removed first): {model}", highlight=False)
        table = Table()
        table.add_column("block", justify="right")
        for c in scores:
            table.add_column(c, justify="right")
        fmt = {c: score_formatter(v) for c, v in scores.items()}
        for pos, bid in enumerate(result["block_ids"]):
            table.add_row(str(bid), *(fmt[c](scores[c][pos]) for c in scores))
        rho = result.get("spearman_vs_sensitivity")
        if rho:
            table.add_section()
            table.add_row("ρ vs oracle", *("—" if c == "sensitivity" or rho.get(c) is None else f"{rho[c]:+.2f}" for c in scores))
        console.print(table)
        for w in result["warnings"]:
            console.print(f"[yellow]warning:[/] {w}")
        if rho:
            best = max((c for c in rho if rho[c] is not None), key=lambda c: rho[c], default=None)
            if best is not None:
                console.print(f"closest to the oracle: {best} (Spearman {rho[best]:+.2f})", highlight=False)
        if plot_path is not None:
            console.print(f"wrote {plot_path}", highlight=False)
