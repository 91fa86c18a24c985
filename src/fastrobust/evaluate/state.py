"""The resumable state of an evaluation, as one object: what has been computed, per batch, and what it is bound to.

An evaluation with a state file saves the per-point results of every finished batch (atomically, after every batch
or round of batches); a rerun with the same model, data and settings loads them and computes only the batches still
pending. The state is bound to its evaluation by a fingerprint (the data's hash, the number of points, eps, norm,
batch size, seed, and the model's class, architecture and weights): a state file of another evaluation is refused,
never mixed in. The file is JSON::

    {"version": 3, "fingerprint": {...}, "clean": {"0": [true, ...], ...}, "clean_non_finite": {...},
     "clean_seconds": 0.12, "clean_cost": {"0": {"forward": 256, "backward": 0, "process_seconds": 0.2}, ...},
     "attacks": {"pgd20": {"settings": {...}, "batches": {"0": {"robust": [...], "forward": 5376, ...}}}}}

The passes of the model (``core.passes``) and the process seconds are kept per batch, so a resumed evaluation
reports the same cost as one that ran through.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fastrobust.core import distributed as dist_lib
from fastrobust.core.filekind import checkpoint_format, looks_like
from fastrobust.core.files import atomic_write_json
from fastrobust.errors import FastRobustError
from fastrobust.evaluate.attack_table import jsonable

STATE_VERSION = 3  # 2: model in the fingerprint, non-finite flags per point; 3: passes per batch
STATE_FIELDS = ("version", "fingerprint", "clean", "attacks")
_FINGERPRINT_NAMES = {"data_sha256": "data", "n": "number of points", "model_class": "model class",
                      "model_architecture": "model architecture", "model_weights": "model weights"}


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """What identifies a model for a state file: its class, an architecture hash (class, ``fastrobust_config``
    and the module tree as ``repr`` prints it) and a hash of every state_dict tensor (parameters and buffers:
    names, dtypes, shapes and bytes)."""
    cls = type(model)
    config = getattr(model, "fastrobust_config", None)
    architecture = hashlib.sha256(
        f"{cls.__module__}.{cls.__qualname__}\n{json.dumps(config, sort_keys=True, default=str)}\n{model!r}".encode()
    )
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        if isinstance(tensor, Tensor):
            tensor = tensor.detach().cpu().contiguous()
            weights.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            weights.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            weights.update(repr(tensor).encode())
    return {"model_class": f"{cls.__module__}.{cls.__qualname__}", "model_architecture": architecture.hexdigest(),
            "model_weights": weights.hexdigest()}


def evaluation_fingerprint(images: Tensor, labels: Tensor, eps: float, norm: str, batch_size: int, seed: int,
                           model: nn.Module) -> dict[str, Any]:
    """The fingerprint a state file is bound to (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return {"data_sha256": digest.hexdigest(), "n": len(labels), "eps": eps, "norm": norm,
            "batch_size": batch_size, "seed": seed, **model_fingerprint(model)}


def read_state_file(path: str | Path) -> dict[str, Any] | None:
    """The evaluation state saved at ``path`` (None when there is none yet: no file, or an empty one).

    Raises FastRobustError when ``path`` is not an evaluation state file -- a folder, a model, a run's config,
    any other file -- saying so and asking for another path (such a file is never overwritten), or when it is a
    state file of another format version (which may then be deleted)."""
    path = Path(path)
    other = "choose another --state path (a new state file is created there)"
    if path.is_dir():
        raise FastRobustError(f"state file {path} is a folder, not an evaluation state file: {other}, e.g. "
                              f"{path / 'eval-state.json'}")
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        kind = checkpoint_format(path)
        what = f"a model file ({kind})" if kind else (looks_like(path) or "not JSON")
        raise FastRobustError(f"state file {path} is not an evaluation state file (it looks like {what}): {other}") from None
    except OSError as error:
        raise FastRobustError(f"state file {path} cannot be read ({error.strerror or error}): {other}") from None
    if not isinstance(state, dict) or not all(key in state for key in STATE_FIELDS):
        raise FastRobustError(f"state file {path} is not an evaluation state file (a JSON file without the fields "
                              f"{', '.join(STATE_FIELDS)}): {other}")
    if state["version"] != STATE_VERSION:
        raise FastRobustError(f"state file {path} was written by another version of evaluate (state version "
                              f"{state['version']}, this one reads {STATE_VERSION}): delete that state file to start "
                              f"over, or {other}")
    return state


@dataclass
class EvaluationState:
    """Per-batch results of one evaluation. ``clean[b]``/``clean_non_finite[b]``: per-point flags of batch ``b``;
    ``clean_cost[b]``: the clean pass's ``{"forward", "backward", "process_seconds"}`` on batch ``b``;
    ``attacks[name]``: ``{"settings": ..., "batches": {b: {"robust": [...], "non_finite": [...], "seconds": s,
    "forward": f, "backward": g, "process_seconds": p, extras...}}}``. Batch keys are strings (JSON)."""

    fingerprint: dict[str, Any] | None = None
    clean: dict[str, list] = field(default_factory=dict)
    clean_non_finite: dict[str, list] = field(default_factory=dict)
    clean_seconds: float = 0.0
    clean_cost: dict[str, dict[str, Any]] = field(default_factory=dict)
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None  # where save() writes; None: kept in memory only

    @classmethod
    def load(cls, path: Path | None, fingerprint: dict[str, Any]) -> "EvaluationState":
        """The state saved at ``path`` when it belongs to this evaluation, a fresh one when there is none.

        Raises:
            FastRobustError: ``path`` holds another evaluation's state (naming what differs), or is no state file.
        """
        saved = read_state_file(path) if path is not None else None
        if saved is None:
            return cls(fingerprint=fingerprint if path is not None else None, path=path)
        if saved.get("fingerprint") != fingerprint:
            old = saved.get("fingerprint") or {}
            diff = [_FINGERPRINT_NAMES.get(k, k) for k in fingerprint if old.get(k) != fingerprint.get(k)]
            raise FastRobustError(
                f"state file {path} belongs to another evaluation (different {', '.join(diff)}): "
                "use the same model, data and settings to resume, or another --state file"
            )
        return cls(fingerprint=saved["fingerprint"], clean=saved["clean"],
                   clean_non_finite=saved.get("clean_non_finite", {}), clean_seconds=saved.get("clean_seconds", 0.0),
                   clean_cost=saved.get("clean_cost", {}), attacks=saved["attacks"], path=path)

    @classmethod
    def shared(cls, path: Path | None, fingerprint: Callable[[], dict[str, Any]],
               ctx: dist_lib.Context) -> "EvaluationState":
        """``load`` on rank 0 alone (other machines need not see the file), handed to every rank; only rank 0
        keeps the path, so only it writes the file. ``fingerprint`` is computed only where there is a file."""
        loaded: Any = None
        if ctx.is_main:
            try:
                loaded = cls.load(path, fingerprint() if path is not None else {})
            except FastRobustError as error:
                loaded = error
        loaded = dist_lib.broadcast_object(loaded) if ctx.active else loaded
        if isinstance(loaded, FastRobustError):
            raise loaded
        if not ctx.is_main:
            loaded.path = None
        return loaded

    def save(self) -> None:
        """Write the state atomically (a crash leaves the previous state), when it has a path."""
        if self.path is not None:
            atomic_write_json(self.path, {"version": STATE_VERSION, "fingerprint": self.fingerprint,
                                          "clean": self.clean, "clean_non_finite": self.clean_non_finite,
                                          "clean_seconds": self.clean_seconds, "clean_cost": self.clean_cost,
                                          "attacks": self.attacks})

    def pending_clean(self, n_batches: int) -> list[int]:
        """The batches whose clean pass has not run yet."""
        return [b for b in range(n_batches) if str(b) not in self.clean]

    def attack_batches(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """The finished batches of attack ``name`` (a dict to add batches to).

        Raises:
            FastRobustError: the state holds ``name``'s results under other settings.
        """
        stored = self.attacks.setdefault(name, {"settings": jsonable(settings), "batches": {}})
        if stored["settings"] != jsonable(settings):
            raise FastRobustError(
                f"state file {self.path} holds results of {name!r} with other settings ({stored['settings']}): "
                "use the same attack settings to resume, or another state file"
            )
        return stored["batches"]

    def clean_flags(self, n_batches: int) -> list[bool]:
        """Clean correctness of every point, in point order."""
        return [v for b in range(n_batches) for v in self.clean[str(b)]]
