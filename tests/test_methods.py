"""Each method's math pinned against a hand computation on a linear model, plus the invariants.

For a linear classifier f(x) = W x + b every input gradient has a closed form
(grad_x CE = W^T (s(f(x)) - onehot(y)), grad_x KL(t || s(f(x))) = W^T (s(f(x)) - t)),
so the expected adversarial points are computed here without autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust import methods
from fastrobust.attacks import pgd
from fastrobust.errors import ConfigError
from fastrobust.methods.backward_smoothing import backward_smoothing_points



@pytest.fixture(autouse=True)
def float64():
    """Hand computations agree to rounding only in double precision; restore the default after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

EPS = 8 / 255


class Linear(nn.Module):
    def __init__(self, d: int = 12, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, d, generator=g) * 3)
        self.bias = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def pi(x_adv, x, eps=EPS):
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0, 1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 2, 2, generator=g)  # 12 features
    y = torch.randint(0, 4, (6,), generator=g)
    return x, y


def test_pgd_single_step_matches_hand_computation(batch):
    x, y = batch
    model = Linear()
    W, b = model.weight.detach(), model.bias.detach()
    x_adv = pgd(model, x, y, eps=EPS, steps=1, step_size=2 / 255, random_init=False)
    p = F.softmax(x.flatten(1) @ W.T + b, 1)
    grad = (p - F.one_hot(y, 4)) @ W
    expected = pi(x + 2 / 255 * grad.sign().view_as(x), x)
    assert torch.allclose(x_adv, expected, atol=1e-12)
    assert not torch.equal(x_adv, x)


def test_trades_single_step_matches_hand_computation(batch):
    x, y = batch
    model = Linear()
    W, b = model.weight.detach(), model.bias.detach()
    start = x + 0.001 * torch.randn_like(x)
    clean = x.flatten(1) @ W.T + b
    x_adv = pgd(model, x, y, eps=EPS, steps=1, step_size=2 / 255, loss="kl", reference_logits=clean, start=start)
    start_p = pi(start, x)
    grad = (F.softmax(start_p.flatten(1) @ W.T + b, 1) - F.softmax(clean, 1)) @ W
    expected = pi(start_p + 2 / 255 * grad.sign().view_as(x), x)
    assert torch.allclose(x_adv, expected, atol=1e-12)

    # the loss: CE(f(x), y) + beta * sum KL(s(f(x)) || s(f(x_adv))) / B
    from fastrobust.methods import trades_objective

    loss, stats = trades_objective(model, x, x_adv, y, beta=6.0)
    p_clean = F.softmax(clean, 1)
    p_adv = F.softmax(x_adv.flatten(1) @ W.T + b, 1)
    kl = (p_clean * (p_clean.log() - p_adv.log())).sum() / x.shape[0]
    assert loss.item() == pytest.approx((F.cross_entropy(clean, y) + 6.0 * kl).item(), abs=1e-10)
    assert stats["robust_loss"].item() == pytest.approx(kl.item(), abs=1e-10)


def test_backward_smoothing_step_by_step(batch):
    x, y = batch
    model = Linear()
    W, b = model.weight.detach(), model.bias.detach()
    a, gamma, beta = 8 / 255, 1.0, 10.0
    psi = torch.rand(6, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    z, x1, x2 = backward_smoothing_points(model, x, y, eps=EPS, step_size=a, gamma=gamma, psi=psi)

    z_hand = x.flatten(1) @ W.T + b
    t = F.softmax(z_hand + gamma * psi, 1)
    grad1 = (F.softmax(z_hand, 1) - t) @ W  # gradient of KL(t || s(f(x))) at x
    x1_hand = pi(x - a * grad1.sign().view_as(x), x)
    grad2 = (F.softmax(x1_hand.flatten(1) @ W.T + b, 1) - F.softmax(z_hand, 1)) @ W
    x2_hand = pi(x1_hand + a * grad2.sign().view_as(x), x)

    assert torch.allclose(z, z_hand, atol=1e-10)
    assert (x1 - x1_hand).abs().max() < 1e-6 and (x2 - x2_hand).abs().max() < 1e-6
    for point in (x1, x2):
        assert (point - x).abs().max() <= EPS + 1e-12
        assert point.min() >= 0 and point.max() <= 1
    assert not torch.equal(x1, x) and not torch.equal(x2, x1)

    # the full method with the same psi (drawn from the same seed) gives the TRADES loss at x2
    method = methods.create("backward_smoothing", gamma=gamma, beta=beta, step_size=a)
    torch.manual_seed(3)
    psi_method = torch.rand(1, 6, 4, dtype=torch.float32) * 2 - 1
    _, _, x2_seeded = backward_smoothing_points(model, x, y, eps=EPS, step_size=a, gamma=gamma, psi=psi_method)
    torch.manual_seed(3)
    loss, _ = method(model, x, y)
    p_clean = F.softmax(z_hand, 1)
    p_adv = F.softmax(x2_seeded.flatten(1) @ W.T + b, 1)
    expected = F.cross_entropy(z_hand, y) + beta * (p_clean * (p_clean.log() - p_adv.log())).sum() / 6
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_gamma_zero_gives_no_backward_move_and_zero_attack_steps_trains_on_x1(batch):
    x, y = batch
    model = Linear()
    _, x1, x2 = backward_smoothing_points(model, x, y, eps=EPS, step_size=EPS, gamma=0.0)
    assert torch.equal(x1, x)
    # with gamma = 0 the target is the clean output: the KL gradient at x is zero up to rounding
    z = model(x).detach()
    xr = x.clone().requires_grad_(True)
    p = F.log_softmax(model(xr), 1)
    t = F.softmax(z, 1)
    (g,) = torch.autograd.grad((t * (t.log() - p)).sum(), xr)
    assert g.abs().max() < 1e-12
    _, x1, x2 = backward_smoothing_points(model, x, y, eps=EPS, step_size=EPS, gamma=1.0, attack_steps=0)
    assert torch.equal(x1, x2) and not torch.equal(x1, x)


def test_num_points_average_equals_mean_target(batch):
    x, y = batch
    model = Linear()
    psi = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    _, x1, _ = backward_smoothing_points(model, x, y, eps=EPS, step_size=EPS, num_points=3, psi=psi)
    W, b = model.weight.detach(), model.bias.detach()
    z = x.flatten(1) @ W.T + b
    grads = [(F.softmax(z, 1) - F.softmax(z + p, 1)) @ W for p in psi]
    expected = pi(x - EPS * torch.stack(grads).mean(0).sign().view_as(x), x)
    assert torch.allclose(x1, expected)


def test_backward_smoothing_at_uses_ce_attack(batch):
    x, y = batch
    model = Linear()
    W, b = model.weight.detach(), model.bias.detach()
    psi = torch.zeros(6, 4)
    _, x1, x2 = backward_smoothing_points(model, x, y, eps=EPS, step_size=EPS, psi=psi, attack_loss="ce")
    grad = (F.softmax(x1.flatten(1) @ W.T + b, 1) - F.one_hot(y, 4)) @ W
    assert torch.allclose(x2, pi(x1 + EPS * grad.sign().view_as(x), x))


class CountingNet(nn.Module):
    """A small BN + dropout net that counts forward calls and backward passes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 4)
        self.forwards = 0
        self.backwards = 0
        self.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        self.register_full_backward_hook(lambda *_: setattr(self, "backwards", self.backwards + 1))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(self.drop(h.mean((2, 3))))


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("name", methods.available_methods())
def test_declared_cost_matches_counted_passes(name):
    torch.manual_seed(0)
    model = CountingNet()
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 4, (8,))
    method = methods.create(name)
    if hasattr(method, "train_step"):  # a method that owns its updates (SPROUT): count a whole training step
        method.train_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    else:
        loss, _ = method(model, x, y)
        loss.backward()
    cost = method.cost
    assert model.backwards == cost.forward_backward, (model.forwards, model.backwards, cost)
    assert model.forwards == cost.forward_backward + cost.forward_only


@pytest.mark.parametrize("name", methods.available_methods())
def test_methods_restore_mode_and_leak_no_gradients(name):
    torch.manual_seed(0)
    model = CountingNet()
    model.train()
    model.bn.eval()  # a mixed state must survive too
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 4, (8,))
    loss, stats = methods.create(name)(model, x, y)
    assert model.training and model.drop.training and not model.bn.training
    assert all(p.grad is None for p in model.parameters()), "the attack left parameter gradients"
    assert torch.isfinite(loss) and loss.requires_grad
    assert "loss" in stats and all(not v.requires_grad for v in stats.values())


def test_attacks_run_in_eval_mode():
    model = CountingNet()
    model.train()
    seen = []
    model.bn.register_forward_pre_hook(lambda module, _: seen.append(module.training))
    x, y = torch.rand(4, 3, 6, 6), torch.randint(0, 4, (4,))
    methods.create("backward_smoothing")(model, x, y)
    # clean logits with the backward step, then the attack step, in eval mode; the two training forwards in train mode
    assert seen == [False, False, True, True]


def test_method_parameters_are_validated():
    with pytest.raises(ConfigError, match="8/255"):
        methods.create("backward_smoothing", eps=8)
    with pytest.raises(ConfigError, match="known methods"):
        methods.create("madry")
    with pytest.raises(ConfigError, match="parameters are"):
        methods.create("trades", gamma=1.0)
    assert methods.create("trades", step_size="2/255").config.step_size == pytest.approx(2 / 255)
    assert methods.create("pgd_at", steps="7").cost.passes == 8
