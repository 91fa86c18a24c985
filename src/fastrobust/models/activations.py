"""Activation functions for smooth adversarial training (SAT, Xie et al. 2020) and the usual ReLU.

``make_activation(name)`` returns a fresh ``nn.Module`` each call, so a model that calls it once per
place a ReLU would go gets independent modules (SmoothReLU's learnable ``b`` is per place).

Names:
  relu, silu, gelu, elu, mish       the torch functions (never in-place: latent hooks may hold outputs)
  softplus                          parametric softplus, log(1 + exp(beta*x)) / beta, beta = 10 by default
  smoothrelu                        SAT's SmoothReLU, f(x) = relu(x - log(b*|x| + 1) / b), i.e.
                                    x - log(b*x + 1)/b for x >= 0 and 0 for x < 0, learnable b (init 20**2)
  relu_silu_grad                    ReLU in the forward pass, the derivative of SiLU in the backward pass
  relu_softplus_grad                ReLU forward, derivative of softplus(beta=10) (= sigmoid(10 x)) backward
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastrobust.errors import ConfigError

__all__ = [
    "ParametricSoftplus",
    "ReLUSiLUGrad",
    "ReLUSoftplusGrad",
    "SmoothReLU",
    "available_activations",
    "make_activation",
    "relu_silu_grad",
    "relu_softplus_grad",
]


class _ReLUSiLUGradFn(torch.autograd.Function):
    """y = relu(x); dy/dx is replaced by SiLU'(x) = s(x) * (1 + x * (1 - s(x))), s = sigmoid."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        # Written with differentiable torch ops so that double backward (Hessian-vector products) works.
        s = torch.sigmoid(x)
        return grad_output * (s * (1 + x * (1 - s)))


class _ReLUSoftplusGradFn(torch.autograd.Function):
    """y = relu(x); dy/dx is replaced by d/dx softplus_beta(x) = sigmoid(beta * x)."""

    @staticmethod
    def forward(ctx, x, beta: float):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(ctx.beta * x), None


def relu_silu_grad(x: torch.Tensor) -> torch.Tensor:
    """ReLU forward, SiLU derivative backward."""
    return _ReLUSiLUGradFn.apply(x)


def relu_softplus_grad(x: torch.Tensor, beta: float = 10.0) -> torch.Tensor:
    """ReLU forward, derivative of softplus(beta) backward."""
    return _ReLUSoftplusGradFn.apply(x, float(beta))


class ReLUSiLUGrad(nn.Module):
    """ReLU in the forward pass, the derivative of SiLU in the backward pass (SAT's gradient-only variant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_silu_grad(x)


class ReLUSoftplusGrad(nn.Module):
    """ReLU in the forward pass, sigmoid(beta*x) (softplus' derivative) in the backward pass."""

    def __init__(self, beta: float = 10.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_softplus_grad(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class ParametricSoftplus(nn.Module):
    """softplus(x) = log(1 + exp(beta*x)) / beta; SAT uses beta = 10 (closer to ReLU than beta = 1)."""

    def __init__(self, beta: float = 10.0, threshold: float = 20.0):
        super().__init__()
        self.beta = float(beta)
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x, beta=self.beta, threshold=self.threshold)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class SmoothReLU(nn.Module):
    """SAT's SmoothReLU: f(x) = x - log(b*x + 1)/b for x >= 0, 0 for x < 0, written relu(x - log(b|x|+1)/b).

    ``b`` is learnable and kept positive by the parametrisation b = a**2 (a is the parameter, initialised
    at ``sqrt(b_init)`` = 20 for the paper's b = 20**2), clamped away from 0 so 1/b stays finite.
    The derivative is b*x / (b*x + 1) for x > 0: continuous at 0, tending to 1 (ReLU) as b grows.
    """

    min_b = 1e-6

    def __init__(self, b_init: float = 20.0**2):
        super().__init__()
        if not (isinstance(b_init, (int, float)) and math.isfinite(b_init) and b_init > 0):
            raise ConfigError(f"smoothrelu b_init={b_init!r} must be a positive finite number (paper: 400)")
        self.sqrt_b = nn.Parameter(torch.tensor(math.sqrt(float(b_init))))

    @property
    def b(self) -> torch.Tensor:
        return (self.sqrt_b * self.sqrt_b).clamp_min(self.min_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b.to(x.dtype)
        return (x - torch.log1p(b * x.abs()) / b).clamp_min(0)

    def extra_repr(self) -> str:
        return f"b={float(self.b.detach()):g}"


_FACTORIES = {
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "elu": lambda: nn.ELU(),
    "softplus": ParametricSoftplus,
    "smoothrelu": SmoothReLU,
    "mish": lambda: nn.Mish(),
    "relu_silu_grad": ReLUSiLUGrad,
    "relu_softplus_grad": ReLUSoftplusGrad,
}
_TAKES_KWARGS = {"softplus": ("beta", "threshold"), "smoothrelu": ("b_init",), "relu_softplus_grad": ("beta",)}


def available_activations() -> list[str]:
    """Names accepted by :func:`make_activation` (and by every model's ``activation=``)."""
    return list(_FACTORIES)


def check_activation(name: object) -> str:
    """Return the normalised activation name or raise ConfigError listing the known ones."""
    key = str(name).strip().lower() if isinstance(name, str) else None
    if key not in _FACTORIES:
        raise ConfigError(
            f"unknown activation {name!r}: expected one of {', '.join(available_activations())}"
        )
    return key


def make_activation(name: str, **kwargs) -> nn.Module:
    """A new activation module by name; ``kwargs`` only for softplus (beta), smoothrelu (b_init),
    relu_softplus_grad (beta)."""
    key = check_activation(name)
    allowed = _TAKES_KWARGS.get(key, ())
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        hint = f"it accepts {', '.join(allowed)}" if allowed else "it takes no options"
        raise ConfigError(f"activation {key!r} got unknown option(s) {', '.join(unknown)}: {hint}")
    return _FACTORIES[key](**kwargs)
