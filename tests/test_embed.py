"""``mimc.embed``: a model's features on a data source, streamed to .npy + JSON index or Parquet.

Torch, ONNX Runtime and OpenVINO give the same features; the index names, positions and labels are
the source's; subsets, rank shards, skipped images and refused outputs behave as documented; and
nothing is left behind by an error or an interrupt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mimc
from mimc.artifact import save_artifact
from mimc.data import ImageSource
from mimc.data.feature_files import NpyWriter, output_paths
from mimc.embedding import embed
from mimc.errors import BadInputError, ConfigError, DataError, DeviceUnavailableError, MissingExtraError
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config

CFG = tiny_config()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes, nested folders, images of different sizes (resized by the source)."""
    root = tmp_path_factory.mktemp("embed") / "data"
    rng = np.random.default_rng(0)
    for i in range(22):
        path = root / f"class{i % 2}" / ("deep" if i % 4 == 0 else "") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36 + i % 3, 40, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return save_artifact(build_encoder(CFG, seed=0), tmp_path_factory.mktemp("art") / "art")


@pytest.fixture(scope="module")
def graph(artifact):
    return mimc.export(str(artifact), validate=False, batch="dynamic").path


def _load(path):
    feats = np.load(path)
    index = json.loads(path.with_suffix(".json").read_text())
    return feats, index


def test_torch_and_onnx_agree_and_the_index_is_the_source(tmp_path, folder, artifact, graph):
    a = embed(str(artifact), str(folder), tmp_path / "torch", batch_size=5, workers=0)
    b = embed(str(graph), str(folder), tmp_path / "onnx.npy", batch_size=5, workers=2)
    assert a["runtime"] == "torch" and b["runtime"] == "onnxruntime-cpu" and a["images"] == b["images"] == 22
    fa, ia = _load(tmp_path / "torch.npy")
    fb, ib = _load(tmp_path / "onnx.npy")
    assert fa.shape == (22, CFG.dim) and fa.dtype == np.float32
    np.testing.assert_allclose(fa, fb, atol=1e-4, rtol=0)
    drawn = ImageSource(folder).draw(CFG)
    with torch.no_grad():
        want = build_encoder(CFG, seed=0)(drawn.pixels).pooled.numpy()
    np.testing.assert_allclose(fa, want, atol=1e-5, rtol=0)
    assert [r["name"] for r in ia["rows"]] == drawn.names and any(n.startswith("class0/deep/") for n in drawn.names)
    assert [r["label"] for r in ia["rows"]] == drawn.labels.tolist() and [r["position"] for r in ia["rows"]] == list(range(22))
    assert ia["class_names"] == ["class0", "class1"] and ia["images"] == 22 and ia["skipped"] == 0
    assert ia["shape"] == [22, CFG.dim] and ia["model"] == str(artifact) and ia["source"] == str(folder)
    assert ia["rows"] == ib["rows"] and ib["runtime"] == "onnxruntime-cpu"


def test_tokens_are_every_output_token(tmp_path, folder, artifact, graph):
    embed(str(artifact), str(folder), tmp_path / "t.npy", tokens=True, n=6, workers=0)
    embed(str(graph), str(folder), tmp_path / "g.npy", tokens=True, n=6, workers=0)
    ta, tb = np.load(tmp_path / "t.npy"), np.load(tmp_path / "g.npy")
    assert ta.shape == (6, CFG.num_patches + 1, CFG.dim)
    np.testing.assert_allclose(ta, tb, atol=1e-4, rtol=0)
    pixels = ImageSource(folder).draw(CFG, 6).pixels
    with torch.no_grad():
        np.testing.assert_allclose(ta, build_encoder(CFG, seed=0)(pixels).last_hidden_state.numpy(), atol=1e-5, rtol=0)


def test_parquet_round_trip(tmp_path, folder, graph):
    pq = pytest.importorskip("pyarrow.parquet")
    embed(str(graph), str(folder), tmp_path / "f.npy", workers=0)
    report = embed(str(graph), str(folder), tmp_path / "f.parquet", workers=0)
    assert report["format"] == "parquet" and report["index"] is None
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.column_names == ["name", "position", "label", "feature"] and table.num_rows == 22
    feats, index = _load(tmp_path / "f.npy")
    np.testing.assert_array_equal(np.stack(table.column("feature").to_numpy(zero_copy_only=False)), feats)
    assert table.column("name").to_pylist() == [r["name"] for r in index["rows"]]
    assert table.column("label").to_pylist() == [r["label"] for r in index["rows"]]
    meta = pq.ParquetFile(tmp_path / "f.parquet").metadata.metadata
    assert json.loads(meta[b"mimc"])["class_names"] == ["class0", "class1"]
    assert json.loads(meta[b"mimc_counts"])["images"] == 22

    embed(str(graph), str(folder), tmp_path / "t.parquet", tokens=True, n=3, workers=0)
    tok = pq.read_table(tmp_path / "t.parquet").column("feature")
    assert tok.type.list_size == CFG.num_patches + 1 and tok.type.value_type.list_size == CFG.dim
    assert np.asarray(tok.to_pylist()).shape == (3, CFG.num_patches + 1, CFG.dim)


def test_npz_text_and_column_labels_are_written_as_class_indices(tmp_path, graph):
    """Labels of a .npz as text (or shaped (N, 1)) reach the index and Parquet as class indices
    with their class names, as shard labels do (they raised a ValueError / TypeError traceback)."""
    pq = pytest.importorskip("pyarrow.parquet")
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "text.npz", images=images, labels=np.array(["dog", "cat", "dog", "ant", "cat", "dog"]))
    np.savez(tmp_path / "column.npz", images=images, labels=np.array([[2], [1], [2], [0], [1], [2]]))
    embed(str(graph), str(tmp_path / "text.npz"), tmp_path / "t.npy", workers=0)
    embed(str(graph), str(tmp_path / "text.npz"), tmp_path / "t.parquet", workers=0)
    embed(str(graph), str(tmp_path / "column.npz"), tmp_path / "c.npy", workers=0)
    _, index = _load(tmp_path / "t.npy")
    assert [r["label"] for r in index["rows"]] == [2, 1, 2, 0, 1, 2] and index["class_names"] == ["ant", "cat", "dog"]
    assert pq.read_table(tmp_path / "t.parquet").column("label").to_pylist() == [2, 1, 2, 0, 1, 2]
    assert [r["label"] for r in _load(tmp_path / "c.npy")[1]["rows"]] == [2, 1, 2, 0, 1, 2]


def test_a_seeded_subset(tmp_path, folder, graph):
    report = embed(str(graph), str(folder), tmp_path / "s", n=7, seed=3, workers=0)
    feats, index = _load(tmp_path / "s.npy")
    source = ImageSource(folder, seed=3)
    drawn = source.draw(CFG, 7)
    assert report["images"] == 7 and feats.shape == (7, CFG.dim)
    assert [r["position"] for r in index["rows"]] == source.positions(7).tolist() != list(range(7))
    assert [r["name"] for r in index["rows"]] == drawn.names and index["n"] == 7 and index["seed"] == 3
    whole, _ = _load_whole(tmp_path, folder, graph)
    np.testing.assert_allclose(feats, whole[source.positions(7)], atol=1e-6, rtol=0)


def _load_whole(tmp_path, folder, graph):
    path = tmp_path / "whole.npy"
    if not path.exists():
        embed(str(graph), str(folder), path, workers=0)
    return _load(path)


def test_rank_shards_concatenate_to_the_whole(tmp_path, folder, graph):
    whole, index = _load_whole(tmp_path, folder, graph)
    parts = [embed(str(graph), str(folder), tmp_path / f"r{r}.npy", rank=r, world=3, batch_size=4, workers=1) for r in range(3)]
    assert [p["images"] for p in parts] == [8, 7, 7]
    shards = [_load(tmp_path / f"r{r}.npy") for r in range(3)]
    np.testing.assert_allclose(np.concatenate([f for f, _ in shards]), whole, atol=1e-6, rtol=0)
    assert [row for _, i in shards for row in i["rows"]] == index["rows"]
    assert shards[1][1]["shard"] == {"rank": 1, "world": 3} and index["shard"] is None


def test_skip_corrupt_counts_and_keeps_the_rows_aligned(tmp_path, folder, graph):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "class1" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"broken.png.*skip_corrupt"):
        embed(str(graph), str(data), tmp_path / "x.npy", workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing left behind

    report = embed(str(graph), str(data), tmp_path / "x.npy", skip_corrupt=True, workers=2, batch_size=4)
    assert report["images"] == 22 and report["skipped"] == 1 and report["skipped_names"] == ["class1/broken.png"]
    feats, index = _load(tmp_path / "x.npy")
    assert feats.shape == (22, CFG.dim) and index["skipped_names"] == ["class1/broken.png"]
    whole, whole_index = _load_whole(tmp_path, folder, graph)
    np.testing.assert_allclose(feats, whole, atol=1e-6, rtol=0)
    assert [r["name"] for r in index["rows"]] == [r["name"] for r in whole_index["rows"]]
    assert "class1/broken.png" not in {r["name"] for r in index["rows"]}


def test_every_image_unreadable_writes_nothing(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="every image was unreadable"):
        embed(mimc.load("ref"), str(data), tmp_path / "x.npy", skip_corrupt=True, workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_outputs_are_refused_before_any_work(tmp_path, folder, graph):
    (tmp_path / "taken.npy").write_bytes(b"keep")
    with pytest.raises(BadInputError, match="already exists") as exc:
        embed(str(graph), str(folder), tmp_path / "taken", workers=0)
    assert exc.value.options == ("output", "overwrite") and (tmp_path / "taken.npy").read_bytes() == b"keep"
    (tmp_path / "only-index.json").write_text("{}")
    with pytest.raises(BadInputError, match="only-index.json already exists"):
        embed(str(graph), str(folder), tmp_path / "only-index.npy", workers=0)
    embed(str(graph), str(folder), tmp_path / "taken", workers=0, overwrite=True, n=3)
    assert np.load(tmp_path / "taken.npy").shape == (3, CFG.dim)

    with pytest.raises(BadInputError, match="lies inside the input"):
        embed(str(graph), str(folder), folder / "feats.npy", workers=0)
    array = tmp_path / "images.npy"
    np.save(array, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(BadInputError, match="is the input"):
        embed(str(graph), str(array), array, workers=0, overwrite=True)
    with pytest.raises(BadInputError, match="must end in .npy"):
        embed(str(graph), str(folder), tmp_path / "feats.csv", workers=0)
    with pytest.raises(BadInputError, match="does not exist"):
        embed(str(graph), str(folder), tmp_path / "nowhere" / "f.npy", workers=0)
    for bad, option in [(dict(batch_size=0), "batch_size"), (dict(n=0), "n"), (dict(threads=0), "threads"),
                        (dict(device="tpu"), "device"), (dict(rank=2, world=2), "rank")]:
        with pytest.raises(ConfigError) as exc:
            embed(str(graph), str(folder), tmp_path / "y.npy", **bad)
        assert option in exc.value.options
    assert not (tmp_path / "y.npy").exists()
    # next to the model inside its artifact folder is fine
    embed(str(graph), str(folder), graph.parent / "feats.npy", n=2, workers=0)
    assert (graph.parent / "feats.json").is_file()


def test_overwrite_never_replaces_a_json_that_is_not_an_index(tmp_path, folder, artifact):
    """-o ART/mimc --overwrite would write the index over the artifact's own manifest (an input)."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    manifest = (art / "mimc.json").read_bytes()
    with pytest.raises(BadInputError, match="mimc.json is not an embeddings index"):
        embed(str(art), str(folder), art / "mimc", overwrite=True, n=2, workers=0)
    assert (art / "mimc.json").read_bytes() == manifest and not (art / "mimc.npy").exists()
    embed(str(art), str(folder), art / "mine", n=2, workers=0)
    embed(str(art), str(folder), art / "mine", n=3, workers=0, overwrite=True)  # an index mimc wrote is replaced
    assert np.load(art / "mine.npy").shape == (3, CFG.dim)


def test_reading_options_beside_an_image_source_are_refused(tmp_path, folder, graph):
    """An ImageSource carries its own reading options: skip_corrupt=True beside one was dropped silently."""
    for given in (dict(skip_corrupt=True), dict(workers=2), dict(image_column="img"), dict(label_column="y")):
        with pytest.raises(ConfigError, match="give them to the ImageSource") as exc:
            embed(str(graph), ImageSource(folder), tmp_path / "x.npy", **given)
        assert exc.value.options == (next(iter(given)),)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_leaves_nothing_behind(tmp_path, folder, graph):
    def interrupt(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    for name in ("k.npy", "k.parquet"):
        with pytest.raises(KeyboardInterrupt):
            embed(str(graph), str(folder), tmp_path / name, batch_size=2, workers=1, on_progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_devices_that_are_not_here_are_one_line_errors(tmp_path, folder, graph, artifact):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(DeviceUnavailableError, match="no CUDA provider") as exc:
            embed(str(graph), str(folder), tmp_path / "c.npy", device="cuda")
        assert exc.value.options == ("device",) and "\n" not in str(exc.value)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="no CUDA GPU"):
            embed(str(artifact), str(folder), tmp_path / "c.npy", device="cuda")
        engine = graph.parent.parent / "h100-fp16.plan"  # built with -o outside the artifact (inside it: listed and hashed)
        engine.write_bytes(b"engine")
        (graph.parent.parent / "h100-fp16.plan.json").write_text(json.dumps({"format": "mimc-tensorrt-engine", "onnx": str(graph)}))
        with pytest.raises(DeviceUnavailableError, match="runs only on an NVIDIA GPU"):
            embed(str(engine), str(folder), tmp_path / "c.npy")
    with pytest.raises(ConfigError, match="cannot run a TensorRT engine"):
        embed(str(graph.parent / "x.engine"), str(folder), tmp_path / "c.npy", device="cpu")
    with pytest.raises(ConfigError, match="OpenVINO IR runs on"):
        embed(str(graph.parent / "x.xml"), str(folder), tmp_path / "c.npy", device="cuda")
    assert list(tmp_path.iterdir()) == []


def test_parquet_without_pyarrow(tmp_path, folder, graph, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'mimc\[datasets\]'"):
        embed(str(graph), str(folder), tmp_path / "f.parquet")
    assert list(tmp_path.iterdir()) == []


def test_openvino_ir_gives_the_same_features(tmp_path, folder, graph):
    pytest.importorskip("openvino")
    static = mimc.export(str(graph.parent), tmp_path / "static", validate=False, batch=4).path
    built = mimc.build(static, "openvino-cpu")
    ir = built["ir"]
    report = embed(ir, str(folder), tmp_path / "ov.npy", threads=1, workers=0)
    assert report["runtime"] == "openvino-cpu" and report["batch_size"] == 4  # the IR's static batch
    whole, _ = _load_whole(tmp_path, folder, graph)
    np.testing.assert_allclose(np.load(tmp_path / "ov.npy"), whole, atol=1e-4, rtol=0)


def test_npy_header_shrinks_in_place(tmp_path):
    """Rows fewer than reserved (skipped images): the header is rewritten in the same bytes, even
    when the row count loses digits."""
    for capacity, rows in [(10000, 9999), (100, 7), (1, 1)]:
        path, index = tmp_path / f"{capacity}.npy", tmp_path / f"{capacity}.json"
        path.touch()
        writer = NpyWriter(path, index, capacity, {"model": "m"})
        data = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        writer.write(data, np.arange(rows), [f"x{i}" for i in range(rows)], None)
        writer.close({"images": rows})
        np.testing.assert_array_equal(np.load(path), data)
        assert np.load(path, mmap_mode="r").shape == (rows, 3)
        assert len(json.loads(index.read_text())["rows"]) == rows


def test_output_paths():
    assert output_paths("feats") == (output_paths("feats.npy")[0], output_paths("feats.npy")[1], "npy")
    assert output_paths("a/feats.npy")[1].name == "feats.json"
    assert output_paths("f.parquet")[1:] == (None, "parquet")


def test_the_suffix_is_read_in_any_case_and_the_index_is_always_json(tmp_path, folder, graph):
    """-o x.NPY writes x.NPY and x.json (the format is read from the suffix in any case); the refusal of a
    foreign x.json named x.npy, a file that -o x.NPY never writes."""
    assert output_paths("x.NPY") == (Path("x.NPY"), Path("x.json"), "npy") and output_paths("x.Parquet")[2] == "parquet"
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(BadInputError, match=r"x.json is not an embeddings index \(the index of x.NPY would replace it\)"):
        embed(str(graph), str(folder), tmp_path / "x.NPY", overwrite=True, n=2, workers=0)


def test_an_existing_folder_is_not_an_output_stem(tmp_path, folder, graph):
    """-o out/ (or -o out) naming an existing folder wrote out.npy and out.json beside it, not in it."""
    (tmp_path / "out").mkdir()
    for given in (tmp_path / "out", f"{tmp_path / 'out'}/"):
        with pytest.raises(BadInputError, match="is a folder: name the features file in it, like"):
            embed(str(graph), str(folder), given, n=2, workers=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, folder, graph, monkeypatch):
    def full(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NpyWriter, "write", full)
    with pytest.raises(mimc.api.MimcError, match=r"cannot write f.npy \(No space left on device\)") as exc:
        embed(str(graph), str(folder), tmp_path / "f.npy", workers=0)
    assert exc.value.options == ("output",) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("full", [".npy.", ".json."])
def test_a_disk_that_fills_is_one_line_and_leaves_nothing(tmp_path, folder, graph, monkeypatch, full):
    """A write to a full disk: cleaning up closed the temporary, whose buffered bytes failed to reach
    the disk again: that OSError replaced the one-line error (a traceback under `mimc embed`)."""
    import builtins

    from mimc.data import feature_files

    def on_a_full_disk(path, mode="r", **kwargs):
        return builtins.open("/dev/full" if full in str(path) else path, mode, **kwargs)

    monkeypatch.setattr(feature_files, "open", on_a_full_disk, raising=False)
    with pytest.raises(mimc.api.MimcError, match=r"cannot write f.npy \(No space left on device\)"):
        embed(str(graph), str(folder), tmp_path / "f.npy", workers=0)
    assert list(tmp_path.iterdir()) == []
