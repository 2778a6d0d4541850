"""Shared fixtures: tiny seeded encoders (depth 4, dim 64, 32 px) so the suite runs in minutes on 2 cores."""
from __future__ import annotations

import os

# Under load, OpenMP's active waiting made 2-thread forwards ~7x slower; set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine the thread
# hand-off made small training steps up to ~30x slower.
torch.set_num_threads(1)


def tiny_config(**overrides):
    from mimc.models.vit import EncoderConfig

    base = dict(image_size=32, patch_size=8, dim=64, depth=4, num_heads=4, mlp_dim=128, family="mae")
    base.update(overrides)
    return EncoderConfig(**base)


def tiny_video_config(**overrides):
    base = dict(num_frames=4, tubelet_size=2, cls_token=False, pooling="mean", pool_norm=True, family="videomae")
    base.update(overrides)
    return tiny_config(**base)


@pytest.fixture
def tiny_encoder():
    from mimc.models.vit import build_encoder

    return build_encoder(tiny_config(), seed=0)


@pytest.fixture
def tiny_video_encoder():
    from mimc.models.vit import build_encoder

    return build_encoder(tiny_video_config(), seed=0)


@pytest.fixture
def tiny_images():
    """Seeded uint8 images (N, H, W, 3) with labels: two classes of distinct textures."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 24
    labels = np.arange(n) % 2
    xs = np.linspace(0, 1, 32)[None, :, None]
    images = []
    for lab in labels:
        freq = 3 if lab == 0 else 9
        base = 0.5 + 0.5 * np.sin(2 * np.pi * freq * xs + rng.uniform(0, 6.28))
        img = np.broadcast_to(base, (32, 32, 3)) * rng.uniform(0.7, 1.0) + rng.normal(0, 0.05, (32, 32, 3))
        images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(images), labels


class Interrupt(Exception):
    """Raised by :func:`stop_at` to kill a learning run mid-way (then resumed by the test)."""


def stop_at(k: int):
    """An ``on_step`` callback that interrupts a run after step ``k``."""

    def on_step(step, loss):
        if step == k:
            raise Interrupt

    return on_step


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TensorRT; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
