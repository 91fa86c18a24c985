"""A validation split larger than the training set (--train-subset 100 --val-size 1000) gets a one-line warning."""

from __future__ import annotations

import fastrobust.data
import fastrobust.train.trainer
from fastrobust.cli import main
from fastrobust.train.config import split_sizes_note

from helpers import synthetic_dataset


def test_the_note_names_both_sizes_and_the_fix():
    note = split_sizes_note(100, 1000)
    assert note.startswith("warning:") and "1000 images" in note and "100 images" in note
    assert "--val-size 20" in note and "\n" not in note
    assert split_sizes_note(100, 100) is None and split_sizes_note(49000, 1000) is None


def test_the_cli_warns_once_when_validation_outnumbers_training(tmp_path, monkeypatch, capsys, one_thread):
    small = synthetic_dataset(train=64, val=96, test=32)
    monkeypatch.setattr(fastrobust.train.trainer, "load_dataset", lambda *a, **k: small)
    args = ["train", "--method", "natural", "--model", "tinycnn", "--dataset", "cifar10", "--epochs", "1",
            "--batch-size", "32", "--train-subset", "64", "--val-size", "96", "--device", "cpu",
            "--set", "val_pgd_steps=1", "--set", "test_pgd_steps=1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "larger than the training set" in line]
    assert warned == [split_sizes_note(64, 96)]
