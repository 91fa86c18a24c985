"""Fault suite: interrupted runs lose nothing, damaged checkpoints are detected, bad runs stop cleanly.

The interruption tests run ``fastrobust train`` in a real subprocess on a tiny image-folder dataset written
here (4 classes of 8x8 PNGs), send SIGTERM / SIGINT / SIGKILL once a checkpoint exists, resume, and compare
the final weights with an uninterrupted run of the same seed (CPU, one thread: bit-exact). Each run takes a
few seconds, most of it the interpreter start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fastrobust.train import state as training_state
from fastrobust.cli import main

EXE = shutil.which("fastrobust") or str(Path(sys.executable).with_name("fastrobust"))
TRAIN = ["train", "--dataset", "imagefolder", "--model", "tinycnn", "--method", "fast_at", "--device", "cpu",
         "--epochs", "4", "--batch-size", "8", "--val-size", "16", "--lr", "0.05", "--schedule", "cosine",
         "--seed", "3", "--checkpoint-every", "3", "--set", "val_pgd_steps=1", "--set", "test_pgd_steps=1",
         "--set", "eval_batch_size=64", "--quiet"]


def write_imagefolder(root: Path, *, train: int = 40, test: int = 8, classes: int = 4) -> Path:
    """<root>/{train,test}/<class>/<i>.png: class-dependent 8x8 patterns plus noise (learnable, lossless)."""
    rng = np.random.default_rng(0)
    prototypes = rng.integers(0, 256, size=(classes, 8, 8, 3))
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (0.5 * prototypes[c] + rng.integers(0, 128, size=(8, 8, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    data = write_imagefolder(root / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FASTROBUST_CACHE=str(root / "cache"),
               PYTHONUNBUFFERED="1")
    return {"root": root, "data": data, "env": env}


def start(workspace: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([EXE, *args], env=workspace["env"], cwd=workspace["root"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"fastrobust did not finish in {timeout}s; stderr: {err[-2000:]}")
    return process.returncode, out, err


def train_args(workspace: dict, out: Path, *extra: str) -> list[str]:
    return [*TRAIN, "--data-root", str(workspace["data"]), "--out", str(out), *extra]


def completed_checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.json").is_file())


def wait_for_checkpoint(process: subprocess.Popen, run: Path, newer_than: str = "", timeout: float = 90) -> Path:
    """Poll until a completed checkpoint folder newer than ``newer_than`` exists (the run is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in completed_checkpoints(run) if p.name > newer_than]
        if found:
            return found[-1]
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc {process.returncode}) before writing a checkpoint: {process.stderr.read()[-2000:]}")
        time.sleep(0.01)
    process.kill()
    pytest.fail("no checkpoint appeared in time")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(autouse=True)
def private_cache(workspace, monkeypatch):
    """In-process CLI calls decode into the test's cache, never into ~/.cache."""
    monkeypatch.setenv("FASTROBUST_CACHE", workspace["env"]["FASTROBUST_CACHE"])


@pytest.fixture(scope="module")
def reference(workspace) -> dict[str, torch.Tensor]:
    """The uninterrupted run with the same seed: the weights every interrupted-and-resumed run must reach."""
    run = workspace["root"] / "reference"
    code, out, err = finish(start(workspace, *train_args(workspace, run)))
    assert code == 0, err
    assert "test clean" in out
    return final_weights(run)


# ----------------------------------------------------------------------------- interruption
def test_sigterm_then_sigint_stop_with_a_checkpoint_and_resume_exactly(workspace, reference):
    run = workspace["root"] / "signals"
    first = start(workspace, *train_args(workspace, run))
    seen = wait_for_checkpoint(first, run)
    first.send_signal(signal.SIGTERM)
    code, _, err = finish(first)
    assert code != 0
    assert "SIGTERM received" in err or "stopped after epoch" in err, err
    assert f"Resume with: fastrobust train --resume {run}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    newest = completed_checkpoints(run)[-1]
    assert newest.name >= seen.name and training_state.verify(newest) is None

    second = start(workspace, "train", "--resume", str(run), "--quiet")
    wait_for_checkpoint(second, run, newer_than=newest.name)
    second.send_signal(signal.SIGINT)
    code, _, err = finish(second)
    assert code != 0 and f"Resume with: fastrobust train --resume {run}" in err, err
    assert "SIGINT received" in err or "stopped after epoch" in err, err
    assert training_state.verify(completed_checkpoints(run)[-1]) is None

    code, out, err = finish(start(workspace, "train", "--resume", str(run), "--quiet"))
    assert code == 0, err
    assert json.loads((run / "result.json").read_text())["config"]["epochs"] == 4
    assert_same_weights(final_weights(run), reference)
    epochs = [line["epoch"] for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" in line]
    assert epochs == [1, 2, 3, 4]


def test_sigkill_at_a_random_moment_loses_nothing(workspace, reference):
    run = workspace["root"] / "killed"
    delay = random.Random().uniform(0.0, 1.5)
    process = start(workspace, *train_args(workspace, run))
    wait_for_checkpoint(process, run)
    time.sleep(delay)
    process.kill()  # SIGKILL: no handler runs, a write may be cut anywhere
    process.communicate()
    newest = completed_checkpoints(run)[-1]
    assert training_state.verify(newest) is None, f"killed after {delay:.3f}s: {newest} does not verify"

    code, _, err = finish(start(workspace, "train", "--resume", str(run), "--quiet"))
    assert code == 0, f"killed after {delay:.3f}s: {err}"
    assert_same_weights(final_weights(run), reference)


# ----------------------------------------------------------------------------- integrity and fallback
@pytest.fixture(scope="module")
def finished_run(workspace, reference) -> Path:
    """A copy of the reference run (two checkpoints kept) to damage in the tests below."""
    return workspace["root"] / "reference"


def damaged_copy(finished_run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    older, newest = completed_checkpoints(run)[-2:]
    return run, older, newest


@pytest.mark.parametrize("damage, reason", [
    ("truncate_state", "state.json is not valid JSON"),
    ("alter_state_hash", "model.safetensors does not match its recorded sha256"),
    ("flip_weight_byte", "model.safetensors does not match its recorded sha256"),
    ("truncate_train_state", "train_state.safetensors does not match its recorded sha256"),
    ("delete_weights", "model.safetensors is missing"),
    ("no_state", "no state.json"),
])
def test_damaged_checkpoint_is_detected_and_resume_falls_back(finished_run, tmp_path, capsys, damage, reason):
    run, older, newest = damaged_copy(finished_run, tmp_path)
    state = newest / "state.json"
    weights = newest / "model.safetensors"
    if damage == "truncate_state":
        state.write_bytes(state.read_bytes()[:40])
    elif damage == "alter_state_hash":
        info = json.loads(state.read_text())
        info["sha256"]["model.safetensors"] = "0" * 64
        state.write_text(json.dumps(info))
    elif damage == "flip_weight_byte":
        blob = bytearray(weights.read_bytes())
        blob[-5] ^= 0x01  # same length, one bit of one weight
        weights.write_bytes(bytes(blob))
    elif damage == "truncate_train_state":
        extra = newest / "train_state.safetensors"
        extra.write_bytes(extra.read_bytes()[:-10])
    elif damage == "delete_weights":
        weights.unlink()
    elif damage == "no_state":
        state.unlink()
    assert reason in training_state.verify(newest)
    assert training_state.verify(older) is None
    warnings: list[str] = []
    assert training_state.load_latest(run, warn=warnings.append).path == older
    assert len(warnings) == 1 and reason in warnings[0] and str(newest) in warnings[0]

    # the CLI resume (a finished run: it re-evaluates) names the damaged folder and uses the older one
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unusable: {reason}" in err and f"from {older.name}" in err


def test_every_checkpoint_damaged_is_one_clear_error(finished_run, tmp_path, capsys):
    run, older, newest = damaged_copy(finished_run, tmp_path)
    for folder in (older, newest):
        (folder / "model.safetensors").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint of" in err and "every one is damaged" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_damaged_config_json_is_one_clear_error(finished_run, tmp_path, capsys):
    run, _, _ = damaged_copy(finished_run, tmp_path)
    (run / "config.json").write_text('{"epochs": 4, "method": ')
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config.json is damaged" in err and len(err.strip().splitlines()) == 1
    (run / "config.json").write_text('{"epochs": 4, "no_such_setting": 1}')
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "no_such_setting" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "bit_flip_header", "garbage", "empty", "not_fastrobust", "bad_metadata"])
def test_eval_on_a_corrupt_model_file_is_one_line(workspace, finished_run, tmp_path, capsys, damage):
    good = (finished_run / "best.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "bit_flip_header":
        path.write_bytes(good[:20] + bytes([good[20] ^ 0x20]) + good[21:])
    elif damage == "garbage":
        path.write_bytes(os.urandom(256))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_fastrobust":
        save_file({"w": torch.zeros(2)}, str(path))
    elif damage == "bad_metadata":
        save_file({"w": torch.zeros(2)}, str(path), metadata={"fastrobust_model": "{not json"})
    code = main(["eval", "--checkpoint", str(path), "--dataset", "imagefolder", "--data-root", str(workspace["data"]),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(path) in err, err


def test_a_saved_model_file_altered_in_place_does_not_load_silently(finished_run, tmp_path):
    """A change that keeps the format valid is refused by the weights' sha256 in the header (save_model records
    it); a file without one (written before it was recorded) never loads as a different architecture: the config
    travels with the weights and shapes are checked."""
    from safetensors import safe_open

    from fastrobust.models.checkpoint import load_model
    from fastrobust.errors import FastRobustError

    path = tmp_path / "m.safetensors"
    state = load_file(str(finished_run / "last.safetensors"))
    with safe_open(str(finished_run / "last.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    state["fc.weight"] = state["fc.weight"][:2]
    save_file(state, str(path), metadata=header)
    with pytest.raises(FastRobustError, match=r"has changed since it was saved: its weights do not match the sha256"):
        load_model(path)
    save_file(state, str(path), metadata={k: v for k, v in header.items() if k != "fastrobust_weights_sha256"})
    with pytest.raises(FastRobustError, match=r"does not fit its saved config tinycnn: shape mismatch \(weights vs model\): fc.weight \[2, "):
        load_model(path)


# ----------------------------------------------------------------------------- NaN and collapse via the CLI
def test_diverging_lr_rolls_back_three_times_then_stops_clearly(workspace):
    run = workspace["root"] / "diverge"
    code, _, err = finish(start(workspace, *train_args(workspace, run, "--lr", "1e4", "--on-nan", "rollback",
                                                         "--set", "nan_check_every=5")))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "NaN or Inf" in err and "again after 3 rollbacks" in err and "x0.125" in err and "Lower --lr" in err
    assert "--on-nan rollback" not in err  # it was already on: do not suggest it
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr_scale"] for e in events if e.get("event") == "nan_rollback"] == [0.5, 0.25, 0.125]
    for folder in completed_checkpoints(run):  # nothing non-finite was ever written as a checkpoint
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values()
                   if t.is_floating_point()), folder


def test_nan_stop_never_leaves_a_non_finite_checkpoint(workspace, tmp_path, capsys, monkeypatch):
    run = tmp_path / "nanstop"
    # checkpoints every step, NaN checked only every 50: the divergence happens between checks
    argv = train_args(workspace, run, "--lr", "1e4", "--checkpoint-every", "1", "--on-nan", "stop")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "Lower --lr" in err and len(err.strip().splitlines()) == 1
    assert ("intact in" in err) == bool(completed_checkpoints(run)), err
    for folder in completed_checkpoints(run):
        assert training_state.verify(folder) is None
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values()
                   if t.is_floating_point()), folder


# ----------------------------------------------------------------------------- output folder and data
def test_unwritable_output_folder_fails_before_loading_data(workspace, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(train_args(workspace, blocker / "run")) == 2
    err = capsys.readouterr().err
    assert "cannot write to output folder" in err and "choose another --out" in err
    assert len(err.strip().splitlines()) == 1


def test_full_disk_fails_before_training(workspace, tmp_path, capsys, monkeypatch):
    import fastrobust.train.run_folder as train_module

    monkeypatch.setattr(train_module, "os_free_bytes", lambda folder: 10 * 2**20)
    assert main(train_args(workspace, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "only 10 MiB free" in err and "choose another --out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()


def test_disk_full_during_training_is_one_line_and_the_run_resumes(workspace, tmp_path, capsys, monkeypatch):
    import errno

    import fastrobust.train.state as state_module

    real_write = state_module.atomic_write_bytes
    calls = {"n": 0}

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def filling_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 8:  # the 4th checkpoint: model written, train_state cut after its bytes went out
            assert Path(path).name == "train_state.safetensors"
            with monkeypatch.context() as patch:
                patch.setattr(os, "fsync", no_space)
                real_write(path, data)
        real_write(path, data)

    monkeypatch.setattr(state_module, "atomic_write_bytes", filling_disk)
    run = tmp_path / "run"
    assert main(train_args(workspace, run)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "train_state.safetensors" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    folders = sorted((run / "checkpoints").glob("step-*"))
    assert training_state.verify(folders[-1]) == "no state.json (the write was interrupted)"
    assert training_state.verify(folders[-2]) is None
    assert not list(run.rglob("*.tmp"))  # the cut write left no temporary file behind

    monkeypatch.setattr(state_module, "atomic_write_bytes", real_write)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / "result.json").is_file()


def test_corrupt_image_in_the_dataset_is_named_by_the_cli(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(workspace["data"], data)
    (data / "train" / "class2" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n-- cut short --")
    argv = [*TRAIN, "--data-root", str(data), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "corrupt or unreadable image" in err and "class2/5.png" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["data", "imagefolder", "--root", str(data)]) == 2
    assert "class2/5.png" in capsys.readouterr().err
