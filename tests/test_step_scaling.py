"""Step sizes follow eps: a run given eps but no step size trains with the step each method's published rule
gives for that eps (Fast AT 1.25*eps, backward smoothing eps, TRADES eps/4, ...), says so in one line, and
keeps step sizes given explicitly."""

from __future__ import annotations

import dataclasses

import pytest

from fastrobust.methods import method_class
from fastrobust.methods import step_scaling
from fastrobust.train import Trainer, TrainConfig

from helpers import synthetic_dataset

EPS16 = 16 / 255


def built(method: str, **settings):
    return TrainConfig(method=method, **settings).validate().build_method().config


@pytest.mark.parametrize("method, field, expected", [
    ("fast_at", "step_size", 20 / 255),            # before: 10/255 = 0.625*eps
    ("backward_smoothing", "step_size", 16 / 255),  # before: 8/255
    ("backward_smoothing_at", "step_size", 16 / 255),
    ("trades", "step_size", 4 / 255),               # before: 2/255
    ("pgd_at", "step_size", 4 / 255),
    ("fast_trades", "step_size", 12 / 255),         # the eps16 preset's value
    ("fast_at_2step", "step_size", 8 / 255),
    ("fast_at_plus", "step_size", 20 / 255),
    ("fast_at_plus", "fallback_step_size", 4 / 255),
])
def test_step_sizes_scale_with_eps(method, field, expected):
    config = built(method, eps=EPS16)
    assert config.eps == pytest.approx(EPS16)
    assert getattr(config, field) == pytest.approx(expected, abs=1e-12)


def test_explicit_step_sizes_and_the_default_eps_are_untouched():
    assert built("trades", eps=EPS16, method_params={"step_size": 3 / 255}).step_size == pytest.approx(3 / 255)
    assert built("fast_at", method_params={"eps": EPS16, "step_size": 16 / 255}).step_size == pytest.approx(16 / 255)
    assert built("fast_trades", method_params={"eps": "16/255", "step_size": "12/255"}).step_size == pytest.approx(12 / 255)
    assert built("fast_at", method_params={"eps": "16/255"}).step_size == pytest.approx(20 / 255)  # as YAML gives it
    assert built("fast_at", method_params={"eps": EPS16}).step_size == pytest.approx(20 / 255)  # method.eps too
    assert built("fast_at", eps=8 / 255).step_size == pytest.approx(10 / 255)
    assert built("fast_at").step_size == pytest.approx(10 / 255)
    assert built("fast_at", eps=4 / 255).step_size == pytest.approx(5 / 255)
    assert TrainConfig(method="fast_at", eps=EPS16).validate().method_params == {}  # config.json unchanged


def test_every_rule_is_the_ratio_of_the_methods_defaults():
    for method, rules in step_scaling.RULES.items():
        defaults = {f.name: f.default for f in dataclasses.fields(method_class(method).Config)}
        for field, (ratio, source) in rules.items():
            assert ratio == pytest.approx(defaults[field] / defaults["eps"]), (method, field)
            assert source
    for method in ("pgd_at", "trades", "fast_at", "fast_at_2step", "fast_trades", "fast_at_plus",
                   "backward_smoothing", "backward_smoothing_at"):  # every method with eps and a step size
        assert {f.name for f in step_scaling.step_fields(method)} == set(step_scaling.RULES[method]), method


def test_a_step_size_without_a_rule_is_kept_with_a_notice(monkeypatch):
    monkeypatch.setitem(step_scaling.RULES, "fast_trades", {})
    params, line = step_scaling.scale_steps("fast_trades", {"eps": EPS16})
    assert "step_size" not in params
    assert "step_size 6/255 (default, NOT scaled" in line and "method.step_size" in line and "\n" not in line


def test_the_trainer_says_which_step_sizes_it_uses(tmp_path, one_thread):
    lines = []
    settings = dict(model="tinycnn", dataset="synthetic", epochs=1, batch_size=32, device="cpu",
                    val_pgd_steps=1, test_pgd_steps=1)
    trainer = Trainer(TrainConfig(method="fast_at", eps=EPS16, out=str(tmp_path / "a"), **settings),
                      dataset=synthetic_dataset(), progress=False, log=lines.append)
    assert trainer.method.config.step_size == pytest.approx(20 / 255)
    said = [line for line in lines if "step_size" in line]
    assert said == ["fast_at at eps 16/255: step_size 20/255 (1.25*eps: Wong et al. 2020, FGSM-RS alpha = 1.25 eps)"]
    result = trainer.fit()  # result.json records the parameters as used (the report labels runs with them)
    assert result["method_config"]["step_size"] == pytest.approx(20 / 255)
    assert result["config"]["method_params"] == {}

    lines.clear()
    Trainer(TrainConfig(method="fast_at", out=str(tmp_path / "b"), **settings), dataset=synthetic_dataset(),
            progress=False, log=lines.append)
    assert not [line for line in lines if "step_size" in line]  # the default eps: nothing to say


def test_the_trainers_pgd_steps_follow_eps_as_evaluates_do(tmp_path, one_thread):
    """At eps 0.3 twenty steps of the old fixed 2/255 move at most 0.157: the trainer's PGD-20 could never
    reach the ball's edge and reported about twice eval's robust accuracy. Both now take default_step."""
    from fastrobust.evaluate import default_step, evaluate
    from fastrobust.models.checkpoint import load_model

    settings = dict(model="tinycnn", dataset="synthetic", epochs=1, batch_size=32, device="cpu",
                    val_pgd_steps=10, test_pgd_steps=20, eps=0.3)
    data = synthetic_dataset()
    result = Trainer(TrainConfig(method="natural", out=str(tmp_path / "r"), **settings), dataset=data,
                     progress=False, log=lambda _: None).fit()
    assert result["test"]["step_size"] == pytest.approx(default_step(0.3, 20, "linf")) == pytest.approx(0.0375)
    model, _ = load_model(tmp_path / "r" / "best.safetensors")
    record = evaluate(model, data.test, ["pgd20"], eps=0.3, progress=False)
    assert record["attacks"]["pgd20"]["settings"]["step_size"] == pytest.approx(result["test"]["step_size"])
    assert result["test"]["pgd20_acc"] == pytest.approx(record["attacks"]["pgd20"]["robust_acc"])
    # an explicit eval_step_size is kept, and a run stored with the old 2/255 at eps 8/255 is the same run
    from fastrobust.train.run_folder import without_legacy_eval_step
    assert without_legacy_eval_step({"eps": None, "eval_step_size": 2 / 255, "val_pgd_steps": 10,
                                     "test_pgd_steps": 20})["eval_step_size"] is None
    assert without_legacy_eval_step({"eps": 0.3, "eval_step_size": 2 / 255, "val_pgd_steps": 10,
                                     "test_pgd_steps": 20})["eval_step_size"] == 2 / 255


def test_two_different_budgets_are_refused():
    from fastrobust.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eps 4/255 \(--eps / eps\) and the method's eps 16/255 .* disagree"):
        TrainConfig(method="pgd_at", eps=4 / 255, method_params={"eps": "16/255"}).validate()
    same = TrainConfig(method="pgd_at", eps=16 / 255, method_params={"eps": "16/255"}).validate()
    assert same.build_method().config.eps == pytest.approx(16 / 255)
