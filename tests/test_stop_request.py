"""A stop the user asks for (Ctrl-C, SIGTERM) during training: a long step acknowledges the first Ctrl-C at once
(the stop itself waits for the step to end), and the command's last line says ``stopped:``, not ``error:``."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import synthetic_dataset

from fastrobust.cli import main, train_cmd
from fastrobust.errors import StopRequested, TrainingStopped
from fastrobust.train import TrainConfig, Trainer, train
from fastrobust.train import trainer as trainer_module

QUIET = {"progress": False, "log": lambda _: None}


def config(tmp_path) -> TrainConfig:
    return TrainConfig(method="natural", model="tinycnn", model_params={"width": 4}, dataset="synthetic", epochs=2,
                       batch_size=8, lr=0.05, val_pgd_steps=1, test_pgd_steps=1, device="cpu", out=str(tmp_path / "run"))


def ctrl_c_at_step(monkeypatch, step: int) -> None:
    """A real SIGINT to this process while the ``step``-th training step (from 1) runs."""
    original = Trainer._step

    def step_then_signal(self, x, y):
        if self.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "_step", step_then_signal)


def test_ctrl_c_during_long_steps_is_acknowledged_at_once(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(trainer_module, "LONG_STEP_SECONDS", 0.0)  # every step counts as long
    ctrl_c_at_step(monkeypatch, 3)
    with pytest.raises(StopRequested, match=r"SIGINT received: stopped at epoch 1, batch 3; checkpoint saved"):
        train(config(tmp_path), dataset=synthetic_dataset(train=64, val=16, test=16), **QUIET)
    assert capsys.readouterr().err.splitlines() == [trainer_module.STOPPING]


def test_ctrl_c_during_short_steps_says_nothing_until_the_stop(tmp_path, monkeypatch, capsys, one_thread):
    ctrl_c_at_step(monkeypatch, 3)  # tinycnn steps take milliseconds
    with pytest.raises(StopRequested):
        train(config(tmp_path), dataset=synthetic_dataset(train=64, val=16, test=16), **QUIET)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error, line", [
    (StopRequested("SIGINT received: stopped at epoch 1, batch 8; checkpoint saved. Resume with: X"),
     "fastrobust train: stopped: SIGINT received: stopped at epoch 1, batch 8; checkpoint saved. Resume with: X"),
    (TrainingStopped("the loss became NaN or Inf at epoch 1; stopped"),
     "fastrobust train: error: the loss became NaN or Inf at epoch 1; stopped"),
])
def test_a_requested_stop_is_labelled_stopped_and_a_failure_error(monkeypatch, capsys, error, line):
    def raising(_args):
        raise error

    monkeypatch.setattr(train_cmd, "run", raising)
    assert main(["train"]) == 2  # the documented exit status of both
    assert capsys.readouterr().err.strip() == line
