"""PGD and FGSM: ball and box invariants for l_inf and l_2, losses, restarts' worst case, targeted mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust.attacks import cw_margin, fgsm, pgd
from fastrobust.errors import ConfigError


@pytest.fixture(scope="module")
def toy():
    """A trained linear-ReLU net on two well separated classes of 3x4x4 inputs."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))
    centres = torch.rand(3, 48, generator=g)
    y = torch.arange(300) % 3
    x = (0.6 * centres[y] + 0.4 * torch.rand(300, 48, generator=g)).view(-1, 3, 4, 4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval(), x[:60], y[:60]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_stays_in_ball_and_box(toy, norm, eps, loss):
    model, x, y = toy
    ref = model(x).detach() if loss == "kl" else None
    x_adv = pgd(model, x, y, eps=eps, steps=5, norm=norm, loss=loss, reference_logits=ref, random_init=True)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_stronger_attacks_lower_accuracy(toy):
    model, x, y = toy
    clean = accuracy(model, x, y)
    weak = accuracy(model, fgsm(model, x, y, eps=0.05), y)
    strong = accuracy(model, pgd(model, x, y, eps=0.05, steps=20, step_size=0.01), y)
    huge = accuracy(model, pgd(model, x, y, eps=0.5, steps=20, step_size=0.05), y)
    assert clean >= weak >= strong and clean > 0.9
    assert huge < 0.05


def test_fgsm_is_one_full_signed_step(toy):
    model, x, y = toy
    x_adv = fgsm(model, x, y, eps=4 / 255)
    moved = (x_adv - x).abs()
    inside = (x > 4 / 255) & (x < 1 - 4 / 255)
    assert torch.allclose(moved[inside], torch.full_like(moved[inside], 4 / 255), atol=1e-6)


def test_restarts_keep_the_per_example_worst_case(toy):
    model, x, y = toy
    eps = 0.03
    torch.manual_seed(1)
    singles = [pgd(model, x, y, eps=eps, steps=2, step_size=0.01) for _ in range(4)]
    torch.manual_seed(1)
    combined = pgd(model, x, y, eps=eps, steps=2, step_size=0.01, restarts=4)
    with torch.no_grad():
        fooled_any = torch.stack([model(s).argmax(1) != y for s in singles]).any(0)
        fooled_combined = model(combined).argmax(1) != y
        losses = torch.stack([F.cross_entropy(model(s), y, reduction="none") for s in singles])
        combined_loss = F.cross_entropy(model(combined), y, reduction="none")
    assert torch.equal(fooled_combined, fooled_any)
    robust = ~fooled_any
    assert torch.allclose(combined_loss[robust], losses.max(0).values[robust])


def test_targeted_pgd_reaches_the_target(toy):
    model, x, y = toy
    target = (y + 1) % 3
    x_adv = pgd(model, x, y, eps=0.5, steps=30, step_size=0.05, target=target)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() > 0.9


def test_cw_margin():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    assert torch.allclose(cw_margin(logits, torch.tensor([0, 2])), torch.tensor([-0.5, 3.0]))


def test_bad_arguments(toy):
    model, x, y = toy
    with pytest.raises(ConfigError, match="did you mean 8/255"):
        pgd(model, x, y, eps=8)
    with pytest.raises(ConfigError, match="norm='l1'"):
        pgd(model, x, y, eps=0.1, norm="l1")
    with pytest.raises(ConfigError, match="reference_logits"):
        pgd(model, x, y, eps=0.1, loss="kl")


class _NarrowDip(torch.nn.Module):
    """Two logits of a one-pixel image whose margin f(x) = 1 - 3 exp(-((x - c) / s)^2) dips below zero only
    near c = 0.5 + 2.5/255 (s = 1/255). From x = 0.5, PGD with step 2/255 lands on 0.5 + 2/255 (fooled),
    then on 0.5 + 4/255 (not fooled), and oscillates between the two: the last iterate of an even number of
    steps is not adversarial although every odd one is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1).sum(1)
        margin = 1 - 3 * torch.exp(-(((v - (0.5 + 2.5 / 255)) * 255) ** 2))
        return torch.stack([margin, torch.zeros_like(margin)], 1)


def test_stop_at_fooled_keeps_the_first_adversarial_iterate():
    from fastrobust.evaluate import evaluate

    model = _NarrowDip()
    x, y = torch.full((1, 1, 1, 1), 0.5), torch.tensor([0])
    assert model(x).argmax(1).item() == 0  # clean-correct
    kwargs = dict(eps=8 / 255, steps=20, step_size=2 / 255, random_init=False)
    last = pgd(model, x, y, **kwargs)
    first = pgd(model, x, y, stop_at_fooled=True, **kwargs)
    assert model(last).argmax(1).item() == 0            # the last iterate stepped back out
    assert model(first).argmax(1).item() == 1           # the fooled iterate is kept
    assert torch.allclose(first, torch.full_like(x, 0.5 + 2 / 255), atol=1e-6)
    # evaluate's PGD counts the point as broken, and PGD-100 never reports more robust points than PGD-20
    record = evaluate(model, (x, y), ["pgd20", "pgd100"], eps=8 / 255, progress=False)
    assert record["attacks"]["pgd20"]["robust"] == 0
    assert record["attacks"]["pgd100"]["robust"] == 0
    assert record["attacks"]["pgd20"]["settings"]["stop_at_fooled"] is True
