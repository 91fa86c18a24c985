"""Activations of fastrobust.models.activations (SAT): exact forward/backward definitions and training use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust.errors import ConfigError
from fastrobust.models import create
from fastrobust.models.activations import (
    ReLUSiLUGrad,
    SmoothReLU,
    available_activations,
    make_activation,
    relu_silu_grad,
    relu_softplus_grad,
)

ALL = ["relu", "silu", "gelu", "elu", "softplus", "smoothrelu", "mish", "relu_silu_grad", "relu_softplus_grad"]


def _points(dtype=torch.float64):
    dense = torch.linspace(-6, 6, 1201, dtype=dtype)
    special = torch.tensor([-30.0, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 30.0], dtype=dtype)
    return torch.cat([dense, special])


def test_available_activations_lists_every_name():
    assert available_activations() == ALL


@pytest.mark.parametrize("bad", ["swish2", "", "ReLU6", None, 3])
def test_unknown_activation_raises_with_the_list(bad):
    with pytest.raises(ConfigError) as info:
        make_activation(bad)
    for name in ALL:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="smoothrelu"):
        create("tinycnn", activation=bad)


def test_activation_options_are_checked():
    assert make_activation("softplus", beta=5).beta == 5
    with pytest.raises(ConfigError, match="beta"):
        make_activation("softplus", alpha=2)
    with pytest.raises(ConfigError, match="no options"):
        make_activation("relu", beta=2)
    with pytest.raises(ConfigError, match="b_init"):
        make_activation("smoothrelu", b_init=-1.0)


def test_make_activation_returns_fresh_modules():
    first, second = make_activation("smoothrelu"), make_activation("smoothrelu")
    assert first is not second and first.sqrt_b is not second.sqrt_b


@pytest.mark.parametrize(
    "name, reference",
    [
        ("relu", F.relu),
        ("silu", F.silu),
        ("gelu", F.gelu),
        ("elu", F.elu),
        ("mish", F.mish),
        ("softplus", lambda x: torch.log1p(torch.exp(10 * x)) / 10),
    ],
)
def test_plain_activations_match_their_definitions(name, reference):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    torch.testing.assert_close(make_activation(name)(x), reference(x))


def test_relu_silu_grad_forward_is_relu_exactly():
    for dtype in (torch.float32, torch.float64):
        x = _points(dtype)
        assert torch.equal(relu_silu_grad(x), F.relu(x))
        assert torch.equal(ReLUSiLUGrad()(x), F.relu(x))


def test_relu_silu_grad_backward_is_the_silu_derivative():
    x = _points().requires_grad_(True)
    weights = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((relu_silu_grad(x) * weights).sum(), x)

    x_ref = x.detach().clone().requires_grad_(True)
    (grad_silu,) = torch.autograd.grad((F.silu(x_ref) * weights).sum(), x_ref)
    torch.testing.assert_close(grad, grad_silu, rtol=1e-12, atol=1e-12)

    s = torch.sigmoid(x.detach())
    closed_form = s * (1 + x.detach() * (1 - s))
    torch.testing.assert_close(grad, weights * closed_form, rtol=1e-12, atol=1e-12)
    # not the ReLU gradient: at x = -1 the SiLU derivative is about 0.072, ReLU's is 0
    assert grad[(x.detach() < -0.5) & (x.detach() > -1.5)].abs().max() > 0.01


def test_relu_silu_grad_supports_double_backward():
    x = torch.linspace(-4, 4, 81, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(relu_silu_grad(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(F.silu(x_ref).sum(), x_ref, create_graph=True)
    (second_ref,) = torch.autograd.grad(grad_ref.sum(), x_ref)
    torch.testing.assert_close(second, second_ref)


def test_relu_softplus_grad():
    x = _points().requires_grad_(True)
    y = relu_softplus_grad(x)
    assert torch.equal(y.detach(), F.relu(x.detach()))
    (grad,) = torch.autograd.grad(y.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(F.softplus(x_ref, beta=10).sum(), x_ref)
    torch.testing.assert_close(grad, grad_ref)
    torch.testing.assert_close(grad, torch.sigmoid(10 * x.detach()))


def test_smoothrelu_matches_the_sat_formula():
    act = SmoothReLU().double()
    assert math.isclose(float(act.b.detach()), 400.0, rel_tol=1e-9)
    x = _points()
    b = 400.0
    expected = torch.where(x >= 0, x - torch.log(b * x + 1) / b, torch.zeros_like(x))
    torch.testing.assert_close(act(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(act(x), F.relu(x - torch.log(b * x.abs() + 1) / b), rtol=1e-10, atol=1e-12)
    # another b
    act = SmoothReLU(b_init=2.0).double()
    b = float(act.b.detach())
    assert b == pytest.approx(2.0, rel=1e-6)
    expected = torch.where(x >= 0, x - torch.log(b * x + 1) / b, torch.zeros_like(x))
    torch.testing.assert_close(act(x), expected, rtol=1e-10, atol=1e-12)
    # its derivative b x / (b x + 1) is continuous: 0 at 0, tends to 1
    xg = torch.tensor([1e-6, 0.01, 1.0, 100.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(act(xg).sum(), xg)
    torch.testing.assert_close(grad, b * xg.detach() / (b * xg.detach() + 1))


def test_smoothrelu_b_is_learnable_and_stays_positive():
    act = SmoothReLU()
    assert [name for name, _ in act.named_parameters()] == ["sqrt_b"]
    x = torch.linspace(0.01, 2, 50)
    act(x).sum().backward()
    # d/db [x - log(bx+1)/b] = log(bx+1)/b^2 - x/(b(bx+1)) : nonzero, and reaches sqrt_b via b = sqrt_b^2
    b = 400.0
    d_db = (torch.log(b * x + 1) / b**2 - x / (b * (b * x + 1))).sum()
    assert act.sqrt_b.grad is not None and torch.isfinite(act.sqrt_b.grad)
    torch.testing.assert_close(act.sqrt_b.grad, d_db * 2 * 20.0, rtol=1e-4, atol=0)
    with torch.no_grad():
        act.sqrt_b.fill_(-3.0)  # any parameter value still gives b > 0
    assert float(act.b.detach()) == pytest.approx(9.0)
    with torch.no_grad():
        act.sqrt_b.fill_(0.0)
    assert float(act.b.detach()) > 0 and torch.isfinite(act(x)).all()


def _batch(seed=0, n=32, channels=3, size=32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, y


@pytest.mark.parametrize("activation", ALL)
def test_each_activation_trains_a_tinycnn(activation):
    torch.manual_seed(0)
    model = create("tinycnn", activation=activation)
    model.train()
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())
    optimizer.step()
    with torch.no_grad():
        new_loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(new_loss)
    assert new_loss.item() < loss.item()


@pytest.mark.parametrize("activation", ["silu", "smoothrelu", "relu_silu_grad", "softplus"])
@pytest.mark.parametrize("name", ["tinycnn", "smallcnn", "preactresnet18", "resnet18", "resnet50", "wideresnet"])
def test_the_activation_replaces_every_relu(name, activation, monkeypatch):
    kwargs = {"depth": 10, "widen_factor": 1} if name == "wideresnet" else {}
    model = create(name, activation=activation, **kwargs).eval()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    expected_type = type(make_activation(activation))
    assert sum(isinstance(m, expected_type) for m in model.modules()) >= 3

    def forbidden(*args, **kwargs):
        raise AssertionError("a hard-coded ReLU was called")

    monkeypatch.setattr(torch.nn.functional, "relu", forbidden)
    monkeypatch.setattr(torch, "relu", forbidden)
    monkeypatch.setattr(torch.Tensor, "relu", forbidden)
    size = 32 if name == "smallcnn" else 16  # global pooling: a small input keeps the big nets cheap
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["tinycnn", "preactresnet18"])
def test_relu_and_relu_silu_grad_models_agree_forward_but_not_backward(name):
    torch.manual_seed(0)
    relu_model = create(name, activation="relu").eval()
    smooth_model = create(name, activation="relu_silu_grad").eval()
    smooth_model.load_state_dict(relu_model.state_dict())
    x = torch.rand(2, 3, 32, 32) if name == "tinycnn" else torch.rand(2, 3, 16, 16)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1, out2 = relu_model(x1), smooth_model(x2)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    (g1,) = torch.autograd.grad(out1[:, 0].sum(), x1)
    (g2,) = torch.autograd.grad(out2[:, 0].sum(), x2)
    assert not torch.allclose(g1, g2)
