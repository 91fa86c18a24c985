"""The per-epoch learning rate is labelled for what it is: metrics.jsonl has lr_start / lr_end (the epoch's
first and last step), ``lr`` stays (= lr_end) for older readers, and the console shows ``lr 0.1->...``."""

from __future__ import annotations

import json

import pytest

from fastrobust.train.schedules import lr_schedule
from fastrobust.train import TrainConfig, train
from fastrobust.train.console import epoch_line as _epoch_line

from helpers import synthetic_dataset


def test_a_one_epoch_run_records_and_prints_the_lr_range(tmp_path, one_thread):
    lines = []
    config = TrainConfig(method="natural", model="tinycnn", dataset="synthetic", epochs=1, batch_size=32, lr=0.1,
                         schedule="cosine", val_pgd_steps=1, test_pgd_steps=1, device="cpu", out=str(tmp_path / "run"))
    train(config, dataset=synthetic_dataset(), progress=True, log=lines.append)
    [record] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = 6  # 192 training images / 32
    last = lr_schedule("cosine", 0.1, 1)((steps - 1) / steps)
    assert record["lr_start"] == pytest.approx(0.1)
    assert record["lr_end"] == pytest.approx(last) and record["lr"] == record["lr_end"]
    [epoch_line] = [line for line in lines if line.startswith("epoch 1")]
    assert f"lr 0.1->{last:.4g} |" in epoch_line


def test_the_console_line_of_a_constant_lr_and_of_an_older_record():
    base = {"epoch": 2, "train_loss": 1.0, "epoch_seconds": 1.0, "images_per_second": 10.0}
    assert "| lr 0.05 |" in _epoch_line({**base, "lr_start": 0.05, "lr_end": 0.05, "lr": 0.05})
    assert "| lr 0.01 |" in _epoch_line({**base, "lr": 0.01})
