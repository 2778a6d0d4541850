"""`mimc sparsify` and `mimc distill`: results on disk, resume, and bad input (exit 2, nothing written or lost)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mimc.artifact import read_manifest, save_artifact
from mimc.models.io import load_artifact
from mimc.cli.app import app
from mimc.compression.blocks import remove_blocks
from mimc.models.nm_pattern import check_nm
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config

runner = CliRunner()




@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dense = build_encoder(tiny_config(depth=2), seed=0)
    save_artifact(dense, tmp_path / "dense")
    save_artifact(build_encoder(tiny_config(depth=2), seed=9), tmp_path / "other")
    save_artifact(remove_blocks(dense, [1]), tmp_path / "half")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", images=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8))
    return tmp_path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_sparsify_one_shot_writes_an_exact_nm_artifact(work):
    res = invoke("sparsify", "dense", "--pattern", "2:4", "--method", "sparsegpt", "--calib", "imgs.npz", "-o", "sp", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["method"] == "sparsegpt" and out["metrics"]["n_calib"] == 12
    enc = load_artifact(work / "sp")
    assert enc.config.nm_pattern == "2:4"
    check_nm(enc)
    stage = read_manifest(work / "sp").stages[-1]
    assert stage.name == "sparsify" and stage.config["method"] == "sparsegpt"


def interrupted(monkeypatch, at_step: int, *args: str):
    """Run ``mimc *args`` killed (Ctrl-C) at step ``at_step``, as a user would stop it; its result."""
    import mimc.train as train_pkg  # the CLI builds its TrainRun from here

    real = train_pkg.TrainRun

    def interrupting(**kw):
        run = real(**kw)
        run.on_step = lambda step, loss: (_ for _ in ()).throw(KeyboardInterrupt) if step == at_step else None
        return run

    monkeypatch.setattr(train_pkg, "TrainRun", interrupting)
    try:
        return invoke(*args)
    finally:
        monkeypatch.setattr(train_pkg, "TrainRun", real)


def test_sparsify_learned_resume_after_interruption(work, monkeypatch):
    args = ["sparsify", "dense", "--method", "learned", "--data", "imgs.npz", "--steps", "4", "--batch-size", "4",
            "--prior", "magnitude", "--checkpoint-every", "2"]
    assert invoke(*args, "-o", "full").exit_code == 0

    res = interrupted(monkeypatch, 3, *args, "-o", "cut")  # killed right after its step-3 checkpoint window
    assert res.exit_code == 130
    assert (work / "cut" / "checkpoint").is_dir() and not (work / "cut" / "mimc.json").exists()
    again = invoke(*args, "-o", "cut")  # without --resume: refused, the checkpoint kept
    assert again.exit_code == 2 and "--resume cut" in again.output
    res = invoke("sparsify", "dense", "--data", "imgs.npz", "--resume", "cut", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["resumed_from"] == 2
    full, cut = load_artifact(work / "full"), load_artifact(work / "cut")
    for (k, a), b in zip(full.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("args,message", [
    (["--pattern", "2:7"], "M=7 does not divide in_features=64 of blocks.0.attn.qkv"),
    (["--pattern", "4:4"], "N must be smaller than M"),
    (["--method", "wanda"], "give --calib or --data"),
    (["--method", "learned"], "give --calib or --data"),
    (["--method", "random"], "unknown --method 'random'"),
])
def test_sparsify_bad_input(work, args, message):
    res = invoke("sparsify", "dense", *args, "-o", "bad")
    assert res.exit_code == 2 and message in " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) <= 3  # one message, no traceback
    assert not (work / "bad").exists()


def test_resume_from_another_model_is_refused(work, monkeypatch):
    interrupted(monkeypatch, 2, "sparsify", "dense", "--method", "learned", "--data", "imgs.npz", "--steps", "3",
                "--batch-size", "4", "--prior", "magnitude", "--checkpoint-every", "1", "-o", "run")
    before = sorted(p.name for p in (work / "run" / "checkpoint").iterdir())
    state = (work / "run" / "checkpoint" / "state.json").read_text()
    res = invoke("sparsify", "other", "--data", "imgs.npz", "--resume", "run")
    assert res.exit_code == 2 and "different model" in res.output
    res = invoke("sparsify", "dense", "--data", "imgs.npz", "--steps", "9", "--resume", "run")
    assert res.exit_code == 2 and "differs from the interrupted run" in " ".join(res.output.split())
    # the option is named as its flag (it was "option learned.steps=9 ... drop it")
    assert "error: --steps 9 differs from the interrupted run's 3: drop --steps to resume" in " ".join(res.stderr.split()), res.output
    assert sorted(p.name for p in (work / "run" / "checkpoint").iterdir()) == before
    assert (work / "run" / "checkpoint" / "state.json").read_text() == state  # nothing lost
    assert invoke("sparsify", "dense", "--data", "imgs.npz", "--resume", "nowhere").exit_code == 2


def test_resume_with_overwrite_is_refused_and_the_checkpoint_kept(work, monkeypatch):
    # --overwrite beside --resume was silently ignored: the run resumed, nothing was overwritten
    interrupted(monkeypatch, 2, "distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--steps", "3",
                "--batch-size", "4", "--checkpoint-every", "1", "-o", "run")
    state = (work / "run" / "checkpoint" / "state.json").read_text()
    for args in (["distill", "half", "--teacher", "dense"], ["sparsify", "dense", "--method", "learned"]):
        res = invoke(*args, "--data", "imgs.npz", "--resume", "run", "--overwrite")
        assert res.exit_code == 2 and "--resume continues the interrupted run and --overwrite starts afresh over it: drop one " \
            "of them" in " ".join(res.stderr.split()), res.output
    assert (work / "run" / "checkpoint" / "state.json").read_text() == state


def test_distill_heals_and_refuses_bad_input(work):
    res = invoke("distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--steps", "3", "--batch-size", "4",
                 "--lr", "1e-3", "-o", "healed", "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    assert m["steps"] == 3 and m["mask_ratio"] == 0.75 and "fidelity_data" in m
    assert read_manifest(work / "healed").stages[-1].name == "distill"
    for args, message in [
        (["half", "--steps", "2"], "give --data"),
        (["half", "--data", "imgs.npz", "--steps", "2"], "--teacher"),  # the manifest names no source
        (["half", "--data", "imgs.npz", "--teacher", "dense", "--mask-ratio", "1.5"], "--mask-ratio must be in [0, 1)"),
        (["half", "--data", "missing.npz", "--teacher", "dense"], "does not exist"),
        (["half", "--data", "imgs.npz", "--teacher", "dense", "-o", "healed"], "already exists"),
    ]:
        res = invoke("distill", *args)
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)
    assert not (work / "half-distilled").exists()


def test_a_diverged_learning_run_exits_1_with_one_line_and_no_artifact(work):
    # the run wrote NaN weights with exit 0 (and NaN into its --json report)
    res = invoke("distill", "half", "--teacher", "dense", "--data", "imgs.npz", "--steps", "3", "--batch-size", "4", "--lr", "1e30", "-o", "out")
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "training diverged" in lines[0] and "lower --lr" in lines[0], res.output
    assert not (work / "out" / "mimc.json").exists()


@pytest.mark.parametrize("command", [["distill", "half", "--teacher", "dense"], ["sparsify", "dense", "--method", "learned", "--prior", "none"]])
def test_a_learning_run_claims_its_output_for_the_whole_run(work, monkeypatch, command):
    # two runs into one -o both trained and both exited 0 ("wrote out"): the later silently replaced the
    # other's artifact (a run replaces its own checkpoint folder, so its final write overwrote anything)
    import os

    import mimc.compression.distill
    import mimc.compression.nm_learned

    def never(*args, **kwargs):
        raise AssertionError("trained while another process was writing the output")

    modules = {m: m.train for m in (mimc.compression.distill, mimc.compression.nm_learned)}
    for module in modules:
        monkeypatch.setattr(module, "train", never)
    (work / ".out.lock").write_text(str(os.getppid()))  # a live writer of out
    res = invoke(*command, "--data", "imgs.npz", "--steps", "2", "--batch-size", "4", "-o", "out")
    assert res.exit_code == 2 and f"another mimc process (pid {os.getppid()}) is writing out" in res.stderr, res.output
    assert not (work / "out").exists()
    for module, train in modules.items():
        monkeypatch.setattr(module, "train", train)
    (work / ".out.lock").unlink()
    ok = invoke(*command, "--data", "imgs.npz", "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "-o", "out")
    assert ok.exit_code == 0 and (work / "out" / "mimc.json").is_file() and not (work / ".out.lock").exists(), ok.output
    (work / "bad.npy").write_bytes(b"not an array")  # refused once the output is claimed: no folder made for it is left
    assert invoke(*command, "--data", "bad.npy", "--steps", "2", "-o", "new/sub/out").exit_code == 2 and not (work / "new").exists()


def test_epochs_are_recorded_and_learning_options_refused_where_they_cannot_apply(work):
    res = invoke("distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--epochs", "1.5", "--batch-size", "4",
                 "--workers", "0", "--checkpoint-activations", "-o", "ep", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["steps"] == 5 and out["metrics"]["epochs"] == pytest.approx(5 * 4 / 12)  # ceil(1.5 x 12 / 4)
    stage = read_manifest(work / "ep").stages[-1]
    assert stage.config["epochs"] == 1.5 and "steps" not in stage.config
    cases = [
        (["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--steps", "3", "--epochs", "1"],
         "--steps and --epochs are mutually exclusive"),
        (["sparsify", "dense", "--method", "learned", "--data", "imgs.npz", "--steps", "3", "--epochs", "1"],
         "--steps and --epochs are mutually exclusive"),
        (["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--fsdp"], "--fsdp shards over torchrun processes"),
        (["sparsify", "dense", "--method", "wanda", "--calib", "imgs.npz", "--workers", "2"],
         "--workers applies only to a learning run and method wanda does not train: drop --workers"),
        (["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--epochs", "0"], "--epochs must be > 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--precision", "bf16"],
                      "--precision bf16 autocasts on CUDA"))
    for args, message in cases:
        res = invoke(*args, "-o", "bad")
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)
        assert len(res.output.strip().splitlines()) <= 3
        assert not (work / "bad").exists()


def test_one_shot_sparsify_refuses_n_it_would_ignore(work):
    # --n counts a learned run's training images; a one-shot method reads --n-calib images and ignored it
    res = invoke("sparsify", "dense", "--method", "wanda", "--calib", "imgs.npz", "--n", "5", "-o", "bad")
    assert res.exit_code == 2 and "give --n-calib instead" in " ".join(res.output.split()), res.output
    assert len(res.output.strip().splitlines()) <= 3
    assert not (work / "bad").exists()


def test_learned_sparsify_refuses_calib_it_would_ignore(work):
    # with --data the prior calibrates on data's first images: --calib was ignored (a missing file not even opened)
    res = invoke("sparsify", "dense", "--method", "learned", "--data", "imgs.npz", "--calib", "missing.npz", "--steps", "2",
                 "--batch-size", "4", "-o", "bad")
    assert res.exit_code == 2 and "give --data alone, or --calib alone" in " ".join(res.output.split()), res.output
    assert len(res.output.strip().splitlines()) <= 3
    assert not (work / "bad").exists()


def test_one_shot_sparsify_refuses_checkpoint_every(work):
    # only a learned run checkpoints; a one-shot method silently ignored --checkpoint-every
    res = invoke("sparsify", "dense", "--method", "magnitude", "--checkpoint-every", "5", "-o", "bad")
    assert res.exit_code == 2 and "--checkpoint-every applies only to a learning run and method magnitude does not train" \
        in " ".join(res.output.split()), res.output
    assert not (work / "bad").exists()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_any_work(work, monkeypatch):
    # it was refused only inside the training loop (after a learned run's one-shot prior), without naming --batch-size
    import mimc.compression.registry as registry

    monkeypatch.setattr(registry, "compress", lambda *a, **k: pytest.fail("a stage ran before the batch was refused"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for args in (["sparsify", "dense", "--method", "learned", "--data", "imgs.npz"], ["distill", "half", "--data", "imgs.npz", "--teacher", "dense"]):
        res = invoke(*args, "--batch-size", "3", "-o", "bad")
        assert res.exit_code == 2 and "--batch-size 3 does not split evenly over 2 processes: choose a multiple of 2" \
            in " ".join(res.output.split()), res.output
        assert not (work / "bad").exists()


def test_a_batch_past_the_cap_is_refused_before_any_work(work, monkeypatch):
    # --batch-size 100000000 was taken: the first step's sampler and noise alone would fill memory
    import mimc.compression.registry as registry

    monkeypatch.setattr(registry, "compress", lambda *a, **k: pytest.fail("a stage ran before the batch was refused"))
    for args in (["sparsify", "dense", "--method", "learned", "--data", "imgs.npz"], ["distill", "half", "--data", "imgs.npz", "--teacher", "dense"]):
        res = invoke(*args, "--batch-size", "100000000", "-o", "bad")
        assert res.exit_code == 2 and "--batch-size must be in [1, 4096], got 100000000" in " ".join(res.output.split()), res.output
        assert not (work / "bad").exists()


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_prints_notes_and_spinners(work):
    # every rank printed distill's note and ran eval's spinner on the one terminal
    import os
    import subprocess
    import sys
    from pathlib import Path

    assert invoke("tokens", "half", "--method", "tome", "--r", "1", "-o", "tome").exit_code == 0  # needs every token: a note
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FORCE_COLOR": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def stderr_by_rank(logs, *args):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--log-dir", logs,
                    "--redirects", "2", "-m", "mimc", *args]
        assert subprocess.run(torchrun, cwd=work, env=env, capture_output=True, timeout=300).returncode == 0
        return [next((work / logs).glob(f"*/attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)]

    zero, one = stderr_by_rank("d", "distill", "tome", "--teacher", "dense", "--data", "imgs.npz", "--steps", "1", "--batch-size", "2",
                               "--workers", "0", "-o", "out")
    assert zero.count("training without input masking") == 1 and "note:" not in one
    zero, one = stderr_by_rank("e", "eval", "half", "--ref", "dense", "--data", "imgs.npz", "--batch-size", "2")
    assert "evaluating half" in zero and one == ""


def test_skip_corrupt_that_a_learning_run_cannot_honour_is_refused(work):
    # taken and ignored: a learning run's batches are fixed by its seed, so an unreadable image stops it all the same
    for args in (["sparsify", "dense", "--method", "learned", "--prior", "magnitude"], ["distill", "half", "--teacher", "dense"]):
        res = invoke(*args, "--data", "imgs.npz", "--skip-corrupt", "--steps", "1", "--batch-size", "4", "-o", "bad")
        assert res.exit_code == 2 and "--skip-corrupt does not apply to a learning run" in " ".join(res.output.split()), res.output
        assert not (work / "bad").exists()


def test_resuming_another_commands_run_is_refused_naming_it(work, monkeypatch):
    # distill --resume on a learned sparsify run listed every option of the other stage as unknown
    assert interrupted(monkeypatch, 2, "sparsify", "half", "--method", "learned", "--data", "imgs.npz", "--steps", "3",
                       "--batch-size", "4", "--prior", "magnitude", "--checkpoint-every", "1", "-o", "run").exit_code == 130
    state = (work / "run" / "checkpoint" / "state.json").read_text()
    res = invoke("distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--resume", "run")
    assert res.exit_code == 2 and "holds an interrupted run of another command, not of mimc distill" in " ".join(res.output.split()), res.output
    assert len(res.output.strip().splitlines()) <= 3 and "unknown option" not in res.output
    assert (work / "run" / "checkpoint" / "state.json").read_text() == state


def test_resume_accepts_the_same_command_with_an_option_given_at_its_unrecorded_default(work, monkeypatch):
    # --precision fp32 is left out of the recorded options: the same command with --resume was refused as differing
    args = ["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--steps", "3", "--batch-size", "4",
            "--precision", "fp32", "--checkpoint-every", "1"]
    assert interrupted(monkeypatch, 2, *args, "-o", "run").exit_code == 130
    other = [a if a != "fp32" else "bf16" for a in args]  # another value is still refused
    res = invoke(*other, "--resume", "run")
    assert res.exit_code == 2 and "differs from the interrupted run's" in " ".join(res.output.split()), res.output
    res = invoke(*args, "--resume", "run", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["resumed_from"] == 2


def test_resume_names_what_the_interrupted_run_had_for_an_option_it_did_not_record(work, monkeypatch):
    # "--epochs 1.0 differs from the interrupted run's None", "--precision 'bf16' differs from the interrupted run's None"
    args = ["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--steps", "3", "--batch-size", "4", "--checkpoint-every", "1"]
    assert interrupted(monkeypatch, 2, *args, "-o", "run").exit_code == 130
    for extra, said in ((["--epochs", "1"], "--epochs 1.0 differs from the interrupted run, which did not set it"),
                        (["--precision", "bf16"], "--precision 'bf16' differs from the interrupted run's 'fp32'")):
        res = invoke(*[a for a in args if a not in ("--steps", "3")], *extra, "--resume", "run")
        assert res.exit_code == 2 and said in " ".join(res.output.split()), res.output


def test_a_subset_read_with_workers_is_seeded_and_resumes(work, monkeypatch):
    # --workers made the images an ImageSource with the seed --seed left unset (None): --n drew an unseeded
    # subset, another one each run, so the same command with --resume was refused as reading different data
    base = ["distill", "half", "--data", "imgs.npz", "--teacher", "dense", "--n", "6", "--steps", "3", "--batch-size", "2",
            "--checkpoint-every", "1"]
    args = [*base, "--workers", "1"]
    assert interrupted(monkeypatch, 2, *args, "-o", "run").exit_code == 130
    res = invoke(*args, "--resume", "run", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["resumed_from"] == 2
    plain = invoke(*base, "-o", "plain")  # the seeded subset --n draws without --workers
    assert plain.exit_code == 0, plain.output
    for (k, a), b in zip(load_artifact(work / "plain").state_dict().items(), load_artifact(work / "run").state_dict().values()):
        assert torch.equal(a, b), k
