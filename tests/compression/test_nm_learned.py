"""MaskLLM learned N:M masks: candidates, prior init, exact structure, moving off a bad prior, resume."""
from __future__ import annotations

import pytest
import torch

from mimc.artifact import state_hash
from mimc.compression.nm import NMSparsityConfig
from mimc.compression.nm_learned import NMLearnedConfig, candidate_masks, init_logits
from mimc.compression.nm_oneshot import one_shot_sparsify
from mimc.compression.registry import clone_encoder, compress
from mimc.errors import BadInputError, ConfigError
from mimc.models.nm_pattern import block_linears, check_nm
from mimc.models.vit import build_encoder
from mimc.train import TrainRun
from tests.conftest import Interrupt, stop_at, tiny_config




@pytest.fixture(scope="module")
def encoder():
    return build_encoder(tiny_config(depth=1), seed=0)


@pytest.fixture(scope="module")
def images():
    return list(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)).split(8))


def learned(pattern="2:4", **options):
    base = dict(steps=6, batch_size=4, flip=False)
    base.update(options)
    return NMSparsityConfig(pattern=pattern, method="learned", n_calib=16, learned=base)


@pytest.mark.parametrize("n,m,count", [(2, 4, 6), (1, 4, 4), (2, 8, 28)])
def test_candidates_are_all_n_of_m(n, m, count):
    cands = candidate_masks(n, m)
    assert cands.shape == (count, m)
    assert torch.all(cands.sum(1) == n)
    assert len({tuple(r.tolist()) for r in cands}) == count


def test_prior_init_favours_the_prior_mask():
    g = torch.Generator().manual_seed(0)
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, 0::4] = keep[:, 1::4] = True  # the prior keeps the first two of every four
    logits = init_logits(keep, 8, 16, 2, 4, NMLearnedConfig(), g)
    best = candidate_masks(2, 4)[logits.argmax(-1)].reshape(8, 16).bool()
    # +3 sigma for the prior, 0 for half-overlapping candidates: the noise flips only a few groups.
    assert float((best == keep).float().mean()) > 0.9
    spread = logits.max(-1).values - logits.min(-1).values
    assert float(spread.mean()) > 4 * float(logits.std()) / 2  # +3 sigma vs -3 sigma, beyond the noise


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_learned_masks_are_exact_nm(encoder, images, pattern):
    before = state_hash(encoder)
    out, record = compress(encoder, learned(pattern), images)
    assert state_hash(encoder) == before
    check_nm(out)
    assert out.config.nm_pattern == pattern
    m = record.metrics
    assert m["method"] == "learned" and m["steps"] == 6 and m["density"] == pytest.approx(int(pattern[0]) / 4)
    assert 0.5 < m["fidelity_data"]["pooled_cosine_mean"] <= 1.0 and m["seconds"] > 0
    original = dict(block_linears(encoder))
    for name, lin in block_linears(out):  # the kept weights are the originals: MaskLLM only chooses
        kept = lin.weight != 0
        assert torch.equal(lin.weight[kept], original[name].weight[kept])


def test_learning_moves_off_a_bad_prior(encoder, images):
    """A magnitude prior on a model whose inputs make magnitude a poor guide: training changes masks and fidelity."""
    skewed = clone_encoder(encoder)
    with torch.no_grad():  # scale input features of every block Linear so |W| alone misleads
        for _, lin in block_linears(skewed):
            scale = torch.ones(lin.in_features)
            scale[0::4] = 8.0
            lin.weight.div_(scale)  # small weights on strong inputs...
        skewed.blocks[0].norm1.weight.mul_(1.0)
    options = dict(steps=40, batch_size=8, prior="magnitude", lr=5e-2, min_lr=5e-2, reg_lambda=0.0)
    out, rec = compress(skewed, learned(**options), images)
    prior_model = clone_encoder(skewed)
    one_shot_sparsify(prior_model, 2, 4, "magnitude", None)
    from mimc.evaluation import fidelity

    assert fidelity(out, skewed, images).pooled_cosine_mean > fidelity(prior_model, skewed, images).pooled_cosine_mean
    # Control: logits that cannot move differ from the prior only by the initial noise.
    _, rec0 = compress(skewed, learned(**{**options, "lr": 1e-9, "min_lr": 1e-9}), images)
    assert rec.metrics["groups_changed_vs_prior"] > rec0.metrics["groups_changed_vs_prior"] + 0.02


def test_resume_gives_the_same_mask_as_an_uninterrupted_run(encoder, images, tmp_path):
    cfg = learned(steps=6, flip=True)
    full, _ = compress(encoder, cfg, images, run=TrainRun(run_dir=tmp_path / "a", checkpoint_every=100))
    run = tmp_path / "b"
    with pytest.raises(Interrupt):
        compress(encoder, cfg, images, run=TrainRun(run_dir=run, checkpoint_every=2, on_step=stop_at(3)))
    assert (run / "checkpoint" / "state.json").is_file()
    resumed, rec = compress(encoder, cfg, images, run=TrainRun(run_dir=run, checkpoint_every=2, resume=True))
    assert rec.metrics["resumed_from"] == 2
    assert state_hash(resumed) == state_hash(full)


def test_resume_refuses_other_options_or_data(encoder, images, tmp_path):
    run = tmp_path / "r"
    with pytest.raises(Interrupt):
        compress(encoder, learned(), images, run=TrainRun(run_dir=run, checkpoint_every=1, on_step=stop_at(1)))
    with pytest.raises(BadInputError, match="different options"):
        compress(encoder, learned(steps=7), images, run=TrainRun(run_dir=run, resume=True))
    with pytest.raises(BadInputError, match="different data"):
        compress(encoder, learned(), [b + 1 for b in images], run=TrainRun(run_dir=run, resume=True))
    other = build_encoder(tiny_config(depth=1), seed=5)
    with pytest.raises(BadInputError, match="different model"):
        compress(other, learned(), images, run=TrainRun(run_dir=run, resume=True))


def test_bad_learned_options():
    with pytest.raises(ConfigError, match="unknown prior .oracle."):
        learned(prior="oracle")
    with pytest.raises(ConfigError, match="tau_end must be > 0"):
        learned(tau_end=0.0)
