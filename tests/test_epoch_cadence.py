"""Per-epoch overhead settings (review C1): validate every N epochs (always the last), which models are validated,
checkpoint every N epochs (always the last, and whenever the run stops); best is chosen among validated epochs;
the in-memory last-good copy is made only when a rollback or restore can read it."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastrobust.cli import main
from fastrobust.errors import ConfigError, TrainingStopped
from fastrobust.models.checkpoint import read_model_file
from fastrobust.train import Trainer, TrainConfig, resume, train
from fastrobust.train import state as training_state
from fastrobust.train import trainer as trainer_module
from fastrobust.train.presets import load_preset, make_config

from helpers import crash_at_step, synthetic_dataset

QUIET = dict(progress=False, log=lambda _: None)


def config(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    settings = dict(method="natural", model="tinycnn", model_params={"width": 4}, dataset="synthetic", epochs=5,
                    batch_size=32, lr=0.05, val_pgd_steps=1, test_pgd_steps=1, device="cpu", out=str(tmp_path / name))
    settings.update(overrides)
    return TrainConfig(**settings)


def data():
    return synthetic_dataset(train=64, val=32, test=32)


def lines(tmp_path, name: str = "run") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def checkpointed_epochs(monkeypatch) -> list[int]:
    written: list[int] = []
    original = training_state.write

    def write(run_dir, snapshot, model):
        written.append(snapshot.info["epoch"])
        return original(run_dir, snapshot, model)

    monkeypatch.setattr(training_state, "write", write)
    return written


def test_validation_and_checkpoints_follow_their_cadence_and_the_last_epoch_always_has_both(tmp_path, monkeypatch,
                                                                                               one_thread):
    written = checkpointed_epochs(monkeypatch)
    result = train(config(tmp_path, validate_every=2, checkpoint_every_epochs=2), dataset=data(), **QUIET)
    records = lines(tmp_path)
    assert [r["epoch"] for r in records if "val_robust_acc" in r] == [2, 4, 5]
    assert all("val_clean_acc" not in r and "val_seconds" not in r for r in records if r["epoch"] in (1, 3))
    assert written == [2, 4, 5]
    assert result["best_epoch"] in (2, 4, 5)
    best = max((r for r in records if "val_robust_acc" in r), key=lambda r: r["val_robust_acc"])
    assert result["best_epoch"] == best["epoch"]  # the first maximum among validated epochs
    assert str(read_model_file(tmp_path / "run" / "last.safetensors")[2]["epoch"]) == "5"
    overhead = result["epoch_overhead_seconds"]
    assert overhead["validation"] == pytest.approx(sum(r["val_seconds"] for r in records if "val_seconds" in r))
    assert overhead["saving"] > 0


def test_which_models_are_validated(tmp_path, one_thread):
    averaged = train(config(tmp_path, "averaged", epochs=2, ema_decay=0.5, validate_models="averaged"),
                     dataset=data(), **QUIET)
    assert all("ema_val_robust_acc" in r and "val_robust_acc" not in r for r in lines(tmp_path, "averaged"))
    assert averaged["best_weights"] == "averaged"
    trained = train(config(tmp_path, "trained", epochs=2, ema_decay=0.5, ema_select="model",
                           validate_models="trained"), dataset=data(), **QUIET)
    assert all("val_robust_acc" in r and "ema_val_robust_acc" not in r for r in lines(tmp_path, "trained"))
    assert trained["best_weights"] == "model"


@pytest.mark.parametrize("settings, message", [
    ({"validate_every": 0}, "validate_every=0"),
    ({"checkpoint_every_epochs": 0}, "checkpoint_every_epochs=0"),
    ({"validate_models": "ema"}, "validate_models='ema' is not one of both, trained, averaged"),
    ({"validate_models": "averaged"}, "validate_models=averaged validates the averaged model, but ema_decay=0"),
    ({"ema_decay": 0.9, "validate_models": "trained"}, "leaves out what ema_select=averaged picks best from"),
    ({"ema_decay": 0.9, "ema_select": "model", "validate_models": "averaged"}, "ema_select=model"),
    ({"ema_decay": 0.9, "ema_select": "either", "validate_models": "trained"}, "set validate_models=both"),
    ({"ema_decay": 0.9, "validate_models": "averaged", "on_collapse": "restore"}, "on_collapse=restore watches"),
    ({"method": "fast_at_plus", "validate_every": 2}, "fast_at_plus checks the trained model's validation"),
])
def test_bad_cadence_settings_are_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config(tmp_path, **settings).validate()


def test_a_resume_from_an_epoch_checkpoint_of_the_cadence_is_exact(tmp_path, monkeypatch, one_thread):
    """Checkpoints after epochs 2 and 4 (of 4): a crash in epoch 4 resumes from epoch 2 and ends like the run that
    never stopped."""
    settings = dict(epochs=4, checkpoint_every_epochs=2, validate_every=2)
    train(config(tmp_path, "straight", **settings), dataset=data(), **QUIET)
    with crash_at_step(monkeypatch, 7):  # the 2nd of epoch 4's two steps
        train(config(tmp_path, "crashed", **settings), dataset=data(), **QUIET)
    result = resume(tmp_path / "crashed", dataset=data(), **QUIET)
    for name in ("last.safetensors", "best.safetensors"):
        straight, resumed = (load_file(str(tmp_path / run / name)) for run in ("straight", "crashed"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
    assert [r["epoch"] for r in lines(tmp_path, "crashed")] == [1, 2, 3, 4]
    assert result["best_epoch"] == json.loads((tmp_path / "straight" / "result.json").read_text())["best_epoch"]


def test_a_stop_after_an_epoch_without_a_checkpoint_writes_one_and_leaves_a_best(tmp_path, monkeypatch, one_thread):
    written = checkpointed_epochs(monkeypatch)

    def stop_after_epoch_one(self, stop, *, sync):
        return signal.SIGTERM if self.epoch == 1 and self.batch == 0 else None

    monkeypatch.setattr(Trainer, "_stop_signal", stop_after_epoch_one)
    with pytest.raises(TrainingStopped, match="stopped after epoch 1; checkpoint saved"):
        train(config(tmp_path, epochs=3, checkpoint_every_epochs=3, validate_every=3), dataset=data(), **QUIET)
    assert written == [1]
    # nothing validated yet: best holds the latest weights until the first validation
    assert str(read_model_file(tmp_path / "run" / "best.safetensors")[2]["epoch"]) == "1"


def test_the_last_good_copy_is_made_only_for_a_rollback_or_a_restore(tmp_path, monkeypatch, one_thread):
    """Every capture copies the model, its momentum and its average to the host. With on_nan=stop and
    on_collapse=warn nothing reads the last-good copy: only the checkpoints capture."""
    captures: list[int] = []
    original = training_state.capture
    monkeypatch.setattr(training_state, "capture",
                        lambda *args, **kwargs: captures.append(1) or original(*args, **kwargs))
    train(config(tmp_path, "plain", epochs=2), dataset=data(), **QUIET)
    assert len(captures) == 2  # the two epoch-end checkpoints (before: 5, a last-good copy at the start and per epoch)
    captures.clear()
    train(config(tmp_path, "rollback", epochs=2, on_nan="rollback"), dataset=data(), **QUIET)
    assert len(captures) == 5


def test_cli_flags_and_the_speedrun_preset(tmp_path, monkeypatch, capsys, one_thread):
    speedrun = make_config(load_preset("speedrun")).validate()
    assert (speedrun.validate_every, speedrun.validate_models, speedrun.checkpoint_every_epochs) == (5, "averaged", 5)
    monkeypatch.setattr(trainer_module, "load_dataset", lambda *a, **k: data())
    argv = ["train", "--method", "natural", "--model", "tinycnn", "--dataset", "cifar10", "--epochs", "3",
            "--batch-size", "32", "--device", "cpu", "--quiet", "--json", "--set", "val_pgd_steps=1",
            "--set", "test_pgd_steps=1", "--set", "model.width=4", "--validate-every", "2",
            "--checkpoint-every-epochs", "3", "--validate-models", "trained", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["config"]["validate_every"], result["config"]["checkpoint_every_epochs"],
            result["config"]["validate_models"]) == (2, 3, "trained")
    assert [r["epoch"] for r in lines(tmp_path, "cli") if "val_robust_acc" in r] == [2, 3]
