"""Evaluation: the k-NN protocol, feature fidelity (pooled, per-token, SQNR), ONNX models, the verb."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mimc.artifact import save_artifact
from mimc.compression.blocks import remove_blocks
from mimc.errors import NotAModelError
from mimc.evaluation import evaluate, features, fidelity
from mimc.metrics import knn_predictions, knn_top1
from mimc.models.vit import EncoderOutput


# k-NN ---------------------------------------------------------------------------------------------
def test_knn_separable_is_perfect_and_shuffled_is_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32)) * 10
    labels = np.repeat(np.arange(4), 50)
    feats = centers[labels] + rng.normal(size=(200, 32))
    assert knn_top1(feats, labels) == 1.0
    shuffled = [knn_top1(rng.normal(size=(200, 32)), rng.permutation(labels)) for _ in range(5)]
    assert 0.1 < float(np.mean(shuffled)) < 0.4  # chance is 0.25


def test_knn_is_leave_one_out():
    feats = np.random.default_rng(1).normal(size=(20, 8))
    # Every sample has its own label: only the sample itself could vote for it.
    assert knn_top1(feats, np.arange(20)) == 0.0


def test_knn_votes_are_weighted_by_similarity():
    # Query 0 has one near neighbour of class 1 (cos 0.99) and nine of class 2 at cos ~0.5: the
    # exp(sim / 0.07) weights let the near one win where a majority vote would pick class 2.
    q = np.array([1.0, 0.0, 0.0])
    near = np.array([0.99, np.sqrt(1 - 0.99**2), 0.0])
    far = [np.array([0.5, 0.0, np.sqrt(0.75)]) + 1e-3 * i for i in range(9)]
    feats = np.stack([q, near, *far])
    labels = np.array([1, 1] + [2] * 9)
    assert knn_predictions(feats, labels)[0] == 1
    assert knn_predictions(feats, labels, temperature=100.0)[0] == 2  # ~uniform weights: majority


def test_knn_accepts_string_labels():
    feats = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    assert knn_top1(feats, np.array(["cat", "cat", "dog", "dog"]), k=1) == 1.0


# Fidelity -----------------------------------------------------------------------------------------
def test_fidelity_to_itself_is_perfect_and_pruning_lowers_it(tiny_encoder):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    same = fidelity(tiny_encoder, tiny_encoder, x, batch_size=2)
    assert same.pooled_cosine_min == pytest.approx(1.0, abs=1e-6) and same.token_cosine_min == pytest.approx(1.0, abs=1e-6)
    assert same.sqnr_db == 200.0 and same.n_images == 5
    pruned = fidelity(remove_blocks(tiny_encoder, [0, 1]), tiny_encoder, x)
    assert pruned.pooled_cosine_mean < 0.999 and pruned.sqnr_db < 60
    assert pruned.pooled_cosine_min <= pruned.pooled_cosine_mean
    assert pruned.token_cosine_mean is not None and pruned.note is None


class _FewerTokens(torch.nn.Module):
    """Stands in for a token-reduced model: same pooled features, half the tokens."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def forward(self, x):
        out = self.encoder(x)
        return EncoderOutput(out.last_hidden_state[:, ::2], out.pooled)


def test_fidelity_with_fewer_tokens_reports_pooled_only(tiny_encoder):
    x = torch.randn(3, 3, 32, 32)
    fid = fidelity(_FewerTokens(tiny_encoder), tiny_encoder, x)
    assert fid.token_cosine_mean is None and "tokens" in fid.note
    assert fid.pooled_cosine_min == pytest.approx(1.0, abs=1e-6)


# ONNX ---------------------------------------------------------------------------------------------
def test_onnx_features_match_torch_and_foreign_onnx_is_refused(tiny_encoder, tmp_path):
    from mimc.deploy.onnx import export_onnx

    art = save_artifact(tiny_encoder, tmp_path / "art")
    export_onnx(tiny_encoder, art / "model.onnx", batch=2)  # static batch 2: 5 images need padding
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(features(str(art / "model.onnx"), x), features(tiny_encoder, x), atol=1e-4, rtol=0)
    fid = fidelity(str(art / "model.onnx"), tiny_encoder, x)
    assert fid.pooled_cosine_min > 0.99999 and fid.token_cosine_min > 0.99999

    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes((art / "model.onnx").read_bytes())
    with pytest.raises(NotAModelError, match="not written by mimc"):
        features(str(foreign / "model.onnx"), x)


# The verb -----------------------------------------------------------------------------------------
def test_evaluate_reports_fidelity_and_knn(tiny_encoder, tiny_images, tmp_path):
    images, labels = tiny_images
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    pruned = remove_blocks(tiny_encoder, [3])
    report = evaluate(pruned, tiny_encoder, data=str(tmp_path / "set.npz"))
    assert report["data"]["n_images"] == len(images) and report["data"]["labelled"]
    assert 0.0 < report["fidelity"]["pooled_cosine_mean"] < 1.0
    assert 0.0 <= report["knn_top1"] <= 1.0 and 0.0 <= report["reference_knn_top1"] <= 1.0
    self_report = evaluate(tiny_encoder, tiny_encoder, data=str(tmp_path / "set.npz"), n=10)
    assert self_report["knn_top1"] == self_report["reference_knn_top1"] and self_report["data"]["n_images"] == 10
    np.save(tmp_path / "unlabelled.npy", images)
    unlabelled = evaluate(pruned, None, data=str(tmp_path / "unlabelled.npy"))
    assert "knn_top1" not in unlabelled and "fidelity" not in unlabelled


def test_knn_over_one_class_is_skipped_with_a_note_not_a_perfect_score(tiny_encoder, tiny_images, tmp_path):
    # before: photos in one folder under the data folder (data/images/*.jpg: one class, 'images') scored k-NN
    # top-1 1.0, every image "right", with or without a val set
    images, _ = tiny_images
    np.savez(tmp_path / "one.npz", images=images, labels=np.zeros(len(images), np.int64), class_names=["images"])
    np.savez(tmp_path / "val.npz", images=images[:4] // 2, labels=np.zeros(4, np.int64), class_names=["images"])
    for val in (None, str(tmp_path / "val.npz")):
        report = evaluate(tiny_encoder, tiny_encoder, data=str(tmp_path / "one.npz"), val=val)
        assert "knn_top1" not in report and "reference_knn_top1" not in report
        assert report["knn_note"] == "data has one class (images): k-NN would call every image right, skipped; give data two classes or more"


# The verb with a val set (gallery / query k-NN) ---------------------------------------------------
def test_evaluate_with_val_classifies_val_against_data_and_measures_fidelity_on_val(tiny_encoder, tiny_images, tmp_path):
    from mimc.data import load_images

    images, labels = tiny_images
    np.savez(tmp_path / "train.npz", images=images[:16], labels=labels[:16], class_names=["a", "b"])
    np.savez(tmp_path / "val.npz", images=images[16:], labels=labels[16:], class_names=["a", "b"])
    pruned = remove_blocks(tiny_encoder, [3])
    report = evaluate(pruned, tiny_encoder, data=str(tmp_path / "train.npz"), val=str(tmp_path / "val.npz"))
    assert report["knn_protocol"] == "gallery-query" and report["knn_k"] == 10
    assert (report["knn_gallery_size"], report["knn_query_size"]) == (16, 8)
    assert report["data"]["n_images"] == 16 and report["val"]["n_images"] == 8
    assert report["fidelity_on"] == "val" and report["fidelity"]["n_images"] == 8
    assert report["fidelity"] == fidelity(pruned, tiny_encoder, load_images(tmp_path / "val.npz", pruned.config).pixels).to_dict()
    for key, model in (("knn_top1", pruned), ("reference_knn_top1", tiny_encoder)):
        gallery, queries = (features(model, load_images(tmp_path / f, model.config).pixels) for f in ("train.npz", "val.npz"))
        assert report[key] == knn_top1(gallery, labels[:16], queries=queries, query_labels=labels[16:])
    assert report["knn_retained"] == report["knn_top1"] / report["reference_knn_top1"]
    assert report["knn_top1"] != 0.5  # so that the class-name test below can tell a mapping by index from one by name
    assert report["knn_val_in_data"] == 0

    # The same val images with the classes listed the other way round: matched by name, same result.
    np.savez(tmp_path / "val_swapped.npz", images=images[16:], labels=1 - labels[16:], class_names=["b", "a"])
    swapped = evaluate(pruned, tiny_encoder, data=str(tmp_path / "train.npz"), val=str(tmp_path / "val_swapped.npz"))
    assert swapped["knn_top1"] == report["knn_top1"] and swapped["reference_knn_top1"] == report["reference_knn_top1"]

    # Val images that are also data images are counted (they find themselves).
    np.savez(tmp_path / "val_overlap.npz", images=images[13:], labels=labels[13:], class_names=["a", "b"])
    overlap = evaluate(pruned, None, data=str(tmp_path / "train.npz"), val=str(tmp_path / "val_overlap.npz"))
    assert overlap["knn_val_in_data"] == 3 and overlap["knn_query_size"] == 11

    # Without val: leave-one-out over data, fidelity on data, as before.
    alone = evaluate(pruned, tiny_encoder, data=str(tmp_path / "train.npz"))
    assert alone["knn_protocol"] == "leave-one-out" and alone["fidelity_on"] == "data"
    assert "val" not in alone and "knn_val_in_data" not in alone
    assert (alone["knn_gallery_size"], alone["knn_query_size"]) == (16, 16)
    assert alone["knn_top1"] == knn_top1(features(pruned, load_images(tmp_path / "train.npz", pruned.config).pixels), labels[:16])


def _set(labels, names=None, sha="x"):
    from mimc.data import ImageSet

    labels = None if labels is None else np.asarray(labels)
    return ImageSet(torch.zeros(0), labels, names, "test", sha)


def test_a_set_whose_every_image_is_skipped_says_so_and_names_its_option(tiny_encoder, tiny_images, tmp_path):
    """skip_corrupt over a set of only unreadable images: the error says they were skipped and names
    the set it came from (it said 'no images ... pass a non-empty data set', for val too)."""
    from mimc.data import ImageSource
    from mimc.errors import DataError

    images, labels = tiny_images
    np.savez(tmp_path / "set.npz", images=images, labels=labels, class_names=["a", "b"])
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    bad = ImageSource(tmp_path / "bad", skip_corrupt=True, workers=0)
    with pytest.raises(DataError, match="every image was unreadable and skipped") as exc:
        evaluate(tiny_encoder, None, data=str(tmp_path / "set.npz"), val=bad)
    assert exc.value.options == ("val",)
    with pytest.raises(DataError, match="every image was unreadable and skipped") as exc:
        evaluate(tiny_encoder, None, data=bad)
    assert exc.value.options == ("data",)


def test_knn_labels_match_classes_by_name():
    from mimc.evaluation import knn_labels

    train = _set([0, 1, 2, 2], ["cat", "dog", "fox"], "t")
    gallery, queries = knn_labels(train, _set([0, 1, 1], ["cat", "fox"], "v"))  # val lacks dog: fine
    assert gallery.tolist() == ["cat", "dog", "fox", "fox"] and queries.tolist() == ["cat", "fox", "fox"]
    gallery, queries = knn_labels(train, _set(["fox", "cat"], None, "v"))  # bare string labels: names too
    assert queries.tolist() == ["fox", "cat"]
    gallery, queries = knn_labels(_set([3, 5]), _set([5, 5], None, "v"))  # neither named: values as they are
    assert gallery.tolist() == [3, 5] and queries.tolist() == [5, 5]
    assert knn_labels(train)[0].tolist() == knn_labels(train)[1].tolist() == [0, 1, 2, 2]  # leave-one-out: as given
    assert knn_labels(_set(None)) is None  # leave-one-out on unlabelled data: k-NN skipped, no error


@pytest.mark.parametrize(
    "train, val, match",
    [
        (_set([0, 1], ["cat", "dog"], "t"), _set([0, 1], ["cat", "owl"], "v"), "val has 1 class(es) that data lacks (owl)"),
        (_set([0, 1], ["cat", "dog"], "t"), _set([0, 1], None, "v"), "data names its classes but val has only numeric labels"),
        (_set([0, 1], None, "t"), _set([0, 1], ["cat", "dog"], "v"), "val names its classes but data has only numeric labels"),
        (_set([0, 1], ["cat", "dog"], "t"), _set(None, None, "v"), "val has no labels"),
        (_set(None, None, "t"), _set([0], ["cat"], "v"), "data has no labels"),
        (_set([0, 1], ["cat", "dog"], "same"), _set([0, 1], ["cat", "dog"], "same"), "val holds the same images as data"),
        (_set([0, 1], ["cat", "dog"], "t"), _set([0, 2], ["cat", "dog"], "v"), "val labels must be whole numbers indexing its 2 class_names"),
        (_set(list(range(5)), list("abcde"), "t"), _set([0, 1, 2, 3, 4], list("vwxyz"), "v"), "(v, w, x and 2 more)"),
    ],
)
def test_knn_labels_refuse_what_cannot_be_classified(train, val, match):
    from mimc.errors import DataError
    from mimc.evaluation import knn_labels

    with pytest.raises(DataError) as err:
        knn_labels(train, val)
    assert match in str(err.value) and "\n" not in str(err.value) and set(err.value.options) <= {"data", "val"}
