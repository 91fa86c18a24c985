"""Scan a traced program's graph (TorchScript or torch.export) for operators that run in training mode.

``torch.jit.trace`` and ``torch.export.export`` record the mode a model ran in: a program traced in training
mode runs its batch norms on batch statistics and its dropouts at random forever, and ``eval()`` cannot change
that. The input contract refuses such a program wherever it appears in a model; the loaders refuse its file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_MODE_ARGS = ("training", "train")  # the schema's name of the mode flag: batch_norm & co, dropout & co, rrelu
_ALWAYS_TRAINING = ("_batch_norm_with_update",)  # the batch-norm op torch.export records in training mode
TRAINING_MODE_FIX = "save it again after model.eval() (torch.jit.trace / torch.export.export record the mode they run in)"


def _training_op(name: str, values: dict[str, Any]) -> bool:
    """Whether an operator call ``name`` with the (constant) arguments ``values`` runs in training mode: batch
    statistics for a batch norm, random masks for a dropout of ``p > 0``. A non-constant flag is absent."""
    if any(op in name for op in _ALWAYS_TRAINING):
        return True
    flag = next((values[key] for key in _MODE_ARGS if key in values), None)
    if flag is not True:
        return False
    if "norm" in name and ("no_stats" in name or ("running_mean" in values and values["running_mean"] is None)):
        return False  # a norm without running statistics (track_running_stats=False) uses the batch in eval mode too
    p = values.get("p")
    return not (isinstance(p, (int, float)) and p == 0)


def describe_training_ops(ops: Iterable[str]) -> str:
    kinds = sorted({"dropout" if "drop" in op else "batch norm with batch statistics" if "norm" in op else op
                    for op in ops})
    return ", ".join(kinds)


def export_training_ops(graph: Any) -> list[str]:
    """Operators of a ``torch.export`` (FX) graph that run in training mode (see :func:`_training_op`)."""
    found = []
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        values = {arg.name: node.kwargs.get(arg.name, node.args[i] if i < len(node.args) else arg.default_value)
                  for i, arg in enumerate(schema.arguments)}
        if _training_op(str(node.target), values):
            found.append(str(node.target))
    return found


def torchscript_mode_ops(module: Any) -> tuple[list[str], list[str]]:
    """Operators of a TorchScript module that have a training flag: ``(fixed, switchable)``, those whose flag is a
    constant True (a module traced in training mode: ``eval()`` does not change them) and those reading the
    module's mode (a scripted module's ``self.training``)."""
    fixed, switchable = [], []
    for node in module.inlined_graph.nodes():
        if not node.kind().startswith("aten::"):
            continue
        try:
            arguments = torch._C.parse_schema(node.schema()).arguments
        except RuntimeError:  # "(no schema)"
            continue
        inputs = {arg.name: value for arg, value in zip(arguments, node.inputs()) if arg.name in _MODE_ARGS + ("p",)}
        values = {name: value.toIValue() for name, value in inputs.items()}
        stats = next((value for arg, value in zip(arguments, node.inputs()) if arg.name == "running_mean"), None)
        if stats is not None:  # a tensor that is not a constant reads as None through toIValue: look at its type
            values["running_mean"] = None if str(stats.type()) == "NoneType" else "tensor"
        if _training_op(node.kind(), values):
            fixed.append(node.kind())
        elif any(key in inputs and values[key] is None for key in _MODE_ARGS):
            switchable.append(node.kind())
    return fixed, switchable
