"""User architectures with a name: ``register(name, factory)``, plugin modules and ``fastrobust.models`` entry points.

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
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError

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
    from . import _MODELS, _ALIASES

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
    _REGISTERED[key] = Registered(key, factory, description or (inspect.getdoc(factory) or "").split("\n")[0], origin)


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
    from importlib.metadata import entry_points

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


def build(registered: Registered, *, num_classes: int, in_channels: int, image_size: int, activation: str,
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
