"""One-shot N:M sparsity: exact structure per method and pattern, the checker, SparseGPT's update, export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mimc.artifact import state_hash
from mimc.compression.nm import NMSparsityConfig
from mimc.compression.nm_oneshot import nm_keep_mask, sparsegpt_prune
from mimc.compression.registry import compress
from mimc.errors import ConfigError, DataError, ValidationError
from mimc.models.nm_pattern import block_linears, check_nm, parse_pattern
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config




@pytest.fixture(scope="module")
def small_encoder():
    return build_encoder(tiny_config(depth=2), seed=0)


@pytest.fixture(scope="module")
def calib():
    return list(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(8))


def groups_nonzero(weight: torch.Tensor, m: int) -> torch.Tensor:
    return (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8"])
def test_exact_nm_structure(small_encoder, calib, method, pattern):
    n, m = parse_pattern(pattern)
    before = state_hash(small_encoder)
    out, record = compress(small_encoder, NMSparsityConfig(pattern=pattern, method=method), calib)
    assert state_hash(small_encoder) == before  # the input is untouched
    assert out.config.nm_pattern == pattern
    for name, lin in block_linears(out):
        counts = groups_nonzero(lin.weight, m)
        assert int(counts.max()) <= n, name
        assert float(counts.float().mean()) > n - 0.01  # N kept, not fewer (random weights are never exactly 0)
    check_nm(out)
    assert record.metrics["density"] == pytest.approx(n / m)
    assert 0.5 < record.metrics["fidelity_data"]["pooled_cosine_mean"] <= 1.0
    other = {name: lin for name, lin in block_linears(small_encoder)}
    for name, lin in block_linears(out):  # only blocks' Linears change, not embeddings or norms
        assert lin.weight.shape == other[name].weight.shape


def test_data_driven_methods_beat_magnitude(small_encoder, calib):
    fid = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        _, rec = compress(small_encoder, NMSparsityConfig(method=method), calib)
        fid[method] = rec.metrics["fidelity_data"]["pooled_cosine_mean"]
    assert fid["sparsegpt"] > fid["magnitude"]


def test_hooks_are_all_removed(small_encoder, calib):
    compress(small_encoder, NMSparsityConfig(method="wanda"), calib)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in small_encoder.modules())


def test_sparsegpt_update_beats_mask_only_on_reconstruction():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(512, 32, generator=g) @ mix  # correlated inputs: the OBS update has something to use
    w = torch.randn(16, 32, generator=g)
    h = x.T @ x / x.shape[0]
    errors = {}
    for update in (True, False):
        new, keep = sparsegpt_prune(w, h, 2, 4, blocksize=8, update_weights=update)
        assert int(groups_nonzero(new, 4).max()) <= 2
        assert torch.equal(new == 0, ~keep) or update  # without update the kept weights are the originals
        errors[update] = float(((x @ w.T - x @ new.T) ** 2).mean())
    assert errors[True] < 0.8 * errors[False]


def test_nm_keep_mask_keeps_largest():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.5, 9.0, 8.0]])
    assert nm_keep_mask(scores, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]


def test_nm_keep_mask_breaks_ties_as_wanda_and_sparsegpt():
    # Wanda (lib/prune.py, magnitude and wanda) and SparseGPT choose the M-N weights to *prune* in each
    # group, topk(largest=False); keeping the topk N largest picks other weights on ties (fp16 |W|).
    scores = torch.randint(0, 3, (16, 32), generator=torch.Generator().manual_seed(0)).float()
    for n, m in ((2, 4), (1, 4), (3, 8)):
        groups = scores.reshape(16, -1, m)
        pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(m - n, dim=-1, largest=False).indices, True)
        assert torch.equal(nm_keep_mask(scores, n, m), ~pruned.reshape(16, 32))


def test_check_nm_rejects_a_dense_model(small_encoder):
    with pytest.raises(ValidationError, match="blocks.0.attn.qkv breaks the 2:4 pattern"):
        check_nm(small_encoder, "2:4")
    assert check_nm(small_encoder) is None  # no pattern recorded: nothing to check


@pytest.mark.parametrize("pattern,message", [("2:7", "M=7 does not divide in_features=64 of blocks.0.attn.qkv"),
                                             ("4:4", "N must be smaller than M"), ("5:4", "N must be smaller than M"),
                                             ("two:four", "not of the form N:M")])
def test_bad_patterns(small_encoder, pattern, message):
    with pytest.raises(ConfigError, match=message):
        compress(small_encoder, NMSparsityConfig(pattern=pattern))


def test_data_method_without_data(small_encoder):
    with pytest.raises(DataError, match="needs images"):
        compress(small_encoder, NMSparsityConfig(method="sparsegpt"))


def test_config_round_trip_and_unknown_keys():
    cfg = NMSparsityConfig(pattern="1:4", method="learned", learned={"steps": 7, "prior": "wanda"})
    again = NMSparsityConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.learned.steps == 7
    with pytest.raises(ConfigError, match="unknown option"):
        NMSparsityConfig.from_dict({"patern": "2:4"})
    with pytest.raises(ConfigError, match="unknown method 'random'") as info:
        NMSparsityConfig(method="random")
    assert info.value.options == ("method",)


@pytest.mark.parametrize("options, named", [
    (dict(method="magnitude", n_calib=5), "n_calib"), (dict(method="magnitude", damp=0.1), "damp"),
    (dict(method="wanda", update_weights=False), "update_weights"), (dict(method="wanda", blocksize=8), "blocksize"),
    (dict(method="learned", update_weights=False), "update_weights"), (dict(method="sparsegpt", r_min=0.5), "r_min"),
])
def test_an_option_the_method_would_ignore_is_refused(options, named):
    # mimc sparsify --method magnitude --n-calib 5 (or wanda --no-update, or --r-min without --weighting rsq)
    # wrote its artifact with the option silently unused
    with pytest.raises(ConfigError, match=f"^{named} does nothing with method {options['method']}, weighting uniform: drop {named}$") as info:
        NMSparsityConfig(**options)
    assert named in info.value.options
    NMSparsityConfig(method="sparsegpt", weighting="rsq", r_min=0.5, n_calib=5, update_weights=False, damp=0.1, blocksize=8)


def test_zeros_survive_onnx_export(small_encoder, calib, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    out, _ = compress(small_encoder, NMSparsityConfig(method="sparsegpt"), calib)
    path = tmp_path / "model.onnx"
    try:
        from mimc.deploy.onnx import export_onnx

        export_onnx(out, path, validate=False)
    except ImportError:  # pragma: no cover - export module not present
        torch.onnx.export(out, torch.zeros(1, *out.config.input_shape), str(path), dynamo=False)
    inits = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    inits = [a for a in inits if a.ndim == 2]
    for name, lin in block_linears(out):
        w = lin.weight.detach().numpy()
        match = [a for a in inits if (a.shape == w.shape and np.array_equal(a, w)) or (a.shape == w.T.shape and np.array_equal(a, w.T))]
        assert match, f"{name} not found among the graph's initializers"
        a = match[0] if match[0].shape == w.shape and np.array_equal(match[0], w) else match[0].T
        assert int(groups_nonzero(torch.from_numpy(a.copy()), 4).max()) <= 2


def test_export_refuses_a_broken_pattern(small_encoder, tmp_path):
    pytest.importorskip("onnx")
    from mimc.deploy.onnx import export_onnx

    broken = build_encoder(tiny_config(depth=2, nm_pattern="2:4"), seed=0)  # claims 2:4 but is dense
    with pytest.raises(ValidationError, match="breaks the 2:4 pattern"):
        export_onnx(broken, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
