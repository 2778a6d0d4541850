"""``mimc embed MODEL|GRAPH|ENGINE --data SRC -o feats``: features of every image, streamed to disk.

``-o feats.npy`` (or no suffix) writes float32 rows and a ``feats.json`` index beside them (file
name, position, label per row; class names, model, source, counts); ``-o feats.parquet`` writes one
Parquet file. Under ``torchrun`` every rank embeds its shard and rank 0 writes the one output.
"""
from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from mimc import api
from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, handle_errors, rate_progress, reads_images
from mimc.cli.render import key_values, note, show

DATA_HELP = ("An image folder (class subfolders give labels), a .npy/.npz, WebDataset shards ('train-{000..009}.tar'), "
             "a saved datasets folder, or 'builtin'.")


def register(app: typer.Typer) -> None:
    @app.command("embed")
    @handle_errors
    @reads_images("data")
    def embed(
        model: str = typer.Argument(..., help=MODEL_HELP + " Or a mimc .onnx graph, an OpenVINO .xml IR or a TensorRT .engine/.plan."),
        data: str = typer.Option(..., "--data", help=DATA_HELP),
        output: str = typer.Option(..., "-o", "--output", help="feats.npy (+ feats.json index; no suffix: .npy) or feats.parquet."),
        tokens: bool = typer.Option(False, "--tokens", help="Every output token per image (N, T, D) instead of the pooled feature (N, D)."),
        n: Optional[int] = typer.Option(None, "--n", "--n-images", help="Embed a seeded subset of this many images (default: all; --n-images under torchrun, which takes --n as its own)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass (default: a static graph's batch, else 32)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cpu; a TensorRT engine: its GPU)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU inference threads (default: the runtime's own)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Run the encoder over a data source in batches and write its features (.npy + index, or .parquet)."""
        with rate_progress("embedding") as tick:
            report = api.embed(model, data, output, tokens=tokens, n=n, seed=seed, batch_size=batch_size,
                               device=device, threads=threads, overwrite=overwrite, on_progress=tick)
        if report.written:  # under torchrun, rank 0 writes and reports
            show(report, json_out, _human)
            if report.n is not None and report.images + report.skipped < report.n:
                note(escape(f"{report.source} holds {report.images + report.skipped} images, fewer than --n {report.n}: embedded all of them"))


def _human(r: dict) -> None:
    rows = [("runtime", f"{r['runtime']} ({r['device']})"), ("images", str(r["images"])),
            ("features", f"{r['format']} {r['shape']} float32"),
            ("speed", f"{r['images_per_second']} images/s ({r['seconds']:.1f} s, batch {r['batch_size']}, {r['workers']} decoding workers)")]
    if r["index"]:
        rows.append(("index", escape(r["index"])))
    key_values(escape(f"embedded {r['source']} with {r['model']} -> {r['output']}"), rows)
    if r["skipped"]:
        names = escape(", ".join(r["skipped_names"]))
        note(f"skipped {r['skipped']} unreadable image(s): {names}" + (" ..." if r["skipped"] > 20 else ""))
