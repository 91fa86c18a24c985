"""The model zoo: ``create(name, **kw)`` builds any model, ``available_models()`` lists the names.

Every model takes pixels in [0, 1], normalises them inside ``forward`` as ``(x - mean) / std`` (buffers
``model.mean``/``model.std`` of shape [1, C, 1, 1], identity by default), uses ``activation`` wherever a
ReLU would be, names its first convolution ``conv1`` and its first stage ``layer1`` (``block1`` for
WideResNets), and carries ``model.fastrobust_config``: a JSON-able dict such that
``create(**model.fastrobust_config)`` rebuilds the same architecture (``load_state_dict`` then works).

    >>> model = create("preactresnet18", num_classes=10, activation="silu",
    ...                mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from ..errors import ConfigError
from ..numbers import check_positive_int
from .activations import available_activations, check_activation, make_activation
from . import plugins
from .base import NormalizedModel
from .cnn import SmallCNN, TinyCNN
from .resnet import BasicBlock, Bottleneck, PreActResNet, ResNet
from .plugins import import_plugins, register, unregister
from .wideresnet import WideResNet

__all__ = [
    "NormalizedModel",
    "available_activations",
    "available_models",
    "count_parameters",
    "create",
    "import_plugins",
    "make_activation",
    "model_info",
    "register",
    "unregister",
]


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
    return list(_MODELS) + plugins.registered_names()


def _canonical_name(name: object) -> str:
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in _MODELS or plugins.lookup(key) is not None:
            return key
    raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(available_models())} (a model "
                      "registered by your code needs --import MODULE, or fastrobust.models.register in Python)")


def _channel_list(value, in_channels: int, name: str):
    """Validate mean/std early and turn them into a JSON-able list (or None)."""
    if value is None:
        return None
    from .base import _channel_values

    return _channel_values(value, in_channels, name=name, default=0.0, positive=name == "std")


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
    """Build model ``name``; see :func:`available_models` and docs/models.md.

    ``mean``/``std``: one number or one per channel (None: 0 and 1, identity). ``image_size``: the input
    side the model is built for (>= 64 selects the Tiny ImageNet stem of the residual networks; SmallCNN's
    fully connected layer depends on it). Model-specific keywords: tinycnn ``width`` (16); smallcnn
    ``dropout`` (0.5); wrn28_10/wrn34_10 ``dropout`` (0.0); wideresnet ``depth`` (34), ``widen_factor`` (10),
    ``dropout`` (0.0). Any other keyword raises ConfigError.
    """
    key = _canonical_name(name)
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
    model, config = plugins.build(
        plugins.lookup(key), num_classes=num_classes, in_channels=in_channels, image_size=image_size,
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
    import torch

    rows = []
    for name in available_models():
        registered = plugins.lookup(name) if name not in _MODELS else None
        try:
            with torch.device("meta"):
                model = create(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
            params = count_parameters(model)
        except Exception:  # noqa: BLE001 - a user factory that cannot build on the meta device
            if registered is None:
                raise
            params = None
        description = _MODELS[name].description if registered is None else (
            f"{registered.description or 'registered model'} (from {registered.origin})")
        rows.append({"name": name, "params": params, "description": description})
    return rows
