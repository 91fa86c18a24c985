"""The record of an evaluation: one JSON-able dict with clean accuracy, each attack's robust accuracy (and what the
attack adds: queries, ADBD, which AutoAttack component broke which points), the per-example worst case over the
attacks, the settings each attack actually ran with, and the provenance (versions, device, seed, time)."""

from __future__ import annotations

import platform
from functools import partial
from typing import Any

import numpy
import torch
from torch import nn

from fastrobust.core.records import code_version
from fastrobust.evaluate.attack_table import jsonable, settings_used, summary
from fastrobust.evaluate.state import EvaluationState


def _versions() -> dict[str, str]:
    return {"fastrobust": code_version(), "torch": torch.__version__, "numpy": numpy.__version__,  # as training's
            "python": platform.python_version()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _clipped(requested: Any, used: Any) -> bool:
    """Whether a requested setting ran with another value (a default left as None does not count), or the run
    needed a setting that was not requested (the official AutoAttack's targets on a model of few classes)."""
    if isinstance(requested, dict):
        added = isinstance(used, dict) and any(key not in requested for key in used)
        return added or any(value is not None and _clipped(value, used.get(key)) for key, value in requested.items())
    return requested != used


def build_record(model: nn.Module, state: EvaluationState, names: list[str], settings: dict[str, dict[str, Any]],
                 skipped: dict[str, str], *, eps: float, norm: str, n: int, n_batches: int, batch_size: int, seed: int,
                 device: torch.device, seconds: float, num_classes: int, dim: int) -> dict[str, Any]:
    """The evaluation record (docs/evaluation.md, "The record") from the per-batch results in ``state``: clean
    accuracy, each attack's robust accuracy and what it adds, and the per-example worst case over the attacks."""
    def per_point(values: dict[str, Any], key: str | None = None) -> list[Any]:
        """Per-batch lists joined in point order (None for the points of a batch that has no ``key``)."""
        out: list[Any] = []
        for b in range(n_batches):
            batch = values[str(b)]
            out.extend(batch if key is None else batch.get(key) or [None] * len(state.clean[str(b)]))
        return out

    clean = per_point(state.clean)
    clean_correct = sum(clean)
    clean_non_finite = sum(per_point(state.clean_non_finite))
    worst = list(clean)
    per_attack: dict[str, Any] = {}
    for name in names:
        if name == "clean":
            per_attack[name] = {"robust_acc": clean_correct / max(n, 1), "robust": clean_correct, "broken": 0,
                                "non_finite": clean_non_finite, "settings": {},
                                "seconds": state.clean_seconds}
            continue
        if name in skipped:
            continue
        batches = state.attacks[name]["batches"]
        robust = per_point(batches, "robust")
        worst = [w and r for w, r in zip(worst, robust)]
        used = settings_used(name, settings[name], num_classes, dim)
        entry: dict[str, Any] = {
            "robust_acc": sum(robust) / max(n, 1),
            "robust": sum(robust),
            "broken": clean_correct - sum(robust),
            "non_finite": sum(per_point(batches, "non_finite")),
            "settings": used,
            "seconds": sum(batches[str(b)]["seconds"] for b in range(n_batches)),
        }
        if _clipped(jsonable(settings[name]), used):
            entry["settings_requested"] = settings[name]
        entry.update(summary(name, settings[name], partial(per_point, batches), clean, n))
        per_attack[name] = entry
    adversarial = [a for a in names if a != "clean" and a not in skipped]
    return {
        "n": n,
        "eps": eps,
        "norm": norm,
        "clean_acc": clean_correct / max(n, 1),
        "clean_correct": clean_correct,
        "clean_non_finite": clean_non_finite,
        "robust_acc": sum(worst) / max(n, 1) if adversarial else None,
        "robust": sum(worst) if adversarial else None,
        "attacks": per_attack,
        "skipped": skipped,
        "batch_size": batch_size,
        "seed": seed,
        "seconds": seconds,
        "model": type(model).__name__,
        "num_classes": num_classes,
        "device": _device_name(device),
        "versions": _versions(),
    }
