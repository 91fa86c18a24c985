"""A sweep evaluates class-balanced test points (the test splits are sorted by class: a prefix is a few classes),
re-evaluates runs whose eval.json / hessian.json hold another point set, and stops early when its first runs
all fail alike."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastrobust.analysis.sweep import run_sweep
from fastrobust.cli import main
from fastrobust.data import ImageSet
from fastrobust.errors import FastRobustError

from helpers import synthetic_dataset

BASE = {"model": "tinycnn", "dataset": "synthetic", "epochs": 1, "batch_size": 64, "lr": 0.05, "schedule": "cosine",
        "val_pgd_steps": 1, "test_pgd_steps": 1, "device": "cpu", "eps": "8/255", "save_epoch_models": 1}
QUIET = {"progress": False, "log": lambda _m: None}


def class_sorted_dataset():
    """4 classes, 40 test points sorted by class (10 per class), as CIFAR-10's test split is."""
    data = synthetic_dataset(train=128, val=32, test=40)
    order = torch.argsort(data.test.labels, stable=True)
    return dataclasses.replace(data, test=ImageSet(data.test.images[order], data.test.labels[order]))


def spec(evaluate):
    return {"base": dict(BASE), "methods": {"fast_at": {"step_size": "8/255"}}, "grid": {"method": ["fast_at"]},
            "evaluate": evaluate}


@pytest.fixture
def spies(monkeypatch):
    """Record the labels each extra attack and each Hessian evaluation is given (and skip their work)."""
    import fastrobust.analysis.sweep as sweep

    seen = {"attacks": [], "hessian": []}
    real_evaluate = sweep.evaluate

    def spy_evaluate(model, data, attacks, **kw):
        seen["attacks"].append(data[1].clone())
        return real_evaluate(model, data, attacks, **kw)

    def spy_eigenvalues(model, images, labels, **kw):
        seen["hessian"].append(labels.clone())
        return {init: {"mean": 1.0, "median": 1.0, "std": 0.0, "max": 1.0} for init in kw["inits"]}

    monkeypatch.setattr(sweep, "evaluate", spy_evaluate)  # the names the sweep calls
    monkeypatch.setattr(sweep, "model_eigenvalues", spy_eigenvalues)
    return seen


def test_extra_attacks_and_hessian_take_every_class_of_a_class_sorted_split(tmp_path, spies, one_thread):
    data = class_sorted_dataset()
    evaluate = {"attacks": ["fgsm"], "test_subset": 12, "hessian": {"n": 8, "iterations": 1, "per_epoch": False}}
    run_sweep(spec(evaluate), tmp_path, dataset_loader=lambda _c: data, **QUIET)
    # a prefix would be [0] * 10 + [1] * 2 and [0] * 8: three of every class, and two
    assert torch.bincount(spies["attacks"][0], minlength=4).tolist() == [3, 3, 3, 3]
    assert torch.bincount(spies["hessian"][0], minlength=4).tolist() == [2, 2, 2, 2]
    stored = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert stored["points"] == {"split": "test", "selection": "balanced_head", "count": 12}
    assert stored["evaluations"][0]["n"] == 12
    assert json.loads((tmp_path / "run" / "hessian.json").read_text())["points"]["count"] == 8


def test_an_evaluation_of_other_points_is_redone_and_an_equal_one_kept(tmp_path, spies, one_thread):
    data = class_sorted_dataset()
    evaluate = {"attacks": ["fgsm"], "test_subset": 12, "hessian": {"n": 8, "iterations": 1, "per_epoch": False}}
    run_sweep(spec(evaluate), tmp_path, dataset_loader=lambda _c: data, **QUIET)
    summary = run_sweep(spec(evaluate), tmp_path, dataset_loader=lambda _c: data, **QUIET)
    assert summary["runs"][0]["action"] == "skipped" and len(spies["attacks"]) == len(spies["hessian"]) == 1
    # files as written before the points were class-balanced: no "points" (they were a class-sorted prefix)
    for name in ("eval.json", "hessian.json"):
        path = tmp_path / "run" / name
        stored = json.loads(path.read_text())
        del stored["points"]
        path.write_text(json.dumps(stored))
    assert run_sweep(spec(evaluate), tmp_path, dataset_loader=lambda _c: data, dry_run=True, **QUIET)["runs"][0]["status"] == "evaluate"
    summary = run_sweep(spec(evaluate), tmp_path, dataset_loader=lambda _c: data, **QUIET)
    assert summary["runs"][0]["action"] == "evaluated" and len(spies["attacks"]) == len(spies["hessian"]) == 2
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["points"]["count"] == 12
    # another test_subset: the attacks again, on the new points (the Hessian settings did not change)
    summary = run_sweep(spec(dict(evaluate, test_subset=20)), tmp_path, dataset_loader=lambda _c: data, **QUIET)
    assert summary["runs"][0]["action"] == "evaluated" and len(spies["hessian"]) == 2
    assert torch.bincount(spies["attacks"][-1], minlength=4).tolist() == [5, 5, 5, 5]


def test_a_sweep_whose_first_two_runs_fail_alike_stops_with_one_line(tmp_path, capsys):
    def broken(config):
        return my_dataset  # noqa: F821 - the mistake of docs/experiments.md's old snippet

    grid = {"base": dict(BASE), "grid": {"method": ["natural"], "seed": [0, 1, 2, 3]}}
    with pytest.raises(FastRobustError, match=r"first two runs failed with the same error \(NameError: name 'my_dataset'"):
        run_sweep(grid, tmp_path / "api", dataset_loader=broken, **QUIET)
    saved = json.loads((tmp_path / "api" / "sweep.json").read_text())
    assert [r["status"] for r in saved["runs"]] == ["failed", "failed", "pending", "pending"]
    assert "NameError" in saved["stopped"]

    # through the CLI: one line, exit status 2 (the dataset here does not exist, the same error for every run)
    import yaml

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"base": dict(BASE, dataset="cifar10", data_root=str(tmp_path / "nowhere")),
                                         "grid": {"seed": [0, 1, 2]}}))
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastrobust sweep: error: sweep stopped: its first two runs failed with the same error")
    assert sum(": failed: " in line for line in err) == 2 and not any("Traceback" in line for line in err)


def test_different_failures_or_a_success_first_do_not_stop_the_sweep(tmp_path, one_thread):
    calls = {"n": 0}

    def flaky(config):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError(f"disk on fire {calls['n']}")
        return synthetic_dataset(train=64, val=16, test=16)

    grid = {"base": dict(BASE, save_epoch_models=0), "grid": {"method": ["natural"], "seed": [0, 1, 2]}}
    summary = run_sweep(grid, tmp_path, dataset_loader=flaky, **QUIET)
    assert [r["status"] for r in summary["runs"]] == ["failed", "failed", "done"]
