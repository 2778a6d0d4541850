"""Distillation recovery: it heals a pruned student, keeps N:M zeros, and refuses incompatible teachers."""
from __future__ import annotations

import pytest
import torch

from mimc.artifact import Manifest, state_hash
from mimc.compression.blocks import remove_blocks
from mimc.compression.distill import DistillConfig
from mimc.compression.nm import NMSparsityConfig
from mimc.compression.registry import compress
from mimc.errors import ConfigError, DataError
from mimc.models.nm_pattern import check_nm
from mimc.models.vit import build_encoder
from mimc.train import TrainRun
from tests.conftest import tiny_config




@pytest.fixture(scope="module")
def teacher():
    return build_encoder(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def images():
    return list(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3)).split(16))


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_distill_recovers_a_block_pruned_student(teacher, images, mask_ratio):
    student = remove_blocks(teacher, [1, 2])
    before = state_hash(student)
    cfg = DistillConfig(steps=25, lr=2e-3, batch_size=8, mask_ratio=mask_ratio, warmup_ratio=0.0)
    healed, record = compress(student, cfg, images, run=TrainRun(teacher=teacher))
    assert state_hash(student) == before  # the input is untouched
    m = record.metrics
    assert m["fidelity_data"]["pooled_cosine_mean"] > m["fidelity_data_before"]["pooled_cosine_mean"]
    assert m["steps"] == 25 and m["mask_ratio"] == mask_ratio and m["world_size"] == 1
    assert healed.config.depth == 2


def test_teacher_defaults_to_the_manifest_source(teacher, images, monkeypatch):
    import mimc.models.resolve as resolve

    student = remove_blocks(teacher, [3])
    student.manifest = Manifest(encoder=student.config.to_dict(), source={"id": "tiny-source"})
    loaded = []
    monkeypatch.setattr(resolve, "load_model", lambda src: loaded.append(src) or teacher)
    _, record = compress(student, DistillConfig(steps=1, batch_size=4), images)
    assert loaded == ["tiny-source"] and record.metrics["teacher"] == "tiny-source"


def test_a_compressed_teacher_is_recorded_as_such_not_as_its_source(teacher, images):
    from mimc.compression.width import WidthPruningConfig

    named = build_encoder(tiny_config(), seed=0)
    named.manifest = Manifest(encoder=named.config.to_dict(), source={"id": "tiny-source"})
    narrow, _ = compress(named, WidthPruningConfig(mlp=0.5))  # `mimc distill X --teacher out/narrow`
    _, record = compress(remove_blocks(teacher, [3]), DistillConfig(steps=1, batch_size=4), images, run=TrainRun(teacher=narrow))
    assert record.metrics["teacher"] == "tiny-source after width"  # it said "tiny-source": a replay would not note it
    _, record = compress(remove_blocks(teacher, [3]), DistillConfig(steps=1, batch_size=4), images, run=TrainRun(teacher=named))
    assert record.metrics["teacher"] == "tiny-source"


def test_a_model_that_is_its_own_teacher_is_refused(teacher, images):  # `mimc distill ref`: loss 0, a copy written
    with pytest.raises(ConfigError, match="its own teacher"):
        compress(build_encoder(tiny_config(), seed=0), DistillConfig(steps=1, batch_size=4), images, run=TrainRun(teacher=teacher))


def test_no_source_and_no_teacher_is_refused(teacher, images):
    with pytest.raises(ConfigError, match="give teacher") as info:
        compress(build_encoder(tiny_config(depth=2), seed=1), DistillConfig(steps=1), images)
    assert info.value.options == ("teacher",)  # `mimc distill` words it as --teacher


def test_distill_keeps_an_nm_pattern(teacher, images):
    sparse, _ = compress(teacher, NMSparsityConfig(method="magnitude"))
    healed, _ = compress(sparse, DistillConfig(steps=3, lr=1e-2, batch_size=8), images, run=TrainRun(teacher=teacher))
    check_nm(healed)
    assert healed.config.nm_pattern == "2:4"
    assert not torch.equal(healed.blocks[0].mlp.fc1.weight, sparse.blocks[0].mlp.fc1.weight)  # it did learn


def test_incompatible_teacher_and_masking(teacher, images):
    wide = build_encoder(tiny_config(dim=32, num_heads=4, mlp_dim=64), seed=0)
    with pytest.raises(ConfigError, match="differ in dim"):
        compress(wide, DistillConfig(steps=1), images, run=TrainRun(teacher=teacher))
    beit = build_encoder(tiny_config(rel_pos_bias="per_block", pos_embed="none"), seed=0)
    beit_teacher = build_encoder(beit.config, seed=1)  # not beit itself: a model is never its own teacher
    with pytest.raises(ConfigError, match="set mask_ratio 0"):
        compress(beit, DistillConfig(steps=1, mask_ratio=0.5), images, run=TrainRun(teacher=beit_teacher))


def test_needs_data_and_valid_options(teacher):
    with pytest.raises(DataError):
        compress(teacher, DistillConfig(steps=1))
    with pytest.raises(ConfigError, match="mask_ratio"):
        DistillConfig(mask_ratio=1.0)
    # before: every loss weight 0 trained on a zero loss (weight decay alone moving the weights) and wrote it
    with pytest.raises(ConfigError, match="token_weight, pooled_weight and hidden_weight are all 0") as info:
        DistillConfig(token_weight=0.0, pooled_weight=0.0)
    assert set(info.value.options) == {"token_weight", "pooled_weight", "hidden_weight"}
    assert DistillConfig.from_dict(DistillConfig(steps=5).to_dict()) == DistillConfig(steps=5)
