"""A ``torch.compile`` copy of the model for the attacks' many evaluations, on a few fixed (padded) batch sizes.

An attack's working batch shrinks as points are decided, and APGD-T / FAB-T / Square change their row counts from
one wave to the next: compiled for every row count, a long evaluation would compile hundreds of shapes (20-27 s
each for tinycnn on a CPU). ``BucketedModel`` pads every batch with zero rows up to the next *bucket* (powers of
two, with the half steps in between: 8, 12, 16, 24, 32, 48, ...; at most 1.5x the rows), runs the compiled model
on it and returns the real rows' logits only. So a run compiles a few shapes, each once per grad mode.

Padding does not change a real row's result: in eval mode the model computes every row alone (BatchNorm uses its
running statistics), the logits of the padded rows are cut off before any loss sees them, so their gradient is
zero and the real rows' input gradients are those of the unpadded batch up to float rounding (a kernel may sum
in another order for another batch size). Like the frozen copies (``_frozen.py``) the compiled copy only stands
in behind the attacks' confirmation: a point counts as broken only once the model itself, in eager fp32,
misclassifies its adversarial. The copy sits inside the model's pass counter (``core.passes.count_like``), which
sees the batch before padding: the counted passes are the real rows.

On CUDA the copy is compiled with ``mode="reduce-overhead"`` (CUDA graphs, which need fixed shapes: the buckets
give them; the logits and input gradients are copied out of the graphs' static memory, which the next replay
overwrites); on the CPU with the default mode. Measured on a CPU (docs/performance.md, "AutoAttack against its
limit"): the compiled copy's evaluations are no faster than the frozen copies', so ``compile`` is off by default.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fastrobust.core.compiling import compile_model
from fastrobust.core.passes import count_like

MIN_BUCKET = 8
# distinct compiled shapes allowed per grad mode: the buckets up to 4,096 rows are 17, two grad modes
RECOMPILE_LIMIT = 64


def bucket_size(rows: int, minimum: int = MIN_BUCKET) -> int:
    """The padded batch size of ``rows`` rows: the smallest of ``minimum`` and the numbers 2^k and 3 * 2^(k-1)
    (``minimum`` a power of two, ``minimum`` and above) that holds them.

    Args:
        rows: the real rows, at least 0.
        minimum: the smallest bucket (default ``MIN_BUCKET`` = 8), a power of two.
    Returns:
        The bucket: at least ``rows``, at most 1.5x ``rows`` (above ``minimum``).
    """
    if rows <= minimum:
        return minimum
    power = 1 << (rows - 1).bit_length()  # the smallest power of two >= rows
    half_step = 3 * power // 4
    return half_step if half_step >= rows else power


def buckets_up_to(rows: int, minimum: int = MIN_BUCKET) -> list[int]:
    """Every bucket a batch of at most ``rows`` rows may be padded to, ascending."""
    out = [bucket_size(1, minimum)]
    while out[-1] < rows:
        out.append(bucket_size(out[-1] + 1, minimum))
    return out


class BucketedModel(nn.Module):
    """``inner`` evaluated on batches padded with zero rows to ``bucket_size(len(x))``; the real rows' output."""

    def __init__(self, inner: nn.Module, minimum: int = MIN_BUCKET, cuda_graphs: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.minimum = minimum
        self.cuda_graphs = cuda_graphs

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        size = bucket_size(rows, self.minimum)
        if size > rows:
            x = _Padded.apply(x, size, self.cuda_graphs)
        if self.cuda_graphs:  # each call a new step of the graph trees: the previous outputs stay valid ...
            torch.compiler.cudagraph_mark_step_begin()
        with _recompile_limit():
            out = self.inner(x)
        # ... because they are copied out of the graph's static output, which the next replay overwrites
        return out[:rows].clone() if self.cuda_graphs else out[:rows]


class _Padded(torch.autograd.Function):
    """``x`` with zero rows appended up to ``size``; the gradient flowing back is the real rows' (copied out when
    ``copy_gradient``: CUDA graphs hand back gradients in their static memory, which the next replay overwrites)."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, copy_gradient: bool) -> Tensor:  # type: ignore[override]
        ctx.rows, ctx.copy_gradient = x.shape[0], copy_gradient
        return torch.cat([x, x.new_zeros((size - x.shape[0],) + tuple(x.shape[1:]))])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        real = grad[:ctx.rows]
        return (real.clone() if ctx.copy_gradient else real), None, None


@contextlib.contextmanager
def _recompile_limit() -> Iterator[None]:
    """Dynamo's limit of compiled shapes per function raised to ``RECOMPILE_LIMIT`` for the copy's calls (the
    default, 8, would send the later buckets back to eager)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(RECOMPILE_LIMIT, getattr(config, name))}):
        yield


def compiled_copy(model: nn.Module, device_type: str) -> nn.Module:
    """The model compiled for fixed shapes (``dynamic=False``; CUDA: ``mode="reduce-overhead"``) behind
    ``BucketedModel``, counted as the model (``core.passes.count_like``). Compilation happens at the first call
    of each bucket and grad mode."""
    cuda_graphs = device_type == "cuda"
    compiled = compile_model(model, log=_to_stderr, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
    return count_like(model, BucketedModel(compiled, cuda_graphs=cuda_graphs))


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def padding_waste(row_counts: list[int], minimum: int = MIN_BUCKET) -> float:
    """Rows evaluated over real rows when each batch of ``row_counts`` is padded to its bucket (1.0 = none)."""
    real = sum(row_counts)
    return sum(bucket_size(r, minimum) for r in row_counts) / real if real else 1.0


__all__ = ["BucketedModel", "bucket_size", "buckets_up_to", "compiled_copy", "padding_waste"]
