"""fastrobust.evaluate (record, resume), fastrobust.evaluate.sanity (gradient masking) and `fastrobust eval`."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.evaluate import clean_and_robust_counts, evaluate, pgd_accuracy
from fastrobust.evaluate.sanity import sanity_checks

C, H = 10, 8
CHEAP = {
    "apgd-ce": {"n_iter": 10},
    "apgd-t": {"n_iter": 10, "n_targets": 2},
    "fab-t": {"n_iter": 10, "n_targets": 2},
    "square": {"n_queries": 100},
    "rays": {"n_queries": 100},
    "autoattack": {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2},
                   "fab-t": {"n_iter": 10, "n_targets": 2}, "square": {"n_queries": 100}},
    "autoattack-fast": {"apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 10, "n_targets": 2}},
}


def synthetic(n: int, generator: torch.Generator, protos: torch.Tensor):
    y = torch.randint(0, C, (n,), generator=generator)
    x = (protos[y] + 0.05 * torch.randn(n, 1, H, H, generator=generator)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, generator, epochs: int = 8) -> nn.Module:
    x = images.float() / 255
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), 100):
            idx = perm[i : i + 100]
            loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    protos = 0.5 + 0.25 * (torch.rand(C, 1, H, H, generator=g) - 0.5)
    train_split = synthetic(2000, g, protos)
    test_split = synthetic(48, g, protos)
    model = train(nn.Sequential(nn.Flatten(), nn.Linear(H * H, 64), nn.ReLU(), nn.Linear(64, C)), *train_split, g)
    return model, train_split, test_split, g


class Quantise(torch.autograd.Function):
    """round(x * 4) / 4 in the forward pass, a zero gradient in the backward pass: a gradient-masking defence."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class Masked(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(Quantise.apply(x))


class Stops(KeyboardInterrupt):
    """An interruption (Ctrl-C) inside the model; any other exception of the model is a ModelError line."""


@contextlib.contextmanager
def stop_after(model: nn.Module, limit: int):
    """The same model (same class and weights: the state file's fingerprint matches), but it raises after
    ``limit`` forward passes (an interrupted evaluation)."""
    calls = 0

    def count(_module, _inputs):
        nonlocal calls
        calls += 1
        if calls > limit:
            raise Stops()

    handle = model.register_forward_pre_hook(count)
    try:
        yield model
    finally:
        handle.remove()


def strip_timing(record):
    record = json.loads(json.dumps(record))
    record.pop("seconds")
    record.pop("model")
    for cost in [record["cost"]] + [entry["cost"] for entry in record["attacks"].values()]:
        cost.pop("seconds"), cost.pop("process_seconds")  # the passes stay: a resume must report the same
    for entry in record["attacks"].values():
        entry.pop("seconds")
    return record


def test_record_fields_and_worst_case(setup):
    model, _, test_split, _ = setup
    attacks = ["clean", "fgsm", "pgd20", "cw20", "apgd-ce", "apgd-t", "fab-t", "square", "rays", "autoattack-fast"]
    record = evaluate(model, test_split, attacks, eps=0.04, batch_size=20, progress=False,
                      attack_options={k: v for k, v in CHEAP.items() if k in attacks})
    json.dumps(record)  # JSON-able
    assert record["n"] == 48 and record["eps"] == 0.04 and record["norm"] == "linf"
    assert set(record["attacks"]) == set(attacks)
    accs = [e["robust_acc"] for name, e in record["attacks"].items() if name != "clean"]
    assert record["robust_acc"] <= min(accs) <= max(accs) <= record["clean_acc"]
    for name, entry in record["attacks"].items():
        assert entry["robust"] + entry["broken"] == record["clean_correct"]
        assert entry["seconds"] >= 0
    assert record["attacks"]["pgd20"]["settings"]["steps"] == 20
    assert record["attacks"]["pgd20"]["settings"]["step_size"] == pytest.approx(2 / 255)
    assert record["attacks"]["pgd20"]["settings"]["random_init"] is False
    rays_entry = record["attacks"]["rays"]
    assert rays_entry["adbd"] > 0 and 0 < rays_entry["queries_mean"] <= 100
    assert set(record["attacks"]["autoattack-fast"]["broken_by"]) <= {"apgd-ce", "apgd-t"}
    assert {"torch", "fastrobust", "python"} <= set(record["versions"]) and record["device"] == "cpu"
    assert 0 < record["robust_acc"] < record["clean_acc"]  # eps chosen so the test is informative


def test_resume_from_state_file_gives_the_same_record(setup, tmp_path):
    model, _, test_split, _ = setup
    attacks = ["pgd20", "apgd-ce", "square", "rays"]
    options = {k: CHEAP[k] for k in ("apgd-ce", "square", "rays")}
    kwargs = dict(eps=0.04, batch_size=16, progress=False, attack_options=options, seed=3)
    full = evaluate(model, test_split, attacks, **kwargs)
    state = tmp_path / "state.json"
    for limit in (40, 400):  # interrupted inside the PGD pass, then inside Square
        with pytest.raises(Stops), stop_after(model, limit):
            evaluate(model, test_split, attacks, state_file=state, **kwargs)
    saved = json.loads(state.read_text())
    assert saved["attacks"]["pgd20"]["batches"] and saved["clean"]
    resumed = evaluate(model, test_split, attacks, state_file=state, **kwargs)
    assert strip_timing(resumed) == strip_timing(full)
    with stop_after(model, 3):  # all done: only the pre-checks' forward passes (two, and the gradient check's)
        again = evaluate(model, test_split, attacks, state_file=state, **kwargs)
    assert strip_timing(again) == strip_timing(full)
    with pytest.raises(FastRobustError, match="another evaluation"):
        evaluate(model, test_split, attacks, state_file=state, **dict(kwargs, eps=0.05))


def test_gradient_masked_model_is_flagged(setup):
    model, _, test_split, _ = setup
    masked = Masked(model).eval()
    options = dict(n=48, square_queries=300, rays_queries=300, apgd_iter=10, batch_size=48)
    flags = {f["name"]: f for f in sanity_checks(masked, test_split, eps=0.1, **options)}
    assert not flags["gradients"]["passed"]
    assert not flags["black_box"]["passed"]
    assert not flags["large_eps"]["passed"]
    assert flags["deterministic"]["passed"]
    honest = {f["name"]: f for f in sanity_checks(model, test_split, eps=0.1, **options)}
    assert all(f["passed"] for f in honest.values()), honest
    assert all(set(f) == {"name", "passed", "detail"} for f in honest.values())


def test_random_model_is_flagged(setup):
    model, _, test_split, _ = setup

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x + 0.01 * torch.randn_like(x))

    flags = {f["name"]: f for f in sanity_checks(Noisy(), test_split, eps=0.03, n=16, square_queries=20,
                                                    rays_queries=30, apgd_iter=5)}
    assert not flags["deterministic"]["passed"]


def test_evaluate_errors_and_official_skip(setup, monkeypatch):
    model, _, test_split, _ = setup
    with pytest.raises(ConfigError, match="unknown"):
        evaluate(model, test_split, ["pgd7"], eps=0.03, progress=False)
    with pytest.raises(ConfigError, match="eps"):
        evaluate(model, test_split, ["pgd20"], eps=8, progress=False)
    with pytest.raises(ConfigError, match="rays"):
        evaluate(model, test_split, ["rays"], eps=0.5, norm="l2", progress=False)
    with pytest.raises(ConfigError, match="not an image split"):
        evaluate(model, "data", ["pgd20"], eps=0.03, progress=False)
    from fastrobust.attacks import official as official_module

    monkeypatch.setattr(official_module, "official_package", lambda: None)  # as on a machine without it
    with pytest.warns(UserWarning, match="autoattack-official"):
        record = evaluate(model, test_split, ["clean", "autoattack-official"], eps=0.03, progress=False)
    assert "pip install" in record["skipped"]["autoattack-official"]
    assert record["robust_acc"] is None


def test_l2_evaluation_and_full_autoattack(setup):
    model, _, test_split, _ = setup
    record = evaluate(model, test_split, ["pgd20", "autoattack"], eps=0.3, norm="l2", progress=False,
                      attack_options={"autoattack": CHEAP["autoattack"]})
    assert record["attacks"]["autoattack"]["robust_acc"] <= record["attacks"]["pgd20"]["robust_acc"] + 0.05
    assert record["attacks"]["autoattack"]["settings"]["options"]["square"]["n_queries"] == 100


def test_trainer_helpers_still_work(setup):
    model, _, (images, labels), _ = setup
    result = pgd_accuracy(model, images, labels, eps=0.04, steps=5)
    assert set(result) == {"clean_acc", "robust_acc", "n", "step_size"} and result["robust_acc"] <= result["clean_acc"]
    assert result["step_size"] == pytest.approx(2.5 * 0.04 / 5)  # evaluate's default_step: 5 steps reach eps
    clean, robust, total = clean_and_robust_counts(model, images, labels, None)
    assert clean == robust and total == 48
    no_attack = pgd_accuracy(model, images, labels, eps=0, steps=5)  # documented: the clean accuracy twice
    assert no_attack["robust_acc"] == no_attack["clean_acc"] == clean / total


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def run_folder(setup, tmp_path_factory):
    """A models.create model trained on an image-folder dataset, saved with checkpoint.save_model."""
    models = pytest.importorskip("fastrobust.models")
    from PIL import Image

    from fastrobust.models.checkpoint import save_model

    _, train_split, test_split, g = setup
    root = tmp_path_factory.mktemp("imagefolder")
    for split, (images, labels) in (("train", (train_split[0][:300], train_split[1][:300])), ("test", test_split)):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"c{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:04d}.png")
    model = models.create("tinycnn", num_classes=C, in_channels=1, image_size=H)
    train(model, *train_split, g, epochs=2)
    path = root / "model.safetensors"
    save_model(model, path, {"note": "test"})
    wrong = models.create("tinycnn", num_classes=5, in_channels=1, image_size=H)
    save_model(wrong, root / "wrong.safetensors", {})
    return root, path


def cli(*argv):
    from fastrobust.cli import main

    return main([str(a) for a in argv])


def test_cli_eval_json_out_and_errors(run_folder, tmp_path, monkeypatch, capsys):
    root, path = run_folder
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "records.jsonl"
    base = ["eval", "--checkpoint", path, "--dataset", "imagefolder", "--data-root", root, "--device", "cpu"]
    code = cli(*base, "--eps", "8/255", "--attack", "pgd20", "--attack", "square", "--json", "--out", out,
               "--quiet", "--batch-size", "16", "--queries", "50")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)
    assert record["eps"] == pytest.approx(8 / 255) and set(record["attacks"]) == {"pgd20", "square"}
    assert record["attacks"]["square"]["settings"]["n_queries"] == 50
    assert record["n"] == 48 and record["robust_acc"] <= record["clean_acc"]
    code = cli(*base, "--eps", "0.02", "--out", out, "--quiet")
    summary = capsys.readouterr().out
    assert code == 0 and "pgd20" in summary and "worst case" in summary
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["attacks"]["pgd20"]["settings"]["steps"] == 20

    assert cli(*base, "--eps", "8") == 2
    assert "did you mean 8/255" in capsys.readouterr().err
    wrong = ["eval", "--checkpoint", root / "wrong.safetensors", "--dataset", "imagefolder", "--data-root", root]
    assert cli(*wrong, "--quiet") == 2
    err = capsys.readouterr().err
    assert "num_classes=5" in err and "10 classes" in err
    assert cli("eval", "--checkpoint", tmp_path / "missing", "--dataset", "imagefolder", "--data-root", root) == 2
    assert "does not exist" in capsys.readouterr().err


def test_progress_bar_per_attack_and_silence(setup, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    model, _, test_split, _ = setup
    terminal = Terminal()
    with monkeypatch.context() as patch:  # bars are drawn on a terminal only (tests/test_progress_bars.py)
        patch.setattr("sys.stderr", terminal)
        evaluate(model, test_split, ["fgsm", "pgd20"], eps=0.03, batch_size=16, progress=True)
    assert "fgsm" in terminal.getvalue() and "pgd20" in terminal.getvalue()
    evaluate(model, test_split, ["fgsm", "pgd20"], eps=0.03, batch_size=16, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
