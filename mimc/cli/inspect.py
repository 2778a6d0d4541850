"""``mimc inspect MODEL [--data DIR]``: every block criterion side by side, a plot, and with data the
oracle sensitivity and how well each data-free criterion ranks blocks like it (Spearman)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, ModelArgument, SeedOption, handle_errors, reads_images, status
from mimc.cli.render import line, score_table, show, warnings


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    @reads_images()
    def inspect(
        model: str = ModelArgument,
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
        if no_plot and output is not None:
            raise api.ConfigError("--output names the plot and --no-plot writes none: drop one of them")
        plot = None if no_plot else (output if output is not None else True)  # True: ./<model>-blocks.png
        with status(f"scoring the blocks of {model}" + (" (oracle: one forward pass per block)" if data else "")):
            report = api.inspect(model, data=data, n=n, plot=plot, dtype=dtype, hist_bins=hist_bins,
                                  batch_size=batch_size, seed=seed)
        show(report, json_out, _human)


def _human(r: dict) -> None:
    rho = r.get("spearman_vs_sensitivity")
    score_table(r["scores"], r["block_ids"], f"block scores (low = removed first): {r['model']}", rho=rho)
    warnings(r["warnings"])
    if rho:
        best = max((c for c in rho if rho[c] is not None), key=lambda c: rho[c], default=None)
        if best is not None:
            line(f"closest to the oracle: {best} (Spearman {rho[best]:+.2f})")
    if r.get("plot"):
        line(f"wrote {r['plot']}")
