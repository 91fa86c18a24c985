"""What every fastrobust model shares: input normalisation inside ``forward`` and the config attribute."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastrobust.errors import ConfigError


def channel_values(value, in_channels: int, *, name: str, default: float, positive: bool) -> list[float]:
    if value is None:
        return [float(default)] * in_channels
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{name}={value!r} must be a number or a sequence of {in_channels} numbers (one per channel)")
    values = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"{name}={list(value)!r} must contain numbers only")
        item = float(item)
        if item != item or item in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}={list(value)!r} must contain finite numbers")
        if positive and item <= 0:
            raise ConfigError(f"{name}={list(value)!r} must be positive (it divides the input)")
        values.append(item)
    if len(values) == 1:
        values = values * in_channels
    if len(values) != in_channels:
        raise ConfigError(
            f"{name} has {len(values)} values but the model has in_channels={in_channels}: give one per channel"
        )
    return values


class NormalizedModel(nn.Module):
    """Base class: ``normalize(x) = (x - mean) / std`` with ``mean``/``std`` buffers of shape [1, C, 1, 1].

    Inputs are pixels in [0, 1]; attacks therefore work in pixel space and never normalise themselves.
    The buffers are persistent, so checkpoints carry the normalisation with the weights.
    """

    fastrobust_config: dict

    def __init__(self, in_channels: int, mean=None, std=None):
        super().__init__()
        mean_values = channel_values(mean, in_channels, name="mean", default=0.0, positive=False)
        std_values = channel_values(std, in_channels, name="std", default=1.0, positive=True)
        self.register_buffer("mean", torch.tensor(mean_values, dtype=torch.float32).view(1, in_channels, 1, 1))
        self.register_buffer("std", torch.tensor(std_values, dtype=torch.float32).view(1, in_channels, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.normalize(x))

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
