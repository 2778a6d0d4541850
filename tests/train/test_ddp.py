"""torchrun with 2 CPU processes (gloo) gives the single-process result at the same global batch.

Every random choice of a step is drawn from a (seed, step) generator on every rank and the loss is a
mean of per-sample terms, so the two runs differ only by float rounding in the gradient all-reduce:
the documented tolerance is 1e-5 absolute on every weight after a few steps (DDP and FSDP alike).
Learned N:M masks are an argmax over logits that differ by that rounding: they come out identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from safetensors.torch import load_file

from mimc.artifact import save_artifact
from mimc.compression.blocks import remove_blocks
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config

TOLERANCE = 1e-5
ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(args: list[str], cwd) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


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


@pytest.mark.slow
def test_learned_masks_from_a_folder_two_processes_match_one_bit_for_bit(tmp_path):
    from PIL import Image

    save_artifact(build_encoder(tiny_config(depth=2), seed=0), tmp_path / "dense")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(1)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i:02d}.jpg")
    common = ["sparsify", "dense", "--method", "learned", "--data", "imgs", "--prior", "magnitude", "--steps", "4",
              "--batch-size", "8", "--mask-ratio", "0.5", "--json"]
    one = _run([sys.executable, "-m", "mimc", *common, "-o", "one"], tmp_path)
    two = _run([*TORCHRUN, "-m", "mimc", *common, "--workers", "1", "-o", "two"], tmp_path)  # batches prefetched by a worker
    assert one["metrics"]["parallel"] == "none" and two["metrics"]["parallel"] == "ddp"
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same masks, so the same weights
    assert one["metrics"]["groups_changed_vs_prior"] == two["metrics"]["groups_changed_vs_prior"] > 0


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (a torch without it skips above)

    from mimc.compression.registry import compress
    from mimc.train import TrainRun
    from tests.train import fsdp_worker

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "train" / "fsdp_worker.py"), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, jobs = fsdp_worker.runs()
    for name, encoder, config, options in jobs:  # the same runs in this one process, without FSDP
        ref = {k: v.contiguous() for k, v in compress(encoder, config, fsdp_worker.images(), run=TrainRun(**options))[0].state_dict().items()}
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        start = encoder.state_dict()
        assert _max_diff(ref, got) <= TOLERANCE, name
        if name == "learned":
            assert all(torch.equal(ref[k], got[k]) for k in ref)  # the same masks bit for bit
        else:
            assert max(float((ref[k] - start[k]).abs().max()) for k in ref) > 100 * TOLERANCE, name  # it did learn
        if name == "nm_distill":
            assert all(torch.equal(ref[k] == 0, got[k] == 0) for k in ref if k.startswith("blocks.") and got[k].ndim == 2)
    whole = load_file(str(tmp_path / "distill.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # killed after step 2 and resumed under FSDP: bit for bit
