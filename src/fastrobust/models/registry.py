"""One registry of models by name: the zoo, and the models a user registers (``register`` in Python,
``--import MODULE`` on the command line, or a ``fastrobust.models`` entry point of an installed package).

User architectures with a name: ``register(name, factory)``, plugin modules and ``fastrobust.models`` entry points.

A registered name works wherever a zoo name does (``create``, ``TrainConfig.model``, presets, sweeps,
``fastrobust train --model NAME``), once the code that registers it has run: ``--import MODULE`` on the
command line imports a module (which calls ``register``), and installed packages can declare an entry point in
the group ``fastrobust.models`` (``name = "package.module:factory"``), loaded the first time a name is not found.

The factory is called with the keywords it declares among ``num_classes``, ``in_channels``, ``image_size``,
``activation``, ``mean``, ``std`` plus the run's ``model_params``; it returns an ``nn.Module`` that maps pixels in
[0, 1] to logits. A factory without ``mean``/``std`` gets no normalisation (its module sees raw pixels), one
without ``activation`` refuses any activation but ``relu``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points

import torch
from torch import nn

from fastrobust.core.values import check_positive_int
from fastrobust.errors import ConfigError
from fastrobust.models.activations import check_activation, make_activation
from fastrobust.models.base import channel_values
from fastrobust.models.cnn import SmallCNN, TinyCNN
from fastrobust.models.resnet import BasicBlock, Bottleneck, PreActResNet, ResNet
from fastrobust.models.wideresnet import WideResNet

ENTRY_POINT_GROUP = "fastrobust.models"
COMMON = ("num_classes", "in_channels", "image_size", "activation", "mean", "std")
RESERVED = ("module",)  # TrainConfig.model of a run that trained a module passed as train(model=...)


def declared_keywords(factory: Callable[..., object]) -> tuple[set[str], bool] | None:
    """(the keyword names ``factory`` declares, whether it takes **kwargs); None when its signature cannot be
    read (builtins, some C callables)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


@dataclass(frozen=True)
class Registered:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    origin: str  # "module:function" of the factory, for records and hints

    def accepts(self) -> tuple[set[str], bool]:
        """(keyword names the factory declares, whether it takes **kwargs); unknown signatures take all."""
        return declared_keywords(self.factory) or (set(), True)


_REGISTERED: dict[str, Registered] = {}
_entry_points_loaded = False


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(name: str, factory: Callable[..., nn.Module], *, description: str = "", replace: bool = False) -> None:
    """Give ``factory`` (a callable returning an ``nn.Module``) the model name ``name``; see the module docstring.

    Raises ConfigError when ``name`` is a zoo model or already registered (unless ``replace``), or when
    ``factory`` is not callable."""
    if not isinstance(name, str) or not name.strip() or not name.replace("-", "_").replace(".", "_").isidentifier():
        raise ConfigError(f"model name {name!r} must be a word such as 'mynet' (letters, digits, _ and -)")
    key = _key(name)
    if key in _MODELS or key in _ALIASES or key in RESERVED:
        raise ConfigError(f"model name {name!r} is taken by fastrobust's zoo: choose another name")
    if not callable(factory):
        raise ConfigError(f"register({name!r}, ...): the factory {factory!r} is not callable")
    if key in _REGISTERED and not replace and not _same_code(_REGISTERED[key].factory, factory):
        raise ConfigError(f"model name {name!r} is already registered by {_REGISTERED[key].origin}: "
                          "choose another name or pass replace=True")
    origin = f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__name__)}"
    _REGISTERED[key] = Registered(key, factory, description or own_summary(factory), origin)


def own_summary(factory: Callable[..., object]) -> str:
    """The first line of ``factory``'s own docstring, or "" when it has none.

    A class's docstring is read from the class itself, never inherited: ``inspect.getdoc`` of an ``nn.Module``
    subclass without one is torch's "Base class for all neural network modules.". Another callable object
    (``functools.partial``, an instance with ``__call__``) has only its type's docstring, so none of its own.
    """
    if isinstance(factory, type):
        doc = factory.__dict__.get("__doc__")
    elif inspect.isfunction(factory) or inspect.ismethod(factory):
        doc = factory.__doc__
    else:
        doc = None
    return inspect.cleandoc(doc).split("\n")[0] if isinstance(doc, str) and doc.strip() else ""


def _same_code(old: Callable, new: Callable) -> bool:
    """The same factory, or the same function defined again (a module imported twice, a notebook cell re-run)."""
    if old is new:
        return True
    code_old, code_new = getattr(old, "__code__", None), getattr(new, "__code__", None)
    return (code_old is not None and code_new is not None and old.__qualname__ == new.__qualname__
            and code_old.co_filename == code_new.co_filename)


def unregister(name: str) -> None:
    """Forget a registered name (tests, notebooks)."""
    _REGISTERED.pop(_key(name), None)


def lookup(name: str) -> Registered | None:
    """The registration of ``name``, loading the ``fastrobust.models`` entry points when it is not known yet."""
    key = _key(name)
    if key not in _REGISTERED:
        load_entry_points()
    return _REGISTERED.get(key)


def registered_names() -> list[str]:
    load_entry_points()
    return sorted(_REGISTERED)


def load_entry_points() -> None:
    """Register every installed ``fastrobust.models`` entry point (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if _key(point.name) in _REGISTERED:
            continue
        try:
            factory = point.load()
        except Exception as error:  # noqa: BLE001 - a broken plugin must not break the zoo; say which one
            raise ConfigError(f"entry point {point.name} = {point.value} (group {ENTRY_POINT_GROUP}) cannot be "
                              f"loaded: {type(error).__name__}: {error}") from None
        register(point.name, factory, replace=True)


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import each module (``--import MODULE``), from the current folder or the installed packages; importing
    runs that module's code, which normally calls :func:`register`."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"--import {name}: cannot import it ({error}); give a module name importable from "
                              "the current folder or the installed packages (my_models, not my_models.py)") from None


def build_registered(registered: Registered, *, num_classes: int, in_channels: int, image_size: int, activation: str,
          mean, std, options: dict) -> tuple[nn.Module, dict]:
    """Call the factory with the keywords it declares; returns (module, the config ``create`` rebuilds it from)."""
    names, var_keyword = registered.accepts()
    common = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
              "activation": activation, "mean": mean, "std": std}
    unknown = sorted(set(options) - names) if not var_keyword else []
    if unknown:
        raise ConfigError(f"model {registered.name!r} ({registered.origin}) takes no keyword(s) {', '.join(unknown)}: "
                          f"it accepts {', '.join(sorted(names - set(COMMON))) or 'no model-specific options'}")
    if activation != "relu" and "activation" not in names and not var_keyword:
        raise ConfigError(f"model {registered.name!r} ({registered.origin}) takes no activation= argument: "
                          f"activation={activation!r} cannot apply; build the activation into the factory")
    kwargs = {key: value for key, value in common.items() if key in names or var_keyword}
    kwargs.update(options)
    try:
        module = registered.factory(**kwargs)
    except ConfigError:
        raise
    except TypeError as error:
        raise ConfigError(f"model {registered.name!r}: {registered.origin}(**{sorted(kwargs)}) failed: {error}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model {registered.name!r}: {registered.origin} returned a {type(module).__name__}, "
                          "not an nn.Module")
    config = {"name": registered.name, "num_classes": num_classes, "in_channels": in_channels,
              "activation": activation, "image_size": image_size,
              "mean": mean if "mean" in kwargs else None, "std": std if "std" in kwargs else None, **options}
    return module, config


def _check_dropout(value, *, name: str = "dropout") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1)")
    if not 0 <= value < 1:
        raise ConfigError(f"{name}={value!r} is out of range [0, 1)")
    return float(value)


def _check_int(value, *, name: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{name}={value!r} is not a whole number")
    return check_positive_int(value, name=name)


def _check_depth(value) -> int:
    depth = _check_int(value, name="depth")
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"wideresnet depth={depth} must be 6n+4 with n >= 1 (e.g. 16, 22, 28, 34, 40)")
    return depth


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]
    description: str
    options: dict[str, tuple[object, Callable]] = field(default_factory=dict)  # name -> (default, checker)


def _tinycnn(*, width, **common):
    return TinyCNN(width=width, **{k: v for k, v in common.items() if k != "image_size"})


def _smallcnn(*, dropout, **common):
    return SmallCNN(dropout=dropout, **common)


def _resnet(block, num_blocks, **common):
    return ResNet(block, num_blocks, **common)


def _preactresnet18(**common):
    return PreActResNet((2, 2, 2, 2), **common)


def _wideresnet(*, depth, widen_factor, dropout, **common):
    return WideResNet(depth=depth, widen_factor=widen_factor, dropout=dropout, **common)


def _wrn(depth, widen_factor, *, dropout, **common):
    return WideResNet(depth=depth, widen_factor=widen_factor, dropout=dropout, **common)


_DROPOUT0 = {"dropout": (0.0, _check_dropout)}
_MODELS: dict[str, _Spec] = {
    "tinycnn": _Spec(_tinycnn, "4 conv-BN layers (width w,2w,4w,4w), global pooling; for CPU tests",
                     {"width": (16, partial(_check_int, name="width"))}),
    "smallcnn": _Spec(_smallcnn, "TRADES MNIST SmallCNN: conv32-conv32-pool-conv64-conv64-pool-fc200-fc200",
                      {"dropout": (0.5, _check_dropout)}),
    "preactresnet18": _Spec(_preactresnet18, "pre-activation ResNet-18 (He et al. 2016b)"),
    "resnet18": _Spec(partial(_resnet, BasicBlock, (2, 2, 2, 2)), "ResNet-18, CIFAR stem"),
    "resnet34": _Spec(partial(_resnet, BasicBlock, (3, 4, 6, 3)), "ResNet-34, CIFAR stem"),
    "resnet50": _Spec(partial(_resnet, Bottleneck, (3, 4, 6, 3)), "ResNet-50 (Bottleneck), CIFAR stem"),
    "wrn28_10": _Spec(partial(_wrn, 28, 10), "WideResNet-28-10 (TRADES/MART variant)", _DROPOUT0),
    "wrn34_10": _Spec(partial(_wrn, 34, 10), "WideResNet-34-10 (TRADES/MART variant)", _DROPOUT0),
    "wideresnet": _Spec(_wideresnet, "WideResNet-depth-widen_factor (default 34-10)", {
        "depth": (34, _check_depth),
        "widen_factor": (10, partial(_check_int, name="widen_factor")),
        **_DROPOUT0,
    }),
}
_ALIASES = {
    "preact_resnet18": "preactresnet18", "preactresnet_18": "preactresnet18",
    "resnet_18": "resnet18", "resnet_34": "resnet34", "resnet_50": "resnet50",
    "wrn_28_10": "wrn28_10", "wrn_34_10": "wrn34_10", "wide_resnet": "wideresnet", "wrn": "wideresnet",
    "small_cnn": "smallcnn", "tiny_cnn": "tinycnn",
}


def available_models() -> list[str]:
    """The names :func:`create` accepts: the zoo, then the registered ones (:func:`register`)."""
    return list(_MODELS) + registered_names()


def canonical_name(name: object) -> str:
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in _MODELS or lookup(key) is not None:
            return key
    raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(available_models())} (a model "
                      "registered by your code needs --import MODULE, or fastrobust.models.register in Python)")


def _channel_list(value, in_channels: int, name: str):
    """Validate mean/std early and turn them into a JSON-able list (or None)."""
    if value is None:
        return None
    return channel_values(value, in_channels, name=name, default=0.0, positive=name == "std")


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    activation: str = "relu",
    mean=None,
    std=None,
    image_size: int = 32,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` (a zoo model or a registered one; see :func:`available_models`, docs/models.md).

    Every model takes pixels in [0, 1] and normalises them itself, so every attack budget is in pixel units
    (the normalisation-outside-the-model trap of the field's issue trackers cannot happen); ``activation``
    replaces every ReLU (smooth activations are SAT, Xie et al. 2020).

    Args:
        name: ``tinycnn``, ``smallcnn`` (TRADES' MNIST network), ``preactresnet18``, ``resnet18``, ``resnet34``,
            ``resnet50``, ``wrn28_10``, ``wrn34_10``, ``wideresnet`` or a registered name (case and ``-``/``_``
            ignored).
        num_classes: outputs (default 10).
        in_channels: image channels (default 3).
        activation: ``relu`` (default), ``silu``, ``gelu``, ``elu``, ``softplus``, ``smoothrelu``, ``mish`` or
            ``relu_silu_grad``.
        mean, std: the input normalisation, one number or one per channel (default None: 0 and 1, identity).
        image_size: the input side the model is built for (default 32; >= 64 selects the Tiny ImageNet stem of
            the residual networks; SmallCNN's fully connected layer depends on it).
        **kwargs: model-specific: tinycnn ``width`` (16); smallcnn ``dropout`` (0.5); wrn28_10/wrn34_10
            ``dropout`` (0.0); wideresnet ``depth`` (34), ``widen_factor`` (10), ``dropout`` (0.0).

    Returns:
        The model (train mode), with ``model.fastrobust_config``: a JSON-able dict that ``create(**config)``
        rebuilds it from.

    Raises:
        ConfigError: an unknown name or keyword, or a bad value, in one line naming the choices.

    Example:
        >>> model = create("preactresnet18", num_classes=10, activation="silu",
        ...                mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
    """
    key = canonical_name(name)
    if key not in _MODELS:
        return _create_registered(key, num_classes=num_classes, in_channels=in_channels, activation=activation,
                                  mean=mean, std=std, image_size=image_size, options=kwargs)
    spec = _MODELS[key]
    unknown = sorted(set(kwargs) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) if spec.options else "no model-specific options"
        raise ConfigError(
            f"model {key!r} got unknown keyword(s) {', '.join(unknown)}: it accepts {accepted} "
            "(besides num_classes, in_channels, activation, mean, std, image_size)"
        )
    options = {opt: checker(kwargs.get(opt, default)) for opt, (default, checker) in spec.options.items()}
    num_classes = _check_int(num_classes, name="num_classes")
    in_channels = _check_int(in_channels, name="in_channels")
    image_size = _check_int(image_size, name="image_size")
    activation = check_activation(activation)
    mean = _channel_list(mean, in_channels, "mean")
    std = _channel_list(std, in_channels, "std")

    model = spec.build(
        num_classes=num_classes, in_channels=in_channels, act=partial(make_activation, activation),
        image_size=image_size, mean=mean, std=std, **options,
    )
    model.fastrobust_config = {
        "name": key, "num_classes": num_classes, "in_channels": in_channels, "activation": activation,
        "mean": mean, "std": std, "image_size": image_size, **options,
    }
    return model


def _create_registered(key: str, *, num_classes, in_channels, activation, mean, std, image_size, options) -> nn.Module:
    num_classes = _check_int(num_classes, name="num_classes")
    in_channels = _check_int(in_channels, name="in_channels")
    image_size = _check_int(image_size, name="image_size")
    activation = check_activation(activation)
    model, config = build_registered(
        lookup(key), num_classes=num_classes, in_channels=in_channels, image_size=image_size,
        activation=activation, mean=_channel_list(mean, in_channels, "mean"), std=_channel_list(std, in_channels, "std"),
        options=dict(options),
    )
    model.fastrobust_config = config
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_info(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> list[dict]:
    """``[{"name", "params", "description"}]`` for every model, counted on the meta device (no memory)."""
    rows = []
    for name in available_models():
        registered = lookup(name) if name not in _MODELS else None
        try:
            with torch.device("meta"):
                model = create(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
            params = count_parameters(model)
        except Exception:  # noqa: BLE001 - a user factory that cannot build on the meta device
            if registered is None:
                raise
            params = None
        description = _MODELS[name].description if registered is None else (
            f"{registered.description or '(no description)'} (from {registered.origin})")
        rows.append({"name": name, "params": params, "description": description})
    return rows
