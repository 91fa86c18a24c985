"""The keyword settings of the attacks, checked and normalised in one place.

Settings reach an attack from Python, from ``evaluate(attack_options=...)``, from a sweep file or the command line,
so a value may arrive as text. A name means the same thing in every attack that takes it, and every public attack
(``inputs.entry_point``) and ``evaluate`` pass their settings through :func:`check_options` before any work:

- flags (``random_init``, ``stop_at_fooled``, ...) must be bools: ``"False"`` is a non-empty string, which Python
  takes as true, so it would run the opposite of what the record then shows;
- counts (``steps``, ``n_iter``, ``n_queries``, ...) must be whole numbers at or above their minimum (``"50"`` is
  parsed, ``2.5`` refused);
- sizes are numbers (``"2/255"`` is parsed, as for eps) in their range: an l_inf ``step_size`` is in (0, 1] pixel
  units (2 gets the "did you mean 2/255?" hint), APGD's ``alpha``/``rho`` and FAB's ``alpha_max``/``beta`` in (0, 1].

- ``norm`` is a supported threat model and ``eps`` a budget in its range (``core.values.check_eps``): the input
  contract checks both here, once, for every public attack.

Names not listed here pass through unchanged (each attack checks its own: ``loss``, ``precision``, ...).
"""

from __future__ import annotations

from typing import Any

from fastrobust.core.values import check_eps, check_norm, parse_number, parse_whole
from fastrobust.errors import ConfigError

FLAGS = frozenset({"random_init", "stop_at_fooled", "rescale_schedule", "early_stop", "eval_mode", "channels_last",
                   "return_details", "return_queries", "large_eps", "compile"})
OPTIONAL_FLAGS = frozenset({"freeze"})  # None: the attack's default
# smallest allowed value of each count; pgd's steps may be 0 (the start point itself), evaluate's PGD names need 1
COUNTS = {"steps": 0, "restarts": 1, "n_iter": 1, "n_restarts": 1, "n_targets": 1, "n_queries": 1, "eot_iter": 1}
OPTIONAL_COUNTS = {"max_rows": 1}  # None: the attack's default
UNIT_INTERVAL = frozenset({"p_init", "alpha", "rho", "alpha_max", "beta"})  # in (0, 1]
POSITIVE = frozenset({"eta"})
OPTIONAL_POSITIVE = frozenset({"tol"})  # None: the attack's default


def check_options(where: str, options: dict[str, Any], *, norm: Any = "linf",
                  minimums: dict[str, int] | None = None) -> dict[str, Any]:
    """``options`` with every known setting checked and normalised (numbers parsed from text, whole floats as int);
    a ConfigError names the first bad one. ``norm`` sets the range of ``step_size``; ``minimums`` raises the
    smallest allowed value of counts (``evaluate``'s pgd20 needs ``steps >= 1``)."""
    out = dict(options)
    if "norm" in options:  # the threat model and its budget, checked here once for every public attack
        out["norm"] = norm = check_norm(options["norm"])
    if options.get("eps") is not None:
        out["eps"] = check_eps(options["eps"], norm=norm)
    lowest = {**COUNTS, **OPTIONAL_COUNTS, **(minimums or {})}
    for name, value in options.items():
        if name in FLAGS or (name in OPTIONAL_FLAGS and value is not None):
            out[name] = _flag(where, name, value)
        elif name in COUNTS or (name in OPTIONAL_COUNTS and value is not None):
            out[name] = _count(where, name, value, lowest[name])
        elif name == "step_size" and value is not None:
            out[name] = _step_size(where, value, norm)
        elif name in UNIT_INTERVAL or name in POSITIVE or (name in OPTIONAL_POSITIVE and value is not None):
            number = _number(where, name, value)
            if number <= 0 or (name in UNIT_INTERVAL and number > 1):
                interval = "(0, 1]" if name in UNIT_INTERVAL else "positive"
                raise ConfigError(f"{where}: {name}={number:g} must be {interval}")
            out[name] = number
    return out


def _flag(where: str, name: str, value: Any) -> bool:
    """A bool; also numpy's bool, a 0-dim bool tensor and the ints 0 and 1 (JSON, argparse), which are unambiguous."""
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        return bool(value)
    if getattr(value, "dtype", None) is not None and str(value.dtype) == "torch.bool" and value.dim() == 0:
        return bool(value)
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    why = " (any non-empty string counts as true in Python)" if isinstance(value, str) else ""
    kind_name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    raise ConfigError(f"{where}: {name}={value!r} must be True or False (got type {kind_name}){why}")


def _number(where: str, name: str, value: Any) -> float:
    try:
        return parse_number(value, name=name)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _count(where: str, name: str, value: Any, minimum: int) -> int:
    try:
        number = parse_whole(value, name=name)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if number < minimum:
        raise ConfigError(f"{where}: {name}={int(number)} must be at least {minimum}")
    return int(number)


def _step_size(where: str, value: Any, norm: Any) -> float:
    number = _number(where, "step_size", value)
    try:
        return check_eps(number, name="step_size", norm="l2" if norm == "l2" else "linf")
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
