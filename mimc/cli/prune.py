"""``mimc prune MODEL --ratio R | --keep N | --blocks 3,5``: remove transformer blocks, data-free by default."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import (JsonOption, ModelArgument, OverwriteOption, SeedOption, handle_errors, int_list,
                             reads_images, status)
from mimc.cli.render import line, score_table, show, shrink_phrase, warnings


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @handle_errors
    @reads_images()
    def prune(
        model: str = ModelArgument,
        ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of blocks to remove, strictly between 0 and 1."),
        keep: Optional[int] = typer.Option(None, "--keep", help="Number of blocks to keep."),
        blocks: Optional[str] = typer.Option(None, "--blocks", help="0-based positions of the blocks to remove, e.g. 3,5 (overrides the criterion; on a pruned model, not the source ids its table shows)."),
        criterion: str = typer.Option("entropy", "--criterion", "-c", help="entropy, entropy_hist, l1, l2, variance, kurtosis, random, last, sensitivity (needs --data)."),
        data: Optional[str] = typer.Option(None, "--data", help="Images for sensitivity and data fidelity: a folder, .npy/.npz or 'builtin'."),
        n: int = typer.Option(256, "--n", help="Use at most this many images from --data."),
        dtype: str = typer.Option("fp16", "--dtype", help="Precision the entropy criterion counts values in (fp16, bf16, fp32)."),
        hist_bins: int = typer.Option(65536, "--hist-bins", help="Bins of the entropy_hist criterion."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-pruned)."),
        overwrite: bool = OverwriteOption,
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Remove transformer blocks (a removed block passes the residual stream through)."""
        with status(f"pruning {model}"):
            report = api.prune(model, output, data=data, n=n, batch_size=batch_size, seed=seed, overwrite=overwrite,
                                ratio=ratio, keep=keep, blocks=int_list(blocks, "--blocks"), criterion=criterion,
                                hist_bins=hist_bins, dtype=dtype)
        show(report, json_out, lambda r: _human(r, data))


def _human(r: dict, data: str | None) -> None:
    m, removed = r["metrics"], r["metrics"]["removed_blocks"]
    score_table(m["scores"], m["block_ids"], f"block scores (low = removed first): {r['model']}", removed=set(removed))
    warnings(m.get("warnings", []))
    line(f"removed {len(removed)} of {len(m['block_ids'])} blocks {removed}: " + shrink_phrase(m, data))
    line(f"wrote {r['output']}")
