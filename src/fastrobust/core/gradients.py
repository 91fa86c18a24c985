"""Gradients for attacks and checks: an input the output does not depend on gets a zero gradient.

A model whose logits have no autograd path to its input (bit-depth reduction ``(x > 0.5).float()``, an
``x.detach()`` or a ``torch.no_grad()`` input transform, logits rebuilt from numpy) is a valid model, and the
classic gradient-masking defence. ``torch.autograd.grad`` raises on it ("... appears to not have been used in
the graph", or "element 0 of tensors does not require grad" when the logits have no ``grad_fn`` at all); every
gradient an attack, a sanity check or a training method's attack takes goes through :func:`grad_or_zeros`
instead, so such a model gets the gradient its function has almost everywhere, zero: gradient attacks make no
progress from it (as with NaN entries, which also count 0), gradient-free attacks still work, and
``sanity_checks``' ``gradients`` check reports it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def grad_or_zeros(output: Tensor, inputs: Sequence[Tensor], grad_outputs: Tensor | None = None, *,
                  create_graph: bool = False, retain_graph: bool | None = None) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(output, inputs, grad_outputs, create_graph=...)``, with a zero tensor (shape, dtype
    and layout of the input) for every input that ``output`` does not depend on through autograd, also when
    ``output`` does not require grad at all. Never accumulates into ``.grad``; no host synchronisation.
    ``retain_graph``: keep the graph for another gradient of the same forward (FAB's per-logit gradients)."""
    inputs = list(inputs)
    if not output.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(output, inputs, grad_outputs=grad_outputs, create_graph=create_graph,
                               retain_graph=retain_graph, allow_unused=True, materialize_grads=True)


__all__ = ["grad_or_zeros"]
