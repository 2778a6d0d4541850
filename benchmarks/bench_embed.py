"""`mimc embed` throughput against a bare ONNX Runtime loop, and its peak memory at 2 000 vs 20 000 images.

A ViT-Ti/16-shaped encoder (224 px, dim 192, 12 blocks, 3 heads, MLP 768, random weights), exported
to ONNX with a static batch B. A folder of random 224-px JPEGs (smooth random colour fields plus
noise, ten class folders) is generated once into a cache folder. In ONE process:

(a) ``mimc.embed`` over a seeded subset of N of those JPEGs: DataLoader workers decode while ONNX
    Runtime computes; images/s of its embedding loop (decode + inference + writing) and of the whole
    call (session load and worker start included);
(b) a bare ONNX Runtime loop: the same graph, batch and intra-op threads, ``sess.run`` over the same N
    images preprocessed beforehand into arrays (no decoding, no writing);

(a) and (b) alternate for ``--rounds`` rounds (order reversed every round, medians quoted), so load
from other processes on a shared machine hits both alike. Goal: (a) / (b) >= 0.85.

(c) peak RSS of ``mimc embed GRAPH --data CACHE --n K -o feats.npy`` as a subprocess for K = 2 000
    and 20 000: each run is started by a fresh ``python`` parent that reports
    ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` - the largest resident set of any process of the run
    (the main process or one decoding worker; they are not summed). Goal: 20k <= 1.2 x 2k and < 2 GB.

    python benchmarks/bench_embed.py [--n 320 --batch 16 --threads 2 --workers auto --rounds 8]
    python benchmarks/bench_embed.py --sweep      # also (a) for several threads / workers / batch settings

Writes benchmarks/results/bench_embed.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench-out" / "embed-jpeg224"


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` random 224x224 JPEGs in ten class folders (kept: only missing ones are written)."""
    import numpy as np
    from PIL import Image

    have = len(list(folder.glob("c*/*.jpg"))) if folder.is_dir() else 0
    if have >= count:
        return
    print(f"writing {count - have} JPEGs into {folder} ...", file=sys.stderr, flush=True)
    for i in range(count):
        path = folder / f"c{i % 10}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed + i)
        coarse = Image.fromarray(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
        img = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (224, 224, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def build_graph(out: Path, batch: int) -> Path:
    import mimc
    from mimc.artifact import save_artifact
    from mimc.models.vit import build_encoder, vit_base_config

    graph = out / "vit-ti" / "model.onnx"
    if not graph.is_file():
        cfg = vit_base_config(dim=192, num_heads=3, mlp_dim=768)
        save_artifact(build_encoder(cfg, seed=0), out / "vit-ti")
        mimc.export(str(out / "vit-ti"), batch=batch, validate=True)
    return graph


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the decoding workers, once joined)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_embed(graph: Path, data: Path, n: int, batch: int, threads: int, workers: int | None, tmp: Path) -> dict:
    import mimc

    out = tmp / f"feats-{time.perf_counter_ns()}.npy"
    cpu, start = cpu_seconds(), time.perf_counter()
    report = mimc.embed(str(graph), str(data), out, n=n, batch_size=batch, threads=threads, workers=workers)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    out.unlink()
    out.with_suffix(".json").unlink()
    return {"loop_images_per_second": report.images_per_second, "call_images_per_second": report.images / wall,
            "cpu_ms_per_image": 1e3 * cpu / report.images, "images": report.images, "workers": report.workers}


def preload(data: Path, n: int, batch: int):
    """The same N images as model inputs, in static-batch arrays (the last one padded)."""
    import numpy as np

    from mimc.data import ImageSource
    from mimc.models.vit import vit_base_config

    pixels = ImageSource(str(data)).draw(vit_base_config(dim=192, num_heads=3, mlp_dim=768), n).pixels.numpy()
    batches = []
    for i in range(0, len(pixels), batch):
        chunk = pixels[i:i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        batches.append(np.ascontiguousarray(chunk))
    return batches, len(pixels)


def run_bare(graph: Path, batches, n: int, threads: int) -> dict:
    from mimc.runtime.session import make_session

    sess = make_session(graph, threads=threads)
    name = sess.get_inputs()[0].name
    sess.run(["pooled"], {name: batches[0]})  # warm-up (embed's loop is timed after its session exists too)
    cpu, start = cpu_seconds(), time.perf_counter()
    for b in batches:
        sess.run(["pooled"], {name: b})
    return {"images_per_second": n / (time.perf_counter() - start), "cpu_ms_per_image": 1e3 * (cpu_seconds() - cpu) / n}


def peak_rss_mb(graph: Path, data: Path, n: int, batch: int, threads: int, workers: int | None, tmp: Path) -> dict:
    """Peak RSS of one `mimc embed` subprocess, reported by a fresh parent (RUSAGE_CHILDREN)."""
    out = tmp / f"rss-{n}.npy"
    cmd = [sys.executable, "-m", "mimc", "embed", str(graph), "--data", str(data), "--n", str(n), "-o", str(out),
           "--batch-size", str(batch), "--threads", str(threads), "--json"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    probe = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rc': p.returncode, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "'wall_s': time.perf_counter() - t, 'stdout': p.stdout, 'stderr': p.stderr[-2000:]}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    got = json.loads(proc.stdout)
    if got["rc"] != 0:
        raise SystemExit(f"mimc embed failed: {got['stderr']}")
    report = json.loads(got["stdout"])
    out.unlink()
    out.with_suffix(".json").unlink()
    return {"images": report["images"], "peak_rss_mb": round(got["maxrss_kb"] / 1024, 1), "wall_s": round(got["wall_s"], 1),
            "images_per_second": report["images_per_second"], "command": " ".join(["mimc", *cmd[3:]])}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=320, help="images for the throughput comparison")
    ap.add_argument("--batch", type=int, default=16, help="the graph's static batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads (both sides)")
    ap.add_argument("--workers", default="auto", help="decoding processes for (a) ('auto': ImageSource's default)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--rss", default="2000,20000", help="image counts for the peak-RSS runs ('' to skip)")
    ap.add_argument("--sweep", action="store_true", help="also run (a) for other threads / workers / batch settings")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_embed.json")
    args = ap.parse_args()
    workers = None if args.workers == "auto" else int(args.workers)
    rss_counts = [int(x) for x in args.rss.split(",") if x.strip()]

    from mimc.data import default_workers

    make_jpegs(args.cache / "images", max([args.n, *rss_counts]))
    data = args.cache / "images"
    graph = build_graph(args.cache, args.batch)
    from mimc.runtime.timing import host_info

    result: dict = {"host": host_info(),
                    "settings": {"n": args.n, "batch": args.batch, "threads": args.threads,
                                 "workers": workers if workers is not None else f"auto ({default_workers()})",
                                 "rounds": args.rounds, "model": "ViT-Ti/16 shape (dim 192, 12 blocks, 3 heads), random weights",
                                 "images": "random 224x224 JPEGs (quality 90)"},
                    "load_average_start": load_average()}
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        tmp = Path(tmp)
        batches, n = preload(data, args.n, args.batch)
        embeds, bares = [], []
        for r in range(args.rounds):
            order = ["embed", "bare"] if r % 2 == 0 else ["bare", "embed"]
            for what in order:
                if what == "embed":
                    embeds.append(run_embed(graph, data, args.n, args.batch, args.threads, workers, tmp))
                else:
                    bares.append(run_bare(graph, batches, n, args.threads))
            print(f"round {r + 1}: embed {embeds[-1]['loop_images_per_second']:.1f} img/s, bare {bares[-1]['images_per_second']:.1f} img/s"
                  f" (load {load_average()})", file=sys.stderr, flush=True)
        emb = statistics.median(e["loop_images_per_second"] for e in embeds)
        call = statistics.median(e["call_images_per_second"] for e in embeds)
        bare = statistics.median(b["images_per_second"] for b in bares)
        cpu_emb = statistics.median(e["cpu_ms_per_image"] for e in embeds)
        cpu_bare = statistics.median(b["cpu_ms_per_image"] for b in bares)
        result["throughput"] = {"embed_loop_images_per_second": round(emb, 2), "embed_call_images_per_second": round(call, 2),
                                "bare_ort_images_per_second": round(bare, 2), "ratio": round(emb / bare, 3),
                                "embed_cpu_ms_per_image": round(cpu_emb, 2), "bare_cpu_ms_per_image": round(cpu_bare, 2),
                                "cpu_ratio": round(cpu_bare / cpu_emb, 3),
                                # each round's embed over the bare run next to it in time, median over rounds
                                "paired_ratio_median": round(statistics.median(
                                    e["loop_images_per_second"] / b["images_per_second"] for e, b in zip(embeds, bares)), 3),
                                "paired_ratios": [round(e["loop_images_per_second"] / b["images_per_second"], 3)
                                                  for e, b in zip(embeds, bares)],
                                "ratio_whole_call": round(call / bare, 3), "workers": embeds[0]["workers"],
                                "rounds": {"embed": embeds, "bare": bares}}
        if args.sweep:  # each setting right after its own bare run at the same threads: paired under the same load
            result["sweep"] = []
            for threads, w in [(2, 0), (2, 1), (2, 2), (1, 1), (1, 2)]:
                row = run_embed(graph, data, args.n, args.batch, threads, w, tmp)
                ref = run_bare(graph, batches, n, threads)
                result["sweep"].append({"threads": threads, "workers": w, "batch": args.batch, **row,
                                        "bare_images_per_second": ref["images_per_second"],
                                        "ratio": row["loop_images_per_second"] / ref["images_per_second"]})
                print(f"sweep threads={threads} workers={w}: {row['loop_images_per_second']:.1f} img/s, bare "
                      f"{ref['images_per_second']:.1f} (load {load_average()})", file=sys.stderr, flush=True)
        del batches
        result["rss"] = [peak_rss_mb(graph, data, k, args.batch, args.threads, workers, tmp) for k in rss_counts]
        if not rss_counts and args.out.is_file():  # throughput only: keep the memory runs of the last full run
            earlier = json.loads(args.out.read_text())
            if earlier.get("rss"):
                result["rss"] = [{"from_run": earlier.get("finished"), **row} for row in earlier["rss"]]
    if len(result["rss"]) == 2:
        small, large = result["rss"]
        result["rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
    result["load_average_end"] = load_average()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    t = result["throughput"]
    print(f"\nViT-Ti/16 ONNX, static batch {args.batch}, {args.threads} intra-op threads, {n} images, "
          f"{t['workers']} decoding worker(s), load average {result['load_average_start']} -> {result['load_average_end']}\n")
    print("| measure | value | goal |\n| --- | ---: | --- |")
    print(f"| (a) `mimc.embed`, embedding loop | {emb:.1f} images/s | |")
    print(f"| (a) `mimc.embed`, whole call (session load, worker start) | {call:.1f} images/s | |")
    print(f"| (b) bare ONNX Runtime loop, preloaded arrays | {bare:.1f} images/s | |")
    print(f"| (a) / (b) | **{t['ratio']:.3f}** (whole call {t['ratio_whole_call']:.3f}) | >= 0.85 |")
    print(f"| (a) / (b) per round, median (each embed over the bare run beside it) | {t['paired_ratio_median']:.3f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in t['paired_ratios'])}) | |")
    print(f"| CPU time per image, (a) incl. decoding workers / (b) | {cpu_emb:.1f} / {cpu_bare:.1f} ms -> (b)/(a) {t['cpu_ratio']:.3f} | |")
    for row in result["rss"]:
        print(f"| peak RSS, `mimc embed` on {row['images']} images | {row['peak_rss_mb']:.0f} MB ({row['wall_s']:.0f} s) | < 2048 MB |")
    if "rss_ratio" in result:
        print(f"| peak RSS {result['rss'][1]['images']} / {result['rss'][0]['images']} | **{result['rss_ratio']:.3f}** | <= 1.2 |")
    for row in result.get("sweep", []):
        print(f"| sweep: {row['threads']} threads, {row['workers']} workers, batch {row['batch']} | "
              f"{row['loop_images_per_second']:.1f} images/s vs bare {row['bare_images_per_second']:.1f} -> {row['ratio']:.3f} | |")


if __name__ == "__main__":
    main()
