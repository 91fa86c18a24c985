"""Input normalisation of models trained elsewhere is applied exactly once (fastrobust.models.thirdparty.load_model).

A user module that normalises inside its forward (its own ``mean``/``std`` buffers) must not be wrapped in a
second normalisation, whether it comes from a registered factory (``--import``/``--model``), a ``--model-factory``
or a TorchScript/export program; ``--normalization`` on such a module is refused in one line; stored identity
buffers (a zoo model saved without normalisation) let ``--normalization`` through; fastrobust's own TinyCNN /
SmallCNN key names are recognised; torchvision's ResNet layout and the 7x7 stem point to ``--model-factory``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastrobust.cli.eval_cmd import _loaded_text
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.models import create, register, unregister
from fastrobust.models.layouts import identify
from fastrobust.models.thirdparty import load_model

# torch's own notices about TorchScript and tracing, not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
SHAPE = (3, 32, 32)


class NormNet(nn.Module):
    """A user's network that normalises its input itself, with its own ``mean``/``std`` buffers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def normnet(num_classes: int = 10) -> nn.Module:  # a registered factory without mean/std arguments
    return NormNet(num_classes)


@pytest.fixture
def trained(tmp_path, one_thread):
    torch.manual_seed(0)
    reference = NormNet()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "normnet.pt")
    return reference, tmp_path / "normnet.pt"


@pytest.fixture
def registered_normnet():
    register("normnet_test", normnet)
    yield "normnet_test"
    unregister("normnet_test")


def same_logits(reference: nn.Module, model: nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-5)


def load(path, **kwargs):
    notes = []
    model, info = load_model(path, num_classes=10, image_shape=SHAPE, dataset="cifar10", note=notes.append, **kwargs)
    return model, info, notes


def test_registered_module_with_its_own_buffers_is_not_normalised_twice(trained, registered_normnet):
    reference, path = trained
    model, info, notes = load(path, model=registered_normnet)
    same_logits(reference, model)  # the old loader wrapped it in InputNormalization too: other logits
    assert "applied by the module itself" in info["normalization"]["how"], info["normalization"]
    assert not notes
    with pytest.raises(ConfigError, match="carries its own input normalisation .* drop --normalization"):
        load(path, model=registered_normnet, normalization=(MEAN, STD))


def test_factory_module_with_its_own_buffers_refuses_normalization(trained):
    reference, path = trained
    model, info, notes = load(path, factory=NormNet)
    same_logits(reference, model)
    assert "the module's own (mean/std buffers" in info["normalization"]["how"]
    assert not notes  # no "assumed: none" hint to pass --normalization
    with pytest.raises(ConfigError, match=r"normnet.pt \(the module of .*\) carries its own input normalisation"):
        load(path, factory=NormNet, normalization=(MEAN, STD))
    # identity buffers normalise nothing: then the given normalisation is the only one
    state = torch.load(path, weights_only=True)
    state.update(mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    torch.save(state, path.with_name("identity.pt"))
    model, info, _ = load(path.with_name("identity.pt"), factory=NormNet, normalization=(MEAN, STD))
    same_logits(reference, model)  # the given (x - MEAN) / STD, applied once, outside
    assert info["normalization"]["mean"] == pytest.approx(list(MEAN))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_and_export_with_their_own_buffers_refuse_normalization(trained, tmp_path):
    reference, _ = trained
    torch.jit.save(torch.jit.script(reference), str(tmp_path / "scripted.pt"))
    program = torch.export.export(reference, (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "program.pt2"))
    for file in ("scripted.pt", "program.pt2"):
        with pytest.raises(ConfigError, match=r"carries its own input normalisation \(mean/std buffers"):
            load(tmp_path / file, normalization=(MEAN, STD))
        model, info, notes = load(tmp_path / file)
        same_logits(reference, model)
        assert "the module's own" in info["normalization"]["how"] and not notes


def test_zoo_state_dict_with_identity_buffers_takes_normalization(tmp_path, one_thread):
    torch.manual_seed(1)
    plain = create("tinycnn").eval()  # saved without normalisation: mean 0, std 1
    torch.save(plain.state_dict(), tmp_path / "tiny.pt")
    model, info, _ = load(tmp_path / "tiny.pt", normalization=(MEAN, STD))  # tinycnn recognised without --model
    expected = create("tinycnn", mean=list(MEAN), std=list(STD)).eval()
    expected.load_state_dict({**plain.state_dict(), "mean": expected.mean, "std": expected.std})
    same_logits(expected, model)
    assert info["architecture"].startswith("TinyCNN") and info["layout"] == "fastrobust"
    assert info["normalization"]["how"].startswith("given")
    # stored non-identity buffers still refuse a second normalisation
    torch.save(expected.state_dict(), tmp_path / "normed.pt")
    with pytest.raises(ConfigError, match="carries its own input normalisation"):
        load(tmp_path / "normed.pt", normalization=(MEAN, STD))


def test_own_cnn_key_names_are_recognised():
    with torch.device("meta"):
        tiny = create("tinycnn", width=8, num_classes=7).state_dict()
        small = create("smallcnn", num_classes=5).state_dict()
    assert (identify(tiny).model, identify(tiny).options, identify(tiny).num_classes) == ("tinycnn", {"width": 8}, 7)
    assert (identify(small).model, identify(small).num_classes) == ("smallcnn", 5)


def test_torchvision_layout_and_imagenet_stem_point_to_model_factory():
    with torch.device("meta"):
        state = create("resnet18").state_dict()
    torchvision = {k.replace(".shortcut.", ".downsample."): v for k, v in state.items() if k not in ("mean", "std")}
    assert any(".downsample.0." in k for k in torchvision), list(torchvision)[:20]
    with pytest.raises(FastRobustError, match="downsample.0/1.*torchvision.*--model-factory FILE.py:FUNCTION"):
        identify(torchvision)
    torchvision["conv1.weight"] = torch.empty(64, 3, 7, 7, device="meta")
    with pytest.raises(FastRobustError, match="7x7 .*--model-factory FILE.py:FUNCTION"):
        identify(torchvision)


def test_load_line_gives_the_normalisation_once():
    given = {"format": "torchscript", "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                        "how": "given: mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]"}}
    assert _loaded_text(given).count("mean [0.5, 0.5, 0.5]") == 1, _loaded_text(given)
    dataset = {"format": "torchscript", "normalization": {"mean": [0.49140000343], "std": [0.2471],
                                                          "how": "given: dataset (cifar10's training split)"}}
    assert _loaded_text(dataset).endswith("given: dataset (cifar10's training split) (mean [0.4914], std [0.2471])")
