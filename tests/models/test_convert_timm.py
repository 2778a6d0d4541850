"""timm-layout checkpoints -> canonical encoder.

Without timm (runs in CI): state dicts built by hand with timm's key names are loaded and compared
with an independent functional forward written here from the papers' equations. With timm
installed: equivalence against timm's own forward.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mimc.errors import NotAModelError
from mimc.models.convert.timm import load_timm_checkpoint, read_checkpoint

TOL = 1e-4
SIDE, PATCH = 4, 8  # 32 px images, 8 px patches


# ---------------------------------------------------------------- hand-built timm state dicts
def make_state(dim=64, depth=2, mlp=128, *, beit=False, cls=True, pos=True, no_embed_class=False, fc_norm=False, norm=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=gen)

    sd = {"patch_embed.proj.weight": rnd(dim, 3, PATCH, PATCH), "patch_embed.proj.bias": rnd(dim)}
    n = SIDE * SIDE
    if cls:
        sd["cls_token"] = rnd(1, 1, dim)
    if pos:
        sd["pos_embed"] = rnd(1, n + (1 if cls and not no_embed_class else 0), dim)
    n_rel = (2 * SIDE - 1) ** 2 + 3
    heads = dim // 16
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = rnd(dim, shift=1.0), rnd(dim)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = rnd(dim, shift=1.0), rnd(dim)
        sd[p + "attn.qkv.weight"] = rnd(3 * dim, dim)
        if beit:
            sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = rnd(dim, scale=0.5), rnd(dim, scale=0.5)
            sd[p + "attn.relative_position_bias_table"] = rnd(n_rel, heads, scale=1.0)
            sd[p + "attn.relative_position_index"] = torch.zeros(n + 1, n + 1, dtype=torch.long)  # rebuilt, ignored
            sd[p + "gamma_1"], sd[p + "gamma_2"] = rnd(dim, scale=0.3, shift=0.5), rnd(dim, scale=0.3, shift=0.5)
        else:
            sd[p + "attn.qkv.bias"] = rnd(3 * dim, scale=0.5)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = rnd(dim, dim), rnd(dim)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(mlp, dim), rnd(mlp)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(dim, mlp), rnd(dim)
    if norm:
        sd["norm.weight"], sd["norm.bias"] = rnd(dim, shift=1.0), rnd(dim)
    if fc_norm:
        sd["fc_norm.weight"], sd["fc_norm.bias"] = rnd(dim, shift=1.0), rnd(dim)
    return sd


def beit_relative_index(side):
    """BEiT's table index, written as loops straight from the definition (independent of mimc)."""
    n, span = side * side, 2 * side - 1
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    for a in range(n):
        for b in range(n):
            dy = a // side - b // side + side - 1
            dx = a % side - b % side + side - 1
            index[a + 1, b + 1] = dy * span + dx
    index[0, :] = span * span  # cls -> token
    index[:, 0] = span * span + 1  # token -> cls
    index[0, 0] = span * span + 2  # cls -> cls
    return index


def reference_forward(sd, x, heads, pooling, eps=1e-6):
    """Pre-norm ViT/BEiT forward on a timm-layout state dict: (tokens after final norm, pooled)."""
    w = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    b, n, d = t.shape
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[1] == n:  # no_embed_class: positions for patches only
        t = t + pos
        pos = None
    if "cls_token" in sd:
        t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    if pos is not None:
        t = t + pos
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = sd["blocks.0.attn.qkv.weight"].shape[0] // 3 // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        if p + "attn.q_bias" in sd:
            bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.q_bias"]), sd[p + "attn.v_bias"]])
        else:
            bias = sd[p + "attn.qkv.bias"]
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(b, t.shape[1], 3, heads, hd).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / hd**0.5
        table = sd.get(p + "attn.relative_position_bias_table")
        if table is not None:
            scores = scores + table[beit_relative_index(SIDE)].permute(2, 0, 1)
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t.shape[1], heads * hd)
        o = F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + o * sd.get(p + "gamma_1", 1.0)
        h = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        m = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + m * sd.get(p + "gamma_2", 1.0)
    if "norm.weight" in sd:
        t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps)
    prefix = 1 if "cls_token" in sd else 0
    pooled = t[:, 0] if pooling == "cls" else t[:, prefix:].mean(1)
    if "fc_norm.weight" in sd:
        pooled = F.layer_norm(pooled, (d,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps)
    return t, pooled


def images(n=2):
    return torch.randn(n, 3, SIDE * PATCH, SIDE * PATCH, generator=torch.Generator().manual_seed(7))


def assert_matches(encoder, sd, heads, pooling):
    x = images()
    ref_tokens, ref_pooled = reference_forward(sd, x, heads, pooling)
    with torch.no_grad():
        out = encoder(x)
    assert (out.last_hidden_state - ref_tokens).abs().max().item() <= TOL
    assert (out.pooled - ref_pooled).abs().max().item() <= TOL


# ---------------------------------------------------------------- tests without timm
def test_plain_vit_safetensors_with_metadata_heads(tmp_path):
    sd = make_state()
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path), metadata={"num_heads": "4"})
    encoder = load_timm_checkpoint(path)
    cfg = encoder.config
    assert (cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.image_size, cfg.patch_size) == (64, 2, 4, 128, 32, 8)
    assert cfg.pooling == "cls" and cfg.family == "vit" and cfg.final_norm
    assert_matches(encoder, sd, heads=4, pooling="cls")


def test_heads_default_to_64_dim_heads_without_hints(tmp_path):
    sd = make_state(dim=128, mlp=256)
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))
    encoder = load_timm_checkpoint(path)
    assert encoder.config.num_heads == 2  # 128 // 64
    assert_matches(encoder, sd, heads=2, pooling="cls")


def test_mae_training_checkpoint_pth_unwraps_strips_prefix_and_drops_decoder(tmp_path):
    sd = make_state()
    extra = {"decoder_embed.weight": torch.zeros(32, 64), "decoder_blocks.0.norm1.weight": torch.ones(32), "mask_token": torch.zeros(1, 1, 32)}
    wrapped = {"model": {f"module.{k}": v for k, v in {**sd, **extra}.items()}, "epoch": 399, "args": argparse.Namespace(lr=1e-3)}
    path = tmp_path / "mae_pretrain.pth"
    torch.save(wrapped, path)
    (tmp_path / "mae_pretrain.json").write_text(json.dumps({"num_heads": 4}))  # sidecar
    encoder = load_timm_checkpoint(path)
    assert encoder.config.family == "mae" and encoder.config.pooling == "mean"  # MAE features: mean of patches
    assert not any("decoder" in k for k in encoder.state_dict())
    assert_matches(encoder, sd, heads=4, pooling="mean")


def test_dino_checkpoint_uses_the_teacher_backbone(tmp_path):
    teacher, student = make_state(seed=1), make_state(seed=2)
    ckpt = {
        "student": {f"module.backbone.{k}": v for k, v in student.items()} | {"module.head.mlp.0.weight": torch.zeros(8, 64)},
        "teacher": {f"backbone.{k}": v for k, v in teacher.items()} | {"head.last_layer.weight": torch.zeros(8, 64)},
    }
    path = tmp_path / "dino.pth"
    torch.save(ckpt, path)
    encoder = load_timm_checkpoint(path, num_heads=4)
    assert encoder.config.pooling == "cls"
    assert_matches(encoder, teacher, heads=4, pooling="cls")


def test_beit_style_fuses_qv_bias_layer_scale_and_relative_position_tables(tmp_path):
    sd = make_state(beit=True, pos=False, fc_norm=True, norm=False)
    path = tmp_path / "beit.safetensors"
    save_file(sd, str(path))
    encoder = load_timm_checkpoint(path)
    cfg = encoder.config
    # heads come from the table, image size from its (2*side-1)^2 + 3 rows: neither needs a hint
    assert (cfg.num_heads, cfg.image_size, cfg.rel_pos_bias, cfg.pos_embed) == (4, 32, "per_block", "none")
    assert cfg.layer_scale and cfg.pool_norm and not cfg.final_norm and cfg.family == "beit"
    assert torch.count_nonzero(encoder.blocks[0].attn.qkv.bias[64:128]) == 0  # BEiT has no k bias
    assert_matches(encoder, sd, heads=4, pooling="mean")


def test_no_embed_class_positions_get_a_zero_cls_row(tmp_path):
    sd = make_state(no_embed_class=True)
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path), metadata={"num_heads": "4"})
    encoder = load_timm_checkpoint(path)
    assert torch.count_nonzero(encoder.pos_embed[0, 0]) == 0
    assert_matches(encoder, sd, heads=4, pooling="cls")


def test_timm_hub_config_sidecar_supplies_heads_pooling_and_normalisation(tmp_path):
    sd = make_state(dim=128, mlp=256)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8_32", "model_args": {"num_heads": 8, "global_pool": "avg"},
        "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]},
    }))  # fmt: skip
    encoder = load_timm_checkpoint(tmp_path / "model.safetensors")
    assert encoder.config.num_heads == 8 and encoder.config.pooling == "mean"
    assert encoder.config.image_mean == [0.1, 0.2, 0.3]
    assert_matches(encoder, sd, heads=8, pooling="mean")


def test_unsupported_variants_and_foreign_files_are_one_line_errors(tmp_path):
    sd = make_state()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)  # qk-norm: no place in the canonical block
    save_file(sd, str(tmp_path / "qknorm.safetensors"))
    with pytest.raises(NotAModelError, match="q_norm"):
        load_timm_checkpoint(tmp_path / "qknorm.safetensors", num_heads=4)

    hf_like = {"embeddings.patch_embeddings.projection.weight": torch.zeros(64, 3, 8, 8)}
    save_file(hf_like, str(tmp_path / "hf.safetensors"))
    with pytest.raises(NotAModelError, match="transformers checkpoint"):
        load_timm_checkpoint(tmp_path / "hf.safetensors")

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(NotAModelError, match="state dict"):
        load_timm_checkpoint(tmp_path / "tensor.pth")

    bad_heads = make_state()
    save_file(bad_heads, str(tmp_path / "bad_heads.safetensors"), metadata={"num_heads": "5"})
    with pytest.raises(NotAModelError) as err:
        load_timm_checkpoint(tmp_path / "bad_heads.safetensors")
    assert "num_heads" in str(err.value) and "\n" not in str(err.value)


def test_half_precision_checkpoints_load_as_float32(tmp_path):
    sd = make_state()
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "vit16.safetensors"), metadata={"num_heads": "4"})
    encoder = load_timm_checkpoint(tmp_path / "vit16.safetensors")
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert_matches(encoder, {k: v.half().float() for k, v in sd.items()}, heads=4, pooling="cls")


def test_read_checkpoint_never_modifies_the_file(tmp_path):
    import hashlib

    path = tmp_path / "vit.pth"
    torch.save({"model": make_state()}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    obj, _ = read_checkpoint(path)
    assert "model" in obj
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


# ---------------------------------------------------------------- equivalence against timm itself
TIMM_CASES = {
    "vit_token": ("vit_base_patch16_224", {}),
    "vit_avg_fc_norm": ("vit_base_patch16_224", dict(global_pool="avg")),
    "vit_avg_no_fc_norm": ("vit_base_patch16_224", dict(global_pool="avg", fc_norm=False)),
    "vit_no_embed_class_layer_scale": ("vit_base_patch16_224", dict(no_embed_class=True, init_values=0.1)),
    "vit_no_cls": ("vit_base_patch16_224", dict(class_token=False, global_pool="avg")),
    "beit_per_block": ("beit_base_patch16_224", {}),
    "beit_shared_abs_pos": ("beit_base_patch16_224", dict(use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)),
}


def _timm_model(arch, extra):
    timm = pytest.importorskip("timm")
    model = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=0, **extra)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random, so a forgotten table or gamma shows up
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * z if ("norm" in name and name.endswith("weight")) else (0.2 if p.dim() > 1 else 0.5) * z)
    return model.eval()


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_convert_timm_model_matches_timm_forward(case):
    from mimc.models.convert.timm import convert_timm_model

    model = _timm_model(*TIMM_CASES[case])
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        out = convert_timm_model(model)(x)
    assert (out.last_hidden_state - tokens).abs().max().item() <= TOL
    assert (out.pooled - pooled).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["vit_token", "beit_per_block"])
def test_timm_state_dict_file_matches_timm_forward(case, tmp_path):
    model = _timm_model(*TIMM_CASES[case])
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"num_heads": "4"})
    x = images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = load_timm_checkpoint(path)(x)
    assert (out.last_hidden_state - tokens).abs().max().item() <= TOL


def mae_sincos_numpy(dim, grid):
    """MAE's get_2d_sincos_pos_embed, transcribed from facebookresearch/mae util/pos_embed.py."""
    import numpy as np

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_encoder_only_mae_checkpoint_is_recognised_by_its_sincos_positions(tmp_path):
    sd = make_state()
    sd["pos_embed"] = torch.from_numpy(mae_sincos_numpy(64, SIDE)).float()[None]
    torch.save({"model": sd}, tmp_path / "mae_pretrain_vit.pth")  # no decoder: the released MAE encoders
    encoder = load_timm_checkpoint(tmp_path / "mae_pretrain_vit.pth", num_heads=4)
    assert encoder.config.family == "mae" and encoder.config.pooling == "mean"
    assert_matches(encoder, sd, heads=4, pooling="mean")
    # A learned table of the same shape (DINO, DeiT) stays a plain ViT with cls pooling.
    save_file(make_state(), str(tmp_path / "learned.safetensors"), metadata={"num_heads": "4"})
    assert load_timm_checkpoint(tmp_path / "learned.safetensors").config.family == "vit"


@pytest.mark.parametrize("hint", [{"num_heads": '"four"'}, {"norm_eps": '"x"'}, {"image_size": "[1]"}])
def test_hints_of_the_wrong_type_are_one_line_errors(tmp_path, hint):
    # int("four") / float("x") raised ValueError out of infer_config: a traceback on the command line
    path = tmp_path / "vit.safetensors"
    sd = make_state()
    if "image_size" in hint:
        del sd["pos_embed"]  # the image size is then read from the hint
    save_file(sd, str(path), metadata=hint)
    with pytest.raises(NotAModelError, match=next(iter(hint))):
        load_timm_checkpoint(path)
