"""The trainer with any model: ``train(config, model=module)``, exact resume of such a run (and its refusals),
``fastrobust.models.register`` names in configs and on the command line (``--import``, entry points), and the
evaluation of such checkpoints with ``fastrobust eval``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastrobust.models.checkpoint import load_model
from fastrobust.cli import main
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.models import available_models, create, register, registry, unregister
from fastrobust.train import Trainer, TrainConfig, resume, train

from helpers import crash_at_step, synthetic_dataset, write_image_folder

QUIET = dict(progress=False, log=lambda _message: None)


class SmallNet(nn.Module):
    """A tinycnn-sized network fastrobust does not know."""

    def __init__(self, num_classes: int = 4, width: int = 16, batchnorm: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda _channels: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), norm(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def config(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    settings = dict(method="fast_at", dataset="synthetic", epochs=2, batch_size=32, lr=0.05, schedule="cosine",
                    val_pgd_steps=2, test_pgd_steps=3, device="cpu", out=str(tmp_path / name), checkpoint_every=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def fresh(seed: int = 0, **kw) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet(**kw)


def test_a_user_module_trains_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, one_thread):
    data = synthetic_dataset()
    straight = train(config(tmp_path, "straight"), dataset=data, model=fresh(), **QUIET)
    assert straight["config"]["model"] == "module"
    source = straight["model_source"]
    assert source["source"] == "module" and source["class"].endswith("SmallNet") and len(source["fingerprint"]) == 16
    assert json.loads((tmp_path / "straight" / "result.json").read_text())["model_source"] == source
    assert straight["best_epoch"] in (1, 2) and straight["test"]["n"] == 64

    with crash_at_step(monkeypatch, 9):  # mid-epoch 2 (6 batches per epoch), after the checkpoint of step 8
        train(config(tmp_path, "crashed"), dataset=data, model=fresh(), **QUIET)
    resumed = resume(tmp_path / "crashed", dataset=data, model=fresh(seed=123), **QUIET)  # any start: weights reload
    a, b = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(tmp_path / "crashed" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == straight["test"]


def test_resuming_a_module_run_needs_the_same_module(tmp_path, one_thread):
    data = synthetic_dataset()
    train(config(tmp_path, "run", epochs=1), dataset=data, model=fresh(), **QUIET)
    run = tmp_path / "run"
    with pytest.raises(FastRobustError, match=r"trained a module passed as train\(config, model=\.\.\.\) \(class "
                                              r".*SmallNet\): pass the same module again"):
        resume(run, dataset=data, **QUIET)
    with pytest.raises(FastRobustError, match=r"trained with .*SmallNet \(fingerprint [0-9a-f]{16}\).*features\.0\.weight "
                                              r"is \[16, 3, 3, 3\] in the checkpoint but \[8, 3, 3, 3\] in the module"):
        resume(run, dataset=data, model=SmallNet(width=8), overrides={"epochs": 2}, **QUIET)

    class Renamed(SmallNet):
        pass

    with pytest.raises(FastRobustError, match=r"trained as .*SmallNet, the module given is .*Renamed"):
        resume(run, dataset=data, model=Renamed(), overrides={"epochs": 2}, **QUIET)
    with pytest.raises(ConfigError, match="model_params=.* configure registry models"):
        train(config(tmp_path, "x", model_params={"width": 4}), dataset=data, model=fresh(), **QUIET)
    with pytest.raises(FastRobustError, match="returns 4 logits per image but synthetic has 3 classes"):
        train(config(tmp_path, "y"), dataset=synthetic_dataset(classes=3), model=fresh(), **QUIET)
    registry = tmp_path / "registry"
    train(config(tmp_path, "registry", model="tinycnn", epochs=1), dataset=data, **QUIET)
    with pytest.raises(FastRobustError, match="trained the registry model 'tinycnn': resume it without model="):
        resume(registry, dataset=data, model=fresh(), **QUIET)


def test_the_command_line_says_a_module_run_cannot_be_resumed_there(tmp_path, capsys, one_thread):
    train(config(tmp_path, "run", epochs=1), dataset=synthetic_dataset(), model=fresh(), **QUIET)
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the command line cannot rebuild it" in err and "SmallNet" in err


def test_checkpoints_of_a_module_evaluate_with_its_factory(plugin_folder, capsys, one_thread):
    """A run of train(model=...) is evaluated by `fastrobust eval --model-factory FILE.py:FUNCTION`."""
    sys.path.insert(0, str(plugin_folder))  # the fixture restores sys.path
    import my_plugin

    settings = dict(method="natural", dataset="imagefolder", data_root="images", epochs=1, batch_size=12, val_size=6,
                    device="cpu", out="runs/module")
    train(TrainConfig(**settings), model=my_plugin.build(num_classes=3), **QUIET)
    common = ["--dataset", "imagefolder", "--data-root", "images", "--device", "cpu", "--quiet", "--attack", "clean"]
    assert main(["eval", "--checkpoint", "runs/module", *common]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "class my_plugin.PluginNet" in err and "--model-factory" in err
    assert main(["eval", "--checkpoint", "runs/module", "--model-factory", "my_plugin.py:build", "--json", *common]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model_source"]["format"] == "fastrobust" and record["model_source"]["factory"] == "my_plugin.py:build"
    assert record["model_source"]["normalization"]["mean"] is None and record["n"] == 12
    best = load_file(str(plugin_folder / "runs" / "module" / "best.safetensors"))
    assert best.keys() == my_plugin.build(3).state_dict().keys()


# ----------------------------------------------------------------------------- registered names
def test_a_registered_name_works_in_configs_and_is_recorded(tmp_path, one_thread):
    def small_net(num_classes, width=16):
        """SmallNet by name."""
        return SmallNet(num_classes, width)

    register("smallnet_test", small_net)
    try:
        assert "smallnet_test" in available_models()
        model = create("smallnet_test", num_classes=3, width=8)
        assert model.classifier.out_features == 3 and model.fastrobust_config["width"] == 8
        assert model.fastrobust_config["mean"] is None  # the factory takes no mean/std: raw pixels
        with pytest.raises(ConfigError, match="takes no keyword.*depth: it accepts width"):
            create("smallnet_test", depth=3)
        with pytest.raises(ConfigError, match="takes no activation= argument"):
            create("smallnet_test", activation="silu")
        with pytest.raises(ConfigError, match="taken by fastrobust's zoo"):
            register("resnet18", small_net)
        result = train(config(tmp_path, "named", model="smallnet_test", model_params={"width": 8}, epochs=1),
                       dataset=synthetic_dataset(), **QUIET)
        assert result["model_source"] == {"source": "registered", "name": "smallnet_test",
                                          "factory": f"{__name__}:{small_net.__qualname__}"}
        rebuilt, _ = load_model(tmp_path / "named")
        assert isinstance(rebuilt, SmallNet) and rebuilt.features[0].out_channels == 8
    finally:
        unregister("smallnet_test")
    with pytest.raises(FastRobustError, match=r"unknown model 'smallnet_test'.*--import MODULE"):
        load_model(tmp_path / "named")


PLUGIN = '''
from torch import nn
from fastrobust.models import register


class PluginNet(nn.Module):
    def __init__(self, num_classes, in_channels, mean=None, std=None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
        self.mean, self.std = mean, std

    def forward(self, x):
        return self.body(x)


def plugin_net(num_classes, in_channels, mean=None, std=None):
    return PluginNet(num_classes, in_channels, mean, std)


def build(num_classes=10):
    return PluginNet(num_classes, 3)


register("pluginnet", plugin_net)
'''


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    """A plugin module ``my_plugin.py`` in the working folder, a tiny image folder, and a clean registry."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    write_image_folder(tmp_path / "images", ["c0", "c1", "c2"], {"train": 12, "test": 4})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    unregister("pluginnet")
    sys.modules.pop("my_plugin", None)


def test_import_plugin_registers_a_name_for_train_and_eval(plugin_folder, capsys, one_thread):
    common = ["--dataset", "imagefolder", "--data-root", "images", "--device", "cpu", "--quiet"]
    argv = ["train", "--import", "my_plugin", "--model", "pluginnet", "--method", "natural", "--epochs", "1",
            "--batch-size", "12", "--val-size", "6", "--out", "runs/plugin", "--json", *common]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["model_source"]["name"] == "pluginnet" and result["model_source"]["factory"] == "my_plugin:plugin_net"
    unregister("pluginnet")  # as in a new process: nothing registered, nothing imported
    sys.modules.pop("my_plugin")
    assert main(["eval", "--checkpoint", "runs/plugin", "--attack", "clean", *common]) == 2
    assert "--import MODULE" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "runs/plugin", "--import", "my_plugin", "--attack", "clean", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    assert main(["train", "--import", "no_such_plugin", "--model", "x", *common]) == 2
    assert "--import no_such_plugin: cannot import it" in capsys.readouterr().err


def test_entry_points_register_names(plugin_folder, monkeypatch):
    dist = plugin_folder / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fastrobust.models]\npluginnet = my_plugin:plugin_net\n")
    monkeypatch.syspath_prepend(str(plugin_folder))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    model = create("pluginnet", num_classes=5, in_channels=3)
    assert type(model).__name__ == "PluginNet" and model.body[-1].out_features == 5
    assert registry.lookup("pluginnet").origin == "my_plugin:plugin_net"


# ----------------------------------------------------------------------------- AMP, channels_last, two ranks
def test_a_user_module_trains_with_amp_and_channels_last(tmp_path, one_thread):
    model = fresh()
    result = train(config(tmp_path, "fast", epochs=1, amp="bf16", channels_last="on"), dataset=synthetic_dataset(),
                   model=model, **QUIET)
    assert result["test"]["n"] == 64 and 0 <= result["test"]["pgd3_acc"] <= result["test"]["clean_acc"]
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)  # trained in place


def _two_rank_job(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    try:  # each rank builds its own random start: the trainer broadcasts rank 0's weights
        Trainer(config(Path(out).parent, Path(out).name, epochs=1, method="natural"), dataset=synthetic_dataset(),
                model=fresh(seed=rank, batchnorm=False), **QUIET).fit()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s; the one-process runs above are the fast version
def test_a_user_module_trains_on_two_ranks_like_one_process(tmp_path, one_thread):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_job, args=(port, str(tmp_path / "two")), nprocs=2, join=True)
    Trainer(config(tmp_path, "one", epochs=1, method="natural"), dataset=synthetic_dataset(),
            model=fresh(seed=0, batchnorm=False), **QUIET).fit()
    two, one = load_file(str(tmp_path / "two" / "last.safetensors")), load_file(str(tmp_path / "one" / "last.safetensors"))
    assert two.keys() == one.keys()
    for key in one:  # no BatchNorm: two shards of a batch give the gradient of the whole batch
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    record = json.loads((tmp_path / "two" / "result.json").read_text())
    assert record["world_size"] == 2 and record["model_source"]["source"] == "module"


# ----------------------------------------------------------------------------- fastrobust models: descriptions
class UndocumentedNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, mean=None, std=None):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        return self.head(x)


class DocumentedNet(UndocumentedNet):
    """A linear probe for tests.

    More text that is not the summary."""


def test_models_lists_only_a_model_class_own_docstring(capsys):
    register("undocumented_test", UndocumentedNet)
    register("documented_test", DocumentedNet)
    try:
        assert main(["models"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    finally:
        unregister("undocumented_test")
        unregister("documented_test")
    assert "Base class for all neural network modules" not in rows["undocumented_test"]
    assert rows["undocumented_test"].endswith("(no description) (from test_user_models:UndocumentedNet)")
    assert rows["documented_test"].endswith("A linear probe for tests. (from test_user_models:DocumentedNet)")
