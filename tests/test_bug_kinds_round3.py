"""Issue 26: the third round of other tools' bug reports replayed against fastrobust, one section per kind, each
kind checked at every entry point where it can occur (attack functions, method losses, evaluate, sanity_checks,
the trainer, the command line).

1. models whose forward returns a tuple, a dict or an object with ``.logits``: one line naming the wrapper;
2. float64 images (numpy and torch): accepted everywhere, the model sees its own dtype;
3. the official AutoAttack on 2- to 9-class models: at most C - 1 targets, recorded;
4. targeted APGD / FAB: a point misclassified as another class is attacked until it reaches its target;
5. ``evaluate(model, data)`` with a list of two samples or two batches: read by the elements' shapes;
6. a state dict written with ``pickle.dump``: said to be a plain pickle, with the conversion;
and a pixel at -3e-8 (rounding) gets the clamp hint, not "mean/std-normalised".
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastrobust.attacks.official as official_module
from fastrobust import methods
from fastrobust.attacks import (
    apgd,
    apgd_ce,
    apgd_t,
    autoattack,
    autoattack_official,
    fab_t,
    fgsm,
    pgd,
    rays,
    square,
)
from fastrobust.attacks._engine import Execution, confirm
from fastrobust.attacks.official import official_available
from fastrobust.cli import main
from fastrobust.data import ImageSet
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.evaluate import evaluate, sanity_checks
from fastrobust.models import create
from fastrobust.models.checkpoint import import_state_dict, save_model
from fastrobust.train import TrainConfig, train

from helpers import synthetic_dataset, write_image_folder

H = 8  # images 3 x 8 x 8
C = 4
QUIET = dict(progress=False, log=lambda _message: None)
needs_official = pytest.mark.skipif(not official_available(), reason="the official AutoAttack is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, H, H, generator=torch.Generator().manual_seed(seed))


def linear(classes: int = C, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * H * H, classes))


def one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    return message


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An image-folder dataset of 3 classes (8x8 RGB, 2 test images per class) for the command line."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, ["a", "b", "c"], {"train": 2, "test": 2})
    return root


# ----------------------------------------------------------------------------- 1. outputs that are not logits
class ConvNet(nn.Module):
    """A small classifier with a ``conv1`` (SLAT's latent layer)."""

    def __init__(self, classes: int = C):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * H * H, classes)

    def forward(self, x):
        return self.fc(self.conv1(x).flatten(1))


class NotLogits(ConvNet):
    """ConvNet whose forward returns its logits inside a tuple, a dict or an object with ``.logits`` (as distilled
    transformers do)."""

    def __init__(self, kind: str, classes: int = C):
        super().__init__(classes)
        self.kind = kind

    def forward(self, x):
        features = self.conv1(x).flatten(1)
        logits = self.fc(features)
        if self.kind == "tuple":
            return logits, features
        if self.kind == "dict":
            return {"logits": logits, "features": features}
        return Output(logits)


class Output:
    def __init__(self, logits):
        self.logits = logits


PICKS = {"tuple": "self.net(x)[0]", "dict": "self.net(x)['logits']", "object": "self.net(x).logits"}
ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, eps=0.03),
    "pgd": lambda m, x, y: pgd(m, x, y, eps=0.03, steps=2),
    "apgd": lambda m, x, y: apgd(m, x, y, eps=0.03, n_iter=2),
    "apgd_ce": lambda m, x, y: apgd_ce(m, x, y, eps=0.03, n_iter=2),
    "apgd_t": lambda m, x, y: apgd_t(m, x, y, eps=0.03, n_iter=2, n_targets=1),
    "fab_t": lambda m, x, y: fab_t(m, x, y, eps=0.03, n_iter=2, n_targets=1),
    "square": lambda m, x, y: square(m, x, y, eps=0.03, n_queries=5),
    "rays": lambda m, x, y: rays(m, x, y, eps=0.03, n_queries=5),
    "autoattack": lambda m, x, y: autoattack(m, x, y, eps=0.03, version="fast",
                                             options={"apgd-ce": {"n_iter": 2}, "apgd-t": {"n_iter": 2}}),
    "autoattack_official": lambda m, x, y: autoattack_official(m, x, y, eps=0.03),
}


def assert_wrapper_line(message: str, where: str, kind: str) -> None:
    one_line(message)
    assert message.startswith(f"{where}: the model returned a "), message
    assert "class Logits(nn.Module)" in message and PICKS[kind] in message and "Logits(model)" in message, message


@pytest.mark.parametrize("kind", sorted(PICKS))
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_refuses_a_non_tensor_output_in_one_line(name, kind):
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FastRobustError) as info:
        ATTACKS[name](NotLogits(kind), x, y)
    assert_wrapper_line(str(info.value), name, kind)


@pytest.mark.parametrize("kind", sorted(PICKS))
@pytest.mark.parametrize("name", methods.available_methods())
def test_every_method_loss_refuses_a_non_tensor_output_in_one_line(name, kind):
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FastRobustError) as info:
        methods.create(name)(NotLogits(kind), x, y)
    assert_wrapper_line(str(info.value), f"method {name}", kind)


@pytest.mark.parametrize("kind", sorted(PICKS))
def test_evaluate_and_sanity_checks_refuse_it_in_their_own_name(kind):
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FastRobustError) as info:
        evaluate(NotLogits(kind), (x, y), ["pgd20"], eps=0.03, progress=False)
    assert_wrapper_line(str(info.value), "evaluate", kind)
    with pytest.raises(FastRobustError) as info:
        sanity_checks(NotLogits(kind), (x, y), eps=0.03)
    assert_wrapper_line(str(info.value), "sanity_checks", kind)


def test_the_trainer_refuses_it_with_the_wrapper(tmp_path):
    config = TrainConfig(method="natural", dataset="synthetic", epochs=1, batch_size=32, device="cpu",
                         out=str(tmp_path / "run"))
    with pytest.raises(FastRobustError) as info:
        train(config, dataset=synthetic_dataset(), model=NotLogits("dict"), **QUIET)
    message = one_line(str(info.value))
    assert "the model returned a dict" in message and PICKS["dict"] in message and "class Logits" in message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace, as users still do
def test_the_command_line_refuses_a_program_returning_a_tuple(tmp_path, image_folder, capsys):
    program = torch.jit.trace(NotLogits("tuple", classes=3).eval(), images(2))
    program.save(str(tmp_path / "tuple.pt"))
    code, _, err = cli(["eval", "--checkpoint", str(tmp_path / "tuple.pt"), "--dataset", "imagefolder",
                        "--data-root", str(image_folder), "--attack", "clean", "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the model returned a tuple" in err and PICKS["tuple"] in err and "class Logits" in err, err


# ----------------------------------------------------------------------------- 2. float64 images
@pytest.mark.parametrize("name", methods.available_methods())
def test_every_method_loss_takes_float64_images_as_the_model_sees_them(name):
    """float64 images (numpy pipelines) give the loss of the same images in the model's float32, and a float64
    model takes float32 images: the images are converted to the model's dtype at the method's door."""
    model = ConvNet()
    x32, y = images(8), torch.arange(8) % C
    x64 = torch.from_numpy(x32.numpy().astype(np.float64))
    losses = []
    for x in (x32, x64):
        torch.manual_seed(1)
        loss, _ = methods.create(name)(model, x, y)
        losses.append(loss.detach())
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    torch.manual_seed(1)
    loss, _ = methods.create(name)(ConvNet().double(), x32, y)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(set(ATTACKS) - {"autoattack_official"}))
def test_every_attack_takes_float64_images(name):
    model, x, y = linear(), images(4).double(), torch.tensor([0, 1, 2, 3])
    out = ATTACKS[name](model, x, y)
    x_adv = out if isinstance(out, torch.Tensor) else out.within(x, 0.03)
    assert x_adv.dtype == torch.float64 and (x_adv - x).abs().max() <= 0.03 + 1e-9
    with pytest.raises(ConfigError, match=r"x is a ndarray, expected a torch.Tensor .*torch.from_numpy\(x\)") as info:
        ATTACKS[name](model, x.numpy(), y)  # a numpy batch at a batch-level entry point: one line with the fix
    one_line(str(info.value))


def test_evaluate_and_sanity_checks_take_float64_numpy_images():
    model, x, y = linear(), images(8), torch.arange(8) % C
    as_float = evaluate(model, (x, y), ["clean", "pgd20"], eps=0.03, progress=False)
    as_numpy = evaluate(model, (x.numpy().astype(np.float64), y.numpy()), ["clean", "pgd20"], eps=0.03, progress=False)
    assert as_numpy["attacks"]["pgd20"]["robust"] == as_float["attacks"]["pgd20"]["robust"]
    flags = sanity_checks(model, (x.double(), y), eps=0.03, apgd_iter=2, square_queries=5, rays_queries=5)
    assert {flag["name"] for flag in flags} >= {"attack_order", "gradients"}


def test_the_trainer_says_how_to_store_float_images():
    """The trainer's data are uint8 ImageSets (its loader divides by 255): float64 images are refused there in one
    line that says how to store them."""
    with pytest.raises(FastRobustError, match=r"uint8.*got torch.float64.*\(images \* 255\).round\(\)") as info:
        ImageSet(images(4).double(), torch.arange(4))
    one_line(str(info.value))


# ----------------------------------------------------------------------------- 3. the official AutoAttack, C < 10
def margin_model(classes: int) -> nn.Module:
    """Every image classified as class 0 by a margin no small perturbation closes: every official component
    (APGD-T and FAB-T included) then runs on every point."""
    model = linear(classes)
    with torch.no_grad():
        model[1].weight.mul_(0.01)
        model[1].bias.copy_(torch.tensor([5.0] + [0.0] * (classes - 1)))
    return model


@pytest.fixture
def short_official_square(monkeypatch):
    """The official runner with 20 Square queries instead of 5,000 (every point here survives every attack, and
    the targets, not Square, are under test): seconds, not minutes, on a shared CPU."""
    real = official_module.official_runner

    def runner(*args, **kwargs):
        made = real(*args, **kwargs)
        made.square.n_queries = 20
        return made

    monkeypatch.setattr(official_module, "official_runner", runner)


@needs_official
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_the_official_autoattack_runs_on_few_classes(classes, short_official_square):
    model, x = margin_model(classes), images(3)
    y = torch.zeros(3, dtype=torch.long)
    x_adv = autoattack_official(model, x, y, eps=1 / 255)
    assert (x_adv - x).abs().max() <= 1 / 255 + 1e-6 and torch.equal(model(x_adv).argmax(1), y)


@needs_official
def test_evaluate_records_the_official_targets_and_components(short_official_square):
    x, y = images(3), torch.zeros(3, dtype=torch.long)
    three = evaluate(margin_model(3), (x, y), ["autoattack-official"], eps=1 / 255, progress=False)
    entry = three["attacks"]["autoattack-official"]
    assert entry["robust_acc"] == 1.0
    assert entry["settings"]["n_targets"] == 2 and entry["settings"]["attacks"] == ["apgd-ce", "fab-t", "square"]
    assert "4 classes" in entry["settings"]["dropped"]["apgd-t"]
    assert entry["settings_requested"] == {"version": "standard"}
    five = evaluate(margin_model(5), (x, y), ["autoattack-official"], eps=1 / 255, progress=False)
    assert five["attacks"]["autoattack-official"]["settings"] == {"version": "standard", "n_targets": 4}


@needs_official
def test_the_command_line_runs_the_official_autoattack_on_three_classes(tmp_path, image_folder, capsys,
                                                                         short_official_square):
    torch.manual_seed(0)
    save_model(create("tinycnn", num_classes=3, image_size=H, width=4), tmp_path / "three.safetensors")
    code, out, err = cli(["eval", "--checkpoint", str(tmp_path / "three.safetensors"), "--dataset", "imagefolder",
                          "--data-root", str(image_folder), "--attack", "autoattack-official", "--eps", "1/255",
                          "--device", "cpu", "--quiet", "--json"], capsys)
    assert code == 0, err
    settings = json.loads(out)["attacks"]["autoattack-official"]["settings"]
    assert settings["n_targets"] == 2 and "apgd-t" in settings["dropped"]


# ----------------------------------------------------------------------------- 4. targeted runs reach the target
TARGETED = {
    "apgd ce-targeted": lambda m, x, y, t: apgd(m, x, y, eps=0.3, loss="ce-targeted", y_target=t, n_iter=20,
                                                generator=torch.Generator().manual_seed(0)),
    "apgd dlr-targeted": lambda m, x, y, t: apgd(m, x, y, eps=0.3, loss="dlr-targeted", y_target=t, n_iter=20,
                                                 generator=torch.Generator().manual_seed(0)),
    "apgd two restarts": lambda m, x, y, t: apgd(m, x, y, eps=0.3, loss="ce-targeted", y_target=t, n_iter=3,
                                                 n_restarts=2, generator=torch.Generator().manual_seed(0)),
    "fab_t": lambda m, x, y, t: fab_t(m, x, y, eps=0.3, y_target=t, n_iter=20),
    "pgd": lambda m, x, y, t: pgd(m, x, y, eps=0.3, target=t, steps=20, stop_at_fooled=True, random_init=False),
}


@pytest.mark.parametrize("name", sorted(TARGETED))
def test_a_targeted_run_attacks_misclassified_points_until_their_target(name):
    model, x = linear(10), images(30)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    y = (predicted + 1) % 10        # every label already wrong
    target = (predicted + 2) % 10   # and the target neither the label nor the prediction
    x_adv = TARGETED[name](model, x, y, target)
    with torch.no_grad():
        reached = model(x_adv).argmax(1) == target
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert reached.float().mean() >= 0.9, f"{int(reached.sum())} of {len(x)} reached their target"
    at_target = TARGETED[name](model, x, y, predicted)  # already classified as the target: nothing to do
    assert torch.equal(at_target, x)


def test_correctly_classified_points_also_run_until_the_target():
    model, x = linear(10), images(30)
    with torch.no_grad():
        y = model(x).argmax(1)
    target = (y + 3) % 10
    for name in ("apgd ce-targeted", "fab_t"):
        with torch.no_grad():
            reached = model(TARGETED[name](model, x, y, target)).argmax(1) == target
        assert reached.float().mean() >= 0.9, name


def test_autoattack_still_stops_a_point_once_misclassified():
    """APGD-T and FAB-T without a chosen target are AutoAttack's: a point already misclassified is done (the
    ranked targets are only directions), so AutoAttack's robust flags are the untargeted ones."""
    model, x = linear(10), images(12)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    y = predicted.clone()
    y[:6] = (predicted[:6] + 1) % 10  # half misclassified
    for attack in (apgd_t, fab_t):
        x_adv = attack(model, x, y, eps=0.01, n_iter=5, n_targets=2)
        assert torch.equal(x_adv[:6], x[:6]), attack.__name__
    result = autoattack(model, x, y, eps=0.01, version="fast", return_details=True,
                        options={"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5}})
    assert result.broken_by[:6] == ["clean"] * 6 and not result.robust[:6].any()


def test_a_targeted_row_is_confirmed_against_its_target():
    """A row computed in bf16 (or by a frozen copy) is confirmed by the model in fp32 before it stops: a targeted
    row against its target, not against its label."""
    model, x = linear(10), images(6)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    y = (predicted + 1) % 10
    target = predicted.clone()
    target[3:] = (predicted[3:] + 2) % 10  # the last three are misclassified but not on their target
    execution = Execution(model, torch.bfloat16, "cpu")
    flags = torch.ones(6, dtype=torch.bool)
    assert confirm(execution, x, y, flags).tolist() == [True] * 6
    assert confirm(execution, x, y, flags, target).tolist() == [True] * 3 + [False] * 3


# ----------------------------------------------------------------------------- 5. data read by its shapes
def outcome(record: dict) -> tuple:
    """What an evaluation found, per point (timings aside)."""
    return record["n"], record["clean_correct"], record["robust"], record["attacks"]["pgd20"]["robust"]


def test_two_samples_and_two_batches_are_read_as_what_they_are():
    model, x = linear(), images(6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % C  # one point misclassified, the others correct: the counts say which points were read
    common = dict(attacks=["clean", "pgd20"], eps=0.05, progress=False)
    reference = evaluate(model, (x, y), **common)
    two = evaluate(model, (x[:2], y[:2]), **common)
    assert outcome(two)[:2] == (2, 1)
    assert outcome(evaluate(model, [(x[0], int(y[0])), (x[1], int(y[1]))], **common)) == outcome(two)  # two samples
    numpy_samples = [(x[i].numpy(), np.int64(y[i])) for i in range(2)]
    assert outcome(evaluate(model, numpy_samples, **common)) == outcome(two)
    batches = list(DataLoader(TensorDataset(x, y), batch_size=3))  # two batches
    assert len(batches) == 2
    assert outcome(evaluate(model, batches, **common)) == outcome(reference)
    assert evaluate(model, batches[:1], **common)["n"] == 3  # one batch
    flags = sanity_checks(model, [(x[0], 0), (x[1], 1)], eps=0.03, apgd_iter=2, square_queries=5, rays_queries=5)
    assert {flag["name"] for flag in flags} >= {"attack_order", "gradients"}


@pytest.mark.parametrize("data", [
    [{"image": torch.rand(3, H, H), "label": 0}, {"image": torch.rand(3, H, H), "label": 1}],
    [(torch.rand(3, H, H), 0), (torch.rand(3, H, H), "cat")],
    "cifar10",
])
def test_what_cannot_be_read_gets_the_accepted_kinds(data):
    for entry, call in (("evaluate", lambda: evaluate(linear(), data, ["clean"], eps=0.03, progress=False)),
                        ("sanity_checks", lambda: sanity_checks(linear(), data, eps=0.03))):
        with pytest.raises(ConfigError) as info:
            call()
        message = one_line(str(info.value))
        assert message.startswith(f"{entry}: data ") and "not an image split" in message
        assert "(image [C, H, W], label) samples" in message and "list(loader)" in message


def test_samples_of_different_sizes_are_one_line():
    data = [(torch.rand(3, H, H), 0), (torch.rand(3, 2 * H, 2 * H), 1)]
    with pytest.raises(ConfigError, match=r"samples hold images of different shapes \(\[3, 8, 8\] and "
                                          r"\[3, 16, 16\]\)") as info:
        evaluate(linear(), data, ["clean"], eps=0.03, progress=False)
    one_line(str(info.value))


# ----------------------------------------------------------------------------- 6. plain pickles
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_pickle_dump_state_dict_is_named_with_its_conversion(tmp_path, protocol):
    state = create("tinycnn", num_classes=C, image_size=H, width=4).state_dict()
    path = tmp_path / f"weights{protocol}.pkl"
    with open(path, "wb") as handle:
        pickle.dump(state, handle, protocol=protocol)
    with pytest.raises(FastRobustError) as info:
        import_state_dict(path)
    message = one_line(str(info.value))
    assert "plain Python pickle" in message and "pickle.dump" in message
    assert "not a torch.save or safetensors" in message
    assert "does not unpickle arbitrary objects" in message and "nothing in the file was run" in message
    assert "damaged" not in message and "fetch" not in message
    # the conversion it gives, run on this (trusted) file, makes a file fastrobust reads: the same tensors
    snippet = message.split('python -c "', 1)[1].split('"', 1)[0]
    exec(compile(snippet, "<the suggested conversion>", "exec"), {})  # noqa: S102 - our own file, trusted
    converted = import_state_dict(tmp_path / f"weights{protocol}-converted.pt")
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_plain_pickle_naming_code_is_not_offered_for_conversion(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": torch.zeros(2), "x": Payload(marker)}, protocol=4))
    with pytest.raises(FastRobustError) as info:
        import_state_dict(path)
    message = one_line(str(info.value))
    assert "plain Python pickle" in message and "system" in message and "do not unpickle it" in message
    assert "pickle.load" not in message and not marker.exists()


def test_the_command_line_names_a_plain_pickle(tmp_path, image_folder, capsys):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps(create("tinycnn", num_classes=3, image_size=H).state_dict(), protocol=5))
    code, _, err = cli(["eval", "--checkpoint", str(path), "--model", "tinycnn", "--dataset", "imagefolder",
                        "--data-root", str(image_folder), "--attack", "clean", "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "plain Python pickle" in err and "pickle.load" in err and "damaged" not in err, err


# ----------------------------------------------------------------------------- rounding outside [0, 1]
VALUE_ENTRIES = {
    "pgd": lambda x, y: pgd(linear(), x, y, eps=0.03, steps=1),
    "method natural": lambda x, y: methods.create("natural")(linear(), x, y),
    "evaluate": lambda x, y: evaluate(linear(), (x, y), ["clean"], eps=0.03, progress=False),
}


@pytest.mark.parametrize("entry", sorted(VALUE_ENTRIES))
def test_a_rounding_overshoot_gets_the_clamp_hint(entry):
    y = torch.tensor([0, 1])
    for low, high in ((-3e-8, 1.0), (0.0, 1 + 1e-6), (-0.02, 0.5)):
        x = torch.full((2, 3, H, H), 0.5)
        x[0, 0, 0, 0], x[1, 0, 0, 0] = low, high
        with pytest.raises(ConfigError) as info:
            VALUE_ENTRIES[entry](x, y)
        message = one_line(str(info.value))
        assert "clamp(0, 1)" in message and "normalised" not in message, message
    normalised = (images(2) - 0.5) / 0.25
    with pytest.raises(ConfigError, match="mean/std-normalised"):
        VALUE_ENTRIES[entry](normalised, y)
    with pytest.raises(ConfigError, match="divide by 255"):
        VALUE_ENTRIES[entry](images(2) * 255, y)
