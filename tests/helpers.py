"""Small synthetic data for fast trainer tests: learnable, class-dependent 8x8 colour patterns."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastrobust.data import Dataset, ImageSet


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
