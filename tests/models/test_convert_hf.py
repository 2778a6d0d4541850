"""transformers -> canonical encoder: equivalence with transformers' own forward, save/load round trips."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimc.errors import NotAModelError  # noqa: E402
from mimc.models.convert.hf import convert_hf_model  # noqa: E402
from mimc.models.convert.hf_load import load_hf  # noqa: E402

TOL = 1e-4
COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
GRID = 16  # (32 / 8) ** 2 patches


def randomize(model, seed=0):
    """Every parameter random (HF inits BEiT's bias tables, cls and layer scale to constants, which
    would let a converter that forgets them pass). Norm weights stay near 1 so activations stay sane."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("lambda_1") or name.endswith("lambda_2"):
                p.copy_(0.5 + 0.2 * noise)
            else:
                p.copy_((0.2 if p.dim() > 1 else 0.5) * noise)
    return model.eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def videos(n=2, seed=1):
    return torch.randn(n, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def in_order_noise(n):
    # ViTMAE argsorts this noise to shuffle patches; arange keeps every patch in its place.
    return torch.arange(GRID, dtype=torch.float32).expand(n, GRID)


def _mae(**kw):
    return randomize(transformers.ViTMAEModel(transformers.ViTMAEConfig(**COMMON, mask_ratio=0.0, **kw)))


def _vit(**kw):
    return randomize(transformers.ViTModel(transformers.ViTConfig(**COMMON, **kw)))


def _beit(mean_pooling, shared, cls=None, **kw):
    cls = cls or transformers.BeitModel
    cfg = transformers.BeitConfig(
        **COMMON,
        use_mean_pooling=mean_pooling,
        use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=shared,
        layer_scale_init_value=0.1,
        **kw,
    )
    return randomize(cls(cfg))


def _data2vec(mean_pooling, shared):
    cfg = transformers.Data2VecVisionConfig(
        **COMMON,
        use_mean_pooling=mean_pooling,
        use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=shared,
        layer_scale_init_value=0.1,
    )
    return randomize(transformers.Data2VecVisionModel(cfg, add_pooling_layer=True))


def _videomae(pretraining=False, **kw):
    cfg = transformers.VideoMAEConfig(**COMMON, num_frames=4, tubelet_size=2, **kw)
    cls = transformers.VideoMAEForPreTraining if pretraining else transformers.VideoMAEForVideoClassification
    return randomize(cls(cfg))


def _reference(model, x):
    """(last_hidden_state, pooled or None) from transformers' own forward, masking disabled."""
    with torch.no_grad():
        if isinstance(model, transformers.ViTMAEForPreTraining):
            model = model.vit
        if isinstance(model, transformers.ViTMAEModel):
            return model(x, noise=in_order_noise(len(x))).last_hidden_state, None
        if isinstance(model, transformers.ViTModel):
            out = model(x).last_hidden_state
            return out, out[:, 0]  # mimc's ViT pooled = normalised cls token (the tanh pooler is dropped)
        if isinstance(model, transformers.VideoMAEForVideoClassification):
            out = model.videomae(x).last_hidden_state
            pooled = model.fc_norm(out.mean(1)) if model.fc_norm is not None else None
            return out, pooled
        if isinstance(model, transformers.VideoMAEForPreTraining):
            return model.videomae(x).last_hidden_state, None
        if isinstance(model, transformers.BeitForMaskedImageModeling):
            return model.beit(x).last_hidden_state, None
        out = model(x)
        return out.last_hidden_state, out.pooler_output


CASES = {
    "vit_mae": (lambda: _mae(), images, dict(family="mae", pooling="mean", cls_token=True)),
    "vit": (lambda: _vit(), images, dict(family="vit", pooling="cls")),
    "beit_mean_per_block": (lambda: _beit(True, False), images, dict(family="beit", rel_pos_bias="per_block", final_norm=False, pool_norm=True, layer_scale=True)),
    "beit_cls_shared": (lambda: _beit(False, True), images, dict(family="beit", rel_pos_bias="shared", pooling="cls", final_norm=True, pos_embed="learned")),
    "data2vec_mean_per_block": (lambda: _data2vec(True, False), images, dict(family="data2vec", rel_pos_bias="per_block", pool_norm=True)),
    "data2vec_cls_shared": (lambda: _data2vec(False, True), images, dict(family="data2vec", rel_pos_bias="shared", pooling="cls")),
    "videomae_mean_pooling": (lambda: _videomae(), videos, dict(family="videomae", cls_token=False, final_norm=False, pool_norm=True, num_frames=4, tubelet_size=2)),
    "videomae_pretraining": (lambda: _videomae(pretraining=True, decoder_hidden_size=32, decoder_num_attention_heads=2, decoder_num_hidden_layers=1, decoder_intermediate_size=64), videos, dict(family="videomae", final_norm=False, pool_norm=False)),
    "videomae_final_norm": (lambda: _videomae(use_mean_pooling=False), videos, dict(family="videomae", final_norm=True, pool_norm=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_encoder_matches_transformers_forward(case):
    build, make_input, expected_cfg = CASES[case]
    model = build()
    x = make_input()
    ref_last, ref_pooled = _reference(model, x)

    encoder = convert_hf_model(model)
    with torch.no_grad():
        out = encoder(x)

    for key, value in expected_cfg.items():
        assert getattr(encoder.config, key) == value, key
    assert out.last_hidden_state.shape == ref_last.shape
    assert (out.last_hidden_state - ref_last).abs().max().item() <= TOL
    if ref_pooled is not None:
        assert (out.pooled - ref_pooled).abs().max().item() <= TOL


def test_mae_pretraining_wrapper_converts_encoder_only_and_never_masks():
    cfg = transformers.ViTMAEConfig(**COMMON, mask_ratio=0.75, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_intermediate_size=64)
    model = randomize(transformers.ViTMAEForPreTraining(cfg))
    x = images()
    encoder = convert_hf_model(model)
    with torch.no_grad():
        full = encoder(x).last_hidden_state
        # The HF forward with masking off (mask_ratio 0, patches in order) is the reference.
        model.config.mask_ratio = 0.0
        ref = model.vit(x, noise=in_order_noise(len(x))).last_hidden_state
    assert full.shape == (2, GRID + 1, 64)  # every patch, despite the 75 % mask ratio of the source
    assert (full - ref).abs().max().item() <= TOL
    assert not any(name.startswith("decoder") for name in encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(encoder(x).last_hidden_state, full)  # deterministic: no random masking


def test_beit_masked_image_modeling_wrapper_converts_the_backbone():
    model = _beit(True, False, cls=transformers.BeitForMaskedImageModeling, vocab_size=32)
    x = images()
    ref, _ = _reference(model, x)
    with torch.no_grad():
        out = convert_hf_model(model)(x).last_hidden_state
    assert (out - ref).abs().max().item() <= TOL


def test_gelu_tanh_activation_is_carried_over():
    model = _vit(hidden_act="gelu_pytorch_tanh")
    encoder = convert_hf_model(model)
    assert encoder.config.act == "gelu_tanh"
    ref, _ = _reference(model, images())
    with torch.no_grad():
        assert (encoder(images()).last_hidden_state - ref).abs().max().item() <= TOL


def test_unsupported_model_is_a_one_line_error():
    model = transformers.ViTModel(transformers.ViTConfig(**COMMON, hidden_act="relu"))
    with pytest.raises(NotAModelError) as err:
        convert_hf_model(model)
    assert "relu" in str(err.value) and "\n" not in str(err.value)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50))
    with pytest.raises(NotAModelError, match="model_type 'bert'"):
        convert_hf_model(bert)


@pytest.mark.parametrize("case", ["vit_mae", "beit_mean_per_block", "data2vec_mean_per_block", "videomae_mean_pooling"])
def test_save_pretrained_then_load_hf_gives_the_same_numbers(case, tmp_path):
    build, make_input, _ = CASES[case]
    model = build()
    x = make_input()
    ref_last, ref_pooled = _reference(model, x)
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))

    encoder = load_hf(tmp_path)
    with torch.no_grad():
        out = encoder(x)
    assert (out.last_hidden_state - ref_last).abs().max().item() <= TOL
    if ref_pooled is not None:  # VideoMAE's fc_norm sits outside the base model and must survive the reload
        assert (out.pooled - ref_pooled).abs().max().item() <= TOL
    assert encoder.config.image_mean == [0.1, 0.2, 0.3]
    assert encoder.config.image_std == [0.4, 0.5, 0.6]


def test_mimc_load_of_an_hf_directory_records_its_source(tmp_path):
    import mimc

    model = _vit()
    model.save_pretrained(tmp_path)
    encoder = mimc.load(str(tmp_path))
    ref, _ = _reference(model, images())
    with torch.no_grad():
        assert (encoder(images()).last_hidden_state - ref).abs().max().item() <= TOL
    source = encoder.manifest.source
    assert source["kind"] == "hf-dir" and source["family"] == "vit" and len(source["sha256"]) == 64
    # Without a preprocessor config the transformers processors' defaults apply.
    assert encoder.config.image_mean == [0.5, 0.5, 0.5]


def test_incomplete_or_foreign_hf_directories_are_rejected(tmp_path):
    bad_type = tmp_path / "bert"
    bad_type.mkdir()
    (bad_type / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(NotAModelError, match="bert"):
        load_hf(bad_type)

    no_weights = tmp_path / "no_weights"
    transformers.ViTConfig(**COMMON).save_pretrained(no_weights)
    with pytest.raises(NotAModelError) as err:
        load_hf(no_weights)
    assert "\n" not in str(err.value)

    # A ViT checkpoint saved without its last layer: loading would leave that layer random.
    partial = tmp_path / "partial"
    model = _vit()
    model.save_pretrained(partial)
    from safetensors.torch import load_file, save_file

    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".2." not in k}, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotAModelError, match="lacks"):
        load_hf(partial)


def test_converted_encoder_owns_its_weights_and_init_is_restored():
    model = _vit()
    encoder = convert_hf_model(model)
    x = images()
    with torch.no_grad():
        before = encoder(x).last_hidden_state.clone()
        for p in model.parameters():
            p.add_(1.0)  # training the source afterwards must not leak into the converted copy
        assert torch.equal(encoder(x).last_hidden_state, before)
    # Construction skipped random init; torch.nn.init must work again afterwards.
    t = torch.zeros(1000)
    torch.nn.init.normal_(t)
    assert t.std() > 0.5


@pytest.mark.parametrize("case", ["vit_mae", "beit_mean_per_block", "videomae_mean_pooling"])
def test_per_block_hidden_states_match(case):
    """Block i of the canonical encoder is block i of the source (block pruning and distillation rely on it)."""
    build, make_input, _ = CASES[case]
    model = build()
    x = make_input()
    kwargs = {"noise": in_order_noise(len(x))} if case == "vit_mae" else {}
    base = model.base_model
    with torch.no_grad():
        ref = base(x, output_hidden_states=True, **kwargs).hidden_states
        ours = convert_hf_model(model)(x, output_hidden_states=True).hidden_states
    assert len(ours) == len(ref) == base.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max().item() <= TOL, f"hidden state {i}"


def _edited(tmp_path, **fields):
    """A saved 3-layer ViT whose config.json says ``fields``."""
    _vit().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    return tmp_path


@pytest.mark.parametrize("fields", [dict(dtype="evil", torch_dtype="evil"), dict(layer_norm_eps="tiny"), dict(num_attention_heads="four")])
def test_config_json_with_values_transformers_refuses_is_one_line(tmp_path, fields):
    # transformers raises AttributeError / its strict-dataclass error here: they were tracebacks
    with pytest.raises(NotAModelError, match="config.json is not a usable transformers config"):
        load_hf(_edited(tmp_path, **fields))


def test_model_without_layers_is_one_line(tmp_path):
    transformers.ViTModel(transformers.ViTConfig(**{**COMMON, "num_hidden_layers": 0})).save_pretrained(tmp_path)
    with pytest.raises(NotAModelError, match="no encoder layers"):  # was IndexError in the converter
        load_hf(tmp_path)


@pytest.mark.parametrize("layers", [2, 10**7])
def test_config_json_whose_layer_count_differs_from_its_weights_is_refused_before_building(tmp_path, layers):
    # 2: transformers built 2 layers and ignored the third's weights (a different model, exit 0);
    # 10**7: it built ten million layers (hours) before finding them missing
    import time

    start = time.monotonic()
    with pytest.raises(NotAModelError, match=f"num_hidden_layers {layers}, the weights hold 3 layers"):
        load_hf(_edited(tmp_path, num_hidden_layers=layers))
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("sharded", [False, True])
def test_a_pytorch_model_bin_whose_config_lies_about_its_layers_is_refused_before_building(tmp_path, sharded):
    # a folder with pytorch_model.bin (no safetensors) skipped the check: transformers built every layer
    # config.json named (20 000: minutes; 10**7: hours) before finding them missing
    import time

    vit = _vit()
    vit.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(vit.state_dict(), tmp_path / "pytorch_model.bin")
    if sharded:  # the index names the weights; the shard itself is never opened
        (tmp_path / "pytorch_model.bin").rename(tmp_path / "pytorch_model-00001-of-00001.bin")
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(vit.state_dict(), "pytorch_model-00001-of-00001.bin")}))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**7}))
    start = time.monotonic()
    with pytest.raises(NotAModelError, match="num_hidden_layers 10000000, the weights hold 3 layers"):
        load_hf(tmp_path)
    assert time.monotonic() - start < 30
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_hf(tmp_path).config.depth == 3  # the honest folder still loads


@pytest.mark.parametrize("fields", [dict(qkv_bias=False), dict(layer_scale_init_value=0.0)])
def test_config_json_that_leaves_trained_layer_weights_unused_is_refused(tmp_path, fields):
    # transformers reports the q/k/v biases (or BEiT's layer scales) as unexpected and drops them;
    # mimc hid that report and converted a different model with exit 0
    if "layer_scale_init_value" in fields:
        _beit(True, False).save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, **fields}))
    else:
        _edited(tmp_path, **fields)
    with pytest.raises(NotAModelError, match="has weights its config.json leaves unused"):
        load_hf(tmp_path)


def test_weights_whose_shapes_differ_from_config_json_say_so(tmp_path):
    with pytest.raises(NotAModelError, match="shapes differ from what config.json describes") as err:
        load_hf(_edited(tmp_path, intermediate_size=256))
    assert "ignore_mismatched_sizes" not in str(err.value)  # an option of transformers the user never set


def test_single_channel_model_without_preprocessor_config_converts(tmp_path):
    # the 3-value RGB default was applied to a 1-channel model: "image_mean must hold one number per
    # input channel (1), got [0.5, 0.5, 0.5]" for a mean the user never gave
    model = randomize(transformers.ViTModel(transformers.ViTConfig(**COMMON, num_channels=1)))
    model.save_pretrained(tmp_path)
    encoder = load_hf(tmp_path)
    assert encoder.config.image_mean == [0.5] and encoder.config.image_std == [0.5]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (encoder(x).last_hidden_state - model(x).last_hidden_state).abs().max().item() <= TOL


def test_beit_saved_without_its_pooler_converts_like_data2vec(tmp_path):
    # BeitModel(add_pooling_layer=False) has every encoder weight; reloading it with BeitModel's default
    # pooler made its LayerNorm "missing" and the folder was refused as incomplete
    cfg = transformers.BeitConfig(**COMMON, use_mean_pooling=True, use_relative_position_bias=True, layer_scale_init_value=0.1)
    model = randomize(transformers.BeitModel(cfg, add_pooling_layer=False))
    model.save_pretrained(tmp_path)
    encoder = load_hf(tmp_path)
    assert encoder.config.pooling == "mean" and not encoder.config.pool_norm
    x = images()
    with torch.no_grad():
        ref = model(x).last_hidden_state
        out = encoder(x)
    assert (out.last_hidden_state - ref).abs().max().item() <= TOL
    assert (out.pooled - ref[:, 1:].mean(1)).abs().max().item() <= TOL


@pytest.mark.parametrize("mean", [["a", "b", "c"], 5])
def test_preprocessor_config_with_a_mean_that_is_no_list_of_numbers_is_one_line(tmp_path, mean):
    # float("a") / iterating 5 raised ValueError / TypeError: a traceback
    _vit().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": [0.5] * 3}))
    with pytest.raises(NotAModelError, match="preprocessor_config.json"):
        load_hf(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_preprocessor_config_that_is_a_named_pipe_is_not_read(tmp_path):
    # reading it waited forever for a writer (inspect hung); only regular files are read, as for config.json
    _vit().save_pretrained(tmp_path)
    os.mkfifo(tmp_path / "preprocessor_config.json")
    assert load_hf(tmp_path).config.image_mean == [0.5, 0.5, 0.5]
