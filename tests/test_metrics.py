"""mimc.metrics: the streaming meter agrees with a one-shot comparison, and its edge cases."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mimc.errors import DataError
from mimc.metrics import SQNR_CAP_DB, FidelityMeter, compare_outputs


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    ref_p, ref_t = rng.standard_normal((10, 8)), rng.standard_normal((10, 5, 8))
    cand_p, cand_t = ref_p + 0.1 * rng.standard_normal((10, 8)), ref_t + 0.1 * rng.standard_normal((10, 5, 8))
    whole = compare_outputs({"pooled": ref_p, "last_hidden_state": ref_t}, {"pooled": cand_p, "last_hidden_state": cand_t})
    meter = FidelityMeter()
    for i in range(0, 10, 3):  # uneven batches, torch and numpy mixed
        meter.update(torch.from_numpy(cand_p[i : i + 3]), ref_p[i : i + 3], cand_t[i : i + 3], torch.from_numpy(ref_t[i : i + 3]))
    streamed = meter.result()
    for name in ("pooled_cosine_mean", "pooled_cosine_min", "token_cosine_mean", "token_cosine_min", "image_cosine_min",
                 "sqnr_db", "token_sqnr_db", "max_abs", "ref_max_abs"):
        assert getattr(streamed, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    assert streamed.n_images == whole.n_images == 10


def test_token_mismatch_drops_tokens_with_a_note_and_empty_input_is_refused():
    meter = FidelityMeter()
    meter.update(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 3, 4)), np.ones((2, 5, 4)))
    fid = meter.result()
    assert fid.token_cosine_mean is None and "tokens" in fid.note and fid.sqnr_db == SQNR_CAP_DB
    with pytest.raises(DataError, match="no images"):
        FidelityMeter().result()
    with pytest.raises(DataError, match="same width"):
        FidelityMeter().update(np.ones((2, 4)), np.ones((2, 3)))


def test_zero_vectors_and_sqnr_signs():
    fid = compare_outputs({"pooled": np.zeros((1, 3))}, {"pooled": np.zeros((1, 3))})
    assert fid.pooled_cosine_min == 1.0 and fid.sqnr_db == SQNR_CAP_DB
    fid = compare_outputs({"pooled": np.zeros((1, 3))}, {"pooled": np.ones((1, 3))})
    assert fid.pooled_cosine_min == 0.0 and fid.sqnr_db == -SQNR_CAP_DB


def test_metrics_and_artifact_import_cheaply():
    code = ("import sys, mimc.metrics; assert 'torch' not in sys.modules; "
            "import mimc.artifact; assert 'mimc.models' not in sys.modules and 'mimc.models.vit' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
