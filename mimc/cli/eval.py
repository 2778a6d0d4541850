"""``mimc eval MODEL --ref REF --data DIR``: feature fidelity to a reference and k-NN top-1."""
from __future__ import annotations

from typing import Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, console, emit_json, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @handle_errors
    def eval_(
        model: str = typer.Argument(..., help=MODEL_HELP + " Also a .onnx file written by `mimc export`."),
        ref: Optional[str] = typer.Option(None, "--ref", help="Reference MODEL to compare features with (e.g. the dense source, 'ref')."),
        data: str = typer.Option("builtin", "--data", help="An image folder (class subfolders give k-NN), a .npy/.npz file, or 'builtin'."),
        n: Optional[int] = typer.Option(None, "--n", help="Evaluate on a seeded subset of this many images."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Cosine of pooled and per-token features to --ref, SQNR, and k-NN top-1 on labelled data."""
        from rich.table import Table

        from mimc.errors import BadInputError
        from mimc.evaluate import evaluate, load_for_eval

        if n is not None and n < 1:
            raise BadInputError(f"--n must be >= 1, got {n}")
        if batch_size < 1:
            raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
        with console.status(f"loading {model}" + (f" and {ref}" if ref else "")):
            cand = load_for_eval(model)
            reference = load_for_eval(ref) if ref is not None else None
        with console.status(f"evaluating on {data}"):
            report = evaluate(cand, reference, data=data, n=n, seed=seed, batch_size=batch_size)
        report = {"model": model, "reference": ref, **report}
        if json_out:
            emit_json(report)
            return

        d = report["data"]
        table = Table(title=f"{model} on {d['source']} ({d['n_images']} images)", title_justify="left", show_header=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        fid = report.get("fidelity")
        if fid:
            table.add_row(f"pooled cosine to {ref} (mean / min)", f"{fid['pooled_cosine_mean']:.4f} / {fid['pooled_cosine_min']:.4f}")
            if fid["token_cosine_mean"] is not None:
                table.add_row("per-token cosine (mean / min)", f"{fid['token_cosine_mean']:.4f} / {fid['token_cosine_min']:.4f}")
            table.add_row("SQNR of pooled features", f"{fid['sqnr_db']:.1f} dB")
        if "knn_top1" in report:
            table.add_row("k-NN top-1 (k=10, leave-one-out)", f"{report['knn_top1']:.4f}")
            if "reference_knn_top1" in report:
                table.add_row(f"k-NN top-1 of {ref}", f"{report['reference_knn_top1']:.4f}")
        console.print(table)
        for note in (report.get("fidelity_note"), fid.get("note") if fid else None):
            if note:
                console.print(f"note: {note}", highlight=False)
        if "knn_top1" not in report:
            console.print("note: the data has no labels (no class subfolders / 'labels' array): k-NN skipped", highlight=False)
        if ref is None:
            console.print("note: pass --ref MODEL to measure fidelity to a reference", highlight=False)
