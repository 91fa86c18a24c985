"""The channel count of an image folder does not depend on file or archive member order (issue 13, kind 7):
RGB when any training image is stored in colour, greyscale when all are grey, or what the user asks for."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastrobust.cli import main
from fastrobust.data import load_dataset
from fastrobust.errors import ConfigError


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(colour: bool = True) -> dict[str, bytes]:
    """train/{a,b}/*.png and test/{a,b}/*.png; one training image of class a is greyscale, the rest RGB (or all
    greyscale with ``colour=False``)."""
    rng = np.random.default_rng(0)
    files = {}
    for split, count in (("train", 3), ("test", 2)):
        for label in ("a", "b"):
            for i in range(count):
                grey = not colour or (split == "train" and label == "a" and i == 0)
                shape = (6, 6) if grey else (6, 6, 3)
                files[f"data/{split}/{label}/{i}.png"] = _png(rng.integers(0, 256, size=shape, dtype=np.uint8))
    return files


def _tar(path, files: dict[str, bytes], order: list[str]) -> None:
    with tarfile.open(path, "w") as archive:
        for name in order:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            archive.addfile(info, io.BytesIO(files[name]))


def test_two_archives_of_the_same_files_in_other_orders_give_the_same_channels(tmp_path):
    files = _files()
    grey_first = sorted(files, key=lambda name: name != "data/train/a/0.png")
    colour_first = sorted(files, key=lambda name: name == "data/train/a/0.png")
    _tar(tmp_path / "grey-first.tar", files, grey_first)
    _tar(tmp_path / "colour-first.tar", files, colour_first)
    a = load_dataset("imagefolder", tmp_path / "grey-first.tar", val_size=0, cache_dir=tmp_path / "cache")
    b = load_dataset("imagefolder", tmp_path / "colour-first.tar", val_size=0, cache_dir=tmp_path / "cache")
    assert a.image_shape == b.image_shape == (3, 6, 6)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    grey = a.train.images[0]  # train/a/0.png: three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_all_grey_stays_one_channel_and_the_user_can_choose(tmp_path, capsys):
    files = _files(colour=False)
    _tar(tmp_path / "grey.tar", files, list(files))
    assert load_dataset("imagefolder", tmp_path / "grey.tar", val_size=0, cache_dir=tmp_path / "c").image_shape == (1, 6, 6)
    assert load_dataset("imagefolder", tmp_path / "grey.tar", val_size=0, cache_dir=tmp_path / "c",
                        channels=3).image_shape == (3, 6, 6)
    mixed = _files()
    _tar(tmp_path / "mixed.tar", mixed, list(mixed))
    asked = load_dataset("imagefolder", tmp_path / "mixed.tar", val_size=0, cache_dir=tmp_path / "c", channels=1)
    assert asked.image_shape == (1, 6, 6)
    assert main(["data", "imagefolder", "--root", str(tmp_path / "mixed.tar"), "--cache-dir", str(tmp_path / "c"),
                 "--val-size", "0", "--channels", "1", "--json"]) == 0
    assert '"image_shape": [1, 6, 6]' in capsys.readouterr().out
    with pytest.raises(ConfigError, match="channels=2 must be 1"):
        load_dataset("imagefolder", tmp_path / "mixed.tar", channels=2)
    with pytest.raises(ConfigError, match="applies to imagefolder only"):
        load_dataset("cifar10", tmp_path, channels=1)
