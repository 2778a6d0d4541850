import pytest
import torch

from mimc.artifact import save_artifact
from mimc.models.io import load_artifact
from mimc.errors import BadInputError, ConfigError, NotAModelError
from mimc.models.vit import EncoderConfig, build_encoder, flops_per_image, vit_base_config
from tests.conftest import tiny_config, tiny_video_config


def test_shapes_image_and_video():
    enc = build_encoder(tiny_config(), seed=0)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.last_hidden_state.shape == (2, 17, 64)
    assert out.pooled.shape == (2, 64)
    venc = build_encoder(tiny_video_config(), seed=0)
    vout = venc(torch.randn(1, 4, 3, 32, 32))
    assert vout.last_hidden_state.shape == (1, 2 * 16, 64)


def test_mean_pooling_excludes_cls_and_cls_pooling_takes_it():
    enc = build_encoder(tiny_config(pooling="mean"), seed=0)
    out = enc(torch.randn(1, 3, 32, 32))
    assert torch.allclose(out.pooled, out.last_hidden_state[:, 1:].mean(1), atol=1e-6)
    enc = build_encoder(tiny_config(pooling="cls"), seed=0)
    out = enc(torch.randn(1, 3, 32, 32))
    assert torch.equal(out.pooled, out.last_hidden_state[:, 0])


def test_relative_position_bias_changes_output():
    enc = build_encoder(tiny_config(rel_pos_bias="per_block", layer_scale=True), seed=0)
    x = torch.randn(1, 3, 32, 32)
    before = enc(x).pooled.clone()
    with torch.no_grad():
        enc.blocks[0].attn.rel_pos_bias.table.normal_()
    assert not torch.allclose(before, enc(x).pooled)


def test_save_load_round_trip(tmp_path, tiny_encoder):
    x = torch.randn(2, 3, 32, 32)
    save_artifact(tiny_encoder, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert torch.equal(loaded(x).last_hidden_state, tiny_encoder(x).last_hidden_state)
    assert loaded.config == tiny_encoder.config


def test_save_refuses_existing_output(tmp_path, tiny_encoder):
    save_artifact(tiny_encoder, tmp_path / "a")
    with pytest.raises(BadInputError):
        save_artifact(tiny_encoder, tmp_path / "a")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_encoder):
    save_artifact(tiny_encoder, tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NotAModelError):
        load_artifact(tmp_path / "a")


def test_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(ConfigError):
        tiny_config(pooling="max")
    with pytest.raises(ConfigError):
        EncoderConfig.from_dict({**tiny_config().to_dict(), "bogus": 1})


@pytest.mark.parametrize("fields", [
    dict(norm_eps="x"), dict(norm_eps=float("inf")), dict(norm_eps=-1.0), dict(head_dim=0), dict(head_dim="8"),
    dict(block_mlp_dims=[-1] * 2), dict(block_heads=[0] * 2), dict(block_mlp_dims=["a"] * 2),
    dict(image_mean=[float("nan")] * 3), dict(image_std=[0, 0, 0]), dict(image_std=[float("inf")] * 3),
    dict(qkv_bias="no"), dict(final_norm=1), dict(family=["x"]),
    # refused since the encoder's keys are declared options (block_mlp_dims=5 was a TypeError; the others were kept)
    dict(block_mlp_dims=5), dict(crop_pct=True), dict(nm_pattern=5), dict(source_depth="x"), dict(block_ids=["a", "b"]),
])
def test_config_refuses_values_a_tampered_manifest_may_hold(fields):
    # each one used to crash later (a traceback) or to run and give nonsense features silently
    with pytest.raises(ConfigError):
        EncoderConfig.from_dict({**tiny_config(depth=2).to_dict(), **fields})


def test_vit_b_macs_match_published():
    assert abs(flops_per_image(vit_base_config()) / 17.6e9 - 1) < 0.02


def test_compress_verb_survives_submodule_imports(tiny_encoder):
    import mimc
    import mimc.compression.blocks  # noqa: F401  (a package of another name: nothing shadows the verb)
    from mimc.compression.blocks import BlockPruningConfig

    new, record = mimc.compress(tiny_encoder, BlockPruningConfig(keep=2, criterion="last"))
    assert new.config.depth == 2 and tiny_encoder.config.depth == 4
    assert record.name == "prune"


def test_load_reads_every_tensor_in_place_and_converts_a_stored_dtype(tmp_path):
    """The loader reads each tensor straight into the module (no second copy of the weights); a
    tensor stored at another dtype takes the converting path and arrives with the same values."""
    import json

    from safetensors.torch import save_file

    from mimc.artifact import MANIFEST_NAME, manifest_sha256, sha256_file, state_hash
    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    enc = build_encoder(tiny_config(rel_pos_bias="per_block", layer_scale=True), seed=3)
    art = save_artifact(enc, tmp_path / "a")
    assert state_hash(load_artifact(art)) == state_hash(enc)
    state = {k: v.contiguous() for k, v in enc.state_dict().items()}
    name = "blocks.0.mlp.fc1.weight"
    state[name] = state[name].half()  # stored in fp16, the module holds fp32
    save_file(state, str(art / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["weights_sha256"] = sha256_file(art / "model.safetensors")
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    loaded = load_artifact(art)
    assert torch.equal(loaded.state_dict()[name], state[name].float())
    assert torch.equal(loaded.state_dict()["blocks.1.mlp.fc1.weight"], enc.state_dict()["blocks.1.mlp.fc1.weight"])


def test_manifest_claiming_a_huge_depth_is_refused_before_building_it(tmp_path, tiny_encoder):
    import json
    import time

    from mimc.artifact import manifest_sha256

    save_artifact(tiny_encoder, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "mimc.json").read_text())
    manifest["encoder"]["depth"] = 10**7  # the encoder used to be built (on meta) first: hours
    manifest["manifest_sha256"] = manifest_sha256(manifest)  # re-hashed: the check behind the hash
    (tmp_path / "a" / "mimc.json").write_text(json.dumps(manifest))
    start = time.monotonic()
    with pytest.raises(NotAModelError, match="depth 10000000 by the config, 4 blocks in the weights"):
        load_artifact(tmp_path / "a")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("edit", [dict(num_heads=1), dict(num_heads=2), dict(norm_eps=1e-5), dict(pooling="cls"), None, "stage"])
def test_an_edited_or_unhashed_manifest_is_refused(tmp_path, tiny_encoder, edit):
    # the weights' hash does not cover mimc.json: num_heads 4 -> 1 fits the same weights, and the
    # artifact loaded and gave other features silently (an edited stage replayed another model);
    # removing the manifest's hash must not pass either
    import json

    save_artifact(tiny_encoder, tmp_path / "a")
    where = tmp_path / "a" / "mimc.json"
    manifest = json.loads(where.read_text())
    if edit is None:
        del manifest["manifest_sha256"]
    elif edit == "stage":
        manifest["stages"] = [{"name": "prune", "config": {"ratio": 0.9}, "config_version": 1}]
    else:
        manifest["encoder"].update(edit)
    where.write_text(json.dumps(manifest))
    with pytest.raises(NotAModelError, match="manifest_sha256"):
        load_artifact(tmp_path / "a")


def test_a_huge_manifest_is_refused_without_reading_it(tmp_path, tiny_encoder):
    # before: a mimc.json of any size was read whole (a 10 GB file filled the memory)
    save_artifact(tiny_encoder, tmp_path / "a")
    with open(tmp_path / "a" / "mimc.json", "r+b") as f:
        f.truncate(40 << 30)  # sparse: 40 GiB claimed, nothing on disk
    with pytest.raises(NotAModelError, match="mimc.json is over 16 MiB"):
        load_artifact(tmp_path / "a")


def _record_files(folder: str, tag: str) -> None:
    import time

    from mimc.artifact import update_manifest

    def add(name):
        def edit(manifest):
            time.sleep(0.01)  # a slow writer: without the lock the other process's record is lost here
            manifest.files[name] = {"kind": "onnx"}
        return edit
    for i in range(15):
        update_manifest(folder, add(f"{tag}{i}.onnx"))


def test_two_processes_recording_files_in_one_artifact_lose_nothing(tmp_path, tiny_encoder):
    # before: export / quantize / build read mimc.json, added their entry and wrote it back unlocked, so
    # two runs writing different graphs into one artifact could each drop the other's record
    import multiprocessing

    from mimc.artifact import read_manifest

    art = save_artifact(tiny_encoder, tmp_path / "a")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_files, args=(str(art), tag)) for tag in "xy"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(read_manifest(art).files) == sorted(f"{t}{i}.onnx" for t in "xy" for i in range(15))
