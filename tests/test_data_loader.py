"""DeviceLoader: order, augmentation and sharding invariants."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastrobust.data import DeviceLoader, ImageSet
from fastrobust.errors import ConfigError


def make_split(n=64, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n, dtype=torch.int64))  # label = sample id


def collect(loader, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start_batch=start)]


def find_transform(original: torch.Tensor, out: torch.Tensor, pad: int):
    """All (dy, dx, flipped) such that out is that crop (and flip) of the zero-padded original."""
    padded = torch.nn.functional.pad(original, (pad, pad, pad, pad))
    h, w = original.shape[1:]
    found = []
    for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (False, True)):
        crop = padded[:, dy : dy + h, dx : dx + w]
        if flip:
            crop = crop.flip(-1)
        if torch.equal(crop, out):
            found.append((dy, dx, flip))
    return found


def test_plain_batches_are_exact_and_ordered():
    split = make_split(n=10)
    loader = DeviceLoader(split, 4)
    assert len(loader) == 3
    batches = collect(loader, 0)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (10, 3, 8, 8)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))
    assert torch.allclose(x, split.images.float() / 255)
    assert len(DeviceLoader(split, 4, drop_last=True)) == 2
    assert [len(y) for _, y in DeviceLoader(split, 4, drop_last=True).epoch(0)] == [4, 4]


def test_shuffle_is_a_permutation_reproducible_per_seed_and_epoch():
    split = make_split(n=50)
    loader = DeviceLoader(split, 8, shuffle=True, seed=3)
    order0 = torch.cat([y for _, y in collect(loader, 0)])
    assert sorted(order0.tolist()) == list(range(50)) and not torch.equal(order0, torch.arange(50))
    again = DeviceLoader(split, 8, shuffle=True, seed=3)
    assert torch.equal(torch.cat([y for _, y in collect(again, 0)]), order0)
    assert not torch.equal(torch.cat([y for _, y in collect(loader, 1)]), order0)
    other = DeviceLoader(split, 8, shuffle=True, seed=4)
    assert not torch.equal(torch.cat([y for _, y in collect(other, 0)]), order0)
    # the global torch RNG neither affects nor is affected by the loader
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(torch.cat([y for _, y in collect(loader, 0)]), order0)
    torch.set_rng_state(state)


def test_augmentation_invariants():
    split = make_split(n=64, h=8, w=8)
    pad = 2
    loader = DeviceLoader(split, 16, shuffle=True, crop_padding=pad, flip=True, seed=1)
    batches = collect(loader, 5)
    offsets, flips = set(), set()
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (len(y), 3, 8, 8)
        assert x.min() >= 0 and x.max() <= 1
        for xi, yi in zip(x, y):
            out = (xi * 255).round().to(torch.uint8)
            found = find_transform(split.images[yi], out, pad)
            assert found, "output is not a crop/flip of its own source image"
            offsets.add(found[0][:2])
            flips.add(found[0][2])
    assert len(offsets) > 5  # per-sample offsets, not one for the whole batch
    assert flips == {False, True}
    # same (seed, epoch) -> same pixels; another epoch -> different augmentation
    again = collect(DeviceLoader(split, 16, shuffle=True, crop_padding=pad, flip=True, seed=1), 5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    unshuffled = DeviceLoader(split, 16, crop_padding=pad, flip=True, seed=1)
    e0, e1 = collect(unshuffled, 0), collect(unshuffled, 1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))  # same order
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e0, e1))  # different crops/flips


def test_flip_only_and_crop_only():
    split = make_split(n=32)
    flipped = torch.cat([x for x, _ in DeviceLoader(split, 32, flip=True, seed=0).epoch(0)])
    base = split.images.float() / 255
    is_flip = [torch.equal(f, b.flip(-1)) for f, b in zip(flipped, base)]
    is_same = [torch.equal(f, b) for f, b in zip(flipped, base)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip) and any(is_same)
    cropped = torch.cat([x for x, _ in DeviceLoader(split, 32, crop_padding=3, seed=0).epoch(0)])
    for xi, i in zip(cropped, range(32)):
        found = find_transform(split.images[i], (xi * 255).round().to(torch.uint8), 3)
        assert any(not f for *_, f in found)


def test_start_batch_resumes_identically():
    split = make_split(n=70)
    loader = DeviceLoader(split, 16, shuffle=True, crop_padding=2, flip=True, seed=9)
    full = collect(loader, 3)
    assert len(full) == len(loader) == 5
    for k in range(len(loader) + 1):
        resumed = collect(loader, 3, start=k)
        assert len(resumed) == len(full) - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[k:], resumed))
    with pytest.raises(ConfigError, match="start_batch=6"):
        next(loader.epoch(0, start_batch=6))


@pytest.mark.parametrize("n,batch,world", [(64, 16, 2), (70, 16, 3), (10, 4, 4)])
def test_ranks_split_each_global_batch(n, batch, world):
    split = make_split(n=n)
    kwargs = dict(shuffle=True, crop_padding=2, flip=True, seed=7)
    single = collect(DeviceLoader(split, batch, **kwargs), 2)
    loaders = [DeviceLoader(split, batch, rank=r, world_size=world, **kwargs) for r in range(world)]
    assert len({len(lo) for lo in loaders}) == 1
    per_rank = [collect(lo, 2) for lo in loaders]
    for b in range(len(loaders[0])):
        shards = [per_rank[r][b] for r in range(world)]
        assert all(len(s[1]) > 0 for s in shards)
        assert max(len(s[1]) for s in shards) - min(len(s[1]) for s in shards) <= 1
        # the shards, concatenated in rank order, are exactly the single-process batch
        assert torch.equal(torch.cat([s[1] for s in shards]), single[b][1])
        assert torch.equal(torch.cat([s[0] for s in shards]), single[b][0])
    seen = torch.cat([s[1] for r in range(world) for s in per_rank[r]])
    assert len(set(seen.tolist())) == len(seen)  # no sample twice in one epoch


def test_bad_arguments():
    split = make_split(n=8)
    with pytest.raises(ConfigError, match="batch_size=0"):
        DeviceLoader(split, 0)
    with pytest.raises(ConfigError, match="rank=2"):
        DeviceLoader(split, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="crop_padding=-1"):
        DeviceLoader(split, 4, crop_padding=-1)


def test_grey_images_and_empty_split():
    split = make_split(n=5, c=1, h=6, w=6)
    x, y = next(DeviceLoader(split, 5, crop_padding=1, flip=True).epoch(0))
    assert x.shape == (5, 1, 6, 6)
    empty = ImageSet(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    loader = DeviceLoader(empty, 4, shuffle=True)
    assert len(loader) == 0 and list(loader.epoch(0)) == []


def test_batches_stay_on_the_requested_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split = make_split(n=20)
    loader = DeviceLoader(split, 8, device=device, shuffle=True, crop_padding=2, flip=True)
    assert loader.images.device.type == device
    for x, y in loader.epoch(0):
        assert x.device.type == device and y.device.type == device and y.dtype == torch.int64


def test_balanced_head_takes_every_class_from_a_class_sorted_split():
    from fastrobust.data import balanced_head

    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, like the CIFAR-10 test split
    images = torch.arange(500).view(500, 1, 1, 1)  # each image holds its own index
    x, y = balanced_head(images, labels, 300)
    assert torch.bincount(y, minlength=10).tolist() == [30] * 10  # a plain prefix gives [50]*6 + [0]*4
    assert torch.equal(y, labels[x.view(-1).long()])  # images follow their labels, in split order
    assert (y[1:] >= y[:-1]).all()
    assert balanced_head(images, labels, None)[0] is images and balanced_head(images, labels, 900)[1] is labels
