"""The input contract of every public entry point (attacks, method losses, evaluate, sanity checks).

Images are floating-point tensors ``[B, ...]`` of any precision with every value finite and in [0, 1] (pixel
units; uint8 ``[N, C, H, W]`` is accepted by the data-level entry points, which divide by 255; the model always
sees them in its own floating dtype); labels are a ``[B]`` tensor of any integer dtype with values in ``[0, C)``
for a model with ``C`` outputs; the model's first output must be logits ``[B, C]`` (a tuple, dict or ``.logits``
object is refused naming the wrapper to write). Data-level entry points read their data by the shapes of its
elements (``split_arrays``). A violation is one ConfigError (or ModelError) line naming the value, what was
expected and the fix.

Checks come in two kinds. Metadata (dtype, shape, device) costs nothing and is checked on every call. Values
(finite, range, labels) need one reduction and one host sync, so they are checked once per public call at the
outermost entry: an entry point runs its body inside ``validated()``, and the public functions it calls on
(subsets of) the same batch skip the value checks. The label range needs ``C``, which is compared (in Python,
no sync) with the first logits the entry point computes anyway (``check_num_classes``).

Models with half-precision weights (bf16/fp16) are evaluated in their own dtype: ``prepare_model`` wraps them
so that inputs are cast to the parameter dtype and logits come back as float32 (losses and comparisons in fp32).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import re
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from fastrobust.core.attack_options import check_options
from fastrobust.core.passes import CountedModel
from fastrobust.core.traced import TRAINING_MODE_FIX, describe_training_ops, export_training_ops, torchscript_mode_ops
from fastrobust.core.values import GRADIENT_NORMS, check_norm
from fastrobust.errors import ConfigError, FastRobustError

_VALIDATED: contextvars.ContextVar[bool] = contextvars.ContextVar("fastrobust_inputs_validated", default=False)
F = TypeVar("F", bound=Callable[..., Any])
_NOT_CHECKED = -1  # the largest label when the values were checked by an enclosing entry point


@contextmanager
def validated() -> Iterator[None]:
    """Run a block whose tensors an enclosing entry point has checked: nested entry points skip value checks."""
    token = _VALIDATED.set(True)
    try:
        yield
    finally:
        _VALIDATED.reset(token)


def inside_validated() -> bool:
    return _VALIDATED.get()


def check_images(x: Tensor, *, where: str, name: str = "x") -> Tensor:
    """Metadata of a batch of images: a floating-point tensor of at least 2 dimensions ``[B, ...]``.

    Returns ``x``, half precision as float32 (attacks compute in float32 or float64; the model gets its own
    dtype through ``prepare_model``). Raises ConfigError naming the dtype or shape and the fix.
    """
    _check_image_metadata(x, where=where, name=name)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_image_metadata(x: Tensor, *, where: str, name: str) -> None:
    if not isinstance(x, Tensor):
        hint = f": torch.from_numpy({name}) converts it" if hasattr(x, "__array__") else ""
        raise ConfigError(f"{where}: {name} is a {type(x).__name__}, expected a torch.Tensor of images [B, C, H, W]"
                          f"{hint}")
    if x.dim() < 2:
        raise ConfigError(f"{where}: {name} has shape {tuple(x.shape)}, expected a batch of images [B, C, H, W] "
                          "(add the batch dimension with x[None])")
    _check_channels_first(x, where=where, name=name)
    if not x.is_floating_point():
        hint = " (evaluate and pgd_accuracy also take uint8 image splits)" if x.dtype == torch.uint8 else ""
        raise ConfigError(f"{where}: {name} has dtype {x.dtype}, expected float images in [0, 1]: "
                          f"use x.float() / 255{hint}")


def _check_channels_first(x: Tensor, *, where: str, name: str) -> None:
    """Images laid out [B, H, W, C] (numpy, PIL, TensorFlow) are refused: the last dimension 1 or 3 and the
    second not (nor 4) reads as channels last; permute them to [B, C, H, W]."""
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3, 4):
        raise ConfigError(f"{where}: {name} has shape {tuple(x.shape)}, which looks channels-last [B, H, W, C]; "
                          f"fastrobust takes [B, C, H, W]: use {name}.permute(0, 3, 1, 2)")


def check_labels(y: Tensor, batch: int, *, where: str, name: str = "y") -> Tensor:
    """Metadata of the labels of ``batch`` images: any integer dtype, shape ``[batch]``; returned as int64.
    (Their values are checked with the images', by ``check_batch`` / ``check_split``.)"""
    if not isinstance(y, Tensor):
        raise ConfigError(f"{where}: {name} is a {type(y).__name__}, expected a torch.Tensor of class indices [B]")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ConfigError(f"{where}: {name} has dtype {y.dtype}, expected integer class indices [B] "
                          "(any integer dtype): use y.long() for whole numbers, y.argmax(1) for one-hot labels")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ConfigError(f"{where}: {name} has shape {tuple(y.shape)} but there are {batch} images: "
                          f"expected labels [{batch}], one class index per image")
    return y.long()


def _check_values(images: Tensor, labels: Tensor, *, where: str, images_name: str, labels_name: str) -> int:
    """One host sync: float images finite and in [0, 1] (uint8 needs no check), labels >= 0. Returns the
    largest label."""
    if not labels.numel():
        return _NOT_CHECKED
    stats = [labels.amin().double(), labels.amax().double()]
    stats += [images.amax().double()] if images.dtype == torch.uint8 else [images.amin().double(), images.amax().double()]
    values = torch.stack(stats).tolist()
    if len(values) == 4:
        _check_image_values(images, values[2], values[3], where=where, name=images_name)
    elif values[2] <= 1:
        warnings.warn(f"{where}: {images_name} are uint8 holding only 0 and 1: a mask, or [0, 1] floats cast to uint8? "
                      "uint8 images are 0..255 pixel values (divided by 255 here), so these evaluate as black images; "
                      "pass float images in [0, 1], or (x * 255).round().to(torch.uint8)", UserWarning, stacklevel=4)
    if values[0] < 0:
        raise ConfigError(f"{where}: {labels_name} has a negative label ({int(values[0])}): labels are class "
                          "indices in [0, C)")
    return int(values[1])


# a minimum below this reads as mean/std-normalised input (real images normalised that way reach -0.4 to -2.1);
# a smaller overshoot of [0, 1] is rounding, resampling or noise, which a clamp repairs
NORMALISED_BELOW = -0.1
PIXELS_ABOVE = 1.5  # a maximum above this (and no clearly negative value) reads as 0..255 pixel values


def _check_image_values(x: Tensor, low: float, high: float, *, where: str, name: str) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        index = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0, 0])
        raise ConfigError(f"{where}: {name}[{index}] holds NaN or Inf values: images must be finite; "
                          "remove or repair that image")
    if low < 0 or high > 1:
        if high > PIXELS_ABOVE and low >= NORMALISED_BELOW:
            cause = "it looks like 0..255 pixel values: divide by 255"
        elif low < NORMALISED_BELOW:
            cause = ("it looks mean/std-normalised: give [0, 1] images and put the normalisation inside the model "
                     "(fastrobust models take mean= and std=)")
        else:
            cause = f"a small overshoot of [0, 1] (rounding, resizing or noise): clamp them, {name}.clamp(0, 1)"
        raise ConfigError(f"{where}: {name} has values in [{low:.4g}, {high:.4g}], expected images in [0, 1] "
                          f"(pixel units): {cause}")


def check_batch(x: Tensor, y: Tensor, *, where: str, model: nn.Module | None = None) -> tuple[Tensor, Tensor, int]:
    """A batch at an entry point: ``check_images`` and ``check_labels``, both on one device (and ``model``'s
    parameters on it too), then -- outside ``validated()`` -- their values with one host sync.

    Returns ``(x, y as int64, largest label)``; the largest label is -1 where the values were not checked
    (inside ``validated()``). Compare it with the model's outputs through ``prepare_model``.
    """
    if model is not None:
        check_module(model, where=where)
    x = check_images(x, where=where)
    y = check_labels(y, x.shape[0], where=where)
    if y.device != x.device:
        raise ConfigError(f"{where}: labels are on {y.device} but images on {x.device}: move both to one device")
    first = next(iter(model.parameters()), None) if model is not None else None
    if first is not None and first.device != x.device:
        raise ConfigError(f"{where}: the model is on {first.device} but the images on {x.device}: "
                          f"move the model with model.to({str(x.device)!r}) or the images with x.to(...)")
    if inside_validated():
        return x, y, _NOT_CHECKED
    return x, y, _check_values(x, y, where=where, images_name="x", labels_name="y")


def check_split(images: Tensor, labels: Tensor, *, where: str) -> tuple[Tensor, Tensor, int]:
    """A whole split: images uint8 or float ``[N, C, H, W]`` (float values finite and in [0, 1]), labels ``[N]``
    of any integer dtype, >= 0. Returns ``(images unchanged, labels as int64, largest label)``; one host sync."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"{where}: images {shape} are not a split: expected images [N, C, H, W] "
                          "(uint8, or float in [0, 1])")
    if images.dtype != torch.uint8:
        _check_image_metadata(images, where=where, name="images")
    else:
        _check_channels_first(images, where=where, name="images")
    labels = check_labels(labels, images.shape[0], where=where, name="labels")
    return images, labels, _check_values(images, labels, where=where, images_name="images", labels_name="labels")


def check_first_logits(out: Any, x: Tensor, label_max: int, *, where: str) -> None:
    """The first output of a model at an entry point: logits ``[B, C]`` for the batch ``x`` (``check_logits``: a
    tuple, dict or ``.logits`` object gets the wrapper to write) and, unless ``label_max`` is -1 (checked by an
    enclosing entry point), every label below ``C`` (``check_num_classes``). Metadata only, no host sync."""
    check_logits(out, x, where=where)
    if label_max != _NOT_CHECKED:
        check_num_classes(label_max, out, where=where)


SPLIT_KINDS = ("an ImageSet (.images, .labels), a Dataset (its test split is used), an (images [N, C, H, W], "
               "labels [N]) pair, a list of (image [C, H, W], label) samples, or a list of (images [B, C, H, W], "
               "labels [B]) batches such as list(loader)")


def split_arrays(data: Any, *, where: str) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of the data an evaluation entry point takes, decided by the shapes of its elements (a
    list of two samples, or of two batches, is no ``(images, labels)`` pair): an object with ``.images`` and
    ``.labels`` (ImageSet), one with ``.test`` (Dataset: its test split), a pair whose first element is an array of
    images, a list of ``(image [C, H, W], label)`` samples (stacked) or of ``(images [B, C, H, W], labels [B])``
    batches (concatenated). Arrays may be tensors or numpy arrays; their values are checked by ``check_split``.
    Raises ConfigError listing the accepted kinds for anything else."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and _is_images(data[0]) and _is_labels(data[1]):
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    if hasattr(data, "images") and hasattr(data, "labels"):
        return torch.as_tensor(data.images), torch.as_tensor(data.labels)
    if hasattr(data, "test") and hasattr(data.test, "images"):
        return torch.as_tensor(data.test.images), torch.as_tensor(data.test.labels)
    if isinstance(data, (tuple, list)) and data and all(isinstance(item, (tuple, list)) and len(item) == 2
                                                        for item in data):
        dims = {(_dims(image), _dims(label)) for image, label in data}
        if dims == {(3, 0)}:  # samples, as a Dataset's __getitem__ gives them
            return _joined(data, torch.stack, where=where, what="samples"), torch.stack(
                [torch.as_tensor(label) for _, label in data])
        if dims == {(4, 1)}:  # batches, as a DataLoader gives them
            return _joined(data, torch.cat, where=where, what="batches"), torch.cat(
                [torch.as_tensor(labels) for _, labels in data])
    raise ConfigError(f"{where}: data {_described(data)} is not an image split: give {SPLIT_KINDS}")


def _dims(value: Any) -> int | None:
    """Dimensions of an array (tensor, numpy) or 0 for a Python or numpy integer; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return 0
    ndim = getattr(value, "ndim", None)
    return ndim if isinstance(ndim, int) and hasattr(value, "shape") else None


def _is_images(value: Any) -> bool:
    """An array of at least one dimension (its shape is checked by ``check_split``), not a sample or a batch pair."""
    return (_dims(value) or 0) >= 1


def _is_labels(value: Any) -> bool:
    """Labels: an array of at most 2 dimensions (``[N]``; one-hot ``[N, C]`` and other shapes are refused with their
    fix by ``check_labels``), or a list of numbers (not of samples); never a batch of images."""
    if isinstance(value, (list, tuple)):
        return not value or _dims(value[0]) == 0
    dims = _dims(value)
    return dims is not None and dims <= 2


def _joined(data: Any, join: Callable[[list[Tensor]], Tensor], *, where: str, what: str) -> Tensor:
    """The images of a list of samples or batches, joined; one ConfigError line when their shapes differ."""
    images = [torch.as_tensor(image) for image, _ in data]
    shapes = list(dict.fromkeys(tuple(image.shape[-3:]) for image in images))
    if len(shapes) > 1:
        raise ConfigError(f"{where}: the {what} hold images of different shapes ({list(shapes[0])} and "
                          f"{list(shapes[1])}): resize them to one shape first")
    return join(images)


def _described(data: Any) -> str:
    """``of type X``, and for a list or tuple what its first element holds (``(Tensor [3, 32, 32], int)``)."""
    def one(value: Any) -> str:
        shape = getattr(value, "shape", None)
        return f"{type(value).__name__} {list(shape)}" if shape is not None else type(value).__name__

    if not isinstance(data, (tuple, list)) or not data:
        return f"of type {type(data).__name__}" + (" (empty)" if isinstance(data, (tuple, list)) else "")
    first = data[0]
    inner = f"({', '.join(one(v) for v in first[:3])})" if isinstance(first, (tuple, list)) else one(first)
    return f"of type {type(data).__name__} of {len(data)} elements (the first: {inner})"


def check_num_classes(label_max: int, logits: Tensor, *, where: str) -> None:
    """ConfigError when the model has fewer than 2 outputs (``check_class_count``) or a label is not below its
    number of outputs (no host sync)."""
    check_class_count(logits, where=where)
    classes = logits.shape[-1]
    if label_max >= classes:
        raise ConfigError(f"{where}: label {label_max} is out of range for a model with {classes} outputs: "
                          f"labels must be class indices in [0, {classes}); check the dataset and the model's "
                          "num_classes")


def check_class_count(logits: Tensor, *, where: str) -> None:
    """ConfigError when the logits ``[B, C]`` have fewer than 2 columns: the argmax of one column is always
    class 0, so every label-0 point would count as correct and robust whatever the attack does."""
    classes = logits.shape[-1] if logits.dim() else 0
    if classes < 2:
        hint = ("; a binary classifier with one logit z gives the 2-class logits torch.cat([-z / 2, z / 2], 1) "
                "(same softmax as sigmoid(z))" if classes == 1 else "")
        raise ConfigError(f"{where}: the model returned logits of shape {list(logits.shape)}, {classes} class "
                          f"score(s) per image: fastrobust needs one score per class, C >= 2 (argmax of one "
                          f"column is always class 0, so accuracy would be silently wrong){hint}")


SMALL_L2_EPS = 0.1  # below this an l2 radius on images of >= 100 values is most likely an l_inf budget (8/255)
LARGE_EVEN_CHANGE = 16 / 255  # an l2/l1 ball whose radius, spread evenly, changes every value more: twice 8/255


def eps_size_note(eps: float, norm: str, image_shape: tuple[int, ...], *, linf: str = "norm='linf'") -> str | None:
    """A one-line note when an l2 or l1 ``eps`` is implausible for images of ``image_shape`` (C, H, W), else None
    (and None for l_inf, and for images of fewer than 100 values).

    Too small: an l2 eps below 0.1 looks like an l_inf budget given with the wrong norm (8/255 on CIFAR-10, where
    the usual l2 budget is 0.5, RobustBench's); ``linf`` names the switch to suggest (``--norm linf`` on the
    command line). Too large: the radius spread evenly over the image's d values changes each of them by more
    than 16/255, twice the usual l_inf budget 8/255 (an l2 radius r changes each by r / sqrt(d), an l1 radius by
    r / d): on CIFAR-10 (d = 3072) an l2 eps above 3.5 or an l1 eps above 193, where the attack may change what
    the image shows."""
    values = math.prod(image_shape)
    if norm not in ("l2", "l1") or values < 100:
        return None
    shape = "x".join(str(int(d)) for d in image_shape)
    if norm == "l2" and eps < SMALL_L2_EPS:
        return (f"l2 radius {eps:.3g} is small for {shape} images (an l2 ball of that radius barely changes the "
                f"image, so few points break); the usual CIFAR-10 l2 budget is 0.5 (did you mean {linf}?)")
    even = eps / (math.sqrt(values) if norm == "l2" else values)
    if even <= LARGE_EVEN_CHANGE:
        return None
    return (f"{norm} radius {eps:.3g} is large for {shape} images (spread evenly over its {values} values it "
            f"changes each by {even * 255:.3g}/255, more than 16/255, twice the usual l_inf budget 8/255: the "
            "attack may change what the image shows, so a low robust accuracy says little); the usual CIFAR-10 "
            "budgets are 0.5 for l2 and 12 for l1")


def finite_rows(logits: Tensor) -> Tensor:
    """Per row: every logit finite. A prediction from non-finite logits never counts as correct or robust."""
    return torch.isfinite(logits.flatten(1)).all(1)


def predicts(logits: Tensor, y: Tensor) -> Tensor:
    """Per example: the model predicts ``y`` from finite logits (argmax of NaN logits is meaningless)."""
    return finite_rows(logits) & (logits.argmax(1) == y)


# ----------------------------------------------------------------------------- the model at an entry point
def parameter_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer); None when it has none."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def images_for(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the model's floating dtype (``parameter_dtype``; unchanged for a model without one): the rule of
    every entry point is that float images of any precision (float64 from numpy pipelines) are accepted and the
    model sees them in its own dtype (``CheckedModel`` casts for attacks and evaluations; method losses, which
    train the model itself, take their batch converted here)."""
    dtype = parameter_dtype(model)
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


class ModelError(FastRobustError):
    """The model itself failed during an evaluation: it raised an error, or returned no ``[B, C]`` logits.
    ``detail`` completes "the model ..." (the CLI names the model file there)."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: the model {detail}")
        self.detail = detail


def last_words(error: BaseException) -> str:
    """The informative line of an error: TorchScript and export errors put a code traceback first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if len(lines) > 1 and "Traceback" in lines[0] else lines[0]
    return line.replace("Traceback", "trace")[:240]


def check_module(model: Any, *, where: str) -> None:
    """ConfigError unless ``model`` is an ``nn.Module``: an entry point switches it to eval mode, moves it to the
    data's device and reads its parameters (dtype, device, the evaluation state's fingerprint), which a plain
    function (``lambda x: net(x)[0]``) does not have."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: the model is a {type(model).__name__}, expected a torch.nn.Module (fastrobust "
                          "switches it to eval mode, moves it and reads its parameters): wrap it, e.g. "
                          "class Logits(nn.Module): def __init__(self, net): super().__init__(); self.net = net; "
                          "def forward(self, x): return self.net(x)[0] -- then pass Logits(net) (docs/evaluation.md)")
    baked = [] if _VALIDATED.get() else baked_training_ops(model)  # the outermost entry point has looked
    if baked:

        raise ConfigError(f"{where}: the model holds a program traced in training mode ({describe_training_ops(baked)}: its "
                          "results would depend on the batch or be random) and eval() cannot change a traced "
                          f"module; {TRAINING_MODE_FIX}")


_BAKED: "weakref.WeakKeyDictionary[nn.Module, list[str]]" = weakref.WeakKeyDictionary()


def baked_training_ops(model: nn.Module) -> list[str]:
    """Training-mode operators fixed into the traced TorchScript or exported (FX) modules inside ``model``
    (``torch.jit.trace`` / ``torch.export`` record the mode they ran in; eval() cannot reach them). Each program
    is read once (cached); other modules cost one isinstance check each."""
    found: list[str] = []
    inside: tuple[str, ...] = ()  # programs already read: their submodules are part of their graph
    for name, module in model.named_modules():
        if inside and any(name.startswith(prefix) for prefix in inside):
            continue
        is_script = isinstance(module, torch.jit.ScriptModule)
        if not is_script and not isinstance(module, torch.fx.GraphModule):
            continue
        inside += (f"{name}." if name else "",)
        ops = _BAKED.get(module)
        if ops is None:

            ops = torchscript_mode_ops(module)[0] if is_script else export_training_ops(module.graph)
            try:
                _BAKED[module] = ops
            except TypeError:  # not weak-referenceable
                pass
        found += ops
    return found


def not_logits(out: Any) -> str | None:
    """What is wrong with a model output that is no tensor (a tuple, a dict, an object with ``.logits`` such as a
    transformer's output), completing "the model ...", with the wrapper to write; None for a tensor."""
    if isinstance(out, Tensor):
        return None
    if isinstance(out, dict):  # also transformers' ModelOutput, a dict with attribute access
        keys = list(out)
        key = "logits" if "logits" in keys else (keys[0] if keys else None)
        pick = f"[{key!r}]" if key is not None else "['logits']"
        example = f"e.g. model(x){pick}; its keys are {keys}"
    elif isinstance(getattr(out, "logits", None), Tensor):
        pick = ".logits"
        example = "e.g. model(x).logits"
    else:
        pick = "[0]"
        example = "e.g. model(x)[0]"
    return (f"returned a {type(out).__name__}; fastrobust needs logits [B, C]: wrap it in a module whose forward "
            f"returns the logits tensor alone ({example}): class Logits(nn.Module): def __init__(self, net): "
            f"super().__init__(); self.net = net; def forward(self, x): return self.net(x){pick} -- then pass "
            "Logits(model)")


def check_logits(out: Any, x: Tensor, *, where: str) -> None:
    """ModelError unless the model's output for the batch ``x`` is a logits tensor ``[B, C]`` with ``C >= 2``
    (metadata only); an output that is no tensor gets the wrapper to write (``not_logits``)."""
    problem = not_logits(out)
    if problem is not None:
        raise ModelError(where, problem)
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ModelError(where, f"returned shape {list(out.shape)} for a batch of {x.shape[0]} images: expected "
                                f"logits [{x.shape[0]}, C], one row of class scores per image")
    check_class_count(out, where=where)


class CheckedModel(nn.Module):
    """``model`` as an entry point hands it to the attack: inputs cast to its parameter dtype ``dtype`` (logits
    returned as float32, gradients flow through the cast) and, until the first output, the largest label
    compared with the number of outputs. With ``guard`` (evaluations), an error raised by the model becomes one
    ``ModelError`` line naming the batch shape and the cause, and every output must be logits ``[B, C]``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, label_max: int, where: str,
                 guard: bool = False) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.label_max = label_max
        self.where = where
        self.guard = guard

    def forward(self, x: Tensor) -> Tensor:
        out = self._guarded(x) if self.guard else self.model(x if self.dtype is None else x.to(self.dtype))
        if self.label_max != _NOT_CHECKED:
            check_first_logits(out, x, self.label_max, where=self.where)
            self.label_max = _NOT_CHECKED
        return out if self.dtype is None else out.float()

    def _guarded(self, x: Tensor) -> Tensor:
        try:
            out = self.model(x if self.dtype is None else x.to(self.dtype))
        except FastRobustError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of the model itself: one line with the cause
            hint = "; lower the batch size" if isinstance(error, torch.cuda.OutOfMemoryError) else ""
            fixed = re.search(r"Guard failed: \S*size\(\)\[0\] == (\d+)", str(error))
            if fixed and isinstance(self.model, torch.fx.GraphModule):
                hint = (f"; an exported program fixed to batches of {fixed.group(1)}: export it with a dynamic batch "
                        "dimension (dynamic_shapes with torch.export.Dim), or save it (torch.export.save) and load the "
                        "file with fastrobust.models.thirdparty.load_model, which runs it in chunks of that size")
            raise ModelError(self.where, f"fails on a batch of images {list(x.shape)} "
                                         f"({type(error).__name__}: {last_words(error)}){hint}") from error
        check_logits(out, x, where=self.where)
        return out


def prepare_model(model: nn.Module, label_max: int = _NOT_CHECKED, where: str = "model",
                  input_dtype: torch.dtype = torch.float32, guard: bool = False) -> nn.Module:
    """``model`` itself when its weights have the inputs' dtype (or it has none), no label range is left to
    check and no ``guard`` is asked for, else a ``CheckedModel`` around it. Refuses parameter dtypes other than
    float16/bfloat16/float32/float64 and models that are no ``nn.Module``."""
    check_module(model, where=where)
    if isinstance(model, CheckedModel):  # prepared by an enclosing entry point (its label check may be pending)
        if label_max == _NOT_CHECKED and (model.guard or not guard):
            return model
        guard = guard or model.guard
        model = model.model
    dtype = parameter_dtype(model)
    if dtype not in (None, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ConfigError(f"{where}: the model's parameters have dtype {dtype}: give a float32, float16, bfloat16 "
                          "or float64 model (model.float() converts it)")
    cast = None if dtype in (None, input_dtype) else dtype
    if cast is None and label_max == _NOT_CHECKED and not guard:
        return model
    return CheckedModel(model, cast, label_max, where, guard)


def fastrobust_config(model: nn.Module) -> dict[str, Any] | None:
    """The ``fastrobust_config`` of a fastrobust model, also through the wrappers that pass the input on unchanged
    (CheckedModel, CountedModel, DataParallel/DDP, torch.compile); None for any other module."""
    for _ in range(8):
        config = getattr(model, "fastrobust_config", None)
        if isinstance(config, dict):
            return config
        if isinstance(model, (CheckedModel, CountedModel)):
            model = model.model
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return None
    return None


def check_model_images(model: nn.Module, image_shape: tuple[int, ...], *, where: str) -> None:
    """ConfigError when a fastrobust model was built for other images than ``image_shape`` (C, H, W): a
    1-channel image on an RGB model would otherwise be broadcast to 3 channels by its mean/std and evaluated
    silently wrong. Other modules are checked by their output (``check_logits``). A model that is no
    ``nn.Module`` is refused (``check_module``)."""
    check_module(model, where=where)
    config = fastrobust_config(model)
    if config is None or len(image_shape) != 3:
        return
    channels, size = config.get("in_channels"), config.get("image_size")
    if channels is not None and int(channels) != image_shape[0]:
        raise ConfigError(f"{where}: the images have {image_shape[0]} channel(s) {list(image_shape)} but the model "
                          f"({config.get('name')}) takes in_channels={channels}: give it the images it was built for "
                          "(or build the model for these)")
    if size is not None and tuple(image_shape[1:]) != (int(size), int(size)):
        raise ConfigError(f"{where}: the images are {image_shape[1]}x{image_shape[2]} but the model "
                          f"({config.get('name')}) was built for {size}x{size} images (image_size={size}): give it the "
                          "images it was built for (or build the model for these)")


def check_device(device: Any, *, where: str | None, fix: str = "device='cpu'",
                 names: str = "cpu, cuda or cuda:N") -> torch.device:
    """``device`` as a torch.device; a ConfigError (prefixed with ``where``, naming ``fix``) for a name torch does
    not know or a CUDA device on a machine without one (torch's own AssertionError says "Torch not compiled with
    CUDA enabled" from deep inside)."""
    prefix = f"{where}: " if where else ""
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{prefix}device={device!r} is not a device: use {names}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{prefix}device={device!r} asked for CUDA but no GPU is visible: use {fix}")
    return resolved


def check_gradients_allowed(where: str) -> None:
    """ConfigError inside ``torch.inference_mode()``: an attack needs input gradients, which that mode forbids for
    good (unlike ``torch.no_grad()``, which the attacks lift themselves)."""
    if torch.is_inference_mode_enabled():
        raise ConfigError(f"{where}: called inside torch.inference_mode(), which forbids the input gradients an "
                          "attack needs: call it outside that block (torch.no_grad() around it is fine)")


def entry_point(where: str, *, gradients: bool = True, norms: tuple[str, ...] = GRADIENT_NORMS) -> Callable[[F], F]:
    """Decorator of a public ``fn(model, x, y, ...)``: refuses ``torch.inference_mode()`` unless the function
    needs no ``gradients``, checks its keyword settings (``attack_options``; ``norm`` one of ``norms``, the threat
    models it supports, also readable as ``fn.norms``), the batch (values once, outside ``validated()``), hands
    ``fn`` the model through ``prepare_model`` and runs it inside ``validated()``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(model: nn.Module, x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Any:
            if gradients:
                check_gradients_allowed(where)
            if "norm" in kwargs:
                check_norm(kwargs["norm"], allowed=norms, where=where)
            kwargs = check_options(where, kwargs, norm=kwargs.get("norm", "linf"))
            x, y, label_max = check_batch(x, y, where=where, model=model)
            model = prepare_model(model, label_max, where, x.dtype)
            with validated():
                return fn(model, x, y, *args, **kwargs)

        run.norms = norms  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate
