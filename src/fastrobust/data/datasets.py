"""Datasets by name: where their files are looked for, how they are decoded, cached and split."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import numbers
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fastrobust.data import formats
from fastrobust.errors import ConfigError, DataError

CACHE_FORMAT = 3  # 3: splits of class-sorted sources stored class-interleaved (older caches are class-sorted)
VAL_SEED = 20240601  # fixed: the validation split never depends on the run seed


# --------------------------------------------------------------------------- public dataclasses
@dataclass(frozen=True)
class ImageSet:
    """One split: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N], and the dataset's class count when known
    (``load_dataset`` sets it, so ``evaluate`` can refuse a model built for another number of classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            floating = getattr(self.images, "is_floating_point", lambda: False)()
            hint = (": store float images in [0, 1] (float32 or float64) as (images * 255).round().to(torch.uint8)"
                    if floating else "")
            raise DataError(f"ImageSet.images must be uint8 [N, C, H, W], got {self.images.dtype} "
                            f"{list(self.images.shape)}{hint}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"ImageSet.labels must be int64 [N], got {self.labels.dtype} {list(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"mismatched counts: {len(self.images)} images but {len(self.labels)} labels")
        if self.num_classes is not None:
            if isinstance(self.num_classes, numbers.Integral) and not isinstance(self.num_classes, bool):
                object.__setattr__(self, "num_classes", int(self.num_classes))  # numpy ints as plain ints
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
                raise DataError(f"ImageSet.num_classes must be a positive int or None, got {self.num_classes!r}")
            if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
                raise DataError(f"ImageSet labels span {int(self.labels.min())}..{int(self.labels.max())}, outside "
                                f"0..{self.num_classes - 1} for num_classes={self.num_classes}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    source: str
    class_names: tuple[str, ...] | None
    official_order: bool = False  # the test split is in the order of the official test set (OFFICIAL_ORDER_READERS)

    def summary(self) -> dict:
        """A JSON-able description (what ``fastrobust data NAME --json`` prints)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "counts": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "source": self.source,
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "crop_padding": self.crop_padding,
            "flip": self.flip,
        }


# --------------------------------------------------------------------------- roots
def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root``, else ``$FASTROBUST_DATA``, else ``~/.cache/fastrobust/data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("FASTROBUST_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fastrobust" / "data"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The decoded-array cache: ``cache_dir``, else ``$FASTROBUST_CACHE``, else ``~/.cache/fastrobust/decoded``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get("FASTROBUST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fastrobust" / "decoded"


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Candidate:
    """One place a dataset may be: ``path`` must exist (plus ``requires``) for ``reader`` to read it."""

    path: Path
    reader: str
    description: str
    requires: tuple[Path, ...] = ()

    def exists(self) -> bool:
        return self.path.exists() and all(p.exists() for p in self.requires)


@dataclass(frozen=True)
class Download:
    url: str
    filename: str
    md5: str


@dataclass(frozen=True)
class Spec:
    name: str
    num_classes: int | None
    image_shape: tuple[int, int, int] | None
    crop_padding: int
    flip: bool
    candidates: Callable[[Path], list[Candidate]]
    downloads: tuple[Download, ...] = ()
    class_names: tuple[str, ...] | None = None
    homepage: str = ""


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(i) for i in range(10))


def _cifar10_candidates(root: Path) -> list[Candidate]:
    out = []
    for base in (root, root / "cifar10"):
        out.append(Candidate(base / "cifar-10-batches-py", "cifar10-python", "official python batches (extracted)"))
        out.append(Candidate(base / "cifar-10-python.tar.gz", "cifar10-python", "official python batches archive"))
    for path in (root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz", root / "cifar10-jpeg.tar.gz",
                 root / "cifar10-jpeg" / "CIFAR-10-images", root / "CIFAR-10-images"):
        out.append(Candidate(path, "cifar10-jpeg", "JPEG mirror CIFAR-10-images/{train,test}/<class>/*.jpg"))
    return out


def _cifar100_candidates(root: Path) -> list[Candidate]:
    out = []
    for base in (root, root / "cifar100"):
        out.append(Candidate(base / "cifar-100-python", "cifar100-python", "official python batches (extracted)"))
        out.append(Candidate(base / "cifar-100-python.tar.gz", "cifar100-python", "official python batches archive"))
    return out


def _svhn_candidates(root: Path) -> list[Candidate]:
    return [
        Candidate(base / "train_32x32.mat", "svhn-mat", "official cropped digits train_32x32.mat + test_32x32.mat",
                  requires=(base / "test_32x32.mat",))
        for base in (root, root / "svhn", root / "SVHN")
    ]


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_file(folder: Path, stem: str) -> Path:
    raw = folder / stem
    return raw if raw.exists() else folder / f"{stem}.gz"


def _mnist_candidates(root: Path) -> list[Candidate]:
    out = []
    for base in (root, root / "mnist", root / "MNIST" / "raw"):
        files = [_idx_file(base, stem) for stem in MNIST_FILES]
        out.append(Candidate(files[0], "mnist-idx", "official IDX files (train/t10k images and labels, .gz or raw)",
                             requires=tuple(files[1:])))
    for path in (root / "mnist-png" / "mnist-png.tar.gz", root / "mnist-png.tar.gz", root / "mnist-png" / "mnist-pngs",
                 root / "mnist-pngs"):
        out.append(Candidate(path, "mnist-png", "PNG mirror mnist-pngs/{train,test}/<digit>/*.png"))
    return out


def _tiny_candidates(root: Path) -> list[Candidate]:
    return [
        Candidate(root / "tiny-imagenet-200", "tiny-imagenet", "official layout (extracted)"),
        Candidate(root / "tiny-imagenet-200.zip", "tiny-imagenet", "official zip"),
        Candidate(root / "tiny-imagenet-200-sub50" / "tiny-imagenet-200-sub50.tar.gz", "tiny-imagenet",
                  "official layout, 50 train images per class"),
        Candidate(root / "tiny-imagenet-200-sub50.tar.gz", "tiny-imagenet", "official layout, 50 train images per class"),
    ]


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

SPECS: dict[str, Spec] = {
    "cifar10": Spec(
        "cifar10", 10, (3, 32, 32), 4, True, _cifar10_candidates,
        (Download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                  "c58f30108f718f92721af3b95e74349a"),),
        CIFAR10_CLASSES, "https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
    "cifar100": Spec(
        "cifar100", 100, (3, 32, 32), 4, True, _cifar100_candidates,
        (Download("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                  "eb9058c3a382ffc7106e4002c42a8d85"),),
        None, "https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
    "svhn": Spec(
        "svhn", 10, (3, 32, 32), 4, False, _svhn_candidates,
        (Download("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat",
                  "e26dedcc434d2e4c54c9b2d4a06d8373"),
         Download("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
                  "eb5a983be6a315427106f1b164d9cef3")),
        MNIST_CLASSES, "http://ufldl.stanford.edu/housenumbers/",
    ),
    "mnist": Spec(
        "mnist", 10, (1, 28, 28), 0, False, _mnist_candidates,
        (Download(_MNIST_URL + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
         Download(_MNIST_URL + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
         Download(_MNIST_URL + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
         Download(_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
        MNIST_CLASSES, "http://yann.lecun.com/exdb/mnist/",
    ),
    "tiny-imagenet": Spec(
        "tiny-imagenet", None, (3, 64, 64), 4, True, _tiny_candidates,
        (Download("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "tiny-imagenet-200.zip",
                  "90528d7ca1a48142e341f4ef8d21d0de"),),
        None, "http://cs231n.stanford.edu/",
    ),
    "imagefolder": Spec(
        "imagefolder", None, None, -1, True,
        lambda root: [Candidate(root, IMAGEFOLDER_READERS[None], "image folder tree or archive")],
    ),
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(SPECS)


# --------------------------------------------------------------------------- readers
@dataclass
class Raw:
    """Decoded arrays before splitting (numpy, uint8 NCHW / int64)."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str] | None = None
    files: list[Path] = field(default_factory=list)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None


def _read_cifar(path: Path, *, hundred: bool) -> Raw:
    if hundred:
        folder, train_names, test_names, label_key = "cifar-100-python", ["train"], ["test"], "fine_labels"
        meta_name, meta_key = "meta", "fine_label_names"
    else:
        folder, label_key = "cifar-10-batches-py", "labels"
        train_names, test_names = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta_name, meta_key = "batches.meta", "label_names"
    needed = set(train_names + test_names + [meta_name])
    if path.is_dir():
        blobs = {n: _read_bytes(path / n) for n in needed if (path / n).exists()}
        where = {n: str(path / n) for n in needed}
    else:
        members = formats.read_members(str(path), lambda rel: rel.rsplit("/", 1)[-1] in needed and folder in rel)
        blobs = {rel.rsplit("/", 1)[-1]: data for rel, data in members.items()}
        where = {n: f"{folder}/{n} in {path}" for n in needed}
    missing = [n for n in train_names + test_names if n not in blobs]
    if missing:
        raise DataError(f"{path}: missing CIFAR batch file(s) {missing}; the download may be incomplete")
    splits = {}
    for split, names in (("train", train_names), ("test", test_names)):
        parts = [formats.cifar_batch(blobs[n], what=where[n], label_key=label_key) for n in names]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    names = None
    if meta_name in blobs:
        names = formats.cifar_meta_names(blobs[meta_name], what=where[meta_name], key=meta_key)
    return Raw(splits, names)


def _read_svhn(path: Path) -> Raw:
    splits = {}
    for split, file in (("train", path), ("test", path.parent / "test_32x32.mat")):
        variables = formats.read_mat(file, names=("X", "y"))
        if "X" not in variables or "y" not in variables:
            raise DataError(f"{file}: expected variables 'X' and 'y', found {sorted(variables)}")
        x, y = variables["X"], variables["y"]
        if x.ndim != 4 or x.shape[2] != 3:
            raise DataError(f"{file}: 'X' must be [32, 32, 3, N], found {list(x.shape)}")
        if x.dtype != np.uint8:
            if x.size and (x.min() < 0 or x.max() > 255):
                raise DataError(f"{file}: 'X' values outside 0..255")
            x = x.astype(np.uint8)
        y = np.asarray(y).reshape(-1).astype(np.int64)
        if x.shape[3] != len(y):
            raise DataError(f"{file}: mismatched counts: {x.shape[3]} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() > 10):
            raise DataError(f"{file}: labels out of range: expected 1..10 (10 means digit 0), found {y.min()}..{y.max()}")
        splits[split] = (np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10)
    return Raw(splits, list(MNIST_CLASSES))


def _read_mnist_idx(path: Path) -> Raw:
    folder = path.parent
    arrays = {stem: formats.read_idx(_idx_file(folder, stem)) for stem in MNIST_FILES}
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{_idx_file(folder, prefix + '-images-idx3-ubyte')}: expected uint8 [N, H, W] images, "
                            f"found {x.dtype} {list(x.shape)}")
        if len(x) != len(y):
            raise DataError(f"{folder}: mismatched counts in {prefix} IDX files: {len(x)} images but {len(y)} labels")
        splits[split] = (np.ascontiguousarray(x[:, None]), y.reshape(-1).astype(np.int64))
    return Raw(splits, list(MNIST_CLASSES))


SPLIT_NAMES = ("train", "val", "test")
# image-folder readers by `channels` (None: RGB if any training image is in colour); the names enter the cache key
IMAGEFOLDER_READERS = {None: "imagefolder-any-colour", 1: "imagefolder-grey", 3: "imagefolder-rgb"}
# readers of the official files, which keep the files' order: the order of the official test set, by which a
# leaderboard's "first N points" are defined (image trees and mirrors are class-sorted copies: their order is not it)
OFFICIAL_ORDER_READERS = frozenset({"cifar10-python", "cifar100-python", "svhn-mat", "mnist-idx"})


def _read_image_tree(path: Path, *, class_order: tuple[str, ...] | None, mode: str | None,
                     by_name: bool = False) -> Raw:
    """``<prefix>/<split>/<class>/<image>`` from a folder or archive; class ids by ``class_order`` or sorted names.

    Images are stored class-interleaved (``interleave_classes``: the first image of every class, then the
    second, ..., each class in file-name order), so any prefix is class-balanced; with ``by_name`` by file name
    only (the MNIST PNG mirror names files by their index in the official files, so this restores that order).
    """
    members = formats.read_members(str(path), formats.is_image)
    layout: dict[str, dict[str, list[str]]] = {}
    prefixes = set()
    for rel in members:
        parts = rel.split("/")
        if len(parts) >= 3 and parts[-3] in SPLIT_NAMES:
            prefixes.add("/".join(parts[:-3]))
            layout.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(rel)
    if "train" not in layout or "test" not in layout:
        raise DataError(
            f"{path}: expected an image tree <split>/<class>/<image>.png|jpg with splits 'train' and 'test' "
            f"(found splits {sorted(layout) or 'none'} among {len(members)} image files)"
        )
    if len(prefixes) > 1:
        raise DataError(f"{path}: image trees under several folders {sorted(prefixes)}; keep one train/test tree")
    train_classes = sorted(layout["train"], key=formats.natural_key)
    if class_order is not None:
        unknown = sorted(set(train_classes) - set(class_order))
        if unknown:
            raise DataError(f"{path}: unexpected class folder(s) {unknown}; expected {list(class_order)}")
        names = list(class_order)
    else:
        names = train_classes
    index = {name: i for i, name in enumerate(names)}
    for name in names:
        if not layout["train"].get(name):
            raise DataError(f"{path}: empty class {name!r}: no training images in train/{name}/")
    if class_order is None and path.is_dir():  # a class folder without images would vanish from the classes
        root = path / next(iter(prefixes))  # "" is the folder itself
        empty = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and d.name not in layout["train"])
        if empty:
            raise DataError(f"{path}: empty class folder(s) {', '.join('train/' + e + '/' for e in empty)} (no "
                            "images): add its images or remove the folder; class ids come from the sorted folder names")
    if mode is None:  # generic trees: RGB if any training image is stored in colour, whatever the file order
        files = [rel for name in names for rel in layout["train"][name]]
        mode = "RGB" if any(_stored_in_colour(members[rel], rel, path) for rel in files) else "L"
    splits = {}
    size = None
    for split in SPLIT_NAMES:
        if split not in layout:
            continue
        extra = sorted(set(layout[split]) - set(index))
        if extra:
            raise DataError(f"{path}: {split}/ has class folder(s) {extra} that train/ does not have")
        files, labels = [], []
        for name in names:
            for rel in sorted(layout[split].get(name, []), key=lambda r: formats.natural_key(r.rsplit("/", 1)[-1])):
                files.append(rel)
                labels.append(index[name])
        if by_name:
            order = sorted(range(len(files)), key=lambda i: formats.natural_key(files[i].rsplit("/", 1)[-1]))
        else:
            order = interleave_classes(np.asarray(labels, dtype=np.int64)).tolist()
        files, labels = [files[i] for i in order], [labels[i] for i in order]
        blobs = [members.pop(rel) for rel in files]
        images = formats.decode_many(blobs, files, mode=mode, size=size, source=str(path))
        if len(images):
            size = (images.shape[2], images.shape[3])
        splits[split] = (images, np.asarray(labels, dtype=np.int64))
    return Raw(splits, names)


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _stored_in_colour(blob: bytes, name: str, source: Path) -> bool:
    """Whether an encoded image is stored in a colour mode (RGB, RGBA, CMYK, YCbCr, palette, ...); reads the
    header only."""


    try:
        with Image.open(io.BytesIO(blob)) as image:
            return image.mode not in GREY_MODES
    except Exception as error:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise DataError(f"corrupt or unreadable image {name} in {source}: {error}") from None


def _read_tiny(path: Path) -> Raw:
    def keep(rel: str) -> bool:
        return (rel.endswith(("wnids.txt", "val_annotations.txt")) or formats.is_image(rel)) and "/test/" not in rel

    members = formats.read_members(str(path), keep)
    wnid_files = [rel for rel in members if rel.rsplit("/", 1)[-1] == "wnids.txt"]
    if not wnid_files:
        raise DataError(f"{path}: no wnids.txt; expected the Tiny ImageNet layout tiny-imagenet-200/{{wnids.txt,train,val}}")
    prefix = wnid_files[0][: -len("wnids.txt")]
    wnids = [line.strip() for line in members[wnid_files[0]].decode("utf-8", "replace").splitlines() if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    annotations = members.get(prefix + "val/val_annotations.txt")
    if annotations is None:
        raise DataError(f"{path}: missing {prefix}val/val_annotations.txt (labels of the val split)")
    train_files, train_labels = [], []
    by_class: dict[str, list[str]] = {}
    for rel in members:
        if rel.startswith(prefix + "train/") and formats.is_image(rel):
            parts = rel[len(prefix):].split("/")
            by_class.setdefault(parts[1], []).append(rel)
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise DataError(f"{path}: train folder(s) {unknown[:5]} are not listed in wnids.txt")
    for wnid in wnids:
        files = sorted(by_class.get(wnid, []), key=lambda r: formats.natural_key(r.rsplit("/", 1)[-1]))
        if not files:
            raise DataError(f"{path}: empty class {wnid!r}: no images in {prefix}train/{wnid}/images/")
        train_files += files
        train_labels += [index[wnid]] * len(files)
    order = interleave_classes(np.asarray(train_labels, dtype=np.int64)).tolist()  # val/ keeps its official order
    train_files, train_labels = [train_files[i] for i in order], [train_labels[i] for i in order]
    test_files, test_labels = [], []
    for line in annotations.decode("utf-8", "replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        rel = prefix + "val/images/" + fields[0]
        if fields[1] not in index:
            raise DataError(f"{path}: val_annotations.txt labels {fields[0]} with {fields[1]!r}, not in wnids.txt")
        if rel not in members:
            raise DataError(f"{path}: val_annotations.txt lists {fields[0]} but {rel} is missing")
        test_files.append(rel)
        test_labels.append(index[fields[1]])
    order = sorted(range(len(test_files)), key=lambda i: formats.natural_key(test_files[i]))
    test_files = [test_files[i] for i in order]
    test_labels = [test_labels[i] for i in order]
    splits = {}
    for split, files, labels in (("train", train_files, train_labels), ("test", test_files, test_labels)):
        blobs = [members[rel] for rel in files]
        images = formats.decode_many(blobs, files, mode="RGB", size=(64, 64), source=str(path))
        splits[split] = (images, np.asarray(labels, dtype=np.int64))
    return Raw(splits, wnids)


def _read(candidate: Candidate) -> Raw:
    path = candidate.path
    if candidate.reader == "cifar10-python":
        return _read_cifar(path, hundred=False)
    if candidate.reader == "cifar100-python":
        return _read_cifar(path, hundred=True)
    if candidate.reader == "svhn-mat":
        return _read_svhn(path)
    if candidate.reader == "mnist-idx":
        return _read_mnist_idx(path)
    if candidate.reader == "cifar10-jpeg":
        return _read_image_tree(path, class_order=CIFAR10_CLASSES, mode="RGB")
    if candidate.reader == "mnist-png":
        return _read_image_tree(path, class_order=MNIST_CLASSES, mode="L", by_name=True)
    if candidate.reader == "tiny-imagenet":
        return _read_tiny(path)
    if candidate.reader in IMAGEFOLDER_READERS.values():
        mode = {"imagefolder-grey": "L", "imagefolder-rgb": "RGB"}.get(candidate.reader)
        return _read_image_tree(path, class_order=None, mode=mode)
    raise AssertionError(candidate.reader)  # pragma: no cover


# --------------------------------------------------------------------------- cache
def _stat_files(candidate: Candidate) -> list[tuple[str, int, int]]:
    paths = [candidate.path, *candidate.requires]
    out = []
    for path in paths:
        if path.is_dir():
            for folder, _, files in os.walk(path):
                for name in sorted(files):
                    full = os.path.join(folder, name)
                    st = os.stat(full)
                    out.append((full, st.st_size, st.st_mtime_ns))
        else:
            st = path.stat()
            out.append((str(path.resolve()), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _cache_key(name: str, candidate: Candidate) -> str:
    payload = json.dumps([CACHE_FORMAT, name, candidate.reader, _stat_files(candidate)])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_text(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in [0,1] units from a 256-bin histogram per channel."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        total = hist.sum()
        if total == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5 or 1.0)
    return means, stds


def _load_or_decode(name: str, candidate: Candidate, cache_root: Path) -> tuple[dict, dict]:
    key = _cache_key(name, candidate)
    folder = cache_root / f"{name}-{key}"
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            arrays = {}
            for split in meta["splits"]:
                x = np.load(folder / f"{split}_images.npy", allow_pickle=False)
                y = np.load(folder / f"{split}_labels.npy", allow_pickle=False)
                arrays[split] = (x, y)
            return meta, arrays
        except (OSError, ValueError, KeyError):
            pass  # damaged cache entry: decode again and overwrite it
    raw = _read(candidate)
    _validate(raw, candidate, name)
    means, stds = _channel_stats(raw.splits["train"][0])
    meta = {
        "format": CACHE_FORMAT, "name": name, "source": str(candidate.path), "reader": candidate.reader,
        "splits": sorted(raw.splits), "class_names": raw.class_names, "mean": means, "std": stds,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for split, (x, y) in raw.splits.items():
            _atomic_save(folder / f"{split}_images.npy", x)
            _atomic_save(folder / f"{split}_labels.npy", y)
        _atomic_text(meta_path, json.dumps(meta))  # written last: marks the entry complete
    except OSError as error:
        warnings.warn(f"could not write the decoded cache {folder}: {error}", stacklevel=3)
    return meta, raw.splits


def _validate(raw: Raw, candidate: Candidate, name: str) -> None:
    spec = SPECS[name]
    num_classes = spec.num_classes or len(raw.class_names or [])
    for split, (x, y) in raw.splits.items():
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{candidate.path}: {split} images must be uint8 [N, C, H, W], found {x.dtype} {list(x.shape)}")
        if len(x) != len(y):
            raise DataError(f"{candidate.path}: mismatched counts in {split}: {len(x)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{candidate.path}: {split} labels out of range: found {int(y.min())}..{int(y.max())}, "
                            f"expected 0..{num_classes - 1}")
        if spec.image_shape is not None and tuple(x.shape[1:]) != spec.image_shape:
            raise DataError(f"{candidate.path}: {split} images have shape {list(x.shape[1:])}, "
                            f"expected {list(spec.image_shape)} for {name}")
    counts = np.bincount(raw.splits["train"][1], minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        label = raw.class_names[empty[0]] if raw.class_names and empty[0] < len(raw.class_names) else int(empty[0])
        raise DataError(f"{candidate.path}: empty class {label!r} (id {int(empty[0])}): no training images")
    shapes = {tuple(x.shape[1:]) for x, _ in raw.splits.values() if len(x)}
    if len(shapes) > 1:
        raise DataError(f"{candidate.path}: splits have different image shapes {sorted(shapes)}")


# --------------------------------------------------------------------------- download
def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Retry(Exception):
    """A transfer that broke off (connection reset, timeout, short body): try again, resuming."""


def download_file(item: Download, folder: Path, *, timeout: float = 60.0, attempts: int = 3,
                  progress: bool | None = None) -> Path:
    """Fetch ``item.url`` into ``folder/item.filename`` and verify its md5; DataError on failure.

    The bytes go to ``FILE.part``; a transfer that breaks off is resumed with an HTTP Range request (or
    restarted when the server ignores it), up to ``attempts`` times, and a later call resumes what an earlier
    one left in ``FILE.part``. ``FILE`` itself appears only complete and verified (``os.replace``); a checksum
    mismatch deletes the part. Concurrent calls (several ranks) wait for each other on a lock of ``folder``.
    ``progress``: a tqdm bar on stderr (None: only when stderr is a terminal)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / item.filename
    with _folder_lock(folder):
        if target.exists() and _md5(target) == item.md5:
            return target
        part = folder / f"{item.filename}.part"
        print(f"fastrobust: downloading {item.url} -> {target}", file=sys.stderr)
        problem: BaseException | None = None
        for _ in range(attempts):
            try:
                _fetch(item, part, timeout=timeout, progress=progress)
                problem = None
                break
            except _Retry as error:
                problem = error
            except urllib.error.HTTPError as error:  # 404, 403, ...: retrying will not help
                raise DataError(f"cannot download {item.url}: HTTP {error.code} {error.reason}") from None
            except (urllib.error.URLError, OSError) as error:  # no network, DNS, refused: say so at once
                raise DataError(f"cannot download {item.url}: {getattr(error, 'reason', error)}") from None
        if problem is not None:
            kept = part.stat().st_size if part.exists() else 0
            raise DataError(f"cannot download {item.url}: {problem} ({attempts} attempts; the {kept} bytes fetched "
                            f"are kept in {part} and the next try resumes them)")
        digest = _md5(part)
        if digest != item.md5:
            part.unlink()
            raise DataError(f"download of {item.url} has md5 {digest}, expected {item.md5}; "
                            f"the file was discarded, try again or fetch it by hand into {folder}")
        os.replace(part, target)
    return target


def _fetch(item: Download, part: Path, *, timeout: float, progress: bool | None) -> None:
    """One HTTP transfer into ``part``, resuming from its current size when the server honours Range."""


    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(item.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the part is complete already, or longer than the file: start over
            part.unlink()
            raise _Retry("the server refused to resume (HTTP 416); restarting") from None
        raise
    with response:
        status = getattr(response, "status", None) or 200
        if status != 206:
            have = 0  # the server sent the whole file: restart the part
        headers = getattr(response, "headers", None) or {}
        length = headers.get("Content-Length")
        total = have + int(length) if length and str(length).isdigit() else None
        written = have
        try:
            with open(part, "ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=item.filename,
                    disable=None if progress is None else not progress, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    written += len(block)
                    bar.update(len(block))
        except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
            raise _Retry(f"the transfer broke off after {written} bytes ({type(error).__name__})") from None
    if total is not None and written < total:
        raise _Retry(f"the transfer broke off after {written} of {total} bytes")


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on the folder itself (fcntl.flock on its descriptor; nothing is created in it)."""
    try:
        import fcntl  # posix: absent on Windows
    except ImportError:  # Windows: no lock
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- splitting
def _balanced_order(labels: np.ndarray, num_classes: int, rank: np.ndarray) -> np.ndarray:
    """Indices sorted round-robin over classes by their ``rank`` within the class."""
    return np.lexsort((labels, rank))  # primary: rank, secondary: class


def _rank_within_class(labels: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """For each sample, its position within its class when the class is ordered by ``priority``."""
    order = np.lexsort((priority, labels))
    rank = np.empty(len(labels), dtype=np.int64)
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank[order] = np.arange(len(labels)) - starts
    return rank


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """The class-interleaved order of a split whose source lists its images class by class.

    Round-robin over the classes in class-id order, each class in its own (file) order: the first image of
    class 0, of class 1, ..., then the second of each; a class that runs out drops out of the rotation. Any
    prefix of the result is then as class-balanced as the counts allow.

    Args:
        labels: int64 [N] class ids in file order.

    Returns:
        int64 [N] indices into ``labels``, the new order.
    """
    rank = _rank_within_class(labels, np.arange(len(labels)))
    return _balanced_order(labels, int(labels.max()) + 1 if len(labels) else 0, rank)


def balanced_take(labels: np.ndarray, count: int, num_classes: int, *, seed: int | None) -> np.ndarray:
    """``count`` indices balanced across classes (round-robin), sorted; random within class if ``seed``."""
    n = len(labels)
    if seed is None:
        priority = np.arange(n)
    else:
        priority = np.random.default_rng(seed).permutation(n)
    rank = _rank_within_class(labels, priority)
    chosen = _balanced_order(labels, num_classes, rank)[:count]
    return np.sort(chosen)


def balanced_head(images: torch.Tensor, labels: torch.Tensor, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` points of a split taken round-robin over its classes (the first of each class,
    then the second, ...), kept in split order; the whole split when ``count`` is None or not smaller.

    Use this instead of ``images[:count]`` on a split whose order you do not know: splits decoded from
    class-sorted sources are stored class-interleaved (a prefix is balanced; this returns that prefix), but an
    official order (CIFAR-10's python batches, MNIST IDX, SVHN) or a split of your own may be class-sorted.
    """
    if count is None or count >= len(labels):
        return images, labels
    y = labels.detach().cpu().numpy()
    num_classes = int(y.max()) + 1 if len(y) else 0
    idx = torch.from_numpy(balanced_take(y, count, num_classes, seed=None)).to(labels.device)
    return images[idx.to(images.device)], labels[idx]


def _check_count(value, *, name: str, allow_zero: bool) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number") from None
    value = int(value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be {'zero or ' if allow_zero else ''}positive")
    return value


# --------------------------------------------------------------------------- load_dataset
def _how_to_provide(spec: Spec) -> str:
    """The fix when ``spec``'s files are not found: where to get them and how to point to them."""
    urls = ", ".join(d.url for d in spec.downloads)
    return (f"Fix: put the official files ({urls}) in a folder and give it with --data-root DIR or "
            f"FASTROBUST_DATA=DIR, or leave both unset to download them once into ~/.cache/fastrobust/data "
            f"(`fastrobust data {spec.name} --download --data-root DIR` fetches them into DIR)")


def _download_failed(key: str, spec: Spec, error: DataError) -> str:
    """One short line for a failed download: what failed, and the two ways on."""
    files = ", ".join(d.filename for d in spec.downloads)
    return (f"{key}: download failed: {error}. Fix: run it again with a network (a partial download resumes), or "
            f"fetch {files} elsewhere and give its folder with --data-root DIR or FASTROBUST_DATA=DIR")


def _relative(path: Path, root: Path) -> str:
    """``path`` as a name under ``root`` when it is one (shorter messages), else in full."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def locate(name: str, root: Path) -> tuple[Candidate | None, list[Candidate]]:
    """The first existing candidate for ``name`` under ``root``, and every candidate looked at."""
    candidates = SPECS[name].candidates(root)
    for candidate in candidates:
        if candidate.exists():
            return candidate, candidates
    return None, candidates


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_size: int = 1000,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load dataset ``name`` as uint8 tensors, decoded once into a cache; see docs/data.md.

    Args:
        name: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``tiny-imagenet`` or ``imagefolder``
            (``available_datasets()``).
        root: the data folder (default None: ``$FASTROBUST_DATA``, else ``~/.cache/fastrobust/data``).
        val_size: training images held out as the validation split (default 1000), class-balanced; model
            selection uses it, never the test split.
        train_subset, test_subset: use only this many images of the split (default None: all), class-balanced.
        download: fetch the official files when missing (md5 verified, resumable). None (default): only into the
            user's cache folder, i.e. when neither ``root`` nor ``$FASTROBUST_DATA`` names a data root (an explicit
            root is an offline copy: nothing is fetched into it).
        cache_dir: where decoded tensors are kept (default: under the user's cache folder).
        channels: imagefolder only: None (default) gives RGB when any training image is in colour and greyscale
            when all are grey; 1 or 3 forces greyscale or RGB.

    Returns:
        A ``Dataset`` with ``train``, ``val`` and ``test`` ``ImageSet`` splits (uint8 ``[N, C, H, W]``, int64
        labels), ``num_classes``, ``image_shape``, the train split's ``mean``/``std`` and its standard
        augmentation.

    Raises:
        DataError: the data is missing, damaged or cannot be fetched, in one line saying where to put it.
        ConfigError: a bad argument.

    Example:
        >>> data = load_dataset("cifar10", test_subset=1000)
        >>> data.test.images.shape, data.num_classes
    """
    key = str(name).strip().lower().replace("_", "-")
    key = {"tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet", "cifar-10": "cifar10",
           "cifar-100": "cifar100", "image-folder": "imagefolder"}.get(key, key)
    if key not in SPECS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}")
    spec = SPECS[key]
    if channels is not None and key != "imagefolder":
        raise ConfigError(f"channels={channels!r} applies to imagefolder only: {key} has a fixed channel count")
    val_size = _check_count(val_size, name="val_size", allow_zero=True)
    train_subset = _check_count(train_subset, name="train_subset", allow_zero=False)
    test_subset = _check_count(test_subset, name="test_subset", allow_zero=False)

    if key == "imagefolder":
        if root is None or str(root) == "":
            raise DataError("imagefolder needs root: the folder (or .tar/.tar.gz) holding <split>/<class>/<image> files")
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise DataError(f"imagefolder root {root_path} does not exist; expected a folder or .tar/.tar.gz "
                            f"with train/<class>/*.png|jpg and test/<class>/*.png|jpg")
        if channels not in IMAGEFOLDER_READERS:
            raise ConfigError(f"channels={channels!r} must be 1 (greyscale), 3 (RGB) or None (RGB if any training "
                              "image is in colour)")
        candidate = Candidate(root_path, IMAGEFOLDER_READERS[channels], "image folder tree or archive")
    else:
        explicit = root is not None and str(root) != "" or bool(os.environ.get("FASTROBUST_DATA"))
        if download is None:
            download = not explicit
        root_path = resolve_root(root)
        if explicit and not root_path.exists() and not download:
            raise DataError(f"data root {root_path} does not exist (given by "
                            f"{'--data-root / the root argument' if root is not None else 'FASTROBUST_DATA'}); "
                            f"create it and put the {key} files there. {_how_to_provide(spec)}")
        if root_path.exists() and not root_path.is_dir():
            raise DataError(f"data root {root_path} is not a folder")
        candidate, looked = locate(key, root_path)
        if candidate is None and download:
            missing = [p for p in (root_path, *root_path.parents) if not p.exists()]  # made by the download
            try:
                for item in spec.downloads:
                    download_file(item, root_path)
            except DataError as error:
                for folder in missing:  # innermost first; a partial download (FILE.part) stays, to be resumed
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise DataError(_download_failed(key, spec, error)) from None
            candidate, looked = locate(key, root_path)
        if candidate is None:
            places = ", ".join(_relative(c.path, root_path) + (f" (+ {', '.join(p.name for p in c.requires)})"
                                                                if c.requires else "") for c in looked)
            raise DataError(f"{key} not found under data root {root_path} (looked for {places}). "
                            f"{_how_to_provide(spec)}")

    cache_root = resolve_cache_dir(cache_dir)
    meta, arrays = _load_or_decode(key, candidate, cache_root)
    class_names = meta.get("class_names")
    num_classes = spec.num_classes or len(class_names)
    if spec.class_names is not None:
        class_names = list(spec.class_names)

    train_x, train_y = arrays["train"]
    test_x, test_y = arrays["test"]
    if "val" in arrays:  # an image tree with its own val/ folder: use it as given
        val_x, val_y = arrays["val"]
    else:
        if val_size >= len(train_y):
            raise ConfigError(f"val_size={val_size} leaves no training images ({len(train_y)} in {key} train); "
                              f"use a smaller val_size")
        val_idx = balanced_take(train_y, val_size, num_classes, seed=VAL_SEED)
        keep = np.ones(len(train_y), dtype=bool)
        keep[val_idx] = False
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        if val_size:
            train_x, train_y = train_x[keep], train_y[keep]
    if train_subset is not None:
        if train_subset > len(train_y):
            raise ConfigError(f"train_subset={train_subset} is larger than the {len(train_y)} training images "
                              f"left after the validation split")
        idx = balanced_take(train_y, train_subset, num_classes, seed=None)
        train_x, train_y = train_x[idx], train_y[idx]
    if test_subset is not None:
        if test_subset > len(test_y):
            raise ConfigError(f"test_subset={test_subset} is larger than the {len(test_y)} test images")
        idx = balanced_take(test_y, test_subset, num_classes, seed=None)
        test_x, test_y = test_x[idx], test_y[idx]

    def to_set(x: np.ndarray, y: np.ndarray) -> ImageSet:
        return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
                        num_classes=int(num_classes))

    image_shape = tuple(int(s) for s in arrays["train"][0].shape[1:])
    crop = spec.crop_padding if spec.crop_padding >= 0 else max(image_shape[1] // 8, 0)
    return Dataset(
        name=key,
        num_classes=int(num_classes),
        image_shape=image_shape,
        train=to_set(train_x, train_y),
        val=to_set(val_x, val_y),
        test=to_set(test_x, test_y),
        mean=tuple(float(m) for m in meta["mean"]),
        std=tuple(float(s) for s in meta["std"]),
        crop_padding=int(crop),
        flip=spec.flip,
        source=f"{candidate.path} ({candidate.description})",
        class_names=tuple(class_names) if class_names else None,
        official_order=candidate.reader in OFFICIAL_ORDER_READERS,
    )
