"""Forward and backward passes of a model, counted at its call: what an evaluation cost, the same way for every
attack.

``CountedModel(model)`` adds the rows of every batch it is called on to ``count.forward`` and, when the output
takes part in autograd, registers a hook on the output that adds the rows of the gradient flowing back through it
to ``count.backward`` (one backward pass of the model per row, whatever the loss behind it). The counts are Python
ints read from shapes, which are known without a host synchronisation, so counting never stalls a GPU. A pass of
a stand-in of the model (a frozen TorchScript copy an attack evaluates instead, ``attacks/_frozen.py``) is a pass
of the model: ``count_like`` wraps the stand-in with the same counter. While the model is traced (the frozen copies
are made by ``torch.jit.trace``) or compiled (``torch.compile`` of a counted model, ``attacks/_compiled.py``) nothing
is counted: tracing is not an evaluation, and the compiled copy is counted at its own call, outside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class PassCount:
    """Rows evaluated so far: ``forward`` (rows through the model) and ``backward`` (rows of gradient back
    through it). With ``calls`` a dict (``PassCount(calls={})``), also how many calls of each batch size:
    ``calls[("forward", rows)]`` and ``calls[("backward", rows)]`` (what the cost of an evaluation at each batch
    size multiplies: ``benchmarks/eval_limit.py``); None (default) keeps no such log."""

    forward: int = 0
    backward: int = 0
    calls: dict[tuple[str, int], int] | None = field(default=None)

    def log(self, kind: str, rows: int) -> None:
        if self.calls is not None:
            self.calls[(kind, rows)] = self.calls.get((kind, rows), 0) + 1

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.backward

    def since(self, before: tuple[int, int]) -> dict[str, int]:
        """The passes counted since ``before`` (a ``snapshot``)."""
        return {"forward": self.forward - before[0], "backward": self.backward - before[1]}


class CountedModel(nn.Module):
    """``model`` whose forward and backward passes are counted in ``count`` (a new ``PassCount`` by default);
    the output is ``model``'s own, unchanged."""

    def __init__(self, model: nn.Module, count: PassCount | None = None) -> None:
        super().__init__()
        self.model = model
        self.count = count if count is not None else PassCount()

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return out
        rows = x.shape[0] if x.dim() else 1
        self.count.forward += rows
        self.count.log("forward", rows)
        if isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad: Tensor) -> None:
        rows = grad.shape[0] if grad.dim() else 1
        self.count.backward += rows
        self.count.log("backward", rows)


def pass_count(model: nn.Module) -> PassCount | None:
    """The counter of the first ``CountedModel`` inside ``model`` (None when its passes are not counted)."""
    for module in model.modules():
        if isinstance(module, CountedModel):
            return module.count
    return None


def count_like(model: nn.Module, stand_in: nn.Module | None) -> nn.Module | None:
    """``stand_in`` (a copy evaluated instead of ``model``) counted in ``model``'s counter, when ``model``'s passes
    are counted; else ``stand_in`` itself (also None)."""
    count = pass_count(model)
    if stand_in is None or count is None:
        return stand_in
    return CountedModel(stand_in, count)


__all__ = ["CountedModel", "PassCount", "count_like", "pass_count"]
