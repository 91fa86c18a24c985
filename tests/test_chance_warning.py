"""evaluate() says when clean accuracy is at chance level (the model most likely expects another input range) and
checks the model's number of outputs against the data's class count; --normalization refuses a mean in 0..255."""

import pytest
import torch
from torch import nn

from fastrobust.data.datasets import Dataset, ImageSet
from fastrobust.errors import ConfigError
from fastrobust.evaluate import evaluate
from fastrobust.models.thirdparty import InputNormalization, parse_normalization


class ReadsTheLabel(nn.Module):
    """Logits over ``width`` classes peaked at the label that ``_data`` writes into pixel [0, 0, 0]; with
    ``scale`` = 1/255 it reads [0, 1] input as if it were 0..255 (predicts class 0: chance level)."""

    def __init__(self, width: int = 10, scale: float = 1.0):
        super().__init__()
        self.width, self.scale = width, scale
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        code = x[:, 0, 0, 0] * self.scale * 255 / 25  # images hold pixel 25 * label (uint8), fed as [0, 1]
        return -(code[:, None] - torch.arange(self.width, dtype=x.dtype)) ** 2 + self.anchor


def _data(n: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % classes
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = (25 * labels).to(torch.uint8)
    return images, labels


def test_a_model_fed_the_wrong_input_range_gets_the_chance_warning(capsys):
    data = _data(60)
    good = evaluate(ReadsTheLabel(), data, ["clean"], eps=8 / 255, progress=False)
    assert good["clean_acc"] == 1.0 and good["warnings"] == []
    wrong = evaluate(ReadsTheLabel(scale=1 / 255), data, ["clean"], eps=8 / 255, progress=False)
    assert wrong["clean_acc"] <= 0.15
    said = [w for w in wrong["warnings"] if "at chance level for 10 classes" in w]
    assert len(said) == 1 and "--normalization 0.5,0.5" in said[0] and "--normalization 0,1/255" in said[0]
    assert "normalization=(0.5, 0.5) of fastrobust.models.thirdparty.load_model" in said[0]  # the Python spelling too
    assert "at chance level" in capsys.readouterr().err


def test_no_chance_warning_on_few_points():
    record = evaluate(ReadsTheLabel(scale=1 / 255), _data(40), ["clean"], eps=8 / 255, progress=False)
    assert record["clean_acc"] <= 0.15 and record["warnings"] == []


def _dataset(images, labels, classes: int) -> Dataset:
    split = ImageSet(images, labels)
    empty = ImageSet(images[:0], labels[:0])
    return Dataset(name="toy", num_classes=classes, image_shape=(3, 4, 4), train=split, val=empty, test=split,
                   mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=0, flip=False, source="test", class_names=None)


def test_a_dataset_with_another_class_count_is_refused_like_the_cli():
    images, labels = _data(20)
    with pytest.raises(ConfigError, match="returns 1000 logits per image but the data has 10 classes"):
        evaluate(ReadsTheLabel(width=1000), _dataset(images, labels, 10), ["clean"], eps=8 / 255, progress=False)
    record = evaluate(ReadsTheLabel(), _dataset(images, labels, 10), ["clean"], eps=8 / 255, progress=False)
    assert record["clean_acc"] == 1.0


def test_a_split_that_knows_its_class_count_is_refused_like_its_dataset(tmp_path):
    """`evaluate(model, load_dataset(...).test)` only warned: the split did not carry the dataset's class count."""
    from fastrobust.data import load_dataset
    from helpers import write_cifar10_archive

    write_cifar10_archive(tmp_path / "cifar-10-python.tar.gz", per_batch=10)
    split = load_dataset("cifar10", tmp_path, val_size=0).test
    assert split.num_classes == 10
    with pytest.raises(ConfigError, match="returns 1000 logits per image but the data has 10 classes"):
        evaluate(ReadsTheLabel(width=1000), split, ["clean"], eps=8 / 255, progress=False)
    images, labels = _data(20)
    assert evaluate(ReadsTheLabel(), ImageSet(images, labels, num_classes=10), ["clean"], eps=8 / 255,
                    progress=False)["clean_acc"] == 1.0
    for bad in (0, 5, "10", True):  # labels reach 9, so 5 classes cannot hold them
        with pytest.raises(Exception, match="num_classes"):
            ImageSet(images, labels, num_classes=bad)


def test_labels_alone_far_below_the_logits_width_get_a_warning():
    data = _data(20)
    record = evaluate(ReadsTheLabel(width=1000), data, ["clean"], eps=8 / 255, progress=False)
    assert any("returns 1000 logits per image but the 20 labels are in 0..9" in w for w in record["warnings"])
    record = evaluate(ReadsTheLabel(width=20), data, ["clean"], eps=8 / 255, progress=False)
    assert record["warnings"] == []  # twice the label range: a subset of classes, no word


def test_normalization_with_a_mean_in_0_255_units_is_refused_with_the_scaled_values():
    with pytest.raises(ConfigError, match=r"mean 125.3 is in 0..255 units .* divide mean and std by 255 "
                                          r"\(0.4914,0.4824,0.4467,0.2471,0.2435,0.2616\)"):
        parse_normalization("125.3,123.0,113.9,63.0,62.1,66.7", 3)
    assert parse_normalization("0.4914,0.4822,0.4465,0.2471,0.2435,0.2616", 3).mean[0] == 0.4914


def test_the_documented_recipes_give_minus_one_to_one_and_0_255():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    for text, low, high in (("0.5,0.5", -1.0, 1.0), ("0,1/255", 0.0, 255.0)):
        chosen = parse_normalization(text, 3)
        seen = InputNormalization(nn.Identity(), chosen.mean, chosen.std)(x)
        assert torch.allclose(seen[0, :, 0, 0], torch.full((3,), low)), text
        assert torch.allclose(seen[0, :, 0, 2], torch.full((3,), high)), text
