"""Test helpers: small synthetic data for fast trainer tests (learnable, class-dependent 8x8 colour patterns),
writers of the official CIFAR-10 format and of image folders, a simulated trainer crash, and a small fitted
classifier for attack tests."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch

from fastrobust.data import Dataset, ImageSet
from fastrobust.data.datasets import CIFAR10_CLASSES


def synthetic_split(n: int, classes: int, seed: int, size: int = 8) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(classes, 3, size, size, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n) % classes
    noise = torch.rand(n, 3, size, size, generator=g) * 0.6
    images = (0.4 * prototypes[labels] + noise).clamp(0, 1)
    return ImageSet((images * 255).round().to(torch.uint8), labels.long())


def synthetic_dataset(train: int = 192, val: int = 64, test: int = 64, classes: int = 4) -> Dataset:
    return Dataset(
        name="synthetic", num_classes=classes, image_shape=(3, 8, 8),
        train=synthetic_split(train, classes, 0), val=synthetic_split(val, classes, 1),
        test=synthetic_split(test, classes, 2), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        crop_padding=1, flip=True, source="synthetic", class_names=None,
    )


def train_tinycnn_once(dataset: Dataset, base: Path, method: str, activation: str = "relu",
                       epochs: int = 5) -> tuple[dict, Path]:
    """Train tinycnn (lr 0.05 cosine, batch 128, seed 0) once per pytest session under ``base``; returns the
    test record of result.json and the run folder. The end-to-end tests of several files share these runs."""
    from fastrobust.train import TrainConfig, train

    out = base / "cheap-robustness-e2e" / f"{method}-{activation}-{epochs}"
    if not (out / "result.json").is_file():
        config = TrainConfig(method=method, activation=activation, model="tinycnn", dataset="cifar10", epochs=epochs,
                             batch_size=128, lr=0.05, schedule="cosine", device="cpu", out=str(out), seed=0)
        train(config, dataset=dataset, progress=False, log=lambda _: None)
    return json.loads((out / "result.json").read_text())["test"], out


# ----------------------------------------------------------------------------- the official CIFAR format
class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as the official CIFAR batches were written."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the official files (numpy 1) say numpy.core
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_arrays(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(i % num_classes) for i in range(n)]
    return data, labels


def write_cifar10(folder, per_batch=20, labels_fn=None):
    folder.mkdir(parents=True, exist_ok=True)
    expected = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data, labels = cifar_arrays(per_batch, 10, k)
        if labels_fn:
            labels = labels_fn(name, labels)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{k}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(py2_pickle(batch))
        split = "test" if name == "test_batch" else "train"
        expected[split][0].append(data)
        expected[split][1].extend(labels)
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return {k: (np.concatenate(v[0]).reshape(-1, 3, 32, 32), np.asarray(v[1])) for k, v in expected.items()}


def make_tar(source_dir, archive, arcname):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_dir, arcname=arcname)


def write_cifar10_archive(archive: Path, per_batch: int = 10) -> dict:
    """``cifar-10-python.tar.gz`` in the official layout (cifar-10-batches-py/, Python 2 pickles) holding
    5 x ``per_batch`` training and ``per_batch`` test images; returns {split: (images NCHW, labels)}."""
    folder = archive.parent / f".{archive.name}.src" / "cifar-10-batches-py"
    expected = write_cifar10(folder, per_batch=per_batch)
    make_tar(folder, archive, "cifar-10-batches-py")
    return expected


def write_image_folder(root: Path, classes: list[str], counts: dict[str, int], *, size: int = 8,
                       seed: int = 0) -> None:
    """``root/<split>/<class>/<i>.png`` with random RGB pixels, ``counts[split]`` images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@contextlib.contextmanager
def crash_at_step(monkeypatch, step: int):
    """Inside the block the trainer raises "simulated crash" at global step ``step`` (after the checkpoint
    before it); the block must end in that crash."""
    import pytest

    from fastrobust.train import Trainer

    original = Trainer._step

    def crashing(self, x, y):
        if self.global_step == step:
            raise RuntimeError("simulated crash")
        return original(self, x, y)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield


def fit_and_keep_correct(model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                         y_test: torch.Tensor, *, epochs: int, min_accuracy: float,
                         shuffle: torch.Generator | None = None):
    """Adam (lr 1e-2, batches of 100) for ``epochs`` (in a new random order per epoch when ``shuffle`` is given),
    then eval mode without gradients; asserts the test accuracy and returns (model, the correctly classified
    test images, their labels): what attack tests start from."""
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=shuffle) if shuffle is not None else torch.arange(len(y_train))
        for i in range(0, len(y_train), 100):
            idx = order[i:i + 100]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        correct = model(x_test).argmax(1) == y_test
    assert correct.float().mean() > min_accuracy
    return model, x_test[correct], y_test[correct]
