"""A resumed run reads the data its start read: the data root is recorded resolved in config.json whatever
supplied it (--data-root, $FASTROBUST_DATA, the default cache), and a resume with too few --epochs is refused
before any data is found, loaded or downloaded."""

from __future__ import annotations

import json

import pytest

import fastrobust.data
import fastrobust.train.trainer
import fastrobust.data.datasets as datasets
from fastrobust.cli import main

from helpers import write_cifar10


def _no_download(*_args, **_kwargs):
    raise AssertionError("the download path was reached")


def _train_args(run, *extra):
    return ["train", "--method", "natural", "--model", "tinycnn", "--dataset", "cifar10", "--epochs", "1",
            "--batch-size", "32", "--val-size", "10", "--device", "cpu", "--set", "val_pgd_steps=1",
            "--set", "test_pgd_steps=1", "--out", str(run), "--quiet", *extra]


@pytest.fixture
def env_data(tmp_path, monkeypatch, one_thread):
    root = tmp_path / "env-data"
    write_cifar10(root / "cifar-10-batches-py", per_batch=20)  # 100 training, 20 test images
    monkeypatch.setenv("FASTROBUST_DATA", str(root))
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "decoded"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache, should anything look there
    monkeypatch.setattr(datasets, "download_file", _no_download)
    return root


def test_a_run_with_data_from_the_env_var_resumes_on_that_data_without_it(tmp_path, env_data, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run)) == 0
    assert json.loads((run / "config.json").read_text())["data_root"] == str(env_data.resolve())

    monkeypatch.delenv("FASTROBUST_DATA")  # before the fix: None stored, so the resume downloaded into ~/.cache
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["config"]["epochs"] == 2 and str(env_data.resolve()) in result["dataset"]["source"]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    capsys.readouterr()

    # other data in the recorded place: the checkpoint's data fingerprint still refuses it
    write_cifar10(env_data / "cifar-10-batches-py", per_batch=20, labels_fn=lambda _name, labels: labels[::-1])
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the data" in err[0], err


def test_the_default_cache_root_is_recorded_resolved(tmp_path, monkeypatch, one_thread):
    from fastrobust.train.config import recorded_data_root

    monkeypatch.delenv("FASTROBUST_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert recorded_data_root() == str((tmp_path / ".cache" / "fastrobust" / "data").resolve())
    monkeypatch.setenv("FASTROBUST_DATA", "rel-data")
    monkeypatch.chdir(tmp_path)
    assert recorded_data_root() == str(tmp_path / "rel-data")


def test_resume_with_fewer_epochs_is_refused_before_any_data_is_loaded(tmp_path, env_data, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(_train_args(run, "--epochs", "2")) == 0
    capsys.readouterr()

    def no_data(*_args, **_kwargs):
        raise AssertionError("data was looked for")

    monkeypatch.setattr(fastrobust.train.trainer, "load_dataset", no_data)
    monkeypatch.setattr(datasets, "load_dataset", no_data)
    assert main(["train", "--resume", str(run), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained 2 epochs already" in err[0] and "--epochs 2 or more" in err[0], err
