"""``mimc run RECIPE.yaml | ARTIFACT``: every stage of a recipe, validated first, into one artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, OverwriteOption, emit_json, handle_errors, status
from mimc.cli.render import line, note, run_summary, show


def register(app: typer.Typer) -> None:
    @app.command("run")
    @handle_errors
    def run(
        recipe: Path = typer.Argument(..., help="A recipe .yaml (see mimc/pipeline/recipe.py), or an artifact directory to replay."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Artifact directory to write (default: the recipe's 'output', else ./<model>-recipe)."),
        data: Optional[str] = typer.Option(None, "--data", help="Override the recipe's images (a folder, .npz/.npy or 'builtin')."),
        overwrite: bool = OverwriteOption,
        force: bool = typer.Option(False, "--force", help="Write a quantized graph even when it fails its fidelity gate."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved recipe (YAML; JSON with --json); run nothing."),
        json_out: bool = JsonOption,
    ) -> None:
        """Run a recipe: model stages (prune, width, tokens, sparsify, distill) then graph stages (export, quantize, build, profile, eval)."""
        parsed = api.recipe(recipe, data=data)
        if parsed.note:
            note(parsed.note)
        if dry_run:  # the resolved recipe: YAML, or with --json the same mapping as JSON
            api.run(parsed, output, overwrite=overwrite, force=force, dry_run=True)  # refuses what the run would (-o, model, images)
            emit_json(parsed.to_dict()) if json_out else typer.echo(parsed.to_yaml(), nl=False)
            return
        with status("starting") as spinner:
            report = api.run(parsed, output, overwrite=overwrite, force=force,
                              on_stage=lambda i, step: spinner.update(f"stage {i}/{len(parsed.steps)}: {step.name}"))
        show(report, json_out, _human)


def _human(r: dict) -> None:
    for entry in r["stages"]:
        line(f"  {entry['stage']:<9} {entry['seconds']:>8.2f} s  {run_summary(entry)}")
    line(f"wrote {r['output']} ({r['seconds']:.1f} s); replay with `mimc run {r['output']}`")
    if "replay" in r:  # a replay of an artifact: did it reproduce it?
        same, differ = r["replay"]["identical"], r["replay"]["differ"]
        line(f"replay of {r['replay']['of']}: " + (f"{', '.join(differ)} differ" if differ else f"identical ({', '.join(same)})"))
