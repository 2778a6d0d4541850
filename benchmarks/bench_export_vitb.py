"""ViT-B/16 224 export: TorchScript vs dynamo exporter - time, fidelity, graph, ORT CPU latency.

Backs the exporter choice in mimc/deploy/onnx.py on a full-size model. One run: both graphs are
exported by ``mimc.deploy.onnx.export_onnx`` (with validation on ORT CPU), then timed in the same
process: sessions with ``session.intra_op.allow_spinning=0`` and 2 intra-op threads, each warmed up,
timed in blocks of iterations alternating between the graphs, medians quoted. Finally the
TorchScript graph is profiled by ``mimc.latency.ort_cpu.profile_onnx_cpu`` (isolated worker process) for
its peak memory. Random-init weights (latency and export behaviour do not depend on training).

    python benchmarks/bench_export_vitb.py [--rounds 5] [--iters 5]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "export_vitb.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnx
    import torch

    from mimc.artifact import now_iso
    from mimc.atomic import write_json
    from mimc.deploy.onnx import export_onnx
    from mimc.runtime.session import make_session
    from mimc.models.vit import build_encoder, vit_base_config
    from mimc.latency.ort_cpu import profile_onnx_cpu
    from mimc.runtime.timing import host_info

    torch.set_num_threads(args.threads)
    encoder = build_encoder(vit_base_config(), seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for exporter in ("torchscript", "dynamo"):
            path = Path(tmp) / f"{exporter}.onnx"
            start = time.perf_counter()
            report = export_onnx(encoder, path, exporter=exporter)
            wall = time.perf_counter() - start
            model = onnx.load(str(path), load_external_data=False)
            v = report["validation"]
            fid = v["fidelity"]
            rows[exporter] = {
                "export_and_validate_s": round(wall, 2),
                "export_s": report["export_seconds"],
                "validate_s": v["seconds"],
                "opset": report["opset"],
                "nodes": len(model.graph.node),
                "op_types": sorted({n.op_type for n in model.graph.node}),
                "max_abs": fid["max_abs"],
                "cosine": fid["image_cosine_min"],  # the worst image over both outputs, as the gate reads it
                "sqnr_db": min(fid["sqnr_db"], fid["token_sqnr_db"]),
                "passed": v["passed"],
            }
            paths[exporter] = path

        sessions = {k: make_session(p, threads=args.threads) for k, p in paths.items()}
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        for s in sessions.values():  # warm-up
            for _ in range(3):
                s.run(None, {"pixel_values": x})
        times = {k: [] for k in sessions}
        for _ in range(args.rounds):  # alternate blocks so drifting load hits both graphs alike
            for k, s in sessions.items():
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    s.run(None, {"pixel_values": x})
                    times[k].append(time.perf_counter() - t0)
        del sessions
        for k in rows:
            rows[k]["ort_p50_ms"] = round(float(np.median(times[k])) * 1e3, 2)
        memory = profile_onnx_cpu(paths["torchscript"], [1], warmup=2, iters=5, threads=args.threads)["results"][0]

    ratio = rows["dynamo"]["ort_p50_ms"] / rows["torchscript"]["ort_p50_ms"]
    result = {
        "label": "measured",
        "model": "ViT-B/16 224 (mimc.models.vit.vit_base_config, random init), batch 1",
        "threads": args.threads,
        "rounds": args.rounds,
        "iters_per_block": args.iters,
        "torch": torch.__version__,
        "host": host_info(),
        "created": now_iso(),
        "exporters": rows,
        "latency_ratio_dynamo_over_torchscript": round(ratio, 3),
        "torchscript_graph_memory": {"peak_rss_mb": memory["peak_rss_mb"], "session_mb": memory["session_mb"]},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    write_json(RESULTS, result)

    print("| exporter | export+validate s | opset | nodes | max abs vs torch | cosine | ORT p50 ms (batch 1) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        print(f"| {k} | {r['export_and_validate_s']:.1f} | {r['opset']} | {r['nodes']} | {r['max_abs']:.2e} | {r['cosine']:.7f} | {r['ort_p50_ms']:.1f} |")
    print(f"\ndynamo/torchscript latency ratio {ratio:.3f}; torchscript graph peak RSS {memory['peak_rss_mb']} MB "
          f"(session {memory['session_mb']} MB); results in {RESULTS}")


if __name__ == "__main__":
    main()
