"""Safe checkpoints: weights in safetensors (never pickle), metadata as JSON.

A model file carries the model's constructor config in its safetensors metadata, so
``load_model`` rebuilds the architecture without any code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .errors import FastRobustError

MODEL_KEY = "fastrobust_model"
META_KEY = "fastrobust_meta"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return safetensors_bytes(cpu, metadata=metadata)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able constructor config of a fastrobust model (see fastrobust.models.create)."""
    inner = getattr(model, "module", model)  # DDP / compiled wrappers
    inner = getattr(inner, "_orig_mod", inner)
    config = getattr(inner, "fastrobust_config", None)
    if config is None:
        raise FastRobustError(
            f"{type(inner).__name__} has no fastrobust_config: build models with fastrobust.models.create "
            "or set model.fastrobust_config to the keyword arguments of create()"
        )
    return dict(config)


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> str:
    """Write the model's weights and config atomically; returns the file's sha256."""
    header = {MODEL_KEY: json.dumps(model_config(model)), META_KEY: json.dumps(metadata or {})}
    data = tensors_to_bytes(unwrap(model).state_dict(), header)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def resolve_model_file(path: str | Path) -> Path:
    """Accept a .safetensors file or a run directory (its best, else last, model)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise FastRobustError(f"{path} holds no best.safetensors or last.safetensors: is it a fastrobust run folder?")
    if not path.is_file():
        raise FastRobustError(f"checkpoint {path} does not exist: give a run folder or a .safetensors file")
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read (state_dict, model config, metadata) from a fastrobust .safetensors file, with clear errors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for damaged files
        raise FastRobustError(f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt") from None
    if MODEL_KEY not in header:
        raise FastRobustError(f"{path} has no fastrobust model config in its metadata: it was not written by fastrobust")
    return state, json.loads(header[MODEL_KEY]), json.loads(header.get(META_KEY, "{}"))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model (in eval mode) and return it with the metadata saved beside its weights."""
    from .models import create

    file = resolve_model_file(path)
    state, config, metadata = read_model_file(file)
    model = create(**config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise FastRobustError(f"{file}: the weights do not fit the model config {config}: {error}") from None
    metadata = dict(metadata, model=config, path=str(file))
    return model.to(device).eval(), metadata
