"""Frozen TorchScript copies of a model for the attacks' many evaluations (a CPU speed-up).

``torch.jit.trace`` + ``torch.jit.freeze`` inline the weights and fold eval-mode BatchNorm into the
preceding convolutions (a copy for input gradients); ``torch.jit.optimize_for_inference`` further fuses
activations and pre-packs the oneDNN weights (a copy for gradient-free queries, which cannot back-propagate).
Measured on one CPU thread (tinycnn, batches of 7-45): queries 1.8-2.4x faster, forward+backward 1.4x;
on PreActResNet-18 little (+13% on queries), its time being in large convolutions.

The copies compute the model's function up to float rounding (about 1e-7 here), so an attack using them
follows the same trajectories except where two candidates tie to that precision. They are only used behind
the attacks' confirmation: a point stops (counts as broken) only once the model itself, in fp32, misclassifies
its adversarial, and AutoAttack's and evaluate's final flags come from the model. A copy is refused, and the
model used as it is, when tracing fails or warns (data-dependent Python control flow), when the model is in
train mode or its parameters are not float32, or when the copies' logits (on the batch and on one point) or
input gradients differ from the model's beyond rounding. TorchScript is deprecated from torch 2.9 on; when
it goes, the copies are refused and the attacks simply run on the model (same results, slower).
"""

from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_TOLERANCE = 1e-4     # relative to max(1, max |logit|)
GRADIENT_TOLERANCE = 1e-3  # relative l2 difference of the input gradient of the cross-entropy


class FrozenCopies(NamedTuple):
    grad_model: nn.Module | None
    query_model: nn.Module | None
    note: str


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, FrozenCopies]]" = weakref.WeakKeyDictionary()


def _token(model: nn.Module, x: Tensor) -> tuple:
    """Changes whenever a parameter or buffer is replaced or updated in place, or the mode changes."""
    tensors = list(model.parameters()) + list(model.buffers())
    return (tuple((t.data_ptr(), t._version, t.dtype) for t in tensors),
            tuple(m.training for m in model.modules()), x.device.type, x.dtype, tuple(x.shape[1:]))


def frozen_copies(model: nn.Module, x: Tensor, y: Tensor) -> FrozenCopies:
    """Frozen copies of ``model`` checked on the batch ``(x, y)``, or ``(None, None, reason)``; cached per
    model until its weights or mode change."""
    token = _token(model, x)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == token:
        return cached[1]
    copies = _build(model, x, y)
    try:
        _CACHE[model] = (token, copies)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return copies


def _build(model: nn.Module, x: Tensor, y: Tensor) -> FrozenCopies:
    if any(m.training for m in model.modules()):
        return FrozenCopies(None, None, "not frozen: the model is in train mode")
    if any(p.dtype != torch.float32 for p in model.parameters()) or x.dtype != torch.float32:
        return FrozenCopies(None, None, "not frozen: the model or the data is not float32")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+ marks TorchScript deprecated
            warnings.simplefilter("error", torch.jit.TracerWarning)
            with torch.no_grad():
                traced = torch.jit.trace(model, x, check_trace=False)
                grad_model = torch.jit.freeze(traced)
                query_model = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as error:  # tracing is best effort: the model itself always works
        return FrozenCopies(None, None, f"not frozen: tracing failed ({type(error).__name__}: {str(error)[:120]})")
    problem = _disagreement(model, grad_model, query_model, x, y)
    if problem:
        return FrozenCopies(None, None, f"not frozen: {problem}")
    return FrozenCopies(grad_model, query_model, "frozen TorchScript copies (BatchNorm folded)")


def _disagreement(model: nn.Module, grad_model: nn.Module, query_model: nn.Module, x: Tensor, y: Tensor) -> str:
    with torch.no_grad():
        for batch in (x, x[:1]):
            reference = model(batch)
            scale = max(1.0, float(reference.abs().max()))
            for name, copy in (("gradient", grad_model), ("query", query_model)):
                out = copy(batch)
                if out.shape != reference.shape or float((out - reference).abs().max()) > LOGIT_TOLERANCE * scale:
                    return f"the {name} copy's logits differ from the model's"
    grads = []
    for net in (model, grad_model):
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(net(xr).float(), y), xr)
        grads.append(grad)
    if float((grads[0] - grads[1]).norm()) > GRADIENT_TOLERANCE * float(grads[0].norm()) + 1e-12:
        return "the gradient copy's input gradients differ from the model's"
    return ""
