"""``mimc tokens``: static token reduction (ToMe merging, attention top-k, MAE patch dropping)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc.errors import ConfigError
from mimc.cli.common import MODEL_HELP, JsonOption, console, emit_json, handle_errors

EPILOG = (
    "Examples: mimc tokens ref --method tome --r 8 -o out/tome | "
    "mimc tokens ref --method topk --keep 0.7 --at 4,7,10 -o out/topk | "
    "mimc tokens ref --method drop --keep 0.5 --pattern grid -o out/drop"
)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of whole numbers: pass e.g. {option} 4,7,10") from None
    if not values:
        raise ConfigError(f"{option} is empty: pass e.g. {option} 4,7,10")
    return values


def build_config(method: str, r: Optional[str], inflection: float, keep: Optional[float], at: Optional[str],
                 fuse: bool, pattern: str, prop_attn: bool):
    """CLI options -> TokenReductionConfig (raises ConfigError on anything out of range)."""
    from mimc.compression.tokens import TokenReductionConfig

    options: dict = {"method": method, "inflection": inflection, "keep": keep, "fuse": fuse, "pattern": pattern, "prop_attn": prop_attn}
    if r is not None:
        values = _int_list(r, "--r")
        if len(values) == 1:
            options["r"] = values[0]
        else:
            options["r_list"] = values
    if at is not None:
        options["at"] = _int_list(at, "--at")
    if method == "tome" and r is None:
        raise ConfigError("--method tome needs --r (tokens merged per block, e.g. --r 8, or one value per block: --r 16,12,8)")
    return TokenReductionConfig(**options)


def register(app: typer.Typer) -> None:
    @app.command("tokens", epilog=EPILOG)
    @handle_errors(flags={"r_list": "--r"})
    def tokens(
        model: str = typer.Argument(..., help=MODEL_HELP),
        output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
        method: str = typer.Option("tome", "--method", help="tome (merge r per block), topk (EViT-style) or drop (patches before block 1)."),
        r: Optional[str] = typer.Option(None, "--r", help="ToMe: tokens merged per block, or a comma list, one value per block."),
        inflection: float = typer.Option(0.0, "--inflection", help="ToMe: < 0 makes the schedule decrease over depth (ToMe's (r, inflection))."),
        keep: Optional[float] = typer.Option(None, "--keep", help="topk / drop: fraction of patch tokens kept, in (0, 1] (default 0.7 / 0.5)."),
        at: Optional[str] = typer.Option(None, "--at", help="topk: 1-based blocks that select tokens, e.g. 4,7,10 (default: EViT's, scaled to the depth)."),
        fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="topk: fuse the dropped tokens into one, attention-weighted."),
        pattern: str = typer.Option("grid", "--pattern", help="drop: grid (fixed even pattern; tubes for video) or variance (per image, by patch pixel variance)."),
        prop_attn: bool = typer.Option(False, "--prop-attn/--no-prop-attn", help="ToMe: add log(token size) to attention logits (for models trained with it)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
        json_out: bool = JsonOption,
    ) -> None:
        """Reduce the tokens every block sees, with static shapes that export to ONNX."""
        from mimc.artifact import check_output, save_artifact
        from mimc.compression.registry import compress
        from mimc.models.resolve import load_model

        config = build_config(method, r, inflection, keep, at, fuse, pattern, prop_attn)  # bad options fail before any work
        check_output(output, overwrite)
        encoder = load_model(model)
        with console.status(f"reducing tokens ({config.method}) and measuring fidelity"):
            new, record = compress(encoder, config)
        save_artifact(new, output, overwrite=overwrite)
        metrics = record.metrics
        result = {"output": str(output), "stage": record.name, "config": record.config, "metrics": metrics}
        if json_out:
            emit_json(result)
            return
        fid = metrics["fidelity_deterministic"]
        console.print(
            f"[bold]{config.method}[/]: tokens per block {metrics['tokens_per_block']}; "
            f"MACs {metrics['macs_ratio']:.3f}x of dense (theoretical speed-up {metrics['theoretical_speedup']:.2f}x); "
            f"pooled cosine to the input model {fid['pooled_cosine_mean']:.4f} (min {fid['pooled_cosine_min']:.4f})",
            highlight=False,
            soft_wrap=True,
        )
        console.print(f"wrote {output}", highlight=False, soft_wrap=True)
