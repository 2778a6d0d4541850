"""``mimc run RECIPE.yaml | ARTIFACT``: every stage of a recipe, validated first, into one artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc.cli.common import JsonOption, console, emit_json, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("run")
    @handle_errors
    def run(
        recipe: Path = typer.Argument(..., help="A recipe .yaml (see mimc/pipeline/recipe.py), or an artifact directory to replay."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default: the recipe's 'output', else ./<model>-recipe)."),
        data: Optional[str] = typer.Option(None, "--data", help="Override the recipe's images (a folder, .npz/.npy or 'builtin')."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        force: bool = typer.Option(False, "--force", help="Write a quantized graph even when it fails its fidelity gate."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved recipe (YAML); run nothing."),
        json_out: bool = JsonOption,
    ) -> None:
        """Run a recipe: model stages (prune, width, tokens, sparsify, distill) then graph stages (export, quantize, profile, eval)."""
        import yaml

        from mimc.pipeline.recipe import load_recipe
        from mimc.pipeline.recipe_run import default_output, run_recipe

        parsed = load_recipe(recipe, data=data)
        if parsed.note:
            console.print(f"[yellow]note: {parsed.note}[/]", highlight=False)
        if dry_run:
            typer.echo(yaml.safe_dump(parsed.to_dict(), sort_keys=False, default_flow_style=None), nl=False)
            return
        out = output if output is not None else default_output(parsed)
        with console.status("starting") as status:
            report = run_recipe(parsed, out, overwrite=overwrite, force=force,
                                on_stage=lambda i, step: status.update(f"stage {i}/{len(parsed.steps)}: {step.kind}"))
        if json_out:
            emit_json(report)
            return
        for entry in report["stages"]:
            console.print(f"  {entry['stage']:<9} {entry['seconds']:>8.2f} s  {summarize(entry)}", highlight=False)
        console.print(f"wrote {out} ({report['seconds']:.1f} s); replay with `mimc run {out}`", highlight=False)


def summarize(entry: dict) -> str:
    """One line per stage: the fidelity or latency it measured, and against what."""
    kind, metrics = entry["stage"], entry.get("metrics", {})
    if kind == "export":
        val = (entry.get("validation") or {}).get("fidelity") or {}
        return f"validated on ONNX Runtime, max abs {val['max_abs']:.2e}" if isinstance(val.get("max_abs"), (int, float)) else ""
    if kind == "quantize":
        fid = entry["validation"]["fidelity"]
        return f"pooled cosine to the fp32 graph {fid['pooled_cosine_mean']:.5f} (worst {fid['pooled_cosine_min']:.5f}), {entry['file']}"
    if kind == "profile":
        result, label = entry["result"], entry["result"].get("label", "measured")
        line = f"{entry['file']} on {result.get('device')} ({label})"
        if entry.get("speedup_vs_dense") is not None:
            line += f": {entry['speedup_vs_dense']:.2f}x the dense source"
        return line
    if kind == "eval":
        parts = [entry["file"]]
        if isinstance(entry.get("fidelity"), dict):
            parts.append(f"pooled cosine to the source {entry['fidelity']['pooled_cosine_mean']:.4f}")
        if "knn_top1" in entry:
            parts.append(f"k-NN {entry['knn_top1']:.3f}" + (f" (source {entry['reference_knn_top1']:.3f})" if "reference_knn_top1" in entry else ""))
        return ", ".join(parts)
    fid = metrics.get("fidelity_deterministic") or metrics.get("fidelity") or metrics.get("fidelity_data") or {}
    parts = []
    if isinstance(fid, dict) and isinstance(fid.get("pooled_cosine_mean"), (int, float)):
        against = f"the teacher ({metrics['teacher']})" if "teacher" in metrics else "its input"  # distillation
        parts.append(f"pooled cosine to {against} {fid['pooled_cosine_mean']:.4f}")
        before = metrics.get("fidelity_data_before")
        if isinstance(before, dict) and isinstance(before.get("pooled_cosine_mean"), (int, float)):
            parts[-1] += f" (before {before['pooled_cosine_mean']:.4f})"
    if isinstance(metrics.get("macs_ratio"), (int, float)):
        parts.append(f"MACs x{metrics['macs_ratio']:.3f}")
    return ", ".join(parts)
