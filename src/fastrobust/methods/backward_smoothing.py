"""Backward Smoothing (Chen et al., "Efficient Robust Training via Backward Smoothing"), Algorithm 1.

The single attack step does not start from a random point of the input ball (which gives a
poorly smoothed, easily collapsing single-step attack) but from the input that the network maps
closest to a randomly perturbed *output*: a backward step towards s(z + gamma*psi), psi ~ U(-1,1).

Per batch, with the model in eval mode for steps 1-4:
  1. z = f(x) (taken, detached, from the forward that step 3 differentiates: one pass fewer);
  2. t = s(z + gamma*psi);
  3. x1 = Pi(x - a*sign(grad_x KL(t || s(f(x)))))                 (backward step, decreases the KL)
  4. x2 = Pi(x1 + a*sign(grad KL(s(z) || s(f(x1)))))              (attack step; repeated attack_steps times)
  5. in the caller's mode (train): CE(f(x), y) + beta * KL(s(f(x)) || s(f(x2))), KL summed / B.

Several random points (``num_points``) average the backward-step objective over independent psi.
Because the gradient of sum_m KL(t_m || p) w.r.t. the logits is M*p - sum_m t_m, that average equals
one backward step towards the mean target: more points cost no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.attacks import model_mode, project
from fastrobust.attacks.toolkit import input_gradient, per_example_loss, upcast
from fastrobust.core.precision import attack_autocast, attack_gradients
from fastrobust.methods.base import Cost, Method, MethodConfig, Stats, clean_logits_eval, register
from fastrobust.methods.standard import adversarial_ce, trades_objective


def smoothed_target(z: Tensor, gamma: float, num_points: int = 1, psi: Tensor | None = None) -> Tensor:
    """The backward step's target distribution: the mean over points of s(z + gamma*psi_m).

    ``psi`` (shape ``[num_points, *z.shape]`` or ``z.shape``) fixes the noise, for tests.
    """
    if psi is None:
        psi = torch.rand((num_points, *z.shape), device=z.device, dtype=torch.float32) * 2 - 1
    elif psi.dim() == z.dim():
        psi = psi.unsqueeze(0)
    return F.softmax(upcast(z).unsqueeze(0) + gamma * psi, dim=-1).mean(0)


def _kl_from_target(target: Tensor, logits: Tensor) -> Tensor:
    """Per-example KL(target || s(logits))."""
    log_probs = F.log_softmax(upcast(logits), dim=1)
    return (target * (torch.log(target.clamp_min(1e-30)) - log_probs)).sum(dim=1)


def backward_step(model: nn.Module, x: Tensor, target: Tensor, *, eps: float, step_size: float) -> Tensor:
    """x1 = Pi(x - a*sign(grad_x KL(target || s(f(x))))): one signed step towards the target output."""
    grad, _, _ = input_gradient(model, x, target, lambda logits, _y: _kl_from_target(target, logits))
    return project(x - step_size * grad.sign(), x, eps)


def _clean_logits_and_backward_step(
    model: nn.Module, x: Tensor, *, eps: float, step_size: float, gamma: float, num_points: int, psi: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Steps 1-3 in one pass: the clean logits z come from the same eval-mode forward whose graph gives the
    backward step's gradient (z does not depend on the graph, so this equals a separate no-grad forward)."""
    x_grad = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with attack_autocast():
            logits = upcast(model(x_grad))
        z = logits.detach()
        target = smoothed_target(z, gamma, num_points, psi)
        (grad,) = attack_gradients(_kl_from_target(target, logits).sum(), logits, [x_grad])
    return z, project(x - step_size * grad.sign(), x, eps)


def backward_smoothing_points(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    eps: float,
    step_size: float,
    gamma: float = 1.0,
    attack_steps: int = 1,
    num_points: int = 1,
    attack_loss: str = "kl",
    psi: Tensor | None = None,
    clean_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-4 of Algorithm 1: returns (z, x1, x2) with the model in eval mode throughout.

    ``attack_loss="ce"`` (with labels ``y``) gives the adversarial-training variant (paper sec. 5.4).
    With gamma = 0 the target is the clean prediction itself, whose KL gradient vanishes
    analytically at x, so x1 = x exactly (no pass is spent on it).
    """
    with model_mode(model, training=False):
        if gamma != 0 and clean_logits is None:
            z, x1 = _clean_logits_and_backward_step(
                model, x, eps=eps, step_size=step_size, gamma=gamma, num_points=num_points, psi=psi
            )
        else:
            z = clean_logits if clean_logits is not None else clean_logits_eval(model, x)
            if gamma == 0:
                x1 = x.detach().clone()
            else:
                x1 = backward_step(model, x, smoothed_target(z, gamma, num_points, psi), eps=eps, step_size=step_size)
        loss_fn = per_example_loss(attack_loss, z)
        labels = y if y is not None else z.argmax(1)
        x2 = x1
        for _ in range(attack_steps):
            grad, _, _ = input_gradient(model, x2, labels, loss_fn)
            x2 = project(x2 + step_size * grad.sign(), x, eps)
    return z, x1, x2


@dataclass(frozen=True)
class BackwardSmoothingConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 8 / 255
    gamma: float = 1.0
    beta: float = 10.0
    attack_steps: int = 1
    num_points: int = 1


@register
class BackwardSmoothing(Method):
    name = "backward_smoothing"
    Config = BackwardSmoothingConfig
    description = (
        "Chen et al. Backward Smoothing: a backward step towards a randomly smoothed output, one KL ascent step, "
        "TRADES loss; TRADES-level robustness at about a third of its cost."
    )

    @property
    def cost(self) -> Cost:
        if self.config.gamma == 0:  # no backward step: a no-grad clean forward gives z
            return Cost(self.config.attack_steps + 2, forward_only=1)
        return Cost(1 + self.config.attack_steps + 2)  # z comes from the backward step's own forward

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        _, _, x_adv = backward_smoothing_points(
            model, x, y, eps=c.eps, step_size=c.step_size, gamma=c.gamma,
            attack_steps=c.attack_steps, num_points=c.num_points,
        )
        return trades_objective(model, x, x_adv, y, c.beta)


@dataclass(frozen=True)
class BackwardSmoothingATConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 8 / 255
    gamma: float = 1.0
    attack_steps: int = 1
    num_points: int = 1


@register
class BackwardSmoothingAT(Method):
    name = "backward_smoothing_at"
    Config = BackwardSmoothingATConfig
    description = "Backward Smoothing initialisation for adversarial training: CE attack step and CE loss (paper sec. 5.4)."

    @property
    def cost(self) -> Cost:
        if self.config.gamma == 0:
            return Cost(self.config.attack_steps + 1, forward_only=1)
        return Cost(1 + self.config.attack_steps + 1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        _, _, x_adv = backward_smoothing_points(
            model, x, y, eps=c.eps, step_size=c.step_size, gamma=c.gamma,
            attack_steps=c.attack_steps, num_points=c.num_points, attack_loss="ce",
        )
        return adversarial_ce(model, x_adv, y)


__all__ = [
    "BackwardSmoothing",
    "BackwardSmoothingAT",
    "backward_smoothing_points",
    "backward_step",
    "smoothed_target",
]
