"""Splits read from class-sorted sources (image folders, the CIFAR-10 JPEG mirror, Tiny ImageNet's train/) are
stored class-interleaved, so any prefix is class-balanced; official formats keep their official order; a decoded
cache written in the old class-sorted order is not reused."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fastrobust.data import datasets as ds
from fastrobust.data import load_dataset

from helpers import write_cifar10


def write_folder(root, counts, *, size=4):
    """<root>/<split>/<class>/<i>.png; pixel value = 10 * class + i, so the order can be read back."""
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((size, size), 10 * c + i, dtype=np.uint8)).save(folder / f"{i}.png")


def codes(images):
    return images[:, 0, 0, 0].tolist()


def test_interleave_round_robin_in_file_order():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert ds.interleave_classes(labels).tolist() == [0, 3, 5, 1, 4, 6, 2, 7, 8]
    assert ds.interleave_classes(np.array([], dtype=np.int64)).tolist() == []


def test_image_folder_splits_are_class_interleaved(tmp_path):
    write_folder(tmp_path / "tree", {"train": [3, 3, 3], "test": [2, 3, 2]})
    d = load_dataset("imagefolder", tmp_path / "tree", val_size=0, cache_dir=tmp_path / "cache", channels=1)
    assert d.test.labels.tolist() == [0, 1, 2, 0, 1, 2, 1]
    assert codes(d.test.images) == [0, 10, 20, 1, 11, 21, 12]  # each class in file-name order
    assert d.train.labels[:3].tolist() == [0, 1, 2]  # a prefix holds every class
    again = load_dataset("imagefolder", tmp_path / "tree", val_size=0, cache_dir=tmp_path / "cache2", channels=1)
    assert codes(again.test.images) == codes(d.test.images)  # the same order from a fresh decode


def test_cifar10_jpeg_mirror_prefix_is_balanced(tmp_path):
    for split, n in (("train", 2), ("test", 2)):
        for c, name in enumerate(ds.CIFAR10_CLASSES):
            folder = tmp_path / "CIFAR-10-images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 20 * c + 5 * i, dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
    d = load_dataset("cifar10", tmp_path, val_size=0, cache_dir=tmp_path / "cache")
    assert d.test.labels.tolist() == list(range(10)) * 2
    assert sorted(d.test.labels[:10].tolist()) == list(range(10))  # the first 10 test images: one per class


def test_official_pickle_keeps_official_order(tmp_path):
    arrays = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=20)
    d = load_dataset("cifar10", tmp_path, val_size=0, cache_dir=tmp_path / "cache")
    assert d.test.labels.tolist() == [int(v) for v in arrays["test"][1]]
    np.testing.assert_array_equal(d.test.images.numpy(), arrays["test"][0])


def test_old_class_sorted_cache_is_not_reused(tmp_path, monkeypatch):
    write_folder(tmp_path / "tree", {"train": [2, 2], "test": [2, 2]})
    cache = tmp_path / "cache"
    monkeypatch.setattr(ds, "CACHE_FORMAT", 2)  # write an entry under the previous format's key ...
    load_dataset("imagefolder", tmp_path / "tree", val_size=0, cache_dir=cache, channels=1)
    (entry,) = cache.iterdir()
    for split in ("train", "test"):  # ... holding the old class-sorted order
        labels = np.load(entry / f"{split}_labels.npy")
        order = np.argsort(labels, kind="stable")
        np.save(entry / f"{split}_labels.npy", labels[order])
        np.save(entry / f"{split}_images.npy", np.load(entry / f"{split}_images.npy")[order])
    monkeypatch.undo()
    d = load_dataset("imagefolder", tmp_path / "tree", val_size=0, cache_dir=cache, channels=1)
    assert codes(d.test.images) == [0, 10, 1, 11]  # decoded again, not the old entry
