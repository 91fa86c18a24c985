"""Safe loading: nothing fastrobust reads (state dicts, checkpoints, CIFAR pickles, presets) can run code.

Each malicious file here would create a marker file if it were unpickled (or constructed) the unsafe way;
every test checks both that the file is refused with a clear error and that the marker never appeared.
(The CIFAR reader's own refusal tests are in test_data_formats.py; here it is exercised through the CLI.)
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrobust.models.checkpoint import import_state_dict, load_model, save_model
from fastrobust.cli import main
from fastrobust.errors import FastRobustError
from fastrobust.models import create
from helpers import write_image_folder


def _touch(path: str) -> None:  # a function with a side effect, reachable by name from a pickle
    Path(path).write_text("code ran")


class SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Touch:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def malicious_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payloads in the shapes a third-party checkpoint comes in."""
    files = {}
    files["torch_save_os_system"] = folder / "system.pt"
    torch.save({"conv1.weight": torch.zeros(1), "evil": SystemCall(marker)}, files["torch_save_os_system"])
    files["torch_save_side_effect"] = folder / "touch.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(1)}, "hook": Touch(marker)}, files["torch_save_side_effect"])
    files["raw_pickle_protocol0"] = folder / "raw0.pt"
    files["raw_pickle_protocol0"].write_bytes(pickle.dumps(SystemCall(marker), protocol=0))
    files["raw_pickle_protocol2"] = folder / "raw2.pt"
    files["raw_pickle_protocol2"].write_bytes(pickle.dumps({"w": Touch(marker)}, protocol=2))
    files["hand_written_eval"] = folder / "eval.pt"
    files["hand_written_eval"].write_bytes(b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR.")
    # a torch zip archive whose data.pkl was swapped for a malicious pickle
    swapped = folder / "swapped.pt"
    torch.save({"w": torch.zeros(2)}, swapped)
    buffer = io.BytesIO()
    with zipfile.ZipFile(swapped) as source, zipfile.ZipFile(buffer, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps(SystemCall(marker), protocol=2)
            target.writestr(item, data)
    swapped.write_bytes(buffer.getvalue())
    files["zip_with_swapped_data_pkl"] = swapped
    return files


@pytest.mark.parametrize("kind", ["torch_save_os_system", "torch_save_side_effect", "raw_pickle_protocol0",
                                  "raw_pickle_protocol2", "hand_written_eval", "zip_with_swapped_data_pkl"])
def test_import_state_dict_refuses_code_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    path = malicious_files(tmp_path, marker)[kind]
    with pytest.raises(FastRobustError) as info:
        import_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert message.startswith(f"refused to load {path}: ") and "nothing in the file was run" in message
    assert not marker.exists(), "unpickling ran code"


def test_the_payloads_are_real(tmp_path):
    """Control: an ordinary unpickler does run them (so the refusals above are not vacuous)."""
    marker = tmp_path / "marker"
    pickle.loads(malicious_files(tmp_path, marker)["raw_pickle_protocol2"].read_bytes())
    assert marker.read_text() == "code ran"


def test_refusal_names_the_blocked_global(tmp_path):
    marker = tmp_path / "marker"
    files = malicious_files(tmp_path, marker)
    with pytest.raises(FastRobustError, match=r"refused to load .*system\.pt: .*GLOBAL (posix|os)\.system"):
        import_state_dict(files["torch_save_os_system"])
    with pytest.raises(FastRobustError, match=r"GLOBAL test_security\._touch|_touch"):
        import_state_dict(files["torch_save_side_effect"])
    assert not marker.exists()


def test_import_state_dict_reads_plain_and_wrapped_state_dicts(tmp_path):
    model = create("tinycnn", num_classes=4, image_size=8)
    state = model.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7, "arch": "tinycnn"},
               tmp_path / "wrapped.pth")
    from fastrobust.models.layouts import strip_prefixes

    for name in ("plain.pt", "wrapped.pth"):
        loaded = strip_prefixes(import_state_dict(tmp_path / name))  # the loader strips DataParallel's module.
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    # converted once, the weights live on as a safe .safetensors file
    fresh = create("tinycnn", num_classes=4, image_size=8)
    fresh.load_state_dict(loaded)
    save_model(fresh, tmp_path / "converted.safetensors")
    rebuilt, _ = load_model(tmp_path / "converted.safetensors")
    assert all(torch.equal(rebuilt.state_dict()[k], state[k]) for k in state)


@pytest.mark.parametrize("content, reason", [
    (None, "does not exist"),
    (b"", "is not a checkpoint: it looks like an empty file"),
    (b"PK\x03\x04 truncated zip", "is not a checkpoint: it looks like a truncated or damaged zip archive"),
    ("list", "not a state dict"),
    ("non_tensor", "entry 'lr' is a float, not a tensor"),
])
def test_import_state_dict_rejects_what_is_not_a_state_dict(tmp_path, content, reason):
    path = tmp_path / "weights.pt"
    if content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "non_tensor":
        torch.save({"w": torch.zeros(1), "lr": 0.1}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(FastRobustError, match=reason):
        import_state_dict(path)


def test_truncated_torch_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(FastRobustError, match=r"cut\.pt is not a checkpoint: it looks like a truncated .*zip archive"):
        import_state_dict(path)


# ----------------------------------------------------------------------------- through the command line
@pytest.fixture
def imagefolder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", ["c0", "c1", "c2", "c3"], {"train": 4, "test": 3})
    return tmp_path / "data"


def test_cli_eval_refuses_a_malicious_state_dict_in_one_line(tmp_path, capsys, imagefolder):
    marker = tmp_path / "marker"
    for path in malicious_files(tmp_path, marker).values():
        code = main(["eval", "--checkpoint", str(path), "--model", "tinycnn", "--dataset", "imagefolder",
                     "--data-root", str(imagefolder), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err, err
    assert not marker.exists()


def test_cli_eval_of_a_third_party_state_dict(tmp_path, capsys, imagefolder):
    model = create("tinycnn", num_classes=4, image_size=8)
    state = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}  # normalises outside
    torch.save({"model": state}, tmp_path / "theirs.pth")
    argv = ["eval", "--checkpoint", str(tmp_path / "theirs.pth"), "--dataset", "imagefolder", "--data-root",
            str(imagefolder), "--device", "cpu", "--attack", "fgsm", "--json", "--quiet"]
    assert main(argv) == 2
    assert "give --model NAME" in capsys.readouterr().err
    assert main([*argv, "--model", "tinycnn"]) == 0
    assert '"fgsm"' in capsys.readouterr().out
    assert main([*argv, "--model", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "does not fit --model resnet18" in err and len(err.strip().splitlines()) == 1


def test_cli_data_refuses_a_malicious_cifar_batch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "marker"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({"data": Touch(marker), "labels": [0]}, protocol=2))
    assert main(["data", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refus" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()


def test_checkpoints_are_written_without_pickle(tmp_path):
    """Everything fastrobust writes is safetensors or JSON: no file a reader would have to unpickle."""
    model = create("tinycnn", num_classes=4, image_size=8)
    save_model(model, tmp_path / "m.safetensors", {"note": "x"})
    assert load_file(str(tmp_path / "m.safetensors")).keys() == model.state_dict().keys()
    with pytest.raises(Exception):
        pickle.loads((tmp_path / "m.safetensors").read_bytes())


def test_a_module_with_a_module_submodule_loads_from_pt_as_from_safetensors(tmp_path):
    """Keys stay as stored until they meet the module: a `self.module` submodule is not a DataParallel prefix."""
    from safetensors.torch import save_file
    from torch import nn

    from fastrobust.models.thirdparty import load_model as load_any

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
            self.head = nn.Identity()

        def forward(self, x):
            return self.head(self.module(x))

    torch.manual_seed(0)
    net = Holder()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "holder.pt")
    save_file(state, str(tmp_path / "holder.safetensors"))
    x = torch.rand(2, 3, 4, 4)
    for name in ("holder.pt", "holder.safetensors"):
        loaded, _ = load_any(tmp_path / name, num_classes=3, image_shape=(3, 4, 4), factory=Holder,
                             normalization="none", note=lambda _: None)
        assert torch.allclose(loaded(x), net(x))
