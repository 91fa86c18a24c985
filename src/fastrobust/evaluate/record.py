"""The record of an evaluation: one JSON-able dict with clean accuracy, each attack's robust accuracy (and what the
attack adds: queries, ADBD, which AutoAttack component broke which points), the per-example worst case over the
attacks, the settings each attack actually ran with, the provenance (versions, device, seed, time) and the cost:
passes of the model per attack and in total (counted at the model's call, ``core.passes``), wall and process
seconds, device and precision."""

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


def cost_entry(passes: dict[str, int], points: int, seconds: float, process_seconds: float) -> dict[str, Any]:
    """The cost of one attack: ``forward``/``backward`` rows through the model, the same per point attacked
    (``points``: the clean-correct points, all points for the clean pass; None when there are none), wall and
    process seconds."""
    forward, backward = passes["forward"], passes["backward"]
    return {"forward": forward, "backward": backward,
            "forward_per_point": forward / points if points else None,
            "backward_per_point": backward / points if points else None,
            "seconds": seconds, "process_seconds": process_seconds}


def add_cost(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Add an attack's passes and seconds to the record's total ``cost``."""
    for key in ("forward", "backward", "seconds", "process_seconds"):
        total[key] += part[key]


def _batch_cost(batches: dict[str, dict[str, Any]], n_batches: int) -> tuple[dict[str, int], float]:
    """Passes and process seconds summed over the batches of one attack (or of the clean pass)."""
    parts = [batches[str(b)] for b in range(n_batches)]
    passes = {key: sum(part[key] for part in parts) for key in ("forward", "backward")}
    return passes, sum(part["process_seconds"] for part in parts)


def build_record(model: nn.Module, state: EvaluationState, names: list[str], settings: dict[str, dict[str, Any]],
                 skipped: dict[str, str], *, eps: float, norm: str, n: int, n_batches: int, batch_size: int, seed: int,
                 device: torch.device, seconds: float, num_classes: int, dim: int,
                 prechecks: dict[str, int] | None = None, precision: str = "float32",
                 conditions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation record (docs/evaluation.md, "The record") from the per-batch results in ``state``: clean
    accuracy, each attack's robust accuracy and what it adds, the per-example worst case over the attacks, and the
    cost (per attack ``cost``; in total ``cost``: the passes of the clean pass (``clean``), the attacks and the
    pre-checks (``prechecks``), the per-batch seconds summed, the device and the model's ``precision``)."""
    def per_point(values: dict[str, Any], key: str | None = None) -> list[Any]:
        """Per-batch lists joined in point order (None for the points of a batch that has no ``key``)."""
        out: list[Any] = []
        for b in range(n_batches):
            batch = values[str(b)]
            out.extend(batch if key is None else batch.get(key) or [None] * len(state.clean[str(b)]))
        return out

    clean = per_point(state.clean)
    clean_correct = sum(clean)
    prechecks = prechecks or {"forward": 0, "backward": 0}
    clean_passes, clean_process_seconds = _batch_cost(state.clean_cost, n_batches)
    clean_cost = cost_entry(clean_passes, n, state.clean_seconds, clean_process_seconds)
    total = {**prechecks, "seconds": 0.0, "process_seconds": 0.0, "prechecks": dict(prechecks),
             "clean": dict(clean_passes), "device": _device_name(device), "precision": precision}
    add_cost(total, clean_cost)
    clean_non_finite = sum(per_point(state.clean_non_finite))
    worst = list(clean)
    per_attack: dict[str, Any] = {}
    for name in names:
        if name == "clean":
            per_attack[name] = {"robust_acc": clean_correct / max(n, 1), "robust": clean_correct, "broken": 0,
                                "non_finite": clean_non_finite, "settings": {},
                                "seconds": state.clean_seconds, "cost": clean_cost}
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
        passes, process_seconds = _batch_cost(batches, n_batches)
        entry["cost"] = cost_entry(passes, clean_correct, entry["seconds"], process_seconds)
        add_cost(total, entry["cost"])
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
        "cost": total,
        "versions": _versions(),
        **(conditions or {}),
    }
