"""``mimc prune MODEL --ratio R | --keep N | --blocks 3,5``: remove transformer blocks, data-free by default."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, console, emit_json, handle_errors


def parse_blocks(text: str | None) -> tuple[int, ...] | None:
    from mimc.errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--blocks must be comma-separated 0-based block indices like 3,5, got '{text}'") from None


def score_formatter(values: list[float]):
    """A fixed-point format with enough decimals that the column's differences show.

    Block scores of one criterion often differ only in the 3rd-5th significant digit (entropy of
    ViT blocks: 9.02 +- 0.005 nats), which a plain ``.4g`` would hide.
    """
    import math

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return lambda v: f"{v}"
    if all(float(v).is_integer() for v in finite):
        return lambda v: f"{v:.0f}"
    spread = max(finite) - min(finite)
    scale = spread if spread > 0 else max(abs(v) for v in finite) or 1.0
    decimals = min(10, max(0, 2 - math.floor(math.log10(scale))))
    return lambda v: f"{v:.{decimals}f}"


def print_scores(scores: dict[str, list[float]], block_ids: list[int], removed: set[int], title: str) -> None:
    from rich.table import Table

    console.print(title, highlight=False)  # above, not as a table title: narrow tables would wrap it
    table = Table()
    table.add_column("block", justify="right")
    for name in scores:
        table.add_column(name, justify="right")
    table.add_column("", justify="left")
    fmt = {c: score_formatter(v) for c, v in scores.items()}
    for pos, bid in enumerate(block_ids):
        mark = "[red]removed[/]" if bid in removed else ""
        table.add_row(str(bid), *(fmt[c](scores[c][pos]) for c in scores), mark, style="dim" if bid in removed else None)
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @handle_errors
    def prune(
        model: str = typer.Argument("ref", help=MODEL_HELP),
        ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of blocks to remove, strictly between 0 and 1."),
        keep: Optional[int] = typer.Option(None, "--keep", help="Number of blocks to keep."),
        blocks: Optional[str] = typer.Option(None, "--blocks", help="0-based blocks to remove, e.g. 3,5 (overrides the criterion)."),
        criterion: str = typer.Option("entropy", "--criterion", "-c", help="entropy, entropy_hist, l1, l2, variance, kurtosis, random, last, sensitivity (needs --data)."),
        data: Optional[str] = typer.Option(None, "--data", help="Images for sensitivity and data fidelity: a folder, .npy/.npz or 'builtin'."),
        n: int = typer.Option(256, "--n", help="Use at most this many images from --data."),
        dtype: str = typer.Option("fp16", "--dtype", help="Precision the entropy criterion counts values in (fp16, bf16, fp32)."),
        hist_bins: int = typer.Option(65536, "--hist-bins", help="Bins of the entropy_hist criterion."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-pruned)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Remove transformer blocks (a removed block passes the residual stream through)."""
        from mimc.artifact import check_output, save_artifact
        from mimc.compression.blocks import BlockPruningConfig
        from mimc.compression.registry import compress
        from mimc.data import load_images
        from mimc.errors import DataError
        from mimc.models.resolve import load_model, model_slug

        config = BlockPruningConfig(
            ratio=ratio, keep=keep, blocks=parse_blocks(blocks), criterion=criterion, seed=seed, hist_bins=hist_bins, dtype=dtype
        )
        if config.needs_data and data is None:
            raise DataError("criterion 'sensitivity' measures each block on images: pass --data DIR (a folder, .npy/.npz or 'builtin')")
        out = output if output is not None else Path(f"{model_slug(model)}-pruned")
        check_output(out, overwrite)
        with console.status(f"loading {model}"):
            encoder = load_model(model)
        config.num_removed(encoder.config.depth)  # fail on --keep/--blocks beyond depth before any work
        batches = None
        if data is not None:
            with console.status(f"reading {data}"):
                batches = list(load_images(data, encoder.config, n=n, seed=seed).batches(batch_size))
        with console.status(f"scoring {encoder.config.depth} blocks ({config.criterion})"):
            pruned, record = compress(encoder, config, batches)
        with console.status(f"writing {out}"):
            save_artifact(pruned, out, overwrite=overwrite)

        m = record.metrics
        result = {
            "output": str(out),
            "criterion": config.criterion,
            "removed_blocks": m["removed_blocks"],
            "kept_blocks": m["kept_blocks"],
            "scores": m["scores"],
            "params_before": m["params_before"],
            "params_after": m["params_after"],
            "macs_ratio": m["macs_ratio"],
            "fidelity_deterministic": m["fidelity_deterministic"],
            "fidelity_data": m.get("fidelity_data"),
            "warnings": m.get("warnings", []),
            "seconds": record.seconds,
        }
        if json_out:
            emit_json(result)
            return
        print_scores(m["scores"], m["block_ids"], set(m["removed_blocks"]), f"block scores (low = removed first): {model}")
        for w in result["warnings"]:
            console.print(f"[yellow]warning:[/] {w}")
        fid = m["fidelity_deterministic"]["pooled_cosine_mean"]
        line = (
            f"removed {len(m['removed_blocks'])} of {len(m['block_ids'])} blocks {m['removed_blocks']}: "
            f"params {m['params_before'] / 1e6:.2f}M -> {m['params_after'] / 1e6:.2f}M, MACs x{m['macs_ratio']:.3f}, "
            f"pooled cosine to input {fid:.4f} (deterministic inputs)"
        )
        if result["fidelity_data"]:
            line += f", {result['fidelity_data']['pooled_cosine_mean']:.4f} on {data}"
        console.print(line, highlight=False)
        console.print(f"wrote {out}", highlight=False)
