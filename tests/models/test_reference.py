"""The shipped reference model ``ref``: loads, shapes, size, golden outputs, determinism, lineage, quality.

Regenerate the golden tensors after retraining ``ref`` (and only then):
    python -m tests.models.test_reference --write-golden
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimc.artifact import sha256_file
from mimc.data import load_images
from mimc.errors import MimcError
from mimc.models.reference import REF_CONFIG, REF_LOG, REF_WEIGHTS, load_reference
from mimc.models.vit import build_encoder

GOLDEN = Path(__file__).parent / "golden" / "ref_golden.npz"
GOLDEN_INDEX = [0, 300]  # one held-out digit and the first texture tile of builtin.npz


@pytest.fixture(scope="module")
def ref():
    return load_reference()


@pytest.fixture(scope="module")
def builtin():
    return load_images("builtin", REF_CONFIG)


def _golden_inputs() -> torch.Tensor:
    return load_images("builtin", REF_CONFIG).pixels[GOLDEN_INDEX]


def knn_top1(features: torch.Tensor, labels: np.ndarray, k: int = 10, temperature: float = 0.07) -> float:
    """mimc's k-NN protocol: leave-one-out, cosine of L2-normalised features, k=10, votes exp(sim/0.07)."""
    f = F.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    top_sim, top_idx = sim.topk(k, dim=1)
    y = torch.as_tensor(labels, dtype=torch.long)
    votes = torch.zeros(len(f), int(y.max()) + 1, dtype=torch.float64).scatter_add_(1, y[top_idx], (top_sim / temperature).exp())
    return float((votes.argmax(1) == y).double().mean())


def test_loads_in_eval_mode_as_fp32(ref):
    assert not ref.training
    assert ref.config.family == "ref" and ref.config.depth == 12
    assert ref.config.to_dict() == REF_CONFIG.to_dict()
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    assert ref.config is not REF_CONFIG  # callers may edit their encoder's config without touching the constant


def test_weights_ship_small_as_fp16():
    from safetensors import safe_open

    assert REF_WEIGHTS.stat().st_size <= 15e6
    with safe_open(str(REF_WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_output_shapes(ref, builtin):
    x = builtin.pixels[:3]
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    n, d = REF_CONFIG.num_tokens, REF_CONFIG.dim
    assert x.shape == (3, 3, 32, 32)
    assert out.last_hidden_state.shape == (3, n, d) and out.pooled.shape == (3, d)
    assert len(out.hidden_states) == REF_CONFIG.depth + 1
    assert torch.isfinite(out.last_hidden_state).all()


def test_golden_pooled_features(ref):
    golden = np.load(GOLDEN)
    assert str(golden["weights_sha256"]) == sha256_file(REF_WEIGHTS), "ref was retrained: regenerate the golden tensors (see module docstring)"
    with torch.no_grad():
        pooled = ref(_golden_inputs()).pooled
    torch.testing.assert_close(pooled, torch.from_numpy(golden["pooled"]), atol=1e-4, rtol=0)


def test_deterministic_across_loads_and_batches(ref, builtin):
    other = load_reference()
    x = builtin.pixels[:4]
    with torch.no_grad():
        a = ref(x).pooled
        b = other(x).pooled
        c = torch.cat([ref(x[i : i + 1]).pooled for i in range(4)])  # batch composition changes nothing
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_mimc_load_records_source():
    import mimc

    encoder = mimc.load("ref")
    assert encoder.manifest.source["id"] == "ref"
    assert encoder.manifest.source["sha256"] == sha256_file(REF_WEIGHTS)
    assert encoder.manifest.encoder == REF_CONFIG.to_dict()


@pytest.fixture(scope="module")
def knn(ref, builtin):
    with torch.no_grad():
        trained = knn_top1(ref(builtin.pixels).pooled, builtin.labels)
        random = knn_top1(build_encoder(REF_CONFIG, seed=1)(builtin.pixels).pooled, builtin.labels)
    return trained, random


def test_knn_matches_training_log(knn):
    trained, random = knn
    logged = json.loads(REF_LOG.read_text())
    # The log evaluated the fp32 weights before they were stored as fp16: allow a sample or two of drift.
    assert abs(logged["knn_trained"]["knn_top1"] - trained) <= 0.01
    assert abs(logged["knn_random_init"]["knn_top1"] - random) < 1e-9  # same seed, same protocol
    assert trained >= random  # never worse than an untrained encoder of the same shape


def test_knn_clearly_beats_random_init(knn):
    trained, random = knn
    assert trained > random + 0.05


def test_blocks_differ(ref, builtin):
    """Block pruning criteria are compared on ref, so its blocks must not be interchangeable."""
    with torch.no_grad():
        x = builtin.pixels[:32]
        hidden = ref(x, output_hidden_states=True).hidden_states
    # Relative size of each block's update to the residual stream.
    updates = torch.stack([(hidden[i + 1] - hidden[i]).norm() / hidden[i].norm() for i in range(REF_CONFIG.depth)])
    assert updates.max() > 2 * updates.min()
    # Weight statistics differ block to block far beyond fp16 rounding (relative ~1e-4 on a norm):
    # weight-only criteria (entropy, l1, l2, ...) must have something to rank.
    norms = torch.stack([b.mlp.fc1.weight.norm() for b in ref.blocks])
    assert norms.std() / norms.mean() > 0.01


def test_missing_weights_raise_clear_error(monkeypatch, tmp_path):
    import mimc.models.reference as reference

    monkeypatch.setattr(reference, "REF_WEIGHTS", tmp_path / "gone.safetensors")
    with pytest.raises(MimcError, match="train_ref.py"):
        reference.load_reference()


def _write_golden() -> None:
    with torch.no_grad():
        pooled = load_reference()(_golden_inputs()).pooled.numpy()
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez(GOLDEN, pooled=pooled, index=np.asarray(GOLDEN_INDEX), weights_sha256=np.asarray(sha256_file(REF_WEIGHTS)))
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if "--write-golden" in sys.argv:
        _write_golden()
