"""Programs that carry their own architecture: TorchScript archives and ``torch.export`` programs (``.pt2``),
loaded without unpickling Python objects (docs/evaluation.md, "Evaluate a model you did not train here").

- ``torch.jit.load`` reads an archive's pickles with TorchScript's own C++ unpickler, which builds only tensors,
  containers and TorchScript classes compiled from the archive's ``code/`` (a Python global such as
  ``posix.system`` is an unknown type name); the archive's TorchScript code runs when the model does.
- ``torch.export.load`` alone is not safe: it falls back to ``torch.load(weights_only=False)`` for pickled
  payloads, calls ``pickle.loads`` for opaque constants, loads compiled AOTInductor libraries, turns the graph's
  call targets into Python attributes (``torch.serialization.os.system`` resolves), parses symbolic shapes
  with sympy (which evaluates) and compiles ``guards_code`` into Python. :func:`check_export_archive` refuses
  the last four kinds of content before loading, and :func:`load_export` forces every ``torch.load`` to
  ``weights_only=True`` and refuses ``pickle.loads`` while it loads.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from fastrobust.core.filekind import not_a_checkpoint
from fastrobust.core.traced import TRAINING_MODE_FIX, describe_training_ops, export_training_ops, torchscript_mode_ops
from fastrobust.errors import FastRobustError
from fastrobust.models.checkpoint import load_failure_reason


class FixedMode(nn.Module):
    """Holds a program in eval mode: ``train()``/``eval()`` do not reach it (an exported program refuses them;
    the loaders switch a TorchScript archive to eval mode and refuse a program whose training mode is baked in)."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> "FixedMode":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


class FixedBatch(nn.Module):
    """A program exported for exactly ``batch`` images (no dynamic batch dimension), run on any batch: the images
    are cut into chunks of ``batch``, the last padded with black images whose logits are dropped. In eval mode each
    image's logits do not depend on the others in its batch, so the result is the program's on every image."""

    def __init__(self, program: nn.Module, batch: int):
        super().__init__()
        self.program = program
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.batch:
            return self.program(x)
        out = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start:start + self.batch]
            short = self.batch - chunk.shape[0]
            if short:
                chunk = torch.cat([chunk, chunk.new_zeros(short, *chunk.shape[1:])])
            out.append(self.program(chunk)[:self.batch - short])
        return torch.cat(out)


def static_batch(program: Any) -> int | None:
    """The batch size an exported program is fixed to (its input's first dimension is a number, not a symbol,
    because it was exported without ``dynamic_shapes``); None when that dimension is dynamic or unknown."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            return int(shape[0]) if shape is not None and len(shape) == 4 and type(shape[0]) is int else None
    return None


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# --------------------------------------------------------------------------- torch.export programs
_TARGET = re.compile(r"^(torch\.ops\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){1,2}|_operator\.[a-z_]+|"
                     r"math\.[a-z_0-9]+|torch\._?sym_[a-z_]+)$")
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|(\d+(?:\.\d*)?(?:e[+-]?\d+)?)|('[A-Za-z_][A-Za-z0-9_]*')|"
                         r"(\*\*|//|==|!=|<=|>=|[-+*/%(),<>=]))")
_EXPR_NAMES = {"Symbol", "Integer", "Rational", "Float", "True", "False", "oo", "zoo", "nan", "positive", "integer",
               "nonnegative", "real", "finite", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And",
               "Or", "Not", "Max", "Min", "Mod", "sqrt", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "IntTrueDiv",
               "FloatTrueDiv", "ToFloat", "TruncToInt", "TruncToFloat", "RoundToInt", "RoundDecimal", "PowByNatural",
               "FloatPow", "ModularIndexing", "Where", "CeilToInt", "FloorToInt", "Identity", "int_oo",
               "IsNonOverlappingAndDenseIndicator"}


def _safe_expression(text: str) -> bool:
    """Symbols, numbers, arithmetic and sympy's shape functions only (torch.export parses it with sympy)."""
    position = 0
    while position < len(text):
        token = _EXPR_TOKEN.match(text, position)
        if token is None or token.end() == position:
            return text[position:].strip() == ""
        name = token.group(1)
        if name is not None and name not in _EXPR_NAMES and not re.fullmatch(r"[a-z]+\d+", name):
            return False
        position = token.end()
    return True


def check_export_archive(path: Path) -> None:
    """Refuse a .pt2 archive whose loading or running would run code beyond torch operators (see the module doc)."""
    refuse = f"refused to load {path} (a torch.export program): "
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            programs = {name: archive.read(name) for name in names
                        if name.split("/", 1)[-1].startswith("models/") and name.endswith(".json")}
    except (zipfile.BadZipFile, OSError) as error:
        raise FastRobustError(not_a_checkpoint(path) or f"cannot read {path}: {error}") from None
    for name in names:
        leaf = name.split("/", 1)[-1]
        if leaf.startswith("data/aotinductor/"):
            raise FastRobustError(refuse + "it holds compiled AOTInductor code (native libraries that would be loaded)")
        if leaf.startswith("serialized_"):
            raise FastRobustError(refuse + "it is in the format of PyTorch <= 2.7, whose loader unpickles Python "
                                  "objects; export it again with torch.export.save")
    if not programs:
        raise FastRobustError(f"{path} holds no exported program (models/*.json)")
    for name, blob in programs.items():
        try:
            program = json.loads(blob)
        except ValueError as error:
            raise FastRobustError(f"{path}: {name} is not valid JSON ({error})") from None
        if program.get("guards_code"):
            raise FastRobustError(refuse + "it carries Python guard code, which would run")
        problem = _unsafe_node(program)
        if problem:
            raise FastRobustError(refuse + problem)


def _unsafe_node(node: Any) -> str | None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "target" and isinstance(value, str) and not _TARGET.match(value):
                    return f"its graph calls {value!r}, which is not a torch operator"
                if key == "expr_str" and isinstance(value, str) and not _safe_expression(value):
                    return f"a symbolic shape expression is not plain arithmetic: {value[:80]!r}"
                if key == "range_constraints" and isinstance(value, dict):
                    bad = [k for k in value if not _safe_expression(k)]
                    if bad:
                        return f"a range constraint names {bad[0][:80]!r}"
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return None


class _PickleRefused(Exception):
    pass


def _refuse_pickle(*_args, **_kwargs):
    raise _PickleRefused("it holds a pickled Python object (an opaque or custom constant)")


def load_export(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """``torch.export.load`` with every ``torch.load`` forced to ``weights_only=True`` and ``pickle.loads``
    refused, after :func:`check_export_archive`; returns the program as a module (its mode fixed). A program
    exported for one fixed batch size runs on any batch through ``FixedBatch``.

    Args:
        path: the ``.pt2`` archive.
        device: where the program will run (default the CPU). A program is moved there with torch's own
            ``torch.export.passes.move_to_device_pass``, which also rewrites the device arguments baked into its
            graph (``torch.arange(n, device=x.device)`` traced on the CPU says ``cpu``); ``module.to(device)``
            moves only parameters and buffers, and such a program then fails with a cross-device error.
    Returns:
        The program as an ``nn.Module`` on ``device``.
    Raises:
        FastRobustError: the archive is refused, damaged, or was exported in training mode.
    """

    import torch.export.pt2_archive._package as package  # optional: torch's private archive reader

    check_export_archive(path)
    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    class NoPickle:  # stands in for the pickle module inside torch's .pt2 reader
        loads = staticmethod(_refuse_pickle)
        load = staticmethod(_refuse_pickle)

    try:
        with ExitStack() as stack:
            stack.enter_context(mock.patch.object(torch, "load", weights_only_load))
            stack.enter_context(mock.patch.object(package, "pickle", NoPickle))
            stack.enter_context(mock.patch.object(torch._C, "_pickle_load_obj", _refuse_pickle))
            program = torch.export.load(str(path))
    except (_PickleRefused, pickle.UnpicklingError) as error:
        raise FastRobustError(f"refused to load {path} (a torch.export program): {load_failure_reason(error)[:200]}; only "
                              "tensors are unpickled (weights_only=True), nothing in the file was run") from None
    except Exception as error:  # noqa: BLE001 - version mismatch, damaged archive
        raise FastRobustError(f"cannot load {path} as a torch.export program ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]})") from None
    training = export_training_ops(program.graph)
    if training:
        raise FastRobustError(f"refused to evaluate {path}: the torch.export program was exported in training mode "
                              f"({describe_training_ops(training)}: its results would depend on the batch or be random) and "
                              f"an exported program cannot be switched to eval mode; {TRAINING_MODE_FIX}")
    if torch.device(device) != torch.device("cpu"):
        program = move_to_device_pass(program, torch.device(device))
    batch = static_batch(program)
    module = program.module() if batch is None else FixedBatch(program.module(), batch)
    return FixedMode(module)


_CROSS_DEVICE = re.compile(r"same device|expected device|found at least two devices|to be on .* device|"
                           r"device type .* but got", re.IGNORECASE)


def cross_device_reason(error: BaseException, path: Path, device: str | torch.device) -> str | None:
    """The line that explains a TorchScript program failing on ``device`` with a cross-device error, else None.

    TorchScript bakes the device of every tensor its code creates (``torch.arange(n, device=x.device)`` traced
    on the CPU says ``cpu``) into the program; ``torch.jit.load(map_location=...)`` and ``.to(device)`` move
    its parameters and buffers only, and TorchScript has no pass that rewrites the rest.
    """
    lines = [line.strip() for line in str(error).splitlines() if _CROSS_DEVICE.search(line)]
    if not lines:
        return None
    torch_says = re.sub(r"^(\w*Error: )+", "", lines[-1])[:200]  # the interpreter repeats the exception's name
    return (f"{path} (a TorchScript program) cannot run on {device}: its code creates tensors on the device it was "
            f"traced on (a device baked into the program; .to() moves only parameters and buffers): "
            f"{torch_says}; trace or script it again with the model on {device}, save it with "
            "torch.export instead (fastrobust moves an exported program with torch.export.passes."
            "move_to_device_pass), or evaluate it on the device it was traced on")


def load_torchscript(path: Path, note: Callable[[str], None] = _say) -> nn.Module:
    """``torch.jit.load`` on the CPU (see the module docstring for what it unpickles and runs), switched to eval
    mode (said through ``note`` when it was saved in training mode). A module traced in training mode (its
    batch norms or dropouts fixed to training) is refused: ``eval()`` cannot reach it."""
    try:
        program = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - damaged archive, unknown operators
        raise FastRobustError(not_a_checkpoint(path) or f"cannot load {path} as a TorchScript archive "
                              f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from None
    was_training = any(module.training for module in program.modules())
    program.eval()
    training, switched = torchscript_mode_ops(program)
    if training:
        raise FastRobustError(f"refused to evaluate {path}: the TorchScript program was traced in training mode "
                              f"({describe_training_ops(training)}: its results would depend on the batch or be random) and "
                              f"eval() cannot change a traced module; {TRAINING_MODE_FIX}")
    if was_training and switched:
        note(f"{path}: the TorchScript program was saved in training mode: switched to eval mode (batch norms use "
             "their running statistics, dropout is off)")
    return FixedMode(program)
