"""Weight averaging: an exponential moving average (EMA) of a model's parameters and BatchNorm statistics.

Every strong robust-training recipe since 2020 evaluates an EMA of the weights (Gowal et al. 2020,
"Uncovering the limits of adversarial training"; Rebuffi et al. 2021; the 2026 FastAT benchmark uses it for
all its methods). The averaging itself is torch's: ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn(decay)``, updated after every optimiser step from ``start_epoch`` on::

    averaged <- decay * averaged + (1 - decay) * model        (the first update copies the model)

BatchNorm statistics: ``use_buffers=True``, so the running mean and variance are averaged with the same
decay as the weights. The alternative, recomputing them for the averaged weights with
``swa_utils.update_bn``, costs a pass over the training data every time the averaged model is used and sees
only clean images, whereas the statistics the training model carries were collected on what the method
feeds it in train mode (clean and adversarial batches): averaging them keeps that mix and costs nothing.
(The integer ``num_batches_tracked`` is averaged too; it is only read by BatchNorm with ``momentum=None``,
which no fastrobust model uses.)

The counter ``n_averaged`` stays on the CPU (``AveragedModel`` puts it there when no device is given), so an
update never reads a GPU value back to the host.

The trainer (``fastrobust.train``) validates the averaged model after every epoch beside the trained one,
saves it (``averaged.safetensors``), keeps its state in every checkpoint (exact resume) and can select it
as ``best`` (setting ``ema_select``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fastrobust.errors import ConfigError, FastRobustError

SELECT_CHOICES = ("averaged", "model", "either")
PREFIX = "ema_"  # validation metrics of the averaged model: ema_val_clean_acc, ema_val_robust_acc


def check_settings(decay: float, start_epoch: int, select: str) -> None:
    """Reject bad averaging settings (ConfigError, one line with the fix)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ConfigError(f"ema_decay={decay!r} must be in [0, 1): 0 turns weight averaging off, "
                          "0.99-0.999 are usual (a horizon of 1/(1-decay) optimiser steps)")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise ConfigError(f"ema_start_epoch={start_epoch!r} must be a whole number >= 0 "
                          "(0: average from the first step)")
    if select not in SELECT_CHOICES:
        raise ConfigError(f"ema_select={select!r} is not one of {', '.join(SELECT_CHOICES)}")


class WeightAverager:
    """The EMA of ``model`` (an ``AveragedModel`` holding a copy of it on the same device).

    ``decay``: per optimiser step, in [0, 1). ``start_epoch``: updates before this epoch (0-based) are
    skipped, so the average starts from the weights reached by then.
    """

    def __init__(self, model: nn.Module, *, decay: float, start_epoch: int = 0) -> None:
        check_settings(decay, start_epoch, "averaged")
        self.decay = float(decay)
        self.start_epoch = int(start_epoch)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.eval()
        for param in self.averaged.parameters():
            param.requires_grad_(False)

    @classmethod
    def from_config(cls, config: Any, model: nn.Module) -> "WeightAverager | None":
        """The averager a TrainConfig asks for (``ema_decay > 0``), else None."""
        decay = float(getattr(config, "ema_decay", 0.0) or 0.0)
        if decay == 0:
            return None
        return cls(model, decay=decay, start_epoch=int(getattr(config, "ema_start_epoch", 0)))

    @property
    def module(self) -> nn.Module:
        """The averaged network itself (a model like the trained one, in eval mode)."""
        return self.averaged.module

    @property
    def started(self) -> bool:
        """Whether at least one update has been made (before that the copy is the initial weights)."""
        return int(self.averaged.n_averaged) > 0

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module, epoch: int) -> None:
        """Fold the current weights and BatchNorm buffers of ``model`` in (after an optimiser step)."""
        if epoch >= self.start_epoch:
            self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the averaged weights, buffers and update count (for checkpoints)."""
        return {key: value.detach().to("cpu", copy=True) for key, value in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict()`` (the same model architecture); FastRobustError when it does not fit."""
        if not state:
            raise FastRobustError("the checkpoint holds no weight-averaging state although ema_decay > 0: it was "
                                  "written by a run without averaging; resume it without changing ema_decay")
        try:
            self.averaged.load_state_dict(state)
        except RuntimeError as error:
            raise FastRobustError(f"the checkpoint's weight-averaging state does not fit this model: {error}") from None


def best_candidate(record: dict[str, Any], metric: str, select: str,
                   averager: WeightAverager | None) -> tuple[str, float | None]:
    """Which weights compete for ``best`` this epoch and with which validation value.

    Returns ``("model" | "averaged", value)``; value is None when the record has no validation metric
    (no validation split). ``select``: ``averaged`` (the averaged weights once averaging has started),
    ``model`` (the trained weights only) or ``either`` (the better of the two; a tie goes to the averaged).
    """
    model_value = record.get(metric)
    if averager is None or not averager.started or select == "model":
        return "model", model_value
    averaged_value = record.get(PREFIX + metric)
    if select == "either" and model_value is not None and averaged_value is not None and model_value > averaged_value:
        return "model", model_value
    return "averaged", averaged_value
