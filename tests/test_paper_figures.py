"""The paper's stability (Fig. 5) and loss-smoothness (Fig. 3) figures from one sweep and one report command:
grids as lists, the per-epoch Hessian evaluation, and reports without a machine's absolute paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastrobust.analysis.report import build_report, portable_path
from fastrobust.analysis.sweep import load_spec, plan_sweep, run_sweep
from fastrobust.errors import ConfigError

from helpers import synthetic_dataset

BASE = {"model": "tinycnn", "dataset": "synthetic", "epochs": 2, "batch_size": 64, "lr": 0.05, "schedule": "cosine",
        "val_pgd_steps": 1, "test_pgd_steps": 20, "device": "cpu", "eps": "8/255", "save_epoch_models": 1}
QUIET = dict(progress=False, log=lambda _m: None)


def test_a_list_of_grids_plans_the_union_once(tmp_path):
    spec = load_spec({"base": BASE, "grid": [{"method": ["natural", "fast_at"]},
                                             {"method": ["fast_at"], "seed": [0, 1]}]})
    runs = plan_sweep(spec, tmp_path)
    assert [r.name for r in runs] == ["natural", "fast_at", "fast_at_seed-1"]  # fast_at seed 0 is planned once
    assert [r.config.seed for r in runs] == [0, 0, 1]
    with pytest.raises(ConfigError, match="grid must be a mapping"):
        load_spec({"base": BASE, "grid": [["method"]]})


def test_per_epoch_hessian_needs_the_epoch_models(tmp_path):
    base = {k: v for k, v in BASE.items() if k != "save_epoch_models"}
    with pytest.raises(ConfigError, match="save_epoch_models: 1"):
        plan_sweep(load_spec({"base": base, "grid": {"method": ["fast_at"]}, "evaluate": {"hessian": True}}), tmp_path)
    with pytest.raises(ConfigError, match="evaluate.hessian.inits"):
        load_spec({"base": BASE, "grid": {"method": ["fast_at"]}, "evaluate": {"hessian": {"inits": ["nowhere"]}}})


def test_sweep_writes_per_epoch_hessian_and_the_report_draws_figures_3_and_5(tmp_path):
    spec = {"base": BASE, "grid": {"method": ["fast_at", "backward_smoothing"], "seed": [0, 1]},
            "evaluate": {"attacks": ["fgsm"], "test_subset": 16,
                         "hessian": {"n": 8, "iterations": 3, "batch_size": 8}}}
    data = synthetic_dataset(train=128, val=32, test=32)
    summary = run_sweep(spec, tmp_path / "runs", dataset_loader=lambda _c: data, **QUIET)
    assert summary["counts"] == {"done": 4}
    hessian = json.loads((tmp_path / "runs" / "fast_at_seed-1" / "hessian.json").read_text())
    assert [r["epoch"] for r in hessian["records"]] == [1, 2]
    assert hessian["records"][0]["model"] == "epochs/epoch-001.safetensors"  # relative to the run folder
    for record in hessian["records"]:
        assert record["random"]["mean"] > 0 and record["backward_smoothing"]["mean"] > 0
    again = run_sweep(spec, tmp_path / "runs", dataset_loader=lambda _c: data, **QUIET)  # nothing left to do
    assert {r["action"] for r in again["runs"]} == {"skipped"}

    written = build_report(tmp_path / "runs", tmp_path / "report")
    names = {Path(f).name for f in written["figures"]}
    assert {"stability.png", "hessian.png"} <= names
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Loss smoothness (paper Fig. 3)" in text and "random / backward-smoothing (last epoch)" in text
    assert "Stability over seeds" in text
    assert (tmp_path / "report" / "hessian.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_no_absolute_path(tmp_path, monkeypatch):
    root = tmp_path / "machine" / "data"
    run = tmp_path / "runs" / "natural"
    run.mkdir(parents=True)
    config = {"method": "natural", "model": "tinycnn", "dataset": "cifar10", "data_root": str(root), "seed": 0,
              "epochs": 1, "out": str(run)}
    source = f"{root}/cifar10-jpeg/cifar10-jpeg.tar.gz (JPEG mirror CIFAR-10-images/{{train,test}}/<class>/*.jpg)"
    (run / "result.json").write_text(json.dumps({
        "config": config, "train_seconds": 1.0, "dataset": {"name": "cifar10", "source": source},
        "test": {"clean_acc": 0.5, "pgd20_acc": 0.1, "n": 10}}))
    monkeypatch.delenv("FASTROBUST_DATA", raising=False)
    build_report(tmp_path / "runs", tmp_path / "report", notes=[f"data in {root}", f"made in {tmp_path}/elsewhere/x"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "source: <data root>/cifar10-jpeg/cifar10-jpeg.tar.gz (JPEG mirror CIFAR-10-images/{train,test}/<class>/*.jpg)" in text
    assert str(tmp_path) not in text and str(tmp_path) not in (tmp_path / "report" / "report.html").read_text()
    assert "data in <data root>/" in text and ".../elsewhere/x" in text


def test_portable_path_keeps_fractions_and_relative_paths():
    assert portable_path("eps 8/255, Time / TRADES, runs/a/b") == "eps 8/255, Time / TRADES, runs/a/b"
    assert portable_path("/opt/x/data/cifar.tar", ["/opt/x/data"]) == "<data root>/cifar.tar"
