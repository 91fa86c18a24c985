"""Safe checkpoints: weights in safetensors (never pickle), metadata as JSON.

A model file carries the model's constructor config in its safetensors metadata, so
``load_model`` rebuilds the architecture without any code from the file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from fastrobust.core.filekind import MODEL_SUFFIXES, not_a_checkpoint, plain_pickle_globals
from fastrobust.core.files import atomic_write_bytes, sha256_file
from fastrobust.errors import FastRobustError
from fastrobust.models import create
from fastrobust.models.custom import describe, is_module_config

STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")  # {"state_dict": {...}, "epoch": ...}
MODEL_KEY = "fastrobust_model"
META_KEY = "fastrobust_meta"
WEIGHTS_SHA256_KEY = "fastrobust_weights_sha256"  # save_model's digest of the tensors (weights_digest)
CHECKPOINT_RECORD = "state.json"  # written last into RUN/checkpoints/step-N (fastrobust.train.state), with sha256s


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return safetensors_bytes(cpu, metadata=metadata)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON-able constructor config of a fastrobust model (see fastrobust.models.create); for any other
    module its description (class, fingerprint; see fastrobust.models.custom), which needs the module again."""

    inner = unwrap(model)  # DDP / compiled wrappers
    config = getattr(inner, "fastrobust_config", None)
    return describe(inner) if config is None else dict(config)


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and tensor bytes (in name order): what ``save_model`` records
    in the file's header and ``read_model_file`` checks, so that changed weights are never taken for trained ones."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> str:
    """Write the model's weights and config atomically, with the sha256 of its weights (``weights_digest``) in the
    header; returns the file's sha256."""
    state = unwrap(model).state_dict()
    header = {MODEL_KEY: json.dumps(model_config(model)), META_KEY: json.dumps(metadata or {}),
              WEIGHTS_SHA256_KEY: weights_digest(state)}
    data = tensors_to_bytes(state, header)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def resolve_model_file(path: str | Path) -> Path:
    """Accept a .safetensors file, a run directory (its best, else last, model) or one of its checkpoint folders
    (``RUN/checkpoints/step-N``: its model.safetensors)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        steps = sorted(p for p in path.glob("checkpoints/step-*") if (p / "model.safetensors").is_file())
        if steps:  # a run stopped (or still training) before its first epoch ended: checkpoints, no best/last
            raise FastRobustError(f"run {path} has no finished weights yet (no best.safetensors or last.safetensors: "
                                  "its training stopped, or is still running, before the first epoch ended); "
                                  f"evaluate its newest checkpoint {steps[-1]}, or finish the training with "
                                  f"fastrobust train --resume {path}")
        raise FastRobustError(f"{path} holds no best.safetensors or last.safetensors (a run folder) and no "
                              "model.safetensors (a checkpoint folder RUN/checkpoints/step-N)" + _found_in(path))
    check_model_path(path)
    return path


def check_model_path(path: str | Path) -> Path:
    """``path`` as a Path when it exists (a file or a folder); else the one FastRobustError every loader and command
    gives for a missing model.

    Raises:
        FastRobustError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FastRobustError(f"checkpoint {path} does not exist: give a run folder, a checkpoint folder "
                              "RUN/checkpoints/step-N, or a model file (.safetensors, a .pt/.pth state dict, a "
                              "TorchScript archive or a .pt2 program)")
    return path




def _found_in(folder: Path) -> str:
    """The end of the message for a folder without a model: the checkpoint folders ``step-*`` and the model
    files it does hold, and which to pass; else the question whether it is a fastrobust run."""
    steps = sorted(p for p in folder.glob("step-*") if (p / "model.safetensors").is_file())
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)
    if steps:
        shown = ", ".join(p.name for p in steps[-3:]) + (f" (and {len(steps) - 3} more)" if len(steps) > 3 else "")
        run = folder.parent if folder.name == "checkpoints" else None
        best = (f", or the run folder {run} for its best/last model" if run is not None and any(
            (run / name).is_file() for name in ("best.safetensors", "last.safetensors")) else "")
        return (f"; it holds the checkpoint folders {shown}: pass one, e.g. {steps[-1]} (the latest){best}")
    if files:
        return f"; it holds {', '.join(files[:5])}: pass the model file itself, e.g. {folder / files[0]}"
    return ": is it a fastrobust run?"


def recorded_sha256(file: Path) -> tuple[str, Path] | None:
    """The sha256 recorded for ``file`` when it was saved, and where: a checkpoint folder's ``state.json`` records
    its files' hashes (``fastrobust.train.state.write``); None when nothing beside ``file`` records one."""
    record = file.parent / CHECKPOINT_RECORD
    if not record.is_file():
        return None
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):  # an unreadable record is resume's concern (it skips the folder), not a hash
        return None
    hashes = info.get("sha256") if isinstance(info, dict) else None
    digest = hashes.get(file.name) if isinstance(hashes, dict) else None
    return (digest, record) if isinstance(digest, str) else None


def check_unchanged(file: Path) -> None:
    """Refuse a model file whose contents differ from the sha256 recorded when it was saved (``recorded_sha256``):
    flipped bits on a disk or a copy cut short would otherwise be evaluated as if they were the trained model.

    Raises:
        FastRobustError: the file's sha256 is not the recorded one (one line: the file, the record, what to do).
    """
    recorded = recorded_sha256(file)
    if recorded is None or not file.is_file() or sha256_file(file) == recorded[0]:  # a missing file: read says so
        return
    raise FastRobustError(f"{file} has changed since it was saved: its sha256 is not the one recorded in "
                          f"{recorded[1]} (the file was damaged or altered); do not use it: evaluate another "
                          "checkpoint folder or the best/last model of the run, or copy the run again from where "
                          "it was trained")


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read (state_dict, model config, metadata) from a fastrobust .safetensors file, with clear errors; weights
    whose sha256 was recorded when they were saved (in the file's header by ``save_model``; beside it, in a
    checkpoint folder's state.json) must still match it."""
    path = Path(path)
    check_unchanged(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for damaged files
        raise FastRobustError(not_a_checkpoint(path) or f"{path} is not a readable safetensors file ({error}); "
                              "it may be truncated or corrupt") from None
    if MODEL_KEY not in header:
        raise FastRobustError(f"{path} has no fastrobust model config in its metadata: it was not written by fastrobust")
    recorded = header.get(WEIGHTS_SHA256_KEY)  # absent from files written before it was recorded
    if recorded is not None and weights_digest(state) != recorded:
        raise FastRobustError(f"{path} has changed since it was saved: its weights do not match the sha256 recorded "
                              "in its header when fastrobust wrote it (the file was damaged or altered); do not use "
                              "it: evaluate another model of the run, or copy the file again from where it was "
                              "trained")
    try:
        config, metadata = json.loads(header[MODEL_KEY]), json.loads(header.get(META_KEY, "{}"))
    except ValueError as error:
        raise FastRobustError(f"{path}: its fastrobust metadata is not valid JSON ({error}); the file was altered") from None
    if not isinstance(config, dict) or not isinstance(metadata, dict):
        raise FastRobustError(f"{path}: its fastrobust metadata is not a mapping; the file was altered")
    return state, config, metadata


def saved_normalization(config: dict[str, Any]) -> tuple[list | None, list | None, str]:
    """The input normalisation a fastrobust model file carries in its ``config``: ``(mean, std, how)``, ``how`` in
    words for the model line of ``fastrobust eval``: the values from the weights, or none at all (a model built
    without mean/std takes [0,1] pixels)."""
    mean, std = config.get("mean"), config.get("std")
    if mean is None or std is None:
        return None, None, "none (the model takes [0,1] pixels)"
    return mean, std, "from the weights (fastrobust model)"


def data_mismatch(config: dict[str, Any] | None, image_shape: tuple[int, int, int], num_classes: int,
                  dataset: str, *, image_size: bool = True) -> str | None:
    """What a model built from ``config`` (its ``fastrobust_config``) was not built for in a dataset of
    ``image_shape`` (C, H, W) images and ``num_classes`` classes: ``"in_channels=1, dataset 'cifar10' has 3-channel
    images"`` (channels, then classes, then, with ``image_size``, the image side); None when it fits or the config
    does not say. The commands that take a model and a dataset refuse such a pair with this text."""
    config = config or {}
    channels, size, classes = config.get("in_channels"), config.get("image_size"), config.get("num_classes")
    c, h, w = image_shape
    if channels is not None and int(channels) != c:
        return f"in_channels={channels}, dataset {dataset!r} has {c}-channel images"
    if classes is not None and int(classes) != num_classes:
        return f"num_classes={classes}, dataset {dataset!r} has {num_classes} classes"
    if image_size and size is not None and (h, w) != (int(size), int(size)):
        return f"image_size={size}, dataset {dataset!r} has {h}x{w} images"
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model fastrobust saved, from its safetensors file alone (no code is unpickled or run).

    The file carries the model's constructor config in its metadata, so the architecture is rebuilt by
    ``models.create`` and the weights loaded strictly. For any other model file (public state dicts, TorchScript,
    torch.export, your own architecture) use ``fastrobust.models.thirdparty.load_model``.

    Args:
        path: a ``.safetensors`` file, a run folder (its ``best``, else ``last`` model) or a checkpoint folder
            ``RUN/checkpoints/step-N``.
        device: where to put the model (default ``"cpu"``).

    Returns:
        ``(model, metadata)``: the model in eval mode, and the metadata saved beside its weights plus ``model``
        (its config) and ``path``.

    Raises:
        FastRobustError: a missing or damaged file, a module fastrobust did not build (give its factory), or
            weights that do not fit the saved config; one line each.

    Example:
        >>> model, meta = load_model("runs/quickstart")
    """

    file = resolve_model_file(path)
    state, config, metadata = read_model_file(file)
    if is_module_config(config):
        raise FastRobustError(
            f"{file} holds the weights of a module fastrobust did not build (class {config.get('class')}): "
            "give the code that builds it, fastrobust eval --model-factory FILE.py:FUNCTION "
            "(Python: fastrobust.models.thirdparty.load_model(path, factory=...))")
    model = rebuild(file, state, config)
    metadata = dict(metadata, model=config, path=str(file))
    return model.to(device).eval(), metadata


def rebuild(file: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> nn.Module:
    """The model a fastrobust file describes: built from its saved ``config`` by the registry, its weights
    ``state`` loaded strictly (``load_into``). Every loader of fastrobust's own files goes through here.

    Raises:
        FastRobustError: the config names no buildable model, or the weights do not fit it (one line each).
    """
    try:
        model = create(**config)
    except (TypeError, ValueError, KeyError) as error:  # FastRobustError (unknown model) passes through
        raise FastRobustError(f"{file}: cannot build the model from its saved config {config} ({error})") from None
    load_into(model, state, weights=str(file), architecture=f"its saved config {config.get('name')}")
    return model


def _fill_untracked(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm's ``num_batches_tracked`` (absent from checkpoints written before PyTorch 0.4.1) does not change
    what an evaluated model computes: take the model's own where the file has none."""
    expected = model.state_dict()
    return {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state}, **state}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, weights: str, architecture: str) -> None:
    """Strict ``load_state_dict``; a mismatch is one line naming the weights and the architecture."""
    state = _fill_untracked(state, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch (weights vs model): " + ", ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"missing from the weights: {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else ""))
        raise FastRobustError(f"{weights} does not fit {architecture}: {'; '.join(parts)}")
    model.load_state_dict(state)


def import_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a third-party ``.pt``/``.pth`` state dict safely: ``torch.load(weights_only=True)``, no code run.

    Pickles that name anything but tensors and plain containers are refused with a FastRobustError naming
    the file and the refused global; a file that is no checkpoint at all (an HTML page saved by a failed
    download, text, a truncated archive) is reported as such. ``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"net": ...}`` wrappers are unwrapped; keys keep DataParallel's ``module.`` and torch.compile's ``_orig_mod.``
    prefixes (``models.layouts.strip_prefixes`` removes them where the keys meet a module). Convert the result with
    ``save_model`` to get a safe .safetensors file (``fastrobust.models.thirdparty`` maps public key layouts).
    """

    path = Path(path)
    if not path.is_file():
        raise FastRobustError(f"state dict {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = load_failure_reason(error)
        problem = not_a_checkpoint(path)
        if problem:
            raise FastRobustError(problem) from None
        named = plain_pickle_globals(path)
        if named is not None:  # pickle.dump's output (a FRAME opcode reads as "damaged" to torch's unpickler)
            raise FastRobustError(plain_pickle_refusal(path, named)) from None
        if "Unsupported operand" in reason:  # an opcode no pickle has: damaged bytes, not a refused global
            raise FastRobustError(f"{path} is not a recognised checkpoint format: it starts like a pickle but is "
                                  f"damaged ({reason}); fetch or copy the file again") from None
        hint = ("; if the file is yours, save the weights alone, torch.save(model.state_dict(), PATH), or the "
                "program, torch.export.save" if "GLOBAL" in reason else "")
        raise FastRobustError(f"refused to load {path}: {reason}; only tensors and plain containers are accepted "
                              f"(weights_only=True), nothing in the file was run{hint}") from None
    except Exception as error:  # truncated zip, not a torch file, ...
        named = plain_pickle_globals(path)
        if named is not None:  # e.g. a small pickle.dump (protocol 2) that torch reads as a bad magic number
            raise FastRobustError(plain_pickle_refusal(path, named)) from None
        raise FastRobustError(not_a_checkpoint(path) or (
            f"cannot read {path} as a torch state dict ({type(error).__name__}: "
            f"{load_failure_reason(error)}); it may be truncated or not a .pt file")) from None
    for key in STATE_DICT_WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded:
        raise FastRobustError(f"{path} holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for name, value in loaded.items():
        if not (isinstance(name, str) and torch.is_tensor(value)):
            raise FastRobustError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor: not a state dict")
        state[name] = value  # keys as stored: wrapper prefixes are removed where the keys meet a module
    return state  # (models.layouts.strip_prefixes), so a module that has a `module` submodule still loads


# what a pickled state dict of tensors names (protocol 2 pickles bytes through _codecs.encode)
STATE_DICT_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")


def plain_pickle_refusal(path: Path, named: list[str]) -> str:
    """The one line for a file ``pickle.dump`` wrote (naming the globals ``named``): what it is, why it is not
    read and how to convert it -- or, when it names more than tensors and containers, not to."""
    what = (f"refused to load {path}: it is a plain Python pickle (written by pickle.dump), not a torch.save or "
            "safetensors file, and fastrobust does not unpickle arbitrary objects (unpickling can run any code; "
            "nothing in the file was run)")
    strange = [name for name in named if not name.startswith(STATE_DICT_GLOBALS)]
    if strange:
        return (f"{what}; it names {', '.join(strange[:3])}, which no state dict of tensors needs: do not unpickle "
                "it, ask its author for a torch.save or safetensors file")
    out = path.with_name(f"{path.stem}-converted.pt")
    return (f"{what}; if you trust the file, convert it once on that machine: python -c \"import pickle, torch; "
            f"state = pickle.load(open('{path}', 'rb')); torch.save(state, '{out}')\" (or "
            f"safetensors.torch.save_file(state, '{out.with_suffix('.safetensors')}')), then load {out}")


def load_failure_reason(error: BaseException) -> str:
    """The informative line of torch.load's (multi-line) error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if any(word in line for word in ("GLOBAL", "Unsupported", "unsupported", "failed reading", "Invalid magic")):
            return line.split(". ")[0].rstrip(".")
    return lines[0].rstrip(".") if lines else type(error).__name__
