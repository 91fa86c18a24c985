"""Sweep spec messages: one line each, with the "sweep spec FILE" prefix, a real example, no "run run", an
empty spec refused, and eps written exactly in sweep.json."""

from __future__ import annotations

import json

import pytest

from fastrobust.analysis.sweep import _summary, load_spec, plan_sweep
from fastrobust.errors import ConfigError


def _spec(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_an_empty_grid_list_shows_a_real_example(tmp_path):
    with pytest.raises(ConfigError, match=r"grid.method must be a non-empty list, e.g. method: \[fast_at, "
                                          r"backward_smoothing\]$"):
        load_spec(_spec(tmp_path, "grid: {method: []}\n"))
    with pytest.raises(ConfigError, match=r"e.g. seed: \[3\]$"):  # a plain value: the same value in a list
        load_spec(_spec(tmp_path, "grid: {seed: 3}\n"))


def test_a_single_run_spec_names_the_spec_not_run_run(tmp_path):
    path = _spec(tmp_path, "base: {model: tinycnn, epochs: 0}\n")
    with pytest.raises(ConfigError) as error:
        plan_sweep(load_spec(path), tmp_path / "out")
    assert str(error.value).startswith(f"sweep spec {path}: epochs=0") and "run run" not in str(error.value)


def test_evaluate_number_errors_name_the_spec(tmp_path):
    path = _spec(tmp_path, "base: {model: tinycnn}\nevaluate: {attacks: [pgd20], eps: [8/0]}\n")
    with pytest.raises(ConfigError, match=rf"^sweep spec {path}: evaluate.eps='8/0' divides by zero"):
        load_spec(path)
    path = _spec(tmp_path, "base: {model: tinycnn}\nevaluate: {hessian: {n: 0}}\n")
    with pytest.raises(ConfigError, match=rf"^sweep spec {path}: evaluate.hessian.n"):
        load_spec(path)


def test_a_spec_that_sets_nothing_is_refused(tmp_path):
    for text in ("grid: {}\n", "", "evaluate: [pgd20]\n"):
        with pytest.raises(ConfigError, match=r"sets nothing .*\(preactresnet18 on cifar10, 100 epochs\)"):
            load_spec(_spec(tmp_path, text))
    assert len(plan_sweep(load_spec(_spec(tmp_path, "base: {model: tinycnn, epochs: 1}\ngrid: {}\n")), tmp_path)) == 1


def test_per_epoch_hessian_error_says_it_is_the_default(tmp_path):
    spec = load_spec(_spec(tmp_path, "base: {model: tinycnn, epochs: 1}\nevaluate: {hessian: {n: 8}}\n"))
    assert spec.evaluate.hessian.per_epoch is True
    with pytest.raises(ConfigError, match=r"per_epoch \(true unless set\) needs the per-epoch models"):
        plan_sweep(spec, tmp_path / "out")


def test_sweep_json_writes_eps_exactly(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"train_seconds": 1.0, "test": {"clean_acc": 0.5}}))
    evaluations = [{"eps": eps, "attacks": {"pgd20": {"robust_acc": 0.25}}} for eps in (0.05, 8 / 255, 0.1)]
    (tmp_path / "eval.json").write_text(json.dumps({"evaluations": evaluations}))
    assert list(_summary(tmp_path)["eval"]) == ["0.05", "8/255", "0.1"]
