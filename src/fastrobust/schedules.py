"""Learning-rate schedules as pure functions of training progress (in epochs).

Being stateless, a schedule resumes exactly: the trainer sets the lr before every step from
``schedule(progress)``, where progress = epoch + step / steps_per_epoch.
"""

from __future__ import annotations

import math
from typing import Callable

from .errors import ConfigError

SCHEDULES = ("piecewise", "cyclic", "cosine", "constant")


def lr_schedule(name: str, base_lr: float, epochs: int) -> Callable[[float], float]:
    """``piecewise``: x0.1 at 50% and 75% of the epochs (the Backward Smoothing paper's);
    ``cyclic``: linear from 0 up to ``base_lr`` at 40% then down to 0 (Fast AT's);
    ``cosine``: half a cosine from ``base_lr`` to 0; ``constant``."""
    if epochs <= 0:
        raise ConfigError(f"epochs={epochs} must be positive")
    if name == "piecewise":
        return lambda t: base_lr * (0.1 ** ((t >= 0.5 * epochs) + (t >= 0.75 * epochs)))
    if name == "cyclic":
        peak = 0.4 * epochs

        def cyclic(t: float) -> float:
            if t <= peak:
                return base_lr * t / peak
            return base_lr * max(0.0, (epochs - t) / (epochs - peak))

        return cyclic
    if name == "cosine":
        return lambda t: base_lr * 0.5 * (1 + math.cos(math.pi * min(t, epochs) / epochs))
    if name == "constant":
        return lambda t: base_lr
    raise ConfigError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
