"""mimc.data: every accepted data spec, preprocessing to the encoder's input spec, and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mimc.data import BUILTIN_PATH, deterministic_inputs, load_images, preprocess
from mimc.errors import DataError
from tests.conftest import tiny_config, tiny_video_config


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _expected_pixels(img_u8_hwc: np.ndarray, cfg) -> torch.Tensor:
    """An image already at the model's size needs no resize: pixels are just (x/255 - mean) / std."""
    x = img_u8_hwc.astype(np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((x - mean) / std)


@pytest.fixture
def class_folder(tmp_path, tiny_images):
    images, labels = tiny_images
    for i, (img, lab) in enumerate(zip(images, labels)):
        _write_png(tmp_path / "data" / ("stripes_wide" if lab == 0 else "stripes_narrow") / f"{i:03d}.png", img)
    return tmp_path / "data", images, labels


def test_folder_with_class_subfolders_gives_labels(class_folder):
    root, images, labels = class_folder
    cfg = tiny_config()
    data = load_images(root, cfg)
    assert data.class_names == ["stripes_narrow", "stripes_wide"]  # sorted subfolder names
    assert data.pixels.shape == (len(images), 3, 32, 32)
    assert data.pixels.dtype == torch.float32
    assert np.bincount(data.labels).tolist() == [int((labels == 1).sum()), int((labels == 0).sum())]
    # PNG is lossless and the images are at the model's size: pixels are exactly the normalised images.
    first_narrow = int(np.flatnonzero(labels == 1)[0])
    torch.testing.assert_close(data.pixels[0], _expected_pixels(images[first_narrow], cfg), atol=1e-6, rtol=0)


def test_flat_folder_has_no_labels(tmp_path, tiny_images):
    images, _ = tiny_images
    for i in range(5):
        _write_png(tmp_path / f"img{i}.png", images[i])
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    data = load_images(tmp_path, tiny_config())
    assert len(data) == 5 and data.labels is None and data.class_names is None


def test_resize_short_side_then_centre_crop(tmp_path):
    cfg = tiny_config()
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, :20] = 255  # white band on the left quarter: cropped away by the centre crop
    _write_png(tmp_path / "wide.png", img)
    data = load_images(tmp_path, cfg)
    assert data.pixels.shape == (1, 3, 32, 32)
    black = _expected_pixels(np.zeros((32, 32, 3), np.uint8), cfg)
    torch.testing.assert_close(data.pixels[0][:, :, 8:24], black[:, :, 8:24], atol=1e-5, rtol=0)


def test_npy_nhwc_nchw_and_npz_agree(tmp_path, tiny_images):
    images, labels = tiny_images
    cfg = tiny_config()
    np.save(tmp_path / "a.npy", images)
    np.save(tmp_path / "b.npy", images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "c.npz", images=images, labels=labels, class_names=np.array(["wide", "narrow"]))
    a = load_images(tmp_path / "a.npy", cfg)
    b = load_images(tmp_path / "b.npy", cfg)
    c = load_images(tmp_path / "c.npz", cfg)
    assert a.labels is None and b.labels is None
    torch.testing.assert_close(a.pixels, b.pixels)
    torch.testing.assert_close(a.pixels, c.pixels)
    assert a.sha256 == c.sha256
    assert c.labels.tolist() == labels.tolist() and c.class_names == ["wide", "narrow"]


def test_float_images_in_unit_range_are_preprocessed(tmp_path, tiny_images):
    images, _ = tiny_images
    cfg = tiny_config()
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "f.npy", images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)  # model-shaped, but [0, 1]
    torch.testing.assert_close(load_images(tmp_path / "f.npy", cfg).pixels, load_images(tmp_path / "u8.npy", cfg).pixels, atol=1e-5, rtol=0)


def test_16_bit_arrays_are_scaled_not_clipped(tmp_path, tiny_images):
    """A uint16 array (0..65535) is read like a 16-bit PNG: scaled to 0..255 (it was clipped, nearly all white)."""
    images, _ = tiny_images
    cfg = tiny_config()
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "u16.npy", images.astype(np.uint16) * 257)
    torch.testing.assert_close(load_images(tmp_path / "u16.npy", cfg).pixels, load_images(tmp_path / "u8.npy", cfg).pixels, atol=0, rtol=0)


@pytest.mark.parametrize("values", [np.arange(6 * 4 * 4 * 3, dtype=np.int64).reshape(6, 4, 4, 3) * 2**20,
                                    np.arange(-36, 36, dtype=np.int32).reshape(6, 2, 2, 3)])
def test_integer_arrays_past_16_bits_or_negative_are_refused_not_clipped(tmp_path, values):
    """Integers past 65535 were scaled as 16-bit and clipped to white, negative ones clipped to black, in
    silence (a 32-bit image file is refused as of unknown range)."""
    np.save(tmp_path / "x.npy", values)
    with pytest.raises(DataError, match=r"x.npy holds integer pixel values from -?\d+ to \d+, outside 0..65535: "):
        load_images(tmp_path / "x.npy", tiny_config())


def test_an_array_has_one_value_range_for_all_its_images(tmp_path, tiny_images):
    """The range was inferred image by image: in a float 0..255 array a near-black image (values 0 and 1)
    was read as 0..1 and came out bright, a float 0..1 image overshooting 1 by 1 % came out nearly black,
    and in a uint16 array a dark frame (under 256 of 65535) was read as 8-bit and came out bright."""
    images, _ = tiny_images
    images = images.copy()
    images[1] //= 255  # near black: 0 or 1
    cfg = tiny_config()
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "f255.npy", images.astype(np.float32))
    unit = images.astype(np.float32) / 255.0
    unit[2] *= 1.01  # a resampled 0..1 image overshoots 1 a little
    np.save(tmp_path / "f1.npy", unit)
    wide = images.astype(np.uint16) * 257
    wide[3] = images[3] // 16  # a dark 16-bit frame: every value under 256
    np.save(tmp_path / "u16.npy", wide)
    u8 = load_images(tmp_path / "u8.npy", cfg).pixels
    torch.testing.assert_close(load_images(tmp_path / "f255.npy", cfg).pixels, u8, atol=0, rtol=0)
    f1 = load_images(tmp_path / "f1.npy", cfg).pixels
    assert (f1[2] - u8[2]).abs().mean() < 0.05 and torch.equal(f1[:2], u8[:2])
    u16 = load_images(tmp_path / "u16.npy", cfg).pixels
    black = load_images(tmp_path / "u8.npy", cfg).pixels[1]  # near black
    assert (u16[3] - black).abs().max() < 0.1 and torch.equal(u16[:3], u8[:3])


def test_normalised_model_inputs_pass_through(tmp_path):
    cfg = tiny_config()
    x = deterministic_inputs(cfg, batch=3, seed=1)
    np.save(tmp_path / "x.npy", x.numpy())
    torch.testing.assert_close(load_images(tmp_path / "x.npy", cfg).pixels, x)


def test_builtin_is_labelled_and_at_ref_size():
    from mimc.models.reference import REF_CONFIG

    data = load_images("builtin", REF_CONFIG)
    raw = np.load(BUILTIN_PATH)
    assert raw["images"].dtype == np.uint8 and raw["images"].ndim == 4 and raw["images"].shape[-1] == 3
    assert len(data) == len(raw["images"]) == len(raw["labels"])
    assert data.class_names is not None and len(data.class_names) == int(raw["labels"].max()) + 1
    assert set(np.unique(data.labels)) == set(range(len(data.class_names)))
    assert BUILTIN_PATH.stat().st_size < 3e6
    torch.testing.assert_close(data.pixels[0], _expected_pixels(raw["images"][0], REF_CONFIG), atol=1e-6, rtol=0)


def test_grayscale_becomes_rgb(tmp_path):
    cfg = tiny_config()
    grey = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    _write_png(tmp_path / "folder" / "g.png", grey)  # mode "L" on disk
    np.save(tmp_path / "g.npy", grey[None])  # (N, H, W)
    expected = _expected_pixels(np.repeat(grey[:, :, None], 3, axis=2), cfg)
    for spec in (tmp_path / "folder", tmp_path / "g.npy"):
        pixels = load_images(spec, cfg).pixels
        assert pixels.shape == (1, 3, 32, 32)
        torch.testing.assert_close(pixels[0], expected, atol=1e-6, rtol=0)


def test_single_channel_model_gets_grey(tiny_images):
    images, _ = tiny_images
    pixels = preprocess(list(images[:2]), tiny_config(in_chans=1, image_mean=[0.5], image_std=[0.5]))
    assert pixels.shape == (2, 1, 32, 32)


def test_subset_is_seeded_and_deterministic(tmp_path, tiny_images):
    images, labels = tiny_images
    cfg = tiny_config()
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    a = load_images(tmp_path / "d.npz", cfg, n=7, seed=3)
    b = load_images(tmp_path / "d.npz", cfg, n=7, seed=3)
    c = load_images(tmp_path / "d.npz", cfg, n=7, seed=4)
    full = load_images(tmp_path / "d.npz", cfg)
    assert len(a) == 7 and a.sha256 == b.sha256 and a.labels.tolist() == b.labels.tolist()
    assert a.sha256 != c.sha256
    # The subset is made of rows of the full set, labels kept alongside their images.
    rows = [int(torch.nonzero((full.pixels == p).flatten(1).all(1))[0]) for p in a.pixels]
    assert rows == sorted(rows) and full.labels[rows].tolist() == a.labels.tolist()
    assert len(load_images(tmp_path / "d.npz", cfg, n=1000)) == len(images)  # n beyond the set: all of it


def test_batches_and_subset(tiny_images, tmp_path):
    images, labels = tiny_images
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    data = load_images(tmp_path / "d.npz", tiny_config())
    sizes = [len(b) for b in data.batches(10)]
    assert sizes == [10, 10, 4]
    sub = data.subset([3, 1])
    torch.testing.assert_close(sub.pixels, data.pixels[[3, 1]])
    assert sub.labels.tolist() == [labels[3], labels[1]] and sub.sha256 != data.sha256


def test_video_config_repeats_still_images(tiny_images, tmp_path):
    images, _ = tiny_images
    np.save(tmp_path / "d.npy", images[:3])
    cfg = tiny_video_config()
    video = load_images(tmp_path / "d.npy", cfg).pixels
    still = load_images(tmp_path / "d.npy", tiny_config()).pixels
    assert video.shape == (3, cfg.num_frames, 3, 32, 32)
    for t in range(cfg.num_frames):
        torch.testing.assert_close(video[:, t], still)


def test_video_clips_array(tmp_path):
    cfg = tiny_video_config()
    clips = np.random.default_rng(0).integers(0, 256, (2, cfg.num_frames, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", clips)
    pixels = load_images(tmp_path / "v.npy", cfg).pixels
    assert pixels.shape == (2, cfg.num_frames, 3, 32, 32)
    torch.testing.assert_close(pixels[1, 2], _expected_pixels(clips[1, 2], cfg), atol=1e-6, rtol=0)
    np.save(tmp_path / "short.npy", clips[:, :2])
    with pytest.raises(DataError, match="frames"):
        load_images(tmp_path / "short.npy", cfg)


def test_deterministic_inputs_are_seeded():
    cfg = tiny_config()
    assert torch.equal(deterministic_inputs(cfg, 2, seed=5), deterministic_inputs(cfg, 2, seed=5))
    assert not torch.equal(deterministic_inputs(cfg, 2, seed=5), deterministic_inputs(cfg, 2, seed=6))
    assert deterministic_inputs(tiny_video_config(), 1).shape == (1, 4, 3, 32, 32)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_code == 2
    return msg


def _bad_inputs(tmp_path, tiny_images):
    images, labels = tiny_images
    (tmp_path / "empty").mkdir()
    (tmp_path / "emptyclasses" / "cat").mkdir(parents=True)
    broken = tmp_path / "broken"
    _write_png(broken / "ok.png", images[0])
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    np.savez(tmp_path / "nokey.npz", pixels=images)
    np.save(tmp_path / "twochan.npy", images[..., :2])
    np.save(tmp_path / "fivechan.npy", np.concatenate([images, images[..., :2]], axis=-1))
    np.save(tmp_path / "objects.npy", np.array([images[0], "x"], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", images=np.array([images[0], "x"], dtype=object))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated zip")
    np.savez(tmp_path / "labels.npz", images=images, labels=labels[:3])
    np.savez(tmp_path / "labels2d.npz", images=images, labels=np.stack([labels, labels], axis=1))
    np.savez(tmp_path / "halflabels.npz", images=images, labels=labels + 0.5)
    np.savez(tmp_path / "outside.npz", images=images, labels=labels + 1, class_names=["a", "b"])
    np.savez(tmp_path / "unknown.npz", images=images, labels=np.where(labels == 0, "a", "z"), class_names=["a", "b"])
    np.save(tmp_path / "vector.npy", labels)
    np.save(tmp_path / "zero.npy", images[:0])
    np.save(tmp_path / "one.npy", images[0])  # one RGB image was read as 32 grey images 3 pixels wide
    (tmp_path / "photo.txt").write_text("hello")
    return {
        "missing": (tmp_path / "nope", "does not exist"),
        "empty folder": (tmp_path / "empty", "no images"),
        "class folders without images": (tmp_path / "emptyclasses", "no images"),
        "unreadable image": (broken, "cannot read image"),
        "npz without images": (tmp_path / "nokey.npz", "no 'images'"),
        "two channels": (tmp_path / "twochan.npy", "channels"),
        "five channels": (tmp_path / "fivechan.npy", "channels"),
        "pickled npy": (tmp_path / "objects.npy", "without pickle"),
        "pickled npz": (tmp_path / "objects.npz", "without pickle"),
        "corrupt npz": (tmp_path / "corrupt.npz", "cannot read"),
        "label count": (tmp_path / "labels.npz", "3 labels for 24 images"),
        "labels of two columns": (tmp_path / "labels2d.npz", "labels of shape (24, 2)"),
        "fractional labels": (tmp_path / "halflabels.npz", "not whole numbers"),
        "labels past class_names": (tmp_path / "outside.npz", "outside 0..1"),
        "text labels not in class_names": (tmp_path / "unknown.npz", "not among its class_names (z)"),
        "not images": (tmp_path / "vector.npy", "not a batch of images"),
        "zero images": (tmp_path / "zero.npy", "no images"),
        "one image without its batch axis": (tmp_path / "one.npy", "one.npy holds rows of shape (32, 3), grey images 3 pixels wide"),
        "other file type": (tmp_path / "photo.txt", "neither a folder"),
    }


def test_bad_inputs_raise_one_line_data_error(tmp_path, tiny_images):
    cfg = tiny_config()
    for case, (spec, fragment) in _bad_inputs(tmp_path, tiny_images).items():
        with pytest.raises(DataError) as exc:
            load_images(spec, cfg)
        assert fragment in _one_line(exc), f"{case}: {exc.value}"


def test_bad_subset_size(tmp_path, tiny_images):
    np.save(tmp_path / "d.npy", tiny_images[0])
    with pytest.raises(DataError) as exc:
        load_images(tmp_path / "d.npy", tiny_config(), n=0)
    assert "positive" in _one_line(exc)


def test_model_expecting_other_channels(tiny_images):
    with pytest.raises(DataError) as exc:
        preprocess([tiny_images[0][0, :, :, :1]], tiny_config(in_chans=2, image_mean=[0.5, 0.5], image_std=[0.5, 0.5]))
    assert "channels" in _one_line(exc)


def test_an_npz_too_big_to_load_is_refused_before_loading(tmp_path):
    # before: an .npz is loaded whole, so one whose images unpack past memory (a 100-byte zip member claiming
    # 150 TB here; a real zip bomb of zeros would fill the machine) ended in a numpy MemoryError traceback
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 224, 224, 3)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as zf:
        zf.writestr("images.npy", header.getvalue())
    with pytest.raises(DataError, match=r"bomb.npz holds 150528.0 GB of images, which an .npz loads whole: .* save them as .npy"):
        load_images(tmp_path / "bomb.npz", tiny_config())
