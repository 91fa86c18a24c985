"""How an evaluation walks its data: fixed batch boundaries and one seed per (evaluation, batch).

Shared by ``evaluate`` and the invariance evaluations so that both cut a split the same way and a batch's
random draws depend on its index alone (the same whichever process or resume computes it)."""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import torch
from torch import Tensor


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
