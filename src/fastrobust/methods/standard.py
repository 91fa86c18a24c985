"""The baselines: natural training, PGD adversarial training (Madry) and TRADES.

Each training loss is computed in the mode the model is in when the method is called (the
trainer puts it in train mode); the attack inside runs in eval mode and restores that mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrobust.attacks import kl_to, pgd
from fastrobust.attacks.toolkit import upcast
from fastrobust.methods.base import Cost, Method, MethodConfig, Stats, accuracy, clean_logits_eval, register


def trades_objective(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Stats]:
    """``CE(f(x), y) + beta * KL(s(f(x)) || s(f(x_adv)))``, KL summed and divided by the batch size.

    The clean logits keep their gradient inside the KL, as in the TRADES authors' code.
    """
    logits = model(x)
    logits_adv = model(x_adv)
    natural = F.cross_entropy(upcast(logits), y)
    robust = kl_to(logits, logits_adv).sum() / x.shape[0]
    loss = natural + beta * robust
    stats = {
        "loss": loss.detach(),
        "natural_loss": natural.detach(),
        "robust_loss": robust.detach(),
        "acc": accuracy(logits, y),
        "adv_acc": accuracy(logits_adv, y),
    }
    return loss, stats


def adversarial_ce(model: nn.Module, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
    """Cross-entropy on the adversarial batch (the Madry objective's outer minimisation)."""
    logits = model(x_adv)
    loss = F.cross_entropy(upcast(logits), y)
    return loss, {"loss": loss.detach(), "adv_acc": accuracy(logits, y)}


@dataclass(frozen=True)
class NaturalConfig(MethodConfig):
    pass


@register
class Natural(Method):
    name = "natural"
    Config = NaturalConfig
    description = "Standard training: CE on clean images (no robustness; the baseline every method must beat)."

    @property
    def cost(self) -> Cost:
        return Cost(1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        logits = model(x)
        loss = F.cross_entropy(upcast(logits), y)
        return loss, {"loss": loss.detach(), "acc": accuracy(logits, y)}


@dataclass(frozen=True)
class PGDATConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_init: bool = True
    attack_eval_mode: bool = True


@register
class PGDAT(Method):
    name = "pgd_at"
    Config = PGDATConfig
    description = "Madry et al. PGD adversarial training: uniform random start, K signed steps on CE, CE on the result."

    @property
    def cost(self) -> Cost:
        return Cost(self.config.steps + 1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        x_adv = pgd(
            model, x, y, eps=c.eps, steps=c.steps, step_size=c.step_size,
            random_init=c.random_init, eval_mode=c.attack_eval_mode,
        )
        return adversarial_ce(model, x_adv, y)


@dataclass(frozen=True)
class TRADESConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    beta: float = 6.0
    init_std: float = 0.001


@register
class TRADES(Method):
    name = "trades"
    Config = TRADESConfig
    description = "Zhang et al. TRADES: 0.001*N(0,1) start, K signed KL-ascent steps, CE + beta*KL."

    @property
    def cost(self) -> Cost:
        return Cost(self.config.steps + 2, forward_only=1)

    def start(self, x: Tensor) -> Tensor:
        """The attack's starting point: TRADES' small Gaussian perturbation of x."""
        return x + self.config.init_std * torch.randn_like(x)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        clean = clean_logits_eval(model, x)
        x_adv = pgd(
            model, x, y, eps=c.eps, steps=c.steps, step_size=c.step_size,
            loss="kl", reference_logits=clean, start=self.start(x),
        )
        return trades_objective(model, x, x_adv, y, c.beta)
