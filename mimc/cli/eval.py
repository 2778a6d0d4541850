"""``mimc eval MODEL --ref REF --data DIR [--val DIR]``: feature fidelity to a reference and k-NN top-1."""
from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from mimc import api
from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, handle_errors, reads_images, status
from mimc.cli.render import columns, note, show


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @handle_errors
    @reads_images("data", "val")
    def eval_(
        model: str = typer.Argument(..., help=MODEL_HELP + " Or a mimc .onnx graph, an OpenVINO .xml IR or a TensorRT .engine/.plan."),
        ref: Optional[str] = typer.Option(None, "--ref", help="Reference MODEL to compare features with (e.g. the dense source, 'ref')."),
        data: str = typer.Option("builtin", "--data", help="An image folder (class subfolders give k-NN), a .npy/.npz file, or 'builtin'."),
        val: Optional[str] = typer.Option(None, "--val", help="Labelled val images: k-NN of each against --data as gallery, fidelity on them."),
        n: Optional[int] = typer.Option(None, "--n", "--n-images", help="Evaluate on a seeded subset of this many images of each set (--n-images under torchrun, which takes --n as its own)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda for both models (default: cpu; a TensorRT engine: its GPU)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU inference threads (default: the runtime's own)."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Cosine of pooled and per-token features to --ref, SQNR, and k-NN top-1 on labelled data."""
        with status(f"evaluating {model} on {data}" + (f" and {val}" if val else "")):
            report = api.evaluate(model, ref, data, val=val, n=n, seed=seed, batch_size=batch_size, device=device, threads=threads)
        if report.get("rank", 0) == 0:  # under torchrun, rank 0 reports
            show(report, json_out, _human)
            for part in (report["data"], report.get("val")):
                if n and part and part["n_images"] < n:
                    note(escape(f"{part['source']} holds {part['n_images']} images, fewer than --n {n}: evaluated all of them"))


def _human(r: dict) -> None:
    d, fid, ref, v = r["data"], r.get("fidelity"), r.get("reference"), r.get("val")
    rows = []
    if fid:
        rows.append([f"pooled cosine to {ref} on {r['fidelity_on']} (mean / min)", f"{fid['pooled_cosine_mean']:.4f} / {fid['pooled_cosine_min']:.4f}"])
        if fid["token_cosine_mean"] is not None:
            rows.append(["per-token cosine (mean / min)", f"{fid['token_cosine_mean']:.4f} / {fid['token_cosine_min']:.4f}"])
        rows.append(["SQNR of pooled features", f"{fid['sqnr_db']:.1f} dB"])
    if "knn_top1" in r:
        how = "leave-one-out" if r["knn_protocol"] == "leave-one-out" else f"{r['knn_query_size']} val vs {r['knn_gallery_size']} gallery"
        rows.append([f"k-NN top-1 (k={r['knn_k']}, {how})", f"{r['knn_top1']:.4f}"])
        if "reference_knn_top1" in r:
            rows.append([f"k-NN top-1 of {ref}", f"{r['reference_knn_top1']:.4f}"])
    where = f"{d['source']} ({d['n_images']} images)" + (f", val {v['source']} ({v['n_images']} images)" if v else "")
    runtime = f" ({r['runtime']})" if r.get("runtime") not in (None, "torch") else ""
    columns(f"{r['model']}{runtime} on {where}", ["metric", "value"], rows, left=("metric",))
    for text in (r.get("fidelity_note"), fid.get("note") if fid else None):
        if text:
            note(text)
    if r.get("knn_val_in_data"):
        note(f"{r['knn_val_in_data']} of {v['n_images']} val images are also in the data: they find themselves, so k-NN top-1 is inflated")
    if "knn_top1" not in r:
        note(r.get("knn_note") or "the data has no labels (no class subfolders / 'labels' array): k-NN skipped")
    if ref is None:
        note("pass --ref MODEL to measure fidelity to a reference")
