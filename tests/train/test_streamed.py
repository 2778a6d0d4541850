"""Learning over indexed images: each step loads only its batch, epochs, exact mid-epoch resume, and the
memory options (activation checkpointing; bf16 and FSDP refused where they cannot run)."""
from __future__ import annotations

import math

import pytest
import torch

from mimc.artifact import state_hash
from mimc.compression.distill import DistillConfig
from mimc.compression.nm import NMSparsityConfig
from mimc.errors import ConfigError
from mimc.models.vit import build_encoder
from mimc.train import FeatureModel, TensorImages, TrainConfig, TrainRun, as_indexed, first_batches, fingerprint, train
from mimc.train.engine import distill_loss, FeatureLoss
from mimc.train.images import Sampler, StepBatches, steps_for_epochs
from mimc.train.parallel import checkpointed_blocks
from tests.conftest import Interrupt, stop_at, tiny_config


class Recorded:
    """Indexed images that are not a tensor, recording every load (as a streamed source would see them)."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels, self.loads = pixels, []

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, indices) -> torch.Tensor:
        self.loads.append(list(indices))
        return self.pixels[list(indices)].clone()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _teacher():
    return build_encoder(tiny_config(depth=2), seed=0)


def _student():
    return build_encoder(tiny_config(depth=2), seed=1)


SETTINGS = TrainConfig(steps=6, lr=3e-3, batch_size=4, mask_ratio=0.5)


def test_indexed_images_train_exactly_as_a_tensor_and_load_only_each_step_batch(pixels):
    from_tensor, streamed = _student(), _student()
    train(from_tensor, _teacher(), pixels, SETTINGS)
    source = Recorded(pixels)
    train(streamed, _teacher(), source, SETTINGS, TrainRun(workers=0))
    assert state_hash(streamed) == state_hash(from_tensor)  # bit for bit
    sampler = Sampler(len(pixels), SETTINGS.seed)
    assert source.loads == [sampler.indices(s, 4).tolist() for s in range(6)]  # one batch a step, nothing else


def test_background_workers_give_the_same_result(pixels):
    inline, prefetched = _student(), _student()
    train(inline, _teacher(), Recorded(pixels), SETTINGS, TrainRun(workers=0))
    train(prefetched, _teacher(), Recorded(pixels), SETTINGS, TrainRun(workers=2))
    assert state_hash(prefetched) == state_hash(inline)


def test_a_rank_loads_only_its_shard():
    source = Recorded(torch.arange(10.0).view(10, 1))
    full = StepBatches(source, seed=0, batch_size=4, shard=slice(0, 4), start=0, stop=3)
    second = StepBatches(source, seed=0, batch_size=4, shard=slice(2, 4), start=1, stop=3)
    assert len(second) == 2
    whole = full[1]
    assert torch.equal(second[0], whole[2:4]) and source.loads[-1] == full.sampler.indices(1, 4)[2:4].tolist()
    with pytest.raises(IndexError):
        second[2]


def test_epochs_give_the_steps_and_are_recorded(pixels):
    assert steps_for_epochs(0.1, 30, 3) == 1 and steps_for_epochs(2, 12, 5) == 5 and steps_for_epochs(1, 12, 4) == 3
    result = train(_student(), _teacher(), pixels, TrainConfig(epochs=1.5, lr=1e-3, batch_size=4))
    assert result.steps == math.ceil(1.5 * 12 / 4) == 5 and result.epochs == pytest.approx(5 * 4 / 12)
    assert result.metrics()["epochs"] == pytest.approx(1.666667)
    by_steps = _student()
    train(by_steps, _teacher(), pixels, TrainConfig(steps=5, lr=1e-3, batch_size=4))
    by_epochs = _student()
    train(by_epochs, _teacher(), pixels, TrainConfig(epochs=1.5, lr=1e-3, batch_size=4))
    assert state_hash(by_epochs) == state_hash(by_steps)


def test_steps_and_epochs_are_mutually_exclusive_and_recorded_only_when_set():
    with pytest.raises(ConfigError, match="steps and epochs are mutually exclusive") as info:
        DistillConfig(steps=10, epochs=2)
    assert info.value.options == ("steps", "epochs")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        DistillConfig.from_dict({"steps": 1000, "epochs": 2})  # the default spelled out is still both
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        DistillConfig(epochs=0)
    assert "epochs" not in DistillConfig().to_dict() and "precision" not in DistillConfig().to_dict()
    by_epochs = DistillConfig(epochs=2).to_dict()
    assert by_epochs["epochs"] == 2 and "steps" not in by_epochs  # the steps follow from the images
    assert DistillConfig.from_dict(by_epochs) == DistillConfig(epochs=2)
    learned = NMSparsityConfig(method="learned", learned={"epochs": 3}).to_dict()["learned"]
    assert learned["epochs"] == 3 and "steps" not in learned
    assert DistillConfig(epochs=2, batch_size=4).for_images(10) == DistillConfig(steps=5, batch_size=4)


def test_killed_mid_epoch_resumes_bit_for_bit(pixels, tmp_path):
    settings = TrainConfig(epochs=2, lr=3e-3, batch_size=8, mask_ratio=0.5)  # 12 images: 3 steps, epochs cut mid-batch
    full = _student()
    train(full, _teacher(), Recorded(pixels), settings, meta={"source_sha256": "x"})
    part = _student()
    with pytest.raises(Interrupt):  # killed after step 2: 16 of 24 images, mid second epoch
        train(part, _teacher(), Recorded(pixels), settings, TrainRun(run_dir=tmp_path, checkpoint_every=1, on_step=stop_at(2)),
              meta={"source_sha256": "x"})
    source = Recorded(pixels)
    resumed = _student()
    result = train(resumed, _teacher(), source, settings, TrainRun(run_dir=tmp_path, resume=True, workers=0),
                   meta={"source_sha256": "x"})
    assert result.resumed_from == 2 and result.steps_run == 1
    assert state_hash(resumed) == state_hash(full)
    assert source.loads == [Sampler(12, 0).indices(2, 8).tolist()]  # the resumed run read no earlier batch


def test_first_batches_and_fingerprints(pixels):
    images = as_indexed(list(pixels.split(5)))
    assert isinstance(images, TensorImages) and len(images) == 12
    assert [b.shape[0] for b in first_batches(images, 11, 4)] == [4, 4, 3]
    assert torch.equal(torch.cat(first_batches(images, 100, 5)), pixels)
    import hashlib

    assert fingerprint(images) == hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()
    assert fingerprint(Recorded(pixels)) == fingerprint(images)  # small sets: every pixel, as a tensor's hash
    sampled = fingerprint(Recorded(pixels), full_bytes=0)  # large ones: the count and a spread sample
    assert sampled.startswith("sample:") and sampled == fingerprint(Recorded(pixels.clone()), full_bytes=0)
    assert sampled != fingerprint(Recorded(pixels + 1), full_bytes=0)


def test_activation_checkpointing_gives_the_same_gradients(pixels):
    teacher = _teacher()
    grads = []
    for checkpointed in (False, True):
        student = _student().requires_grad_(True)
        model = FeatureModel(student, hidden=True)
        with checkpointed_blocks(student) if checkpointed else torch.enable_grad():
            target = FeatureModel(teacher, hidden=True)(pixels[:4])
            loss = distill_loss(model(pixels[:4]), target, FeatureLoss(hidden_weight=1.0), [(0, 0), (1, 1)])
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
        assert "forward" not in vars(student.blocks[0])  # the blocks' own forward again
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    plain, checkpointed = _student(), _student()
    train(plain, teacher, pixels, SETTINGS)
    train(checkpointed, teacher, pixels, SETTINGS, TrainRun(checkpoint_activations=True))
    assert state_hash(checkpointed) == state_hash(plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bf16_and_fsdp_are_refused_where_they_cannot_run(pixels):
    with pytest.raises(ConfigError, match="bf16 autocasts on CUDA") as info:
        train(_student(), _teacher(), pixels, TrainConfig(steps=1, precision="bf16"))
    assert info.value.options == ("precision",)
    with pytest.raises(ConfigError, match="fsdp shards over torchrun processes"):
        train(_student(), _teacher(), pixels, TrainConfig(steps=1), TrainRun(fsdp=True))
    with pytest.raises(ConfigError, match="workers must be"):
        TrainRun(workers=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA")
def test_bf16_trains_close_to_fp32_on_cuda(pixels):
    fp32, bf16 = _student(), _student()
    a = train(fp32, _teacher(), pixels, SETTINGS)
    b = train(bf16, _teacher(), pixels, TrainConfig(**{**SETTINGS.to_dict(), "precision": "bf16"}))
    assert b.final_loss == pytest.approx(a.final_loss, rel=0.1)
    assert state_hash(bf16) != state_hash(fp32)


def test_default_loading_workers(pixels, tmp_path, monkeypatch):
    import numpy as np

    from mimc.data import ImageSource, default_workers as per_node
    from mimc.train.images import default_workers

    assert default_workers(TensorImages(pixels)) == 0  # in memory: nothing to overlap
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert default_workers(Recorded(pixels)) == 1  # at least one per rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(Recorded(pixels)) == per_node()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8))
    cfg = tiny_config()
    assert default_workers(ImageSource(tmp_path / "x.npy", workers=3).indexed(cfg)) == 3  # the source's own setting
    indexed = ImageSource(tmp_path / "x.npy").indexed(cfg, 4)
    assert default_workers(indexed) == per_node() and len(indexed) == 4
    student, reference = _student(), _student()
    settings = TrainConfig(steps=3, lr=1e-3, batch_size=2)
    train(student, _teacher(), indexed, settings)  # a streamed source trains exactly as its pixels in memory
    train(reference, _teacher(), ImageSource(tmp_path / "x.npy").draw(cfg, 4).pixels, settings)
    assert state_hash(student) == state_hash(reference)


def test_the_apis_learning_workers_are_capped_like_the_clis(monkeypatch):
    # mimc.distill(..., workers=100000) reached DataLoader(num_workers=100000) (the CLI's --workers met
    # ImageSource's ceiling first): refused when the run's options are made, before any process starts
    from mimc.errors import DataError

    monkeypatch.setattr("mimc.data.source._cores", lambda: 2)
    with pytest.raises(DataError, match="workers 100000 is more than 8 \\(4 per core here\\): choose fewer"):
        TrainRun(workers=100_000)
    assert TrainRun(workers=8).workers == 8
