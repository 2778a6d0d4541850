"""Big encoders on one CPU machine: ViT-H/14 (and ViT-L/16) through prune 0.5 -> export -> int8 -> profile.

Every step is the `mimc` command a user types, run as its own subprocess; for each the wall seconds
and the peak resident memory are recorded. Peak RSS is ``ru_maxrss`` from ``os.wait4`` on that
command: the largest resident set of the command's process and of any worker it waited for
(ONNX Runtime profiling workers), not their sum. The weights themselves (fp32) are given beside it,
so "peak / weights" says how many copies of the weights a step held at once.

The random-weight encoder comes from the `random:vit-h/14` model spec (seed 0); the first step
writes it as an artifact (weights only) in a helper subprocess, which is not a mimc command and is
reported separately. Steps, per model:

    mimc export DENSE                     # the dense graph: past 2 GiB for ViT-H -> model.onnx + model.onnx.data
    mimc prune DENSE --ratio 0.5 -o HALF
    mimc export HALF
    mimc export HALF --exporter dynamo -o HALF-DYNAMO   # the other exporter's memory (a copy of the artifact)
    mimc quantize HALF --int8 --calib builtin --n N
    mimc profile HALF/model.int8.onnx --device cpu
    mimc quantize DENSE --int8 --calib builtin --n N   # its fp32 input keeps its weights in external data
    mimc profile DENSE/model.onnx --device cpu         # fp32, external data
    mimc profile DENSE/model.int8.onnx --device cpu
    mimc eval HALF/model.int8.onnx --ref HALF --data builtin --n E

    python benchmarks/bench_big_encoders.py                       # ViT-H/14 (~20 min on 2 cores)
    python benchmarks/bench_big_encoders.py --models vit-h/14,vit-l/16

Writes benchmarks/results/bench_big_encoders.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], log_dir: Path, name: str, env: dict[str, str]) -> dict:
    """One subprocess; returns wall seconds, peak RSS (GB) and its --json report."""
    out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    start = time.perf_counter()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(args, stdout=fo, stderr=fe, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    record = {"command": " ".join(args[2:] if args[1] == "-m" else args), "exit_code": code, "wall_s": round(wall, 1),
              "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2)}  # ru_maxrss is in kB on Linux
    text = out.read_text().strip()
    if code != 0:
        record["error"] = (err.read_text().strip().splitlines() or ["(no stderr)"])[-1][:500]
    elif text.startswith("{"):
        record["report"] = json.loads(text)
    return record


def mimc(*args: str) -> list[str]:
    return [sys.executable, "-m", "mimc", *args, "--json"]


def bench_model(name: str, work: Path, args, env: dict[str, str]) -> dict:
    slug = name.replace("/", "-")
    dense, half, logs = work / slug, work / f"{slug}-half", work / f"{slug}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, list[str]]] = [
        ("write random weights (helper, not a mimc command)",
         [sys.executable, "-c", "import sys; from mimc.artifact import save_artifact; from mimc.models.resolve import load_model; "
                                "save_artifact(load_model(sys.argv[1]), sys.argv[2])", f"random:{name}", str(dense)]),
        ("export dense", mimc("export", str(dense))),
        ("prune 0.5", mimc("prune", str(dense), "--ratio", "0.5", "-o", str(half))),
        ("export pruned", mimc("export", str(half))),
    ]
    if args.dynamo:
        steps.append(("export pruned, --exporter dynamo (into a copy)", mimc("export", str(half), "--exporter", "dynamo",
                                                                              "-o", str(work / f"{slug}-half-dynamo"))))
    steps += [
        ("quantize pruned int8", mimc("quantize", str(half), "--int8", "--calib", "builtin", "--n", str(args.n))),
        ("profile pruned int8", mimc("profile", str(half / "model.int8.onnx"), "--device", "cpu", "--iters", str(args.iters),
                                     "--warmup", str(args.warmup))),
    ]
    if not args.skip_dense_graphs:
        steps += [
            ("quantize dense int8", mimc("quantize", str(dense), "--int8", "--calib", "builtin", "--n", str(args.n))),
            ("profile dense fp32", mimc("profile", str(dense / "model.onnx"), "--device", "cpu", "--iters", str(args.iters),
                                        "--warmup", str(args.warmup))),
            ("profile dense int8", mimc("profile", str(dense / "model.int8.onnx"), "--device", "cpu", "--iters", str(args.iters),
                                        "--warmup", str(args.warmup))),
        ]
    if args.eval_n:
        steps.append(("eval pruned int8 vs pruned", mimc("eval", str(half / "model.int8.onnx"), "--ref", str(half), "--data", "builtin",
                                                         "--n", str(args.eval_n))))
    records = []
    for k, (label, cmd) in enumerate(steps):
        print(f"[{name}] {label} ...", file=sys.stderr, flush=True)
        rec = {"step": label, **run(cmd, logs, f"{k:02d}", env)}
        print(f"[{name}] {label}: exit {rec['exit_code']}, {rec['wall_s']} s, peak RSS {rec['peak_rss_gb']} GB"
              + (f" - {rec['error']}" if "error" in rec else ""), file=sys.stderr, flush=True)
        records.append(rec)
        if rec["exit_code"] != 0 and label in ("write random weights (helper, not a mimc command)", "prune 0.5", "export pruned"):
            break  # later steps need this one's output
    sizes = {str(p.relative_to(work)): p.stat().st_size for d in (dense, half) if d.is_dir() for p in sorted(d.iterdir()) if p.is_file()}
    shutil.rmtree(work / f"{slug}-half-dynamo", ignore_errors=True)
    weights = sizes.get(f"{slug}/model.safetensors")
    return {"model": f"random:{name}", "weights_bytes": weights, "files": sizes, "steps": records}


def summary(rec: dict) -> str:
    rep = rec.get("report") or {}
    if "error" in rec:
        return f"failed: {rec['error']}"
    fid = (rep.get("validation") or {}).get("fidelity") if isinstance(rep.get("validation"), dict) else None
    if fid:
        ext = f"; weights in {rep['external_data']} ({rep['external_data_bytes'] / 1e9:.2f} GB)" if rep.get("external_data") else ""
        size = f"{rep['bytes'] / 1e9:.2f} GB" if rep["bytes"] >= 1e8 else f"{rep['bytes'] / 1e6:.1f} MB"
        if "target" in rep:  # quantize: against the fp32 graph on held-out images
            return f"int8 graph {size}, pooled cosine to fp32 {fid['pooled_cosine_mean']:.4f}{ext}"
        return f"graph {size}, max abs error to torch {fid['max_abs']:.1e}{ext}"
    if rep.get("label") == "measured":
        r = rep["results"][0]
        return f"batch {r.get('batch')}: p50 {r['p50_ms']:.0f} ms, worker peak RSS {r['peak_rss_mb'] / 1e3:.2f} GB"
    metrics = rep.get("metrics") or {}
    if "params_after" in metrics:
        return f"{metrics['params_before'] / 1e6:.0f} M -> {metrics['params_after'] / 1e6:.0f} M params"
    if "fidelity" in rep and rep["fidelity"]:
        return f"pooled cosine {rep['fidelity']['pooled_cosine_mean']:.4f}"
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit-h/14", help="comma-separated random:NAME sizes (vit-h/14, vit-l/16, ...)")
    ap.add_argument("--n", type=int, default=16, help="calibration images for quantize")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=16, help="images for the eval step (0: skip it)")
    ap.add_argument("--skip-dense-graphs", action="store_true", help="skip quantizing and profiling the dense graphs")
    ap.add_argument("--no-dynamo", dest="dynamo", action="store_false", help="skip the dynamo export of the pruned model")
    ap.add_argument("--workdir", type=Path, default=None, help="where the artifacts go (default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_big_encoders.json")
    ap.add_argument("--render", type=Path, default=None, help="only print the table of an earlier results JSON")
    args = ap.parse_args()
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tmp = None
    work = args.workdir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="mimc-bench-big-", dir=ROOT / "benchmarks")  # the repository's disk, not a tmpfs
        work = Path(tmp)
    load_before = os.getloadavg()
    results = []
    try:
        for name in args.models.split(","):
            results.append(bench_model(name.strip(), work, args, env))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    mem_total = next((int(line.split()[1]) / 1e6 for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")), None)
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "mem_total_gb": mem_total,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "settings": {"n": args.n, "iters": args.iters, "warmup": args.warmup, "eval_n": args.eval_n},
        "peak_rss_method": "ru_maxrss from os.wait4 on each command (largest of its process and the workers it waited for)",
        "command": "python benchmarks/bench_big_encoders.py " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nwrote {args.out}")


def _weights_gb(res: dict, step: str) -> float | None:
    """fp32 weights of the model a step works on: the pruned artifact's for the pruned steps."""
    slug = res["model"].removeprefix("random:").replace("/", "-")
    name = f"{slug}-half/model.safetensors" if "pruned" in step else f"{slug}/model.safetensors"
    size = res["files"].get(name)
    return size / 1e9 if size else None


def render(result: dict) -> str:
    lines = []
    for res in result["models"]:
        lines += [f"\n{res['model']} ({(res['weights_bytes'] or 0) / 1e9:.2f} GB of fp32 weights)\n",
                  "| step | wall s | peak RSS GB | fp32 weights of its model GB | peak / weights | result |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for rec in res["steps"]:
            w = _weights_gb(res, rec["step"])
            size, ratio = (f"{w:.2f}", f"{rec['peak_rss_gb'] / w:.2f}") if w else ("-", "-")
            lines.append(f"| {rec['step']} | {rec['wall_s']:.0f} | {rec['peak_rss_gb']:.2f} | {size} | {ratio} | {summary(rec)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
