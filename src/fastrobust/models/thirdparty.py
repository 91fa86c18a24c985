"""Models fastrobust did not train: public state dicts, TorchScript archives, torch.export programs, user code.

``load_model(path, num_classes=, image_shape=, ...)`` returns ``(module, info)``: a module in eval mode that maps
pixels in [0, 1] to logits, and a JSON-able ``info`` for the evaluation record (format, architecture, layout,
input normalisation and how it was chosen). What each format runs (see docs/evaluation.md):

- fastrobust ``.safetensors`` files: tensors and JSON, nothing runs; the architecture comes from the config in
  the file (a module trained with ``train(model=...)`` needs ``factory`` again).
- state dicts (``torch.save``, ``.pt``/``.pth``, or ``.safetensors`` without fastrobust metadata): read with
  ``torch.load(weights_only=True)`` (a pickle that names anything but tensors and containers is refused before
  it runs); the keys are matched to a fastrobust architecture through ``fastrobust.models.layouts``.
- TorchScript archives (``torch.jit.save``) and ``torch.export`` programs (``.pt2``): see ``fastrobust.models.programs``
  for what their loaders unpickle and run (no Python object is unpickled; ``.pt2`` archives are checked first).
- ``factory="FILE.py:FUNCTION"``: **runs that Python file** (your code builds the module), then loads the state
  dict into the module it returns.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from fastrobust.core.filekind import checkpoint_format, not_a_checkpoint
from fastrobust.core.values import parse_number
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.models.checkpoint import (
    MODEL_KEY,
    check_model_path,
    import_state_dict,
    load_into,
    read_model_file,
    rebuild,
    resolve_model_file,
    saved_normalization,
)
from fastrobust.models.custom import check_pairing, is_module_config, mismatch
from fastrobust.models.layouts import convert, identify, strip_prefixes
from fastrobust.models.programs import FixedBatch, cross_device_reason, load_export, load_torchscript
from fastrobust.models.registry import canonical_name, create, declared_keywords

NORMALIZATION_CHOICES = "none, dataset, or MEAN,STD (two numbers, or one mean and one std per channel)"


# --------------------------------------------------------------------------- input normalisation
@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` before the model; ``how`` says where the values came from (for the record)."""

    mean: tuple[float, ...] | None  # None: identity
    std: tuple[float, ...] | None
    how: str

    def record(self) -> dict[str, Any]:
        return {"mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "how": self.how}


def parse_normalization(text: str | None, channels: int, *, dataset_stats=None, dataset_name: str = "the dataset"
                        ) -> Normalization | None:
    """``--normalization`` -> Normalization (None when not given). ``dataset`` takes ``dataset_stats``
    ((mean, std) of the training split); ``MEAN,STD`` is 2 numbers or 2*channels numbers (means first)."""

    if text is None:
        return None
    value = str(text).strip().lower()
    if value == "none":
        return Normalization(None, None, "given: none (the model takes pixels in [0, 1])")
    if value == "dataset":
        if dataset_stats is None:
            raise ConfigError("--normalization dataset needs a dataset to take the mean and std from")
        mean, std = dataset_stats
        return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std),
                             f"given: dataset (the mean and std of {dataset_name}'s training split)")
    parts = [part for part in value.split(",") if part.strip()]
    if len(parts) not in (2, 2 * channels):
        raise ConfigError(f"--normalization {text!r} is not one of {NORMALIZATION_CHOICES} "
                          f"({len(parts)} numbers given, expected 2 or {2 * channels})")
    numbers = [parse_number(part, name="--normalization") for part in parts]
    half = len(numbers) // 2
    mean, std = numbers[:half] * (channels if half == 1 else 1), numbers[half:] * (channels if half == 1 else 1)
    if any(s <= 0 for s in std):
        raise ConfigError(f"--normalization {text!r}: every std must be positive (it divides the input)")
    if max(mean) > 1:  # (x - mean) / std of pixels in [0, 1]: a mean above 1 is in 0..255 units
        scaled = ",".join(f"{v / 255:.4g}" for v in numbers)
        raise ConfigError(f"--normalization {text!r}: mean {max(mean):g} is in 0..255 units but the model is fed "
                          f"pixels in [0, 1]: divide mean and std by 255 ({scaled})")
    return Normalization(tuple(mean), tuple(std), f"given: mean {mean}, std {std}")


def _as_normalization(value, channels: int) -> Normalization | None:
    """The Python forms of ``normalization``: None, "none", (mean, std) or a Normalization."""
    if value is None or isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        if value.strip().lower() == "dataset":
            raise ConfigError('normalization="dataset" is a command-line shortcut: pass (data.mean, data.std)')
        return parse_normalization(value, channels)
    try:
        mean, std = value
        text = ",".join(str(float(v)) for part in (mean, std) for v in (part if hasattr(part, "__len__") else [part]))
    except (TypeError, ValueError):
        raise ConfigError(f"normalization={value!r} must be None, 'none' or (mean, std)") from None
    return parse_normalization(text, channels)


ASSUMED_NONE = Normalization(None, None, "assumed: none (the model takes pixels in [0, 1]; "
                                         "pass --normalization dataset or MEAN,STD if it expects normalised input)")


class InputNormalization(nn.Module):
    """``model((x - mean) / std)``: a third-party model that expects normalised input, fed pixels in [0, 1]."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _normalized(model: nn.Module, normalization: Normalization) -> nn.Module:
    if normalization.mean is None:
        return model
    return InputNormalization(model, normalization.mean, normalization.std)


def _own_normalization_keys(names) -> tuple[str, str] | None:
    """The ``(mean, std)`` names (``mean``/``std``, or ``P.mean``/``P.std`` of one submodule ``P``) under which a
    state dict or module holds input-normalisation tensors that it applies itself; None when it holds none."""
    names = set(names)
    for name in sorted(names, key=lambda n: (n.count("."), n)):
        if name == "mean" or name.endswith(".mean"):
            std = name[: -len("mean")] + "std"
            if std in names:
                return name, std
    return None


def _is_identity(mean: torch.Tensor, std: torch.Tensor) -> bool:
    """Whether stored mean/std buffers are 0 and 1 (``(x - 0) / 1``: no normalisation at all)."""
    return bool(torch.all(mean == 0)) and bool(torch.all(std == 1))


def _values(tensor: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(v) for v in tensor.detach().flatten().tolist())


def check_no_second_normalization(what: str, tensors: dict[str, torch.Tensor],
                                  normalization: Normalization | None) -> tuple[str, str] | None:
    """Refuse ``--normalization`` for a model that normalises its input itself (``mean``/``std`` tensors among
    ``tensors``, a state dict or a module's buffers) unless those are the identity (then the given normalisation
    is the only one). Returns the names of its own mean/std tensors (None when it has none).

    Raises ConfigError ``WHAT carries its own input normalisation (...): drop --normalization``."""
    keys = _own_normalization_keys(tensors)
    if keys is None or normalization is None or _is_identity(tensors[keys[0]], tensors[keys[1]]):
        return keys
    raise ConfigError(f"{what} carries its own input normalisation ({keys[0]}/{keys[1]} buffers, mean "
                      f"{_rounded(tensors[keys[0]])}, std {_rounded(tensors[keys[1]])}) that it applies itself: "
                      "drop --normalization (it would normalise twice)")


def _rounded(tensor: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in _values(tensor)]


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _outside_normalization(module: nn.Module, normalization: Normalization | None, what: str) -> Normalization:
    """What to apply in front of a loaded user module / program: nothing when it has its own mean/std (the
    record then says so and gives its values), else ``normalization`` or the assumed none."""
    tensors = _module_tensors(module)
    keys = check_no_second_normalization(what, tensors, normalization)
    if keys is None or normalization is not None:
        return normalization or ASSUMED_NONE
    return Normalization(None, None, f"the module's own ({keys[0]}/{keys[1]} buffers, mean "
                                     f"{_rounded(tensors[keys[0]])}, std {_rounded(tensors[keys[1]])}, "
                                     "applied inside it; nothing added)")


# --------------------------------------------------------------------------- user code
def load_factory(spec: str) -> tuple[Callable[..., nn.Module], str]:
    """``FILE.py:FUNCTION`` -> (the function, its label). **Runs FILE.py** (as ``python FILE.py`` would, minus
    ``__main__``): FILE's folder goes first on the import path, so FILE can import the modules beside it; errors
    in it are reported with the file and line."""
    text = str(spec)
    file, _, function = text.rpartition(":")
    if not file or not function.isidentifier():
        raise ConfigError(f"--model-factory {text!r} is not FILE.py:FUNCTION (e.g. my_models.py:build)")
    path = Path(file).expanduser()
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"--model-factory {text!r}: {path} is not a Python file")
    name = f"fastrobust_factory_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
    _import_beside(path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's code: one line naming where it failed
        raise FastRobustError(f"running {path} for --model-factory failed: {_where(error, path)}"
                              f"{type(error).__name__}: {error}") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ConfigError(f"--model-factory {text!r}: {path} defines no function {function!r}")
    return factory, f"{path}:{function}"


def _import_beside(path: Path) -> None:
    """Put the folder of a user's file first on ``sys.path`` (kept: the factory may import lazily when called)."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _where(error: BaseException, path: Path) -> str:

    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path.resolve()
              or Path(frame.filename) == path]
    return f"line {frames[-1].lineno}: " if frames else ""


def call_factory(factory: Callable[..., nn.Module], label: str, *, num_classes: int, image_shape) -> nn.Module:
    """Call the factory with the keywords it declares among num_classes, in_channels, image_size."""

    offered = {"num_classes": num_classes, "in_channels": image_shape[0], "image_size": image_shape[1]}
    names, var_keyword = declared_keywords(factory) or (set(), False)  # unreadable signature: call it bare
    accepted = {k: v for k, v in offered.items() if k in names or var_keyword}
    try:
        module = factory(**accepted)
    except Exception as error:  # noqa: BLE001 - the user's code
        raise FastRobustError(f"{label}({', '.join(f'{k}={v}' for k, v in accepted.items())}) failed: "
                              f"{type(error).__name__}: {error}") from None
    if not isinstance(module, nn.Module):
        raise FastRobustError(f"{label} returned a {type(module).__name__}, not an nn.Module")
    return module


# --------------------------------------------------------------------------- state dicts
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a torch.save file (weights_only=True) or of a safetensors file without fastrobust metadata."""

    if checkpoint_format(path) == "safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # noqa: BLE001 - damaged file
            raise FastRobustError(not_a_checkpoint(path) or f"{path} is not a readable safetensors file ({error})") from None
    return import_state_dict(path)


TRAINING_STATE_GROUPS = ("optim", "rng", "method", "averaged")  # fastrobust.train.state's tensor names


def _training_state_problem(state: dict[str, torch.Tensor], path: Path) -> str | None:
    """Why a state dict is a run's ``train_state.safetensors`` (optimiser, RNG and method state), not weights."""
    if not state or not all(key.split("/", 1)[0] in TRAINING_STATE_GROUPS and "/" in key for key in state):
        return None
    beside = path.with_name("model.safetensors")
    hint = (f"evaluate the model file beside it, --checkpoint {beside}" if beside.is_file()
            else "evaluate the run folder or its best.safetensors")
    return (f"{path} holds a training run's optimiser and random-number state (train_state.safetensors), not model "
            f"weights, so no --model can load it: {hint}")


def _fit_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state with ``module.``/``model.``/``_orig_mod.`` prefixes stripped, unless the keys fit the model as
    they are."""

    expected = set(model.state_dict())
    return state if set(state) <= expected and state else strip_prefixes(state)


def _layout_model(state: dict[str, torch.Tensor], path: Path, *, model_name: str | None, num_classes: int,
                  image_shape, dataset: str, normalization: Normalization | None) -> tuple[nn.Module, dict, Normalization]:
    """A fastrobust model holding a public-layout (or own-layout, or --model NAME) state dict."""

    state = strip_prefixes(state)
    try:
        match = identify(state)
    except FastRobustError as error:
        raise FastRobustError(f"{path}: {error}") from None
    wanted = None if model_name is None else canonical_name(model_name)
    info: dict[str, Any] = {}
    if match is not None:
        same = wanted is None or wanted == match.model or (wanted == "wideresnet" and match.model.startswith("wrn"))
        if not same:
            raise FastRobustError(f"{path} holds a {match.description} ({match.layout.source} layout) but --model "
                                  f"{model_name} is another architecture: give --model {match.model} or leave --model out")
        if match.num_classes != num_classes:
            raise FastRobustError(f"{path} ({match.description}) has {match.num_classes} output classes but {dataset} "
                                  f"has {num_classes}: evaluate it on the dataset it was trained for")
        if match.in_channels != image_shape[0]:
            raise FastRobustError(f"{path} ({match.description}) takes {match.in_channels}-channel images but {dataset}'s "
                                  f"have {image_shape[0]} channels: evaluate it on the dataset it was trained for")
        if match.layout.input_size is not None and tuple(image_shape[1:]) != (match.layout.input_size,) * 2:
            raise FastRobustError(f"{path} ({match.description}, {match.layout.source} layout) pools with a fixed "
                                  f"window that is global only for {match.layout.input_size}x{match.layout.input_size} "
                                  f"images, {dataset}'s are {image_shape[1]}x{image_shape[2]}: use --model-factory")
        name, options = match.model, dict(match.options)
        state = convert(state, match.layout)
        info.update(architecture=match.description, layout=match.layout.name)
    elif wanted is None:
        raise ConfigError(f"cannot tell which architecture {path} holds (keys {', '.join(list(state)[:4])} ...): "
                          "give --model NAME (see fastrobust models) or --model-factory FILE.py:FUNCTION")
    else:
        name, options = wanted, {}
        info.update(architecture=wanted, layout="as named by --model")
    own = "mean" in state and "std" in state  # fastrobust's layout: the model's own input normalisation
    check_no_second_normalization(str(path), state, normalization)
    if own and normalization is None:
        chosen = Normalization(_values(state["mean"]), _values(state["std"]), "from the weights (mean/std buffers)")
    else:  # none stored, or the identity (then the given normalisation is the only one)
        chosen = normalization or ASSUMED_NONE
    channels, height = image_shape[0], image_shape[1]
    model = create(name, num_classes=num_classes, in_channels=channels, image_size=height,
                   mean=None if chosen.mean is None else list(chosen.mean),
                   std=None if chosen.std is None else list(chosen.std), **options)
    applies = (getattr(model, "fastrobust_config", None) or {}).get("mean") is not None  # built with chosen mean/std
    has_buffers = {"mean", "std"} <= set(model.state_dict())
    if has_buffers and not applies and not own:  # a registered module normalising with its own initial buffers
        check_no_second_normalization(f"{path} (--model {model_name})", model.state_dict(), normalization)
    if own and not has_buffers:  # a registered module without them: the keys were fastrobust's normalisation
        state = {k: v for k, v in state.items() if k not in ("mean", "std")}
    elif has_buffers and (applies or not own):  # the model's buffers hold the chosen normalisation
        state = {**state, **{k: v for k, v in model.state_dict().items() if k in ("mean", "std")}}
    # else: a registered module with its own mean/std buffers takes the stored ones and applies them itself
    named = f"--model {model_name}" if match is None else f"{name} ({match.description})"
    load_into(model, state, weights=str(path), architecture=f"{named} for {dataset}")
    info["model"] = dict(getattr(model, "fastrobust_config", {}) or {})
    if own and has_buffers and not applies and normalization is None:
        chosen = Normalization(chosen.mean, chosen.std,
                               "from the weights (mean/std buffers, applied by the module itself)")
    elif chosen.mean is not None and not applies:  # a registered factory without mean/std arguments
        model = InputNormalization(model, chosen.mean, chosen.std)
    return model, info, chosen


# --------------------------------------------------------------------------- the one entry point
def load_model(
    path: str | Path,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    model: str | None = None,
    factory: str | Callable[..., nn.Module] | None = None,
    normalization: Normalization | str | tuple | None = None,
    dataset: str = "the dataset",
    device: str | torch.device = "cpu",
    note: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load any model file for evaluation on images of ``image_shape`` (C, H, W) with ``num_classes`` classes.

    The entry for models trained elsewhere: public state-dict layouts (RobustBench/TRADES/MadryLab key names,
    DataParallel and torch.compile prefixes), TorchScript archives and torch.export programs, read without
    unpickling Python objects (``torch.load(weights_only=True)``); the file kind is recognised by content, not
    by suffix. fastrobust's own files are rebuilt from their saved config.

    Args:
        path: a fastrobust run folder or ``.safetensors`` file, a state dict (``.pt``/``.pth``/``.safetensors``),
            a TorchScript archive or a ``.pt2`` program.
        num_classes: the data's classes; the model's outputs must match.
        image_shape: the data's (C, H, W).
        model: the fastrobust (or registered) architecture a state dict fits, when its layout does not say
            (default None: identified from the keys).
        factory: ``"FILE.py:FUNCTION"`` (runs that file) or a callable, building the module a state dict loads
            into (default None).
        normalization: ``"none"``, ``(mean, std)`` (numbers or one per channel) or a :class:`Normalization`
            (default None: what the file says, else none, said through ``note``).
        dataset: the data's name, for messages (default ``"the dataset"``).
        device: where to put the model (default ``"cpu"``).
        note: where notes go (default: stderr).

    Returns:
        ``(model, info)``: the model in eval mode on ``device``, taking pixels in [0, 1], and what was loaded
        (format, architecture, normalisation).

    Raises:
        FastRobustError: a missing, damaged or unsafe file, or a wrong pairing (architecture vs weights, classes,
            channels, image size), in one line naming both sides.
        ConfigError: contradictory arguments (a program with ``model=``, both ``model`` and ``factory``).

    Example:
        >>> model, info = load_model("trades_cifar10.pt", num_classes=10, image_shape=(3, 32, 32),
        ...                          model="wrn34_10")
    """

    note = note or (lambda message: print(message, file=sys.stderr))
    normalization = _as_normalization(normalization, image_shape[0])
    path = Path(path)
    if path.is_dir():
        path = resolve_model_file(path)
    check_model_path(path)
    kind = checkpoint_format(path)
    info: dict[str, Any] = {"path": str(path)}
    if callable(factory):
        build, label = factory, getattr(factory, "__qualname__", "factory")
    elif factory is not None:
        build, label = load_factory(factory)
    else:
        build = label = None
    if build is not None:
        info["factory"] = label
    chosen: Normalization
    if kind == "safetensors" and has_fastrobust_header(path, MODEL_KEY):
        state, config, metadata = read_model_file(path)
        module, chosen = _from_fastrobust_file(path, state, config, build, label, model, normalization,
                                               num_classes=num_classes, image_shape=image_shape, dataset=dataset, note=note)
        info.update(format="fastrobust", model=config, metadata=metadata)
    elif kind in ("torchscript", "export"):
        if build is not None or model is not None:
            raise ConfigError(f"{path} is a {'TorchScript archive' if kind == 'torchscript' else 'torch.export program'}: "
                              "it holds its own architecture, drop --model / --model-factory")
        program = load_torchscript(path) if kind == "torchscript" else load_export(path, device)
        inner_program = program
        while isinstance(getattr(inner_program, "program", None), nn.Module):  # FixedMode / FixedBatch wrappers
            inner_program = inner_program.program
        chosen = _outside_normalization(inner_program, normalization, f"{path} ({kind})")
        module = _normalized(program, chosen)
        info.update(format=kind, architecture=kind)
        fixed = getattr(program.program, "batch", None) if isinstance(program.program, FixedBatch) else None
        if fixed is not None:
            info["fixed_batch"] = fixed
            note(f"{path}: the program was exported for batches of exactly {fixed} images (no dynamic batch "
                 f"dimension): it is run on chunks of {fixed}, padded; export it with dynamic_shapes="
                 "({0: torch.export.Dim('batch')},) to run whole batches")
    else:
        problem = not_a_checkpoint(path) if kind is None else None
        if problem:
            raise FastRobustError(problem)
        state = read_state_dict(path)
        problem = _training_state_problem(state, path)
        if problem:
            raise FastRobustError(problem)
        if build is not None:
            if model is not None:
                raise ConfigError("give either --model NAME or --model-factory, not both")
            inner = call_factory(build, label, num_classes=num_classes, image_shape=image_shape)
            load_into(inner, _fit_keys(state, inner), weights=str(path), architecture=f"the module of {label}")
            chosen = _outside_normalization(inner, normalization, f"{path} (the module of {label})")
            module = _normalized(inner, chosen)
            info.update(format="state dict", architecture=type(inner).__qualname__)
        else:
            module, layout_info, chosen = _layout_model(state, path, model_name=model, num_classes=num_classes,
                                                        image_shape=image_shape, dataset=dataset,
                                                        normalization=normalization)
            info.update(format="state dict", **layout_info)
    info["normalization"] = chosen.record()
    module = module.to(device).eval()
    explain = (lambda error: cross_device_reason(error, path, device)) if kind == "torchscript" else None
    check_pairing(module, num_classes=num_classes, image_shape=image_shape, device=device,
                  what=f"{path} ({info.get('architecture', info.get('format'))})", dataset=dataset, explain=explain)
    if chosen is ASSUMED_NONE:
        note(f"{path}: input normalisation {chosen.how}")
    return module, info


def has_fastrobust_header(path: Path, key: str) -> bool:
    """Whether a safetensors file carries fastrobust's model config (True when unreadable: let its reader say why)."""

    try:
        with safe_open(str(path), framework="pt") as handle:
            return key in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - damaged: read_model_file will say why
        return True


def _from_fastrobust_file(path, state, config, build, label, model_name, normalization, *, num_classes,
                          image_shape, dataset, note) -> tuple[nn.Module, Normalization]:

    if normalization is not None:
        raise ConfigError(f"{path} was written by fastrobust and says how its input is normalised: drop --normalization")
    if is_module_config(config):
        if build is None:
            raise FastRobustError(f"{path} holds the weights of a module fastrobust did not build (class "
                                  f"{config.get('class')}): give the code that builds it, --model-factory FILE.py:FUNCTION")
        module = call_factory(build, label, num_classes=num_classes, image_shape=image_shape)
        problem = mismatch(config, state, module, strict_class=False)
        if problem:
            raise FastRobustError(f"{path} does not fit the module of {label}: {problem}")
        if config.get("class") and config["class"].rsplit(".", 1)[-1] != type(module).__qualname__:
            note(f"{path} was trained as {config['class']}; loading it into {type(module).__qualname__}")
        load_into(module, state, weights=str(path), architecture=f"the module of {label}")
        return module, Normalization(None, None, "as trained by fastrobust (the module takes pixels in [0, 1])")
    if build is not None:
        raise ConfigError(f"{path} holds a fastrobust {config.get('name')} model: drop --model-factory")
    if model_name is not None and canonical_name(model_name) != config.get("name"):
        raise FastRobustError(f"{path} holds a {config.get('name')} model, not --model {model_name}: drop --model")
    module = rebuild(path, state, config)
    mean, std, how = saved_normalization(config)
    return module, Normalization(None if mean is None else tuple(mean), None if std is None else tuple(std), how)
