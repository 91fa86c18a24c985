"""A plan before a long run (issue: what the user sees): ``fastrobust train ... --plan`` times a few real training
steps on random images and prints what the run will cost here, without reading data or making a run folder; a
preset sized for a GPU started on a CPU warns with that estimate and names the CPU preset."""

from __future__ import annotations

import pytest
import torch

import fastrobust.train as train_face
import fastrobust.train.plan as plan_module
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


class SlowClock:
    """A clock on which every reading is ``seconds`` later than the one before: every step looks slow."""

    def __init__(self, seconds: float) -> None:
        self.now, self.seconds = 0.0, seconds

    def perf_counter(self) -> float:
        self.now += self.seconds
        return self.now


def counting_optimizer(monkeypatch) -> list[int]:
    """Counts the optimiser steps the probe takes (one per training step)."""
    steps: list[int] = []

    class CountingSGD(torch.optim.SGD):
        def step(self, *args, **kwargs):
            steps.append(1)
            return super().step(*args, **kwargs)

    monkeypatch.setattr(plan_module.torch.optim, "SGD", CountingSGD)
    return steps


def test_a_slow_step_is_timed_once_and_the_plan_says_so(monkeypatch, one_thread):
    steps = counting_optimizer(monkeypatch)
    monkeypatch.setattr(plan_module, "time", SlowClock(2 * plan_module.SLOW_STEP_SECONDS))
    told: list[str] = []
    config = make_config({**load_preset("quickstart"), "device": "cpu", "batch_size": 4})
    plan = probe(config, warmup=1, steps=3, log=told.append)
    assert len(steps) == 2 and plan.timed_steps == 1 and plan.stopped_early  # the warm-up and one timed step
    assert told == ["timing 3 training steps (after 1 warm-up) of this config on cpu ..."]
    assert "(timed on 1 step only: steps over 5 s are not timed again)" in plan.lines()[2]


def test_fast_steps_are_all_timed(monkeypatch, one_thread):
    steps = counting_optimizer(monkeypatch)
    config = make_config({**load_preset("quickstart"), "device": "cpu", "batch_size": 4})
    plan = probe(config, warmup=1, steps=3)
    assert len(steps) == 4 and plan.timed_steps == 3 and not plan.stopped_early
    assert "timed on" not in plan.lines()[2]


def test_plan_says_what_it_times_before_it_starts(tmp_path, monkeypatch, capsys, one_thread):
    def quiet_probe(config, **kwargs):
        kwargs["log"]("said before the probe")
        raise ConfigError("stop here")

    monkeypatch.setattr(plan_module, "probe", quiet_probe)
    assert main(["train", "--preset", "quickstart", "--device", "cpu", "--plan"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "said before the probe"


def test_a_gpu_preset_on_a_cpu_refuses_a_used_out_before_the_probe(tmp_path, monkeypatch, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    (used / "result.json").write_text("{}")
    monkeypatch.setattr(plan_module, "gpu_preset_on_cpu", lambda *_args: True)
    monkeypatch.setattr(plan_module, "probe", lambda *_args, **_kwargs: pytest.fail("probed before the folder check"))
    assert main(["train", "--preset", "speedrun", "--out", str(used)]) == 2
    err = capsys.readouterr().err
    assert f"--out {used} already holds a run" in err and len(err.strip().splitlines()) == 1, err
