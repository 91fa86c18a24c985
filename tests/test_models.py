"""The model zoo: shapes, gradients, normalisation, config round trip, hook names, parameter counts, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrobust.cli import main as cli_main
from fastrobust.errors import ConfigError
from fastrobust.models import available_models, count_parameters, create

NAMES = ["tinycnn", "smallcnn", "preactresnet18", "resnet18", "resnet34", "resnet50", "wrn28_10", "wrn34_10",
         "wideresnet"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
# Published parameter counts of the CIFAR-10 variants (10 classes, 32x32 RGB).
PUBLISHED = {
    "preactresnet18": 11_171_146,  # without the final BN: ours adds it (+1,024), see resnet.py
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "wrn28_10": 36_479_194,
    "wrn34_10": 46_160_474,
}
EXACT = {**PUBLISHED, "preactresnet18": 11_172_170, "wideresnet": 46_160_474, "tinycnn": 61_338,
         "smallcnn": 427_978}


def _meta(name, **kwargs):
    with torch.device("meta"):
        return create(name, **kwargs)


def test_available_models():
    assert available_models() == NAMES


@pytest.mark.parametrize("bad", ["resnet19", "vgg16", "", None])
def test_unknown_model_raises_with_the_list(bad):
    with pytest.raises(ConfigError) as info:
        create(bad)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet18", {"depth": 34}, "unknown keyword.*depth.*no model-specific options"),
        ("wrn34_10", {"widen_factor": 4}, "widen_factor.*accepts dropout"),
        ("wideresnet", {"depth": 33}, "6n\\+4"),
        ("wideresnet", {"depth": 4}, "6n\\+4"),
        ("wideresnet", {"widen_factor": 0}, "widen_factor"),
        ("wideresnet", {"dropout": 1.0}, "dropout"),
        ("smallcnn", {"dropout": -0.1}, "dropout"),
        ("tinycnn", {"width": 2.5}, "width"),
        ("tinycnn", {"num_classes": 0}, "num_classes"),
        ("tinycnn", {"num_classes": True}, "num_classes"),
        ("tinycnn", {"in_channels": "x"}, "in_channels"),
        ("tinycnn", {"mean": (0.5, 0.5)}, "mean has 2 values.*in_channels=3"),
        ("tinycnn", {"std": (0.5, 0.0, 0.5)}, "std.*positive"),
        ("tinycnn", {"std": "abc"}, "std"),
        ("smallcnn", {"image_size": 12}, "image_size >= 14"),
    ],
)
def test_bad_arguments_raise_config_error(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create(name, **kwargs)


def test_aliases_and_case():
    assert create("PreAct_ResNet18", num_classes=3).fastrobust_config["name"] == "preactresnet18"
    assert _meta("WRN-34-10").fastrobust_config["name"] == "wrn34_10"


def _forward_backward(model, x, num_classes):
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(x.shape[0]) % num_classes).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} receives no gradient (unused parameter)"
        assert torch.isfinite(p.grad).all(), pname
    return out


CASES = [
    # name, batch, channels, size, kwargs
    ("tinycnn", 8, 3, 32, {}),
    ("tinycnn", 8, 1, 28, {}),
    ("smallcnn", 4, 3, 32, {}),
    ("smallcnn", 4, 1, 28, {}),
    ("preactresnet18", 2, 3, 32, {}),
    ("resnet18", 2, 3, 32, {}),
    ("resnet18", 2, 3, 64, {"num_classes": 200}),
    ("resnet34", 2, 3, 32, {}),
    ("resnet50", 2, 3, 32, {"num_classes": 100}),
    ("resnet50", 2, 3, 64, {"num_classes": 200}),
    ("wrn28_10", 2, 3, 32, {}),
    ("wrn34_10", 2, 3, 32, {}),
    ("wideresnet", 2, 3, 32, {"depth": 16, "widen_factor": 2, "dropout": 0.3}),
    ("wideresnet", 2, 3, 64, {"depth": 10, "widen_factor": 1}),
]


@pytest.mark.parametrize("name, batch, channels, size, kwargs", CASES, ids=lambda v: str(v))
def test_forward_backward(name, batch, channels, size, kwargs):
    torch.manual_seed(0)
    model = create(name, in_channels=channels, image_size=size, **kwargs)
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    _forward_backward(model, x, kwargs.get("num_classes", 10))


@pytest.mark.parametrize("name, stage", [("resnet18", "layer4"), ("resnet50", "layer4"),
                                         ("preactresnet18", "layer4"), ("wideresnet", "block3")])
def test_64x64_stem_downsamples_the_first_stage(name, stage):
    """image_size >= 64: the first stage has stride 2, so from then on the maps have their 32x32 sizes."""
    extra = {"depth": 10, "widen_factor": 1} if name == "wideresnet" else {}
    sizes = {}
    for image_size in (32, 64):
        model = create(name, image_size=image_size, **extra).eval()
        first = model.get_submodule("block1" if name == "wideresnet" else "layer1")
        seen = {}
        first.register_forward_hook(lambda m, i, o: seen.__setitem__("first", o.shape[-1]))
        model.get_submodule(stage).register_forward_hook(lambda m, i, o: seen.__setitem__("last", o.shape[-1]))
        with torch.no_grad():
            model(torch.rand(1, 3, image_size, image_size))
        sizes[image_size] = seen
    assert sizes[32] == {"first": 32, "last": 8 if name == "wideresnet" else 4}
    assert sizes[64] == {"first": 32, "last": 8 if name == "wideresnet" else 4}


def test_global_pooling_accepts_other_image_sizes():
    model = create("resnet18").eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 40, 40)).shape == (2, 10)
        assert model(torch.rand(2, 3, 48, 56)).shape == (2, 10)


def test_smallcnn_wrong_size_is_a_clear_error():
    model = create("smallcnn", in_channels=1, image_size=28)
    assert model.fc1.in_features == 64 * 4 * 4
    assert create("smallcnn").fc1.in_features == 64 * 5 * 5
    with pytest.raises(ValueError, match="image_size=32"):
        model(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("name", NAMES)
def test_hook_names(name):
    model = _meta(name)
    conv1 = model.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d) and conv1.in_channels == 3
    stage = "block1" if name in ("wrn28_10", "wrn34_10", "wideresnet") else "layer1"
    assert isinstance(model.get_submodule(stage), nn.Module)


@pytest.mark.parametrize("name", ["tinycnn", "smallcnn", "preactresnet18", "wideresnet"])
def test_normalisation_inside_forward(name):
    torch.manual_seed(0)
    extra = {"depth": 10, "widen_factor": 1} if name == "wideresnet" else {}
    normalised = create(name, mean=CIFAR_MEAN, std=CIFAR_STD, **extra).eval()
    identity = create(name, **extra).eval()
    assert torch.equal(identity.mean, torch.zeros(1, 3, 1, 1)) and torch.equal(identity.std, torch.ones(1, 3, 1, 1))
    assert normalised.mean.shape == (1, 3, 1, 1) and normalised.std.shape == (1, 3, 1, 1)
    state = normalised.state_dict()
    assert "mean" in state and "std" in state  # checkpoints carry the normalisation
    identity.load_state_dict({k: v for k, v in state.items() if k not in ("mean", "std")}, strict=False)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = normalised(x)
        torch.testing.assert_close(out, identity((x - mean) / std))
        assert not torch.allclose(out, identity(x), atol=1e-3)
    # conv1 sees the normalised input
    seen = {}
    normalised.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("input", i[0]))
    with torch.no_grad():
        normalised(x)
    torch.testing.assert_close(seen["input"], (x - mean) / std)


def test_scalar_mean_std_broadcast():
    model = create("tinycnn", in_channels=1, mean=0.1307, std=[0.3081])
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.1307]))
    assert model.fastrobust_config["std"] == [0.3081]
    model = create("tinycnn", mean=torch.tensor(CIFAR_MEAN), std=0.25)
    assert model.fastrobust_config["std"] == [0.25, 0.25, 0.25]
    assert model.fastrobust_config["mean"] == pytest.approx(list(CIFAR_MEAN))


REBUILD = [  # the first five are built for real and compared on outputs, the rest on the meta device
    ("tinycnn", {"activation": "smoothrelu", "width": 8, "in_channels": 1, "image_size": 28}),
    ("smallcnn", {"num_classes": 7, "dropout": 0.25, "activation": "silu", "mean": CIFAR_MEAN, "std": CIFAR_STD}),
    ("preactresnet18", {"activation": "relu_silu_grad", "mean": CIFAR_MEAN, "std": CIFAR_STD}),
    ("resnet18", {"image_size": 64, "num_classes": 200}),
    ("wideresnet", {"depth": 16, "widen_factor": 4, "dropout": 0.3, "activation": "smoothrelu"}),
    ("resnet34", {}),
    ("resnet50", {"activation": "gelu", "image_size": 64, "mean": CIFAR_MEAN, "std": CIFAR_STD}),
    ("wrn28_10", {"dropout": 0.1}),
    ("wrn34_10", {"activation": "softplus"}),
]


def _perturb(model):
    """Move BN statistics and SmoothReLU's b off their initial values, so a copy has to load everything."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for pname, p in model.named_parameters():
            if pname.endswith("sqrt_b"):
                p.add_(torch.rand(()))


def _check_config(model, name):
    config = model.fastrobust_config
    assert config["name"] == name
    for key in ("num_classes", "in_channels", "activation", "mean", "std", "image_size"):
        assert key in config
    roundtrip = json.loads(json.dumps(config))  # JSON-able, and survives the round trip
    assert roundtrip == config
    return roundtrip


@pytest.mark.parametrize("name, kwargs", REBUILD[:5], ids=[case[0] for case in REBUILD[:5]])
def test_rebuild_from_config(name, kwargs):
    torch.manual_seed(0)
    model = create(name, **kwargs)
    config = _check_config(model, name)
    _perturb(model)
    torch.manual_seed(1)
    rebuilt = create(**config)
    assert rebuilt.fastrobust_config == model.fastrobust_config
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture, same names
    model.eval(), rebuilt.eval()
    assert str(rebuilt) == str(model)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    size = config["image_size"] if name in ("tinycnn", "smallcnn") else 16  # small input: cheap, pooling is global
    x = torch.rand(2, config["in_channels"], size, size)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


@pytest.mark.parametrize("name, kwargs", REBUILD[5:], ids=[case[0] for case in REBUILD[5:]])
def test_rebuild_big_models_from_config(name, kwargs):
    """The big nets are compared on the meta device (no memory, no init): same modules, same state_dict."""
    model = _meta(name, **kwargs)
    config = _check_config(model, name)
    rebuilt = _meta(**config)
    assert rebuilt.fastrobust_config == model.fastrobust_config
    assert str(rebuilt) == str(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    other = _meta(name, **{**kwargs, "activation": "elu"})
    assert str(other) != str(model)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published_figures(name):
    count = count_parameters(_meta(name))
    assert abs(count - PUBLISHED[name]) <= 0.02 * PUBLISHED[name]


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_parameter_counts(name):
    assert count_parameters(_meta(name)) == EXACT[name]


def test_parameter_count_details():
    # num_classes only changes the head; smoothrelu adds one scalar per activation; MNIST SmallCNN = 312,202
    assert count_parameters(_meta("resnet18", num_classes=100)) == EXACT["resnet18"] + 90 * 513
    assert count_parameters(_meta("smallcnn", in_channels=1, image_size=28)) == 312_202
    relu = count_parameters(_meta("preactresnet18"))
    smooth = _meta("preactresnet18", activation="smoothrelu")
    n_act = sum(1 for n, _ in smooth.named_parameters() if n.endswith("sqrt_b"))
    assert n_act == 17 and count_parameters(smooth) == relu + 17
    # a real (non-meta) build counts the same
    assert count_parameters(create("tinycnn")) == EXACT["tinycnn"]


def test_cli_models_json(capsys):
    assert cli_main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == NAMES
    assert {row["name"]: row["params"] for row in rows} == EXACT


def test_cli_models_table(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "46,160,474" in out and "wrn34_10" in out and "relu_silu_grad" in out
