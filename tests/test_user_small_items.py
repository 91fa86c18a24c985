"""The small items a new user tripped on (issue 23, point 6): a factory that imports a module beside it, the
AutoAttack-fast upper-bound note, the normalisation named once on the eval model line, eps written 8/255 by
train and eval alike, the extra evaluation in the --quiet sweep lines, a short download error."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from torch import nn

from fastrobust.analysis.sweep import short_summary
from fastrobust.cli import main
from fastrobust.cli.eval_cmd import print_summary
from fastrobust.train.presets import preset_descriptions

from helpers import write_cifar10_archive

FACTORY = "from parts_beside_the_factory_23 import small_net\n\n\ndef build(num_classes):\n    return small_net(num_classes)\n"
PARTS = ("from torch import nn\n\n\ndef small_net(num_classes):\n"
         "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))\n")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_archive(root / "cifar-10-python.tar.gz", per_batch=10)
    return root


@pytest.fixture
def run_cli(cifar_root, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("FASTROBUST_CACHE", str(cifar_root / "cache"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # whatever a factory adds is dropped after the test

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _factory_weights(tmp_path):
    folder = tmp_path / "my code"
    folder.mkdir()
    (folder / "factory.py").write_text(FACTORY)
    (folder / "parts_beside_the_factory_23.py").write_text(PARTS)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).state_dict(), tmp_path / "w.pt")
    return folder / "factory.py", tmp_path / "w.pt"


def test_a_model_factory_can_import_a_module_beside_it(run_cli, cifar_root, tmp_path):
    factory, weights = _factory_weights(tmp_path)
    code, out, err = run_cli("eval", "--checkpoint", weights, "--model-factory", f"{factory}:build", "--dataset",
                             "cifar10", "--data-root", cifar_root, "--attack", "clean", "--device", "cpu", "--quiet",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["model_source"]["factory"].endswith("factory.py:build")


def test_the_eval_model_line_names_the_normalisation_once(run_cli, cifar_root, tmp_path):
    factory, weights = _factory_weights(tmp_path)
    code, _, err = run_cli("eval", "--checkpoint", weights, "--model-factory", f"{factory}:build", "--normalization",
                           "0.5,0.25", "--dataset", "cifar10", "--data-root", cifar_root, "--attack", "clean",
                           "--device", "cpu", "--json")
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("fastrobust eval: model ")]
    assert line.count("mean") == 1 and line.count("std") == 1, line
    assert "[0.5, 0.5, 0.5]" in line



@pytest.mark.parametrize("quiet", [False, True], ids=["model-line", "quiet"])
def test_eval_of_a_thirdparty_model_names_its_normalisation_once_in_all(run_cli, cifar_root, tmp_path, quiet):
    """The model line says it; the "loaded:" line of the table says it only when no model line was printed."""
    factory, weights = _factory_weights(tmp_path)
    code, out, err = run_cli("eval", "--checkpoint", weights, "--model-factory", f"{factory}:build",
                             "--normalization", "0.5,0.25", "--dataset", "cifar10", "--data-root", cifar_root,
                             "--attack", "clean", "--device", "cpu", *(["--quiet"] if quiet else []))
    assert code == 0, err
    (loaded,) = [line for line in out.splitlines() if line.startswith("loaded: ")]
    assert "built by" in loaded  # the rest of the line stays
    assert (out + err).count("normalisation") == 1 and (out + err).count("[0.5, 0.5, 0.5]") == 1, out + err
    assert ("normalisation" in loaded) == quiet


DEVELOPMENT_WORDS = re.compile(r"\bdevelopment\b|\bthe project\b|benchmarks/|\bthis machine\b|\bour\b|\bwe\b",
                               re.IGNORECASE)


def test_preset_descriptions_speak_to_a_user_not_of_how_fastrobust_is_developed():
    described = preset_descriptions()
    assert "laptop or desktop CPU" in described["cifar10-tinycnn-speedrun-cpu"] and "--plan" in described["cifar10-tinycnn-speedrun-cpu"]
    spoken = {name: DEVELOPMENT_WORDS.findall(text) for name, text in described.items()}
    assert not {name: words for name, words in spoken.items() if words}

def _record(attacks):
    return {"model": "m", "dataset": "cifar10", "n": 200, "norm": "linf", "eps": 8 / 255, "device": "cpu",
            "clean_acc": 0.32, "robust_acc": min(a["robust_acc"] for a in attacks.values()), "attacks": attacks}


def test_eval_table_marks_autoattack_fast_as_an_upper_bound_and_writes_eps_as_255ths(capsys):
    entry = {"robust_acc": 0.165, "broken": 31, "seconds": 3.0, "broken_by": {"apgd-ce": 30, "apgd-t": 1}}
    print_summary(_record({"autoattack-fast": entry}), file=sys.stdout)
    out = capsys.readouterr().out
    assert "linf eps=8/255," in out and "0.03137" not in out
    assert "upper bound of standard AutoAttack" in out
    print_summary(_record({"pgd20": {"robust_acc": 0.205, "broken": 23, "seconds": 1.0}}), file=sys.stdout)
    assert "upper bound" not in capsys.readouterr().out  # the note belongs to autoattack-fast only


def test_train_prints_eps_as_eval_does(run_cli, cifar_root, tmp_path):
    code, out, err = run_cli("train", "--method", "fast_at", "--model", "tinycnn", "--set", "model.width=4",
                             "--dataset", "cifar10", "--data-root", cifar_root, "--train-subset", "20", "--val-size",
                             "10", "--test-subset", "10", "--epochs", "1", "--batch-size", "10", "--device", "cpu",
                             "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "eps=8/255)" in out and "eps=0.0314" not in out, out


def test_quiet_sweep_line_includes_the_extra_evaluation(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"train_seconds": 21.0,
                                                       "test": {"clean_acc": 0.309, "pgd20_acc": 0.197}}))
    evaluation = {"eps": 8 / 255, "attacks": {"pgd20": {"robust_acc": 0.205}, "autoattack-fast": {"robust_acc": 0.165}}}
    (tmp_path / "eval.json").write_text(json.dumps({"evaluations": [evaluation]}))
    line = short_summary(tmp_path)
    assert line.startswith("clean_acc 0.3090, pgd20_acc 0.1970, 21s")
    assert "eval at eps 8/255: pgd20 0.2050 autoattack-fast 0.1650" in line
