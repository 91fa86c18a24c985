"""Presets: YAML files of TrainConfig settings, parsed strictly (yaml.safe_load, no code evaluated).

A value such as ``eps: 8/255`` is a string in YAML; it is turned into a number by the field's type
with the same strict grammar as the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from fastrobust.core.values import parse_flag, parse_number, parse_whole
from fastrobust.errors import ConfigError
from fastrobust.train.config import TrainConfig
from fastrobust.train.expected import Expected

PRESET_DIR = Path(__file__).resolve().parent / "preset_files"
ALIASES = {"speedrun": "cifar10-preactresnet18-speedrun", "speedrun-cpu": "cifar10-tinycnn-speedrun-cpu"}


def available_presets() -> list[str]:
    return sorted([path.stem for path in PRESET_DIR.glob("*.yaml")] + list(ALIASES))


def preset_descriptions() -> dict[str, str]:
    """Every shipped preset (and alias) with its ``description:`` (one line; aliases name their preset)."""
    described = {}
    for name in available_presets():
        if name in ALIASES:
            described[name] = f"alias of {ALIASES[name]}"
            continue
        try:
            text = (yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {}).get("description", "")
        except (yaml.YAMLError, ValueError, TypeError, AttributeError):
            text = ""
        described[name] = " ".join(str(text or "").split())
    return described


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name (shipped with fastrobust) or by path to a YAML file: its settings (without its
    ``description`` and ``expected`` result)."""
    _, data = _read_preset(name_or_path)
    data.pop("description", None)
    data.pop("expected", None)
    return data


def preset_expected(name_or_path: str) -> Expected | None:
    """The result a preset declares under ``expected:`` (measured by fastrobust, see docs/results.md), or None."""
    path, data = _read_preset(name_or_path)
    return Expected.parse(data["expected"], str(path)) if "expected" in data else None


def _read_preset(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{ALIASES.get(name_or_path, name_or_path)}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name_or_path, available_presets(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name_or_path!r}{hint}: give a YAML file or a shipped preset's name "
                          "(fastrobust train --list-presets lists them)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as error:  # bad dates/tags raise ValueError
        reason = " ".join(str(error).split())
        raise ConfigError(f"preset {path} is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping of settings, got {type(data).__name__}")
    return path, data


_HINTS = typing.get_type_hints(TrainConfig)


def _convert(name: str, value: Any) -> Any:
    hint = _HINTS[name]
    args = set(typing.get_args(hint)) or {hint}
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if type(None) in args:
            return None
        raise ConfigError(f"{name} cannot be empty")
    if dict in args or typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of key: value")
        return dict(value)
    if bool in args:
        return parse_flag(value, name=name)
    if int in args:
        return parse_whole(value, name=name)
    if float in args:
        return parse_number(value, name=name)
    return str(value)


def make_config(settings: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a mapping (a preset merged with overrides), with typed values."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(settings) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(map(str, unknown)))}: known settings are {', '.join(sorted(known))}")
    return TrainConfig(**{name: _convert(name, value) for name, value in settings.items()})


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``--set key=value``: top-level settings, or ``method.NAME=value`` / ``model.NAME=value`` /
    ``schedule.NAME=value`` (``--set schedule.peak=0.5``, ``--set schedule.milestones=0.4,0.7,0.9``)."""
    settings: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set method.beta=6)")
        key, value = (part.strip() for part in item.split("=", 1))
        if key.startswith("method."):
            settings.setdefault("method_params", {})[key[len("method."):]] = value
        elif key.startswith("schedule."):
            settings.setdefault("schedule_params", {})[key[len("schedule."):]] = _yaml_scalar(value)
        elif key.startswith("model."):
            settings.setdefault("model_params", {})[key[len("model."):]] = _yaml_scalar(value)
        else:
            settings[key.replace("-", "_")] = value
    return settings


def _yaml_scalar(text: str) -> Any:
    """A model keyword from the command line: numbers and booleans typed, everything else a string."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):  # e.g. 2001-13-01 raises ValueError
        return text
    return value if isinstance(value, (int, float, bool, str)) else text
