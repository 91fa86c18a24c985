"""DeviceLoader: a whole split as one uint8 tensor on the device; shuffling, crop and flip as batched ops."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from fastrobust.data.datasets import ImageSet
from fastrobust.errors import ConfigError

_MASK64 = (1 << 64) - 1


def _mix(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch) (splitmix64 finaliser of both)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class DeviceLoader:
    """Batches ``(x, y)`` of one split: x float32 in [0, 1] on ``device``, y int64.

    The split is moved to ``device`` once. Epoch ``e``'s order and augmentation are drawn from a
    ``torch.Generator`` seeded from ``(seed, e)`` only, so ``epoch(e, start_batch=k)`` yields exactly
    batches ``k, k+1, ...`` of the full epoch (mid-epoch resume). With ``world_size > 1`` every global
    batch of ``batch_size`` samples is split into ``world_size`` contiguous shards and rank ``rank``
    gets its own; all ranks agree on the number of batches.
    """

    def __init__(self, split: ImageSet, batch_size: int, *, device="cpu", shuffle: bool = False,
                 crop_padding: int = 0, flip: bool = False, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if isinstance(batch_size, bool) or int(batch_size) <= 0:
            raise ConfigError(f"batch_size={batch_size} must be a positive whole number")
        if int(world_size) <= 0 or not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if int(batch_size) < int(world_size):
            raise ConfigError(f"batch_size={batch_size} (global) is smaller than world_size={world_size}")
        if int(crop_padding) < 0:
            raise ConfigError(f"crop_padding={crop_padding} must be zero or positive")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest >= self.world_size and not self.drop_last else 0)

    def _plan(self, epoch: int):
        """Order and augmentation parameters of the whole epoch, on the CPU (cheap, deterministic)."""
        n = self.num_samples
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        p = self.crop_padding
        if p:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
        else:
            offsets = None
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else None
        return order, offsets, flips

    def _shard(self, start: int, stop: int) -> tuple[int, int]:
        size = stop - start
        base, extra = divmod(size, self.world_size)
        lo = start + self.rank * base + min(self.rank, extra)
        hi = lo + base + (1 if self.rank < extra else 0)
        return lo, hi

    def _augment(self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
        if offsets is None and flips is None:
            return x
        b, c, h, w = x.shape
        p = self.crop_padding
        if p:
            x = F.pad(x, (p, p, p, p))  # zeros
            oy, ox = offsets[:, 0], offsets[:, 1]
        else:
            oy = ox = torch.zeros(b, dtype=torch.long, device=x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)  # [b, h]
        cols = ox[:, None] + torch.arange(w, device=x.device)  # [b, w]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        # one gather over the flattened (padded) planes: index = row * padded_width + col
        flat = (rows[:, :, None] * x.shape[3] + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return torch.gather(x.reshape(b, c, -1), 2, flat).reshape(b, c, h, w)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start_batch ..`` of epoch ``epoch``."""
        count = len(self)
        if not 0 <= int(start_batch) <= count:
            raise ConfigError(f"start_batch={start_batch} is outside 0..{count} for this loader")
        # the plan moves to the device once per epoch: a per-batch host-to-device copy would wait for the GPU
        order, offsets, flips = (t.to(self.device) if t is not None else None for t in self._plan(int(epoch)))
        for b in range(int(start_batch), count):
            lo, hi = self._shard(b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples))
            idx = order[lo:hi]
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            off = offsets[lo:hi] if offsets is not None else None
            fl = flips[lo:hi] if flips is not None else None
            x = self._augment(x, off, fl)
            yield x.to(torch.float32).div_(255.0), y

    def __iter__(self):
        return self.epoch(0)
