"""Resumable training state: weights, optimiser, RNG and method state, written so a crash loses nothing.

Each checkpoint is a folder ``RUN/checkpoints/step-NNNNNNNN`` holding ``model.safetensors``,
``train_state.safetensors`` and, written last, ``state.json`` with the sha256 of both. A folder
without a verifiable ``state.json`` is ignored, and resume falls back to the newest good one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fastrobust.core.filekind import looks_like
from fastrobust.core.files import atomic_write_bytes, atomic_write_json, sha256_file
from fastrobust.errors import FastRobustError
from fastrobust.models.checkpoint import model_config, tensors_to_bytes, unwrap

KEEP = 2


@dataclass
class Snapshot:
    """What a checkpoint restores: positions, weights, optimiser, RNG, method tensors and the averaged
    model's state (``fastrobust.train.averaging``; empty without weight averaging)."""

    info: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    method: dict[str, torch.Tensor]
    path: Path | None = None
    averaged: dict[str, torch.Tensor] = field(default_factory=dict)


def data_fingerprint(data: Any) -> str:
    """A short hash of a dataset's content (a ``fastrobust.data.Dataset``): name, classes, image shape, every
    label of every split and 256 evenly spaced images of each. Stored in checkpoints, so that a run resumed
    with data from another place (``--data-root``) is refused when the data is not the same; the place itself
    is not part of it."""
    digest = hashlib.sha256(json.dumps([data.name, int(data.num_classes), list(data.image_shape)]).encode())
    for split in (data.train, data.val, data.test):
        count = len(split.labels)
        digest.update(f"|{count}|".encode())
        digest.update(split.labels.detach().cpu().numpy().tobytes())
        if count:
            picks = torch.linspace(0, count - 1, steps=min(count, 256)).round().long()
            digest.update(split.images[picks.to(split.images.device)].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in meta.get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng/cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "rng/cpu" in state:
        torch.set_rng_state(state["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in state:
        torch.cuda.set_rng_state(state["rng/cuda"], device)


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, method_state: dict[str, torch.Tensor],
            device: torch.device, info: dict[str, Any], averaged: dict[str, torch.Tensor] | None = None) -> Snapshot:
    """A detached CPU copy of everything needed to continue from here (used in memory and on disk)."""
    return Snapshot(
        info=dict(info),
        model={k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()},
        optimizer=_copy_optimizer_state(optimizer.state_dict()),
        rng=rng_state(device),
        method={k: v.detach().to("cpu", copy=True) for k, v in method_state.items()},
        averaged={k: v.detach().to("cpu", copy=True) for k, v in (averaged or {}).items()},
    )


def _copy_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": {i: {k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in e.items()}
                  for i, e in state["state"].items()},
        "param_groups": [dict(group) for group in state["param_groups"]],
    }


def write(run_dir: Path, snapshot: Snapshot, model: nn.Module) -> Path:
    """Write a checkpoint folder (state.json last, with hashes), then prune old ones."""
    folder = run_dir / "checkpoints" / f"step-{snapshot.info['global_step']:09d}"
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = tensors_to_bytes(snapshot.model, {"fastrobust_model": json.dumps(model_config(model))})
    atomic_write_bytes(folder / "model.safetensors", model_bytes)
    optim_tensors, optim_meta = _flatten_optimizer(snapshot.optimizer)
    extra = {**optim_tensors, **snapshot.rng, **{f"method/{k}": v for k, v in snapshot.method.items()},
             **{f"averaged/{k}": v for k, v in snapshot.averaged.items()}}
    atomic_write_bytes(folder / "train_state.safetensors", tensors_to_bytes(extra))
    atomic_write_json(
        folder / "state.json",
        {
            **snapshot.info,
            "optimizer": optim_meta,
            "sha256": {
                "model.safetensors": sha256_file(folder / "model.safetensors"),
                "train_state.safetensors": sha256_file(folder / "train_state.safetensors"),
            },
        },
    )
    folders = sorted((run_dir / "checkpoints").glob("step-*"))
    for old in folders[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def verify(folder: Path) -> str | None:
    """None when the checkpoint folder is complete and its files match their hashes, else the reason."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        return "no state.json (the write was interrupted)"
    try:
        info = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "state.json is not valid JSON" + _looks_like(state_file)
    hashes = info.get("sha256") or {}
    for name in ("model.safetensors", "train_state.safetensors"):
        if not hashes.get(name):
            return f"state.json records no sha256 for {name}"
    for name, digest in hashes.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its recorded sha256 (truncated or altered{_looks_like(folder / name, ': ')})"
    return None


def _looks_like(path: Path, sep: str = "; ") -> str:
    """``"; it looks like an HTML page"`` when the file is surely no checkpoint file (see fastrobust.core.filekind)."""
    kind = looks_like(path)
    return "" if kind is None or kind == "a JSON file" else f"{sep}it looks like {kind}"


def load_latest(run_dir: Path, *, warn=print) -> Snapshot:
    """The newest checkpoint of a run that verifies; damaged ones are reported and skipped."""
    folders = sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)
    if not folders:
        raise FastRobustError(f"{run_dir} has no checkpoints to resume from (expected {run_dir}/checkpoints/step-*)")
    for folder in folders:
        problem = verify(folder)
        if problem is not None:
            warn(f"checkpoint {folder} is unusable: {problem}; trying the previous one")
            continue
        info = json.loads((folder / "state.json").read_text())
        extra = load_file(str(folder / "train_state.safetensors"))
        return Snapshot(
            info=info,
            model=load_file(str(folder / "model.safetensors")),
            optimizer=_unflatten_optimizer(extra, info.pop("optimizer")),
            rng={k: v for k, v in extra.items() if k.startswith("rng/")},
            method={k[len("method/"):]: v for k, v in extra.items() if k.startswith("method/")},
            path=folder,
            averaged={k[len("averaged/"):]: v for k, v in extra.items() if k.startswith("averaged/")},
        )
    raise FastRobustError(f"no checkpoint of {run_dir} verifies: every one is damaged; start a new run")


def trained_epochs(run_dir: Path) -> int | None:
    """The finished epochs recorded by the newest checkpoint of ``run_dir`` that verifies (the one a resume
    continues from), read from its ``state.json``; None when there is none. It verifies checkpoints as the
    resume will (hashing their files: seconds for a large model), but loads no data and builds no model."""
    for folder in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        if verify(folder) is None:
            epoch = json.loads((folder / "state.json").read_text()).get("epoch")
            return epoch if isinstance(epoch, int) else None
    return None


def restore(snapshot: Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            *, rng: bool = True) -> None:
    """Load weights and optimiser state (each state tensor in its parameter's memory layout; and, with ``rng``,
    the random streams) from a snapshot."""
    unwrap(model).load_state_dict(snapshot.model)
    optimizer.load_state_dict(snapshot.optimizer)
    match_parameter_layouts(optimizer)
    if rng:
        set_rng_state(snapshot.rng, device)


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimiser state tensor of a parameter's shape (momentum buffers) that parameter's strides.

    A checkpoint stores tensors contiguous and ``load_state_dict`` keeps that layout, while a channels_last
    model's weights are not contiguous; CUDA's fused SGD refuses a momentum buffer whose strides differ from its
    parameter's, so a resumed channels_last run would fail at its first step. The values are unchanged.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
