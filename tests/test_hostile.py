"""The adversarial suite: hostile inputs must end in exit 2 with one line naming the problem, write
nothing (no output, no temporary), leave every input byte-identical and run no code they carry.

Each case is a command line run in a fresh copy of one workspace (a tiny artifact ``A``, a second one
``B`` with other weights, images, an ONNX graph, a transformers folder with custom code, an
interrupted training run), after an optional ``setup`` that makes the hostile input. The checks are
the same for every case: exit code, exactly one error line containing ``match``, the whole workspace
unchanged (every file hashed before and after, hidden ones included), no marker file.
"""
from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from mimc.artifact import save_artifact
from mimc.cli.app import app
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config


# The workspace ---------------------------------------------------------------------------------------
class _WritesMarker:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ws = root / "ws"
    ws.mkdir()
    marker = root / "MARKER"
    encoder = build_encoder(tiny_config(), seed=0)
    save_artifact(encoder, ws / "A")
    save_artifact(build_encoder(tiny_config(), seed=1), ws / "B")
    rng = np.random.default_rng(0)
    np.savez(ws / "imgs.npz", images=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8))
    from mimc.deploy.onnx import export_onnx

    export_onnx(encoder, ws / "g.onnx")
    _hf_folder_with_code(ws / "hf", marker)
    _interrupted_run(ws)
    (ws / "recipe.yaml").write_text("model: A\nstages:\n  - prune: {ratio: 0.5}\n")
    return root


def _hf_folder_with_code(folder: Path, marker: Path) -> None:
    from transformers import ViTMAEConfig, ViTMAEModel

    cfg = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    ViTMAEModel(cfg).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import ViTMAEConfig, ViTMAEModel\n"
        "class EvilConfig(ViTMAEConfig):\n    model_type = 'vit_mae'\n"
        "class EvilModel(ViTMAEModel):\n    config_class = EvilConfig\n"
    )


def _interrupted_run(ws: Path) -> None:
    """A learned sparsify run stopped after its step-2 checkpoint: ``ws/run``."""
    import mimc.train as train_pkg

    real = train_pkg.TrainRun

    def interrupting(**kw):
        run = real(**kw)
        run.on_step = lambda step, loss: (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else None
        return run

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_pkg, "TrainRun", interrupting)
            res = CliRunner().invoke(app, ["sparsify", "A", "--method", "learned", "--data", "imgs.npz", "--steps", "3",
                                           "--batch-size", "4", "--prior", "magnitude", "--checkpoint-every", "1", "-o", "run"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 130, res.output
    assert (ws / "run" / "checkpoint" / "state.json").is_file()


@pytest.fixture
def ws(template, tmp_path, monkeypatch):
    work = tmp_path / "ws"
    shutil.copytree(template / "ws", work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included): files by content hash, folders by name."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# Hostile inputs (setups) -----------------------------------------------------------------------------
def _edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = fn(data)
    path.write_text(json.dumps(data if result is None else result))


def manifest(fn, rehash: bool = True):
    """An edit of A's mimc.json; with ``rehash`` its manifest_sha256 re-computed after it, as a forger
    would, so that the checks behind that hash are reached."""
    from mimc.artifact import manifest_sha256

    def edit(m):
        result = fn(m)
        if rehash and isinstance(m, dict):
            m["manifest_sha256"] = manifest_sha256(m)
        return result
    return lambda ws: _edit_json(ws / "A" / "mimc.json", edit)


def state(fn):
    return lambda ws: _edit_json(ws / "run" / "checkpoint" / "state.json", fn)


def write(name: str, text: str | bytes):
    def setup(ws):
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return setup


def npy(name: str, array):
    return lambda ws: np.save(ws / name, array)


def both(*setups):
    def setup(ws):
        for s in setups:
            s(ws)
    return setup


def truncate(name: str, keep: int | None = None):
    def setup(ws):
        data = (ws / name).read_bytes()
        (ws / name).write_bytes(data[: keep if keep is not None else len(data) // 2])
    return setup


def swap_weights(ws):
    shutil.copy(ws / "B" / "model.safetensors", ws / "A" / "model.safetensors")


def truncated_weights_rehashed(ws):
    weights = ws / "A" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    manifest(lambda m: m.update(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))(ws)


def legacy_pickled_optimizer(ws):
    import torch

    ck = ws / "run" / "checkpoint"
    (ck / "optimizer.safetensors").unlink()
    (ck / "optimizer.json").unlink()
    torch.save({"state": {}, "param_groups": [], "x": _WritesMarker(str(ws.parent.parent / "MARKER"))}, ck / "optimizer.pt")


def checkpoint_tensor_reshaped(file: str):
    """A valid safetensors file in the checkpoint whose first tensor has another shape (altered by hand)."""
    def setup(ws):
        import torch
        from safetensors.torch import load_file, save_file

        path = ws / "run" / "checkpoint" / file
        tensors = load_file(path)
        tensors[sorted(tensors)[0]] = torch.zeros(3)
        save_file(tensors, path)
    return setup


def pickled_images(ws):
    np.save(ws / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def lock_held_by_live_process(ws):
    (ws / ".OUT.lock").write_text(str(os.getppid()))  # the test runner's parent: alive


def bomb(levels: int) -> str:
    lines = ["model: A", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"stages: [*a{levels - 1}]")
    return "\n".join(lines) + "\n"


LONG = "9" * 5000
RUN_RESUME = ["sparsify", "A", "--data", "imgs.npz", "--resume", "run"]


@dataclass
class Case:
    id: str
    argv: list[str]
    match: str
    setup: Callable[[Path], None] | None = None
    code: int = 2
    input: str | None = None


CASES = [
    # 1. Security: a model folder's own code is never run, never prompted for -------------------------
    Case("hf-auto-map-prune", ["prune", "hf", "--ratio", "0.5", "-o", "OUT"], "auto_map", input="y\n"),
    Case("hf-auto-map-inspect", ["inspect", "hf"], "auto_map", input="y\n"),
    Case("hf-auto-map-export", ["export", "hf", "-o", "OUT"], "auto_map", input="y\n"),
    Case("hf-auto-map-width", ["width", "hf", "--mlp", "0.5", "-o", "OUT"], "auto_map", input="y\n"),
    Case("hf-auto-map-recipe", ["run", "r.yaml", "-o", "OUT"], "auto_map", write("r.yaml", "model: hf\nstages:\n  - prune: {ratio: 0.5}\n"), input="y\n"),
    Case("hf-auto-map-preprocessor", ["prune", "hf", "--ratio", "0.5", "-o", "OUT"], "auto_map",
         both(lambda ws: _edit_json(ws / "hf" / "config.json", lambda c: c.pop("auto_map") and None),
              write("hf/preprocessor_config.json", json.dumps({"auto_map": {"AutoImageProcessor": "evil.P"}}))), input="y\n"),
    # 1. Security: recipe YAML ------------------------------------------------------------------------
    Case("yaml-billion-laughs", ["run", "bomb.yaml", "-o", "OUT"], "anchors and aliases", write("bomb.yaml", bomb(9))),
    Case("yaml-laughs-3", ["run", "bomb.yaml", "-o", "OUT"], "anchors and aliases", write("bomb.yaml", bomb(3))),
    Case("yaml-anchor-only", ["run", "r.yaml", "-o", "OUT"], "anchors and aliases",
         write("r.yaml", "model: A\nstages: &s [prune]\n")),
    Case("yaml-merge-key", ["run", "r.yaml", "-o", "OUT"], "anchors and aliases",
         write("r.yaml", "base: &b {ratio: 0.5}\nmodel: A\nstages:\n  - prune: {<<: *b}\n")),
    Case("yaml-duplicate-option", ["run", "r.yaml", "-o", "OUT"], "duplicate key 'ratio'",
         write("r.yaml", "model: A\nstages:\n  - prune: {ratio: 0.5, ratio: 0.25}\n")),
    Case("yaml-duplicate-top-key", ["run", "r.yaml", "-o", "OUT"], "duplicate key 'model'",
         write("r.yaml", "model: A\nmodel: B\nstages:\n  - prune: {ratio: 0.5}\n")),
    Case("yaml-huge-value", ["run", "r.yaml", "-o", "OUT"], "...",
         write("r.yaml", f"model: A\nstages:\n  - prune: {{ratio: '{LONG}'}}\n")),
    Case("yaml-huge-list", ["run", "r.yaml", "-o", "OUT"], "...",
         write("r.yaml", "model: A\nstages:\n  - prune: {blocks: [" + ",".join(["1"] * 3000) + ", x]}\n")),
    Case("yaml-over-1mib", ["run", "r.yaml", "-o", "OUT"], "MiB", write("r.yaml", "# " + "x" * (1 << 20) + "\nmodel: A\n")),
    Case("yaml-python-tag", ["run", "r.yaml", "-o", "OUT"], "not valid YAML",
         write("r.yaml", "model: !!python/object/apply:os.system ['touch MARKER']\nstages:\n  - prune: {ratio: 0.5}\n")),
    # 1. Security: tampered artifacts -----------------------------------------------------------------
    Case("artifact-zero-hash", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "weights_sha256",
         manifest(lambda m: m.update(weights_sha256="0" * 64))),
    Case("artifact-no-hash", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "weights_sha256",
         manifest(lambda m: m.pop("weights_sha256") and None)),
    Case("artifact-hash-not-hex", ["export", "A", "-o", "OUT"], "weights_sha256", manifest(lambda m: m.update(weights_sha256="z" * 64))),
    Case("artifact-swapped-weights", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "does not match the weights_sha256", swap_weights),
    Case("artifact-swapped-weights-inspect", ["inspect", "A"], "does not match the weights_sha256", swap_weights),
    Case("artifact-swapped-weights-export", ["export", "A", "-o", "OUT"], "does not match the weights_sha256", swap_weights),
    Case("artifact-block-99-of-12", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "block_ids names block 99 of 12",
         manifest(lambda m: m["encoder"].update(block_ids=[0, 1, 2, 99], source_depth=12))),
    Case("artifact-block-ids-repeat", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "increasing",
         manifest(lambda m: m["encoder"].update(block_ids=[0, 1, 1, 2], source_depth=12))),
    Case("artifact-block-ids-negative", ["inspect", "A"], "non-negative", manifest(lambda m: m["encoder"].update(block_ids=[-1, 0, 1, 2]))),
    Case("artifact-block-ids-length", ["inspect", "A"], "mimc.json", manifest(lambda m: m["encoder"].update(block_ids=[0, 1]))),
    Case("artifact-manifest-list", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "not a mimc manifest", manifest(lambda m: [m])),
    Case("artifact-stages-not-list", ["inspect", "A"], "'stages' must be", manifest(lambda m: m.update(stages="x"))),
    Case("artifact-stage-name-not-text", ["run", "A", "-o", "OUT"], "'name'",
         manifest(lambda m: m.update(source={"id": "ref"}, stages=[{"name": ["prune"], "config": {}, "config_version": 1}]))),
    Case("artifact-file-stage-not-object", ["run", "A", "--dry-run"], "'stage'",
         manifest(lambda m: m.update(source={"id": "ref"}, files={"model.int8.onnx": {"file": "model.int8.onnx", "stage": "x"}}))),
    Case("artifact-quantize-without-config", ["run", "A", "--dry-run"], "'config'",
         manifest(lambda m: m.update(source={"id": "ref"}, files={"model.int8.onnx": {"file": "model.int8.onnx", "stage": {"name": "quantize"}}}))),
    Case("artifact-unknown-key", ["inspect", "A"], "not a mimc manifest", manifest(lambda m: m.update(evil=1))),
    Case("artifact-encoder-edited", ["export", "A", "-o", "OUT"], "does not match its manifest_sha256",
         manifest(lambda m: m["encoder"].update(num_heads=2), rehash=False)),
    Case("artifact-encoder-eps-edited", ["embed", "A", "--data", "imgs.npz", "-o", "f.npy"], "does not match its manifest_sha256",
         manifest(lambda m: m["encoder"].update(norm_eps=1e-5), rehash=False)),
    Case("artifact-encoder-hash-removed", ["inspect", "A"], "manifest_sha256",
         manifest(lambda m: m["encoder"].update(num_heads=2) or m.pop("manifest_sha256") and None, rehash=False)),
    Case("artifact-format-1", ["inspect", "A"], "format_version 1", manifest(lambda m: m.update(format_version=1), rehash=False)),
    Case("artifact-encoder-garbage", ["inspect", "A"], "encoder config is invalid", manifest(lambda m: m["encoder"].update(dim="wide"))),
    Case("artifact-truncated-weights", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "not a valid safetensors", truncated_weights_rehashed),
    Case("artifact-manifest-not-json", ["inspect", "A"], "not readable JSON", write("A/mimc.json", "{" * 10)),
    # 1. Security: resume checkpoints ------------------------------------------------------------------
    Case("checkpoint-pickled-optimizer", RUN_RESUME, "pickle", legacy_pickled_optimizer),
    Case("checkpoint-step-text", RUN_RESUME, "step 'ten'", state(lambda s: s.update(step="ten"))),
    Case("checkpoint-step-negative", RUN_RESUME, "step -5", state(lambda s: s.update(step=-5))),
    Case("checkpoint-step-huge", RUN_RESUME, "step 1000000000", state(lambda s: s.update(step=10 ** 9))),
    Case("checkpoint-step-float", RUN_RESUME, "step 2.0", state(lambda s: s.update(step=2.0))),
    Case("checkpoint-losses-text", RUN_RESUME, "losses", state(lambda s: s.update(losses=["a", "b"]))),
    Case("checkpoint-truncated-tensors", RUN_RESUME, "not a readable mimc checkpoint", truncate("run/checkpoint/trainable.safetensors")),
    Case("checkpoint-truncated-optimizer", RUN_RESUME, "not a readable mimc checkpoint", truncate("run/checkpoint/optimizer.safetensors", 20)),
    Case("checkpoint-short-rng", RUN_RESUME, "rng_state", state(lambda s: s.update(rng_state=base64.b64encode(b"abc").decode()))),
    Case("checkpoint-rng-not-base64", RUN_RESUME, "not a readable mimc checkpoint", state(lambda s: s.update(rng_state="!!!"))),
    Case("checkpoint-optimizer-layout", RUN_RESUME, "not a readable mimc checkpoint", write("run/checkpoint/optimizer.json", '{"evil": 1}')),
    Case("checkpoint-state-not-json", RUN_RESUME, "not a readable mimc checkpoint", write("run/checkpoint/state.json", "[")),
    Case("checkpoint-meta-not-mapping", RUN_RESUME, "not a readable mimc checkpoint", state(lambda s: s.update(meta=[1]))),
    Case("checkpoint-tensor-shape", RUN_RESUME, "does not fit this run", checkpoint_tensor_reshaped("trainable.safetensors")),
    Case("checkpoint-optimizer-shape", RUN_RESUME, "does not fit this run", checkpoint_tensor_reshaped("optimizer.safetensors")),
    # 2. Outputs ---------------------------------------------------------------------------------------
    Case("profile-onto-its-graph", ["profile", "g.onnx", "-o", "g.onnx", "--iters", "1", "--warmup", "0"], "is the input"),
    Case("quantize-onto-its-graph", ["quantize", "g.onnx", "--calib", "imgs.npz", "-o", "g.onnx"], "is the input"),
    Case("quantize-output-taken", ["quantize", "g.onnx", "--calib", "imgs.npz", "-o", "q.onnx"], "q.onnx already exists", write("q.onnx", "mine")),
    Case("prune-onto-input", ["prune", "A", "--ratio", "0.5", "-o", "A", "--overwrite"], "is the input"),
    Case("tokens-onto-input", ["tokens", "A", "--r", "2", "-o", "A", "--overwrite"], "is the input"),
    Case("width-onto-input", ["width", "A", "--mlp", "0.5", "-o", "A", "--overwrite"], "is the input"),
    Case("prune-into-input", ["prune", "A", "--ratio", "0.5", "-o", "A/inner"], "lies inside the input"),
    Case("prune-into-input-deep", ["prune", "A", "--ratio", "0.5", "-o", "A/x/y"], "lies inside the input"),
    Case("tokens-into-input", ["tokens", "A", "--r", "2", "-o", "A/inner"], "lies inside the input"),
    Case("export-into-input", ["export", "A", "-o", "A/inner"], "lies inside the input"),
    Case("prune-onto-data", ["prune", "A", "--ratio", "0.5", "--data", "imgs.npz", "-o", "imgs.npz", "--overwrite"], "is the input"),
    Case("prune-around-input", ["prune", "sub/A", "--ratio", "0.5", "-o", "sub", "--overwrite"], "contains the input",
         lambda ws: shutil.copytree(ws / "A", ws / "sub" / "A")),
    Case("recipe-output-inside-model", ["run", "r.yaml"], "lies inside the input",
         write("r.yaml", "model: A\noutput: A/inner\nstages:\n  - prune: {ratio: 0.5}\n")),
    Case("recipe-output-is-model", ["run", "r.yaml", "--overwrite"], "is the input", write("r.yaml", "model: A\noutput: A\nstages:\n  - prune: {ratio: 0.5}\n")),
    Case("recipe-onto-itself", ["run", "recipe.yaml", "-o", "recipe.yaml", "--overwrite"], "is the input"),
    Case("output-dot", ["prune", "A", "--ratio", "0.5", "-o", "."], "not a new folder"),
    Case("output-empty", ["prune", "A", "--ratio", "0.5", "-o", ""], "not a new folder"),
    Case("output-dot-overwrite", ["prune", "A", "--ratio", "0.5", "-o", ".", "--overwrite"], "not a new folder"),
    Case("output-dotdot", ["prune", "A", "--ratio", "0.5", "-o", "..", "--overwrite"], "not a new folder"),
    Case("output-root", ["prune", "A", "--ratio", "0.5", "-o", "/", "--overwrite"], "not a new folder"),
    Case("run-output-dot", ["run", "recipe.yaml", "-o", "."], "not a new folder"),
    Case("output-under-a-file", ["prune", "A", "--ratio", "0.5", "-o", "note.txt/out"], "not a folder", write("note.txt", "hi")),
    Case("output-name-too-long", ["prune", "A", "--ratio", "0.5", "-o", "o" * 240], "longer than"),  # its temporary's is over 255
    Case("output-name-over-255", ["embed", "A", "--data", "imgs.npz", "-o", "o" * 300], "longer than"),
    Case("embed-output-name-too-long", ["embed", "A", "--data", "imgs.npz", "-o", "o" * 240], "longer than"),
    Case("output-folder-name-over-255", ["embed", "A", "--data", "imgs.npz", "-o", "d" * 300 + "/f"], "longer than"),
    Case("output-locked-by-live-writer", ["prune", "A", "--ratio", "0.5", "-o", "OUT"], "another mimc process", lock_held_by_live_process),
    # 4. Bad data -----------------------------------------------------------------------------------------
    Case("data-nan", ["prune", "A", "--ratio", "0.5", "--data", "x.npy", "-o", "OUT"], "x.npy holds 6144 NaN",
         npy("x.npy", np.full((2, 32, 32, 3), np.nan, np.float32))),
    Case("data-inf", ["prune", "A", "--ratio", "0.5", "--data", "x.npy", "-o", "OUT"], "holds 1 NaN or infinite",
         npy("x.npy", np.where(np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3) == 5, np.inf, 0.5).astype(np.float32))),
    Case("data-nan-npz", ["prune", "A", "--ratio", "0.5", "--data", "x.npz", "-o", "OUT"], "x.npz holds 3 NaN",
         lambda ws: np.savez(ws / "x.npz", images=np.where(np.arange(6144).reshape(2, 32, 32, 3) < 3, np.nan, 0.2))),
    Case("data-complex", ["prune", "A", "--ratio", "0.5", "--data", "x.npy", "-o", "OUT"], "complex",
         npy("x.npy", np.ones((2, 32, 32, 3), np.complex64))),
    Case("data-text", ["prune", "A", "--ratio", "0.5", "--data", "x.npy", "-o", "OUT"], "text", npy("x.npy", np.full((2, 32, 32, 3), "a"))),
    Case("data-pickle", ["prune", "A", "--ratio", "0.5", "--data", "obj.npy", "-o", "OUT"], "without pickle", pickled_images),
    Case("data-nan-quantize", ["quantize", "g.onnx", "--calib", "x.npy", "-o", "q.onnx"], "NaN",
         npy("x.npy", np.full((40, 32, 32, 3), np.nan, np.float32))),
    Case("data-nan-sparsify", ["sparsify", "A", "--method", "wanda", "--calib", "x.npy", "-o", "OUT"], "NaN",
         npy("x.npy", np.full((4, 32, 32, 3), np.nan, np.float32))),
]



# The second sweep: every command, every input family ------------------------------------------------
def files_entry(entry: dict):
    """A manifest listing a graph made from model.onnx whose file names ``entry`` (a victim beside A)."""
    def setup(ws):
        shutil.copy(ws / "g.onnx", ws / "A" / "model.onnx")
        (ws / "victim.txt").write_text("precious")
        _edit_json(ws / "A" / "mimc.json", lambda m: m["files"].update({"evil.onnx": {"source": "model.onnx", **entry}}))
    return setup


def enc(**fields):
    """A manifest whose encoder config says ``fields`` (the weights stay those of a 64-wide encoder)."""
    return manifest(lambda m: m["encoder"].update(fields))


def plain_onnx(name: str):
    """A valid ONNX graph that mimc did not write: no mimc metadata, an Identity."""
    def setup(ws):
        import onnx
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 32, 32])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])
        graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["y"])], "g", [x], [y])
        onnx.save(helper.make_model(graph), ws / name)
    return setup


def folder(name: str, files: dict[str, bytes] | None = None):
    def setup(ws):
        (ws / name).mkdir(parents=True, exist_ok=True)
        for fname, data in (files or {}).items():
            (ws / name / fname).write_bytes(data)
    return setup


def profile_yaml(text: str):
    return write("dev.yaml", text)


NOT_ONNX = write("bad.onnx", "this is not a protobuf " * 20)
TRUNCATED_ONNX = lambda ws: (ws / "bad.onnx").write_bytes((ws / "g.onnx").read_bytes()[:5000])  # noqa: E731
STRING_NPY = npy("x.npy", np.array("hello"))
EMPTY_NPY = npy("x.npy", np.zeros((0, 32, 32, 3), np.uint8))
PRUNE = ["prune", "A", "--ratio", "0.5", "-o", "OUT"]
LEARNED = ["sparsify", "A", "--method", "learned", "--data", "imgs.npz", "--steps", "2", "--batch-size", "4", "-o", "OUT"]
DISTILL = ["distill", "A", "--teacher", "B", "--data", "imgs.npz", "--steps", "2", "--batch-size", "4", "-o", "OUT"]
GOOD_DEVICE = ("name: dev\nbackend: onnxruntime-cpu\nprecisions: [fp32]\npeak_tflops: {fp32: 1.0}\n"
               "memory_bandwidth_gbs: 10\nmemory_gb: 8\n")

CASES += [
    # 5. Manifests whose encoder config lies about the weights -----------------------------------------
    Case("manifest-list-eval", ["eval", "A"], "not a mimc manifest", manifest(lambda m: [m])),
    Case("manifest-list-tokens", ["tokens", "A", "--r", "2", "-o", "OUT"], "not a mimc manifest", manifest(lambda m: [m])),
    Case("manifest-depth-text", ["inspect", "A"], "depth", enc(depth="six")),
    Case("manifest-depth-text-prune", PRUNE, "depth", enc(depth="six")),
    Case("manifest-dim-text", ["export", "A", "-o", "OUT"], "dim", enc(dim="64")),
    Case("manifest-dim-wider-than-weights", ["inspect", "A"], "weights", enc(dim=128, num_heads=4)),
    Case("manifest-dim-wider-prune", PRUNE, "weights", enc(dim=128)),
    Case("manifest-mlp-wider-than-weights", ["width", "A", "--mlp", "0.5", "-o", "OUT"], "weights", enc(mlp_dim=256)),
    Case("manifest-patch-zero", ["inspect", "A"], "patch_size", enc(patch_size=0)),
    Case("manifest-patch-zero-export", ["export", "A", "-o", "OUT"], "patch_size", enc(patch_size=0)),
    Case("manifest-heads-zero", ["inspect", "A"], "num_heads", enc(num_heads=0)),
    Case("manifest-heads-zero-sparsify", ["sparsify", "A", "-o", "OUT"], "num_heads", enc(num_heads=0)),
    Case("manifest-heads-not-dividing", ["tokens", "A", "--r", "2", "-o", "OUT"], "num_heads", enc(num_heads=5)),
    Case("manifest-image-size-30", ["export", "A", "-o", "OUT"], "image_size", enc(image_size=30)),
    Case("manifest-image-size-30-eval", ["eval", "A"], "image_size", enc(image_size=30)),
    Case("manifest-image-size-huge", ["inspect", "A"], "does not match its mimc.json", enc(image_size=10 ** 9)),
    Case("manifest-depth-negative", ["distill", "A", "--data", "imgs.npz", "--steps", "1", "-o", "OUT"], "depth", enc(depth=-1)),
    Case("manifest-depth-zero", ["inspect", "A"], "does not match its mimc.json", enc(depth=0)),
    Case("manifest-depth-more-than-weights", ["inspect", "A"], "does not match its mimc.json", enc(depth=6)),
    Case("manifest-unknown-pos-embed", ["inspect", "A"], "pos_embed", enc(pos_embed="evil")),
    Case("manifest-encoder-list", ["inspect", "A"], "encoder", manifest(lambda m: m.update(encoder=[1, 2]))),
    Case("manifest-mean-wrong-length", ["inspect", "A"], "image_mean", enc(image_mean=[0.5])),
    # export --overwrite removes the graphs made from model.onnx: it deleted ../victim.txt
    Case("manifest-files-outside", ["export", "A", "--overwrite"], "outside the artifact", files_entry({"file": "../victim.txt"})),
    Case("manifest-files-sidecar-absolute", ["export", "A", "--overwrite"], "outside the artifact", files_entry({"sidecar": "/tmp/x"})),
    Case("manifest-files-entry-list", ["inspect", "A"], "files", manifest(lambda m: m["files"].update({"x.onnx": [1]}))),
    Case("manifest-eps-text-export", ["export", "A", "-o", "OUT"], "norm_eps", enc(norm_eps="x")),
    Case("manifest-std-zero-eval", ["eval", "A", "--data", "imgs.npz"], "image_std", enc(image_std=[0, 0, 0])),
    Case("manifest-mlp-dims-negative", ["inspect", "A"], "block_mlp_dims", enc(block_mlp_dims=[-1] * 4)),
    Case("manifest-list-search", ["search", "A", "--blocks", "0.5", "--device", "cpu", "-o", "OUT"], "not a mimc manifest", manifest(lambda m: [m])),
    Case("manifest-heads-zero-run", ["run", "recipe.yaml", "-o", "OUT"], "num_heads", enc(num_heads=0)),
    # 6. Artifacts with a broken recipe ---------------------------------------------------------------
    Case("artifact-recipe-not-yaml", ["run", "A", "-o", "OUT"], "recipe", write("A/recipe.yaml", "stages: [\n")),
    Case("artifact-recipe-list", ["run", "A", "-o", "OUT"], "recipe", write("A/recipe.yaml", "- prune\n- width\n")),
    Case("artifact-recipe-binary", ["run", "A", "-o", "OUT"], "recipe", write("A/recipe.yaml", bytes(range(256)))),
    Case("run-folder-without-recipe", ["run", "B", "-o", "OUT"], "recipe"),
    Case("recipe-top-level-list", ["run", "r.yaml", "-o", "OUT"], "must be a mapping", write("r.yaml", "- model: A\n")),
    Case("recipe-empty", ["run", "r.yaml", "-o", "OUT"], "r.yaml", write("r.yaml", "")),
    Case("recipe-unknown-stage", ["run", "r.yaml", "-o", "OUT"], "evil", write("r.yaml", "model: A\nstages:\n  - evil: {}\n")),
    Case("recipe-stages-mapping", ["run", "r.yaml", "-o", "OUT"], "stages", write("r.yaml", "model: A\nstages: {prune: {}}\n")),
    Case("recipe-missing", ["run", "nope.yaml", "-o", "OUT"], "nope.yaml"),
    Case("recipe-bad-ratio", ["run", "r.yaml", "-o", "OUT"], "ratio", write("r.yaml", "model: A\nstages:\n  - prune: {ratio: 1.5}\n")),
    Case("recipe-data-missing", ["run", "recipe.yaml", "--data", "nope.npy", "-o", "OUT"], "nope.npy"),
    Case("recipe-model-missing", ["run", "r.yaml", "-o", "OUT"], "nosuch", write("r.yaml", "model: nosuch\nstages:\n  - prune: {ratio: 0.5}\n")),
    # 7. Batch sizes, counts and sizes that mean nothing ----------------------------------------------
    Case("prune-sensitivity-batch-0", ["prune", "A", "--ratio", "0.5", "--criterion", "sensitivity", "--data", "imgs.npz", "--batch-size", "0", "-o", "OUT"], "--batch-size"),
    Case("prune-sensitivity-batch-neg", ["prune", "A", "--ratio", "0.5", "--criterion", "sensitivity", "--data", "imgs.npz", "--batch-size", "-1", "-o", "OUT"], "--batch-size"),
    Case("prune-builtin-batch-neg", ["prune", "A", "--ratio", "0.5", "--data", "builtin", "--batch-size", "-1", "-o", "OUT"], "--batch-size"),
    Case("inspect-batch-0", ["inspect", "A", "--data", "imgs.npz", "--batch-size", "0", "--no-plot"], "--batch-size"),
    Case("inspect-batch-neg", ["inspect", "A", "--batch-size", "-1", "--no-plot"], "--batch-size"),
    Case("inspect-hist-bins-huge", ["inspect", "A", "--hist-bins", "2000000000", "--no-plot"], "--hist-bins"),
    Case("inspect-hist-bins-zero", ["inspect", "A", "--hist-bins", "0", "--no-plot"], "--hist-bins"),
    Case("prune-hist-bins-huge", ["prune", "A", "--ratio", "0.5", "--criterion", "entropy_hist", "--hist-bins", "2000000000", "-o", "OUT"], "--hist-bins"),
    Case("inspect-n-zero", ["inspect", "A", "--data", "imgs.npz", "--n", "0", "--no-plot"], "--n"),
    Case("inspect-n-negative", ["inspect", "A", "--data", "imgs.npz", "--n", "-3", "--no-plot"], "--n"),
    Case("inspect-dtype-unknown", ["inspect", "A", "--dtype", "fp8", "--no-plot"], "--dtype"),
    Case("prune-n-zero", ["prune", "A", "--ratio", "0.5", "--data", "imgs.npz", "--n", "0", "-o", "OUT"], "--n"),
    Case("eval-n-zero", ["eval", "A", "--data", "imgs.npz", "--n", "0"], "--n"),
    Case("eval-batch-0", ["eval", "A", "--data", "imgs.npz", "--batch-size", "0"], "--batch-size"),
    # a batch past 4096 (latency's and export's cap too): on a large source it filled memory before any work
    Case("eval-batch-huge", ["eval", "A", "--data", "imgs.npz", "--batch-size", "100000000"], "--batch-size must be in [1, 4096]"),
    Case("embed-batch-huge", ["embed", "A", "--data", "imgs.npz", "--batch-size", "100000000", "-o", "f.npy"], "--batch-size must be in [1, 4096]"),
    Case("inspect-batch-huge", ["inspect", "A", "--data", "imgs.npz", "--batch-size", "4097", "--no-plot"], "--batch-size must be in [1, 4096]"),
    Case("prune-sensitivity-batch-huge", ["prune", "A", "--ratio", "0.5", "--criterion", "sensitivity", "--data", "imgs.npz",
                                          "--batch-size", "100000000", "-o", "OUT"], "--batch-size must be in [1, 4096]"),
    Case("eval-seed-negative", ["eval", "A", "--data", "imgs.npz", "--n", "4", "--seed", "-1"], "--seed"),
    Case("quantize-n-zero", ["quantize", "g.onnx", "--calib", "imgs.npz", "--n", "0", "-o", "q.onnx"], "--n"),
    Case("width-n-zero", ["width", "A", "--mlp", "0.5", "--data", "imgs.npz", "--n", "0", "-o", "OUT"], "--n"),
    # 8. Options that would do nothing, and option checks before any work -----------------------------
    Case("width-round-to-removes-nothing", ["width", "A", "--mlp", "0.5", "--round-to", "999", "-o", "OUT"], "--round-to"),
    Case("width-round-to-zero", ["width", "A", "--mlp", "0.5", "--round-to", "0", "-o", "OUT"], "--round-to"),
    Case("width-mlp-zero", ["width", "A", "--mlp", "0", "-o", "OUT"], "--mlp"),
    Case("width-mlp-nan", ["width", "A", "--mlp", "nan", "-o", "OUT"], "--mlp"),
    Case("width-heads-too-many", ["width", "A", "--heads", "1.5", "-o", "OUT"], "--heads"),
    Case("width-criterion-unknown", ["width", "A", "--mlp", "0.5", "--criterion", "evil", "-o", "OUT"], "--criterion"),
    Case("width-nothing-asked", ["width", "A", "-o", "OUT"], "--mlp"),
    Case("tokens-r-negative", ["tokens", "A", "--r", "-1", "-o", "OUT"], "--r"),
    Case("tokens-method-unknown", ["tokens", "A", "--r", "2", "--method", "evil", "-o", "OUT"], "--method"),
    Case("tokens-at-out-of-range", ["tokens", "A", "--r", "2", "--at", "99", "-o", "OUT"], "--at"),
    Case("prune-ratio-nan", ["prune", "A", "--ratio", "nan", "-o", "OUT"], "--ratio"),
    Case("prune-keep-zero", ["prune", "A", "--keep", "0", "-o", "OUT"], "--keep"),
    Case("prune-blocks-out-of-range", ["prune", "A", "--blocks", "7", "-o", "OUT"], "--blocks"),
    Case("prune-blocks-text", ["prune", "A", "--blocks", "a,b", "-o", "OUT"], "--blocks"),
    Case("prune-criterion-unknown", ["prune", "A", "--ratio", "0.5", "--criterion", "evil", "-o", "OUT"], "--criterion"),
    Case("sparsify-lr-negative-before-data", ["sparsify", "A", "--method", "learned", "--lr", "-1", "--data", "nope.npy", "-o", "OUT"], "--lr"),
    Case("sparsify-steps-zero", LEARNED[:6] + ["--steps", "0", "-o", "OUT"], "--steps"),
    Case("sparsify-batch-zero", LEARNED[:8] + ["--batch-size", "0", "-o", "OUT"], "--batch-size"),
    Case("sparsify-mask-ratio-one", LEARNED + ["--mask-ratio", "1"], "--mask-ratio"),
    Case("sparsify-rsq-with-a-magnitude-prior", LEARNED + ["--prior", "magnitude", "--weighting", "rsq"], "--weighting rsq weights"),
    Case("sparsify-pattern-5of4", ["sparsify", "A", "--pattern", "5:4", "-o", "OUT"], "--pattern"),
    Case("sparsify-method-unknown", ["sparsify", "A", "--method", "evil", "-o", "OUT"], "--method"),
    Case("sparsify-n-calib-zero", ["sparsify", "A", "--method", "wanda", "--calib", "imgs.npz", "--n-calib", "0", "-o", "OUT"], "--n-calib"),
    Case("sparsify-checkpoint-every-zero", LEARNED + ["--checkpoint-every", "0"], "--checkpoint-every"),
    Case("sparsify-calib-nan-names-calib", ["sparsify", "A", "--method", "wanda", "--calib", "x.npy", "-o", "OUT"], "--calib",
         npy("x.npy", np.full((4, 32, 32, 3), np.nan, np.float32))),
    Case("sparsify-calib-missing", ["sparsify", "A", "--method", "wanda", "--calib", "nope.npy", "-o", "OUT"], "nope.npy"),
    Case("distill-steps-zero", DISTILL[:6] + ["--steps", "0", "-o", "OUT"], "--steps"),
    Case("distill-lr-negative-before-data", ["distill", "A", "--data", "nope.npy", "--lr", "-1", "-o", "OUT"], "--lr"),
    Case("distill-batch-zero", DISTILL[:8] + ["--batch-size", "0", "-o", "OUT"], "--batch-size"),
    Case("distill-hidden-weight-negative", DISTILL + ["--hidden-weight", "-1"], "--hidden-weight"),
    Case("distill-teacher-missing", ["distill", "A", "--teacher", "nosuch", "--data", "imgs.npz", "-o", "OUT"], "nosuch"),
    Case("distill-no-data", ["distill", "A", "--teacher", "B", "--data", "empty", "-o", "OUT"], "empty", folder("empty")),
    # 9. Data files and folders ---------------------------------------------------------------------
    Case("data-string-npy", PRUNE + ["--data", "x.npy"], "x.npy", STRING_NPY),
    Case("data-string-npy-inspect", ["inspect", "A", "--data", "x.npy", "--no-plot"], "x.npy", STRING_NPY),
    Case("data-zero-size-npy", PRUNE + ["--data", "x.npy"], "x.npy", EMPTY_NPY),
    Case("data-zero-size-npy-eval", ["eval", "A", "--data", "x.npy"], "x.npy", EMPTY_NPY),
    Case("data-zero-size-quantize", ["quantize", "g.onnx", "--calib", "x.npy", "-o", "q.onnx"], "x.npy", EMPTY_NPY),
    Case("data-scalar-npy", PRUNE + ["--data", "x.npy"], "x.npy", npy("x.npy", np.array(3.0))),
    Case("data-wrong-rank", PRUNE + ["--data", "x.npy"], "not a batch of images", npy("x.npy", np.zeros((2, 5), np.uint8))),
    Case("data-seven-channels", PRUNE + ["--data", "x.npy"], "7 channels", npy("x.npy", np.zeros((2, 32, 32, 7), np.uint8))),
    Case("data-npy-truncated", PRUNE + ["--data", "x.npy"], "x.npy",
         both(npy("x.npy", np.zeros((4, 32, 32, 3), np.uint8)), truncate("x.npy", 500))),
    Case("data-npy-not-npy", PRUNE + ["--data", "x.npy"], "x.npy", write("x.npy", "hello\n")),
    Case("data-npz-without-images", PRUNE + ["--data", "x.npz"], "images", lambda ws: np.savez(ws / "x.npz", pixels=np.zeros((2, 32, 32, 3)))),
    Case("data-npz-without-images-eval", ["eval", "A", "--data", "x.npz"], "images", lambda ws: np.savez(ws / "x.npz", pixels=np.zeros((2, 32, 32, 3)))),
    Case("data-npz-corrupt", PRUNE + ["--data", "x.npz"], "x.npz", write("x.npz", b"PK\x03\x04garbage")),
    Case("data-missing", PRUNE + ["--data", "nope.npy"], "nope.npy"),
    Case("data-missing-inspect", ["inspect", "A", "--data", "nope", "--no-plot"], "nope"),
    Case("data-missing-width", ["width", "A", "--mlp", "0.5", "--data", "nope", "-o", "OUT"], "nope"),
    Case("data-missing-quantize", ["quantize", "g.onnx", "--calib", "nope.npz", "-o", "q.onnx"], "nope.npz"),
    Case("data-missing-search", ["search", "A", "--blocks", "0.5", "--device", "cpu", "--data", "nope.npz", "-o", "OUT"], "nope.npz"),
    Case("data-empty-folder", PRUNE + ["--data", "empty"], "empty", folder("empty")),
    Case("data-empty-folder-eval", ["eval", "A", "--data", "empty"], "empty", folder("empty")),
    Case("data-folder-of-text", PRUNE + ["--data", "txt"], "txt", folder("txt", {"a.txt": b"hi", "b.md": b"# no"})),
    Case("data-corrupt-png", PRUNE + ["--data", "imgs"], "bad.png", folder("imgs", {"bad.png": b"\x89PNG\r\n\x1a\nnot really"})),
    Case("data-not-a-data-file", PRUNE + ["--data", "recipe.yaml"], "recipe.yaml"),
    # 10. Graphs that are not (mimc) ONNX -------------------------------------------------------------
    Case("quantize-not-onnx", ["quantize", "bad.onnx", "--calib", "imgs.npz", "-o", "q.onnx"], "bad.onnx", NOT_ONNX),
    Case("quantize-truncated-onnx", ["quantize", "bad.onnx", "--calib", "imgs.npz", "-o", "q.onnx"], "bad.onnx", TRUNCATED_ONNX),
    Case("quantize-foreign-onnx", ["quantize", "plain.onnx", "--calib", "imgs.npz", "-o", "q.onnx"], "plain.onnx", plain_onnx("plain.onnx")),
    Case("quantize-missing-graph", ["quantize", "nope.onnx", "--calib", "imgs.npz", "-o", "q.onnx"], "nope.onnx"),
    Case("quantize-method-unknown", ["quantize", "g.onnx", "--calib", "imgs.npz", "--method", "evil", "-o", "q.onnx"], "--method"),
    Case("quantize-percentile-200", ["quantize", "g.onnx", "--calib", "imgs.npz", "--method", "percentile", "--percentile", "200", "-o", "q.onnx"], "--percentile"),
    Case("quantize-device-unknown", ["quantize", "g.onnx", "--calib", "imgs.npz", "--device", "nosuch", "-o", "q.onnx"], "nosuch"),
    Case("eval-not-onnx", ["eval", "bad.onnx", "--data", "imgs.npz"], "bad.onnx", NOT_ONNX),
    Case("eval-truncated-onnx", ["eval", "bad.onnx", "--data", "imgs.npz"], "bad.onnx", TRUNCATED_ONNX),
    Case("eval-foreign-onnx", ["eval", "plain.onnx", "--data", "imgs.npz"], "plain.onnx", plain_onnx("plain.onnx")),
    Case("eval-ref-missing", ["eval", "A", "--ref", "nosuch", "--data", "imgs.npz"], "nosuch"),
    Case("profile-not-onnx", ["profile", "bad.onnx", "--iters", "1"], "bad.onnx", NOT_ONNX),
    Case("profile-truncated-onnx", ["profile", "bad.onnx", "--iters", "1"], "bad.onnx", TRUNCATED_ONNX),
    Case("profile-missing-graph", ["profile", "nope.onnx"], "nope.onnx"),
    Case("profile-not-a-graph", ["profile", "recipe.yaml"], "recipe.yaml"),
    # 11. Device profiles and batch lists ---------------------------------------------------------------
    Case("profile-device-unknown", ["profile", "g.onnx", "--device", "nosuch"], "nosuch"),
    Case("profile-device-negative-bandwidth", ["profile", "g.onnx", "--device", "dev.yaml", "--predict"], "bandwidth",
         profile_yaml(GOOD_DEVICE.replace("10", "-10"))),
    Case("profile-device-list", ["profile", "g.onnx", "--device", "dev.yaml", "--predict"], "dev.yaml", profile_yaml("- a\n- b\n")),
    Case("profile-device-not-yaml", ["profile", "g.onnx", "--device", "dev.yaml", "--predict"], "dev.yaml", profile_yaml("a: [\n")),
    Case("profile-device-alias", ["profile", "g.onnx", "--device", "dev.yaml", "--predict"], "anchors and aliases",
         profile_yaml(GOOD_DEVICE.replace("name: dev", "name: &n dev\ndescription: *n"))),
    Case("profile-batch-text", ["profile", "g.onnx", "--batch", "a"], "--batch"),
    Case("profile-batch-zero", ["profile", "g.onnx", "--batch", "0", "--predict"], "--batch"),
    Case("profile-batch-negative", ["profile", "g.onnx", "--batch", "1,-4", "--predict"], "--batch"),
    Case("profile-batch-huge", ["profile", "g.onnx", "--batch", "100000000", "--iters", "1"], "--batch"),
    Case("profile-iters-zero", ["profile", "g.onnx", "--iters", "0"], "--iters"),
    Case("profile-warmup-negative", ["profile", "g.onnx", "--warmup", "-1"], "--warmup"),
    Case("profile-threads-zero", ["profile", "g.onnx", "--threads", "0"], "--threads"),
    Case("profiles-unknown", ["profiles", "nosuch"], "nosuch"),
    Case("profiles-negative-bandwidth", ["profiles", "dev.yaml"], "bandwidth", profile_yaml(GOOD_DEVICE.replace("10", "-10"))),
    Case("profiles-list-yaml", ["profiles", "dev.yaml"], "dev.yaml", profile_yaml("[1, 2]\n")),
    Case("export-batch-text", ["export", "A", "--batch", "x", "-o", "OUT"], "--batch"),
    Case("export-batch-zero", ["export", "A", "--batch", "0", "-o", "OUT"], "--batch"),
    Case("export-opset-ancient", ["export", "A", "--opset", "1", "-o", "OUT"], "--opset"),
    Case("export-exporter-unknown", ["export", "A", "--exporter", "evil", "-o", "OUT"], "--exporter"),
    Case("build-batch-text", ["build", "g.onnx", "--device", "h100", "--batch", "x"], "--batch"),
    Case("build-batch-reversed", ["build", "g.onnx", "--device", "h100", "--batch", "8:4:1"], "--batch"),
    Case("build-device-unknown", ["build", "g.onnx", "--device", "nosuch"], "nosuch"),
    Case("build-device-cpu", ["build", "g.onnx", "--device", "cpu"], "cpu"),
    Case("build-not-onnx", ["build", "bad.onnx", "--device", "h100"], "bad.onnx", NOT_ONNX),
    Case("build-workspace-negative", ["build", "g.onnx", "--device", "h100", "--workspace-gb", "-1"], "--workspace-gb"),
    Case("search-device-unknown", ["search", "A", "--blocks", "0.5", "--device", "nosuch", "-o", "OUT"], "nosuch"),
    Case("search-min-cosine-2", ["search", "A", "--blocks", "0.5", "--device", "cpu", "--min-cosine", "2", "-o", "OUT"], "--min-cosine"),
    Case("search-budget-negative", ["search", "A", "--blocks", "0.5", "--device", "cpu", "--budget-ms", "-1", "-o", "OUT"], "--budget-ms"),
    Case("search-precision-unknown", ["search", "A", "--blocks", "0.5", "--device", "cpu", "--precisions", "int3", "-o", "OUT"], "--precisions"),
    Case("search-blocks-text", ["search", "A", "--blocks", "x", "--device", "cpu", "-o", "OUT"], "--blocks"),
    Case("search-device-bad-yaml", ["search", "A", "--blocks", "0.5", "--device", "dev.yaml", "-o", "OUT"], "dev.yaml", profile_yaml("- 1\n")),
]


EMBED = ["embed", "A", "--data", "imgs.npz"]
CASES += [
    # 9. embed: outputs onto inputs or taken, graphs it cannot run, data it cannot read ------------------
    Case("embed-output-is-the-data", ["embed", "A", "--data", "x.npy", "-o", "x.npy"], "is the input",
         npy("x.npy", np.zeros((2, 32, 32, 3), np.uint8))),
    Case("embed-index-is-the-data", ["embed", "A", "--data", "x.json", "-o", "x.npy"], "x.json is the input", write("x.json", "{}")),
    Case("embed-output-inside-the-data", ["embed", "A", "--data", "imgs", "-o", "imgs/f.npy"], "lies inside the input",
         folder("imgs", {"a.png": b"x"})),
    Case("embed-output-taken", [*EMBED, "-o", "f.npy"], "already exists", write("f.npy", "mine")),
    Case("embed-index-taken", [*EMBED, "-o", "f.npy"], "f.json already exists", write("f.json", "mine")),
    Case("embed-output-suffix", [*EMBED, "-o", "f.csv"], "must end in .npy"),
    Case("embed-output-folder-missing", [*EMBED, "-o", "nowhere/f.npy"], "does not exist"),
    Case("embed-output-is-a-folder", [*EMBED, "-o", "B.npy"], "is a folder", folder("B.npy")),
    Case("embed-not-onnx", ["embed", "bad.onnx", "--data", "imgs.npz", "-o", "f.npy"], "bad.onnx", NOT_ONNX),
    Case("embed-truncated-onnx", ["embed", "A/bad.onnx", "--data", "imgs.npz", "-o", "f.npy"], "bad.onnx",
         lambda ws: (ws / "A" / "bad.onnx").write_bytes((ws / "g.onnx").read_bytes()[:5000])),
    Case("embed-onnx-not-from-mimc", ["embed", "g.onnx", "--data", "imgs.npz", "-o", "f.npy"], "not written by mimc"),
    Case("embed-engine-without-sidecar", ["embed", "A/e.plan", "--data", "imgs.npz", "-o", "f.npy"], "no sidecar",
         both(write("A/e.plan", "x"), manifest(lambda m: m["files"].update({"e.plan": {"file": "e.plan", "sha256": hashlib.sha256(b"x").hexdigest()}})))),
    Case("embed-engine-on-cpu", ["embed", "A/e.plan", "--data", "imgs.npz", "--device", "cpu", "-o", "f.npy"], "--device cpu cannot run"),
    Case("embed-ir-on-cuda", ["embed", "A/m.xml", "--data", "imgs.npz", "--device", "cuda", "-o", "f.npy"], "--device cuda"),
    Case("embed-device-unknown", [*EMBED, "--device", "tpu", "-o", "f.npy"], "--device"),
    Case("embed-threads-zero", [*EMBED, "--threads", "0", "-o", "f.npy"], "--threads"),
    Case("embed-workers-negative", [*EMBED, "--workers", "-2", "-o", "f.npy"], "--workers"),
    Case("embed-batch-zero", [*EMBED, "--batch-size", "0", "-o", "f.npy"], "--batch-size"),
    Case("embed-n-zero", [*EMBED, "--n", "0", "-o", "f.npy"], "--n"),
    Case("embed-data-missing", ["embed", "A", "--data", "nope", "-o", "f.npy"], "nope"),
    Case("embed-data-nan", ["embed", "A", "--data", "x.npy", "-o", "f.npy"], "NaN", npy("x.npy", np.full((2, 32, 32, 3), np.nan, np.float32))),
    Case("embed-corrupt-image", ["embed", "A", "--data", "imgs", "-o", "f.npy"], "b.png", folder("imgs", {"b.png": b"\x89PNG no"})),
    Case("embed-shards-missing", ["embed", "A", "--data", "train-{000..002}.tar", "-o", "f.npy"], "train-"),
    Case("embed-manifest-lies", [*EMBED, "-o", "f.npy"], "weights", enc(dim=128, num_heads=4)),
    Case("embed-hf-remote-code", ["embed", "hf", "--data", "imgs.npz", "-o", "f.npy"], "auto_map", input="y\n"),
]

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_in_one_line_and_changes_nothing(ws, template, case):
    if case.setup is not None:
        case.setup(ws)
    before = snapshot(ws)
    result = CliRunner().invoke(app, case.argv, input=case.input)
    assert result.exit_code == case.code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert case.match in lines[0], lines[0]
    assert len(lines[0]) < 400, "an error line never echoes an unbounded value"
    assert "Traceback" not in result.output and "[y/N]" not in result.output
    assert result.stdout == ""
    assert snapshot(ws) == before, "the command wrote or changed something"
    assert not (template / "MARKER").exists() and not (ws / "MARKER").exists(), "hostile code ran"


def test_json_errors_are_json_on_stdout(ws):
    result = CliRunner().invoke(app, ["prune", "A", "--ratio", "2", "-o", "OUT", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": "--ratio must be in (0, 1), got 2.0", "exit_code": 2}
    assert not (ws / "OUT").exists()


# Outputs: races, leftovers, permissions ------------------------------------------------------------------
def _write_out(args):
    folder, out, barrier = args
    import time

    from mimc.atomic import atomic_dir

    os.chdir(folder)
    barrier.wait(timeout=60)  # both start writing the same output at once
    try:
        with atomic_dir(out) as tmp:
            (tmp / "who").write_text(str(os.getpid()))
            time.sleep(1.0)  # still writing when the other one arrives
    except Exception as exc:  # noqa: BLE001 - the loser's refusal is the point
        return f"refused: {type(exc).__name__}: {exc}"
    return "wrote"


def test_two_processes_racing_for_one_output_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.map(_write_out, [(str(tmp_path), "C", barrier)] * 2, chunksize=1)
    assert sorted(r.split(":")[0] for r in results) == ["refused", "wrote"], results
    assert "BadInputError" in next(r for r in results if r.startswith("refused"))
    assert [p.name for p in tmp_path.iterdir()] == ["C"]  # no temporary or lock left behind
    assert (tmp_path / "C" / "who").is_file()


def test_the_final_rename_never_replaces(tmp_path):
    """Even past the lock (another host on a shared folder), taking the name is no-replace."""
    from mimc.atomic import _place
    from mimc.errors import BadInputError

    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "first").write_text("1")
    tmp = tmp_path / "t"
    tmp.mkdir()
    with pytest.raises(BadInputError, match="written by another process"):
        _place(tmp, tmp_path / "C", overwrite=False)
    assert (tmp_path / "C" / "first").is_file()
    from mimc.atomic import _rename_noreplace

    (tmp_path / "f").write_text("x")
    (tmp_path / "g").write_text("y")
    with pytest.raises(FileExistsError):
        _rename_noreplace(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_text() == "y"


def test_two_cli_runs_racing_for_one_output(ws):
    """Two real `mimc prune` processes writing the same -o: one says wrote, the other exits 2."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "mimc", "prune", "A", "--ratio", "0.5", "-o", "C"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes in ([0, 2], [0, 0]), outs  # [0, 0]: the second started after the first had finished...
    if codes == [0, 0]:
        pytest.skip("the two processes did not overlap on this machine")
    loser = next(err for code, _, err in outs if code == 2)
    assert len(loser.strip().splitlines()) == 1 and loser.startswith("error:"), loser
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("argv, lock", [
    (["export", "A"], "A/.model.onnx.lock"),
    (["quantize", "g.onnx", "--calib", "imgs.npz", "--n", "4", "-o", "q.onnx"], ".q.onnx.lock"),
])
def test_a_graph_another_process_is_writing_is_refused(ws, argv, lock):
    """Two `mimc export A` (--batch 1 and --batch 2) at once both exited 0, and A/mimc.json recorded one
    graph while model.onnx was the other's: A then refused as 'altered or swapped'. A graph's writer now
    claims it, as a folder's does (pid 1: a process that is alive)."""
    (ws / lock).write_text("1")
    before = snapshot(ws)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: another mimc process (pid 1) is writing") and len(result.stderr.splitlines()) == 1
    assert snapshot(ws) == before


def test_killed_writers_temps_are_swept_on_the_next_write(tmp_path):
    from mimc.atomic import atomic_dir

    dead = 2 ** 22 + 12345  # beyond pid_max on common systems: never alive
    stale = tmp_path / f".out.{dead}.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.{dead}.xyz.old").mkdir()
    (tmp_path / ".out.lock").write_text(str(dead))
    live = tmp_path / f".out.{os.getpid()}.live.tmp"  # a live writer's temp is left alone
    live.mkdir()
    other = tmp_path / f".other.{dead}.abc.tmp"  # another output's temp: not this write's business
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])


def test_what_a_killed_prune_leaves_is_swept_by_the_next_one(ws, monkeypatch):
    """Everything beside OUT while its weights are written is a temporary or lock of OUT, which the next
    write of OUT sweeps once the writer is gone: the weights were written into a temporary of the
    temporary (``..OUT.<pid>.<r>.tmp.<pid>.<r>.tmp``, the model's size), which a SIGKILL left for good."""
    import re

    import safetensors.torch

    save_file, seen = safetensors.torch.save_file, []

    def spying(*args, **kwargs):
        seen.extend(p.name for p in ws.iterdir() if p.name.startswith("."))
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", spying)
    result = CliRunner().invoke(app, ["prune", "A", "--ratio", "0.5", "-o", "OUT"])
    assert result.exit_code == 0, result.output
    assert seen and all(re.fullmatch(r"\.OUT(\.\d+\.[^.]+\.tmp|\.lock)", name) for name in seen), seen


def _full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("argv, patched, fail, shown", [
    (["prune", "A", "--ratio", "0.5", "-o", "OUT"], "safetensors.torch.save_file", _full_safetensors, "OUT"),
    (["export", "A"], "mimc.deploy.onnx.save_graph", _full, "A/model.onnx"),
    (["export", "A", "-o", "OUT"], "mimc.deploy.onnx.save_graph", _full, "OUT/model.onnx"),
    (["quantize", "g.onnx", "--calib", "imgs.npz", "--n", "4", "-o", "q.onnx"], "mimc.quant.quantize.save_graph", _full, "q.onnx"),
    (["profile", "g.onnx", "--device", "h100", "--predict", "-o", "p.json"], "mimc.atomic.default_mode", _full, "p.json"),
])
def test_a_disk_that_fills_is_one_line_and_leaves_nothing(ws, monkeypatch, argv, patched, fail, shown):
    """No space left on device while an output is written: a traceback (OSError, safetensors' own
    error) instead of one line naming the output, where it goes rather than its temporary name."""
    monkeypatch.setattr(patched, fail)
    before = snapshot(ws)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: cannot write {shown} (No space left on device): free space there or choose another --output"], result.stderr
    assert snapshot(ws) == before


def test_outputs_have_plain_permissions(tmp_path):
    from mimc.artifact import MANIFEST_NAME, WEIGHTS_NAME

    save_artifact(build_encoder(tiny_config(), seed=0), tmp_path / "a")
    umask = os.umask(0)
    os.umask(umask)
    for name in (WEIGHTS_NAME, MANIFEST_NAME):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused_before_any_work(ws):
    (ws / "ro").mkdir()
    (ws / "ro").chmod(0o555)
    try:
        result = CliRunner().invoke(app, ["prune", "A", "--ratio", "0.5", "-o", "ro/out"])
        assert result.exit_code == 2 and "not writable" in result.stderr
    finally:
        (ws / "ro").chmod(0o755)


def test_unwritable_output_folder_is_refused_library(tmp_path, monkeypatch):
    from mimc.atomic import check_output
    from mimc.errors import BadInputError

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(BadInputError, match="not writable"):
        check_output(tmp_path / "new" / "out")


@pytest.mark.parametrize("argv, shown", [
    (["export", "A"], "A/model.onnx"),
    (["quantize", "A", "--calib", "imgs.npz", "--n", "4"], "A/model.int8.onnx"),
    (["build", "g.onnx", "--device", "openvino-cpu", "-o", "ro/m.xml"], "ro/m.xml"),  # a plain folder: not into an artifact
])
def test_an_unwritable_artifact_is_refused_before_any_work(ws, monkeypatch, argv, shown):
    """Into an artifact this user cannot write (a read-only mount), export, quantize and build did all
    their work (a TensorRT build: minutes) and only then failed to write, where -o folders are refused first."""
    if argv[0] == "build":
        pytest.importorskip("openvino")
        (ws / "ro").mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name not in ("A", "ro") and access(path, mode))
    before = snapshot(ws)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot write {shown}: ") and "is not writable" in result.stderr, result.stderr
    assert snapshot(ws) == before


def test_a_legitimate_rewrite_keeps_the_hash_valid(ws):
    """Flows that add files to an artifact (export into it) keep it loadable: its weights untouched."""
    from mimc.models.io import load_artifact

    result = CliRunner().invoke(app, ["export", "A"])
    assert result.exit_code == 0, result.output
    load_artifact(ws / "A")


# Conventions --------------------------------------------------------------------------------------------
def test_results_go_to_stdout_and_tables_are_not_cut_when_piped():
    result = CliRunner().invoke(app, ["profiles"])
    assert result.exit_code == 0
    h100 = [ln for ln in result.stdout.splitlines() if "h100" in ln]
    assert h100 and "…" not in h100[0], result.stdout


def test_no_emoji_from_option_values(ws):
    result = CliRunner().invoke(app, ["sparsify", "A", "--pattern", "2:4x", "-o", "OUT"])
    assert result.exit_code == 2
    assert "2:4x" in result.stderr and "Ⓜ" not in result.output


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    from PIL import Image

    from mimc.data import load_images

    cfg = tiny_config()
    grey16 = np.full((32, 32), 32768, np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    pixels = load_images(tmp_path, cfg).pixels
    mean, std = np.asarray(cfg.image_mean), np.asarray(cfg.image_std)
    raw = pixels[0, :, 0, 0].numpy() * std + mean
    assert np.allclose(raw, 128 / 255, atol=1 / 255), raw


def test_usage_errors_are_one_line_and_json_on_stdout(ws):
    """Typer/click's own errors (an unknown flag, a bad number) keep the same promise."""
    for argv in (["prune", "A", "--nosuch", "--json"], ["inspect", "A", "--n", "abc", "--json"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        body = json.loads(result.stdout)
        assert body["exit_code"] == 2 and body["error"] in lines[0]
    assert snapshot(ws) == snapshot(ws)


def test_eval_notes_go_to_stderr(ws):
    result = CliRunner().invoke(app, ["eval", "A", "--data", "imgs.npz"])
    assert result.exit_code == 0, result.output
    assert "note:" not in result.stdout and "note:" in result.stderr


def test_ctrl_c_while_typer_builds_the_commands_is_one_line(monkeypatch, capsys):
    """After the modules import, typer builds every command (reading their type hints) before one runs:
    a SIGINT there (the delay-3.0 case below, on a loaded machine) was a KeyboardInterrupt traceback."""
    import typer.main

    from mimc.cli.app import main

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.main, "get_command", interrupt)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.6, 1.5, 3.0])
def test_ctrl_c_at_any_moment_exits_130_and_writes_nothing(ws, delay):
    """SIGINT while Python starts, while the command modules import, while torch loads, while it works."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    before = snapshot(ws)
    proc = subprocess.Popen([sys.executable, "-m", "mimc", "prune", "A", "--ratio", "0.5", "--data", "imgs.npz", "-o", "OUT"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 or "wrote OUT" in out:
        # the work was done (the artifact written whole, atomically) before the signal landed, on
        # this machine at this delay: the signal only interrupted the interpreter's exit
        pytest.skip("the command finished before the signal on this machine")
    # -SIGINT: killed before Python installed its handler, which a shell reports as 130 as well
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) <= 1, err
    assert out == ""
    assert snapshot(ws) == before, "an interrupted command wrote something"


def test_sigterm_mid_write_leaves_the_way_ctrl_c_does(ws):
    """kill, timeout, a scheduler or torchrun stopping the other ranks send SIGTERM: it ended the process where it stood,
    its temporaries and output lock left behind (until the next write of that output swept them)."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    before = snapshot(ws)
    proc = subprocess.Popen([sys.executable, "-m", "mimc", "embed", "ref", "--data", "builtin", "-o", "f.npy", "--workers", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120

    def writing():  # the first batch's rows are in the temporary: mid-write, past the decoding worker's start
        return any(p.stat().st_size > 4096 for p in ws.glob(".f.npy.*.tmp"))

    while not writing() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writing(), "the features were never being written"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == "interrupted" and out == "", (proc.returncode, err)
    assert snapshot(ws) == before, "a terminated command left something behind"
