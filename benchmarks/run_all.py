"""Run every CPU benchmark in sequence (one at a time: they time ONNX Runtime on all cores).

    python benchmarks/run_all.py            # everything (~1.5 h on 2 idle cores)
    python benchmarks/run_all.py --only vitb # the ViT-B latency benchmarks only
    python benchmarks/run_all.py --only scale # k-NN on 50 000 features, embed and eval over 20 000 JPEGs
    python benchmarks/run_all.py --only big  # ViT-H/14 through prune, export, int8, profile (~20 min, 24 GB RAM)

Each script writes its own table to benchmarks/results/. GPU numbers come from
benchmarks/gpu_table.py on a machine with a GPU.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
VITB = ["bench_block_prune_vitb.py", "bench_export_vitb.py", "bench_tokens_vitb.py", "bench_quantize_vitb.py", "bench_stack_vitb.py", "roofline_cpu.py"]
SCALE = ["bench_knn.py", "bench_embed.py", "bench_eval_rss.py"]
BIG = ["bench_big_encoders.py"]
REF = ["ref_block_criteria.py", "ref_width_table.py", "ref_tokens_table.py", "ref_quantize_table.py", "ref_nm.py", "ref_distill.py", "ddp_check.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["vitb", "ref", "scale", "big"], default=None)
    args = ap.parse_args()
    scripts = {"vitb": VITB, "ref": REF, "scale": SCALE, "big": BIG, None: VITB + REF + SCALE + BIG}[args.only]
    failed = []
    for name in scripts:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / name)])
        print(f"== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
