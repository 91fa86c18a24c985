"""SPROUT: Dirichlet targets, the ascent update of u, n_aug updates per batch, honest cost, exact resume,
and an end-to-end check on real CIFAR-10 that includes a gradient-free attack (gradient masking check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fastrobust import methods
from fastrobust.errors import ConfigError
from fastrobust.methods.sprout import SPROUT, dirichlet_targets, noisy_mixup
from fastrobust.train import Trainer, TrainConfig, resume, train

from helpers import crash_at_step, synthetic_dataset, train_tinycnn_once


class Linear(nn.Module):
    """No BatchNorm and no randomness: the same logits for the same batch, whatever the mode."""

    def __init__(self, d: int = 12, classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, d, generator=g))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class CountingNet(nn.Module):
    """Counts forward calls and backward passes through the network (a BN net, as real models are)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)
        self.forwards = 0
        self.backwards = 0
        self.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        self.register_full_backward_hook(lambda *_: setattr(self, "backwards", self.backwards + 1))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv1(x))).mean((2, 3)))


def batch(n: int = 16, classes: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 2, 2, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_dirichlet_targets_are_distributions_with_the_right_mean():
    torch.manual_seed(0)
    y = torch.randint(0, 5, (4000,))
    u = torch.tensor([1.0, 0.5, -3.0, 2.0, 1.0], requires_grad=True)  # 0 + (-3) is clamped to 1e-3
    r = dirichlet_targets(y, u, label_concentration=10.0, min_concentration=1e-3)
    assert r.shape == (4000, 5)
    assert (r >= 0).all() and torch.allclose(r.sum(1), torch.ones(4000), atol=1e-5)
    # E[r] = concentration / its sum, concentration = max(10*onehot(y) + u, 1e-3)
    concentration = (10 * F.one_hot(y, 5).float() + u.detach()).clamp_min(1e-3)
    expected = concentration / concentration.sum(1, keepdim=True)
    for label in range(5):
        rows = y == label
        assert torch.allclose(r[rows].mean(0), expected[rows][0], atol=0.02), label
    (grad,) = torch.autograd.grad((r * torch.arange(5.0)).sum(), u)  # reparameterised: differentiable in u
    assert torch.isfinite(grad).all() and grad[[0, 1, 3, 4]].abs().min() > 0


def test_noisy_mixup_is_unclamped_like_the_authors_and_clamps_on_request():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 4, 4)
    mixed, lam, perm = noisy_mixup(x, sigma=0.5, alpha=0.2, clamp=True)
    assert mixed.min() >= 0 and mixed.max() <= 1 and 0 <= float(lam) <= 1
    torch.manual_seed(0)
    raw, lam_raw, _ = noisy_mixup(torch.zeros(32, 3, 4, 4), sigma=0.1, alpha=0.2)  # authors' mixup_data: no clamp
    assert raw.min() < -0.05 and 0 <= float(lam_raw) <= 1
    assert sorted(perm.tolist()) == list(range(32))
    same, lam_one, _ = noisy_mixup(x, sigma=0.0, alpha=0.0)
    assert float(lam_one) == 1 and torch.equal(same, x)


def test_u_update_is_gradient_ascent_of_the_clean_objective():
    """For a fixed reparameterisation noise (the same seed), L at the new u is above L at the old u.

    u starts at 2, not 1: torch's gamma sampler switches algorithm at concentration 1 (and then draws a
    different number of random numbers), so the noise is only "the same" for concentrations on one side of 1.
    """
    model = Linear()
    x, y = batch()
    method = SPROUT(u_lr_scale=1.0, u_weight_decay=0.0)  # the first step of momentum SGD is the plain gradient
    method.load_state_dict({"u": torch.full((4,), 2.0)})
    log_probs = F.log_softmax(model(x), 1).detach()
    seed, lr = 7, 0.1

    torch.manual_seed(seed)
    before = method.label_objective(log_probs, y).detach()
    u_old = method.u.detach().clone()
    torch.manual_seed(seed)
    (grad,) = torch.autograd.grad(method.label_objective(log_probs, y), method.u)

    torch.manual_seed(seed)  # the same noise inside the update
    method.update_labels(model, x, y, lr)
    u_new = method.u.detach().clone()
    assert grad.abs().min() > 0
    assert torch.allclose(u_new - u_old, lr * grad, atol=1e-7), "u must move by +lr * gradient (ascent)"

    torch.manual_seed(seed)
    after = method.label_objective(log_probs, y).detach()
    descent = SPROUT()
    descent.load_state_dict({"u": u_old - lr * grad})
    torch.manual_seed(seed)
    lowered = descent.label_objective(log_probs, y).detach()
    assert float(after) > float(before) > float(lowered), (float(lowered), float(before), float(after))


def test_train_step_makes_n_aug_network_updates_and_one_u_update():
    for n_aug in (1, 3):
        torch.manual_seed(0)
        model = Linear()
        x, y = batch()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        original = optimizer.step
        optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
        method = SPROUT(n_aug=n_aug)
        u_steps = []
        original_update = method.update_labels
        method.update_labels = lambda *a, **k: (u_steps.append(1), original_update(*a, **k))[1]
        loss, stats = method.train_step(model, x, y, optimizer, autocast=None, scaler=None)
        assert len(steps) == n_aug and len(u_steps) == 1
        assert torch.isfinite(loss) and {"loss", "label_loss", "u_mean"} <= set(stats)
        assert not torch.equal(method.u.detach(), torch.ones(4)), "u was not updated"


def test_u_lr_is_the_optimizers_current_lr():
    """With the network held fixed (the optimiser owns an unrelated parameter), u's move is lr * gradient
    for the same noise: four times the lr, four times the move."""
    model = Linear()
    x, y = batch()
    moves = []
    for lr in (0.05, 0.2):
        method = SPROUT(n_aug=2)
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        optimizer.param_groups[0]["lr"] = lr  # as the trainer's schedule sets it before each step
        torch.manual_seed(3)
        method.train_step(model, x, y, optimizer)
        moves.append(method.u.detach() - 1)
    assert moves[0].abs().max() > 0
    assert torch.allclose(moves[1], 4 * moves[0], rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("n_aug", [1, 3])
def test_declared_cost_matches_counted_passes_of_a_training_step(n_aug):
    torch.manual_seed(0)
    model = CountingNet()
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 4, (8,))
    method = methods.create("sprout", n_aug=n_aug)
    method.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    cost = method.cost
    assert model.backwards == cost.forward_backward == n_aug
    assert model.forwards == cost.forward_backward + cost.forward_only == n_aug + 1
    assert cost.passes == pytest.approx(n_aug + 1 / 3)


def test_plain_call_is_one_update_loss_and_leaves_u_alone():
    torch.manual_seed(0)
    model = CountingNet()
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 4, (8,))
    method = methods.create("sprout")
    loss, stats = method(model, x, y)
    assert model.forwards == 1 and loss.requires_grad and all(p.grad is None for p in model.parameters())
    assert torch.equal(method.u.detach(), torch.ones(4)) and all(not v.requires_grad for v in stats.values())


def test_state_dict_round_trip_and_validation():
    method = SPROUT(u_momentum=0.9)
    assert method.state_dict() == {}
    model = Linear()
    x, y = batch()
    method.update_labels(model, x, y, 0.1)
    method.update_labels(model, x, y, 0.1)
    state = method.state_dict()
    assert set(state) == {"u", "u_momentum_buffer"}
    other = SPROUT(u_momentum=0.9)
    other.load_state_dict(state)
    torch.manual_seed(0)
    method.update_labels(model, x, y, 0.1)
    torch.manual_seed(0)
    other.update_labels(model, x, y, 0.1)
    assert torch.equal(method.u, other.u), "the momentum buffer was not restored"
    other.load_state_dict({})
    assert other.u is None
    with pytest.raises(ConfigError, match="holds"):
        other.load_state_dict({"beta": torch.ones(4)})
    other.load_state_dict({"u": torch.ones(3)})
    with pytest.raises(ConfigError, match="classes"):
        other(model, x, y)
    with pytest.raises(ConfigError, match="n_aug"):
        methods.create("sprout", n_aug=0)
    with pytest.raises(ConfigError, match="u_momentum"):
        methods.create("sprout", u_momentum=1.5)


def _config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    settings = dict(method="sprout", model="tinycnn", dataset="synthetic", epochs=3, batch_size=32, lr=0.05,
                    schedule="cosine", val_pgd_steps=2, test_pgd_steps=3, out=str(tmp_path / name), device="cpu",
                    checkpoint_every=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def _method_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k[len("method/"):]: v for k, v in load_file(str(checkpoint / "train_state.safetensors")).items()
            if k.startswith("method/")}


def test_u_survives_save_and_resume_through_the_trainer(tmp_path, monkeypatch):
    data = synthetic_dataset()
    quiet = dict(progress=False, log=lambda _: None)
    train(_config(tmp_path, "straight"), dataset=data, **quiet)

    with crash_at_step(monkeypatch, 10):  # mid-epoch 2, after the checkpoint at step 8
        train(_config(tmp_path, "crashed"), dataset=data, **quiet)

    crashed = tmp_path / "crashed"
    newest = sorted((crashed / "checkpoints").iterdir())[-1]
    assert newest.name == "step-000000008"
    saved = _method_state(newest)
    assert set(saved) == {"u", "u_momentum_buffer"} and not torch.equal(saved["u"], torch.ones(4)), "u not saved or never moved"

    trainer = Trainer(TrainConfig(**json.loads((crashed / "config.json").read_text())), dataset=data,
                      resume=True, **quiet)
    assert torch.equal(trainer.method.state_dict()["u"], saved["u"]), "u not restored on resume"

    resume(crashed, dataset=data, **quiet)
    straight_u = _method_state(sorted((tmp_path / "straight" / "checkpoints").iterdir())[-1])["u"]
    resumed_u = _method_state(sorted((crashed / "checkpoints").iterdir())[-1])["u"]
    assert torch.equal(straight_u, resumed_u), "a resumed run must end with the same u"
    straight_w, resumed_w = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(crashed / "last.safetensors"))
    assert all(torch.equal(straight_w[k], resumed_w[k]) for k in straight_w)


# ---- end to end on a real CIFAR-10 subset (the setting of tests/test_end_to_end.py) -------------------------

NOISE = 0.05  # about 2.8 standard deviations of an accuracy measured on 500 images (tests/test_end_to_end.py)


SPROUT_EPOCHS = 15  # SPROUT has no attack: its robustness builds up slowly (at 5 epochs it is not above natural's)


def test_sprout_on_cifar10_beats_natural_under_pgd_and_a_gradient_free_attack_agrees(cifar_subset, tmp_path_factory):
    """tinycnn, 2,000 images, 15 epochs, seed 0, on this machine: natural 0.402 clean / 0.010 PGD-20, SPROUT (the
    authors' u optimiser, unclamped noise) 0.390 clean / 0.036 PGD-20 on 500 test points (with the class-sorted
    split order of earlier versions, which held out other training images: 0.004 and 0.054;
    docs/methods-cheap-robustness.md). The gap asked for, 2 points, is above twice the binomial standard error
    of an accuracy near 2-4 % on 500 points (about 0.8 points). The gradient-free Square attack must not find
    SPROUT much less robust than PGD does (gradient masking)."""
    from fastrobust.attacks import square
    from fastrobust.models.checkpoint import load_model

    base = tmp_path_factory.getbasetemp()
    natural, _ = train_tinycnn_once(cifar_subset, base, "natural", epochs=SPROUT_EPOCHS)
    sprout, run = train_tinycnn_once(cifar_subset, base, "sprout", epochs=SPROUT_EPOCHS)
    assert sprout["clean_acc"] > 0.3
    assert sprout["pgd20_acc"] >= natural["pgd20_acc"] + 0.02, (natural, sprout)
    model, _ = load_model(run)
    x = cifar_subset.test.images[:200].float() / 255
    y = cifar_subset.test.labels[:200]
    x_adv = square(model, x, y, eps=8 / 255, n_queries=300, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        square_acc = float((model(x_adv).argmax(1) == y).float().mean())
    assert square_acc >= sprout["pgd20_acc"] - NOISE, ("gradient-free attack far below PGD: gradient masking",
                                                       sprout, square_acc)
