"""APGD, FAB-T, Square, RayS and AutoAttack on a tiny model trained for a few seconds on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from fastrobust.attacks import (
    apgd,
    apgd_ce,
    apgd_t,
    autoattack,
    autoattack_official,
    fab_t,
    pgd,
    rays,
    square,
)
from fastrobust.attacks.apgd import checkpoints
from fastrobust.attacks.autoattack import official_available
from fastrobust.attacks.fab import project_hyperplane_box
from fastrobust.attacks.square import p_selection
from helpers import fit_and_keep_correct
from fastrobust.errors import ConfigError, FastRobustError

C, H = 10, 8


def make_data(n: int, generator: torch.Generator, protos: torch.Tensor):
    y = torch.randint(0, C, (n,), generator=generator)
    x = (protos[y] + 0.05 * torch.randn(n, 1, H, H, generator=generator)).clamp(0, 1)
    return x, y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(H * H, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, C))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.body(x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    protos = 0.5 + 0.25 * (torch.rand(C, 1, H, H, generator=g) - 0.5)
    x_train, y_train = make_data(2000, g, protos)
    x_test, y_test = make_data(64, g, protos)
    return fit_and_keep_correct(Net(), x_train, y_train, x_test, y_test, epochs=8, min_accuracy=0.95, shuffle=g)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


FAST = {
    "apgd-ce": lambda m, x, y, eps, norm, g: apgd_ce(m, x, y, eps=eps, norm=norm, n_iter=15, generator=g),
    "apgd-t": lambda m, x, y, eps, norm, g: apgd_t(m, x, y, eps=eps, norm=norm, n_iter=10, n_targets=3, generator=g),
    "fab-t": lambda m, x, y, eps, norm, g: fab_t(m, x, y, eps=eps, norm=norm, n_iter=10, n_targets=3, n_restarts=2,
                                                generator=g),
    "square": lambda m, x, y, eps, norm, g: square(m, x, y, eps=eps, norm=norm, n_queries=150, generator=g),
    "autoattack-fast": lambda m, x, y, eps, norm, g: autoattack(
        m, x, y, eps=eps, norm=norm, version="fast",
        options={"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2}}, generator=g),
    "rays": lambda m, x, y, eps, norm, g: rays(m, x, y, n_queries=150).within(x, eps),
}
# the standard version with every component shortened: in l_1 its FAB-T and Square act on the points APGD leaves
STANDARD_SHORT = {"apgd-ce": {"n_iter": 3, "n_restarts": 1}, "apgd-t": {"n_iter": 3, "n_targets": 2},
                  "fab-t": {"n_iter": 5, "n_targets": 2}, "square": {"n_queries": 100}}
FAST["autoattack"] = lambda m, x, y, eps, norm, g: autoattack(m, x, y, eps=eps, norm=norm, options=STANDARD_SHORT,
                                                               generator=g)
CASES = ([(name, "linf") for name in FAST if name != "autoattack"] + [(name, "l2") for name in FAST if name != "rays"]
         + [(name, "l1") for name in FAST if name != "rays"])
BUDGET = {"linf": 0.05, "l2": 0.4, "l1": 2.0}  # l_1: 2 on 1x8x8 images (64 values)


@pytest.mark.parametrize("name,norm", CASES)
def test_inside_ball_and_box_mode_and_grads(toy, name, norm):
    model, x, y = toy
    eps = BUDGET[norm]
    model.train()
    model.body[2].eval()  # a mixed mode (frozen BatchNorm) must come back exactly as it was
    model.body[4].weight.grad = torch.ones_like(model.body[4].weight)  # an existing gradient must stay untouched
    model.modes.clear()
    g = torch.Generator().manual_seed(0)
    x_adv = FAST[name](model, x, y, eps, norm, g)
    assert model.training and not model.body[2].training and model.body[4].training
    assert model.modes and not any(model.modes), "the attack must query the model in eval mode"
    assert torch.equal(model.body[4].weight.grad, torch.ones_like(model.body[4].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "body.4.weight")
    model.body[4].weight.grad = None
    model.eval()
    delta = (x_adv - x).flatten(1)
    size = {"linf": delta.abs().amax(1), "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}[norm]
    assert size.max() <= eps * (1 + 1e-5) + 1e-6
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.shape == x.shape and not x_adv.requires_grad


@pytest.mark.parametrize("name", [name for name in FAST if name != "autoattack"])
def test_large_eps_breaks_an_undefended_model(toy, name):
    model, x, y = toy
    g = torch.Generator().manual_seed(0)
    x_adv = FAST[name](model, x, y, 0.3, "linf", g)
    assert accuracy(model, x_adv, y) <= 0.05


def test_apgd_beats_or_ties_pgd_at_equal_budget(toy):
    model, x, y = toy
    for eps in (0.03, 0.05):
        x_pgd = pgd(model, x, y, eps=eps, steps=20, step_size=eps / 8, random_init=False)
        x_apgd = apgd_ce(model, x, y, eps=eps, n_iter=20, generator=torch.Generator().manual_seed(0))
        assert accuracy(model, x_apgd, y) <= accuracy(model, x_pgd, y)


def test_apgd_dlr_is_at_least_as_strong_as_clean(toy):
    model, x, y = toy
    x_adv = apgd(model, x, y, eps=0.05, loss="dlr", n_iter=20, generator=torch.Generator().manual_seed(0))
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


def test_targeted_attacks_reach_their_target(toy):
    model, x, y = toy
    target = (y + 1) % C
    x_apgd = apgd(model, x, y, eps=0.2, loss="ce-targeted", y_target=target, n_iter=20,
                  generator=torch.Generator().manual_seed(0))
    x_fab = fab_t(model, x, y, eps=0.2, y_target=target, n_iter=20)
    with torch.no_grad():
        assert (model(x_apgd).argmax(1) == target).float().mean() >= 0.95
        assert (model(x_fab).argmax(1) == target).float().mean() >= 0.7
    with pytest.raises(ConfigError):
        apgd(model, x, y, eps=0.1, loss="dlr-targeted")


def test_autoattack_details_agree_with_the_model(toy):
    model, x, y = toy
    result = autoattack(model, x, y, eps=0.04, version="standard", return_details=True,
                        options={"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2},
                                 "fab-t": {"n_iter": 10, "n_targets": 2}, "square": {"n_queries": 100}},
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        still = model(result.x_adv).argmax(1) == y
    assert torch.equal(still, result.robust)
    assert [b is None for b in result.broken_by] == still.tolist()
    assert sum(result.counts().values()) == int((~still).sum())
    assert 0 < int(still.sum()) < len(y)  # the eps is chosen so that some but not all points break


def test_autoattack_official_without_the_package_says_how_to_install_it(toy, monkeypatch):
    from fastrobust.attacks import official as official_module

    model, x, y = toy
    monkeypatch.setattr(official_module, "official_package", lambda: None)  # as on a machine without it
    assert not official_available()
    with pytest.raises(FastRobustError, match="pip install"):
        autoattack_official(model, x, y, eps=0.03)


class RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("a gradient-free attack differentiated the model")


class NoBackward(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(RaisesInBackward.apply(x))


def test_square_and_rays_use_no_gradients(toy):
    model, x, y = toy
    guarded = NoBackward(model)
    x_sq, queries = square(guarded, x, y, eps=0.05, n_queries=100, return_queries=True,
                           generator=torch.Generator().manual_seed(0))
    assert queries.max() <= 100 and queries.min() >= 1
    result = rays(guarded, x, y, n_queries=100)
    assert int(result.queries.max()) <= 100
    with pytest.raises(AssertionError, match="gradient-free"):  # the guard itself works
        from fastrobust.attacks.toolkit import input_gradient, per_example_loss

        input_gradient(guarded, x, y, per_example_loss("ce"))


def test_square_l2_is_the_published_attack(toy):
    """The l_2 Square attack (meta-square start, eta moved between two windows) breaks the toy model with
    queries only; the simplified version it replaces left 83% accuracy at eps 0.4 (APGD: 0%)."""
    model, x, y = toy
    guarded = NoBackward(model)
    for eps, most in ((0.5, 0.3), (0.6, 0.05)):
        x_adv, queries = square(guarded, x, y, eps=eps, norm="l2", n_queries=1000, return_queries=True,
                                generator=torch.Generator().manual_seed(0))
        assert accuracy(model, x_adv, y) <= most
        assert queries.max() <= 1000 and queries.min() >= 1
        assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    x_adv = square(model, x, y, eps=0.4, norm="l2", n_queries=1000, generator=torch.Generator().manual_seed(0))
    assert accuracy(model, x_adv, y) <= 0.75


def test_rays_boundary_distance_is_the_boundary(toy):
    model, x, y = toy
    result = rays(model, x, y, n_queries=300, tol=1e-5)
    d = result.distance.view(-1, 1, 1, 1)
    assert torch.isfinite(d).all() and (d > 0).all()
    with torch.no_grad():
        inside = model((x + 0.99 * d * result.direction).clamp(0, 1)).argmax(1)
        beyond = model((x + 1.01 * d * result.direction).clamp(0, 1)).argmax(1)
        at = model(result.x_adv).argmax(1)
    assert (inside == y).all() and (beyond != y).all() and (at != y).all()
    assert torch.allclose((result.x_adv - x).flatten(1).abs().amax(1), result.distance, atol=1e-6)
    # robust at eps exactly where the distance exceeds eps; adversarials within eps really fool the model
    eps = float(result.distance.median())
    kept = result.within(x, eps)
    with torch.no_grad():
        fooled = model(kept).argmax(1) != y
    assert torch.equal(fooled, ~result.robust(eps))
    # more queries never lengthen the distance
    longer = rays(model, x, y, n_queries=600, tol=1e-5)
    assert (longer.distance <= result.distance + 1e-4).all()


def test_rays_early_stop_saves_queries(toy):
    model, x, y = toy
    full = rays(model, x, y, n_queries=200)
    early = rays(model, x, y, n_queries=200, eps=0.3, early_stop=True)
    assert early.queries.sum() < full.queries.sum()
    assert (early.distance <= 0.3).all()


def test_apgd_checkpoints_follow_the_paper():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert all(0 < w <= 10 for w in checkpoints(10))


def test_square_p_schedule():
    assert p_selection(0.8, 5, 10000) == 0.8
    assert p_selection(0.8, 30, 10000) == 0.4
    assert p_selection(0.8, 9000, 10000) == pytest.approx(0.8 / 512)
    assert p_selection(0.8, 15, 5000) == 0.4  # rescaled to the budget


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_projection_is_feasible_and_minimal(norm):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 20, generator=g)
    w = torch.randn(50, 20, generator=g)
    c = torch.randn(50, generator=g) * 0.5
    d = project_hyperplane_box(p, w, c, norm)
    reachable = torch.where(c[:, None] >= 0, torch.where(w > 0, 1 - p, -p), torch.where(w > 0, -p, 1 - p))
    feasible = ((w * reachable).sum(1) - c).sign() == c.sign()  # the box corner gets across
    assert ((p + d) >= -1e-6).all() and ((p + d) <= 1 + 1e-6).all()
    assert torch.allclose((w * d).sum(1)[feasible], c[feasible], atol=1e-4)
    if norm == "linf":  # no smaller radius can reach the hyperplane
        t = d.abs().amax(1) * 0.999
        room = torch.where(w * c.sign()[:, None] > 0, 1 - p, p)
        best = (w.abs() * torch.minimum(room, t[:, None])).sum(1)
        assert (best[feasible] < c.abs()[feasible] + 1e-6).all()
    elif norm == "l1":  # the least l_1 step, as a linear program: min sum(u + v), w^T (u - v) = c, 0 <= p + u - v <= 1
        for i in torch.nonzero(feasible).squeeze(1)[:8].tolist():
            n = p.shape[1]
            wi, pi = w[i].double().numpy(), p[i].double().numpy()
            bounds = [(0, 1 - v) for v in pi] + [(0, v) for v in pi]  # u up to the top, v down to 0
            lp = linprog(np.ones(2 * n), A_eq=np.concatenate([wi, -wi])[None], b_eq=[float(c[i])], bounds=bounds)
            assert lp.status == 0
            assert float(d[i].abs().sum()) == pytest.approx(lp.fun, rel=1e-4, abs=1e-6)
    else:  # away from the box the minimal l2 step is c w / |w|^2
        p_mid = torch.full_like(p, 0.5)
        small = c * 0.01
        d_mid = project_hyperplane_box(p_mid, w, small, "l2")
        expected = small[:, None] * w / (w * w).sum(1, keepdim=True)
        assert torch.allclose(d_mid, expected, atol=1e-6)


def test_bad_settings_raise_clear_errors(toy):
    model, x, y = toy
    with pytest.raises(ConfigError, match="norm"):
        rays(model, x, y, norm="l2")
    with pytest.raises(ConfigError, match="eps"):
        apgd_ce(model, x, y, eps=8)
    with pytest.raises(ConfigError, match="version"):
        autoattack(model, x, y, eps=0.1, version="turbo")
    with pytest.raises(ConfigError, match="n_queries"):
        square(model, x, y, eps=0.1, n_queries=0)
