"""``fastrobust eval --protocol robustbench`` and ``robustbench_evaluation``: the first N points of the official
test order, standard AutoAttack at the standard eps, the clean pass on the same points, RobustBench's model_info
fields with the compute column, the per-point cross-check with the official AutoAttack, and the refusal of data
whose test order is not the official one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import cifar_arrays, write_cifar10
from PIL import Image

from fastrobust.attacks.official import official_available
from fastrobust.cli import main
from fastrobust.data import load_dataset
from fastrobust.data.datasets import CIFAR10_CLASSES
from fastrobust.errors import ConfigError
from fastrobust.evaluate.leaderboard import robustbench_evaluation
from fastrobust.models import create
from fastrobust.models.checkpoint import save_model
from fastrobust.train.evaluations import evaluated_points, read_evaluations

pytestmark = pytest.mark.usefixtures("one_thread")

PER_BATCH = 12
# RobustBench's model_info fields (its README, "Claim": model_info/cifar10/Linf/Rice2020Overfitting.json)
ROBUSTBENCH_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc"}
SHORT = {"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5, "n_targets": 2}, "fab-t": {"n_iter": 5, "n_targets": 2},
         "square": {"n_queries": 20}}


def tiny_model():
    """An untrained tinycnn whose logits move with the input (head scaled up, no bias): AutoAttack fools its
    points in a few steps, so the standard settings run fast."""
    torch.manual_seed(0)
    model = create("tinycnn", num_classes=10, width=4).eval()
    with torch.no_grad():
        model.fc.weight.mul_(100)
        model.fc.bias.zero_()
    return model


@pytest.fixture
def official_cifar(tmp_path):
    """Official-format CIFAR-10 python batches whose test labels are the tiny model's predictions except on points
    2 and 5 (so most points are clean-correct and the attack has work to do)."""
    model = tiny_model()
    test_data, _ = cifar_arrays(PER_BATCH, 10, 5)  # what write_cifar10 writes as test_batch (the 6th file)
    with torch.no_grad():
        predicted = model(torch.from_numpy(test_data).reshape(-1, 3, 32, 32).float() / 255).argmax(1).tolist()
    labels = [(p + 1) % 10 if i in (2, 5) else p for i, p in enumerate(predicted)]
    root = tmp_path / "data"
    write_cifar10(root / "cifar-10-batches-py", per_batch=PER_BATCH,
                  labels_fn=lambda name, default: labels if name == "test_batch" else default)
    return root, model, labels


def test_first_points_standard_eps_and_model_info_fields(official_cifar, tmp_path):
    root, model, _ = official_cifar
    dataset = load_dataset("cifar10", root, val_size=0, cache_dir=tmp_path / "cache")
    assert dataset.official_order
    record = robustbench_evaluation(model, dataset, n=8, batch_size=4, progress=False, attack_options=SHORT)
    assert record["n"] == 8 and record["eps"] == 8 / 255 and record["norm"] == "linf"
    assert record["clean_correct"] == 6  # the first 8 points: all but points 2 and 5
    assert set(record["attacks"]) == {"clean", "autoattack"}
    assert record["protocol"]["official_order"] is True and "first 8" in record["protocol"]["points"]
    info = record["model_info"]
    assert ROBUSTBENCH_FIELDS <= set(info)
    assert info["dataset"] == "cifar10" and info["threat_model"] == "Linf" and info["eps"] == "8/255"
    assert info["clean_acc"] == "75.00"  # 6 of 8, in percent with two decimals as the leaderboard writes it
    assert info["autoattack_acc"] == f"{100 * record['attacks']['autoattack']['robust_acc']:.2f}"
    assert info["architecture"] == type(model).__name__ and info["n_examples"] == 8
    assert info["autoattack_version"] == "custom"  # shortened: not a leaderboard number, and it says so
    cost = info["cost"]
    assert cost["autoattack"]["forward"] > 0 and cost["autoattack"]["backward"] > 0
    assert cost["forward"] == record["cost"]["forward"] and cost["device"] == "cpu"
    json.dumps(record)


def test_a_class_sorted_copy_is_refused_unless_asked(tmp_path):
    tree = tmp_path / "data" / "CIFAR-10-images"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (tree / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tree / split / name / "0.jpg")
    dataset = load_dataset("cifar10", tmp_path / "data", val_size=0, cache_dir=tmp_path / "cache")
    assert not dataset.official_order
    with pytest.raises(ConfigError) as refused:
        robustbench_evaluation(tiny_model(), dataset, n=4, progress=False, attack_options=SHORT)
    text = str(refused.value)
    assert "\n" not in text and "not the official one" in text and "--allow-other-order" in text
    record = robustbench_evaluation(tiny_model(), dataset, n=4, progress=False, attack_options=SHORT,
                                    allow_other_order=True)
    assert record["n"] == 4 and record["protocol"]["official_order"] is False


def test_no_standard_eps_and_too_many_points_are_one_line(official_cifar, tmp_path):
    root, model, _ = official_cifar
    dataset = load_dataset("cifar10", root, val_size=0, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="no standard l2 eps for dataset 'cifar100'|give --eps"):
        robustbench_evaluation(model, dataset.__class__(**{**dataset.__dict__, "name": "cifar100"}), norm="l2")
    with pytest.raises(ConfigError, match="--test-subset 13 is larger than the 12 test images"):
        robustbench_evaluation(model, dataset, n=13)
    with pytest.raises(ConfigError, match="--cross-check 9 is more than the 8 points"):
        robustbench_evaluation(model, dataset, n=8, cross_check=9)


@pytest.fixture
def cli(official_cifar, tmp_path, monkeypatch, capsys):
    root, _, _ = official_cifar
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(), path)

    def run(*extra):
        try:
            code = main(["eval", "--checkpoint", str(path), "--dataset", "cifar10", "--data-root", str(root),
                         "--device", "cpu", "--quiet", "--batch-size", "4", *map(str, extra)])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.skipif(not official_available(), reason="the official AutoAttack (pyautoattack) is not installed")
def test_cli_protocol_writes_model_info_and_cross_checks(cli, tmp_path):
    info_file = tmp_path / "model_info.json"
    code, out, err = cli("--protocol", "robustbench", "--test-subset", 6, "--cross-check", 3, "--model-info",
                         info_file, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["n"] == 6 and set(record["attacks"]) == {"clean", "autoattack"}
    assert record["attacks"]["autoattack"]["settings"]["options"]["apgd-ce"]["n_iter"] == 100  # standard
    info = json.loads(info_file.read_text())
    assert ROBUSTBENCH_FIELDS <= set(info) and info == record["model_info"]
    assert info["autoattack_version"] == "standard" and info["architecture"] == "tinycnn" and info["eps"] == "8/255"
    assert info["clean_acc"] == "66.67"  # the first 6 points: all but points 2 and 5
    check = record["cross_check"]
    assert check["points"] == 3 and len(check["indices"]) == 3 and all(0 <= i < 6 for i in check["indices"])
    assert check["agree"] + len(check["differ"]) == 3
    assert check["agree"] == 3 and check["official_robust"] == check["fastrobust_robust"] == 0  # both fool all
    assert check["cost"]["forward"] > 0
    code, out, err = cli("--protocol", "robustbench", "--test-subset", 6)
    assert code == 0, err
    assert "protocol robustbench: the first 6 of the test split (the official test order)" in out


def test_cli_refusals_are_one_line(cli):
    for extra, needle in [(["--protocol", "robustbench", "--attack", "pgd20"], "drop --attack"),
                          (["--protocol", "robustbench", "--queries", "100"], "drop --queries"),
                          (["--cross-check", "3"], "--cross-check belongs to --protocol"),
                          (["--protocol", "robustbench", "--cross-check", "-1"], "--cross-check")]:
        code, _, err = cli(*extra)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert needle in err, err


def test_protocol_points_kept_in_a_run_say_whether_the_order_is_official(tmp_path, monkeypatch, capsys):
    """A run evaluated with --protocol on a class-sorted copy: its record's points are the first N of the whole
    test split in that copy's order ("head"), not the official order."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (root / "CIFAR-10-images" / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / "CIFAR-10-images" / split / name / "0.jpg")
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10"}))
    save_model(tiny_model(), run / "best.safetensors")
    code = main(["eval", "--checkpoint", str(run), "--dataset", "cifar10", "--data-root", str(root), "--device", "cpu",
                 "--quiet", "--batch-size", "4", "--protocol", "robustbench", "--allow-other-order",
                 "--test-subset", "4"])
    assert code == 0, capsys.readouterr().err
    (record,), unreadable = read_evaluations(run)
    assert not unreadable and record["protocol"]["official_order"] is False
    assert record["points"] == {"split": "test", "selection": "head", "count": 4, "of": 10}


def test_evaluated_points_of_each_kind():
    protocol = {"name": "robustbench", "official_order": True, "test_images": 10000}
    assert evaluated_points({"n": 100, "protocol": protocol}, None) == {
        "split": "test", "selection": "official_head", "count": 100, "of": 10000}
    assert evaluated_points({"n": 100, "protocol": {**protocol, "official_order": False}}, None)["selection"] == "head"
    assert evaluated_points({"n": 300}, 300) == {"split": "test", "selection": "balanced_head", "count": 300}
