"""Weight averaging: an exponential moving average (EMA) of a model's parameters and BatchNorm statistics.

Every strong robust-training recipe since 2020 evaluates an EMA of the weights (Gowal et al. 2020,
"Uncovering the limits of adversarial training"; Rebuffi et al. 2021; the 2026 FastAT benchmark uses it for
all its methods). After every optimiser step from ``start_epoch`` on::

    averaged <- decay * averaged + (1 - decay) * model        (the first update copies the model)

computed as torch's ``torch.optim.swa_utils.get_ema_multi_avg_fn`` computes it (``torch._foreach_lerp_`` with
weight ``1 - decay`` on every floating-point parameter and buffer), so the averaged weights are bit-identical
to ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)``. ``AveragedModel``
itself is not used: its update counter is a CPU tensor that every update copies to the model's device once per
dtype group (on CUDA two blocking host-to-device copies per step) and reads twice. Here the counter is a
Python int and an update runs on the device only: no host synchronisation.

BatchNorm statistics: the running mean and variance are averaged with the same decay as the weights.
The alternative, recomputing them for the averaged weights with ``swa_utils.update_bn``, costs a pass over
the training data every time the averaged model is used and sees only clean images, whereas the statistics
the training model carries were collected on what the method feeds it in train mode (clean and adversarial
batches): averaging them keeps that mix and costs nothing. Integer buffers (BatchNorm's
``num_batches_tracked``, only read by BatchNorm with ``momentum=None``, which no fastrobust model uses) are
copied from the model: an average of a counter is not a count (``AveragedModel`` rounded it down every step).

The trainer (``fastrobust.train``) validates the averaged model after every validated epoch beside the trained
one, saves it (``averaged.safetensors``), keeps its state in every checkpoint (exact resume; the same keys as
``AveragedModel``'s state dict, ``module.*`` and ``n_averaged``) and can select it as ``best`` (setting
``ema_select``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
    """The EMA of ``model``: a copy of it on the same device (in eval mode, no gradients), updated in place.

    ``decay``: per optimiser step, in [0, 1). ``start_epoch``: updates before this epoch (0-based) are
    skipped, so the average starts from the weights reached by then.
    """

    COUNT_KEY = "n_averaged"  # the update count in state_dict(), as AveragedModel names it
    MODULE_PREFIX = "module."

    def __init__(self, model: nn.Module, *, decay: float, start_epoch: int = 0) -> None:
        check_settings(decay, start_epoch, "averaged")
        self.decay = float(decay)
        self.start_epoch = int(start_epoch)
        self._module = copy.deepcopy(model)
        self._module.eval()
        for param in self._module.parameters():
            param.requires_grad_(False)
        self._count = 0
        self._pairs: _Pairs | None = None

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
        return self._module

    @property
    def started(self) -> bool:
        """Whether at least one update has been made (before that the copy is the initial weights)."""
        return self._count > 0

    @property
    def updates(self) -> int:
        return self._count

    @torch.no_grad()
    def update(self, model: nn.Module, epoch: int) -> None:
        """Fold the current weights and BatchNorm buffers of ``model`` in (after an optimiser step)."""
        if epoch < self.start_epoch:
            return
        pairs = self._pairs_of(model)
        if self._count == 0:  # the first update copies
            torch._foreach_copy_(pairs.averaged, pairs.current)
        else:
            if pairs.float_averaged:
                torch._foreach_lerp_(pairs.float_averaged, pairs.float_current, 1 - self.decay)
            if pairs.other_averaged:
                torch._foreach_copy_(pairs.other_averaged, pairs.other_current)
        self._count += 1

    def _pairs_of(self, model: nn.Module) -> "_Pairs":
        """The tensors an update pairs up (made once per model: the trainer updates from the same model)."""
        if self._pairs is None or self._pairs.model_id != id(model):
            self._pairs = _Pairs.of(self._module, model)
        return self._pairs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the averaged weights, buffers and update count (for checkpoints)."""
        state = {self.MODULE_PREFIX + key: value.detach().to("cpu", copy=True)
                 for key, value in self._module.state_dict().items()}
        state[self.COUNT_KEY] = torch.tensor(self._count, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict()`` (the same model architecture); FastRobustError when it does not fit."""
        if not state:
            raise FastRobustError("the checkpoint holds no weight-averaging state although ema_decay > 0: it was "
                                  "written by a run without averaging; resume it without changing ema_decay")
        if self.COUNT_KEY not in state:
            raise FastRobustError(f"the checkpoint's weight-averaging state has no update count ({self.COUNT_KEY})")
        weights = {key[len(self.MODULE_PREFIX):]: value for key, value in state.items()
                   if key.startswith(self.MODULE_PREFIX)}
        unknown = sorted(set(state) - {self.COUNT_KEY} - {self.MODULE_PREFIX + key for key in weights})
        try:
            if unknown:
                raise RuntimeError(f"unexpected keys {unknown[:3]}")
            self._module.load_state_dict(weights)
        except RuntimeError as error:
            raise FastRobustError(f"the checkpoint's weight-averaging state does not fit this model: {error}") from None
        self._count = int(state[self.COUNT_KEY])


@dataclass
class _Pairs:
    """The averaged copy's parameters then buffers beside the model's, in the same order (as ``AveragedModel``
    pairs them with ``use_buffers=True``), detached, and split into floating-point (averaged) and other
    (copied) tensors."""

    model_id: int
    averaged: list[torch.Tensor]
    current: list[torch.Tensor]
    float_averaged: list[torch.Tensor]
    float_current: list[torch.Tensor]
    other_averaged: list[torch.Tensor]
    other_current: list[torch.Tensor]

    @classmethod
    def of(cls, averaged_module: nn.Module, model: nn.Module) -> "_Pairs":
        """FastRobustError when the two modules do not hold tensors of the same shapes."""
        averaged = [t.detach() for t in (*averaged_module.parameters(), *averaged_module.buffers())]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(averaged) != len(current) or any(a.shape != b.shape for a, b in zip(averaged, current)):
            raise FastRobustError("weight averaging: the model does not have the tensors of the averaged copy (was "
                                  "it changed after the averager was made?)")
        floats = [a.is_floating_point() or a.is_complex() for a in averaged]
        return cls(id(model), averaged, current,
                   [a for a, f in zip(averaged, floats) if f], [c for c, f in zip(current, floats) if f],
                   [a for a, f in zip(averaged, floats) if not f], [c for c, f in zip(current, floats) if not f])


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
