"""torchrun with 2 CPU processes (gloo) gives the single-process result at the same global batch.

Every random choice of a step is drawn from a (seed, step) generator on every rank and the loss is a
mean of per-sample terms, so the two runs differ only by float rounding in the gradient all-reduce:
the documented tolerance is 1e-5 absolute on every weight after a few steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from mimc.artifact import save_artifact
from mimc.compression.blocks import remove_blocks
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config

TOLERANCE = 1e-5


def _run(args: list[str], cwd) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    dense = build_encoder(tiny_config(), seed=0)
    save_artifact(dense, tmp_path / "dense")
    save_artifact(remove_blocks(dense, [2]), tmp_path / "student")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", images=rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8))
    common = ["distill", "student", "--data", "imgs.npz", "--teacher", "dense", "--steps", "4", "--batch-size", "8",
              "--lr", "1e-3", "--mask-ratio", "0.5", "--json"]
    one = _run([sys.executable, "-m", "mimc", *common, "-o", "one"], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mimc",
                *common, "-o", "two"], tmp_path)
    assert one["metrics"]["world_size"] == 1 and two["metrics"]["world_size"] == 2
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    start = load_file(str(tmp_path / "student" / "model.safetensors"))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 100 * TOLERANCE  # training changed the weights far more than the two runs differ
    assert diff <= TOLERANCE
    assert one["metrics"]["final_loss"] == pytest.approx(two["metrics"]["final_loss"], rel=1e-4)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left behind
