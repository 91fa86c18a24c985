"""How an evaluation walks its data: one batch walker with fixed batch boundaries, one seed per (evaluation,
batch), and the rounds in which several processes share the batches out.

Shared by ``evaluate``, the invariance evaluations, the sanity checks and the Hessian analysis, so that all cut a
split the same way and a batch's random draws depend on its index alone (the same whichever process or resume
computes it)."""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from fastrobust.core import distributed as dist_lib


def indexed_batches(images: Tensor, labels: Tensor, batch_size: int, device: str | torch.device,
                    indices: Sequence[int]) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(b, x, y)`` for the batches ``indices`` (batch ``b`` holds items ``b * batch_size`` onwards); only those
    batches are moved to ``device``, uint8 images as float in [0, 1]."""
    for b in indices:
        start = b * batch_size
        x = images[start : start + batch_size].to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield b, x, labels[start : start + batch_size].to(device, non_blocking=True)


def batch_seed(seed: int, name: str, batch: int) -> int:
    """The seed of evaluation ``name`` on batch ``batch`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + batch) % (2**62)


def iterate_split(images: Tensor, labels: Tensor, batch_size: int,
                  device: str | torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of (float [0,1] images, labels) on ``device``, in order; uint8 or float input."""
    for _, x, y in indexed_batches(images, labels, batch_size, device, range(batch_count(len(labels), batch_size))):
        yield x, y


def batch_count(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def rank_batches(n: int, batch_size: int, ctx: dist_lib.Context) -> list[int]:
    """The batch indices this process evaluates: all of them, or its share (b % world_size == rank)."""
    count = batch_count(n, batch_size)
    return dist_lib.shard_indices(count, ctx) if ctx.active else list(range(count))


def rounds(pending: list[int], ctx: dist_lib.Context) -> Iterator[list[int]]:
    """Groups of up to ``world_size`` pending batches (one batch each in a single process); in a group each rank
    computes the batch at its rank's position, and every rank then holds the whole group's results."""
    step = ctx.world_size if ctx.active else 1
    for first in range(0, len(pending), step):
        yield pending[first:first + step]


def run_round(group: list[int], compute: Callable[[int, Tensor, Tensor], Any], images: Tensor, labels: Tensor,
              batch_size: int, device: torch.device, ctx: dist_lib.Context) -> dict[int, Any]:
    """``{b: compute(b, x, y)}`` for every batch of ``group``, computed by the rank at its position and gathered
    on every rank."""
    mine = group[ctx.rank:ctx.rank + 1] if ctx.active else group
    results = {b: compute(b, x, y) for b, x, y in indexed_batches(images, labels, batch_size, device, mine)}
    if not ctx.active:
        return results
    merged: dict[int, Any] = {}
    for part in dist_lib.gather_objects(results):
        merged.update(part)
    return merged
