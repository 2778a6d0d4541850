"""ViT-B/16 (224 px, MAE-shaped, random init): `mimc prune --ratio 0.5` and `mimc export` wall time,
then dense vs pruned latency on ONNX Runtime CPU, batch 1.

Claims checked (issue 2, "Must show"): the whole `mimc prune` process < 5 s; export including
validation < 60 s; latency ratio dense/pruned >= 1.8 (theory 2.0: half the blocks, the patch embed
and final norm are ~1 % of the work).

Timing protocol (DESIGN.md): both sessions in one process, 2 intra-op threads, spinning off, each
warmed up, timed in alternating blocks of iterations, medians quoted. The commands run as
subprocesses exactly as a user types them, so interpreter start and imports are included.

    /work/venv/bin/python benchmarks/bench_block_prune_vitb.py [--rounds 7 --block 10]

Writes benchmarks/results/block_prune_vitb.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mimc", *args, "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mimc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, json.loads(proc.stdout)


def time_sessions(paths: dict[str, Path], rounds: int, block: int, threads: int) -> dict[str, dict]:
    import numpy as np

    from mimc.runtime.session import make_session

    sessions = {name: make_session(p, threads=threads) for name, p in paths.items()}
    feeds = {}
    for name, sess in sessions.items():
        inp = sess.get_inputs()[0]
        feeds[name] = {inp.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)}
        for _ in range(5):  # warm-up: allocations, kernel selection
            sess.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))  # alternate who goes first
        for name in order:
            for _ in range(block):
                t0 = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_ms": 1e3 * statistics.median(t), "p10_ms": 1e3 * float(np.percentile(t, 10)), "p90_ms": 1e3 * float(np.percentile(t, 90)), "n": len(t)}
        for name, t in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-passive", action="store_true", help="run the CLI subprocesses with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--out", type=Path, default=RESULTS / "block_prune_vitb.json")
    args = ap.parse_args()

    from mimc.artifact import save_artifact
    from mimc.models.vit import build_encoder, flops_per_image, vit_base_config

    env = dict(os.environ)
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mimc-bench-vitb-") as tmp:
        tmp = Path(tmp)
        dense_dir = tmp / "vitb"
        encoder = build_encoder(vit_base_config(), seed=0)
        save_artifact(encoder, dense_dir)
        del encoder

        prune_s, prune_report = run_cli(["prune", str(dense_dir), "--ratio", "0.5", "-o", str(tmp / "half")], env)
        export_s, export_report = run_cli(["export", str(tmp / "half")], env)
        dense_export_s, _ = run_cli(["export", str(dense_dir)], env)
        latency = time_sessions({"dense": dense_dir / "model.onnx", "pruned": tmp / "half" / "model.onnx"}, args.rounds, args.block, args.threads)

    cfg = vit_base_config()
    ratio = latency["dense"]["median_ms"] / latency["pruned"]["median_ms"]
    result = {
        "model": "ViT-B/16 224 MAE-shaped, random init (mimc.models.vit.vit_base_config, seed 0)",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "onnxruntime": {"threads": args.threads, "allow_spinning": 0, "batch": 1, "rounds": args.rounds, "block": args.block},
        "omp_wait_policy": env.get("OMP_WAIT_POLICY", "default"),
        "prune": {
            "command": "mimc prune VITB --ratio 0.5 -o HALF --json",
            "process_wall_s": prune_s,
            "stage_seconds": prune_report["seconds"],
            "removed_blocks": prune_report["removed_blocks"],
            "params_before": prune_report["params_before"],
            "params_after": prune_report["params_after"],
            "macs_ratio": prune_report["macs_ratio"],
            "target_s": 5.0,
        },
        "export": {
            "command": "mimc export HALF --json",
            "process_wall_s": export_s,
            "validation": export_report.get("validation"),
            "dense_process_wall_s": dense_export_s,
            "target_s": 60.0,
        },
        "latency": latency,
        "latency_ratio": ratio,
        "latency_ratio_theory": flops_per_image(cfg) / flops_per_image(cfg.replace(depth=6)),
        "latency_ratio_target": 1.8,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines: list[str] = []
    lines.append("| measure | value | target | met |")
    lines.append("| --- | --- | --- | --- |")
    lines.append(f"| `mimc prune --ratio 0.5` whole process | {prune_s:.2f} s (stage {prune_report['seconds']:.2f} s) | < 5 s | {verdict(prune_s < 5)} |")
    lines.append(f"| `mimc export` incl. validation | {export_s:.1f} s | < 60 s | {verdict(export_s < 60)} |")
    lines.append(f"| ORT CPU batch 1, dense | {latency['dense']['median_ms']:.1f} ms (p10-p90 {latency['dense']['p10_ms']:.0f}-{latency['dense']['p90_ms']:.0f}) | | |")
    lines.append(f"| ORT CPU batch 1, 50 % blocks removed | {latency['pruned']['median_ms']:.1f} ms (p10-p90 {latency['pruned']['p10_ms']:.0f}-{latency['pruned']['p90_ms']:.0f}) | | |")
    lines.append(f"| latency ratio dense / pruned | {ratio:.2f}x (MAC theory {result['latency_ratio_theory']:.2f}x) | >= 1.8x | {verdict(ratio >= 1.8)} |")
    lines.append(f"\nparams {prune_report['params_before'] / 1e6:.1f} M -> {prune_report['params_after'] / 1e6:.1f} M; removed blocks {prune_report['removed_blocks']}; "
          f"load average {load_before[0]:.1f} before, {result['machine']['loadavg_after'][0]:.1f} after (2 cores shared)")
    lines.append(f"\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on a 2-core machine shared with other jobs; "
                 f"OMP_WAIT_POLICY={result['omp_wait_policy']}. Command: `/work/venv/bin/python benchmarks/bench_block_prune_vitb.py {' '.join(sys.argv[1:])}`")
    print("\n".join(lines))
    args.out.with_suffix(".md").write_text("# ViT-B/16 block pruning: prune, export, latency\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
