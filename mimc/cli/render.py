"""How the commands show their reports: tables and one-line summaries on stdout (notes and warnings on
stderr), and ``--json`` (stdout)."""
from __future__ import annotations

import math
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from mimc.cli.common import chatter, emit_json


def out(*objects: Any, **kwargs: Any) -> None:
    """Print results on stdout. A console is made per call (stdout may be swapped, as by test
    runners) and, when stdout is not a terminal (a pipe, a file), is wide enough that no table or
    line is cut to 80 columns: columns take the width their content needs."""
    wide = {} if sys.stdout.isatty() else {"width": 100_000}
    Console(emoji=False, **wide).print(*objects, **kwargs)


def show(report: Any, json_out: bool, human) -> None:
    """``--json``: the report's ``to_dict()`` on stdout; else ``human(report_dict)``."""
    body = report.to_dict() if hasattr(report, "to_dict") else report
    if body.get("skipped_images"):
        skipped = body["skipped_images"]
        note(f"skipped {len(skipped)} unreadable image(s) (--skip-corrupt): {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}")
    if json_out:
        emit_json(body)
    else:
        human(body)


def line(text: str) -> None:
    out(text, highlight=False, soft_wrap=True)


def note(text: str) -> None:
    chatter.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True)


def score_formatter(values: list[float]):
    """A fixed-point format with enough decimals that the column's differences show.

    Block scores of one criterion often differ only in the 3rd-5th significant digit (entropy of
    ViT blocks: 9.02 +- 0.005 nats), which a plain ``.4g`` would hide.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return lambda v: f"{v}"
    if all(float(v).is_integer() for v in finite):
        return lambda v: f"{v:.0f}"
    spread = max(finite) - min(finite)
    scale = spread if spread > 0 else max(abs(v) for v in finite) or 1.0
    decimals = min(10, max(0, 2 - math.floor(math.log10(scale))))
    return lambda v: f"{v:.{decimals}f}"


def score_table(scores: dict[str, list[float]], block_ids: list[int], title: str, removed: set[int] = frozenset(),
                rho: dict[str, float | None] | None = None) -> None:
    """Per-block scores, one column per criterion (low = removed first)."""
    out(title, highlight=False)  # above, not as a table title: narrow tables would wrap it
    table = Table()
    table.add_column("block", justify="right")
    for name in scores:
        table.add_column(name, justify="right")
    if removed:
        table.add_column("", justify="left")
    fmt = {c: score_formatter(v) for c, v in scores.items()}
    for pos, bid in enumerate(block_ids):
        mark = ["[red]removed[/]" if bid in removed else ""] if removed else []
        table.add_row(str(bid), *(fmt[c](scores[c][pos]) for c in scores), *mark, style="dim" if bid in removed else None)
    if rho:
        table.add_section()
        table.add_row("ρ vs oracle", *("—" if c == "sensitivity" or rho.get(c) is None else f"{rho[c]:+.2f}" for c in scores))
    out(table)


def warnings(items: list[str]) -> None:
    for w in items:
        chatter.print(f"[yellow]warning:[/] {w}", highlight=False)


def shrink_phrase(metrics: dict[str, Any], data: str | None = None) -> str:
    """``params 5.2M -> 3.5M, MACs x0.667, pooled cosine to input 0.9874 (deterministic inputs)[, 0.9861 on DATA]``."""
    fid = metrics.get("fidelity_deterministic") or {}
    text = (f"params {metrics['params_before'] / 1e6:.2f}M -> {metrics['params_after'] / 1e6:.2f}M, "
            f"MACs x{metrics['macs_ratio']:.3f}, "
            f"pooled cosine to input {fid.get('pooled_cosine_mean', float('nan')):.4f} (deterministic inputs)")
    if metrics.get("fidelity_data"):
        text += f", {metrics['fidelity_data']['pooled_cosine_mean']:.4f} on {data}"
    return text


def key_values(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    out(table)


def columns(title: str | None, headers: list[str], rows: list[list[str]], left: tuple[str, ...] = ()) -> None:
    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h in left else "right")
    for r in rows:
        table.add_row(*r)
    out(table)


def stage_line(r: dict) -> None:
    """``wrote OUT  key=value ...`` of a stage's scalar metrics (the learning stages)."""
    shown = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float, str))}
    line(f"[green]wrote[/] {r['output']}  " + "  ".join(f"{k}={v}" for k, v in shown.items()))


def run_summary(entry: dict) -> str:
    """One line per recipe stage: the fidelity or latency it measured, and against what."""
    kind, metrics = entry["stage"], entry.get("metrics", {})
    if kind == "export":
        val = (entry.get("validation") or {}).get("fidelity") or {}
        return f"validated on ONNX Runtime, max abs {val['max_abs']:.2e}" if isinstance(val.get("max_abs"), (int, float)) else ""
    if kind == "quantize":
        fid = entry["validation"]["fidelity"]
        return f"pooled cosine to the fp32 graph {fid['pooled_cosine_mean']:.5f} (worst {fid['pooled_cosine_min']:.5f}), {entry['file']}"
    if kind == "profile":
        result, label = entry["result"], entry["result"].get("label", "measured")
        text = f"{entry['file']} on {result.get('device')} ({label})"
        if entry.get("speedup_vs_dense") is not None:
            text += f": {entry['speedup_vs_dense']:.2f}x the dense source"
        return text
    if kind == "build":
        return f"{entry['file']} from {entry['source']} for {entry['device']} at {entry['precision']}"
    if kind == "eval":
        parts = [entry["file"] + (f" on {entry['runtime']}" if entry.get("runtime") not in (None, "torch") else "")]
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
