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


def manifest(fn):
    return lambda ws: _edit_json(ws / "A" / "mimc.json", fn)


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
    _edit_json(ws / "A" / "mimc.json", lambda m: m.update(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))


def legacy_pickled_optimizer(ws):
    import torch

    ck = ws / "run" / "checkpoint"
    (ck / "optimizer.safetensors").unlink()
    (ck / "optimizer.json").unlink()
    torch.save({"state": {}, "param_groups": [], "x": _WritesMarker(str(ws.parent.parent / "MARKER"))}, ck / "optimizer.pt")


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
    Case("artifact-unknown-key", ["inspect", "A"], "not a mimc manifest", manifest(lambda m: m.update(evil=1))),
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
    # 2. Outputs ---------------------------------------------------------------------------------------
    Case("profile-onto-its-graph", ["profile", "g.onnx", "-o", "g.onnx", "--iters", "1", "--warmup", "0"], "is the input"),
    Case("quantize-onto-its-graph", ["quantize", "g.onnx", "--calib", "imgs.npz", "-o", "g.onnx"], "is the input"),
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

    from mimc.artifact import atomic_dir

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
    from mimc.artifact import _place
    from mimc.errors import BadInputError

    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "first").write_text("1")
    tmp = tmp_path / "t"
    tmp.mkdir()
    with pytest.raises(BadInputError, match="written by another process"):
        _place(tmp, tmp_path / "C", overwrite=False)
    assert (tmp_path / "C" / "first").is_file()
    from mimc.artifact import _rename_noreplace

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


def test_killed_writers_temps_are_swept_on_the_next_write(tmp_path):
    from mimc.artifact import atomic_dir

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
    from mimc.artifact import check_output
    from mimc.errors import BadInputError

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(BadInputError, match="not writable"):
        check_output(tmp_path / "new" / "out")


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
