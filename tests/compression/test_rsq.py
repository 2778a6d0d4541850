"""RSQ token weights: [r_min, 1] then mean 1, attention received, weighted statistics; uniform weighting
reproduces the unweighted statistics bit for bit; the config and CLI carry it to wanda, sparsegpt and
the learned prior."""
from __future__ import annotations

import pytest
import torch

from mimc.compression.calib_stats import carried_block_stats
from mimc.compression.nm import NMSparsityConfig
from mimc.compression.nm_oneshot import one_shot_sparsify
from mimc.compression.registry import compress
from mimc.pipeline.stages import config_from_dict
from mimc.compression.rsq import normalise_weights, token_weights, weighted_moments
from mimc.errors import ConfigError
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config


def test_weights_are_min_max_scaled_to_r_min_then_mean_one():
    received = torch.rand(3, 17, generator=torch.Generator().manual_seed(0)) * 5
    received[2] = 1.0  # a constant row: weight 1 everywhere
    r = normalise_weights(received, 0.25)
    assert torch.allclose(r.mean(dim=-1), torch.ones(3))
    assert torch.allclose(r[2], torch.ones(17))
    ratio = r.min(dim=-1).values / r.max(dim=-1).values
    assert torch.allclose(ratio[:2], torch.full((2,), 0.25))
    assert torch.equal(r[0].argsort(), received[0].argsort())  # monotone in attention received


def test_token_weights_are_the_attention_each_token_receives():
    enc = build_encoder(tiny_config(), seed=0)
    x = enc.embed(torch.randn(2, 3, 32, 32))
    block = enc.blocks[0]
    _, _, attn = block.attn(block.norm1(x), None, return_attn=True)
    received = attn.sum(dim=(1, 2))
    assert torch.allclose(token_weights(block, x, None, 0.5), normalise_weights(received, 0.5))


def test_weighted_moments_are_sum_of_r_x_xT():
    x = torch.randn(10, 6, dtype=torch.float64)
    r = torch.rand(10, dtype=torch.float64) + 0.1
    sq, h = weighted_moments(x, r, True)
    assert torch.allclose(h, sum(r[t] * torch.outer(x[t], x[t]) for t in range(10)))
    assert torch.allclose(sq, (r[:, None] * x * x).sum(0))


def test_uniform_weighting_reproduces_the_statistics_bitwise_and_rsq_differs():
    enc = build_encoder(tiny_config(), seed=0)
    inputs = [enc.embed(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s))) for s in range(2)]
    plain = carried_block_stats(enc.blocks[1], "blocks.1.", inputs, None, hessian=True)
    again = carried_block_stats(enc.blocks[1], "blocks.1.", inputs, None, hessian=True, r_min=None)
    weighted = carried_block_stats(enc.blocks[1], "blocks.1.", inputs, None, hessian=True, r_min=1 / 3)
    for name, s in plain.items():
        assert torch.equal(s.hessian, again[name].hessian) and torch.equal(s.sq_norm, again[name].sq_norm)
        assert s.tokens == weighted[name].tokens
        assert not torch.allclose(s.hessian, weighted[name].hessian)
        # mean-1 weights keep the trace on the same scale
        assert 0.5 < float(weighted[name].hessian.trace() / s.hessian.trace()) < 2.0
    # r_min = 1: every token weighs 1, the same statistics up to rounding
    ones = carried_block_stats(enc.blocks[1], "blocks.1.", inputs, None, hessian=True, r_min=1.0)
    assert all(torch.allclose(ones[n].hessian, s.hessian, rtol=1e-5, atol=1e-5) for n, s in plain.items())


def test_uniform_stage_output_is_unchanged_by_the_new_options():
    enc = build_encoder(tiny_config(), seed=0)
    pixels = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))]
    for method in ("wanda", "sparsegpt"):
        a, _ = compress(enc, NMSparsityConfig(method=method), pixels)
        b = build_encoder(tiny_config(), seed=0)
        one_shot_sparsify(b, 2, 4, method, [p for p in pixels[0].split(16)], update_weights=True)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        c, rec = compress(enc, NMSparsityConfig(method=method, weighting="rsq", r_min=0.2), pixels)
        assert rec.metrics["weighting"] == "rsq"
        assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_config_round_trip_and_refusals():
    cfg = NMSparsityConfig(method="sparsegpt", weighting="rsq", r_min=0.5)
    assert config_from_dict("sparsify", cfg.to_dict()) == cfg
    for bad in (dict(weighting="attention"), dict(method="wanda", weighting="rsq", r_min=0.0),
                dict(method="magnitude", weighting="rsq")):
        with pytest.raises(ConfigError):
            NMSparsityConfig(**bad)


def test_learned_prior_gets_the_weighting():
    enc = build_encoder(tiny_config(depth=2), seed=0)
    pixels = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))]
    common = dict(method="learned", n_calib=8, learned={"steps": 1, "batch_size": 4, "prior": "sparsegpt"})
    _, plain = compress(enc, NMSparsityConfig(**common), pixels)
    _, rsq = compress(enc, NMSparsityConfig(weighting="rsq", r_min=0.1, **common), pixels)
    assert plain.metrics["prior_fidelity_calib"] != rsq.metrics["prior_fidelity_calib"]


def test_rsq_with_a_learned_prior_that_reads_no_tokens_is_refused():
    # the magnitude (or no) prior reads no calibration tokens: weighting rsq was taken and did nothing
    for prior in ("magnitude", "none"):
        with pytest.raises(ConfigError, match=f"weighting rsq weights calibration tokens and prior {prior} reads none"):
            NMSparsityConfig(method="learned", weighting="rsq", learned={"prior": prior})
    NMSparsityConfig(method="learned", weighting="rsq", learned={"prior": "wanda"})
