"""SAT through the training path: the ``activation`` setting (TrainConfig, CLI flag, preset field) reaches the
model that is trained, saved and evaluated; every activation trains under an adversarial method; the
ReLU-forward/SiLU-backward variant trains with SiLU's gradient; the SAT presets are valid.

(The activation functions themselves are pinned in tests/test_models_activations.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust import methods
from fastrobust.models.checkpoint import load_model
from fastrobust.cli import main
from fastrobust.models import available_activations, make_activation
from fastrobust.models.activations import ReLUSiLUGrad
from fastrobust.train.presets import available_presets, load_preset, make_config
from fastrobust.train import Trainer, TrainConfig, train

from helpers import synthetic_dataset, train_tinycnn_once

QUIET = dict(progress=False, log=lambda _: None)


def _config(tmp_path, name, **overrides) -> TrainConfig:
    settings = dict(method="fast_at", model="tinycnn", dataset="synthetic", epochs=3, batch_size=32, lr=0.05,
                    schedule="cosine", val_pgd_steps=1, test_pgd_steps=2, out=str(tmp_path / name), device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def _activation_types(model: nn.Module) -> set[type]:
    known = {type(make_activation(name)) for name in available_activations()}
    return {type(m) for m in model.modules() if type(m) in known}


@pytest.mark.parametrize("activation", available_activations())
def test_each_activation_trains_under_adversarial_training_and_is_saved(tmp_path, activation):
    data = synthetic_dataset(train=96, val=32, test=32)
    result = train(_config(tmp_path, activation, activation=activation), dataset=data, **QUIET)
    lines = [json.loads(line) for line in (tmp_path / activation / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train_loss"] for line in lines]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert result["config"]["activation"] == activation
    model, _ = load_model(tmp_path / activation)  # the saved best model is rebuilt with the activation
    assert model.fastrobust_config["activation"] == activation
    assert _activation_types(model) == {type(make_activation(activation))}


class StraightThroughSiLU(nn.Module):
    """ReLU value, SiLU derivative, written independently of fastrobust: relu(x) + silu(x) - silu(x).detach()."""

    def forward(self, x):
        silu = F.silu(x)
        return torch.relu(x).detach() + silu - silu.detach()


def test_relu_silu_grad_trains_with_the_silu_derivative(tmp_path):
    """The model the trainer builds for activation=relu_silu_grad gets SiLU-derivative parameter gradients
    from a training method's loss (and different ones from plain ReLU)."""
    data = synthetic_dataset()
    trainer = Trainer(_config(tmp_path, "sat", method="natural", activation="relu_silu_grad"), dataset=data, **QUIET)
    model = trainer.model
    assert any(isinstance(m, ReLUSiLUGrad) for m in model.modules())
    reference = Trainer(_config(tmp_path, "ref", method="natural", activation="relu"), dataset=data, **QUIET).model
    reference.load_state_dict(model.state_dict())
    relu_model = Trainer(_config(tmp_path, "relu", method="natural", activation="relu"), dataset=data, **QUIET).model
    relu_model.load_state_dict(model.state_dict())
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.ReLU):
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, attr, StraightThroughSiLU())

    x = data.train.images[:32].float() / 255
    y = data.train.labels[:32]
    method = methods.create("natural")
    grads = []
    for net in (model, reference, relu_model):
        net.train()
        loss, _ = method(net, x, y)
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for g_sat, g_ref, g_relu in zip(*grads):
        torch.testing.assert_close(g_sat, g_ref, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], grads[2]))


def _cli_args(shared_data, out, *extra):
    return ["train", "--model", "tinycnn", "--dataset", "cifar10", "--data-root", str(shared_data),
            "--train-subset", "200", "--test-subset", "50", "--val-size", "50", "--epochs", "1", "--batch-size", "50",
            "--device", "cpu", "--out", str(out), "--quiet", "--set", "val_pgd_steps=1", "--set", "test_pgd_steps=1",
            *extra]


def _check_run(out, activation):
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["activation"] == activation
    assert json.loads((out / "config.json").read_text())["activation"] == activation
    model, _ = load_model(out)
    assert model.fastrobust_config["activation"] == activation
    assert _activation_types(model) == {type(make_activation(activation))}
    return result


def test_cli_activation_flag_reaches_the_trained_model(shared_data, tmp_path, capsys):
    assert main(_cli_args(shared_data, tmp_path / "flag", "--method", "natural", "--activation", "silu")) == 0
    assert _check_run(tmp_path / "flag", "silu")["config"]["method"] == "natural"


def test_cli_sat_preset_activation_reaches_the_trained_model(shared_data, tmp_path, capsys):
    args = _cli_args(shared_data, tmp_path / "preset", "--preset", "cifar10-resnet18-pgd_at-sat-silu",
                     "--set", "method.steps=1")
    assert main(args) == 0
    result = _check_run(tmp_path / "preset", "silu")
    assert result["config"]["method"] == "pgd_at" and int(result["config"]["method_params"]["steps"]) == 1
    # an explicit flag overrides the preset's activation
    args = _cli_args(shared_data, tmp_path / "override", "--preset", "cifar10-resnet18-pgd_at-sat-silu",
                     "--set", "method.steps=1", "--activation", "gelu")
    assert main(args) == 0
    _check_run(tmp_path / "override", "gelu")


def test_unknown_activation_is_a_one_line_cli_error(shared_data, tmp_path, capsys):
    assert main(_cli_args(shared_data, tmp_path / "bad", "--method", "natural", "--activation", "swish9")) == 2
    err = capsys.readouterr().err
    assert "swish9" in err and "silu" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", [n for n in available_presets() if n.endswith(("-sprout", "-slat")) or "-sat-" in n])
def test_new_presets_are_valid_and_carry_the_published_settings(name):
    config = make_config(load_preset(name)).validate()
    method = config.build_method()
    if "-sat-" in name:
        assert config.activation == name.rsplit("-", 1)[1] == "silu"
    if name.endswith("-slat"):  # SLAT authors: cyclic lr, peak 0.2, 30 epochs (WRN-28-10)
        assert (config.schedule, config.lr, config.epochs) == ("cyclic", 0.2, 30)
        assert method.config.step_ratio == 0.9 and method.config.latent_step == pytest.approx(8 / 255)
    if name.endswith("-sprout"):
        c = method.config
        assert (c.n_aug, c.sigma, c.alpha, c.label_concentration, c.u_init) == (3, 0.1, 0.2, 10.0, 1.0)
    assert config.attack_eps == pytest.approx(8 / 255)


def test_slat_preset_uses_wrn28_10():
    assert make_config(load_preset("cifar10-wrn28_10-slat")).model == "wrn28_10"


# ---- end to end on a real CIFAR-10 subset (the setting of tests/test_end_to_end.py) -------------------------

MARGIN_OVER_NATURAL = 0.08  # as in tests/test_end_to_end.py


def test_sat_with_fast_at_beats_natural_training_on_cifar10(cifar_subset, tmp_path_factory):
    # seed 0 on the reference machine: natural (ReLU) 0.314 clean / 0.012 PGD-20; fast_at + SiLU 0.244 / 0.184
    base = tmp_path_factory.getbasetemp()
    natural, _ = train_tinycnn_once(cifar_subset, base, "natural")
    sat, run = train_tinycnn_once(cifar_subset, base, "fast_at", "silu")
    assert sat["pgd20_acc"] >= natural["pgd20_acc"] + MARGIN_OVER_NATURAL, (natural, sat)
    model, _ = load_model(run)
    assert _activation_types(model) == {nn.SiLU}
