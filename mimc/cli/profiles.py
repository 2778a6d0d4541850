"""``mimc profiles``: the deployment targets mimc knows (shipped profiles, or one YAML)."""
from __future__ import annotations

from typing import Optional

import typer

from mimc import api
from mimc.cli.common import JsonOption, emit_json, handle_errors
from mimc.cli.render import columns, line


def register(app: typer.Typer) -> None:
    @app.command("profiles")
    @handle_errors
    def profiles(
        device: Optional[str] = typer.Argument(None, help="Show one profile (a name or a .yaml path) with its sources."),
        json_out: bool = JsonOption,
    ) -> None:
        """List device profiles: backend, precisions, dense peak TFLOP/s, memory bandwidth, sparse tensor cores."""
        chosen = api.profiles(device)
        if json_out:
            emit_json([p.to_dict() for p in chosen])
            return
        peaks = ("fp32", "tf32", "fp16", "bf16", "int8", "fp8")
        rows = [[p.name, p.backend.replace("onnxruntime-", "ort-"), p.compute_capability or "-",
                 *(f"{p.peak_tflops[k]:g}" if k in p.peak_tflops and k in p.precisions else "-" for k in peaks),
                 f"{p.memory_bandwidth_gbs:g}", f"{p.memory_gb:g}", "yes" if p.sparse_tensor_cores else "no"] for p in chosen]
        columns("device profiles: dense peak TFLOP/s per precision (2:4 sparsity doubles them)",
                ["device", "backend", "cc", *peaks, "GB/s", "GB", "2:4"], rows, left=("device", "backend"))
        if device:
            for field, source in chosen[0].sources.items():
                line(f"[bold]{field}[/]: {source}")
        else:
            line("[dim]pass a name (e.g. `mimc profiles h100`) to see each number's public source; --device also takes your own YAML[/]")
