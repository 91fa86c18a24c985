"""SPROUT, Self-Progressing Robust Training (Cheng et al.): robustness without any adversarial example.

The labels are smoothed by a Dirichlet distribution whose parameter the training itself learns. With
a learnable u in R^C (initialised to ones), the target of an example of class y is a reparameterised
sample r ~ Dirichlet(c * onehot(y) + u) (c = ``label_concentration`` = 10; the concentration is clamped
to ``min_concentration`` > 0), and

    L(y; x) = -(1/B) * sum_i r_i . log s(f(x))_i.

Per batch (``train_step``, what the trainer calls):
  1. ``n_aug`` (3) network updates; each draws x' = x + sigma * N(0, 1) (sigma = 0.1; not clamped to [0, 1],
     as in the authors' ``mixup_data``; ``clamp_noise=True`` clamps), a mixup of x' with a shuffled copy,
     lambda ~ Beta(alpha, alpha) (alpha = 0.2), and minimises lambda * L(y_a; x_mix) + (1 - lambda) * L(y_b; x_mix)
     with u held fixed;
  2. one update of u by gradient ASCENT of L(y; x) on the clean batch (SGD on u alone, its learning rate
     the network optimiser's current one times ``u_lr_scale``, momentum ``u_momentum`` = 0.9 and weight decay
     ``u_weight_decay`` = 5e-4, as the authors' ``optimizer_u = SGD([u], lr, momentum=0.9, weight_decay=5e-4)``).

Under several ranks (torchrun) u follows the global batch: the trainer sets ``gradient_reduce``, which
averages u's gradient over the ranks with the same weights as the network's gradients, so every rank takes the
same step and holds the same u.

The gradient of L with respect to u flows through the Dirichlet sample only, so step 2 needs a forward
of the network but no backward through it: the declared cost is ``n_aug`` passes plus one forward.

Used as a plain loss, ``loss, stats = method(model, x, y)`` is ONE network update's loss (one noisy
mixup batch, the current u); it never changes u. A user's own loop reproduces ``train_step`` by calling
the loss ``n_aug`` times per batch and then ``method.update_labels(model, x, y, lr)``.

All randomness (noise, lambda, permutation, Dirichlet samples) is drawn from torch's global generators,
whose state the trainer saves in checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.attacks.toolkit import upcast
from fastrobust.errors import ConfigError
from fastrobust.methods.base import Cost, Method, MethodConfig, Stats, accuracy, register


def dirichlet_targets(
    y: Tensor, u: Tensor, *, label_concentration: float = 10.0, min_concentration: float = 1e-3
) -> Tensor:
    """A reparameterised sample r ~ Dirichlet(label_concentration * onehot(y) + u), one row per label.

    Rows are probability vectors (non-negative, summing to 1); gradients flow from r back to ``u``.
    """
    num_classes = u.shape[-1]
    # not F.one_hot: on the CPU it reads the labels back to check their range (the input contract checks them)
    onehot = (y.unsqueeze(-1) == torch.arange(num_classes, device=y.device)).to(u.dtype)
    concentration = label_concentration * onehot + u
    concentration = concentration.clamp_min(min_concentration)
    return torch.distributions.Dirichlet(concentration, validate_args=False).rsample()  # no host sync


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-(1/B) sum_i targets_i . log s(logits)_i (computed in float32 also under autocast)."""
    return -(targets * F.log_softmax(upcast(logits), dim=1)).sum(dim=1).mean()


def noisy_mixup(x: Tensor, sigma: float, alpha: float, *, clamp: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(x_mix, lam, perm): Gaussian noise (not clamped, as the authors; ``clamp`` keeps it in [0, 1]), then mixup
    with a shuffled copy of the noisy batch.

    ``lam`` ~ Beta(alpha, alpha) is a 0-d tensor on x's device (no host synchronisation); alpha = 0 means
    no mixup (lam = 1).
    """
    noisy = x + sigma * torch.randn_like(x) if sigma > 0 else x
    if clamp:
        noisy = noisy.clamp(0.0, 1.0)
    perm = torch.randperm(x.shape[0], device=x.device)
    if alpha > 0:
        concentration = torch.full((), float(alpha), device=x.device, dtype=torch.float32)  # filled there: no upload
        lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample()
    else:
        lam = torch.ones((), device=x.device, dtype=torch.float32)
    mixed = lam.to(x.dtype) * noisy + (1 - lam.to(x.dtype)) * noisy[perm]
    return mixed, lam, perm


@dataclass(frozen=True)
class SPROUTConfig(MethodConfig):
    n_aug: int = 3                  # network updates per batch
    sigma: float = 0.1              # std of the Gaussian noise added to the images (pixel units)
    alpha: float = 0.2              # mixup lambda ~ Beta(alpha, alpha); 0 turns mixup off
    label_concentration: float = 10.0  # Dirichlet concentration added on the true class
    u_init: float = 1.0             # initial value of every entry of u
    u_lr_scale: float = 1.0         # u's learning rate = this * the network optimiser's current lr (authors: 1)
    u_momentum: float = 0.9         # momentum of u's SGD optimiser (authors: 0.9)
    u_weight_decay: float = 5e-4    # weight decay of u's SGD optimiser (authors: 5e-4)
    min_concentration: float = 1e-3  # the Dirichlet concentration is clamped to at least this
    clamp_noise: bool = False       # clamp the noisy images to [0, 1] (the authors do not)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_aug, int) or isinstance(self.n_aug, bool) or self.n_aug < 1:
            raise ConfigError(f"sprout n_aug={self.n_aug!r} must be a whole number >= 1 (paper: 3)")
        checks = {
            "sigma": self.sigma >= 0, "alpha": self.alpha >= 0, "label_concentration": self.label_concentration > 0,
            "u_lr_scale": self.u_lr_scale >= 0, "u_momentum": 0 <= self.u_momentum < 1,
            "u_weight_decay": self.u_weight_decay >= 0,
            "min_concentration": self.min_concentration > 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ConfigError(f"sprout {name}={value!r} is out of range (see `fastrobust methods`)")
        if not math.isfinite(self.u_init):
            raise ConfigError(f"sprout u_init={self.u_init!r} must be a finite number")


@register
class SPROUT(Method):
    name = "sprout"
    Config = SPROUTConfig
    description = (
        "Cheng et al. SPROUT: no attack; n_aug updates on noisy mixup batches with learned Dirichlet label "
        "smoothing, then a gradient-ascent update of the Dirichlet parameter (owns its updates: train_step)."
    )

    def __init__(self, config: SPROUTConfig | None = None, /, **overrides) -> None:
        super().__init__(config, **overrides)
        self.u: Tensor | None = None  # created on first use, when the number of classes is known
        self._u_optimizer: torch.optim.SGD | None = None

    # ---- the learnable label parameter ----------------------------------------------------------------
    def _set_u(self, value: Tensor, momentum: Tensor | None = None) -> None:
        self.u = value.detach().to(torch.float32).clone().requires_grad_(True)
        self._u_optimizer = torch.optim.SGD(
            [self.u], lr=1.0, momentum=self.config.u_momentum, weight_decay=self.config.u_weight_decay, maximize=True,
        )
        if momentum is not None:
            self._u_optimizer.state[self.u]["momentum_buffer"] = momentum.detach().to(self.u).clone()

    def label_parameter(self, num_classes: int, device: torch.device | str) -> Tensor:
        """u (created as ``u_init`` * ones on first use; moved to ``device`` with its momentum if needed)."""
        if self.u is None:
            self._set_u(torch.full((num_classes,), float(self.config.u_init), device=device))
        elif self.u.shape != (num_classes,):
            raise ConfigError(
                f"sprout's label parameter u has {self.u.shape[0]} entries but the model predicts {num_classes} "
                "classes: a checkpoint of another dataset?"
            )
        elif self.u.device != torch.device(device):
            self._set_u(self.u.to(device), self._momentum_buffer())
        assert self.u is not None
        return self.u

    def _momentum_buffer(self) -> Tensor | None:
        if self._u_optimizer is None or self.u is None:
            return None
        return self._u_optimizer.state.get(self.u, {}).get("momentum_buffer")

    def state_dict(self) -> dict[str, Tensor]:
        if self.u is None:
            return {}
        state = {"u": self.u.detach().clone()}
        buffer = self._momentum_buffer()
        if buffer is not None:
            state["u_momentum_buffer"] = buffer.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        unknown = set(state) - {"u", "u_momentum_buffer"}
        if unknown:
            raise ConfigError(f"sprout keeps u and u_momentum_buffer, but the checkpoint holds {sorted(unknown)}")
        if "u" not in state:  # the state before the first step: u is created afresh from u_init
            self.u, self._u_optimizer = None, None
            return
        self._set_u(state["u"], state.get("u_momentum_buffer"))

    # ---- losses -------------------------------------------------------------------------------------
    @property
    def cost(self) -> Cost:
        """Per ``train_step``: n_aug forward+backward passes, plus one forward for the u update."""
        return Cost(self.config.n_aug, forward_only=1)

    def _targets(self, y: Tensor, u: Tensor) -> Tensor:
        c = self.config
        return dirichlet_targets(y, u, label_concentration=c.label_concentration, min_concentration=c.min_concentration)

    def augmented_loss(self, model: nn.Module, x: Tensor, y: Tensor,
                       autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> tuple[Tensor, Stats]:
        """One network update's loss: noisy mixup batch, Dirichlet targets at the current (fixed) u."""
        c = self.config
        x_mix, lam, perm = noisy_mixup(x, c.sigma, c.alpha, clamp=c.clamp_noise)
        with (autocast or contextlib.nullcontext)():
            logits = model(x_mix)
        u = self.label_parameter(logits.shape[1], x.device).detach()
        with torch.no_grad():
            targets_a = self._targets(y, u)
            targets_b = self._targets(y[perm], u)
        loss = lam * soft_cross_entropy(logits, targets_a) + (1 - lam) * soft_cross_entropy(logits, targets_b)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y), "lam": lam.detach()}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        """A single network update's loss (u unchanged); see the module docstring for the difference."""
        return self.augmented_loss(model, x, y)

    def label_objective(self, log_probs: Tensor, y: Tensor) -> Tensor:
        """L(y) at the current u for fixed log-probabilities: differentiable with respect to u only."""
        u = self.label_parameter(log_probs.shape[1], log_probs.device)
        return -(self._targets(y, u) * log_probs.detach()).sum(dim=1).mean()

    def update_labels(self, model: nn.Module, x: Tensor, y: Tensor, lr: float,
                      autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> Stats:
        """One gradient-ASCENT step of u on L(y; x) for the clean batch (the network is only run forward)."""
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            logits = model(x)
        log_probs = F.log_softmax(upcast(logits.detach()), dim=1)
        objective = self.label_objective(log_probs, y)
        assert self.u is not None and self._u_optimizer is not None
        (grad,) = torch.autograd.grad(objective, self.u)
        if self.gradient_reduce is not None:  # several ranks: the gradient of the global batch's objective
            self.gradient_reduce([grad])
        self.u.grad = grad
        for group in self._u_optimizer.param_groups:
            group["lr"] = float(lr) * self.config.u_lr_scale
        self._u_optimizer.step()
        self.u.grad = None
        u = self.u.detach()
        return {"label_loss": objective.detach(), "clean_acc": accuracy(logits, y),
                "u_mean": u.mean(), "u_min": u.min(), "u_max": u.max()}

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, *,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[Tensor, Stats]:
        """The full SPROUT step on one batch: n_aug network updates, then one ascent update of u."""
        lr = optimizer.param_groups[0]["lr"]
        total: Tensor | None = None
        acc: Tensor | None = None
        for _ in range(self.config.n_aug):
            loss, stats = self.augmented_loss(model, x, y, autocast)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total = stats["loss"] if total is None else total + stats["loss"]
            acc = stats["acc"] if acc is None else acc + stats["acc"]
        assert total is not None and acc is not None
        mean_loss = total / self.config.n_aug
        label_stats = self.update_labels(model, x, y, lr, autocast)
        return mean_loss, {"loss": mean_loss, "acc": acc / self.config.n_aug, **label_stats}


__all__ = ["SPROUT", "SPROUTConfig", "dirichlet_targets", "noisy_mixup", "soft_cross_entropy"]
