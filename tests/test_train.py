"""The trainer: reproducibility, exact resume, checkpoints, model selection, collapse and NaN handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrobust.models.checkpoint import load_model
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.train import Trainer, TrainConfig, TrainingStopped, resume, train

from helpers import crash_at_step, synthetic_dataset


def config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    settings = dict(method="fast_at", model="tinycnn", dataset="synthetic", epochs=3, batch_size=32, lr=0.05,
                    schedule="cosine", val_pgd_steps=2, test_pgd_steps=3, out=str(tmp_path / name), device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(run: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_records_and_same_seed_gives_same_metrics(tmp_path):
    data = synthetic_dataset()
    first = train(config(tmp_path, "a"), dataset=data, progress=False, log=lambda _: None)
    second = train(config(tmp_path, "b"), dataset=data, progress=False, log=lambda _: None)
    run = tmp_path / "a"
    lines = metrics(run)
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_adv_acc", "val_clean_acc", "val_robust_acc", "epoch_seconds", "images_per_second"):
        assert key in lines[0]
    assert [(m["train_loss"], m["val_robust_acc"]) for m in lines] == [(m["train_loss"], m["val_robust_acc"]) for m in metrics(tmp_path / "b")]
    assert first["test"] == second["test"]
    assert first["best_epoch"] == max(lines, key=lambda m: m["val_robust_acc"])["epoch"]
    assert first["test"]["n"] == 64 and 0 <= first["test"]["pgd3_acc"] <= first["test"]["clean_acc"]
    result = json.loads((run / "result.json").read_text())
    assert result["config"]["method"] == "fast_at" and "torch" in result["environment"]
    model, meta = load_model(run)
    assert meta["path"].endswith("best.safetensors") and not model.training


def test_resume_after_a_crash_gives_the_same_final_weights(tmp_path, monkeypatch):
    data = synthetic_dataset()
    train(config(tmp_path, "straight", checkpoint_every=4), dataset=data, progress=False, log=lambda _: None)

    with crash_at_step(monkeypatch, 10):  # mid-epoch 2 (6 batches per epoch), after the checkpoint at step 8
        train(config(tmp_path, "crashed", checkpoint_every=4), dataset=data, progress=False, log=lambda _: None)
    crashed = tmp_path / "crashed"
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir())[-1] == "step-000000008"
    resume(crashed, dataset=data, progress=False, log=lambda _: None)

    straight, resumed = weights(tmp_path / "straight"), weights(crashed)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [m["val_robust_acc"] for m in metrics(tmp_path / "straight")][-1] == metrics(crashed)[-1]["val_robust_acc"]


def test_damaged_checkpoint_falls_back_to_previous(tmp_path):
    data = synthetic_dataset()
    run = tmp_path / "run"
    train(config(tmp_path, epochs=2), dataset=data, progress=False, log=lambda _: None)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    blob = newest / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])  # truncated
    messages = []
    trainer = Trainer(TrainConfig(**json.loads((run / "config.json").read_text())), dataset=data,
                      progress=False, log=messages.append, resume=True)
    assert trainer.epoch == 1
    assert any("does not match its recorded sha256" in m for m in messages)


def test_fast_at_plus_restores_and_switches_to_pgd_on_collapse(tmp_path, monkeypatch):
    data = synthetic_dataset()
    reported = iter([0.5, 0.1, 0.45, 0.5])
    at_validation, at_start = {}, {}
    original_epoch = Trainer._train_epoch

    def fake_validate(self):
        at_validation[self.epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"val_clean_acc": 0.9, "val_robust_acc": next(reported)}

    def recording_epoch(self, stop):
        at_start[self.epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original_epoch(self, stop)

    monkeypatch.setattr(Trainer, "validate", fake_validate)
    monkeypatch.setattr(Trainer, "_train_epoch", recording_epoch)
    train(config(tmp_path, method="fast_at_plus", epochs=4), dataset=data, progress=False, log=lambda _: None)
    lines = metrics(tmp_path / "run")
    assert "collapse" not in lines[0]
    assert lines[1]["collapse"]["action"] == "restore" and lines[1]["collapse"]["restored_to_epoch"] == 1
    assert lines[1]["collapse"]["best"] == 0.5 and lines[1]["collapse"]["now"] == 0.1
    assert [line["method"]["attack"] for line in lines] == ["fgsm_rs", "fgsm_rs", "pgd10", "fgsm_rs"]
    # epoch 3 starts from the weights that ended epoch 1, not from the collapsed epoch 2
    for name, value in at_start[2].items():
        assert torch.equal(value, at_validation[0][name]), name
    assert any(not torch.equal(at_start[2][k], at_validation[1][k]) for k in at_start[2])


def test_collapse_stop_keeps_best_model(tmp_path, monkeypatch):
    data = synthetic_dataset()
    reported = iter([0.5, 0.1])
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_clean_acc": 0.9, "val_robust_acc": next(reported)})
    with pytest.raises(TrainingStopped, match="collapsed from 0.500 to 0.100"):
        train(config(tmp_path, on_collapse="stop"), dataset=data, progress=False, log=lambda _: None)
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_nan_loss_stops_with_checkpoint_intact_or_rolls_back(tmp_path, monkeypatch):
    data = synthetic_dataset()
    original_step = Trainer._step
    poisoned = {"left": 1}

    def nan_step(self, x, y):
        stats = original_step(self, x, y)
        if self.epoch == 1 and poisoned["left"]:
            poisoned["left"] -= 1
            stats = dict(stats, loss=torch.tensor(float("nan")))
        return stats

    monkeypatch.setattr(Trainer, "_step", nan_step)
    with pytest.raises(TrainingStopped, match="NaN or Inf at epoch 2"):
        train(config(tmp_path, "stop", nan_check_every=2), dataset=data, progress=False, log=lambda _: None)
    assert [m["epoch"] for m in metrics(tmp_path / "stop")] == [1]
    assert load_model(tmp_path / "stop")[0] is not None

    poisoned["left"] = 1
    result = train(config(tmp_path, "rollback", on_nan="rollback", nan_check_every=2), dataset=data,
                   progress=False, log=lambda _: None)
    lines = metrics(tmp_path / "rollback")
    assert any(line.get("event") == "nan_rollback" for line in lines)
    assert [line["epoch"] for line in lines if "epoch" in line] == [1, 2, 3]
    assert result["config"]["lr"] == 0.05


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eps": 8.0}, "did you mean 8/255"),
        ({"method": "madry"}, "known methods are"),
        ({"epochs": 0}, "epochs=0 must be positive"),
        ({"schedule": "step"}, "schedule='step' is not one of"),
        ({"method": "trades", "method_params": {"beta": "six"}}, "is not a number"),
        ({"lr": -1.0}, "lr=-1.0 must be a positive number"),
    ],
)
def test_bad_settings_are_rejected_before_work(tmp_path, overrides, message):
    with pytest.raises(FastRobustError, match=message):
        Trainer(config(tmp_path, **overrides), dataset=synthetic_dataset(), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FastRobustError, match="cannot write to output folder"):
        Trainer(config(tmp_path, out=str(blocker / "run")), dataset=synthetic_dataset(), progress=False)


def test_schedules():
    from fastrobust.train.schedules import lr_schedule

    piecewise = lr_schedule("piecewise", 0.1, 100)
    assert [piecewise(t) for t in (0, 49.9, 50, 74.9, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cyclic = lr_schedule("cyclic", 0.2, 10)
    assert cyclic(0) == 0 and cyclic(4) == pytest.approx(0.2) and cyclic(7) == pytest.approx(0.1) and cyclic(10) == 0
    with pytest.raises(ConfigError, match="unknown schedule"):
        lr_schedule("exp", 0.1, 10)
