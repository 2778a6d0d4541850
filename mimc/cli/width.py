"""``mimc width MODEL --mlp 0.5 --heads 0.25``: remove MLP neurons and attention heads from every block."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, console, emit_json, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("width")
    @handle_errors
    def width(
        model: str = typer.Argument("ref", help=MODEL_HELP),
        mlp: float = typer.Option(0.0, "--mlp", help="Fraction of each block's MLP hidden neurons to remove, in [0, 1)."),
        heads: float = typer.Option(0.0, "--heads", help="Fraction of each block's attention heads to remove, in [0, 1)."),
        criterion: str = typer.Option("l2", "--criterion", help="l2 (data-free weight norms), activation or optin (both need --data)."),
        macs: Optional[float] = typer.Option(None, "--macs", help="Keep this ratio of the dense MACs, heads and neurons allocated per block (instead of --mlp/--heads)."),
        round_to: int = typer.Option(16, "--round-to", help="Keep MLP widths a multiple of this (GEMM tiles)."),
        data: Optional[str] = typer.Option(None, "--data", help="Images for --criterion activation and data fidelity."),
        n: int = typer.Option(64, "--n", help="Use at most this many images from --data."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-narrow)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Structured width pruning: a narrower ViT (per-block widths in its config) that exports like any other."""
        from mimc.artifact import save_artifact
        from mimc.compression.registry import compress
        from mimc.compression.width import WidthPruningConfig
        from mimc.data import load_images
        from mimc.errors import DataError
        from mimc.models.resolve import load_model
        from mimc.models.resolve import model_slug
        from mimc.artifact import check_output

        config = WidthPruningConfig(mlp=mlp, heads=heads, criterion=criterion, round_to=round_to, macs=macs)
        if config.needs_data and data is None:
            raise DataError(f"criterion '{criterion}' measures activations on images: pass --data DIR (a folder, .npy/.npz or 'builtin')")
        out = output if output is not None else Path(f"{model_slug(model)}-narrow")
        check_output(out, overwrite)
        with console.status(f"loading {model}"):
            encoder = load_model(model)
        batches = list(load_images(data, encoder.config, n=n, seed=seed).batches(32)) if data is not None else None
        with console.status("scoring heads and neurons"):
            new, record = compress(encoder, config, batches)
        save_artifact(new, out, overwrite=overwrite)
        m = record.metrics
        result = {"output": str(out), "config": record.config, **{k: v for k, v in m.items() if k not in ("kept_neurons",)}}
        if json_out:
            emit_json(result)
            return
        fid = m["fidelity_deterministic"]["pooled_cosine_mean"]
        line = (f"MLP widths {sorted(set(m['mlp_dims']))}, heads {sorted(set(m['heads']))} per block: params "
                f"{m['params_before'] / 1e6:.2f}M -> {m['params_after'] / 1e6:.2f}M, MACs x{m['macs_ratio']:.3f}, "
                f"pooled cosine to input {fid:.4f} (deterministic inputs)")
        if m.get("fidelity_data"):
            line += f", {m['fidelity_data']['pooled_cosine_mean']:.4f} on {data}"
        console.print(line, highlight=False)
        console.print(f"wrote {out}", highlight=False)
