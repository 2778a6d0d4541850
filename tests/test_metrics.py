"""mimc.metrics: the streaming meter agrees with a one-shot comparison, and its edge cases."""
from __future__ import annotations

import json
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


def test_merged_meters_equal_one_meter_over_all_batches():
    """torchrun eval: each rank's meter over its shard, merged on rank 0, is one meter over the set."""
    rng = np.random.default_rng(1)
    ref_p, ref_t = rng.standard_normal((9, 8)), rng.standard_normal((9, 5, 8))
    cand_p, cand_t = ref_p + 0.2 * rng.standard_normal((9, 8)), ref_t + 0.2 * rng.standard_normal((9, 5, 8))
    one, shards = FidelityMeter(), [FidelityMeter() for _ in range(3)]
    for i, (lo, hi) in enumerate([(0, 4), (4, 9), (9, 9)]):  # the last rank's shard is empty
        if hi > lo:
            one.update(cand_p[lo:hi], ref_p[lo:hi], cand_t[lo:hi], ref_t[lo:hi])
            shards[i].update(cand_p[lo:hi], ref_p[lo:hi], cand_t[lo:hi], ref_t[lo:hi])
    for other in shards[1:]:
        shards[0].merge(other)
    merged, whole = shards[0].result(), one.result()
    for name in ("pooled_cosine_mean", "pooled_cosine_min", "token_cosine_mean", "token_cosine_min", "image_cosine_min",
                 "sqnr_db", "token_sqnr_db", "max_abs", "ref_max_abs"):
        assert getattr(merged, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    assert merged.n_images == 9 and merged.note is None
    dropped = FidelityMeter()  # a rank whose tokens did not compare drops them for the whole set
    dropped.update(cand_p[:2], ref_p[:2], cand_t[:2, :3], ref_t[:2])
    shards = [FidelityMeter(), dropped]
    shards[0].update(cand_p[2:], ref_p[2:], cand_t[2:], ref_t[2:])
    shards[0].merge(dropped)
    fid = shards[0].result()
    assert fid.token_cosine_mean is None and "tokens" in fid.note and fid.n_images == 9


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


# k-NN in query blocks -----------------------------------------------------------------------------
def _rows_budget(rows: int, n_gallery: int) -> int:
    """The block_bytes that makes knn_predictions take exactly ``rows`` queries per block."""
    return 8 * n_gallery * rows


@pytest.mark.parametrize("rows", [1, 7, 64, 202, 203, 10_000])  # 203 images: blocks of 7 and 64 leave a remainder
@pytest.mark.parametrize("k", [1, 10, 500])  # 500 > n: every other image votes
def test_knn_blocks_equal_the_dense_matrix_on_random_data(rows, k):
    from mimc.metrics import knn_block_rows, knn_predictions, knn_predictions_dense

    rng = np.random.default_rng(rows * 1000 + k)
    feats = rng.normal(size=(203, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 203)
    assert knn_block_rows(203, _rows_budget(rows, 203)) == rows
    blocked = knn_predictions(feats, labels, k, block_bytes=_rows_budget(rows, 203))
    np.testing.assert_array_equal(blocked, knn_predictions_dense(feats, labels, k))
    queries = rng.normal(size=(57, 16))
    blocked = knn_predictions(feats, labels, k, queries=queries, block_bytes=_rows_budget(rows, 203))
    np.testing.assert_array_equal(blocked, knn_predictions_dense(feats, labels, k, queries=queries))


def _tied_features(n: int, seed: int) -> np.ndarray:
    """Rows of four ±0.5 entries among 8: unit norm exactly, every cosine a multiple of 0.25 computed
    exactly in any summation order, so the blocked and dense similarities agree bit for bit and most
    rows have many neighbours tied at the k-th similarity."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 8))
    for row in out:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return out


@pytest.mark.parametrize("rows", [1, 3, 50, 101])
def test_knn_blocks_break_ties_exactly_as_the_dense_matrix(rows):
    from mimc.metrics import knn_predictions, knn_predictions_dense

    feats = _tied_features(101, rows)
    sim = feats @ feats.T
    np.fill_diagonal(sim, -np.inf)
    kth, next_ = np.sort(sim, axis=1)[:, ::-1][:, [9, 10]].T
    assert (kth == next_).mean() > 0.5  # the case under test: the 10th neighbour is a tie to break
    for labels in (np.arange(101) % 3, np.arange(101) % 17):
        for k in (1, 2, 10):
            for queries in (None, _tied_features(31, 99)):
                blocked = knn_predictions(feats, labels, k, queries=queries, block_bytes=_rows_budget(rows, 101))
                np.testing.assert_array_equal(blocked, knn_predictions_dense(feats, labels, k, queries=queries))


def test_knn_vote_ties_go_to_the_first_class_and_only_the_image_itself_is_left_out():
    from mimc.metrics import knn_predictions

    # Query 0's two neighbours are at the same cosine with classes 7 and 3: equal votes, 3 sorts first.
    feats = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    assert knn_predictions(feats, [0, 7, 3], k=2, block_bytes=8)[0] == 3
    # An exact duplicate of an image is another image: it votes (with cosine 1), the image itself does not.
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    np.testing.assert_array_equal(knn_predictions(dup, ["a", "a", "b", "b"], k=1, block_bytes=8), ["a", "a", "b", "b"])


def test_knn_never_holds_more_than_one_block_of_similarities():
    from torch.overrides import TorchFunctionMode

    from mimc.metrics import knn_predictions

    shapes = set()

    class Shapes(TorchFunctionMode):  # the shape of every tensor computed inside
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.add(tuple(t.shape))
            return out

    feats = np.random.default_rng(0).normal(size=(1000, 4))
    with Shapes():
        knn_predictions(feats, np.arange(1000) % 4, block_bytes=8 * 1000 * 37)
    largest = max(shapes, key=lambda s: int(np.prod(s)))
    assert largest == (37, 1000) and (1000 % 37, 1000) in shapes  # blocks of 37 rows and the rest, never (1000, 1000)


def test_knn_block_rows_and_defaults():
    from mimc.metrics import KNN_BLOCK_BYTES, knn_block_rows

    assert KNN_BLOCK_BYTES == 256 * 2**20
    assert knn_block_rows(50_000) == 671  # 671 x 50 000 float64 = 268 MB... within 256 MiB
    assert 8 * 50_000 * knn_block_rows(50_000) <= KNN_BLOCK_BYTES < 8 * 50_000 * (knn_block_rows(50_000) + 1)
    assert knn_block_rows(10**9) == 1  # a gallery wider than the budget still runs, one query at a time


def test_knn_gallery_and_queries_on_a_hand_made_case():
    from mimc.metrics import knn_predictions, knn_top1

    angle = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]  # noqa: E731
    gallery = np.array([angle(0), angle(10), angle(20), angle(90), angle(100), angle(180)])
    labels = np.array(["east", "east", "east", "north", "north", "west"])
    queries = np.array([angle(5), angle(95), angle(170), angle(50)]) * np.array([[1.0], [3.0], [0.5], [2.0]])  # scale is ignored
    np.testing.assert_array_equal(knn_predictions(gallery, labels, k=1, queries=queries), ["east", "north", "west", "east"])
    # k=3 at 50 degrees: the nearest three are east at 30 and 40 degrees and north at 40 -> east
    assert knn_predictions(gallery, labels, k=3, queries=queries[3:])[0] == "east"
    # 170 degrees, k=3: west at 10 degrees, north at 70 and 80: exp(cos/0.07) makes the one near west win;
    # at a high temperature the weights are nearly equal and the two norths outvote it
    assert knn_predictions(gallery, labels, k=3, queries=queries[2:3])[0] == "west"
    assert knn_predictions(gallery, labels, k=3, temperature=100.0, queries=queries[2:3])[0] == "north"
    # The gallery's own images are not left out: a query equal to a gallery image finds it.
    assert knn_top1(gallery, labels, k=1, queries=gallery, query_labels=labels) == 1.0
    assert knn_top1(gallery, labels, k=1, queries=queries, query_labels=["east", "north", "north", "north"]) == 0.5


def test_knn_bad_inputs_are_one_line_and_the_input_is_not_changed():
    from mimc.errors import ConfigError
    from mimc.metrics import knn_predictions, knn_top1

    feats = np.random.default_rng(0).normal(size=(6, 3))
    before = feats.copy()
    tensor = torch.from_numpy(feats.copy())
    knn_predictions(feats, [0, 0, 1, 1, 2, 2])
    knn_predictions(tensor, [0, 0, 1, 1, 2, 2], queries=tensor)
    np.testing.assert_array_equal(feats, before)  # normalised in place, but in a copy
    np.testing.assert_array_equal(tensor.numpy(), before)
    with pytest.raises(DataError, match="query_labels"):
        knn_top1(feats, [0] * 6, queries=feats)
    with pytest.raises(DataError, match="one label per query"):
        knn_top1(feats, [0] * 6, queries=feats, query_labels=[0, 1])
    with pytest.raises(DataError, match="queries have 2 features but the gallery has 3"):
        knn_predictions(feats, [0] * 6, queries=feats[:, :2])
    with pytest.raises(DataError, match="at least 2 labelled images"):
        knn_predictions(feats[:1], [0])
    with pytest.raises(DataError, match="7 labels"):
        knn_predictions(feats, [0] * 7)
    with pytest.raises(ConfigError, match="k must be"):
        knn_predictions(feats, [0] * 6, k=0)
    with pytest.raises(ConfigError, match="temperature must be"):
        knn_predictions(feats, [0] * 6, temperature=0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_outputs_are_the_worst_fidelity_not_a_perfect_one(bad):
    # before: NaN outputs gave max_abs 0.0 and SQNR 200 dB (Python's max kept 0.0 over a NaN, and
    # log10 of NaN was capped), so the fp32 export gate, which reads max_abs, passed a NaN graph
    from mimc.deploy.validate import gate_failures

    ref = np.random.default_rng(0).standard_normal((4, 8))
    cand = ref.copy()
    cand[1, 3] = bad
    meter = FidelityMeter()
    meter.update(cand[:2], ref[:2])
    other = FidelityMeter()
    other.update(cand[2:], ref[2:])
    other.merge(meter)  # a torchrun rank's share carries its NaN over
    for fid in (compare_outputs({"pooled": ref}, {"pooled": cand}), other.result()):
        assert fid.max_abs == np.inf and fid.sqnr_db == -SQNR_CAP_DB and "1 non-finite values" in fid.note
        assert gate_failures(fid, "fp32") == ["outputs hold NaN/inf values"] and gate_failures(fid, "int8")
        assert fid.to_dict()["max_abs"] is None and json.loads(json.dumps(fid.to_dict(), allow_nan=False))
