"""Strict parsing of numbers such as ``8/255`` without ever evaluating code."""

from __future__ import annotations

import math
import re
from typing import Any

from fastrobust.errors import ConfigError

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?$")


def parse_number(value: str | float | int, *, name: str = "value") -> float:
    """Parse ``0.03``, ``8/255`` or ``2e-3`` into a float; anything else is an error.

    Only a decimal number, optionally divided by another, is accepted: no expressions,
    no names, nothing is evaluated. A single number held by a 0-dim tensor or a numpy scalar
    (``torch.tensor(8 / 255)``, ``np.float32(0.5)``) is taken as that number.
    """
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # 0-dim tensor, numpy scalar
        value = value.item()
    elif isinstance(getattr(value, "ndim", None), int) and callable(getattr(value, "item", None)):
        shape = list(getattr(value, "shape", []))
        if shape == [1]:  # a one-element tensor or array: that number
            value = value.item()
        else:  # never print the whole array into a one-line error
            raise ConfigError(f"{name} is a {type(value).__name__} of shape {shape}: give one number (a Python "
                              "float, a 0-dim tensor or .item()); one value per example is not supported")
    if isinstance(value, bool) or isinstance(value, complex):
        raise ConfigError(f"{name}={value!r} is not a number")
    if isinstance(value, (int, float)):
        result = float(value)
    else:
        match = _FRACTION.match(str(value))
        if match is None:
            raise ConfigError(
                f"{name}={value!r} is not a number: write a decimal such as 0.031 or a fraction such as 8/255"
            )
        numerator = float(match.group(1))
        if match.group(2) is None:
            result = numerator
        else:
            denominator = float(match.group(2))
            if denominator == 0:
                raise ConfigError(f"{name}={value!r} divides by zero")
            result = numerator / denominator
    if not math.isfinite(result):
        raise ConfigError(f"{name}={value!r} is not a finite number")
    return result


NORMS = ("linf", "l2", "l1")  # the threat models: l_inf, l_2 and l_1 balls in [0, 1] pixel units
GRADIENT_NORMS = ("linf", "l2")  # what an attack supports unless it says more (l_1: APGD, FAB, Square, AutoAttack)
L1_ATTACKS = ("apgd, apgd_ce, apgd_dlr, apgd_t, fab_t, fab_untargeted, square and autoattack (evaluate: apgd-ce, "
              "apgd-t, fab-t, square, autoattack, autoattack-fast, autoattack-rand)")


def check_norm(norm: str, *, allowed: tuple[str, ...] = NORMS, where: str = "") -> str:
    """``norm`` when it is a threat model ``allowed`` here (default: every one of ``NORMS``); else one ConfigError
    naming the choices (and, for l_1, the attacks that support it). ``where``: who asks (an attack's name)."""
    prefix = f"{where}: " if where else ""
    if norm not in NORMS:
        raise ConfigError(f"{prefix}norm={norm!r} is not supported: choose one of {', '.join(NORMS)}")
    if norm not in allowed:
        more = f" (l1 runs with {L1_ATTACKS})" if norm == "l1" else ""
        raise ConfigError(f"{prefix}norm={norm!r} is not supported here: choose one of {', '.join(allowed)}{more}")
    return norm


def check_eps(value: float, *, name: str = "eps", allow_zero: bool = False, norm: str = "linf") -> float:
    """A perturbation size in [0,1] pixel units for the threat model ``norm``.

    l_inf: in (0, 1] (a value above 1 gets the hint "did you mean 8/255?"); l_2: any positive value (the radius
    of the ball; 0.5 is the usual CIFAR-10 budget, and the largest useful one is sqrt(C*H*W)); l_1: any positive
    value (the radius: the sum of the absolute pixel changes; 12 is the usual CIFAR-10 budget, C*H*W the largest
    useful one). With
    ``allow_zero`` 0 is accepted too. Raises ConfigError otherwise.
    """
    norm = check_norm(norm)
    value = parse_number(value, name=name)
    low_ok = value >= 0 if allow_zero else value > 0
    if norm in ("l2", "l1"):
        if not low_ok:
            bound = ">= 0" if allow_zero else "> 0"
            usual = "0.5" if norm == "l2" else "12"
            raise ConfigError(f"{name}={value:g} must be {bound}: an {norm} budget is the radius of the ball in [0,1] "
                              f"pixel units ({usual} is the usual CIFAR-10 budget)")
        return value
    if not low_ok or value > 1:
        hint = f"; did you mean {value:g}/255?" if value > 1 else ""
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{name}={value:g} is out of range {interval}: l_inf pixel units are [0,1]{hint}")
    return value


def check_eps_fits(eps: float, norm: str, image_shape, *, name: str = "eps") -> None:
    """ConfigError when an l_2 radius exceeds the diameter of the [0, 1] image box, ``sqrt(C*H*W)`` (the distance
    from the all-black to the all-white image): no two images are farther apart, so the budget is a typo (l_inf
    radii are bounded by 1 in ``check_eps``). ``image_shape``: (C, H, W) or any per-image shape."""
    if norm not in ("l2", "l1"):
        return
    size = math.prod(int(d) for d in image_shape)
    if norm == "l1":
        if size and eps > size * (1 + 1e-9):
            shape = "x".join(str(int(d)) for d in image_shape)
            raise ConfigError(f"{name}={eps:g} is larger than the l1 diameter of the [0, 1] image box for {shape} "
                              f"images, C*H*W = {size}: no two images are that far apart in l1; the usual CIFAR-10 "
                              "l1 budget is 12")
        return
    diameter = math.sqrt(size)
    if size and eps > diameter * (1 + 1e-9):
        shape = "x".join(str(int(d)) for d in image_shape)
        raise ConfigError(f"{name}={eps:g} is larger than the diameter of the [0, 1] image box for {shape} images, "
                          f"sqrt({size}) = {diameter:.4g}: no two images are that far apart in l2; the usual "
                          "CIFAR-10 l2 budget is 0.5")


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_flag(value: Any, *, name: str) -> bool:
    """A setting given as text (a command line, a YAML file) or a bool, as a bool: true/false, yes/no, on/off, 1/0.

    Raises:
        ConfigError: anything else (one line naming the setting).
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use true or false")


def parse_whole(value: Any, *, name: str) -> int:
    """A count given as a number or as text (``"50"``, ``"1e3"``), as an int; a bool or a fraction is refused.

    Raises:
        ConfigError: not a whole number (one line naming the setting).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be a whole number")
    number = parse_number(value, name=name)
    if number != int(number):
        raise ConfigError(f"{name}={value!r} must be a whole number")
    return int(number)


def check_positive_int(value: int | str, *, name: str) -> int:
    """Parse a strictly positive integer with a clear error."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None
    if number <= 0:
        raise ConfigError(f"{name}={number} must be positive")
    return number


def check_nonnegative_int(value: int | str, *, name: str) -> int:
    """Parse an integer >= 0 with a clear error."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None
    if number < 0:
        raise ConfigError(f"{name}={number} must be zero or positive")
    return number


def pixel_text(value: float) -> str:
    """A pixel-unit size as people write it: ``8/255`` when it is a whole number of 255ths in (0, 1),
    else ``%g`` (``0.5``, ``0``)."""
    scaled = value * 255
    if 0 < value < 1 and abs(scaled - round(scaled)) < 1e-6:
        return f"{round(scaled)}/255"
    return f"{value:g}"
