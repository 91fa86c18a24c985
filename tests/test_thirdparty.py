"""Models trained elsewhere, through ``fastrobust eval``: public state-dict layouts, TorchScript, torch.export,
``--model-factory``, input normalisation, wrong pairings, files that are not checkpoints.

Every checkpoint is built here: reference networks with the public key names (tests/public_layouts.py), random
weights (BatchNorm statistics included), saved in the shapes public checkpoints come in; the model the CLI builds
is captured just before evaluation and must give the logits of the plain reference module.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import fastrobust.evaluate
import public_layouts as pl
from fastrobust.cli import main
from fastrobust.errors import FastRobustError
from fastrobust.models import create
from fastrobust.models.layouts import LAYOUTS, convert, identify, strip_prefixes

from helpers import write_cifar10_archive


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 in the official archive format (50 training, 10 test images)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_archive(root / "cifar-10-python.tar.gz", per_batch=10)
    return root


@pytest.fixture
def cli(cifar_root, tmp_path_factory, monkeypatch, capsys, one_thread):
    """Runs ``fastrobust eval`` on the tiny CIFAR-10; returns (exit code, stdout, stderr, the model evaluated)."""
    monkeypatch.setenv("FASTROBUST_CACHE", str(cifar_root / "cache"))
    seen: dict = {}
    real = fastrobust.evaluate.evaluate

    def capture(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fastrobust.evaluate, "evaluate", capture)

    def run(checkpoint, *extra):
        seen.clear()
        argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "cifar10", "--data-root", str(cifar_root),
                "--attack", "clean", "--device", "cpu", "--quiet", "--json", *map(str, extra)]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err, seen.get("model")

    return run


X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_same_logits(reference: nn.Module, model: nn.Module, transform=lambda x: x) -> None:
    with torch.no_grad():
        expected, got = reference(transform(X)), model(X)
    # the same function up to float rounding: fixed-window vs global average pooling sum in another order
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ----------------------------------------------------------------------------- public layouts
def _prefixed(state, prefix):
    return {prefix + key: value for key, value in state.items()}


LAYOUT_CASES = {
    # name: (reference builder, how the checkpoint is saved, the architecture fastrobust must name)
    "resnet18-linear": (lambda: pl.resnet18(), lambda s: {"state_dict": _prefixed(s, "module."), "epoch": 99},
                        "ResNet-18"),
    "resnet18-fc": (lambda: pl.resnet18(head="fc"), lambda s: {"net": _prefixed(s, "model."), "acc": 0.5}, "ResNet-18"),
    "preactresnet18": (lambda: pl.PreActResNet18(), lambda s: {"model": s}, "PreActResNet-18"),
    "wrn-16-4-trades": (lambda: pl.WideResNet(16, 4), lambda s: s, "WideResNet-16-4"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_public_layouts_give_the_logits_of_the_plain_module(cli, tmp_path, case):
    build, wrap, architecture = LAYOUT_CASES[case]
    reference = pl.randomize(build(), seed=3)
    torch.save(wrap(reference.state_dict()), tmp_path / "theirs.pth")
    code, out, err, model = cli(tmp_path / "theirs.pth")
    assert code == 0, err
    assert_same_logits(reference, model)
    record = json.loads(out)
    source = record["model_source"]
    assert source["format"] == "state dict" and source["architecture"].startswith(architecture)
    assert source["normalization"]["mean"] is None and source["normalization"]["how"].startswith("assumed: none")
    assert "input normalisation assumed: none" in err  # said on stderr


def test_bottleneck_resnet50_gives_the_same_logits(tmp_path, one_thread):
    from fastrobust.models.thirdparty import load_model

    reference = pl.randomize(pl.resnet50(), seed=4)
    torch.save(reference.state_dict(), tmp_path / "r50.pt")
    model, info = load_model(tmp_path / "r50.pt", num_classes=10, image_shape=(3, 32, 32), note=lambda _m: None)
    assert info["architecture"].startswith("ResNet-50") and info["model"]["name"] == "resnet50"
    assert_same_logits(reference, model)


@pytest.mark.parametrize("build, name, options", [
    (lambda: pl.resnet34(), "resnet34", {}),
    (lambda: pl.resnet50(head="fc"), "resnet50", {}),
    (lambda: pl.WideResNet(28, 10), "wrn28_10", {}),
    (lambda: pl.WideResNet(34, 10), "wrn34_10", {}),
    (lambda: pl.WideResNet(34, 10, sub_block1=False), "wrn34_10", {}),  # robust_overfitting: no sub_block1
    (lambda: pl.WideResNet(40, 2), "wideresnet", {"depth": 40, "widen_factor": 2}),
    (lambda: pl.PreActResNet18(num_classes=100), "preactresnet18", {}),
])
def test_every_layout_maps_key_for_key_onto_its_fastrobust_model(build, name, options):
    """On the meta device (no memory, no compute): the table turns every public key into exactly the keys and
    shapes of the fastrobust model it names; the forward pass is checked on the smaller members above."""
    with torch.device("meta"):
        reference = build()
        state = strip_prefixes(_prefixed(reference.state_dict(), "module."))
        match = identify(state)
        assert (match.model, match.options) == (name, options)
        ours = create(match.model, num_classes=match.num_classes, **match.options).state_dict()
    converted = convert(state, match.layout)
    ours = {k: v for k, v in ours.items() if k not in ("mean", "std")}
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_layouts_whose_function_differs_are_refused():
    with torch.device("meta"):
        no_final_bn = pl.PreActResNet18(final_bn=False).state_dict()
        imagenet_stem = pl.resnet18().state_dict()
    imagenet_stem["conv1.weight"] = torch.empty(64, 3, 7, 7, device="meta")
    with pytest.raises(FastRobustError, match="no final BatchNorm .* logits would differ"):
        identify(no_final_bn)
    with pytest.raises(FastRobustError, match="7x7 .*ImageNet stem"):
        identify(imagenet_stem)
    assert LAYOUTS["wideresnet"].drop == (r"^sub_block1\.",)


# ----------------------------------------------------------------------------- normalisation
def test_normalization_none_dataset_and_numbers(cli, tmp_path, cifar_root):
    from fastrobust.data import load_dataset

    reference = pl.randomize(pl.WideResNet(10, 1), seed=5)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    stats = load_dataset("cifar10", cifar_root, val_size=0, cache_dir=cifar_root / "cache")
    mean, std = torch.tensor(stats.mean).view(1, 3, 1, 1), torch.tensor(stats.std).view(1, 3, 1, 1)

    code, out, err, model = cli(tmp_path / "w.pt", "--normalization", "dataset")
    assert code == 0 and "assumed" not in err, err
    assert_same_logits(reference, model, lambda x: (x - mean) / std)
    assert json.loads(out)["model_source"]["normalization"]["how"].startswith("given: dataset")

    code, out, err, model = cli(tmp_path / "w.pt", "--normalization", "0.5,0.25")
    assert code == 0, err
    assert_same_logits(reference, model, lambda x: (x - 0.5) / 0.25)
    assert json.loads(out)["model_source"]["normalization"]["mean"] == [0.5] * 3

    code, _, err, model = cli(tmp_path / "w.pt", "--normalization", "0.4914,0.4822,0.4465,0.2471,0.2435,0.2616")
    assert code == 0, err
    m, s = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1), torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert_same_logits(reference, model, lambda x: (x - m) / s)

    code, _, err, _ = cli(tmp_path / "w.pt", "--normalization", "0.5,0.2,0.1")
    one_line_error(code, err, "--normalization '0.5,0.2,0.1'", "expected 2 or 6")
    code, _, err, _ = cli(tmp_path / "w.pt", "--normalization", "0.5,0")
    one_line_error(code, err, "std must be positive")


# ----------------------------------------------------------------------------- TorchScript, torch.export, factories
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_and_export_programs(cli, tmp_path):
    reference = pl.randomize(pl.WideResNet(10, 1), seed=6)
    torch.jit.trace(reference, X).save(str(tmp_path / "scripted.pt"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(reference, (X,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "program.pt2"))
    for file in ("scripted.pt", "program.pt2"):
        code, out, err, model = cli(tmp_path / file)
        assert code == 0, err
        assert_same_logits(reference, model)
        source = json.loads(out)["model_source"]
        assert source["format"] == ("torchscript" if file.endswith(".pt") else "export")
        code, out, err, model = cli(tmp_path / file, "--normalization", "0.5,0.5")
        assert code == 0, err
        assert_same_logits(reference, model, lambda x: (x - 0.5) / 0.5)
    code, _, err, _ = cli(tmp_path / "scripted.pt", "--model", "resnet18")
    one_line_error(code, err, "TorchScript archive", "drop --model")


FACTORY = '''
from pathlib import Path
import torch
from torch import nn

Path(__file__).with_name("factory-ran").write_text("yes")   # shows that the file runs


class Net(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(x))


def build(num_classes):
    return Net(num_classes)


def seven():
    return Net(7)


def broken():
    raise ValueError("no such width")
'''


def _factory_module(tmp_path: Path):
    (tmp_path / "my_models.py").write_text(FACTORY)
    namespace: dict = {"__file__": str(tmp_path / "scratch.py")}
    exec(compile(FACTORY, "my_models", "exec"), namespace)  # the same class, for the reference weights
    return namespace


def test_model_factory_runs_the_file_and_loads_the_weights(cli, tmp_path):
    namespace = _factory_module(tmp_path)
    reference = pl.randomize(namespace["build"](10), seed=7)
    torch.save({"state_dict": _prefixed(reference.state_dict(), "module.")}, tmp_path / "net.pth")
    (tmp_path / "factory-ran").unlink()
    code, out, err, model = cli(tmp_path / "net.pth", "--model-factory", f"{tmp_path / 'my_models.py'}:build")
    assert code == 0, err
    assert (tmp_path / "factory-ran").read_text() == "yes"
    assert_same_logits(reference, model)
    assert json.loads(out)["model_source"]["factory"].endswith("my_models.py:build")

    code, _, err, _ = cli(tmp_path / "net.pth", "--model-factory", f"{tmp_path / 'my_models.py'}:seven")
    one_line_error(code, err, "does not fit the module of", "my_models.py:seven", "head.weight [10, 32] vs [7, 32]")
    code, _, err, _ = cli(tmp_path / "net.pth", "--model-factory", f"{tmp_path / 'my_models.py'}:broken")
    one_line_error(code, err, "broken() failed: ValueError: no such width")
    code, _, err, _ = cli(tmp_path / "net.pth", "--model-factory", f"{tmp_path / 'my_models.py'}:nothing")
    one_line_error(code, err, "defines no function 'nothing'")
    code, _, err, _ = cli(tmp_path / "net.pth", "--model-factory", "my_models.py")
    one_line_error(code, err, "is not FILE.py:FUNCTION")


# ----------------------------------------------------------------------------- wrong pairings
def _save(tmp_path, module, name="w.pt"):
    torch.save(pl.randomize(module).state_dict(), tmp_path / name)
    return tmp_path / name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_wrong_pairings_are_one_line_naming_both_sides(cli, tmp_path):
    namespace = _factory_module(tmp_path)
    hundred = _save(tmp_path, pl.WideResNet(10, 1, num_classes=100), "c100.pt")
    code, _, err, _ = cli(hundred)
    one_line_error(code, err, "c100.pt (WideResNet-10-1) has 100 output classes but cifar10 has 10")

    code, _, err, _ = cli(_save(tmp_path, pl.WideResNet(16, 1), "w16.pt"), "--model", "wrn34_10")
    one_line_error(code, err, "holds a WideResNet-16-1", "--model wrn34_10")

    grey = pl.ResNet(pl.BasicBlock, [1, 1, 1, 1], in_channels=1)  # not in the zoo either
    code, _, err, _ = cli(_save(tmp_path, grey, "grey.pt"))
    one_line_error(code, err, "grey.pt", "basic blocks 1-1-1-1", "not in fastrobust's zoo")
    grey18 = pl.resnet18(in_channels=1)
    code, _, err, _ = cli(_save(tmp_path, grey18, "grey18.pt"))
    one_line_error(code, err, "grey18.pt (ResNet-18", "takes 1-channel images but cifar10's have 3 channels")

    fixed = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)))
    fixed.save(str(tmp_path / "fixed.pt"))
    code, _, err, _ = cli(tmp_path / "fixed.pt")
    one_line_error(code, err, "fixed.pt (torchscript) fails on cifar10's 3x32x32 images")

    code, _, err, _ = cli(_save(tmp_path, pl.PreActResNet18(final_bn=False), "kuangliu.pt"))
    one_line_error(code, err, "kuangliu.pt", "no final BatchNorm", "--model-factory")

    from fastrobust.models.thirdparty import load_model  # the fixed pooling window of a public layout vs 64x64 images

    with pytest.raises(FastRobustError, match=r"w16\.pt \(WideResNet-16-1, TRADES .* layout\) pools with a fixed "
                                              r"window that is global only for 32x32 images, tiny's are 64x64"):
        load_model(tmp_path / "w16.pt", num_classes=10, image_shape=(3, 64, 64), dataset="tiny")

    mine = _save(tmp_path, namespace["build"](10), "mine.pt")
    code, _, err, _ = cli(mine)
    one_line_error(code, err, "cannot tell which architecture", "give --model NAME")
    code, _, err, _ = cli(mine, "--model", "tinycnn")
    one_line_error(code, err, "mine.pt does not fit --model tinycnn for cifar10", "not in the model: body.0.weight")


# ----------------------------------------------------------------------------- files that are not checkpoints
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def test_files_that_are_not_checkpoints_say_so(cli, tmp_path):
    cases = {"page.pt": (HTML, "an HTML page"), "page.safetensors": (HTML, "an HTML page"),
             "page.pt2": (HTML, "an HTML page"), "notes.pth": (b"epoch 12: acc 0.53\n", "text"),
             "cut.pt": (None, "a truncated or damaged zip archive")}
    for name, (content, kind) in cases.items():
        path = tmp_path / name
        if content is None:
            torch.save({"w": torch.zeros(1000)}, path)
            path.write_bytes(path.read_bytes()[:-300])
        else:
            path.write_bytes(content)
        code, _, err, _ = cli(path)
        one_line_error(code, err, f"{path} is not a checkpoint: it looks like {kind}")
        assert "refused" not in err and "Unsupported operand" not in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(HTML)
    code, _, err, _ = cli(run)
    one_line_error(code, err, "best.safetensors is not a checkpoint: it looks like an HTML page")


def test_resume_names_an_html_page_saved_over_the_run_files(tmp_path, capsys):
    from fastrobust.train import resume

    (tmp_path / "config.json").write_bytes(HTML)
    with pytest.raises(FastRobustError, match=r"config\.json is damaged or not a fastrobust config \(it looks like an HTML"):
        resume(tmp_path, progress=False, log=lambda _m: None)
    from fastrobust.train import state as training_state

    step = tmp_path / "checkpoints" / "step-000000001"
    step.mkdir(parents=True)
    (step / "state.json").write_bytes(HTML)
    assert training_state.verify(step) == "state.json is not valid JSON; it looks like an HTML page (a failed or " \
                                          "redirected download: fetch the file again)"


# ----------------------------------------------------------------------------- what the loaders run
class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite(source: Path, target: Path, change) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(buffer, "w") as new:
        for item in old.infolist():
            new.writestr(item, change(item.filename, old.read(item)))
    target.write_bytes(buffer.getvalue())
    return target


def test_export_programs_are_loaded_without_running_their_pickles_or_code(tmp_path):
    from fastrobust.models.programs import load_export

    marker = tmp_path / "marker"
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    program = torch.export.export(net, (torch.rand(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(tmp_path / "ok.pt2"))
    evil = pickle.dumps(_SystemCall(marker), protocol=2)
    pickled = _rewrite(tmp_path / "ok.pt2", tmp_path / "pickled.pt2",
                       lambda name, data: evil if name.endswith("sample_inputs/model.pt") else data)
    calls = _rewrite(tmp_path / "ok.pt2", tmp_path / "calls.pt2", lambda name, data: data.replace(
        b"torch.ops.aten.relu.default", b"torch.serialization.os.system") if name.endswith("model.json") else data)
    guards = _rewrite(tmp_path / "ok.pt2", tmp_path / "guards.pt2", lambda name, data: data.replace(
        b'"guards_code": []', b'"guards_code": ["__import__(\'os\')"]') if name.endswith("model.json") else data)
    assert load_export(tmp_path / "ok.pt2")(torch.rand(3, 3, 8, 8)).shape == (3, 10)
    with pytest.raises(FastRobustError,
                       match=r"refused to load .*pickled\.pt2.*GLOBAL (posix|os)\.system.*nothing in the file was run"):
        load_export(pickled)
    with pytest.raises(FastRobustError, match=r"calls 'torch\.serialization\.os\.system', which is not a torch operator"):
        load_export(calls)
    with pytest.raises(FastRobustError, match="Python guard code"):
        load_export(guards)
    assert not marker.exists()
    # control: torch.export.load alone falls back to weights_only=False and runs the payload
    try:
        torch.export.load(str(pickled))
    except Exception:  # noqa: BLE001 - whatever happens after the payload ran
        pass
    assert marker.exists(), "the payload is real"


@pytest.mark.parametrize("expression, safe", [
    ("Symbol('s31', positive=True, integer=True)", True), ("2*s0 + FloorDiv(s1, 4) - 1", True),
    ("Max(s0, 2) <= 1024", True), ("__import__('os').system('touch x')", False), ("s0.__class__", False),
    ("eval('1')", False), ("Symbol('s0'); open('x')", False),
])
def test_symbolic_shape_expressions_allowed_in_a_program(expression, safe):
    from fastrobust.models.programs import _safe_expression

    assert _safe_expression(expression) is safe


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archives_never_resolve_python_globals(tmp_path):
    from fastrobust.models.programs import load_torchscript

    marker = tmp_path / "marker"
    torch.jit.script(nn.Linear(2, 2)).save(str(tmp_path / "ok.pt"))
    evil = _rewrite(tmp_path / "ok.pt", tmp_path / "evil.pt", lambda name, data: pickle.dumps(
        _SystemCall(marker), protocol=2) if name.endswith("data.pkl") else data)
    with pytest.raises(FastRobustError, match=r"cannot load .*evil\.pt as a TorchScript archive.*posix\.system|os\.system"):
        load_torchscript(evil)
    assert not marker.exists()
