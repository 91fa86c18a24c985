"""The method interface: a training method is a loss ``(model, x, y) -> (loss, stats)``.

A method is built from a frozen dataclass of hyper-parameters and declares its cost as the
number of forward+backward passes and forward-only passes it makes per training step, so the
cost in "natural steps" (a forward alone counts 1/3) can be compared with measured time.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from fastrobust.attacks import model_mode
from fastrobust.core.contract import (
    check_batch,
    check_first_logits,
    check_gradients_allowed,
    images_for,
    validated,
)
from fastrobust.core.precision import attack_autocast
from fastrobust.core.values import check_eps, parse_flag, parse_number, parse_whole
from fastrobust.errors import ConfigError

Stats = dict[str, Tensor]


@dataclass(frozen=True)
class Cost:
    """Passes per training step, in units of one batch: a forward alone is a third of a full pass."""

    forward_backward: int
    forward_only: int = 0

    @property
    def passes(self) -> float:
        return self.forward_backward + self.forward_only / 3


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyper-parameters; validates perturbation sizes on construction."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "eps" or field.name.endswith("_eps") or field.name.endswith("step_size"):
                check_eps(value, name=field.name)
            elif field.name in ("steps", "attack_steps") or field.name.endswith("_steps"):
                if not isinstance(value, int) or value < 0:
                    raise ConfigError(f"{field.name}={value!r} must be a whole number >= 0")


def _checks_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a method's ``__call__``/``train_step(model, x, y, ...)`` with the input contract (``core.contract``).

    Metadata (dtypes, shapes, devices) is checked on every call, and the images are handed to the method in the
    model's floating dtype (``images_for``: float64 images from a numpy pipeline train a float32 model, as
    ``evaluate`` runs them). Values -- images finite and in [0, 1], labels in [0, C), C read from the model's first
    output -- only on the method's first call: they cost a host sync, and a trainer calls the method every step
    with batches its DeviceLoader already guarantees. The model's first output on the first call must be logits
    ``[B, C]`` (``check_first_logits``: a tuple, dict or ``.logits`` output is one line naming the wrapper to
    write). The body runs inside ``validated()``, so the attacks it calls add no sync of their own.
    """

    @functools.wraps(fn)
    def call(self: Method, model: nn.Module, x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Any:
        where = f"method {self.name}"
        check_gradients_allowed(where)
        first = not getattr(self, "_inputs_checked", False)
        if first:
            x, y, label_max = check_batch(x, y, where=where, model=model)
        else:
            with validated():
                x, y, label_max = check_batch(x, y, where=where, model=model)
        x = images_for(model, x)
        handle = None
        if first:
            seen = False

            def compare(_module: nn.Module, inputs: Any, output: Any) -> None:
                nonlocal seen
                if not seen:
                    seen = True
                    check_first_logits(output, inputs[0], label_max, where=where)

            handle = model.register_forward_hook(compare)
        try:
            with validated():
                result = fn(self, model, x, y, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        self._inputs_checked = True
        return result

    call._checks_inputs = True  # type: ignore[attr-defined]
    return call


class Method:
    """Base class: subclasses set ``name``, ``Config`` and implement ``__call__`` and ``cost``.

    Every subclass's ``__call__`` (and ``train_step``) is wrapped with the input contract: images float in
    [0, 1], labels of any integer dtype in [0, C) (values checked on the first call only; see
    ``_checks_inputs``); a violation is a ConfigError.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    description: ClassVar[str] = ""
    # Set by a trainer running several ranks: averages, in place, gradients of parameters the method owns (such
    # as SPROUT's u) over the global batch with the weights' averaging, so that every rank takes the same step.
    gradient_reduce: Callable[[list[Tensor]], None] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attribute in ("__call__", "train_step"):
            fn = cls.__dict__.get(attribute)
            if fn is not None and not getattr(fn, "_checks_inputs", False):
                setattr(cls, attribute, _checks_inputs(fn))

    def __init__(self, config: MethodConfig | None = None, /, **overrides: Any) -> None:
        config = config if config is not None else self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        unknown = set(overrides) - {f.name for f in fields(self.Config)}
        if unknown:
            known = ", ".join(f.name for f in fields(self.Config))
            raise ConfigError(f"{self.name} has no parameter {', '.join(sorted(unknown))}: its parameters are {known}")
        self.config = replace(config, **overrides) if overrides else config

    @property
    def cost(self) -> Cost:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Stats]:
        raise NotImplementedError

    # Optional hooks a trainer may use; the defaults make a method a plain loss.
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors the method learns itself (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ConfigError(f"{self.name} keeps no state, but the checkpoint holds {sorted(state)}")

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        """Called before each epoch; returns what the method wants recorded for it."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    key = name.replace("-", "_").lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}: known methods are {', '.join(available_methods())}")
    return _REGISTRY[key]


def _convert(field: dataclasses.Field, value: Any, method: str) -> Any:
    """Turn a CLI/YAML value into the type of the field's default (strictly, never evaluating code)."""
    default = field.default
    name = f"{method}.{field.name}"
    if isinstance(value, str):
        text = value.strip()
        if isinstance(default, bool):
            return parse_flag(text, name=name)
        if isinstance(default, int):
            return parse_whole(text, name=name)
        if isinstance(default, float):
            return parse_number(text, name=name)
        return text
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a boolean: use true or false")
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value == int(value):
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a whole number")
    return value


def create(name: str, /, **params: Any) -> Method:
    """Build training method ``name`` with its published settings, overridden by ``params``.

    A method is a loss a user drops into their own training loop, as TRADES' ``trades_loss`` is: ``loss, stats =
    method(model, x, y)``. The defaults of each method are its paper's (docs/training.md cites each).

    Args:
        name: ``natural``, ``pgd_at``, ``trades``, ``fast_at``, ``fast_at_2step``, ``fast_trades``,
            ``fast_at_plus``, ``backward_smoothing``, ``backward_smoothing_at``, ``sprout``, ``slat``
            (``available_methods()``).
        **params: the method's parameters (``describe(name)`` lists them with their defaults and units; every
            eps and step size in [0, 1] pixel units). Text such as ``"8/255"`` is parsed by the field's type.

    Returns:
        The method: callable as ``method(model, x, y) -> (loss, stats)``, with ``method.cost`` its declared
        forward+backward passes per training step.

    Raises:
        ConfigError: an unknown method or parameter, or a bad value, in one line.

    Example:
        >>> method = create("backward_smoothing", eps=8 / 255, step_size=8 / 255, beta=10)
        >>> loss, stats = method(model, x, y)
    """
    cls = method_class(name)
    by_name = {field.name: field for field in fields(cls.Config)}
    unknown = set(params) - set(by_name)
    if unknown:
        raise ConfigError(
            f"{cls.name} has no parameter {', '.join(sorted(unknown))}: its parameters are {', '.join(by_name)}"
        )
    converted = {key: _convert(by_name[key], value, cls.name) for key, value in params.items()}
    return cls(cls.Config(**converted))


def describe(name: str) -> dict[str, Any]:
    """Name, description, declared cost and parameters with defaults: what `fastrobust methods` prints."""
    cls = method_class(name)
    method = cls()
    hints = typing.get_type_hints(cls.Config)
    return {
        "name": cls.name,
        "description": cls.description,
        "cost_passes": round(method.cost.passes, 3),
        "cost": {"forward_backward": method.cost.forward_backward, "forward_only": method.cost.forward_only},
        "parameters": {
            f.name: {"default": f.default, "type": getattr(hints[f.name], "__name__", str(hints[f.name]))}
            for f in fields(cls.Config)
        },
    }


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == y).float().mean()


def clean_logits_eval(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of the clean batch with the model in eval mode and no graph (the attacks' reference)."""

    with model_mode(model, training=False), torch.no_grad(), attack_autocast():
        return model(x).detach()
