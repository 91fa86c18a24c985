"""The single- and two-step baselines: Fast AT (FGSM-RS), its 2-step variant, Fast TRADES and Fast AT+.

Fast AT+ (Li et al.) adds a PGD check on the validation split after each epoch: when validation
robust accuracy collapses (catastrophic overfitting), the trainer restores the last good weights and
the method trains the next epoch(s) with PGD-10. The trainer drives the check through
``collapse_action`` and ``after_restore``; the method only switches its attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastrobust.attacks import pgd
from fastrobust.attacks.toolkit import random_start
from fastrobust.errors import ConfigError
from fastrobust.methods.base import Cost, Method, MethodConfig, Stats, register
from fastrobust.methods.standard import PGDAT, TRADES, PGDATConfig, adversarial_ce


@dataclass(frozen=True)
class FastATConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 10 / 255
    attack_eval_mode: bool = True


@register
class FastAT(Method):
    name = "fast_at"
    Config = FastATConfig
    description = "Wong et al. FGSM with a uniform random start (FGSM-RS): one signed CE step, CE on the result."

    @property
    def cost(self) -> Cost:
        return Cost(2)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        x_adv = pgd(
            model, x, y, eps=c.eps, steps=1, step_size=c.step_size, random_init=True, eval_mode=c.attack_eval_mode
        )
        return adversarial_ce(model, x_adv, y)


@dataclass(frozen=True)
class FastAT2StepConfig(PGDATConfig):
    step_size: float = 4 / 255
    steps: int = 2


@register
class FastAT2Step(PGDAT):
    """PGD-AT with the 2-step budget: only the defaults differ."""

    name = "fast_at_2step"
    Config = FastAT2StepConfig
    description = "PGD adversarial training with 2 steps from a uniform random start (step eps/2)."


@dataclass(frozen=True)
class FastTRADESConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 6 / 255
    steps: int = 1
    beta: float = 6.0


@register
class FastTRADES(TRADES):
    """TRADES with a uniform random start and a 1- or 2-step attack."""

    name = "fast_trades"
    Config = FastTRADESConfig
    description = "TRADES with a uniform random start and 1 (or 2) KL-ascent steps (step 6/255, the BS paper's best)."

    def start(self, x: Tensor) -> Tensor:
        return random_start(x, self.config.eps, "linf")


@dataclass(frozen=True)
class FastATPlusConfig(MethodConfig):
    eps: float = 8 / 255
    step_size: float = 10 / 255
    collapse_margin: float = 0.1
    fallback_steps: int = 10
    fallback_step_size: float = 2 / 255
    fallback_epochs: int = 1


@register
class FastATPlus(Method):
    name = "fast_at_plus"
    Config = FastATPlusConfig
    description = (
        "Li et al. Fast AT+: FGSM-RS with a PGD check on the validation split after every epoch; on a collapse "
        "(drop > collapse_margin from the best) restore the last good weights and train with PGD-10."
    )
    collapse_action = "restore"

    needs_validation = True  # the trainer refuses val_size=0: without the check this would be fast_at

    def __init__(self, config: FastATPlusConfig | None = None, /, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.fallback_epochs_left = 0
        self._in_fallback = False
        self._started_epoch = -1  # the epoch whose attack was last decided (a resumed epoch keeps its decision)

    @property
    def collapse_margin(self) -> float:
        return self.config.collapse_margin

    @property
    def cost(self) -> Cost:
        return Cost(2)

    def after_restore(self) -> None:
        """The trainer restored the last good weights after a collapse: train the next epochs with PGD."""
        self.fallback_epochs_left = self.config.fallback_epochs

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        if epoch != self._started_epoch:  # a new epoch (not one resumed in its middle): decide its attack
            self._started_epoch = epoch
            self._in_fallback = self.fallback_epochs_left > 0
            if self._in_fallback:
                self.fallback_epochs_left -= 1
        return {"attack": f"pgd{self.config.fallback_steps}" if self._in_fallback else "fgsm_rs"}

    _STATE = ("fallback_epochs_left", "in_fallback", "started_epoch")

    def state_dict(self) -> dict[str, Tensor]:
        """The fallback schedule, so that a resumed run trains each epoch with the attack the uninterrupted run
        uses (a checkpoint written after a collapse holds the pending PGD epoch)."""
        values = (self.fallback_epochs_left, int(self._in_fallback), self._started_epoch)
        return {name: torch.tensor(value, dtype=torch.int64) for name, value in zip(self._STATE, values)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:  # a checkpoint written before this state was saved: no fallback pending
            self.fallback_epochs_left, self._in_fallback, self._started_epoch = 0, False, -1
            return
        if set(state) != set(self._STATE):
            raise ConfigError(f"fast_at_plus keeps {', '.join(self._STATE)}, but the checkpoint holds {sorted(state)}")
        self.fallback_epochs_left = int(state["fallback_epochs_left"])
        self._in_fallback = bool(int(state["in_fallback"]))
        self._started_epoch = int(state["started_epoch"])

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        c = self.config
        if self._in_fallback:
            x_adv = pgd(model, x, y, eps=c.eps, steps=c.fallback_steps, step_size=c.fallback_step_size, random_init=True)
        else:
            x_adv = pgd(model, x, y, eps=c.eps, steps=1, step_size=c.step_size, random_init=True)
        return adversarial_ce(model, x_adv, y)
