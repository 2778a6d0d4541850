"""Streamed image sources: WebDataset shards, saved datasets folders, recursive folders, memory-mapped
arrays; seeded subsets that read only what they use; worker- and rank-independent bytes; bad input."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mimc.data import ImageSource, expand_braces, open_reader
from mimc.data.readers import ArrayReader, FolderReader
from mimc.errors import DataError, MissingExtraError
from tests.conftest import tiny_config

CFG = tiny_config()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path, tiny_images):
    """ImageNet layout with nested folders inside the classes."""
    images, labels = tiny_images
    for i, (img, lab) in enumerate(zip(images, labels)):
        path = tmp_path / "data" / f"class{lab}" / ("deep" if i % 3 == 0 else "") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return tmp_path / "data"


def _write_shards(tmp_path, images, labels, per_shard=10, corrupt: int | None = None):
    import webdataset as wds

    paths = []
    for s in range(0, len(images), per_shard):
        path = tmp_path / f"train-{s // per_shard:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(s, min(s + per_shard, len(images))):
                data = b"not an image at all" if i == corrupt else _png(images[i])
                sink.write({"__key__": f"sample{i:05d}", "png": data, "cls": int(labels[i])})
        paths.append(path)
    return paths


def test_recursive_class_folder(folder, tiny_images):
    reader = open_reader(folder)
    assert isinstance(reader, FolderReader) and len(reader) == 24
    assert reader.class_names == ["class0", "class1"]
    assert sorted(np.bincount(reader.labels)) == [12, 12]
    assert any(name.startswith("class0/deep/") for name in map(reader.name, range(24)))


def test_webdataset_shards_match_the_same_images_in_a_folder(tmp_path, folder, tiny_images):
    pytest.importorskip("webdataset")
    images, labels = tiny_images
    _write_shards(tmp_path, images, labels)
    shards = ImageSource(str(tmp_path / "train-{000..002}.tar")).draw(CFG)
    assert len(shards) == 24 and shards.labels.tolist() == labels.tolist()
    assert shards.names[0] == "train-000.tar:sample00000.png"
    direct = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(_png(im))))).float() for im in images[:1]])
    assert direct.shape[0] == 1
    reference = ImageSource(str(tmp_path / "ref.npz"))
    np.savez(tmp_path / "ref.npz", images=images, labels=labels)
    assert torch.equal(shards.pixels, reference.draw(CFG).pixels)


def test_brace_patterns():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/s-{1..2}.tar") == ["x/s-1.tar", "x/s-2.tar", "y/s-1.tar", "y/s-2.tar"]
    with pytest.raises(DataError, match="low..high"):
        expand_braces("a-{5..1}.tar")


@pytest.mark.parametrize("pattern", ["a-{0..011}.tar", "a-{0..11}.tar", "a-{00..11}.tar", "a-{000..11}.tar", "a-{1..010}.tar"])
def test_brace_ranges_are_padded_as_webdataset_pads_them(pattern):
    # before: only the low bound's zeros counted, so 'a-{0..011}.tar' named a-0.tar .. a-11.tar where
    # WebDataset (braceexpand) reads a-000.tar .. a-011.tar: a leading zero in either bound pads to the longer
    import braceexpand

    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern))


def test_shard_pattern_matching_nothing_or_partly(tmp_path, tiny_images):
    pytest.importorskip("webdataset")
    with pytest.raises(DataError, match="matches no file"):
        open_reader(str(tmp_path / "none-{000..004}.tar"))
    images, labels = tiny_images
    _write_shards(tmp_path, images, labels)
    with pytest.raises(DataError, match="2 of 5 shards are missing"):
        open_reader(str(tmp_path / "train-{000..004}.tar"))


@pytest.mark.parametrize("pattern", ["train-{000,001,000}.tar", "train-00{0,{0,1}}.tar"])
def test_a_pattern_naming_one_shard_twice_is_refused(tmp_path, tiny_images, pattern):
    # before: the shard was indexed twice, so its images were read (and embedded, and voted in k-NN) twice
    _write_shards(tmp_path, *tiny_images, per_shard=12)
    with pytest.raises(DataError, match=r"names train-000.tar twice: name each shard once"):
        open_reader(str(tmp_path / pattern))


def test_corrupt_tar_member_is_named_or_skipped_on_request(tmp_path, tiny_images):
    pytest.importorskip("webdataset")
    images, labels = tiny_images
    _write_shards(tmp_path, images, labels, corrupt=13)
    spec = str(tmp_path / "train-{000..002}.tar")
    with pytest.raises(DataError, match=r"train-001.tar:sample00013.png .*skip_corrupt"):
        ImageSource(spec).draw(CFG)
    source = ImageSource(spec, skip_corrupt=True)
    stream = source.stream(CFG, batch_size=5)
    got = [name for batch in stream for name in batch.names]
    assert len(got) == 23 and stream.stats.skipped == ["train-001.tar:sample00013.png"]


def test_truncated_and_compressed_shards_are_refused(tmp_path, tiny_images):
    pytest.importorskip("webdataset")
    images, labels = tiny_images
    (path,) = _write_shards(tmp_path, images[:4], labels[:4])
    data = path.read_bytes()
    bad = tmp_path / "cut.tar"
    bad.write_bytes(data[:700])
    with pytest.raises(DataError):
        ImageSource(str(bad)).draw(CFG)
    gz = tmp_path / "packed.tar"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(path, arcname="inner.tar")
    with pytest.raises(DataError, match="compressed tar"):
        open_reader(str(gz))


def test_saved_datasets_folder(tmp_path, tiny_images):
    datasets = pytest.importorskip("datasets")
    images, labels = tiny_images
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["wide", "narrow"])})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(im) for im in images], "y": labels.tolist()}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    got = ImageSource(tmp_path / "ds").draw(CFG)  # columns found by their features
    np.savez(tmp_path / "ref.npz", images=images)
    assert torch.equal(got.pixels, ImageSource(tmp_path / "ref.npz").draw(CFG).pixels)
    assert got.labels.tolist() == labels.tolist() and got.class_names == ["wide", "narrow"]
    with pytest.raises(DataError, match="no column 'picture'.*img, y"):
        ImageSource(tmp_path / "ds", image_column="picture").draw(CFG)
    with pytest.raises(DataError, match="no column 'target'"):
        ImageSource(tmp_path / "ds", label_column="target").draw(CFG)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="splits train, validation"):
        ImageSource(tmp_path / "dd").draw(CFG)


def test_a_datasets_class_label_of_minus_one_is_no_label(tmp_path, tiny_images):
    # before: -1 (datasets' "no label", e.g. every row of a test split) was taken as a class: an unlabelled
    # split scored k-NN top-1 1.0 (every image "right"), and a partly labelled one mixed -1 in as a class
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(im) for im in tiny_images[0][:4]]
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    for name, labels in (("none", [-1] * 4), ("some", [0, 1, -1, 1])):
        datasets.Dataset.from_dict({"img": images, "y": labels}, features=features).save_to_disk(str(tmp_path / name))
    reader = open_reader(tmp_path / "none")
    assert reader.labels is None and reader.class_names is None
    with pytest.raises(DataError, match=r"some: 1 of 4 rows have no label \(-1 in column 'y'\): label every row or none"):
        open_reader(tmp_path / "some")


def test_a_datasets_row_without_its_image_is_an_unreadable_image(tmp_path, tiny_images):
    # before: one empty cell (None) in the image column was "column 'img' holds NoneType, not images: name the
    # image column with image_column" (it is the image column), and skip_corrupt could not skip it
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(im) for im in tiny_images[0][:3]] + [None]
    datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()})).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"cannot read image .*ds\[3\] \(the row has no image\): remove or replace it"):
        ImageSource(tmp_path / "ds", workers=0).draw(CFG)
    stream = ImageSource(tmp_path / "ds", workers=0, skip_corrupt=True).stream(CFG)
    assert sum(len(b.pixels) for b in stream) == 3 and len(stream.stats.skipped) == 1


def test_saved_datasets_folder_without_the_package(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r"mimc\[datasets\]"):
        open_reader(tmp_path / "ds")


def test_npy_is_memory_mapped_and_a_subset_reads_only_its_images(tmp_path, tiny_images, monkeypatch):
    images, _ = tiny_images
    np.save(tmp_path / "x.npy", images)
    reader = open_reader(tmp_path / "x.npy")
    assert isinstance(reader, ArrayReader) and isinstance(reader.array, np.memmap)
    source = ImageSource(tmp_path / "x.npy", seed=3, workers=0)
    read = []
    original = ArrayReader.read
    monkeypatch.setattr(ArrayReader, "read", lambda self, i: read.append(i) or original(self, i))
    subset = source.draw(CFG, n=5)
    assert sorted(read) == source.positions(5).tolist() and len(subset) == 5


def test_bytes_do_not_depend_on_batches_workers_or_ranks(folder):
    whole = ImageSource(folder, workers=0).draw(CFG)
    streamed = ImageSource(folder, workers=2).stream(CFG, batch_size=5)
    assert len(streamed) == 5
    assert torch.equal(torch.cat([b.pixels for b in streamed]), whole.pixels)
    shards = [ImageSource(folder, workers=1).stream(CFG, batch_size=4, rank=r, world=3) for r in range(3)]
    parts = [b for s in shards for b in s]
    assert torch.equal(torch.cat([b.pixels for b in parts]), whole.pixels)
    assert [n for b in parts for n in b.names] == whole.names
    assert np.concatenate([b.labels for b in parts]).tolist() == whole.labels.tolist()


def test_indexed_loads_positions_of_the_subset(folder):
    source = ImageSource(folder, seed=1, workers=0)
    drawn = source.draw(CFG, n=10)
    indexed = source.indexed(CFG, n=10)
    assert len(indexed) == 10
    assert torch.equal(indexed.load([7, 2, 2]), drawn.pixels[[7, 2, 2]])


def test_hidden_files_are_not_images(folder, tmp_path):
    """macOS's ``._name.png`` metadata files (and any hidden file) are skipped as hidden folders are;
    they were read as images and stopped the run as unreadable."""
    (folder / "class1" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert len(FolderReader(folder)) == 24 and len(FolderReader(tmp_path / "flat")) == 1
    assert len(ImageSource(folder, workers=0).draw(CFG)) == 24


def test_one_corrupt_image_in_a_folder(folder, tiny_images):
    (folder / "class1" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"broken.png.*skip_corrupt"):
        ImageSource(folder, workers=2).draw(CFG)
    stream = ImageSource(folder, skip_corrupt=True, workers=2).stream(CFG, batch_size=8)
    assert sum(len(b.pixels) for b in stream) == 24 and stream.stats.skipped == ["class1/broken.png"]


def test_images_unfit_for_the_model_are_refused_not_skipped(tmp_path, tiny_images):
    """skip_corrupt skips images that cannot be read, not a source the model cannot take (five
    channels): that stopped the run as 'every image was unreadable'. Errors met mid-stream keep
    the option they name (they were all filed under skip_corrupt)."""
    images, _ = tiny_images
    np.save(tmp_path / "five.npy", np.concatenate([images, images[..., :2]], axis=-1))
    for skip in (False, True):
        with pytest.raises(DataError, match="5 channels") as exc:
            ImageSource(tmp_path / "five.npy", skip_corrupt=skip, workers=0).draw(CFG)
        assert exc.value.options == ("data",)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(im) for im in images[:3]], "note": ["a", "b", "c"]},
                                    features=datasets.Features({"img": datasets.Image(), "note": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="column 'note' holds str, not images") as exc:
        ImageSource(tmp_path / "ds", image_column="note").draw(CFG)
    assert exc.value.options == ("image_column",)


def test_rgba_palette_and_16_bit_images(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "b.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "c.png")
    got = ImageSource(tmp_path).draw(CFG).pixels
    red = (1.0 * 200 / 255 - CFG.image_mean[0]) / CFG.image_std[0]
    assert got[0, 0].sub(red).abs().max() < 1e-4 and abs(float(got[1, 0].mean()) - red) < 0.1
    white = [(1.0 - m) / s for m, s in zip(CFG.image_mean, CFG.image_std)]
    assert all(got[2, c].sub(white[c]).abs().max() < 1e-4 for c in range(3))


def test_workers_option_is_checked():
    with pytest.raises(DataError, match="workers must be 0"):
        ImageSource("builtin", workers=-1)


def test_preprocessor_geometry_is_read_and_applied(tmp_path):
    from mimc.data.preprocess import resize_crop
    from mimc.models.convert.hf_load import preprocess_geometry, read_preprocessor_config

    vit = {"do_resize": True, "size": {"height": 224, "width": 224}, "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    beit = {"do_resize": True, "size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
    assert preprocess_geometry(vit) == {"resize": "squash"} and preprocess_geometry(beit) == {"crop_pct": 224 / 256}
    (tmp_path / "preprocessor_config.json").write_text(__import__("json").dumps(vit))
    assert read_preprocessor_config(tmp_path) == {"resize": "squash", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = 255  # a white band on the left: centre crop cuts it off, squash keeps it
    assert resize_crop(wide, 16).max() < 0.1 and resize_crop(wide, 16, "squash")[:, 0].min() > 0.9
    cropped = resize_crop(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))[:, :, None].repeat(3, 2), 16, crop_pct=0.5)
    assert 0.2 < cropped.min() and cropped.max() < 0.8  # only the middle half of the ramp survives
    cfg = tiny_config(resize="squash", crop_pct=0.875)
    assert cfg.to_dict()["resize"] == "squash" and "resize" not in tiny_config().to_dict()
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_linked_folders_inside_a_class_are_followed_and_loops_refused(folder, tmp_path):
    # before: os.walk did not follow a linked folder inside a class, so its images were silently left out
    # (a linked class folder itself was followed)
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "x.png")
    (folder / "class0" / "more").symlink_to(extra)
    reader = FolderReader(folder)
    assert len(reader) == 25 and "class0/more/x.png" in map(reader.name, range(25))
    (extra / "back").symlink_to(folder / "class0")  # class0/more/back/more/back/... (a loop)
    with pytest.raises(DataError, match=r"class0/more/back leads to .*class0, a folder already read"):
        FolderReader(folder)
    # and two classes linked to one folder (its images under both labels): was read twice in silence
    (extra / "back").unlink()
    (folder / "class2").symlink_to(extra)
    with pytest.raises(DataError, match=r"class2 leads to .*extra, a folder already read"):
        FolderReader(folder)


@pytest.mark.parametrize("locked", ["class0/deep", "class1", "."])
def test_an_unreadable_folder_is_refused_not_left_out(folder, monkeypatch, locked):
    # before: os.walk ignored a folder it could not list (chmod 000 for another user), so its images were
    # silently left out (class1 locked: half the set gone, an empty class); the root itself was a traceback
    import os

    target, real_scandir, real_listdir = os.path.realpath(folder / locked), os.scandir, os.listdir

    def guard(real):
        def call(path="."):
            if os.path.realpath(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)
        return call

    monkeypatch.setattr(os, "scandir", guard(real_scandir))
    monkeypatch.setattr(os, "listdir", guard(real_listdir))
    with pytest.raises(DataError, match=r"cannot list folder .*\(Permission denied\): make it readable"):
        FolderReader(folder)


def test_images_beside_class_folders_are_refused(folder):
    # before: a folder with class subfolders read only those; images at its top were silently left out
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "stray.png")
    with pytest.raises(DataError, match=r"2 class folders and 1 image \(stray.png\) at its top"):
        FolderReader(folder)


def test_a_flat_folder_with_a_subfolder_of_no_images_is_flat(tmp_path):
    # before: unzipped macOS photos (a.png beside __MACOSX/, which holds only ._a.png metadata) were refused
    # as "1 class folders and 1 image (a.png) at its top: move the images into class folders"
    (tmp_path / "photos" / "__MACOSX").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "__MACOSX" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    reader = FolderReader(tmp_path / "photos")
    assert len(reader) == 1 and reader.labels is None and reader.name(0) == "a.png"


def test_a_broken_link_or_a_pipe_named_like_an_image_is_unreadable(tmp_path):
    # before: a flat folder left a broken link out silently, and a pipe named x.png (in a class folder)
    # made the run wait forever on opening it
    import os

    for layout in ("flat", "classes/a"):
        (tmp_path / layout).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / layout / "a.png")
    (tmp_path / "flat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "classes" / "a" / "pipe.png")
    for root, name in ((tmp_path / "flat", "gone.png"), (tmp_path / "classes", "a/pipe.png")):
        with pytest.raises(DataError, match=rf"cannot read image .*{name} \(not a file\)"):
            ImageSource(root, workers=0).draw(CFG)
        stream = ImageSource(root, skip_corrupt=True, workers=0).stream(CFG)
        assert sum(len(b.pixels) for b in stream) == 1 and stream.stats.skipped == [name]


def test_a_huge_image_is_read_quietly_up_to_the_bomb_limit_and_refused_past_it(tmp_path, monkeypatch):
    # before: past Pillow's warning limit (89 MP) every image printed a two-line DecompressionBombWarning;
    # past its error limit the line ended "could be decompression bomb DOS attack.)" without the limit or the fix
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warns above 1000 pixels, refuses above 2000
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ImageSource(tmp_path, workers=0).draw(CFG)) == 1
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"image .*b.png \(over 2,000 pixels, Pillow's limit against decompression bombs: "
                                        r"downscale it\): remove or replace it"):
        ImageSource(tmp_path, workers=0).draw(CFG)


def test_names_that_are_not_utf8_are_written_as_text(tmp_path):
    # before: a file or class folder named in Latin-1 reached outputs as a lone surrogate ('caf\udce9.png'):
    # embed -o feats.parquet stopped with a UnicodeEncodeError traceback from pyarrow
    import os

    folder = tmp_path / os.fsdecode(b"kl\xe4sse")
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / os.fsdecode(b"caf\xe9.png"))
    reader = FolderReader(tmp_path)
    assert reader.class_names == ["kl\\xe4sse"] and reader.name(0) == "kl\\xe4sse/caf\\xe9.png"
    info = tarfile.TarInfo("caf\xe9.png")
    data = _png(np.zeros((8, 8, 3), np.uint8))
    info.size = len(data)
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        tar.addfile(info, io.BytesIO(data))
    assert open_reader(str(tmp_path / "s.tar")).name(0) == "s.tar:caf\\xe9.png"


def test_float_and_32_bit_pictures_are_refused_not_blackened(tmp_path):
    # before: a float TIFF in [0, 1] (mode F) came out all black and a 32-bit one past 65535 all white, silently
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    Image.fromarray(np.full((8, 8), 100000, np.int32), "I").save(tmp_path / "i.tif")
    for name in ("f.tif", "i.tif"):
        with pytest.raises(DataError, match=rf"image .*{name} \(32-bit pixels .*: save it as 8- or 16-bit\)"):
            open_reader(tmp_path).read(["f.tif", "i.tif"].index(name))
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [Image.open(tmp_path / "f.tif")]}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"image .*\(32-bit pixels \(mode F"):
        open_reader(tmp_path / "ds").read(0)


def test_a_shard_sample_with_a_label_but_no_image_is_refused_and_gif_is_an_image(tmp_path):
    # before: a sample whose image was missing (cls only) or a .gif (read from folders) was left out silently
    def shard(path, members):
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="GIF")
    pics = [("a.png", _png(np.zeros((8, 8, 3), np.uint8))), ("a.cls", b"0"), ("b.gif", buf.getvalue()), ("b.cls", b"1")]
    shard(tmp_path / "ok.tar", pics + [("README.txt", b"not a sample")])
    reader = open_reader(str(tmp_path / "ok.tar"))
    assert len(reader) == 2 and reader.labels.tolist() == [0, 1] and reader.read(1).shape == (8, 8, 3)
    shard(tmp_path / "bad.tar", pics + [("c.cls", b"1")])
    with pytest.raises(DataError, match=r"bad.tar: sample c has a label but no image \(cls; images are jpg, .*\): "):
        open_reader(str(tmp_path / "bad.tar"))


def test_shard_labels_past_int64_are_class_names(tmp_path):
    # before: a cls of 10**30 made the labels a numpy object array; mimc eval's k-NN over it scored 0.0 where
    # the same shard labelled 10**9 instead scored 0.17
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, label in enumerate([str(10**30), "1", str(10**30), "1"]):
            for name, data in ((f"s{i}.png", _png(np.full((8, 8, 3), 60 * (i % 2), np.uint8))), (f"s{i}.cls", label.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reader = open_reader(str(tmp_path / "s.tar"))
    assert reader.labels.dtype == np.int64 and reader.labels.tolist() == [1, 0, 1, 0] and reader.class_names == ["1", str(10**30)]


def test_a_long_shard_label_is_read_whole_and_a_huge_one_refused(tmp_path):
    # before: only a label's first 64 bytes were read, so two class names that differ past byte 64 became
    # one class (and a multi-byte character cut at byte 64 became U+FFFD)
    def shard(path, labels):
        with tarfile.open(path, "w") as tar:
            for i, label in enumerate(labels):
                for name, data in ((f"s{i}.png", _png(np.full((8, 8, 3), 60 * i, np.uint8))), (f"s{i}.cls", label.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    names = ["a photograph of a " + "very " * 10 + "small cat", "a photograph of a " + "very " * 10 + "small dog", "é" * 40]
    shard(tmp_path / "s.tar", names)
    reader = open_reader(str(tmp_path / "s.tar"))
    assert reader.class_names == sorted(names) and reader.labels.tolist() == [0, 1, 2]
    shard(tmp_path / "huge.tar", ["x" * 5000])
    with pytest.raises(DataError, match=r"huge.tar: sample s0 has a 5000-byte label \(cls\).*at most 4096"):
        open_reader(str(tmp_path / "huge.tar"))


def test_a_shard_sample_with_two_images_of_one_kind_is_refused(tmp_path):
    # before: a shard holding k.png twice (or k.png and k.PNG) kept only the last one: an image silently
    # left out, and its label given to the other (WebDataset refuses a duplicate file name in a sample)
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name, data in (("k.png", _png(np.zeros((8, 8, 3), np.uint8))), ("k.cls", b"0"),
                           ("k.PNG", _png(np.ones((8, 8, 3), np.uint8))), ("j.png", _png(np.ones((8, 8, 3), np.uint8))), ("j.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"dup.tar: sample k has two png members \(k.png, k.PNG\): .*unique"):
        open_reader(str(tmp_path / "dup.tar"))


@pytest.mark.parametrize("name", ["imgs.tar", "photos {2024}"])
def test_a_folder_named_like_a_shard_is_a_folder(folder, tmp_path, name):
    # before: a folder whose name ends in .tar (an archive extracted in place) was taken for a shard:
    # "shard pattern imgs.tar matches no file"; one with a brace in its name was refused as a bad pattern
    folder.rename(tmp_path / name)
    reader = open_reader(tmp_path / name)
    assert isinstance(reader, FolderReader) and len(reader) == 24


def test_shards_of_one_name_in_two_folders_name_their_images_apart(tmp_path, tiny_images):
    # before: an image was named by its shard's file name, so 'a/x.tar' and 'b/x.tar' both gave
    # x.tar:sample00000.png: embed's index named two rows alike (and skip_corrupt's list was ambiguous)
    images, labels = tiny_images
    for folder, start in (("a", 0), ("b", 4)):
        (tmp_path / folder).mkdir()
        _write_shards(tmp_path / folder, images[start:start + 4], labels[start:start + 4], per_shard=4)[0].rename(tmp_path / folder / "x.tar")
    reader = open_reader(str(tmp_path / "{a,b}" / "x.tar"))
    assert [reader.name(i) for i in (0, 4)] == ["a/x.tar:sample00000.png", "b/x.tar:sample00000.png"]


def test_a_reader_over_many_shards_keeps_few_files_open(tmp_path):
    # before: every shard read stayed open for the reader's life, so a seeded subset of 1024 shards
    # (or fewer, under a low ulimit -n) died with "OSError: [Errno 24] Too many open files", a traceback
    for s in range(80):
        with tarfile.open(tmp_path / f"m-{s:02d}.tar", "w") as tar:
            data = _png(np.full((8, 8, 3), s, np.uint8))
            info = tarfile.TarInfo(f"k{s}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reader = open_reader(str(tmp_path / "m-{00..79}.tar"))
    assert [int(reader.read(i)[0, 0, 0]) for i in (*range(80), 0, 79)] == [*range(80), 0, 79]
    assert len(reader._files) <= 64


def test_a_shard_gone_after_indexing_is_an_unreadable_image(tmp_path, tiny_images):
    # before: a shard removed (or its disk gone) between indexing and reading was a FileNotFoundError traceback
    images, labels = tiny_images
    _write_shards(tmp_path, images, labels, per_shard=12)
    reader = open_reader(str(tmp_path / "train-{000..001}.tar"))
    (tmp_path / "train-001.tar").unlink()
    assert reader.read(0).shape == (32, 32, 3)
    with pytest.raises(DataError, match=r"cannot read image .*train-001.tar:sample00012.png \(\[Errno 2\] No such file"):
        reader.read(12)


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_data_spec_is_refused_not_read_as_the_current_folder(spec, tmp_path, monkeypatch):
    # `data: ""` (a templated recipe whose variable was unset) read every image of the current folder
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data is empty") as info:
        open_reader(spec)
    assert info.value.options == ("data",)
