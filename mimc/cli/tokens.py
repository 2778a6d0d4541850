"""``mimc tokens``: static token reduction (ToMe merging, attention top-k, MAE patch dropping)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mimc import api
from mimc.cli.common import MODEL_HELP, JsonOption, handle_errors, int_list, status
from mimc.cli.render import line, show

EPILOG = (
    "Examples: mimc tokens ref --method tome --r 8 -o out/tome | "
    "mimc tokens ref --method topk --keep 0.7 --at 4,7,10 -o out/topk | "
    "mimc tokens ref --method drop --keep 0.5 --pattern grid -o out/drop"
)


def register(app: typer.Typer) -> None:
    @app.command("tokens", epilog=EPILOG)
    @handle_errors(flags={"r_list": "--r"})
    def tokens(
        model: str = typer.Argument(..., help=MODEL_HELP),
        output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
        method: str = typer.Option("tome", "--method", help="tome (merge r per block), topk (EViT-style) or drop (patches before block 1)."),
        r: Optional[str] = typer.Option(None, "--r", help="ToMe: tokens merged per block, or a comma list, one value per block."),
        inflection: float = typer.Option(0.0, "--inflection", help="ToMe: < 0 makes the schedule decrease over depth (ToMe's (r, inflection))."),
        keep: Optional[float] = typer.Option(None, "--keep", help="topk / drop: fraction of patch tokens kept, in (0, 1) (default 0.7 / 0.5)."),
        at: Optional[str] = typer.Option(None, "--at", help="topk: 1-based blocks that select tokens, e.g. 4,7,10 (default: EViT's, scaled to the depth)."),
        fuse: bool = typer.Option(True, "--fuse/--no-fuse", help="topk: fuse the dropped tokens into one, attention-weighted."),
        pattern: str = typer.Option("grid", "--pattern", help="drop: grid (fixed even pattern; tubes for video) or variance (per image, by patch pixel variance)."),
        prop_attn: bool = typer.Option(False, "--prop-attn/--no-prop-attn", help="ToMe: add log(token size) to attention logits (for models trained with it)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
        json_out: bool = JsonOption,
    ) -> None:
        """Reduce the tokens every block sees, with static shapes that export to ONNX."""
        rs = int_list(r, "--r")
        options = dict(method=method, inflection=inflection, keep=keep, fuse=fuse, pattern=pattern, prop_attn=prop_attn,
                       at=int_list(at, "--at"), **({"r": rs[0]} if rs and len(rs) == 1 else {"r_list": rs} if rs else {}))
        with status(f"reducing tokens ({method}) and measuring fidelity"):
            report = api.tokens(model, output, overwrite=overwrite, **{k: v for k, v in options.items() if v is not None})
        show(report, json_out, _human)


def _human(r: dict) -> None:
    m, fid = r["metrics"], r["metrics"]["fidelity_deterministic"]
    line(f"[bold]{r['config']['method']}[/]: tokens per block {m['tokens_per_block']}; MACs {m['macs_ratio']:.3f}x of dense "
         f"(theoretical speed-up {m['theoretical_speedup']:.2f}x); pooled cosine to the input model "
         f"{fid['pooled_cosine_mean']:.4f} (min {fid['pooled_cosine_min']:.4f})")
    line(f"wrote {r['output']}")
