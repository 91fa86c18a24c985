"""Readers of the official formats, on small files written here in those formats; bad-input errors."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastrobust.data import available_datasets, load_dataset, resolve_root
from fastrobust.data import datasets as ds
from fastrobust.data import formats
from fastrobust.data._safe_pickle import safe_loads
from fastrobust.errors import ConfigError, DataError

from helpers import cifar_arrays, make_tar, py2_pickle, write_cifar10

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- writers
def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(root, classes, counts, *, size=8, channels=3, seed=0, fmt="png"):
    """<root>/<split>/<class>/<i>.png with random pixels; returns {split: (images NCHW, labels)} by class index."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in counts.items():
        xs, ys = [], []
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size, size) if channels == 1 else (size, size, 3)
                array = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(array).save(root / split / name / f"{i}.{fmt}")
                xs.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
                ys.append(c)
        out[split] = (np.stack(xs), np.asarray(ys))
    return out


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- CIFAR
def test_cifar10_python_batches_dir_and_tar(tmp_path, cache):
    root = tmp_path / "root"
    expected = write_cifar10(root / "cifar-10-batches-py")
    d = load_dataset("cifar10", root, val_size=0, cache_dir=cache)
    assert d.image_shape == (3, 32, 32) and d.num_classes == 10
    assert d.class_names == ds.CIFAR10_CLASSES
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    np.testing.assert_array_equal(d.train.images.numpy(), expected["train"][0])
    np.testing.assert_array_equal(d.train.labels.numpy(), expected["train"][1])
    np.testing.assert_array_equal(d.test.images.numpy(), expected["test"][0])
    assert "cifar-10-batches-py" in d.source
    assert d.crop_padding == 4 and d.flip
    x = expected["train"][0]
    np.testing.assert_allclose(d.mean, x.transpose(1, 0, 2, 3).reshape(3, -1).mean(1) / 255, atol=1e-9)
    np.testing.assert_allclose(d.std, (x.transpose(1, 0, 2, 3).reshape(3, -1) / 255).std(1), atol=1e-9)

    root2 = tmp_path / "root2"
    root2.mkdir()
    make_tar(root / "cifar-10-batches-py", root2 / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    d2 = load_dataset("cifar10", root2, val_size=0, cache_dir=cache)
    assert d2.source.startswith(str(root2 / "cifar-10-python.tar.gz"))
    assert torch.equal(d2.train.images, d.train.images) and torch.equal(d2.test.labels, d.test.labels)


def test_cifar100_fine_labels(tmp_path, cache):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    expected = {}
    for k, name in enumerate(("train", "test")):
        n = 300 if name == "train" else 100
        data, fine = cifar_arrays(n, 100, k)
        coarse = [f // 5 for f in fine]
        folder.joinpath(name).write_bytes(py2_pickle(
            {b"filenames": [b"x"] * n, b"batch_label": b"b", b"fine_labels": fine, b"coarse_labels": coarse,
             b"data": data}))
        expected[name] = (data.reshape(-1, 3, 32, 32), np.asarray(fine))
    names = [f"class{i}".encode() for i in range(100)]
    folder.joinpath("meta").write_bytes(py2_pickle({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    make_tar(folder, tmp_path / "cifar-100-python.tar.gz", "cifar-100-python")
    import shutil

    shutil.rmtree(folder)  # only the official archive is left
    d = load_dataset("cifar100", tmp_path, val_size=100, cache_dir=cache)
    assert d.num_classes == 100 and d.class_names[7] == "class7"
    assert (len(d.train), len(d.val), len(d.test)) == (200, 100, 100)
    assert sorted(d.val.labels.tolist()) == list(range(100))  # balanced: one per class
    np.testing.assert_array_equal(d.test.labels.numpy(), expected["test"][1])
    np.testing.assert_array_equal(d.test.images.numpy(), expected["test"][0])


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, cache):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    folder.joinpath("data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"(?i)refused global (posix|os)\.system.*data_batch_3|data_batch_3.*refused"):
        load_dataset("cifar10", tmp_path, cache_dir=cache)
    assert not marker.exists()
    for payload in (
        pickle.dumps(Evil(), protocol=0),
        b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR.",
        b"csubprocess\ncall\n(Vtouch\ntR.",
    ):
        with pytest.raises(DataError, match="refused"):
            safe_loads(payload, what="x")
    assert not marker.exists()
    # what the official batches need still loads
    array = safe_loads(py2_pickle({b"data": np.arange(4, dtype=np.uint8)}), what="ok")["data"]
    np.testing.assert_array_equal(array, np.arange(4))


def test_cifar_labels_out_of_range_and_empty_class(tmp_path, cache):
    write_cifar10(tmp_path / "a" / "cifar-10-batches-py",
                  labels_fn=lambda name, labels: [10] + labels[1:] if name == "data_batch_2" else labels)
    with pytest.raises(DataError, match=r"labels out of range.*10"):
        load_dataset("cifar10", tmp_path / "a", cache_dir=cache)
    write_cifar10(tmp_path / "b" / "cifar-10-batches-py",
                  labels_fn=lambda name, labels: [0 if v == 3 else v for v in labels])
    with pytest.raises(DataError, match=r"empty class 'cat'"):
        load_dataset("cifar10", tmp_path / "b", cache_dir=cache)


def test_cifar_mismatched_counts_and_missing_batch(tmp_path, cache):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    data, _ = cifar_arrays(20, 10, 0)
    folder.joinpath("data_batch_1").write_bytes(py2_pickle({b"data": data, b"labels": list(range(10)) * 1 + [1]}))
    with pytest.raises(DataError, match=r"mismatched counts: 20 images but 11 labels"):
        load_dataset("cifar10", tmp_path, cache_dir=cache)
    folder.joinpath("data_batch_1").unlink()
    with pytest.raises(DataError, match=r"missing CIFAR batch.*data_batch_1"):
        load_dataset("cifar10", tmp_path, cache_dir=cache)


# ----------------------------------------------------------------------------- SVHN / MAT v5
def test_svhn_mat_files(tmp_path, cache):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    expected = {}
    for name, n, compress in (("train", 30, True), ("test", 20, False)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.float64).reshape(n, 1)  # 1..10, 10 means digit 0
        scipy_io.savemat(tmp_path / f"{name}_32x32.mat", {"X": x, "y": y}, do_compression=compress)
        expected[name] = (x.transpose(3, 2, 0, 1), (y.reshape(-1) % 10).astype(np.int64))
    d = load_dataset("svhn", tmp_path, val_size=10, cache_dir=cache)
    assert (len(d.train), len(d.val), len(d.test)) == (20, 10, 20)
    assert not d.flip and d.image_shape == (3, 32, 32)
    np.testing.assert_array_equal(d.test.images.numpy(), expected["test"][0])
    np.testing.assert_array_equal(d.test.labels.numpy(), expected["test"][1])
    assert 0 in d.test.labels.tolist() and 10 not in d.test.labels.tolist()
    full = load_dataset("svhn", tmp_path, val_size=0, cache_dir=cache)
    np.testing.assert_array_equal(full.train.images.numpy(), expected["train"][0])


@pytest.mark.parametrize("compress", [False, True])
def test_mat_reader_matches_scipy(tmp_path, compress):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    variables = {
        "a": rng.normal(size=(3, 4, 5)),
        "b": rng.integers(-100, 100, size=(7, 2)).astype(np.int32),
        "c": rng.integers(0, 255, size=(2, 3, 4, 5), dtype=np.uint8),
        "d": np.float32(3.5),
        "e": np.arange(300, dtype=np.int16),
        "s": "some text",
        "st": {"f": np.arange(3.0)},
    }
    path = tmp_path / "m.mat"
    scipy_io.savemat(path, variables, do_compression=compress)
    ours = formats.read_mat(path)
    theirs = scipy_io.loadmat(path)
    for key in ("a", "b", "c", "d", "e"):
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert "s" not in ours and "st" not in ours  # non-numeric variables are skipped


def test_mat_reader_errors(tmp_path):
    bad = tmp_path / "x.mat"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(600))
    with pytest.raises(DataError, match="v7.3"):
        formats.read_mat(bad)
    bad.write_bytes(b"hello")
    with pytest.raises(DataError, match="too short"):
        formats.read_mat(bad)
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(bad, {"X": np.zeros((32, 32, 3, 10), np.uint8)})
    bad.write_bytes(bad.read_bytes()[:-500])
    with pytest.raises(DataError, match="truncated"):
        formats.read_mat(bad)


# ----------------------------------------------------------------------------- MNIST IDX
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=30, n_test=20, gz=True, n_train_labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train_labels or n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 7) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("layout,gz", [(".", True), ("MNIST/raw", False)])
def test_mnist_idx(tmp_path, cache, layout, gz):
    arrays = write_mnist(tmp_path / layout, gz=gz)
    d = load_dataset("mnist", tmp_path, val_size=10, cache_dir=cache)
    assert d.image_shape == (1, 28, 28) and d.crop_padding == 0 and not d.flip
    assert (len(d.train), len(d.val), len(d.test)) == (20, 10, 20)
    np.testing.assert_array_equal(d.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert sorted(d.val.labels.tolist()) == list(range(10))
    assert "idx" in d.source.lower() or "IDX" in d.source


def test_idx_errors(tmp_path, cache):
    write_mnist(tmp_path, n_train=30, n_train_labels=29)
    with pytest.raises(DataError, match=r"mismatched counts.*30 images but 29 labels"):
        load_dataset("mnist", tmp_path, cache_dir=cache)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3i", 10, 28, 28) + bytes(100))
    with pytest.raises(DataError, match="size mismatch"):
        formats.read_idx(bad)
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match="not an IDX file"):
        formats.read_idx(bad)


# ----------------------------------------------------------------------------- Tiny ImageNet
def write_tiny(base, wnids=("n02", "n01", "n03"), per_class=4, val_per_class=2):
    top = base / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    rng = np.random.default_rng(4)
    for w in wnids:
        folder = top / "train" / w / "images"
        folder.mkdir(parents=True)
        (top / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{w}_{i}.JPEG")
    Image.new("L", (64, 64), color=77).save(top / "train" / wnids[1] / "images" / f"{wnids[1]}_{per_class}.JPEG")
    lines = []
    k = 0
    for w in wnids:
        for _ in range(val_per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(top / "val" / "images" / f"val_{k}.JPEG")
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
            k += 1
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (top / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(top / "test" / "images" / "test_0.JPEG")  # unlabelled: ignored
    return top


def test_tiny_imagenet_dir_and_mirror_archive(tmp_path, cache):
    wnids = ("n02", "n01", "n03")
    top = write_tiny(tmp_path / "a", wnids)
    d = load_dataset("tiny-imagenet", tmp_path / "a", val_size=0, cache_dir=cache)
    assert d.num_classes == 3 and d.class_names == wnids  # wnids.txt order, not sorted
    assert d.image_shape == (3, 64, 64)
    assert len(d.train) == 13 and len(d.test) == 6
    assert d.train.labels.tolist() == [0, 1, 2] * 4 + [1]  # train/ class-interleaved (class 1 has one more)
    assert d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]  # val/ keeps its official (file-name) order
    grey = d.train.images[12]  # n01_4, the greyscale one, converted to RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(grey.float().mean().item() - 77) < 2

    mirror = tmp_path / "b" / "tiny-imagenet-200-sub50"
    mirror.mkdir(parents=True)
    make_tar(top, mirror / "tiny-imagenet-200-sub50.tar.gz", "tiny-imagenet-200")
    d2 = load_dataset("tiny-imagenet", tmp_path / "b", val_size=3, cache_dir=cache)
    assert "tiny-imagenet-200-sub50.tar.gz" in d2.source
    assert (len(d2.train), len(d2.val), len(d2.test)) == (10, 3, 6)
    assert torch.equal(d2.test.images, d.test.images)

    zipped = tmp_path / "c"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "tiny-imagenet-200.zip", "w") as archive:
        for path in sorted(top.rglob("*")):
            archive.write(path, path.relative_to(top.parent).as_posix())
    d3 = load_dataset("tiny-imagenet", zipped, val_size=0, cache_dir=cache)
    assert torch.equal(d3.train.images, d.train.images)


# ----------------------------------------------------------------------------- image folders
def test_imagefolder_tree_and_tar(tmp_path, cache):
    classes = ["zebra", "ant", "cat"]
    expected = write_tree(tmp_path / "tree", classes, {"train": 6, "test": 3})
    d = load_dataset("imagefolder", tmp_path / "tree", val_size=3, cache_dir=cache)
    assert d.class_names == ("ant", "cat", "zebra")  # sorted folder names
    assert d.image_shape == (3, 8, 8) and d.crop_padding == 1 and d.flip
    assert (len(d.train), len(d.val), len(d.test)) == (15, 3, 9)
    remap = {classes.index(n): i for i, n in enumerate(d.class_names)}
    # test split class-interleaved: image 0 of each class (sorted class names), then image 1, ... (lossless PNG)
    written = expected["test"][1]
    rank = np.arange(len(written)) % 3  # write_tree writes 3 images per class, class by class
    order = np.lexsort(([d.class_names.index(classes[c]) for c in written], rank))
    np.testing.assert_array_equal(d.test.images.numpy(), expected["test"][0][order])
    assert d.test.labels.tolist() == [remap[c] for c in expected["test"][1][order]]

    make_tar(tmp_path / "tree", tmp_path / "tree.tar.gz", "mydata")
    d2 = load_dataset("imagefolder", tmp_path / "tree.tar.gz", val_size=3, cache_dir=cache)
    assert torch.equal(d2.test.images, d.test.images) and torch.equal(d2.train.labels, d.train.labels)
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        tar.add(tmp_path / "tree", arcname=".")
    d3 = load_dataset("imagefolder", tmp_path / "plain.tar", val_size=3, cache_dir=cache)
    assert torch.equal(d3.val.images, d.val.images)


def test_imagefolder_val_folder_and_grey(tmp_path, cache):
    write_tree(tmp_path, ["a", "b"], {"train": 4, "val": 2, "test": 2}, channels=1, size=6)
    d = load_dataset("imagefolder", tmp_path, cache_dir=cache)
    assert d.image_shape == (1, 6, 6)
    assert (len(d.train), len(d.val), len(d.test)) == (8, 4, 4)  # the val/ folder is used as given


def test_cifar10_jpeg_mirror_uses_official_class_order(tmp_path, cache):
    classes = list(ds.CIFAR10_CLASSES)
    write_tree(tmp_path / "cifar10-jpeg" / "CIFAR-10-images", classes[::-1], {"train": 2, "test": 1},
               size=32, fmt="jpg")
    make_tar(tmp_path / "cifar10-jpeg" / "CIFAR-10-images", tmp_path / "cifar10-jpeg" / "cifar10-jpeg.tar.gz",
             "CIFAR-10-images")
    import shutil

    shutil.rmtree(tmp_path / "cifar10-jpeg" / "CIFAR-10-images")
    d = load_dataset("cifar10", tmp_path, val_size=0, cache_dir=cache)
    assert d.class_names == ds.CIFAR10_CLASSES
    assert d.test.labels.tolist() == list(range(10))
    # folders were written in reverse order with pixels seeded per position: truck's image must get id 9
    assert "cifar10-jpeg.tar.gz" in d.source
    (tmp_path / "cifar10-jpeg" / "cifar10-jpeg.tar.gz").unlink()
    write_tree(tmp_path / "CIFAR-10-images", classes[:9], {"train": 2, "test": 1}, size=32, fmt="jpg")
    with pytest.raises(DataError, match="empty class 'truck'"):
        load_dataset("cifar10", tmp_path, cache_dir=cache)


def test_corrupt_image_names_file_and_archive(tmp_path, cache):
    write_tree(tmp_path / "tree", ["a", "b"], {"train": 3, "test": 2})
    (tmp_path / "tree" / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    make_tar(tmp_path / "tree", tmp_path / "data.tar.gz", "data")
    with pytest.raises(DataError, match=r"corrupt or unreadable image data/train/b/1\.png in .*data\.tar\.gz"):
        load_dataset("imagefolder", tmp_path / "data.tar.gz", cache_dir=cache)


def test_imagefolder_layout_errors(tmp_path, cache):
    write_tree(tmp_path / "t1", ["a", "b"], {"train": 2})
    with pytest.raises(DataError, match=r"splits 'train' and 'test'"):
        load_dataset("imagefolder", tmp_path / "t1", cache_dir=cache)
    write_tree(tmp_path / "t2", ["a", "b"], {"train": 2})
    write_tree(tmp_path / "t2", ["a", "c"], {"test": 1})
    with pytest.raises(DataError, match=r"test/ has class folder\(s\) \['c'\]"):
        load_dataset("imagefolder", tmp_path / "t2", cache_dir=cache)
    write_tree(tmp_path / "t3", ["a"], {"train": 2, "test": 1}, size=8)
    Image.new("RGB", (9, 8)).save(tmp_path / "t3" / "train" / "a" / "9.png")
    with pytest.raises(DataError, match=r"another size .*9\.png.*: 9x8 pixels where the others are 8x8"):
        load_dataset("imagefolder", tmp_path / "t3", cache_dir=cache)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(gzip.compress(b"x" * 2000)[:50])
    with pytest.raises(DataError, match=r"cannot read archive .*broken\.tar\.gz"):
        load_dataset("imagefolder", broken, cache_dir=cache)


# ----------------------------------------------------------------------------- finding, errors, download
def test_unknown_name_and_missing_roots(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'.*cifar10.*tiny-imagenet.*imagefolder"):
        load_dataset("imagenet", tmp_path)
    assert set(available_datasets()) == {"cifar10", "cifar100", "svhn", "mnist", "tiny-imagenet", "imagefolder"}
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere", cache_dir=cache)
    with pytest.raises(DataError, match=r"imagefolder root .*nowhere does not exist"):
        load_dataset("imagefolder", tmp_path / "nowhere", cache_dir=cache)
    monkeypatch.setenv("FASTROBUST_DATA", str(tmp_path / "envroot"))
    assert resolve_root() == tmp_path / "envroot"
    assert resolve_root(tmp_path) == tmp_path
    monkeypatch.delenv("FASTROBUST_DATA")
    assert resolve_root() == ds.Path.home() / ".cache" / "fastrobust" / "data"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "tiny-imagenet"])
def test_not_found_lists_paths_url_and_fixes(tmp_path, cache, name):
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path, cache_dir=cache)
    message = str(info.value)
    assert f"under data root {tmp_path} (looked for " in message
    for candidate in ds.SPECS[name].candidates(tmp_path):  # named under the root, not in full (a short line)
        assert candidate.path.relative_to(tmp_path).as_posix() in message
    for item in ds.SPECS[name].downloads:
        assert item.url in message
    assert "--data-root DIR" in message and "FASTROBUST_DATA" in message and "leave both unset to download" in message


def test_bad_split_arguments(tmp_path, cache):
    write_mnist(tmp_path)
    with pytest.raises(ConfigError, match="val_size=30"):
        load_dataset("mnist", tmp_path, val_size=30, cache_dir=cache)
    with pytest.raises(ConfigError, match="val_size=-1"):
        load_dataset("mnist", tmp_path, val_size=-1, cache_dir=cache)
    with pytest.raises(ConfigError, match="train_subset=21"):
        load_dataset("mnist", tmp_path, val_size=10, train_subset=21, cache_dir=cache)
    with pytest.raises(ConfigError, match="test_subset=0"):
        load_dataset("mnist", tmp_path, test_subset=0, cache_dir=cache)


def test_split_rules(tmp_path, cache):
    write_mnist(tmp_path, n_train=100, n_test=50)
    d = load_dataset("mnist", tmp_path, val_size=20, train_subset=30, test_subset=20, cache_dir=cache)
    full = load_dataset("mnist", tmp_path, val_size=0, cache_dir=cache)
    assert np.bincount(d.val.labels.numpy(), minlength=10).tolist() == [2] * 10
    assert np.bincount(d.train.labels.numpy(), minlength=10).tolist() == [3] * 10
    assert np.bincount(d.test.labels.numpy(), minlength=10).tolist() == [2] * 10
    # val and train are disjoint pieces of the official train split; test stays test
    keys = lambda s: {bytes(x) for x in s.images.numpy()}  # noqa: E731
    assert not keys(d.val) & keys(d.train)
    assert keys(d.val) <= keys(full.train) and keys(d.train) <= keys(full.train)
    assert keys(d.test) <= keys(full.test) and not keys(d.val) & keys(full.test)
    # the subset is the first images of each class among those left after the val split
    rest = load_dataset("mnist", tmp_path, val_size=20, cache_dir=cache)
    for c in range(10):
        first = rest.train.images[rest.train.labels == c][:3]
        assert torch.equal(d.train.images[d.train.labels == c], first)
    again = load_dataset("mnist", tmp_path, val_size=20, train_subset=30, test_subset=20, cache_dir=cache)
    assert torch.equal(again.val.images, d.val.images) and torch.equal(again.train.images, d.train.images)
    # val of 15 over 10 classes: as balanced as possible
    counts = np.bincount(load_dataset("mnist", tmp_path, val_size=15, cache_dir=cache).val.labels.numpy())
    assert counts.max() - counts.min() <= 1 and counts.sum() == 15


def test_cache_is_reused_and_invalidated(tmp_path, cache, monkeypatch):
    write_mnist(tmp_path)
    load_dataset("mnist", tmp_path, val_size=10, cache_dir=cache)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
    assert not list(cache.rglob("*.tmp"))
    calls = []
    monkeypatch.setattr(ds, "_read", lambda c: calls.append(c) or pytest.fail("decoded again"))
    load_dataset("mnist", tmp_path, val_size=10, cache_dir=cache)
    assert calls == []
    monkeypatch.undo()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    load_dataset("mnist", tmp_path, val_size=10, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2  # a changed source gets a new entry
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "envcache"))
    load_dataset("mnist", tmp_path, val_size=10)
    assert (tmp_path / "envcache").is_dir()


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_verifies_md5(tmp_path, cache, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src / "cifar-10-batches-py")
    make_tar(src / "cifar-10-batches-py", tmp_path / "archive.tar.gz", "cifar-10-batches-py")
    payload = (tmp_path / "archive.tar.gz").read_bytes()
    url = "https://example.invalid/cifar-10-python.tar.gz"
    good = ds.Download(url, "cifar-10-python.tar.gz", hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(ds.SPECS, "cifar10", dataclasses.replace(ds.SPECS["cifar10"], downloads=(good,)))
    monkeypatch.setattr(ds.urllib.request, "urlopen", lambda u, timeout=None: _FakeResponse(payload))
    root = tmp_path / "root"
    d = load_dataset("cifar10", root, download=True, val_size=10, cache_dir=cache)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == payload and len(d.train) == 90

    bad = ds.Download(url, "cifar-10-python.tar.gz", "0" * 32)
    monkeypatch.setitem(ds.SPECS, "cifar10", dataclasses.replace(ds.SPECS["cifar10"], downloads=(bad,)))
    with pytest.raises(DataError, match=r"download failed: .*md5 [0-9a-f]{32}, expected 0{32}"):
        load_dataset("cifar10", tmp_path / "root2", download=True, cache_dir=cache)
    assert not (tmp_path / "root2").exists()  # nothing half-written is left, not even the folder it made


def test_download_network_failure_is_a_data_error(tmp_path, cache, monkeypatch):
    def fail(url, timeout=None):
        raise ds.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ds.urllib.request, "urlopen", fail)
    with pytest.raises(DataError, match=r"download failed: cannot download https://www\.cs\.toronto\.edu.*fetch "
                                        r"cifar-10-python\.tar\.gz elsewhere .*--data-root"):
        load_dataset("cifar10", tmp_path, download=True, cache_dir=cache)


def test_official_checksums_are_recorded():
    md5 = {d.filename: d.md5 for spec in ds.SPECS.values() for d in spec.downloads}
    assert md5["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert md5["cifar-100-python.tar.gz"] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert md5["train_32x32.mat"] == "e26dedcc434d2e4c54c9b2d4a06d8373"
    assert md5["test_32x32.mat"] == "eb5a983be6a315427106f1b164d9cef3"
    assert md5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert md5["tiny-imagenet-200.zip"] == "90528d7ca1a48142e341f4ef8d21d0de"


# ----------------------------------------------------------------------------- CLI
def test_cli_data_json_and_table(tmp_path, capsys, monkeypatch):
    from fastrobust.cli import main

    write_mnist(tmp_path / "root")
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    assert main(["data", "mnist", "--root", str(tmp_path / "root"), "--json", "--val-size", "10"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["name"] == "mnist" and record["num_classes"] == 10 and record["image_shape"] == [1, 28, 28]
    assert record["counts"] == {"train": 20, "val": 10, "test": 20}
    assert len(record["mean"]) == 1 and len(record["std"]) == 1 and "t" in record["source"]
    assert main(["data", "mnist", "--data-root", str(tmp_path / "root"), "--val-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "1x28x28" in out
    assert main(["data", "nosuch", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nosuch'" in err and "Traceback" not in err


def test_an_empty_class_folder_is_named_not_dropped(tmp_path, cache):
    write_tree(tmp_path / "tree", ["cat", "dog"], {"train": 2, "test": 1})
    (tmp_path / "tree" / "train" / "ant").mkdir()  # sorts first: dropping it would renumber nothing but lose a class
    (tmp_path / "tree" / "test" / "ant").mkdir()
    with pytest.raises(DataError, match=r"empty class folder\(s\) train/ant/ \(no images\)"):
        load_dataset("imagefolder", tmp_path / "tree", val_size=0, cache_dir=cache)


def test_image_errors_say_what_is_wrong_in_words(tmp_path, cache):
    write_tree(tmp_path / "t1", ["a", "b"], {"train": 2, "test": 1})
    (tmp_path / "t1" / "train" / "b" / "1.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as caught:
        load_dataset("imagefolder", tmp_path / "t1", val_size=0, cache_dir=cache)
    assert "corrupt or unreadable image" in str(caught.value) and "BytesIO" not in str(caught.value)
    write_tree(tmp_path / "t2", ["a", "b"], {"train": 2, "test": 1})
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "t2" / "train" / "b" / "1.png")
    with pytest.raises(DataError, match=r"image of another size .*1\.png.*: 5x5 pixels where the others are 8x8"):
        load_dataset("imagefolder", tmp_path / "t2", val_size=0, cache_dir=cache)


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, cache, monkeypatch):
    def fail(url, timeout=None):
        raise ds.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(ds.urllib.request, "urlopen", fail)
    root = tmp_path / "new" / "data"
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", root, download=True, cache_dir=cache)
    assert not (tmp_path / "new").exists()  # made for the download, removed with its failure
    assert "--download" not in str(caught.value)  # the download was just tried: no advice to run it again
    assert "--data-root DIR" in str(caught.value)
