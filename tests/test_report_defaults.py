"""The report labels runs with the values they used, never ``None`` for a setting left at its default: eps (the
attacks' eps), every method parameter (result.json's method_config, or the method's defaults for older
records), and the true image counts of result.json["dataset"] (a sweep's dataset_loader may differ from
val_size/train_subset in the config)."""

from __future__ import annotations

import json
from pathlib import Path

from fastrobust.analysis.report import build_report, collect_runs, group_runs, sensitivity


def write_run(root: Path, name: str, method: str, *, eps=None, test_eps=8 / 255, method_params=None,
              method_config=None, counts=(49000, 1000, 10000), seed=0) -> None:
    run = root / name
    run.mkdir(parents=True)
    config = {"method": method, "method_params": method_params or {}, "model": "tinycnn", "model_params": {},
              "dataset": "cifar10", "epochs": 1, "batch_size": 50, "lr": 0.1, "seed": seed, "eps": eps,
              "val_size": 1000, "train_subset": None, "test_subset": None, "eval_step_size": 2 / 255, "out": str(run)}
    train, val, test = counts
    result = {"config": config, "seed": seed, "train_seconds": 10.0, "best_epoch": 1,
              "dataset": {"name": "cifar10", "source": "somewhere", "train": train, "val": val, "test": test},
              "test": {"clean_acc": 0.5, "pgd20_acc": 0.2, "n": test, "eps": test_eps, "step_size": 2 / 255}}
    if method_config is not None:
        result["method_config"] = method_config
    (run / "result.json").write_text(json.dumps(result))
    (run / "config.json").write_text(json.dumps(config))


def labels(root: Path) -> list[str]:
    runs, _ = collect_runs(root)
    return [label for label, _ in group_runs(runs)]


def test_default_eps_is_shown_as_its_value(tmp_path):
    write_run(tmp_path, "a", "natural")
    write_run(tmp_path, "b", "natural", eps=16 / 255, test_eps=16 / 255)
    assert labels(tmp_path) == ["natural (eps=8/255)", "natural (eps=16/255)"]
    runs, _ = collect_runs(tmp_path)
    [(method, key, header, rows)] = sensitivity(runs)
    assert (method, key, header[0]) == ("natural", "eps", "eps")
    assert [row[0] for row in rows] == ["8/255", "16/255"]


def test_method_parameters_left_at_their_defaults_show_the_default(tmp_path):
    write_run(tmp_path, "default", "backward_smoothing")  # an older record: no method_config
    write_run(tmp_path, "gamma", "backward_smoothing", method_params={"gamma": 0.5})
    write_run(tmp_path, "scaled", "fast_at", eps=16 / 255, test_eps=16 / 255,
              method_config={"eps": 16 / 255, "step_size": 20 / 255, "attack_eval_mode": True})
    write_run(tmp_path, "plain", "fast_at", method_config={"eps": 8 / 255, "step_size": 10 / 255, "attack_eval_mode": True})
    found = labels(tmp_path)
    assert "backward_smoothing (gamma=0.5)" in found and "backward_smoothing (gamma=1)" in found
    assert "fast_at (eps=8/255, step_size=10/255)" in found and "fast_at (eps=16/255, step_size=20/255)" in found
    assert not [label for label in found if "None" in label]


def test_true_image_counts_replace_the_configs_defaults(tmp_path):
    write_run(tmp_path, "small", "natural", counts=(200, 50, 100))
    write_run(tmp_path, "larger", "natural", counts=(400, 50, 100))
    assert labels(tmp_path) == ["natural (train_subset=200)", "natural (train_subset=400)"]
    report = build_report(tmp_path, tmp_path / "report")
    text = Path(report["markdown"]).read_text()
    assert "None" not in text and "train_subset=200" in text
