"""The training engine: schedules, sampling, the masked forward, checkpoints and exact resume."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mimc.artifact import state_hash
from mimc.errors import BadInputError, ConfigError
from mimc.models.vit import build_encoder
from mimc.train import FeatureLoss, FeatureModel, TrainConfig, TrainRun, train
from mimc.train.checkpoint import has_checkpoint, load_checkpoint, meta_differences
from mimc.train.images import Sampler
from mimc.train.schedule import linear, warmup_cosine
from tests.conftest import tiny_config




@pytest.fixture
def pair():
    return build_encoder(tiny_config(depth=2), seed=0), build_encoder(tiny_config(depth=2), seed=1)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_warmup_cosine_and_linear():
    assert warmup_cosine(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 1.0, warmup=10, final=0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 1.0, warmup=10, final=0.1) == pytest.approx(0.1)
    mid = warmup_cosine(55, 100, 1.0, warmup=10)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert linear(0, 11, 4.0, 0.05) == 4.0 and linear(10, 11, 4.0, 0.05) == pytest.approx(0.05)


def test_sampler_visits_every_image_once_per_epoch():
    sampler = Sampler(10, seed=3)
    first = torch.cat([sampler.indices(s, 5) for s in range(2)])
    second = torch.cat([sampler.indices(s, 5) for s in range(2, 4)])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()  # reshuffled each epoch
    assert torch.equal(Sampler(10, seed=3).indices(3, 5), sampler.indices(3, 5))


def test_masked_forward_with_every_patch_equals_the_encoder(pair, pixels):
    enc = pair[0]
    out = enc(pixels[:2])
    keep = torch.arange(enc.config.num_patches).expand(2, -1)
    tokens, pooled = FeatureModel(enc)(pixels[:2], keep)
    assert torch.allclose(tokens, out.last_hidden_state, atol=1e-6)
    assert torch.allclose(pooled, out.pooled, atol=1e-6)
    few, _ = FeatureModel(enc)(pixels[:2], keep[:, :4])
    assert few.shape[1] == 4 + enc.config.num_prefix_tokens


def test_training_reduces_the_loss_and_is_seeded(pair, pixels):
    teacher, student = pair
    settings = TrainConfig(steps=12, lr=3e-3, batch_size=4, mask_ratio=0.5)
    a = build_encoder(tiny_config(depth=2), seed=1)
    result = train(student, teacher, pixels, settings)
    train(a, teacher, pixels, settings)
    assert state_hash(a) == state_hash(student)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert result.steps == 12 and result.world_size == 1


class _Interrupt(Exception):
    pass


@dataclass(frozen=True)
class _WarmedUp(TrainConfig):
    """A stage's options as the loop sees them: the shared fields plus the stage's own warm-up spelling."""

    warmup_steps: int = 0

    @property
    def warmup(self) -> int:
        return self.warmup_steps


def test_resume_continues_exactly(pair, pixels, tmp_path):
    teacher, _ = pair
    settings = _WarmedUp(steps=6, lr=3e-3, batch_size=4, mask_ratio=0.75, warmup_steps=2, weight_decay=0.05)
    full = build_encoder(tiny_config(depth=2), seed=1)
    train(full, teacher, pixels, settings, meta={"source_sha256": "x"})

    def stop(step, loss):
        if step == 4:
            raise _Interrupt

    part = build_encoder(tiny_config(depth=2), seed=1)
    with pytest.raises(_Interrupt):
        train(part, teacher, pixels, settings, TrainRun(run_dir=tmp_path, checkpoint_every=3, on_step=stop), meta={"source_sha256": "x"})
    saved = load_checkpoint(tmp_path)
    assert saved.step == 3 and len(saved.losses) == 3 and "state" in saved.optimizer
    resumed = build_encoder(tiny_config(depth=2), seed=1)
    torch.manual_seed(7)
    callers = torch.get_rng_state()
    result = train(resumed, teacher, pixels, settings, TrainRun(run_dir=tmp_path, resume=True), meta={"source_sha256": "x"})
    assert result.resumed_from == 3 and result.steps_run == 3
    assert state_hash(resumed) == state_hash(full)  # bit for bit
    assert torch.equal(torch.get_rng_state(), callers)  # the checkpoint's RNG state is not forced on the caller's process
    with pytest.raises(BadInputError, match="different model"):
        train(build_encoder(tiny_config(depth=2), seed=1), teacher, pixels, settings, TrainRun(run_dir=tmp_path, resume=True),
              meta={"source_sha256": "y"})


def test_checkpoint_is_not_written_without_a_run_dir(pair, pixels, tmp_path):
    teacher, student = pair
    train(student, teacher, pixels, TrainConfig(steps=2, lr=1e-3, batch_size=4), TrainRun(checkpoint_every=1))
    assert not has_checkpoint(tmp_path)


def test_meta_differences():
    assert meta_differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
    assert meta_differences({"a": 1}, {"a": 2, "c": 0}) == ["a", "c"]


def test_bad_settings(pair, pixels):
    teacher, student = pair
    with pytest.raises(ConfigError, match="mask_ratio"):
        TrainConfig(steps=1, lr=1e-3, batch_size=2, mask_ratio=1.0)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        TrainConfig(steps=0, lr=1e-3, batch_size=2)
    frozen = build_encoder(tiny_config(depth=2), seed=2).requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing trainable"):
        train(frozen, teacher, pixels, TrainConfig(steps=1, lr=1e-3, batch_size=2))


def test_a_diverged_run_stops_instead_of_returning_nan_weights(pair, pixels):
    # lr 1e30 made the weights NaN; the run finished (exit 0) and its artifact reported SQNR 200 dB
    from mimc.errors import MimcError

    teacher, student = pair
    with pytest.raises(MimcError, match=r"training diverged \(the loss is nan at step 2\): no artifact written; lower lr \(it was 1e\+30\)") as info:
        train(student, teacher, pixels, TrainConfig(steps=3, lr=1e30, batch_size=4))
    assert info.value.exit_code == 1 and info.value.options == ("lr",)


def test_intermediate_matching_pairs_blocks_by_origin(pixels):
    from mimc.compression.blocks import remove_blocks
    from mimc.train.engine import block_pairs

    teacher = build_encoder(tiny_config(), seed=0)
    student = remove_blocks(teacher, [1, 2])
    assert block_pairs(student, teacher) == [(0, 0), (1, 3)]
    tokens, pooled, blocks = FeatureModel(student, hidden=True)(pixels[:2])
    assert len(blocks) == 2 and blocks[-1].shape == tokens.shape
    settings = TrainConfig(steps=8, lr=3e-3, batch_size=4, mask_ratio=0.5)
    result = train(student, teacher, pixels, settings, loss_weights=FeatureLoss(hidden_weight=1.0))
    assert sum(result.losses[-2:]) < sum(result.losses[:2])


def test_rank_shards_and_uneven_batches():
    from mimc.train.dist import DistContext, check_divisible

    assert DistContext(world_size=2, rank=1).shard(8) == slice(4, 8)
    assert DistContext().shard(8) == slice(0, 8)
    check_divisible(8, 2)
    with pytest.raises(ConfigError, match="multiple of 2"):
        check_divisible(5, 2)
