"""Dense vs compressed TensorRT engines on your GPU, built and measured in one run, as one table.

On a machine with an NVIDIA GPU and ``pip install 'mimc[gpu]'`` (tensorrt, onnxruntime-gpu, a CUDA torch):

    python benchmarks/gpu_table.py --device h100                  # ViT-B/16 224, random weights
    python benchmarks/gpu_table.py --device l4 --model out/mae-b  # your artifact / hub id / checkpoint
    python benchmarks/gpu_table.py --device h100 --batch 1,32 --out gpu-run

For each variant it exports a dynamic-batch graph, builds an engine for ``--device`` (strongly typed:
the graph carries the precision; one timing cache shared by all builds) and measures it with CUDA
events (``mimc.latency.tensorrt_gpu.profile_engine``):

  dense fp16           the model, cast to fp16 (LayerNorm/softmax in fp32)
  50% blocks fp16      half the blocks removed (mimc prune --ratio 0.5, entropy criterion)
  int8                 mimc quantize --int8 (Q/DQ for TensorRT), calibrated on builtin images
  fp8                  mimc quantize --fp8, only where the device has fp8 (Hopper, Ada)
  2:4 fp16             mimc sparsify 2:4 (magnitude), built with sparse weights where the device has sparse tensor cores

The measured table reports p50/p99 latency, images/s and the speed-up over dense fp16 at the same
batch, plus whether TensorRT actually picked sparse kernels. The roofline prediction for the same
graphs is printed as a separate table, labelled predicted. Results go to <out>/gpu_table.json and .md.
Without a GPU it stops at once with one line saying so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def check_machine() -> None:
    """Fail before any work: a GPU, then TensorRT."""
    from mimc.runtime.trt import CudaDevice, import_tensorrt

    CudaDevice()
    import_tensorrt()


def variants(encoder, device_profile, calib, held, tmp: Path):
    """(name, onnx path, build precision) for each compressed form of ``encoder``."""
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.compression.nm import NMSparsityConfig
    from mimc.quant.quantize import QuantizeConfig, quantize_onnx
    from mimc.compression.registry import compress
    from mimc.deploy.onnx import export_onnx

    # exist_ok everywhere: a rerun into the same --out (to reuse its timing cache) must not die here.
    dense = tmp / "dense" / "model.onnx"
    dense.parent.mkdir(exist_ok=True)
    export_onnx(encoder, dense, batch="dynamic")
    yield "dense fp16", dense, "fp16"
    half, _ = compress(encoder, BlockPruningConfig(ratio=0.5))
    (tmp / "half").mkdir(exist_ok=True)
    export_onnx(half, tmp / "half" / "model.onnx", batch="dynamic")
    yield "50% blocks fp16", tmp / "half" / "model.onnx", "fp16"
    for precision in ("int8", "fp8"):
        if precision in device_profile.precisions:
            out = tmp / "dense" / f"model.{precision}.onnx"
            quantize_onnx(dense, out, calib.batches(8), QuantizeConfig(precision=precision, target="tensorrt"), held.batches(8))
            yield precision, out, None
    sparse, _ = compress(encoder, NMSparsityConfig(pattern="2:4"))
    (tmp / "nm").mkdir(exist_ok=True)
    export_onnx(sparse, tmp / "nm" / "model.onnx", batch="dynamic")
    yield "2:4 fp16", tmp / "nm" / "model.onnx", "fp16"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, help="a TensorRT device profile name or YAML (see `mimc profiles`)")
    parser.add_argument("--model", default=None, help="MODEL as mimc takes it (default: ViT-B/16 224, random weights)")
    parser.add_argument("--batch", default="1,8,32", help="batch sizes to measure, e.g. 1,8,32")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--calib", type=int, default=64, help="builtin calibration images for int8/fp8")
    parser.add_argument("--out", type=Path, default=Path("gpu-table"))
    args = parser.parse_args()

    from mimc.errors import MimcError

    try:
        from mimc.latency.devices import load_profile

        profile = load_profile(args.device)
        batches = [int(b) for b in args.batch.split(",")]
        check_machine()
        rows, predicted = run(args, profile, batches)
    except MimcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    write(args.out, profile, rows, predicted)
    return 0


def run(args, profile, batches):
    import numpy as np

    from mimc.data import load_images
    from mimc.deploy.tensorrt import build_engine
    from mimc.models.resolve import load_model
    from mimc.models.vit import build_encoder, vit_base_config
    from mimc.latency.roofline import predict
    from mimc.latency.tensorrt_gpu import profile_engine

    encoder = load_model(args.model) if args.model else build_encoder(vit_base_config(), seed=0)
    images = load_images("builtin", encoder.config, n=args.calib + 8, seed=0)
    calib, held = images.subset(np.arange(args.calib)), images.subset(np.arange(args.calib, args.calib + 8))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "graphs"
    work.mkdir(exist_ok=True)
    cache = args.out / f"{profile.name}.timing-cache"
    rows, predicted = [], []
    batch_range = (min(batches), batches[len(batches) // 2], max(batches))
    for name, graph, precision in variants(encoder, profile, calib, held, work):
        engine = graph.parent / f"{profile.name}-{name.replace(' ', '_').replace('%', 'pct').replace(':', '')}.plan"
        side = build_engine(graph, profile, engine, batch_range=batch_range, timing_cache=cache, precision=precision)
        report = profile_engine(engine, profile, batch_sizes=batches, warmup=args.warmup, iters=args.iters, layer_iters=0)
        built_from = Path(side["onnx"])
        for r in report["results"]:
            rows.append({"variant": name, "precision": side["precision"], "sparse_picked": side["sparse"]["picked"],
                         "batch": r["batch"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
                         "images_per_s": r["throughput_per_s"], "gpu": report["gpu"], "tensorrt": report["tensorrt_version"]})
            p = predict(built_from, profile, batch=r["batch"])
            predicted.append({"variant": name, "batch": r["batch"], "predicted_ms": p["latency_ms"], "bound": p["bound"]})
    base = {r["batch"]: r["p50_ms"] for r in rows if r["variant"] == "dense fp16"}
    for r in rows:
        r["speedup_vs_dense_fp16"] = base[r["batch"]] / r["p50_ms"]
    return rows, predicted


def write(out: Path, profile, rows, predicted) -> None:
    gpu = rows[0]["gpu"] if rows else "?"
    lines = [f"Measured on {gpu} (TensorRT {rows[0]['tensorrt'] if rows else '?'}), profile {profile.name}, CUDA events, medians of the timed runs.", "",
             "| variant | precision | batch | p50 ms | p99 ms | images/s | vs dense fp16 | sparse kernels picked |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        picked = {True: "yes", False: "no", None: "-"}[r["sparse_picked"]]
        lines.append(f"| {r['variant']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['images_per_s']:.0f} | {r['speedup_vs_dense_fp16']:.2f}x | {picked} |")
    lines += ["", f"Predicted (roofline on the {profile.name} profile, not measured):", "",
              "| variant | batch | predicted ms | bound |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {p['variant']} | {p['batch']} | {p['predicted_ms']:.3f} | {p['bound']} |" for p in predicted]
    text = "\n".join(lines)
    print(text)
    (out / "gpu_table.md").write_text(text + "\n")
    (out / "gpu_table.json").write_text(json.dumps({"measured": rows, "predicted": predicted, "profile": profile.to_dict()}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
