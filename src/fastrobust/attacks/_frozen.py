"""Frozen TorchScript copies of a model for the attacks' many evaluations (a CPU speed-up).

``torch.jit.trace`` + ``torch.jit.freeze`` inline the weights and fold eval-mode BatchNorm into the
preceding convolutions. The copy for input gradients is traced from a channels-last copy of the model: oneDNN's
input-gradient kernels of strided convolutions are much faster in that layout (tinycnn, one CPU thread,
interleaved: forward+backward 1.14-1.20x faster than the contiguous frozen copy; the stride-2 layers' input
gradient 1.3-3.7x, batch 32); its gradients are handed back contiguous. The copy for gradient-free queries is
``torch.jit.optimize_for_inference`` of the frozen model (activations fused into the oneDNN convolutions,
weights pre-packed) when that keeps the whole network in oneDNN's layout, as with ReLU; when an activation
oneDNN cannot fuse (SiLU, ...) would make it convert layouts around every convolution, the frozen
channels-last copy is used instead (SiLU tinycnn: 77-86 vs 92-100 us per image at batches 16 and 64).
Measured before these layouts (tinycnn, batches of 7-45): queries 1.8-2.4x faster than the model, forward+backward
1.4x; on PreActResNet-18 little (+13% on queries), its time being in large convolutions.

The copies compute the model's function up to float rounding (about 1e-7 here), so an attack using them
follows the same trajectories except where two candidates tie to that precision. They are only used behind
the attacks' confirmation: a point stops (counts as broken) only once the model itself, in fp32, misclassifies
its adversarial, and AutoAttack's and evaluate's final flags come from the model. A copy is refused, and the
model used as it is, when tracing fails or warns (data-dependent Python control flow), when the model is in
train mode or its parameters are not float32, or when the copies' logits (on the batch, on one point and on the
batch with a row repeated: a trace can fix the batch size, e.g. by unrolling a loop over the rows) or input
gradients differ from the model's beyond rounding, or a copy fails on one of those batches. A model without an
input gradient (its logits do not depend differentiably on the input) gets copies only when theirs is zero too.
TorchScript is deprecated from torch 2.9 on; when it goes, the copies are refused and the attacks simply run on
the model (same results, slower).

The gradient copy evaluates a large batch in slices (one autograd graph; the copies are row-wise, as the check
above shows). A forward+backward over many rows holds every layer's activation at once, in allocations that glibc's
malloc serves with fresh ``mmap`` pages the kernel faults in and zeroes at every call. ``benchmarks/gradient_slices.py``
(tinycnn, one thread, whole and sliced interleaved): whole batches of 1,000 rows cost 245, 668 and 2,263 us per row
at widths 16, 32 and 64 against 183, 542 and 1,893 us in slices (0.75-0.84x); below the step the two are equal
(0.98-1.02x). The step comes past 16-48 MiB of the largest activation of a call (32, 64, 128 KiB per row at those
widths; where exactly moves with the process's allocator history between runs), and with glibc told to keep freed
memory it vanishes up to its 32 MiB mmap ceiling. Forwards alone show no such step (their activations live one layer
at a time). So a slice holds at most ``SLICE_BYTES`` of its largest activation (measured once on one row).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastrobust.core.gradients import grad_or_zeros
from fastrobust.core.passes import count_like

LOGIT_TOLERANCE = 1e-4     # relative to max(1, max |logit|)
SLICE_BYTES = 12 << 20     # the gradient copy's largest activation per slice (the step: past 16-48 MiB)
MIN_SLICE_ROWS = 16        # a floor for models with very large activations (not measured: smaller slices, more calls)
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
        return _counted(model, cached[1])
    copies = _build(model, x, y)
    try:
        _CACHE[model] = (token, copies)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return _counted(model, copies)


def _counted(model: nn.Module, copies: FrozenCopies) -> FrozenCopies:
    """The copies' passes counted as the model's (``core.passes``): a copy evaluated instead of the model is an
    evaluation of the model."""
    return copies._replace(grad_model=count_like(model, copies.grad_model),
                           query_model=count_like(model, copies.query_model))


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
                traced = torch.jit.trace(model, x, check_trace=False)  # freeze copies it: one trace serves both
                frozen, layout = _frozen_channels_last(model, x), "channels-last"
                if frozen is None:
                    frozen, layout = torch.jit.freeze(traced), "contiguous"
                optimized = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as error:  # tracing is best effort: the model itself always works
        return FrozenCopies(None, None, f"not frozen: tracing failed ({type(error).__name__}: {str(error)[:120]})")
    grad_model = ContiguousGradients(frozen, rows=_slice_rows(model, x))
    query_model, query_kind = ((optimized, "fused oneDNN") if _stays_in_onednn(optimized) else (frozen, layout))
    problem = _disagreement(model, grad_model, query_model, x, y)
    if problem:
        return FrozenCopies(None, None, f"not frozen: {problem}")
    return FrozenCopies(grad_model, query_model,
                        f"frozen TorchScript copies (BatchNorm folded; {query_kind} queries, {layout} gradients)")


def _frozen_channels_last(model: nn.Module, x: Tensor) -> torch.jit.ScriptModule | None:
    """The frozen trace of a channels-last deep copy of the model, or None when the model cannot be copied (a
    module holding a lock or an open file) or its copy not traced (code that needs contiguous weights, such as a
    ``.view`` of one): the caller then traces the model as it is."""
    try:
        copied = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return torch.jit.freeze(torch.jit.trace(copied, x, check_trace=False))
    except Exception:  # noqa: BLE001 - any failure: the contiguous trace is the fallback
        return None


def _stays_in_onednn(optimized: torch.jit.ScriptModule) -> bool:
    """Whether optimize_for_inference kept the network in oneDNN's layout (at most one conversion back to a
    dense tensor, before the head) instead of converting around every convolution."""
    graph = str(optimized.inlined_graph) if hasattr(optimized, "inlined_graph") else str(optimized.graph)
    return graph.count("aten::to_dense") <= 1


class _ContiguousGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back is made contiguous (the channels-last copy returns
    channels-last gradients, which would make every later elementwise step of an attack strided)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


class ContiguousGradients(nn.Module):
    """``inner(x)`` with input gradients returned in the contiguous layout, evaluated ``rows`` rows at a time
    (default: all at once; see the module docstring for why a large batch is sliced)."""

    def __init__(self, inner: nn.Module, rows: int | None = None):
        super().__init__()
        self.inner = inner
        self.rows = rows

    def forward(self, x: Tensor) -> Tensor:
        x = _ContiguousGradient.apply(x)
        if self.rows is None or len(x) <= self.rows:
            return self.inner(x)
        return torch.cat([self.inner(part) for part in x.split(self.rows)])


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor an operator returns (bytes) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _slice_rows(model: nn.Module, x: Tensor) -> int | None:
    """Rows per slice of the gradient copy: ``SLICE_BYTES`` over the largest activation of one row (measured on the
    model's forward of ``x[:1]``), at least ``MIN_SLICE_ROWS``; None (no slices) when that forward fails, which the
    copies' check then reports."""
    recorder = _LargestOutput()
    try:
        with torch.no_grad(), recorder:
            model(x[:1])
    except Exception:  # noqa: BLE001 - the check in _disagreement runs the same batch and refuses the copies
        return None
    return max(MIN_SLICE_ROWS, SLICE_BYTES // max(recorder.largest, 1))


def _row_counts(x: Tensor) -> tuple[Tensor, ...]:
    """The batches the copies are compared on: the batch, one point, and the batch with its first row repeated
    (B + 1 rows). A trace bakes in whatever Python did with the batch size it saw (a loop over the rows is
    unrolled to that many), which neither of the first two shows: ``x[i:i + 1]`` of a row past the end is empty,
    so a copy unrolled for B rows still returns one row for one point."""
    return (x, x[:1], torch.cat([x, x[:1]]))


def _disagreement(model: nn.Module, grad_model: nn.Module, query_model: nn.Module, x: Tensor, y: Tensor) -> str:
    """Why the copies cannot stand in for the model on batches like ``(x, y)``, or "" when they can. Any exception
    during the check (from a copy, or from the model on a batch it has not seen) refuses the copies: the model is
    then used as it is, and whatever it does on such batches happens there, as without copies."""
    copies = (("gradient copy", grad_model), ("query copy", query_model))
    with torch.no_grad():
        for batch in _row_counts(x):
            outputs = {}
            for name, net in (("model", model), *copies):
                try:
                    outputs[name] = net(batch)
                except Exception as error:  # noqa: BLE001 - refused; the model itself is used
                    return _fails(name, batch, error)
            reference = outputs.pop("model")
            scale = max(1.0, float(reference.abs().max()))
            for name, out in outputs.items():
                if out.shape != reference.shape:
                    return (f"the {name} returns logits of shape {list(out.shape)} for a batch of {len(batch)} rows, "
                            f"the model {list(reference.shape)} (the trace fixed a batch size)")
                if float((out - reference).abs().max()) > LOGIT_TOLERANCE * scale:
                    return f"the {name}'s logits differ from the model's"
    grads = []
    for name, net in (("model", model), copies[0]):
        xr = x.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                (grad,) = grad_or_zeros(F.cross_entropy(net(xr).float(), y), [xr])
        except Exception as error:  # noqa: BLE001 - refused; the model itself is used
            return _fails(f"input gradient of the {name}", x, error)
        grads.append(grad)
    if float((grads[0] - grads[1]).norm()) > GRADIENT_TOLERANCE * float(grads[0].norm()) + 1e-12:
        if not bool(grads[0].any()):
            return ("the model's input gradient is zero (its logits do not depend differentiably on its input: a "
                    "detach or no_grad) but its traced copy's is not")
        return "the gradient copy's input gradients differ from the model's"
    return ""


def _fails(name: str, batch: Tensor, error: Exception) -> str:
    return f"the {name} fails on a batch of {len(batch)} rows ({type(error).__name__}: {str(error).strip()[:120]})"
