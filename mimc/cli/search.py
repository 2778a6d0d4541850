"""``mimc search MODEL --device cpu --min-cosine 0.98 [--budget-ms 60]``: the fastest faithful combination."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from mimc import api
from mimc.cli.common import JsonOption, ModelArgument, SeedOption, float_list, handle_errors, reads_images, status
from mimc.cli.render import columns, line, show


def register(app: typer.Typer) -> None:
    @app.command("search")
    @handle_errors(flags={"block_ratios": "--blocks", "token_keeps": "--keep", "mlp_ratios": "--mlp"})
    @reads_images()
    def search_(
        model: str = ModelArgument,
        device: str = typer.Option("cpu", "--device", help="Target profile (cpu measured here; others predicted by roofline) or a .yaml."),
        min_cosine: float = typer.Option(0.98, "--min-cosine", help="Required mean pooled cosine to the dense model on held-out images."),
        budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help="Latency budget (batch 1): reported as met or not."),
        data: str = typer.Option("builtin", "--data", help="Images: a folder, .npz/.npy or 'builtin' (calibration + held-out)."),
        n: int = typer.Option(64, "--n", help="Calibration images (int8/fp8, Wanda)."),
        n_eval: int = typer.Option(64, "--n-eval", help="Held-out images the fidelity is measured on."),
        blocks: str = typer.Option("0,0.25,0.5", "--blocks", help="Fractions of blocks to remove."),
        keep: str = typer.Option("1,0.75,0.5", "--keep", help="Fractions of patches to keep (MAE-native grid drop)."),
        mlp: str = typer.Option("0", "--mlp", help="Fractions of every block's MLP neurons to remove (width stage), e.g. 0,0.5."),
        width_macs: str = typer.Option("", "--width-macs", help="MAC ratios of a global width allocation, e.g. 0.7,0.6 (see --width-criterion)."),
        width_criterion: str = typer.Option("activation", "--width-criterion", help="l2, activation or optin for --width-macs."),
        precisions: Optional[str] = typer.Option(None, "--precisions", help="e.g. fp32,int8 (default: what the device runs)."),
        runtimes: Optional[str] = typer.Option(None, "--runtimes", help="CPU runtimes measured (--device cpu): ort, openvino, e.g. ort (default: every one installed here: ort, plus openvino when it is installed)."),
        nm: Optional[bool] = typer.Option(None, "--nm/--no-nm", help="Try 2:4 weights (default: where the device has sparse tensor cores)."),
        iters: int = typer.Option(20, "--iters", help="Timed runs per candidate when measuring."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for search.json and the best candidate's recipe.yaml (default ./<model>-search)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Build and measure every combination of blocks x tokens (x 2:4) x precision; Pareto front + the fastest faithful one."""
        space = api.SearchSpace(block_ratios=float_list(blocks, "--blocks"), token_keeps=float_list(keep, "--keep"),
                                 mlp_ratios=float_list(mlp, "--mlp"), nm=nm, width_macs=float_list(width_macs, "--width-macs"),
                                 width_criterion=width_criterion, runtimes=tuple(x.strip() for x in runtimes.split(",") if x.strip()) if runtimes is not None else None,
                                 precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()) if precisions else None)
        with status("searching") as spinner:
            report = api.search(model, device, min_cosine=min_cosine, budget_ms=budget_ms, data=data, n=n, n_eval=n_eval,
                                 space=space, iters=iters, seed=seed, output=output, overwrite=overwrite,
                                 on_candidate=lambda i, total, c: spinner.update(f"candidate {i}/{total}: {c.label}"))
        show(report, json_out, _human)


def _human(r: dict) -> None:
    best = (r["best"] or {}).get("label")
    rows = []
    for c in sorted(r["candidates"], key=lambda c: (c["latency_ms"] is None, c["latency_ms"] or 0)):
        if c["error"]:
            rows.append([c["label"], c["runtime"], "", "", "", f"[red]{c['error']}[/]"])
            continue
        mark = "[green]best[/]" if c["label"] == best else ("pareto" if c["pareto"] else "")
        dim = (lambda t: t) if c["pooled_cosine_mean"] >= r["min_cosine"] else (lambda t: f"[dim]{t}[/]")
        rows.append([dim(c["label"]), dim(c["runtime"]), dim(f"{c['gmacs']:.3f}"), dim(f"{c['latency_ms']:.3g}"), dim(f"{c['pooled_cosine_mean']:.4f}"), mark])
    columns(f"{r['model']} on {r['device']}: latency {r['latency']}, fidelity on {r['n_eval_images']} held-out images",
            ["candidate", "runtime", "GMACs", "ms", "pooled cosine", ""], rows, left=("candidate", "runtime", ""))
    for s in r.get("skipped") or []:
        line(f"[yellow]skipped {s['precision'] + ' on ' if s.get('precision') else ''}{s['runtime']}: {escape(s['reason'])}[/]")
    if r["best"] is None:
        line(f"[yellow]{r['note']}[/]")
        line(f"wrote {r['output']}/search.json")
        return
    b = r["best"]
    text = f"best: {b['label']}, {b['latency_ms']:.3g} ms ({b['latency']}), pooled cosine {b['pooled_cosine_mean']:.4f}"
    if r["budget_ms"] is not None:
        text += f"; budget {r['budget_ms']} ms {'met' if r['meets_budget'] else '[red]NOT met[/]'}"
    line(text)
    line(f"wrote {r['output']}/search.json and {r['output']}/recipe.yaml: `mimc run {r['output']}/recipe.yaml -o OUT` builds it")
