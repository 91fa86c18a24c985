"""Learning-rate schedules as pure functions of training progress (in epochs).

Being stateless, a schedule resumes exactly: the trainer sets the lr before every step from
``schedule(progress)``, where progress = epoch + step / steps_per_epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from fastrobust.core.values import parse_number
from fastrobust.errors import ConfigError

SCHEDULES = ("piecewise", "cyclic", "cosine", "constant")
# the parameters each schedule takes (TrainConfig.schedule_params), with their defaults
SCHEDULE_PARAMS: dict[str, dict[str, Any]] = {
    "piecewise": {"milestones": (0.5, 0.75), "factor": 0.1},
    "cyclic": {"peak": 0.4},
    "cosine": {},
    "constant": {},
}


def _fraction(value: Any, name: str, *, low_open: bool, high_open: bool) -> float:
    number = parse_number(value, name=f"schedule {name}")
    too_low = number <= 0 if low_open else number < 0
    too_high = number >= 1 if high_open else number > 1
    if not math.isfinite(number) or too_low or too_high:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"schedule {name}={value!r} must be a fraction of the training in {interval}")
    return number


def _milestones(value: Any) -> tuple[float, ...]:
    items: Sequence[Any] = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"schedule milestones={value!r} must be a list of fractions of the training, e.g. [0.5, 0.75]")
    out = tuple(_fraction(v, "milestones", low_open=True, high_open=True) for v in items)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError(f"schedule milestones={value!r} must increase")
    return out


def lr_schedule(name: str, base_lr: float, epochs: int, **params: Any) -> Callable[[float], float]:
    """The learning rate as a function of progress t in epochs.

    * ``piecewise``: ``base_lr``, multiplied by ``factor`` (0.1) at each of ``milestones``, given as fractions of
      the training (default 0.5 and 0.75: the Backward Smoothing paper's epochs 50 and 75 of 100; SPROUT's
      authors: stages of 80/60/40/20 of 200 epochs = milestones 0.4, 0.7, 0.9);
    * ``cyclic``: one cycle, linear from 0 up to ``base_lr`` at ``peak`` (a fraction of the training), then
      linearly down to 0 at the end. ``peak`` 0.4 (default) is SLAT's shape, 0.5 Wong et al.'s Fast AT
      (``CyclicLR`` with equal up and down steps), 0 the Backward Smoothing authors' accelerated TRADES-type
      scripts (``CyclicLR(base_lr=0, max_lr=2*lr, step_size_up=1, step_size_down=all steps)``: the peak at once,
      then a linear decay);
    * ``cosine``: half a cosine from ``base_lr`` to 0; ``constant``.

    Raises ConfigError for an unknown schedule or parameter, or a value out of range.
    """
    if epochs <= 0:
        raise ConfigError(f"epochs={epochs} must be positive")
    if name not in SCHEDULE_PARAMS:
        raise ConfigError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    unknown = set(params) - set(SCHEDULE_PARAMS[name])
    if unknown:
        allowed = ", ".join(SCHEDULE_PARAMS[name]) or "none"
        raise ConfigError(f"schedule {name!r} has no parameter {', '.join(sorted(unknown))} (its parameters: {allowed})")
    settings = {**SCHEDULE_PARAMS[name], **params}
    if name == "piecewise":
        milestones = [m * epochs for m in _milestones(settings["milestones"])]
        factor = parse_number(settings["factor"], name="schedule factor")
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise ConfigError(f"schedule factor={settings['factor']!r} must be in (0, 1] (0.1: the lr drops tenfold)")
        return lambda t: base_lr * factor ** sum(t >= m for m in milestones)
    if name == "cyclic":
        peak = _fraction(settings["peak"], "peak", low_open=False, high_open=False) * epochs

        def cyclic(t: float) -> float:
            if t < peak:
                return base_lr * t / peak
            if peak >= epochs:
                return base_lr
            return base_lr * max(0.0, (epochs - t) / (epochs - peak))

        return cyclic
    if name == "cosine":
        return lambda t: base_lr * 0.5 * (1 + math.cos(math.pi * min(t, epochs) / epochs))
    return lambda t: base_lr
