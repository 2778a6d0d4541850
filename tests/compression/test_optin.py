"""OPTIN scores and the global MAC-budget allocation: budget met within one tile, exact slicing,
per-block widths through save/load, and the fast scorer against a plain masking reference
(on mimc's encoder and on a transformers ViT masked the way the authors' code masks it)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimc.compression.optin import MD_TOKENS, allocate, optin_scores, unit_macs
from mimc.compression.registry import compress
from mimc.pipeline.stages import config_from_dict
from mimc.compression.width import WidthPruningConfig
from mimc.errors import ConfigError
from mimc.models.vit import build_encoder, flops_per_image
from tests.compression.test_width import zero_removed
from tests.conftest import tiny_config


def batches(n=2, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=g) for _ in range(n)]


@pytest.mark.parametrize("criterion", ["l2", "activation", "optin"])
@pytest.mark.parametrize("ratio", [0.45, 0.693])
def test_mac_budget_is_met_within_one_rounding_step(criterion, ratio):
    enc = build_encoder(tiny_config(), seed=0)
    config = WidthPruningConfig(macs=ratio, criterion=criterion, round_to=8, optin_images=4)
    new, record = compress(enc, config, batches() if config.needs_data else None)
    m = record.metrics
    base, after = flops_per_image(enc.config), flops_per_image(new.config)
    step = 8 * unit_macs(enc.config)[1]
    assert after <= ratio * base + 1e-6 and ratio * base - after < step
    assert m["macs_target"] == ratio and m["macs_ratio"] == pytest.approx(after / base)
    assert all(w % 8 == 0 and w >= 8 for w in new.config.block_mlp_dims) and min(new.config.block_heads) >= 1
    assert m["mlp_dims"] == new.config.block_mlp_dims and m["heads"] == new.config.block_heads


def test_global_allocation_slices_exactly_and_widths_survive_save_and_load(tmp_path):
    from mimc.artifact import read_manifest, save_artifact
    from mimc.models.io import load_artifact

    enc = build_encoder(tiny_config(layer_scale=True), seed=0)
    new, record = compress(enc, WidthPruningConfig(macs=0.6, criterion="optin", round_to=8, optin_images=4), batches())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(new(x).last_hidden_state, zero_removed(enc, record.metrics)(x).last_hidden_state, atol=1e-5)
    art = save_artifact(new, tmp_path / "a")
    back = load_artifact(art)
    assert back.config.block_mlp_dims == new.config.block_mlp_dims and back.config.block_heads == new.config.block_heads
    assert torch.allclose(back(x).pooled, new(x).pooled)
    manifest = read_manifest(art)
    assert manifest.encoder["block_mlp_dims"] == new.config.block_mlp_dims
    stage = manifest.to_dict()["stages"][-1]
    assert stage["config"]["macs"] == 0.6 and stage["metrics"]["mlp_dims"] == new.config.block_mlp_dims


def test_config_round_trip_and_refusals():
    cfg = WidthPruningConfig(macs=0.6, criterion="optin", optin_images=16, optin_lambda=5.0, optin_trajectory="final")
    assert config_from_dict("width", cfg.to_dict()) == cfg and cfg.needs_data
    for bad in (dict(macs=0.0), dict(macs=1.0), dict(macs=1.5), dict(macs=0.6, mlp=0.5), dict(macs=0.6, optin_images=1),
                dict(macs=0.6, optin_trajectory="mean")):
        with pytest.raises(ConfigError):
            WidthPruningConfig(**bad)
    enc = build_encoder(tiny_config(), seed=0)
    with pytest.raises(ConfigError, match="below the smallest model"):
        compress(enc, WidthPruningConfig(macs=0.05, round_to=8))
    with pytest.raises(ConfigError, match="give data"):
        optin_scores(enc, [])


def test_allocation_prefers_the_important_units_and_keeps_prefixes():
    cfg = tiny_config()
    neuron = [torch.linspace(1, 0, 128) for _ in range(4)]
    neuron[2] = neuron[2] * 100  # block 2's neurons matter most
    head = [torch.tensor([4.0, 3.0, 2.0, 1.0]) for _ in range(4)]
    keep_n, keep_h = allocate(cfg, list(zip(neuron, head)), 0.6, 8)
    assert len(keep_n[2]) == 128 and all(k == list(range(len(k))) for k in keep_n)  # best-first prefixes
    assert all(k[0] == 0 for k in keep_h)


def _reference_md(feats_t, feats_s):
    """The paper's manifold-distillation term on all tokens: ||F_t F_t^T - F_s F_s^T||^2 of unit-norm rows."""
    t = F.normalize(feats_t.reshape(-1, feats_t.shape[-1]), dim=-1)
    s = F.normalize(feats_s.reshape(-1, feats_s.shape[-1]), dim=-1)
    return float(((t @ t.T - s @ s.T) ** 2).sum())


def _masked_features(enc, x, block, kind, unit):
    """Per block j: norm-applied output features (next norm1 / final norm), with one unit masked by a hook."""
    hd = enc.blocks[block].attn.head_dim

    def mask(mod, inputs):
        y = inputs[0].clone()
        if kind == "neuron":
            y[..., unit] = 0
        else:
            y[..., unit * hd : (unit + 1) * hd] = 0
        return (y,)

    target = enc.blocks[block].mlp.fc2 if kind == "neuron" else enc.blocks[block].attn.proj
    handle = target.register_forward_pre_hook(mask)
    try:
        out = enc(x, output_hidden_states=True)
    finally:
        handle.remove()
    hs = out.hidden_states[1:]
    norms = [b.norm1 for b in enc.blocks[1:]] + [enc.norm]
    return [n(h) for n, h in zip(norms, hs)], out.pooled


def test_fast_scores_equal_plain_masking_reference():
    """The rank-1 removal and the stacked variants give the paper's loss computed by masking one unit."""
    enc = build_encoder(tiny_config(depth=3), seed=0)
    x = batches(1, size=4)[0]
    assert x.shape[0] * enc.config.num_tokens <= MD_TOKENS  # every token sampled: the loss is order-free
    scores = optin_scores(enc, [x], lam=0.0)  # lam 0: the MD term alone
    with torch.no_grad():
        base, _ = _masked_features(enc, x, 0, "neuron", [])
        for block, kind, unit in [(0, "neuron", 5), (1, "neuron", 100), (2, "neuron", 0), (0, "head", 1), (2, "head", 3)]:
            feats, _ = _masked_features(enc, x, block, kind, unit)
            want = sum(_reference_md(base[j], feats[j]) for j in range(block, 3))
            got = float(scores[block][0 if kind == "neuron" else 1][unit])
            assert got == pytest.approx(want, rel=2e-3, abs=1e-6)


def test_final_trajectory_keeps_the_last_block_term_only():
    enc = build_encoder(tiny_config(depth=3), seed=0)
    x = batches(1, size=4)
    total = optin_scores(enc, x, lam=0.0)
    final = optin_scores(enc, x, lam=0.0, trajectory="final")
    assert torch.allclose(total[2][0], final[2][0]) and (total[0][0] >= final[0][0]).all()


def test_pooled_term_sits_lambda_below_the_md_term():
    enc = build_encoder(tiny_config(depth=2), seed=0)
    x = batches(1, size=4)
    md = optin_scores(enc, x, lam=0.0)
    both = optin_scores(enc, x, lam=10.0)
    extra_n = torch.cat([b[0] - a[0] for a, b in zip(md, both)])
    assert (extra_n >= 0).all() and float(extra_n.mean()) == pytest.approx(float(torch.cat([a[0] for a in md]).mean()) / 10, rel=1e-3)


def _first(obj, *paths):
    """The first attribute path that exists (transformers 4 and 5 name ViT's modules differently)."""
    for path in paths:
        cur = obj
        try:
            for part in path.split("."):
                cur = getattr(cur, part)
            return cur
        except AttributeError:
            continue
    raise AttributeError(paths)


def test_scores_on_a_transformers_vit_match_masking_it_the_authors_way():
    """Upstream masks a neuron by zeroing its input to the transformers model's activation function, a
    head by zeroing its context (``head_mask``, gone in transformers 5: the head's slice of the output
    projection's input here) and compares the outputs of ``layernorm_before``; the converted encoder's
    scores agree."""
    transformers = pytest.importorskip("transformers")
    from mimc.models.convert.hf import convert_hf_model
    from tests.models.test_convert_hf import COMMON, randomize

    hf = randomize(transformers.ViTModel(transformers.ViTConfig(**COMMON), add_pooling_layer=False))
    enc = convert_hf_model(hf)
    x = batches(1, size=4)[0]
    scores = optin_scores(enc, [x], lam=0.0)
    layers = _first(hf, "layers", "encoder.layer")
    hd = COMMON["hidden_size"] // COMMON["num_attention_heads"]

    def run(head=None, neuron=None):
        feats, handles = [], []
        for layer in layers[1:]:
            handles.append(layer.layernorm_before.register_forward_hook(lambda m, i, o: feats.append(o)))
        handles.append(hf.layernorm.register_forward_hook(lambda m, i, o: feats.append(o)))
        if neuron is not None:
            keep = torch.ones(COMMON["intermediate_size"])
            keep[neuron[1]] = 0
            act = _first(layers[neuron[0]], "mlp.activation_fn", "intermediate.intermediate_act_fn")
            handles.append(act.register_forward_pre_hook(lambda m, i: (i[0] * keep,)))
        if head is not None:
            keep_h = torch.ones(COMMON["hidden_size"])
            keep_h[head[1] * hd : (head[1] + 1) * hd] = 0
            out = _first(layers[head[0]], "attention.o_proj", "attention.output.dense")
            handles.append(out.register_forward_pre_hook(lambda m, i: (i[0] * keep_h,)))
        try:
            with torch.no_grad():
                hf(pixel_values=x)
        finally:
            for h in handles:
                h.remove()
        return feats

    base = run()
    for block, j in [(0, 3), (1, 77)]:
        feats = run(neuron=(block, j))
        want = sum(_reference_md(base[k], feats[k]) for k in range(block, 3))
        assert float(scores[block][0][j]) == pytest.approx(want, rel=2e-3, abs=1e-6)
    feats = run(head=(1, 2))
    want = sum(_reference_md(base[k], feats[k]) for k in range(1, 3))
    assert float(scores[1][1][2]) == pytest.approx(want, rel=2e-3, abs=1e-6)


def test_cli_width_macs_and_sparsify_weighting(tmp_path, tiny_images):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from mimc.artifact import MANIFEST_NAME, save_artifact
    from mimc.cli.app import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    src = save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "src")
    images, labels = tiny_images
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    res = invoke("width", src, "--macs", "0.6", "--criterion", "optin", "--data", tmp_path / "d.npz", "--round-to", "8",
                 "-o", tmp_path / "narrow", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["macs"] == 0.6 and report["metrics"]["macs_ratio"] <= 0.6
    manifest = json.loads((tmp_path / "narrow" / MANIFEST_NAME).read_text())
    assert manifest["encoder"]["block_mlp_dims"] == report["metrics"]["mlp_dims"]
    res = invoke("sparsify", src, "--method", "wanda", "--weighting", "rsq", "--r-min", "0.5", "--calib", tmp_path / "d.npz",
                 "-o", tmp_path / "sp", "--json")
    assert res.exit_code == 0, res.output
    stage = json.loads((tmp_path / "sp" / MANIFEST_NAME).read_text())["stages"][-1]
    assert stage["config"]["weighting"] == "rsq" and stage["config"]["r_min"] == 0.5
    res = invoke("width", src, "--macs", "0.6", "--mlp", "0.5", "-o", tmp_path / "bad")
    assert res.exit_code == 2 and "drop --mlp" in res.stderr
