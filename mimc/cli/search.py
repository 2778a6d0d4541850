"""``mimc search MODEL --device cpu --min-cosine 0.98 [--budget-ms 60]``: the fastest faithful combination."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc.cli.common import JsonOption, MODEL_HELP, SeedOption, console, emit_json, handle_errors


def _floats(text: str, option: str) -> tuple[float, ...]:
    from mimc.errors import ConfigError

    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers like 0,0.25,0.5, got '{text}'") from None


def register(app: typer.Typer) -> None:
    @app.command("search")
    @handle_errors
    def search_(
        model: str = typer.Argument("ref", help=MODEL_HELP),
        device: str = typer.Option("cpu", "--device", help="Target profile (cpu measured here; others predicted by roofline) or a .yaml."),
        min_cosine: float = typer.Option(0.98, "--min-cosine", help="Required mean pooled cosine to the dense model on held-out images."),
        budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help="Latency budget (batch 1): reported as met or not."),
        data: str = typer.Option("builtin", "--data", help="Images: a folder, .npz/.npy or 'builtin' (calibration + held-out)."),
        n: int = typer.Option(64, "--n", help="Calibration images (int8/fp8, Wanda)."),
        n_eval: int = typer.Option(64, "--n-eval", help="Held-out images the fidelity is measured on."),
        blocks: str = typer.Option("0,0.25,0.5", "--blocks", help="Fractions of blocks to remove."),
        keep: str = typer.Option("1,0.75,0.5", "--keep", help="Fractions of patches to keep (MAE-native grid drop)."),
        mlp: str = typer.Option("0", "--mlp", help="Fractions of every block's MLP neurons to remove (width stage), e.g. 0,0.5."),
        precisions: Optional[str] = typer.Option(None, "--precisions", help="e.g. fp32,int8 (default: what the device runs)."),
        nm: Optional[bool] = typer.Option(None, "--nm/--no-nm", help="Try 2:4 weights (default: where the device has sparse tensor cores)."),
        iters: int = typer.Option(20, "--iters", help="Timed runs per candidate when measuring."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for search.json and the best candidate's recipe.yaml."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
        seed: int = SeedOption,
        json_out: bool = JsonOption,
    ) -> None:
        """Build and measure every combination of blocks x tokens (x 2:4) x precision; Pareto front + the fastest faithful one."""
        import json

        import numpy as np
        import yaml
        from rich.table import Table

        from mimc.artifact import atomic_dir
        from mimc.data import load_images
        from mimc.errors import ConfigError
        from mimc.models.resolve import load_model
        from mimc.latency.devices import load_profile
        from mimc.pipeline.search import SearchSpace, recipe_of, search
        from mimc.models.resolve import model_slug
        from mimc.artifact import check_output

        if n < 1 or n_eval < 1 or iters < 1:
            raise ConfigError(f"--n, --n-eval and --iters must be >= 1 (got {n}, {n_eval}, {iters})")
        space = SearchSpace(block_ratios=_floats(blocks, "--blocks"), token_keeps=_floats(keep, "--keep"), mlp_ratios=_floats(mlp, "--mlp"),
                            precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()) if precisions else None, nm=nm)
        load_profile(device)
        out = output if output is not None else Path(f"{model_slug(model)}-search")
        check_output(out, overwrite)
        with console.status(f"loading {model} and {data}"):
            encoder = load_model(model)
            images = load_images(data, encoder.config, n=n + n_eval, seed=seed)
        if len(images) <= n:
            raise ConfigError(f"{data} has {len(images)} images, fewer than --n {n} plus held-out ones: lower --n")
        calib, held = images.subset(np.arange(n)), images.subset(np.arange(n, len(images)))
        with console.status("searching") as status:
            result = search(encoder, device, held, calib, space, min_cosine=min_cosine, budget_ms=budget_ms, iters=iters,
                            on_candidate=lambda i, total, c: status.update(f"candidate {i}/{total}: {c.label}"))
        # a profile .yaml is named by its absolute path: the recipe may run from another folder
        spec = str(Path(device).resolve()) if Path(device).suffix in (".yaml", ".yml") and Path(device).is_file() else device
        recipe = recipe_of(result, model, data, n, seed, device=spec)
        result = {"model": model, "data": data, **result}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "search.json").write_text(json.dumps(result, indent=2) + "\n")
            if recipe is not None:
                (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))
        if json_out:
            emit_json(result)
            return
        table = Table(title=f"{model} on {result['device']}: latency {result['latency']}, fidelity on {result['n_eval_images']} held-out images",
                      title_justify="left")
        for col in ("candidate", "GMACs", "ms", "pooled cosine", ""):
            table.add_column(col, justify="left" if col in ("candidate", "") else "right")
        best = (result["best"] or {}).get("label")
        for c in sorted(result["candidates"], key=lambda c: (c["latency_ms"] is None, c["latency_ms"] or 0)):
            if c["error"]:
                table.add_row(c["label"], "", "", "", f"[red]{c['error']}[/]")
                continue
            mark = "[green]best[/]" if c["label"] == best else ("pareto" if c["pareto"] else "")
            style = None if c["pooled_cosine_mean"] >= min_cosine else "dim"
            table.add_row(c["label"], f"{c['gmacs']:.3f}", f"{c['latency_ms']:.3g}", f"{c['pooled_cosine_mean']:.4f}", mark, style=style)
        console.print(table)
        if result["best"] is None:
            console.print(f"[yellow]{result['note']}[/]", highlight=False)
        else:
            b = result["best"]
            line = f"best: {b['label']}, {b['latency_ms']:.3g} ms ({b['latency']}), pooled cosine {b['pooled_cosine_mean']:.4f}"
            if budget_ms is not None:
                line += f"; budget {budget_ms} ms {'met' if result['meets_budget'] else '[red]NOT met[/]'}"
            console.print(line, highlight=False)
            console.print(f"wrote {out}/search.json and {out}/recipe.yaml: `mimc run {out}/recipe.yaml -o OUT` builds it", highlight=False)
