"""Any ``nn.Module`` as a fastrobust model: its description in checkpoints and records, and its fingerprint.

A module that fastrobust did not build (``train(config, model=module)``) has no constructor config, so its
checkpoints record ``{"source": "module", "class": ..., "fingerprint": ..., "parameters": ...}``, where the
fingerprint hashes the class name and every state-dict entry's name, shape and dtype. Resuming such a run, or
evaluating its weights, needs the same module again; :func:`mismatch` says what differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch
from torch import nn

from fastrobust.core.contract import last_words, not_logits
from fastrobust.errors import FastRobustError

SOURCE = "module"


def class_name(model: nn.Module) -> str:
    """``package.module.Class`` of a module."""
    kind = type(model)
    return f"{kind.__module__}.{kind.__qualname__}"


def layout(state: dict[str, torch.Tensor]) -> list[list]:
    """``[[name, shape, dtype], ...]`` of a state dict, in its order."""
    return [[name, list(value.shape), str(value.dtype).replace("torch.", "")] for name, value in state.items()]


def fingerprint(model: nn.Module) -> str:
    """16 hex digits over the class name and the names, shapes and dtypes of the state dict (not the values)."""
    payload = json.dumps([class_name(model), layout(model.state_dict())])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def describe(model: nn.Module) -> dict[str, Any]:
    """The JSON-able description saved in checkpoints of a module fastrobust did not build."""
    return {"source": SOURCE, "class": class_name(model), "fingerprint": fingerprint(model),
            "parameters": sum(p.numel() for p in model.parameters())}


def is_module_config(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's model config describes a user module (rather than ``create`` keywords)."""
    return isinstance(config, dict) and config.get("source") == SOURCE


def mismatch(saved: dict[str, Any], state: dict[str, torch.Tensor], model: nn.Module, *, strict_class: bool) -> str | None:
    """Why ``model`` cannot take the weights ``state`` saved from the module ``saved`` describes; None if it can.

    Compares the state-dict entries (names, shapes) and, with ``strict_class``, the class name."""
    given = model.state_dict()
    missing = [name for name in given if name not in state]
    extra = [name for name in state if name not in given]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the module has {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} that the checkpoint lacks")
        if extra:
            parts.append(f"the checkpoint has {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} that the module lacks")
        return "; ".join(parts)
    for name, value in given.items():
        if tuple(value.shape) != tuple(state[name].shape):
            return f"{name} is {list(state[name].shape)} in the checkpoint but {list(value.shape)} in the module"
    if strict_class and saved.get("class") and saved["class"] != class_name(model):
        return f"the checkpoint was trained as {saved['class']}, the module given is {class_name(model)}"
    return None


PROBE_BATCHES = (2, 3)  # two batch sizes: a program exported or traced for one fixed batch fails on the other


def check_pairing(model: nn.Module, *, num_classes: int, image_shape, device, what: str, dataset: str,
                  explain: Callable[[BaseException], str | None] | None = None) -> None:
    """Forwards of blank images in batches of 2 and 3 (in eval mode, no gradient, the mode restored): a model that
    cannot take ``image_shape`` (C, H, W), takes only one batch size, or returns another number of logits is one
    FastRobustError naming both sides. ``explain``: returns the line for a failure it can explain (such as a
    program's cross-device error), None for the others."""

    training = model.training
    try:
        model.eval()
        for batch in PROBE_BATCHES:
            try:
                with torch.no_grad():
                    logits = model(torch.zeros(batch, *image_shape, device=device))
            except Exception as error:  # noqa: BLE001 - any failure of the model on this input
                explained = explain(error) if explain is not None else None
                if explained is not None:
                    raise FastRobustError(explained) from None
                reason = last_words(error)
                if batch != PROBE_BATCHES[0]:
                    raise FastRobustError(
                        f"{what} runs on a batch of {PROBE_BATCHES[0]} but fails on a batch of {batch} "
                        f"({type(error).__name__}: {reason}): it takes one fixed batch size; export it with a dynamic "
                        "batch dimension, dynamic_shapes=({0: torch.export.Dim('batch')},)") from None
                raise FastRobustError(f"{what} fails on {dataset}'s {'x'.join(map(str, image_shape))} images "
                                      f"({type(error).__name__}: {reason})") from None
            problem = not_logits(logits)  # a tuple, dict or .logits object: the wrapper to write
            if problem is not None:
                raise FastRobustError(f"{what}: the model {problem}")
            if not (logits.dim() == 2 and logits.shape[0] == batch):
                shape = list(logits.shape)
                raise FastRobustError(f"{what} returns {shape} for a batch of {batch} images of {dataset}: expected "
                                      f"logits [{batch}, {num_classes}]")
            if logits.shape[1] != num_classes:
                raise FastRobustError(f"{what} returns {logits.shape[1]} logits per image but {dataset} has "
                                      f"{num_classes} classes: build it for that many classes (or use the dataset it "
                                      "was trained for)")
    finally:
        model.train(training)
