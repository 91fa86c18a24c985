"""Method fidelity (issue 16): the authors' settings and state that must survive a resume.

Schedules with the authors' shapes, no weight decay on activation parameters, SLAT's latent step following
eps, Fast AT+'s fallback in checkpoints and its need of a validation split, and SPROUT's u optimiser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrobust import methods
from fastrobust.errors import ConfigError
from fastrobust.methods.sprout import SPROUT
from fastrobust.models import create as create_model
from fastrobust.models.activations import SmoothReLU
from fastrobust.train.optim import parameter_groups
from fastrobust.train.presets import load_preset, make_config
from fastrobust.train.schedules import lr_schedule
from fastrobust.train import Trainer, TrainConfig, resume, train

from helpers import synthetic_dataset

QUIET = dict(progress=False, log=lambda _message: None)


# ---- schedules -------------------------------------------------------------------------------------------------
def torch_lrs(make_scheduler, steps: int, base_lr: float) -> list[float]:
    """The lr torch's scheduler gives each of ``steps`` optimiser steps (read before the step, as training does)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cyclic_peak_is_a_parameter_and_matches_the_authors_cyclic_lr():
    epochs, per_epoch, peak_lr = 4, 25, 0.2
    total = epochs * per_epoch
    ours = {peak: lr_schedule("cyclic", peak_lr, epochs, peak=peak) for peak in (0.0, 0.4, 0.5)}
    # Wong et al. / BS train_pgdat_fast.py: CyclicLR(0, max, step_size_up=total/2, step_size_down=total/2)
    wong = torch_lrs(lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.0, peak_lr, step_size_up=total // 2,
                                                                 step_size_down=total // 2), total, 0.0)
    assert [ours[0.5](k / per_epoch) for k in range(total)] == pytest.approx(wong, abs=1e-12)
    # BS authors' accelerated TRADES-type scripts: CyclicLR(0, 2*lr, step_size_up=1, step_size_down=total):
    # their first step runs at lr 0, after that ours is theirs one step earlier
    bs = torch_lrs(lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.0, peak_lr, step_size_up=1, step_size_down=total),
                   total + 1, 0.0)
    assert bs[0] == 0 and [ours[0.0](k / per_epoch) for k in range(total)] == pytest.approx(bs[1:], abs=1e-12)
    assert ours[0.0](0) == peak_lr and ours[0.0](epochs / 2) == pytest.approx(peak_lr / 2)
    # SLAT (the default): up to the peak at 40%, then down to 0
    assert lr_schedule("cyclic", peak_lr, 10)(4) == pytest.approx(peak_lr) == ours[0.4](1.6)
    assert ours[0.4](0) == 0 and ours[0.4](epochs) == 0 and ours[0.4](2.8) == pytest.approx(peak_lr / 2)
    assert lr_schedule("cyclic", 0.1, 10, peak=1.0)(10) == pytest.approx(0.1)


def test_piecewise_milestones_reproduce_sprouts_stages():
    """SPROUT's authors: 200 epochs in stages of 80, 60, 40 and 20, lr / 10 at each (MultiStepLR)."""
    ours = lr_schedule("piecewise", 0.01, 200, milestones=[0.4, 0.7, 0.9])
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [80, 140, 180], gamma=0.1), 200, 0.01)
    assert [ours(epoch) for epoch in range(200)] == pytest.approx(theirs, rel=1e-9)
    assert lr_schedule("piecewise", 0.1, 10, milestones="0.5,0.75", factor=0.5)(8) == pytest.approx(0.025)


@pytest.mark.parametrize("name, params, message", [
    ("cyclic", {"peak": 1.5}, "peak=1.5 must be a fraction"),
    ("cyclic", {"milestones": [0.5]}, "no parameter milestones"),
    ("piecewise", {"milestones": [0.7, 0.4]}, "must increase"),
    ("piecewise", {"milestones": [0.5, 1.0]}, "fraction of the training in"),
    ("piecewise", {"factor": 0}, "factor=0"),
    ("cosine", {"peak": 0.5}, "its parameters: none"),
])
def test_schedule_parameters_are_checked(name, params, message):
    with pytest.raises(ConfigError, match=message):
        lr_schedule(name, 0.1, 10, **params)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(schedule=name, schedule_params=params).validate()


@pytest.mark.parametrize("preset, peak", [
    ("cifar10-resnet18-backward_smoothing-accelerated", 0.0), ("cifar10-resnet18-trades-accelerated", 0.0),
    ("cifar10-resnet18-fast_trades-accelerated", 0.0), ("cifar10-resnet18-fast_at-accelerated", 0.5),
    ("cifar10-resnet18-slat", 0.4), ("cifar10-wrn28_10-slat", 0.4),
])
def test_each_cyclic_preset_has_its_authors_peak(preset, peak):
    config = make_config(load_preset(preset)).validate()
    schedule = lr_schedule(config.schedule, config.lr, config.epochs, **config.schedule_params)
    grid = [i * config.epochs / 300 for i in range(301)]
    lrs = [schedule(t) for t in grid]
    assert grid[max(range(len(lrs)), key=lrs.__getitem__)] == pytest.approx(peak * config.epochs, abs=0.11)
    assert max(lrs) == pytest.approx(0.2) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_cli_schedule_parameters_and_a_schedule_flag_over_a_preset():
    import argparse

    from fastrobust.cli.train_cmd import collect_settings, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--preset", "cifar10-resnet18-fast_at-accelerated", "--set", "schedule.peak=0.3",
                              "--attack-precision", "fp32"])
    config = make_config(collect_settings(args)).validate()
    assert config.schedule_params == {"peak": 0.3} and config.attack_precision == "fp32" and config.amp == "bf16"
    # another schedule on the command line does not inherit the preset's cyclic peak
    args = parser.parse_args(["train", "--preset", "cifar10-resnet18-fast_at-accelerated", "--schedule", "cosine"])
    assert make_config(collect_settings(args)).validate().schedule_params == {}
    args = parser.parse_args(["train", "--preset", "cifar10-resnet18-trades", "--schedule", "piecewise",
                              "--set", "schedule.milestones=0.4,0.7,0.9", "--method", "pgd_at",
                              "--set", "method.steps=3"])
    config = make_config(collect_settings(args)).validate()
    assert config.schedule_params == {"milestones": "0.4,0.7,0.9"} and config.method_params == {"steps": "3"}


# ---- parameter groups ------------------------------------------------------------------------------------------
def test_activation_parameters_get_no_weight_decay_and_norms_and_biases_optionally():
    model = create_model("tinycnn", num_classes=4, activation="smoothrelu")
    activation_params = {id(p) for m in model.modules() if isinstance(m, SmoothReLU) for p in m.parameters()}
    assert activation_params
    decay, free = parameter_groups(model, 5e-4)
    assert {id(p) for p in free["params"]} == activation_params and free["weight_decay"] == 0.0
    assert decay["weight_decay"] == 5e-4 and not activation_params & {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(free["params"]) == len(list(model.parameters()))

    decay, free = parameter_groups(model, 5e-4, decay_norm_and_bias=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() > 1 for p in decay["params"]), [names[id(p)] for p in decay["params"] if p.dim() <= 1]
    assert {names[id(p)] for p in free["params"]} >= {n for n in names.values() if n.endswith("bias")}
    # nothing to exempt: one group, as SGD(model.parameters()) makes
    assert len(parameter_groups(create_model("tinycnn", num_classes=4), 5e-4)) == 1


def test_smoothrelu_b_keeps_its_value_when_its_gradient_is_zero(tmp_path):
    """Before: b = sqrt_b**2 decayed with the weights (400 -> 89 after 1,500 SGD steps with zero loss gradient)."""
    config = TrainConfig(method="natural", model="tinycnn", activation="smoothrelu", dataset="synthetic", epochs=1,
                         batch_size=32, lr=0.1, out=str(tmp_path / "run"), device="cpu")
    trainer = Trainer(config, dataset=synthetic_dataset(train=64, val=16, test=16), **QUIET)
    sqrt_b = [m.sqrt_b for m in trainer.model.modules() if isinstance(m, SmoothReLU)]
    b_before = [p.detach().clone() for p in sqrt_b]
    conv = trainer.model.conv1.weight if hasattr(trainer.model, "conv1") else next(trainer.model.parameters())
    conv_before = conv.detach().clone()
    for _ in range(200):
        for p in trainer.model.parameters():
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
    for p, before in zip(sqrt_b, b_before):
        assert torch.equal(p.detach(), before)
    assert conv.norm() < 0.99 * conv_before.norm(), "control: the weights do decay"


# ---- SLAT --------------------------------------------------------------------------------------------------------
def test_slat_latent_step_follows_eps_unless_set(monkeypatch):
    assert methods.create("slat").config.latent_step == pytest.approx(8 / 255)
    assert methods.create("slat", eps=16 / 255).config.latent_step == pytest.approx(16 / 255)
    assert methods.create("slat", eps="16/255", eps_latent="4/255").config.latent_step == pytest.approx(4 / 255)
    assert TrainConfig(method="slat", eps=4 / 255).build_method().config.latent_step == pytest.approx(4 / 255)
    with pytest.raises(ConfigError, match="eps_latent"):
        methods.create("slat", eps_latent="-1")
    # the step the method applies
    from fastrobust.methods import slat as slat_module

    used = []
    original = slat_module.latent_delta
    monkeypatch.setattr(slat_module, "latent_delta", lambda h, s, lo, hi, eps: (used.append(eps), original(h, s, lo, hi, eps))[1])
    model = create_model("tinycnn", num_classes=4, image_size=8).train()
    methods.create("slat", eps=16 / 255)(model, torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,)))
    assert used and all(eps == pytest.approx(16 / 255) for eps in used)


def test_wrn_slat_preset_has_the_authors_dropout():
    config = make_config(load_preset("cifar10-wrn28_10-slat")).validate()
    assert config.model_params == {"dropout": 0.3}
    model = create_model(config.model, num_classes=10, **config.model_params)
    rates = {m.dropout for m in model.modules() if hasattr(m, "dropout") and isinstance(m.dropout, float)}
    assert rates == {0.3}


# ---- Fast AT+ ---------------------------------------------------------------------------------------------------
def fast_at_plus_config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    settings = dict(method="fast_at_plus", model="tinycnn", dataset="synthetic", epochs=4, batch_size=32, lr=0.05,
                    schedule="cosine", val_pgd_steps=1, test_pgd_steps=1, out=str(tmp_path / name), device="cpu",
                    method_params={"fallback_steps": 2})
    settings.update(overrides)
    return TrainConfig(**settings)


def test_fast_at_plus_resumed_after_a_collapse_trains_like_the_uninterrupted_run(tmp_path, monkeypatch):
    """Validation reports 0.5, 0.1 (a collapse: epoch 3 must use PGD), 0.45, 0.5. One run crashes at the start of
    epoch 3, right after the checkpoint written at the end of the collapsed epoch, and is resumed."""
    data = synthetic_dataset()

    def scripted(values):
        reported = iter(values)
        return lambda self: {"val_clean_acc": 0.9, "val_robust_acc": next(reported)}

    monkeypatch.setattr(Trainer, "validate", scripted([0.5, 0.1, 0.45, 0.5]))
    train(fast_at_plus_config(tmp_path, "straight"), dataset=data, **QUIET)

    original_epoch = Trainer._train_epoch

    def crash_in_epoch_3(self, stop):
        if self.epoch == 2:
            raise RuntimeError("simulated crash")
        return original_epoch(self, stop)

    monkeypatch.setattr(Trainer, "validate", scripted([0.5, 0.1]))
    monkeypatch.setattr(Trainer, "_train_epoch", crash_in_epoch_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(fast_at_plus_config(tmp_path, "crashed"), dataset=data, **QUIET)
    monkeypatch.setattr(Trainer, "_train_epoch", original_epoch)
    monkeypatch.setattr(Trainer, "validate", scripted([0.45, 0.5]))
    resume(tmp_path / "crashed", dataset=data, **QUIET)

    def attacks(run):
        return [json.loads(line)["method"]["attack"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert attacks("straight") == ["fgsm_rs", "fgsm_rs", "pgd2", "fgsm_rs"]
    assert attacks("crashed") == attacks("straight")
    a, b = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(tmp_path / "crashed" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fast_at_plus_state_round_trip_and_a_resumed_epoch_keeps_its_attack():
    method = methods.create("fast_at_plus")
    assert method.start_epoch(0) == {"attack": "fgsm_rs"}
    method.after_restore()
    assert method.start_epoch(1) == {"attack": "pgd10"}
    state = method.state_dict()
    other = methods.create("fast_at_plus")
    other.load_state_dict(state)
    assert other.start_epoch(1) == {"attack": "pgd10"}, "an epoch resumed in its middle keeps its attack"
    assert other.start_epoch(2) == {"attack": "fgsm_rs"}
    other.load_state_dict({})  # a checkpoint from before this state existed
    assert other.start_epoch(5) == {"attack": "fgsm_rs"}
    with pytest.raises(ConfigError, match="fast_at_plus keeps"):
        other.load_state_dict({"u": torch.ones(2)})


def test_fast_at_plus_without_validation_is_refused_and_overridden_collapse_options_say_so(tmp_path):
    with pytest.raises(ConfigError, match="needs a validation split.*val_size=0.*silently train fast_at"):
        TrainConfig(method="fast_at_plus", val_size=0).validate()
    empty_val = synthetic_dataset(val=0)
    with pytest.raises(ConfigError, match="needs a validation split"):
        Trainer(fast_at_plus_config(tmp_path, "noval"), dataset=empty_val, **QUIET)
    TrainConfig(method="fast_at", val_size=0).validate()  # other methods may train without one

    said = []
    Trainer(fast_at_plus_config(tmp_path, "notes", on_collapse="stop", collapse_margin=0.3),
            dataset=synthetic_dataset(), progress=False, log=said.append)
    assert any("on_collapse='stop' is not used: fast_at_plus always does 'restore'" in line for line in said), said
    assert any("collapse_margin=0.3 is not used" in line and "method.collapse_margin" in line for line in said), said
    said.clear()
    Trainer(fast_at_plus_config(tmp_path, "quiet"), dataset=synthetic_dataset(), progress=False, log=said.append)
    assert not any("is not used" in line for line in said)


# ---- SPROUT ------------------------------------------------------------------------------------------------------
def test_sprout_u_optimiser_is_the_authors_momentum_and_weight_decay():
    """Two ascent steps of u by hand: SGD(lr, momentum 0.9, weight decay 5e-4) on -L, as main_cus.py."""
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 4)
    x, y = torch.rand(16, 3, 2, 2), torch.randint(0, 4, (16,))
    log_probs = torch.log_softmax(model(x.flatten(1)), 1).detach()
    method = SPROUT()
    assert (method.config.u_momentum, method.config.u_weight_decay, method.config.clamp_noise) == (0.9, 5e-4, False)
    probe = SPROUT()
    u, buffer, lr = torch.ones(4), None, 0.05
    flat = torch.nn.Sequential(torch.nn.Flatten(), model)
    for seed in (1, 2):
        probe.load_state_dict({"u": u.clone()})
        torch.manual_seed(seed)
        (grad,) = torch.autograd.grad(probe.label_objective(log_probs, y), probe.u)
        step = -grad + 5e-4 * u
        buffer = step if buffer is None else 0.9 * buffer + step
        u = u - lr * buffer
        torch.manual_seed(seed)
        method.update_labels(flat, x, y, lr)
        assert torch.allclose(method.u.detach(), u, atol=1e-7), seed


def test_sprout_preset_follows_the_authors_schedule_and_u_optimiser():
    config = make_config(load_preset("cifar10-resnet18-sprout")).validate()
    assert (config.lr, config.epochs, config.schedule) == (0.01, 200, "piecewise")
    schedule = lr_schedule(config.schedule, config.lr, config.epochs, **config.schedule_params)
    assert [schedule(e) for e in (0, 79, 80, 139, 140, 179, 180, 199)] == pytest.approx(
        [0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    c = config.build_method().config
    assert (c.u_momentum, c.u_weight_decay, c.u_lr_scale, c.clamp_noise) == (0.9, 5e-4, 1.0, False)
