"""``mimc width MODEL --mlp 0.5 --heads 0.25``: remove MLP neurons and attention heads from every block."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, ModelArgument, OverwriteOption, SeedOption, handle_errors, reads_images, status
from mimc.cli.render import line, show, shrink_phrase


def register(app: typer.Typer) -> None:
    @app.command("width")
    @handle_errors
    @reads_images()
    def width(
        model: str = ModelArgument,
        mlp: float = typer.Option(0.0, "--mlp", help="Fraction of each block's MLP hidden neurons to remove, in [0, 1)."),
        heads: float = typer.Option(0.0, "--heads", help="Fraction of each block's attention heads to remove, in [0, 1)."),
        criterion: str = typer.Option("l2", "--criterion", help="l2 (data-free weight norms), activation or optin (both need --data)."),
        macs: Optional[float] = typer.Option(None, "--macs", help="Keep this ratio of the dense MACs, heads and neurons allocated per block (instead of --mlp/--heads)."),
        round_to: int = typer.Option(16, "--round-to", help="Keep MLP widths a multiple of this (GEMM tiles)."),
        data: Optional[str] = typer.Option(None, "--data", help="Images for --criterion activation and data fidelity."),
        n: int = typer.Option(64, "--n", help="Use at most this many images from --data."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default ./<model>-narrow)."),
        overwrite: bool = OverwriteOption,
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Structured width pruning: a narrower ViT (per-block widths in its config) that exports like any other."""
        with status("scoring heads and neurons"):
            report = api.width(model, output, data=data, n=n, seed=seed, overwrite=overwrite, mlp=mlp, heads=heads,
                                criterion=criterion, round_to=round_to, macs=macs)
        show(report, json_out, lambda r: _human(r, data))


def _human(r: dict, data: str | None) -> None:
    m = r["metrics"]
    line(f"MLP widths {sorted(set(m['mlp_dims']))}, heads {sorted(set(m['heads']))} per block: "
         + shrink_phrase(m, data))
    line(f"wrote {r['output']}")
