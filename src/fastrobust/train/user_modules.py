"""The trainer with a module the user built: ``train(config, model=module)`` / ``Trainer(config, model=module)``.

The module is trained as it is (it sees pixels in [0, 1], as every fastrobust model); ``config.model`` reads
``"module"`` and ``model_params``/``activation`` must stay unset (they configure registry models). Checkpoints
store the module's description (class and fingerprint, see ``fastrobust.models.custom``); resuming needs the
same module again and names what differs otherwise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrobust.core import distributed as dist_lib
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.models import custom, registry
from fastrobust.models.checkpoint import read_model_file, unwrap

MODULE = "module"  # TrainConfig.model of such a run


def adopt_config(config, model: nn.Module | None, *, resume: bool) -> None:
    """Make ``config`` describe a run of ``model`` (or refuse a config that needs a module and got none)."""
    if model is None:
        if config.model == MODULE:
            trained = _saved_class(config.out)
            raise FastRobustError(
                f"{config.out or 'this run'} trained a module passed as train(config, model=...)"
                f"{f' (class {trained})' if trained else ''}: pass the same module again, "
                "fastrobust.train.resume(RUN, model=...) in Python; the command line cannot rebuild it")
        return
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={type(model).__name__} is not an nn.Module")
    if resume and config.model != MODULE:
        raise FastRobustError(f"{config.out} trained the registry model {config.model!r}: resume it without model=")
    if config.model_params:
        raise ConfigError(f"model_params={config.model_params} configure registry models; with model= build your "
                          "module with those settings yourself")
    if config.activation != "relu":
        raise ConfigError(f"activation={config.activation!r} configures registry models; with model= build your "
                          "module with that activation yourself")
    config.model = MODULE


def checked(model: nn.Module, data) -> nn.Module:
    """``model`` after one blank forward shows that it takes the dataset's images and returns its classes."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    custom.check_pairing(model, num_classes=data.num_classes, image_shape=data.image_shape, device=device,
                         what=f"model={custom.class_name(model)}", dataset=data.name)
    return model


def source(model: nn.Module, name: str, *, given: bool) -> dict[str, Any]:
    """What built the model, for checkpoints and result.json: the user (``given``: passed as model=), a
    registered factory, or the zoo."""
    if given:
        return custom.describe(model)
    registered = registry.lookup(name)
    if registered is not None:
        return {"source": "registered", "name": registered.name, "factory": registered.origin}
    return {"source": "registry", "name": name}


def check_resume(run: Path, snapshot, model: nn.Module, current: dict[str, Any]) -> None:
    """Refuse to resume a run of one module with another (names the class, fingerprint and first difference)."""

    if current.get("source") != MODULE:
        return
    saved = snapshot.info.get("model_source") or {}
    if saved.get("source") != MODULE:
        raise FastRobustError(f"{run} was not trained with a module passed as model=: resume it without model=")
    problem = custom.mismatch(saved, snapshot.model, unwrap(model), strict_class=True)
    if problem:
        raise FastRobustError(f"{run} was trained with {saved.get('class')} (fingerprint {saved.get('fingerprint')}), "
                              f"the module given is {current['class']} (fingerprint {current['fingerprint']}): "
                              f"{problem}; pass a module built as when the run started")


def best_copy(model: nn.Module, best_file: Path, dist, device: torch.device) -> nn.Module:
    """A copy of the user's module holding the weights of ``best_file`` (read on rank 0), in eval mode."""

    state, _, _ = dist_lib.on_main(lambda: read_model_file(best_file), dist)
    best = copy.deepcopy(unwrap(model))
    best.load_state_dict(state)
    return best.to(device).eval()


def _saved_class(out: str | None) -> str | None:
    """The module class recorded by the newest checkpoint of a run, if any (only for the error message)."""
    if not out:
        return None
    for state in sorted(Path(out).glob("checkpoints/step-*/state.json"), reverse=True):
        try:
            return (json.loads(state.read_text()).get("model_source") or {}).get("class")
        except (OSError, ValueError):
            continue
    return None
