"""MODEL argument -> encoder: every kind of bad input is one typed, one-line error; inputs stay untouched."""
from __future__ import annotations

import hashlib
import json
import os
import socket

import pytest
import torch

from mimc.errors import BadInputError, ModelNotFoundError, NotAModelError, UnsafeCheckpointError
from mimc.models.resolve import describe_source, load_model


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_one_line(err, *fragments):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    assert isinstance(err.value, BadInputError) and err.value.exit_code == 2
    for fragment in fragments:
        assert fragment in msg, msg


class RunsCode:
    """Unpickling this calls os.system: the attack a weights-only loader must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a host fails the test's expectations loudly."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model.pth"
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(missing))
    assert_one_line(err, str(missing))
    assert not missing.parent.exists()


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotAModelError) as err:
        load_model(str(tmp_path))
    assert_one_line(err, "mimc.json", "config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_file_of_the_wrong_kind(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("1 2 3")
    with pytest.raises(NotAModelError) as err:
        load_model(str(path))
    assert_one_line(err, ".safetensors")


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"\xff" * 64])
def test_corrupt_safetensors(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    before = sha(path)
    with pytest.raises(NotAModelError) as err:
        load_model(str(path))
    assert_one_line(err, "safetensors")
    assert sha(path) == before


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(64, 3, 8, 8)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])  # header promises more bytes than the file has
    before = sha(path)
    with pytest.raises(NotAModelError) as err:
        load_model(str(path))
    assert_one_line(err)
    assert sha(path) == before


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, fmt):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"model": {"patch_embed.proj.weight": torch.zeros(2)}, "extra": RunsCode(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    before = sha(path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(str(path))
    assert_one_line(err, "run code", "system")
    assert not marker.exists()  # the payload never ran
    assert sha(path) == before


def test_garbage_pth_is_not_a_model_but_not_called_unsafe(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"this is not a pickle at all")
    with pytest.raises(NotAModelError) as err:
        load_model(str(path))
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert_one_line(err, "checkpoint")


def test_hub_id_while_offline_fails_fast_without_touching_the_network(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline discovered by the failed lookup
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert describe_source("facebook/vit-mae-base") == "hub"
    with pytest.raises(ModelNotFoundError) as err:
        load_model("facebook/vit-mae-base")
    assert_one_line(err, "facebook/vit-mae-base", "internet", "local model directory")
    assert len(no_network) == 1  # only the blocked host lookup; no connection was ever attempted
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.json"))


def test_hub_id_in_offline_mode_never_looks_up_the_host(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("someone/some-model")
    assert_one_line(err, "someone/some-model", "offline")
    assert no_network == []


def test_hub_id_offline_loads_a_cached_copy(tmp_path, monkeypatch, no_network):
    transformers = pytest.importorskip("transformers")
    from huggingface_hub import constants

    # Lay out the hub cache the way huggingface_hub does: refs/main -> snapshots/<revision>/files.
    repo = tmp_path / "cache" / "models--someone--tiny-vit"
    snapshot = repo / "snapshots" / "0123abcd"
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8))
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    encoder = load_model("someone/tiny-vit")
    assert encoder.config.dim == 32 and encoder.manifest.source["kind"] == "hub"
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (encoder(x).last_hidden_state - model.eval()(x).last_hidden_state).abs().max().item() <= 1e-4


def test_hf_directory_with_corrupt_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)
    cfg.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 32)
    before = sha(tmp_path / "model.safetensors")
    with pytest.raises(NotAModelError) as err:
        load_model(str(tmp_path))
    assert_one_line(err, str(tmp_path))
    assert sha(tmp_path / "model.safetensors") == before


def test_hf_directory_with_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(NotAModelError) as err:
        load_model(str(tmp_path))
    assert_one_line(err, "config.json")


def test_timm_checkpoint_loads_with_source_record(tmp_path):
    from safetensors.torch import save_file

    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    # A canonical encoder written with timm's key names (cls pooling: a supervised/DINO ViT).
    enc = build_encoder(tiny_config(pooling="cls"), seed=0)
    state = dict(enc.state_dict())  # same names as timm: cls_token, pos_embed, blocks.i.attn.qkv, ...
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path), metadata={"num_heads": str(enc.config.num_heads)})
    (tmp_path / "vit.json").write_text(json.dumps({"mean": enc.config.image_mean, "std": enc.config.image_std}))
    before = sha(path)

    loaded = load_model(str(path))
    assert loaded.manifest.source == {"id": str(path), "family": "vit", "sha256": before, "kind": "checkpoint"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x).last_hidden_state, enc(x).last_hidden_state, atol=1e-5)
        assert torch.allclose(loaded(x).pooled, enc(x).pooled, atol=1e-5)
    assert sha(path) == before


def test_hf_directory_with_a_code_running_pytorch_model_bin(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)
    cfg.save_pretrained(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 32), "x": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    before = sha(tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(str(tmp_path))
    assert_one_line(err, "pytorch_model.bin", "run code")
    assert not marker.exists()
    assert sha(tmp_path / "pytorch_model.bin") == before


def _timm_layout_checkpoint(path, **metadata):
    from safetensors.torch import save_file

    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    enc = build_encoder(tiny_config(pooling="cls"), seed=1)
    save_file(dict(enc.state_dict()), str(path), metadata={k: str(v) for k, v in metadata.items()})
    return enc


def test_timm_hub_download_directory_loads_with_its_config_as_hints(tmp_path):
    enc = _timm_layout_checkpoint(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch8_32", "model_args": {"num_heads": 4}}))
    assert describe_source(str(tmp_path)) == "timm-dir"
    loaded = load_model(str(tmp_path))
    assert loaded.manifest.source["kind"] == "timm-dir" and loaded.config.num_heads == 4
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x).last_hidden_state, enc(x).last_hidden_state, atol=1e-5)


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _timm_layout_checkpoint(tmp_path / "vit.safetensors", num_heads=4)
    assert describe_source("~/vit.safetensors") == "checkpoint"
    assert load_model("~/vit.safetensors").config.depth == 4
    with pytest.raises(ModelNotFoundError):
        load_model("~/missing.safetensors")


@pytest.mark.parametrize("bad", ["missing", "plain_dir", "corrupt_safetensors", "code_pickle", "offline_hub"])
def test_cli_bad_model_exits_2_with_one_line_and_writes_nothing(bad, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from mimc.cli.app import app

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    marker = tmp_path / "PWNED"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = {
        "missing": str(inputs / "nope.pth"),
        "plain_dir": str(inputs),
        "corrupt_safetensors": str(inputs / "bad.safetensors"),
        "code_pickle": str(inputs / "evil.pth"),
        "offline_hub": "someone/some-model",
    }[bad]
    (inputs / "bad.safetensors").write_bytes(b"\x00" * 16)
    torch.save({"x": RunsCode(marker)}, inputs / "evil.pth")
    hashes = {p.name: sha(p) for p in inputs.iterdir()}
    out = tmp_path / "out"

    result = CliRunner().invoke(app, ["export", model, "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not out.exists() and not marker.exists()
    assert {p.name: sha(p) for p in inputs.iterdir()} == hashes


@pytest.mark.parametrize(
    "hub_error, expected",
    [
        ("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.", "internet"),
        ("x/y is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'\nIf this is a private repository, make sure to pass a token", "not found"),
        ("You are trying to access a gated repo.\nMake sure to have access to it", "gated"),
    ],
)
def test_hub_failures_while_online_are_told_apart(monkeypatch, hub_error, expected):
    transformers = pytest.importorskip("transformers")
    from mimc.models.convert import hf_load

    def fail(*args, **kwargs):
        raise OSError(hub_error)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # CI may export HF_HUB_OFFLINE=1
    monkeypatch.setattr(hf_load, "hub_reachable", lambda: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fail)  # no request is ever made
    with pytest.raises(ModelNotFoundError) as err:
        load_model("x/y")
    assert_one_line(err, "'x/y'", expected)


def test_random_named_sizes_build_the_benchmark_shapes():
    from mimc.artifact import state_hash
    from mimc.models.resolve import model_slug
    from mimc.models.vit import VIT_SIZES, Encoder, vit_base_config, vit_config

    assert describe_source("random:vit-ti/16") == "random" and model_slug("random:vit-h/14") == "vit-h-14"
    enc = load_model("random:vit-ti/16")
    assert enc.config == vit_config("vit-ti/16") and round(enc.num_params / 1e6, 1) == 5.5
    assert enc.manifest.source == {"id": "random:vit-ti/16", "family": "mae", "sha256": None, "kind": "random", "seed": 0}
    assert state_hash(enc) == state_hash(load_model("random:vit-ti/16"))  # seeded: the same weights every time
    # the published parameter counts (patch embedding + blocks + norms; no classifier head)
    with torch.device("meta"):
        counts = {name: Encoder(vit_config(name)).num_params for name in VIT_SIZES}
    assert round(counts["vit-b/16"] / 1e6) == 86 and round(counts["vit-l/16"] / 1e6) == 303
    assert round(counts["vit-h/14"] / 1e6) == 631 and vit_config("vit-b/16") == vit_base_config()


@pytest.mark.parametrize("model", ["random:vit-x/16", "random:", "random:VIT-B/16"])
def test_unknown_random_sizes_are_refused(model):
    with pytest.raises(ModelNotFoundError) as err:
        describe_source(model)
    assert_one_line(err, "random:vit-h/14", "names no random ViT size")


@pytest.mark.parametrize("kind", ["checkpoint", "hf-dir"])
def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, kind):
    # NaN weights used to load, prune, export and "validate" (NaN against NaN) with exit 0; eval then
    # reported a pooled cosine of 0.0
    from safetensors.torch import load_file, save_file

    from mimc.models.vit import build_encoder
    from tests.conftest import tiny_config

    if kind == "hf-dir":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
        transformers.ViTModel(cfg).save_pretrained(tmp_path / "m")
        path = tmp_path / "m" / "model.safetensors"
        state = load_file(path)
    else:
        path = tmp_path / "vit.safetensors"
        state = {k: v.contiguous() for k, v in build_encoder(tiny_config(), seed=0).state_dict().items()}
    name = sorted(k for k in state if k.endswith(("fc1.weight", "intermediate.dense.weight")))[0]
    state[name][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt", **({"num_heads": "4"} if kind == "checkpoint" else {})})
    with pytest.raises(NotAModelError, match="NaN or infinite"):
        load_model(str(path if kind == "checkpoint" else path.parent))


def test_transformers_model_mimc_cannot_represent_names_the_model(tmp_path):
    # was "invalid encoder config: image_size must be a multiple of patch_size": no model, no fix
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=36, patch_size=8)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(NotAModelError, match=r"m cannot be converted .*image_size must be a multiple of patch_size.*: mimc's encoder"):
        load_model(str(tmp_path / "m"))
