"""A plan before a long run (issue: what the user sees): ``fastrobust train ... --plan`` times a few real training
steps on random images and prints what the run will cost here, without reading data or making a run folder; a
preset sized for a GPU started on a CPU warns with that estimate and names the CPU preset."""

from __future__ import annotations

import pytest

import fastrobust.train as train_face
import fastrobust.train.trainer as trainer_module
from fastrobust.cli import main
from fastrobust.errors import ConfigError
from fastrobust.train.plan import duration, gpu_preset_on_cpu, probe
from fastrobust.train.presets import load_preset, make_config


def no_data(*_args, **_kwargs):
    raise AssertionError("data was read")


def test_plan_prints_the_cost_and_makes_nothing(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(trainer_module, "load_dataset", no_data)
    out = tmp_path / "run"
    assert main(["train", "--preset", "quickstart", "--device", "cpu", "--batch-size", "16", "--out", str(out),
                 "--plan"]) == 0
    text = capsys.readouterr().out
    assert "device cpu; precision fp32; channels_last off; compile off" in text
    assert "method cost: 4 forward+backward passes per step (declared)" in text  # Backward Smoothing
    assert "s per step -> " in text and "estimate: about " in text and "for 5 epochs" in text
    assert not out.exists()


def test_the_estimate_scales_with_the_steps_and_epochs(one_thread):
    config = make_config({**load_preset("quickstart"), "device": "cpu", "batch_size": 16, "epochs": 3})
    plan = probe(config, warmup=1, steps=1)
    images = config.train_subset
    assert plan.steps_per_epoch == -(-images // 16)
    assert plan.epoch_seconds == pytest.approx(plan.steps_per_epoch * plan.step_seconds)
    assert plan.total_seconds == pytest.approx(3 * (plan.epoch_seconds + plan.validation_seconds))
    assert duration(42) == "42 s" and duration(300) == "5.0 min" and duration(7200) == "2.0 h"


def test_a_gpu_preset_on_a_cpu_warns_with_the_estimate_before_it_starts(monkeypatch, capsys, tmp_path, one_thread):
    class Started(Exception):
        pass

    def refuse(*_args, **_kwargs):
        raise Started

    monkeypatch.setattr(train_face, "Trainer", refuse)
    with pytest.raises(Started):
        main(["train", "--preset", "speedrun", "--device", "cpu", "--set", "batch_size=4", "--out",
              str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "preset 'speedrun' is sized for a GPU (preactresnet18, 30 epochs" in err
    assert "about " in err and "--preset speedrun-cpu" in err


def test_only_gpu_sized_runs_on_a_cpu_are_warned_about():
    speedrun = make_config({**load_preset("speedrun"), "device": "cpu"})
    assert gpu_preset_on_cpu(speedrun, "speedrun")
    assert not gpu_preset_on_cpu(make_config({**load_preset("speedrun-cpu"), "device": "cpu"}), "speedrun-cpu")
    assert not gpu_preset_on_cpu(make_config({**load_preset("speedrun"), "device": "cpu", "train_subset": 500}),
                                 "speedrun")
    assert not gpu_preset_on_cpu(speedrun, None)  # a run configured by hand says what it wants


def test_plan_refuses_a_dataset_of_unknown_shape():
    with pytest.raises(ConfigError, match="--plan needs a dataset of known image shape"):
        probe(make_config({"method": "natural", "model": "tinycnn", "dataset": "imagefolder", "device": "cpu"}))


def test_sweep_dry_run_estimates_each_run_with_one_probe_per_setting(tmp_path, monkeypatch, capsys, one_thread):
    import fastrobust.train.plan as plan_module

    probed = []
    real_probe = plan_module.probe
    monkeypatch.setattr(plan_module, "probe", lambda config, **kw: probed.append(config.seed) or real_probe(config, **kw))
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: {dataset: cifar10, model: tinycnn, train_subset: 64, val_size: 16, epochs: 2, "
                    "batch_size: 16, device: cpu}\ngrid:\n  method: [natural]\n  seed: [0, 1]\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count(", about ") == 2 and "estimated training time of the runs to do on this machine: about" in text
    assert len(probed) == 1  # the two seeds share one probe
    assert not (tmp_path / "sweep").exists()
