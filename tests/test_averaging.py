"""Weight averaging (EMA): the math against a hand computation, the trainer's use of it, exact resume, `best`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastrobust.train.averaging import WeightAverager, best_candidate
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.train import Trainer, TrainConfig, resume, train

from helpers import crash_at_step, synthetic_dataset

QUIET = dict(progress=False, log=lambda _: None)


def config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    settings = dict(method="fast_at", model="tinycnn", dataset="synthetic", epochs=3, batch_size=32, lr=0.05,
                    schedule="cosine", val_pgd_steps=2, test_pgd_steps=3, out=str(tmp_path / name), device="cpu",
                    ema_decay=0.8)
    settings.update(overrides)
    return TrainConfig(**settings)


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_ema_of_weights_and_batchnorm_buffers_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    averager = WeightAverager(model, decay=0.75, start_epoch=1)
    assert not averager.started and averager.updates == 0  # no read-back per update: test_training_host_syncs.py
    history = []
    for epoch, step in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3))  # moves the BatchNorm running statistics
        if epoch >= 1:
            history.append(float_state(model))
        averager.update(model, epoch)
    assert averager.updates == 3
    expected = history[0]  # the first update copies
    for state in history[1:]:
        expected = {k: 0.75 * expected[k] + 0.25 * state[k] for k in expected}
    got = float_state(averager.module)
    assert set(got) == set(expected) and {"1.running_mean", "1.running_var"} <= set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert not any(p.requires_grad for p in averager.module.parameters())


def test_averager_state_round_trip_and_refuses_a_missing_state():
    model = nn.Linear(2, 2)
    first = WeightAverager(model, decay=0.5)
    first.update(model, 0)
    with torch.no_grad():
        model.weight.add_(1.0)
    first.update(model, 0)
    second = WeightAverager(nn.Linear(2, 2), decay=0.5)
    second.load_state_dict(first.state_dict())
    assert second.updates == 2 and torch.equal(second.module.weight, first.module.weight)
    with pytest.raises(FastRobustError, match="no weight-averaging state"):
        second.load_state_dict({})


@pytest.mark.parametrize("settings, message", [
    ({"ema_decay": 1.0}, "ema_decay=1.0 must be in"), ({"ema_decay": -0.1}, "ema_decay=-0.1"),
    ({"ema_start_epoch": -1}, "ema_start_epoch=-1"), ({"ema_select": "best"}, "ema_select='best' is not one of"),
    ({"save_epoch_models": -2}, "save_epoch_models"),
    ({"ema_start_epoch": 3}, r"ema_start_epoch=3 starts after the last epoch \(0-based: at most 2"),  # was accepted: nothing averaged
])
def test_bad_averaging_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **settings).validate()


def test_trainer_averages_after_every_step_from_the_start_epoch(tmp_path, monkeypatch):
    """averaged.safetensors equals the EMA (decay 0.8, from epoch 1 on) of the weights after each step."""
    after_step: list[tuple[int, dict[str, torch.Tensor]]] = []
    original = Trainer._step

    def recording_step(self, x, y):
        stats = original(self, x, y)
        after_step.append((self.epoch, float_state(self.model)))
        return stats

    monkeypatch.setattr(Trainer, "_step", recording_step)
    data = synthetic_dataset()
    result = train(config(tmp_path, ema_start_epoch=1), dataset=data, **QUIET)
    states = [state for epoch, state in after_step if epoch >= 1]
    assert len(states) == 2 * 6  # epochs 2 and 3, 6 batches each
    expected = states[0]
    for state in states[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * state[k] for k in expected}
    saved = load_file(str(tmp_path / "run" / "averaged.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-6, msg=key)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "ema_val_robust_acc" not in lines[0]  # averaging had not started in epoch 1
    assert all("ema_val_robust_acc" in line and "ema_val_clean_acc" in line for line in lines[1:])
    assert result["config"]["ema_decay"] == 0.8


def test_averaging_leaves_training_unchanged(tmp_path):
    data = synthetic_dataset()
    train(config(tmp_path, "plain", ema_decay=0.0), dataset=data, **QUIET)
    train(config(tmp_path, "ema"), dataset=data, **QUIET)
    plain, ema = load_file(str(tmp_path / "plain" / "last.safetensors")), load_file(str(tmp_path / "ema" / "last.safetensors"))
    assert all(torch.equal(plain[k], ema[k]) for k in plain)
    assert not (tmp_path / "plain" / "averaged.safetensors").exists()


def test_resume_with_averaging_is_exact(tmp_path, monkeypatch):
    data = synthetic_dataset()
    train(config(tmp_path, "straight", checkpoint_every=4), dataset=data, **QUIET)
    with crash_at_step(monkeypatch, 10):  # mid-epoch 2, after the checkpoint at step 8
        train(config(tmp_path, "crashed", checkpoint_every=4), dataset=data, **QUIET)
    result = resume(tmp_path / "crashed", dataset=data, **QUIET)
    for name in ("averaged.safetensors", "best.safetensors", "last.safetensors"):
        straight, resumed = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "crashed" / name))
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
    assert result["best_weights"] == json.loads((tmp_path / "straight" / "result.json").read_text())["best_weights"]


def test_rollback_restores_the_averaged_model(tmp_path):
    trainer = Trainer(config(tmp_path), dataset=synthetic_dataset(), **QUIET)
    trainer.averager.update(trainer.model, 0)
    trainer.last_good = trainer._capture()
    before = float_state(trainer.averager.module)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(float("nan"))
    trainer.averager.update(trainer.model, 0)  # a NaN step reaches the average ...
    trainer._restore_last_good()  # ... and the rollback takes it back out
    after = float_state(trainer.averager.module)
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.averager.updates == 1


@pytest.mark.parametrize("select, values, expected", [
    ("averaged", {"val_robust_acc": 0.5, "ema_val_robust_acc": 0.4}, ("averaged", 0.4)),
    ("model", {"val_robust_acc": 0.5, "ema_val_robust_acc": 0.6}, ("model", 0.5)),
    ("either", {"val_robust_acc": 0.5, "ema_val_robust_acc": 0.4}, ("model", 0.5)),
    ("either", {"val_robust_acc": 0.5, "ema_val_robust_acc": 0.5}, ("averaged", 0.5)),
    ("either", {}, ("averaged", None)),
])
def test_best_candidate(select, values, expected):
    model = nn.Linear(2, 2)
    averager = WeightAverager(model, decay=0.5)
    assert best_candidate(values, "val_robust_acc", select, averager) == ("model", values.get("val_robust_acc"))  # not started
    averager.update(model, 0)
    assert best_candidate(values, "val_robust_acc", select, averager) == expected
    assert best_candidate(values, "val_robust_acc", select, None) == ("model", values.get("val_robust_acc"))


@pytest.mark.parametrize("select", ["averaged", "model", "either"])
def test_best_is_selected_from_the_chosen_weights(tmp_path, monkeypatch, select):
    """Validation says: epoch 2 is best for the model (0.6), epoch 3 for the averaged model (0.58)."""
    raw = iter([0.3, 0.6, 0.55])
    averaged = iter([0.35, 0.5, 0.58])
    saved: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def fake_validate(self, model=None):
        is_avg = model is not None
        saved[(self.epoch, "averaged" if is_avg else "model")] = float_state(model if is_avg else self.model)
        return {"val_clean_acc": 0.9, "val_robust_acc": next(averaged if is_avg else raw)}

    monkeypatch.setattr(Trainer, "validate", fake_validate)
    result = train(config(tmp_path, ema_select=select), dataset=synthetic_dataset(), **QUIET)
    want = {"averaged": (3, "averaged", 0.58), "model": (2, "model", 0.6), "either": (2, "model", 0.6)}[select]
    assert (result["best_epoch"], result["best_weights"], result["best_val_value"]) == want
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    reference = saved[(want[0] - 1, want[1])]
    assert all(torch.equal(best[k], reference[k]) for k in reference)


def test_cli_sets_averaging_and_refuses_a_bad_decay_in_one_line(tmp_path, monkeypatch, capsys):
    import fastrobust.train.trainer
    from fastrobust.cli import main

    monkeypatch.setattr(fastrobust.train.trainer, "load_dataset", lambda *a, **k: synthetic_dataset())
    common = ["train", "--method", "fast_at", "--model", "tinycnn", "--dataset", "cifar10", "--epochs", "2",
              "--batch-size", "64", "--device", "cpu", "--quiet", "--json", "--set", "val_pgd_steps=1",
              "--set", "test_pgd_steps=1"]
    assert main(common + ["--out", str(tmp_path / "run"), "--set", "ema_decay=0.9", "--set", "ema_select=either"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["ema_decay"] == 0.9 and result["best_weights"] in ("model", "averaged")
    assert (tmp_path / "run" / "averaged.safetensors").is_file()
    assert main(common + ["--out", str(tmp_path / "bad"), "--set", "ema_decay=1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema_decay=1.5 must be in [0, 1)" in err[0]


def test_speedrun_presets_average_weights_and_run_from_the_cli(tmp_path, monkeypatch, capsys):
    import fastrobust.train.trainer
    from fastrobust.cli import main
    from fastrobust.train.presets import available_presets, load_preset, make_config

    assert {"speedrun", "speedrun-cpu"} <= set(available_presets())
    gpu = make_config(load_preset("speedrun")).validate()
    assert load_preset("speedrun") == load_preset("cifar10-preactresnet18-speedrun")
    assert (gpu.method, gpu.model, gpu.schedule, gpu.amp, gpu.channels_last, gpu.compile) == \
        ("backward_smoothing", "preactresnet18", "cyclic", "bf16", "on", True)
    assert gpu.ema_decay > 0 and (50_000 - gpu.val_size) % gpu.batch_size == 0  # no ragged batch to recompile
    cpu = make_config(load_preset("speedrun-cpu")).validate()
    assert cpu.model == "tinycnn" and cpu.device == "cpu" and cpu.ema_decay > 0 and cpu.train_subset
    monkeypatch.setattr(fastrobust.train.trainer, "load_dataset", lambda *a, **k: synthetic_dataset())
    assert main(["train", "--preset", "speedrun-cpu", "--epochs", "1", "--set", "val_pgd_steps=1", "--set",
                 "test_pgd_steps=1", "--quiet", "--json", "--out", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["best_weights"] == "averaged" and result["config"]["schedule"] == "cyclic"


@pytest.mark.slow  # two spawned ranks: ~20 s idle, a minute on a shared machine
def test_two_ranks_average_like_one_process(tmp_path):
    """Under torchrun every rank averages the same (synchronised) weights; rank 0's average is saved."""
    from test_distributed import assert_close_weights, dataset16, spawn, train_config

    spawn("_train_job", [(str(tmp_path / "two"), "natural", {"ema_decay": 0.8, "epochs": 2})])
    Trainer(train_config(tmp_path / "one", "natural", ema_decay=0.8, epochs=2), dataset=dataset16(), **QUIET).fit()
    two, one = (load_file(str(tmp_path / name / "averaged.safetensors")) for name in ("two", "one"))
    assert_close_weights(two, one)
    assert json.loads((tmp_path / "two" / "result.json").read_text())["best_weights"] == "averaged"


def test_averaging_effect_benchmark_evaluates_both_arms_of_one_run(tmp_path, monkeypatch, capsys, one_thread):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import averaging_effect
    import gpu_suite

    import fastrobust.evaluate

    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    evaluated = []  # the labels of each evaluation's points
    real_evaluate = fastrobust.evaluate.evaluate
    monkeypatch.setattr(fastrobust.evaluate, "evaluate",
                        lambda model, data, *a, **k: evaluated.append(data[1].tolist()) or real_evaluate(model, data, *a, **k))
    root = gpu_suite.make_smoke_archive(tmp_path / "data", train_per_class=12, test_per_class=4).parents[1]
    sets = [f"data_root={root}", "train_subset=64", "val_size=32", "test_subset=32", "epochs=2", "batch_size=32",
            "ema_decay=0.5", "val_pgd_steps=1", "test_pgd_steps=1", "model.width=8"]
    rows = averaging_effect.main(["--preset", "quickstart", "--seeds", "0", "--test-points", "16", "--attacks", "pgd20",
                                  "--out", str(tmp_path / "runs"), *sum((["--set", s] for s in sets), [])])
    assert [r["variant"] for r in rows] == list(averaging_effect.VARIANTS)
    assert all(r["n"] == 16 and r["cpu_seconds_to_trained"] > 0 and r["ema_decay"] == 0.5 for r in rows)
    assert rows[1]["file"].endswith("best.safetensors") and rows[3]["file"].endswith("averaged.safetensors")
    assert "| backward_smoothing | averaged | 1 |" in capsys.readouterr().out
    # every variant on the same class-balanced points (the class-sorted split's first 16 hold 4 classes only)
    assert len(evaluated) == 4 and all(labels == evaluated[0] for labels in evaluated)
    assert sorted(evaluated[0]) == sorted(list(range(10)) + list(range(6)))
