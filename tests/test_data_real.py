"""The real datasets in the shared offline folder: decoded once per cache, then loaded from it."""

from __future__ import annotations

import json
import tarfile
import time

import numpy as np
import pytest
import torch

from fastrobust.data import load_dataset
from fastrobust.data.formats import read_idx

CIFAR10_MEAN, CIFAR10_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)
TINY_MEAN = (0.4802, 0.4481, 0.3975)


@pytest.fixture(scope="session")
def real_cache(request, tmp_path_factory):
    """Decoded arrays shared by the whole session (and kept between sessions in the pytest cache)."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return cache.mkdir("fastrobust-decoded")
    return tmp_path_factory.mktemp("fastrobust-decoded")


@pytest.fixture(scope="session")
def cifar10(shared_data, real_cache):
    return load_dataset("cifar10", shared_data, cache_dir=real_cache)


@pytest.fixture(scope="session")
def mnist(shared_data, real_cache):
    return load_dataset("mnist", shared_data, val_size=0, cache_dir=real_cache)


@pytest.fixture(scope="session")
def tiny(shared_data, real_cache):
    return load_dataset("tiny-imagenet", shared_data, val_size=0, cache_dir=real_cache)


def channel_means(images):
    total = images.sum(dim=(0, 2, 3), dtype=torch.int64).double()
    return (total / (images.numel() / images.shape[1]) / 255).tolist()


def test_cifar10_jpeg_mirror(cifar10):
    d = cifar10
    assert (len(d.train), len(d.val), len(d.test)) == (49_000, 1_000, 10_000)
    assert d.image_shape == (3, 32, 32) and d.train.images.shape[1:] == (3, 32, 32)
    assert d.class_names[:3] == ("airplane", "automobile", "bird") and d.class_names[9] == "truck"
    assert np.bincount(d.val.labels.numpy()).tolist() == [100] * 10
    assert np.bincount(d.test.labels.numpy()).tolist() == [1000] * 10
    assert np.bincount(d.train.labels.numpy()).tolist() == [4900] * 10
    assert "cifar10-jpeg.tar.gz" in d.source
    assert d.crop_padding == 4 and d.flip
    np.testing.assert_allclose(d.mean, CIFAR10_MEAN, atol=0.002)
    np.testing.assert_allclose(d.std, CIFAR10_STD, atol=0.002)
    # the mean of the full official train data (train + carved val)
    full = (np.array(channel_means(d.train.images)) * 49 + np.array(channel_means(d.val.images))) / 50
    np.testing.assert_allclose(full, CIFAR10_MEAN, atol=0.002)


def test_cifar10_second_load_is_fast(cifar10, shared_data, real_cache, monkeypatch):
    """The second load reads the decoded arrays and never decodes the 60,000 JPEGs again (minutes). The time
    bound is loose: reading 180 MB back costs 0.1 s from the page cache but about 2.5 s from this VM's disk
    once the page cache is reclaimed, so the decoder is what the test pins."""
    from fastrobust.data import datasets

    def no_decoding(candidate):
        raise AssertionError(f"decoded {candidate.path} again instead of reading the cache")

    monkeypatch.setattr(datasets, "_read", no_decoding)
    start = time.perf_counter()
    again = load_dataset("cifar10", shared_data, cache_dir=real_cache)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"cached load took {elapsed:.2f} s"
    assert again.val.labels.equal(cifar10.val.labels) and again.train.images[:100].equal(cifar10.train.images[:100])


def test_cifar10_subsets(cifar10, shared_data, real_cache):
    d = load_dataset("cifar10", shared_data, train_subset=1000, test_subset=500, cache_dir=real_cache)
    assert np.bincount(d.train.labels.numpy()).tolist() == [100] * 10
    assert np.bincount(d.test.labels.numpy()).tolist() == [50] * 10
    assert d.val.images.equal(cifar10.val.images)  # the val split does not depend on the subsets


def test_mnist_png_mirror_matches_official_idx(mnist, shared_data, tmp_path):
    d = mnist
    assert (len(d.train), len(d.val), len(d.test)) == (60_000, 0, 10_000)
    assert d.image_shape == (1, 28, 28) and d.num_classes == 10
    assert np.bincount(d.test.labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(d.mean[0] - 0.1307) < 0.002 and abs(d.std[0] - 0.3081) < 0.002
    assert abs(channel_means(d.train.images)[0] - 0.1307) < 0.002
    with tarfile.open(shared_data / "mnist-png" / "mnist-official-idx-partial.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "mnist-official-idx-partial"
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(d.test.images[:, 0].numpy(), images)  # pixel-identical, official order
    np.testing.assert_array_equal(d.test.labels.numpy(), read_idx(folder / "t10k-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(d.train.labels.numpy(), read_idx(folder / "train-labels-idx1-ubyte.gz"))


def test_mnist_default_val_split(mnist, shared_data, real_cache):
    d = load_dataset("mnist", shared_data, cache_dir=real_cache)
    assert (len(d.train), len(d.val), len(d.test)) == (59_000, 1_000, 10_000)
    assert np.bincount(d.val.labels.numpy()).tolist() == [100] * 10


def test_tiny_imagenet_sub50(tiny):
    d = tiny
    assert d.num_classes == 200 and len(d.class_names) == 200
    assert (len(d.train), len(d.test)) == (10_000, 10_000)
    assert d.image_shape == (3, 64, 64) and d.train.images.shape[1:] == (3, 64, 64)
    assert np.bincount(d.train.labels.numpy()).tolist() == [50] * 200
    assert np.bincount(d.test.labels.numpy()).tolist() == [50] * 200
    assert "tiny-imagenet-200-sub50.tar.gz" in d.source
    # the README values are of the full 100,000-image train set; this copy holds 50 per class
    np.testing.assert_allclose(d.mean, TINY_MEAN, atol=0.005)
    grey = (d.train.images[:, 0] == d.train.images[:, 1]).flatten(1).all(1) & (
        d.train.images[:, 1] == d.train.images[:, 2]).flatten(1).all(1)
    assert grey.sum() > 0  # greyscale originals became 3 equal channels


def test_cli_json_on_real_data(cifar10, shared_data, real_cache, capsys, monkeypatch):
    from fastrobust.cli import main

    monkeypatch.setenv("FASTROBUST_CACHE", str(real_cache))
    monkeypatch.setenv("FASTROBUST_DATA", str(shared_data))
    assert main(["data", "cifar10", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["counts"] == {"train": 49_000, "val": 1_000, "test": 10_000}
    assert record["image_shape"] == [3, 32, 32] and record["num_classes"] == 10
    np.testing.assert_allclose(record["mean"], CIFAR10_MEAN, atol=0.002)
