"""``mimc profiles``: the deployment targets mimc knows (shipped profiles, or one YAML)."""
from __future__ import annotations

from typing import Optional

import typer

from mimc.cli.common import JsonOption, console, emit_json, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("profiles")
    @handle_errors
    def profiles(
        device: Optional[str] = typer.Argument(None, help="Show one profile (a name or a .yaml path) with its sources."),
        json_out: bool = JsonOption,
    ) -> None:
        """List device profiles: backend, precisions, dense peak TFLOP/s, memory bandwidth, sparse tensor cores."""
        from rich.table import Table

        from mimc.latency.devices import available_profiles, load_profile

        chosen = [load_profile(device)] if device else [load_profile(n) for n in available_profiles()]
        if json_out:
            emit_json([p.to_dict() for p in chosen])
            return
        table = Table(title="device profiles: dense peak TFLOP/s per precision (2:4 sparsity doubles them)", title_justify="left")
        peaks = ("fp32", "tf32", "fp16", "bf16", "int8", "fp8")
        for name in ("device", "backend", "cc", *peaks, "GB/s", "GB", "2:4"):
            table.add_column(name, justify="left" if name in ("device", "backend") else "right")
        for p in chosen:
            cells = [f"{p.peak_tflops[k]:g}" if k in p.peak_tflops and k in p.precisions else "-" for k in peaks]
            table.add_row(p.name, p.backend.replace("onnxruntime-", "ort-"), p.compute_capability or "-", *cells,
                          f"{p.memory_bandwidth_gbs:g}", f"{p.memory_gb:g}", "yes" if p.sparse_tensor_cores else "no")
        console.print(table)
        if device:
            for field, source in chosen[0].sources.items():
                console.print(f"[bold]{field}[/]: {source}", highlight=False, soft_wrap=True)
        else:
            console.print("pass a name (e.g. `mimc profiles h100`) to see each number's public source; --device also takes your own YAML", style="dim")
