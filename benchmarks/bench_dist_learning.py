"""Learning from a streamed JPEG folder: 1 process vs ``torchrun --nproc-per-node 2``, and kill-and-resume.

Writes a folder of random 224-px JPEGs (20 000 by default; kept in ``--workdir`` for the next run)
and a ViT-Ti/16-shaped encoder (dim 192, 12 blocks, 3 heads, random weights), then runs the real CLI:

- ``mimc sparsify dense --pattern 2:4 --method learned`` with 1 process and with 2 (gloo): the masks
  must be the same bit for bit;
- ``mimc distill half --teacher dense`` (half the blocks removed) with 1 process, 2 processes (DDP)
  and 2 processes with ``--fsdp``: every weight within float rounding (max abs difference reported);
- a 2-process distill killed (SIGTERM to torchrun) once a checkpoint lands mid-epoch, then resumed
  with ``--resume``: equal bit for bit to the uninterrupted 2-process run.

Every run reads a seeded subset of ``--n`` images of the folder (the others are never read), for
``--epochs`` passes at global batch ``--batch-size``; each rank loads only its shard of each step's
batch, prefetched by ``--workers`` DataLoader processes. Every process runs 1 thread. Writes
benchmarks/results/bench_dist_learning.json and prints a markdown table.

    python benchmarks/bench_dist_learning.py [--images 20000] [--n 320] [--epochs 2] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def make_images(folder: Path, count: int, size: int = 224, seed: int = 0) -> float:
    """``count`` random JPEGs (smooth colour fields plus noise), written once; returns the seconds it took."""
    import numpy as np
    from PIL import Image

    done = folder / ".complete"
    if done.is_file() and done.read_text().strip() == str(count):
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for i in range(count):
        base = Image.fromarray(rng.integers(0, 255, (7, 7, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-24, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)
    done.write_text(f"{count}\n")
    return time.perf_counter() - t0


def make_models(work: Path) -> None:
    import mimc
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.compression.registry import compress
    from mimc.models.vit import EncoderConfig, build_encoder

    if (work / "dense").is_dir() and (work / "half").is_dir():
        return
    cfg = EncoderConfig(image_size=224, patch_size=16, dim=192, depth=12, num_heads=3, mlp_dim=768, family="mae")
    dense = build_encoder(cfg, seed=0)
    half, _ = compress(dense, BlockPruningConfig(ratio=0.5, criterion="last"))
    mimc.save(dense, work / "dense")
    mimc.save(half, work / "half")


def launcher(procs: int) -> list[str]:
    return [sys.executable, "-m", "mimc"] if procs == 1 else [*TORCHRUN, "-m", "mimc"]


def run_cli(args: list[str], cwd: Path, procs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher(procs), *args, "--json"], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def kill_mid_run(args: list[str], cwd: Path, out: str, steps_per_epoch: int, total: int) -> int:
    """Start a 2-process run, SIGTERM it once a checkpoint lands mid-epoch; returns that checkpoint's step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launcher(2), *args, "-o", out], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = cwd / out / "checkpoint" / "state.json"
    step = 0
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if state.is_file():
                try:
                    step = json.loads(state.read_text())["step"]
                except (ValueError, KeyError, OSError):
                    continue  # being replaced: read it again
                if step > steps_per_epoch and step % steps_per_epoch and step < total:  # mid second epoch or later
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
                    break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode == 0:
        raise SystemExit("the run finished before it could be killed mid-epoch: raise --epochs or lower --checkpoint-every")
    return int(json.loads(state.read_text())["step"])


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def compare(a_dir: Path, b_dir: Path) -> dict:
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    linear = [k for k in a if k.startswith("blocks.") and k.endswith(".weight") and a[k].ndim == 2]
    same_masks = all(bool(((a[k] != 0) == (b[k] != 0)).all()) for k in linear)
    return {"max_abs_weight_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
            "bitwise_equal": all(bool((a[k] == b[k]).all()) for k in a), "same_zero_masks": same_masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/mimc-bench-dist", help="where the JPEGs, models and runs go (JPEGs are reused)")
    parser.add_argument("--images", type=int, default=20000, help="JPEGs in the folder")
    parser.add_argument("--n", type=int, default=320, help="images each run reads (a seeded subset of the folder)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes per rank prefetching the next steps")
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "bench_dist_learning.json"))
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gen_s = make_images(work / "jpegs", args.images)
    make_models(work)
    runs = work / "runs"
    if runs.exists():
        import shutil

        shutil.rmtree(runs)
    runs.mkdir()
    (runs / "dense").symlink_to(work / "dense")
    (runs / "half").symlink_to(work / "half")
    data = str(work / "jpegs")
    steps = -(-int(args.epochs * args.n) // args.batch_size)
    # --n-images: torchrun's own parser would take --n as an abbreviation of its options
    common = ["--data", data, "--n-images", str(args.n), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--workers", str(args.workers), "--mask-ratio", "0.75"]
    jobs = {
        "sparsify learned 2:4": ["sparsify", "dense", "--pattern", "2:4", "--method", "learned", "--prior", "magnitude", *common],
        "distill": ["distill", "half", "--teacher", "dense", "--lr", "5e-4", *common],
    }
    rows, checks = [], {}
    for name, cmd in jobs.items():
        variants = [("1 process", 1, []), ("2 processes (DDP)", 2, [])]
        if name == "distill":
            variants.append(("2 processes (FSDP)", 2, ["--fsdp"]))
        outs = {}
        for label, procs, extra in variants:
            tag = f"{name.split()[0]}-{procs}p{'-fsdp' if extra else ''}"
            res = run_cli([*cmd, *extra, "--checkpoint-every", "1000000", "-o", tag], runs, procs)
            m = res["metrics"]
            outs[label] = runs / tag
            rows.append({"stage": name, "run": label, "steps": m["steps"], "epochs": m["epochs"], "parallel": m["parallel"],
                         "steps_per_second": m["steps_per_second"], "final_loss": m["final_loss"], "wall_s": res["wall_s"],
                         "fidelity_pooled_cosine": m["fidelity_data"]["pooled_cosine_mean"]})
            print(f"  {rows[-1]}", flush=True)
        checks[name] = {f"{label} vs 1 process": compare(outs["1 process"], outs[label]) for label in list(outs)[1:]}
    # kill-and-resume, 2 processes: equal bit for bit to the uninterrupted 2-process distill above
    steps_per_epoch = args.n // args.batch_size if args.n % args.batch_size == 0 else None
    kill_cmd = [*jobs["distill"], "--checkpoint-every", str(args.checkpoint_every)]
    killed_at = kill_mid_run(kill_cmd, runs, "distill-killed", steps_per_epoch or args.n, steps)
    resumed = run_cli([*kill_cmd, "--resume", "distill-killed"], runs, 2)
    checks["distill killed and resumed, 2 processes"] = {
        "killed_at_checkpoint_step": killed_at, "resumed_from": resumed["metrics"]["resumed_from"],
        "epoch_position": f"epoch {killed_at * args.batch_size // args.n}, image {killed_at * args.batch_size % args.n} of {args.n}",
        **compare(runs / "distill-2p", runs / "distill-killed")}

    print(f"\n{args.images} JPEGs 224 px in the folder, {args.n} read per run; ViT-Ti/16 shape (random weights); global batch "
          f"{args.batch_size}, {args.epochs} epochs = {steps} steps, mask ratio 0.75, 1 thread per process (shared CPU)\n")
    print("| stage | run | steps | steps/s | final loss | pooled cosine to dense |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['stage']} | {r['run']} | {r['steps']} | {r['steps_per_second']} | {r['final_loss']} | {r['fidelity_pooled_cosine']} |")
    print(f"\n{json.dumps(checks, indent=1)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (f"python benchmarks/bench_dist_learning.py --images {args.images} --n {args.n} --epochs {args.epochs} "
               f"--batch-size {args.batch_size} --workers {args.workers} --checkpoint-every {args.checkpoint_every}")
    out.write_text(json.dumps({"images_in_folder": args.images, "jpeg_generation_s": round(gen_s, 1), "n": args.n, "epochs": args.epochs,
                               "global_batch": args.batch_size, "steps": steps, "rows": rows, "agreement": checks,
                               "note": "timings measured on a shared 2-core CPU under load", "command": command}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
