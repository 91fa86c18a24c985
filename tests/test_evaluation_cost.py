"""The compute column of an evaluation record: forward and backward passes of the model counted at its call (the
same way for every attack), per attack and in total, kept in the resumable state, shown by ``fastrobust eval``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastrobust.analysis.report import build_report
from fastrobust.attacks import autoattack
from fastrobust.cli import main
from fastrobust.core.passes import CountedModel
from fastrobust.evaluate import evaluate
from fastrobust.models import create
from fastrobust.models.checkpoint import save_model

from helpers import write_cifar10_archive
from test_report import write_run

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH, WRONG = 10, 4, 3  # 10 points in batches of 4, 4 and 2; the last 3 points misclassified
CORRECT = N - WRONG


class Unfoolable(nn.Module):
    """Class 0 wins by a margin of 10 whatever the image in [0, 1]: no attack within eps can fool it, so every
    attack runs its full budget on every clean-correct point."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 4)
        with torch.no_grad():  # the same weights every time (a state file is bound to them)
            self.linear.weight.copy_(torch.randn(4, 48, generator=torch.Generator().manual_seed(1)) * 1e-3)
            self.linear.bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return self.linear(x.flatten(1))


def points():
    x = torch.rand(N, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(N, dtype=torch.long)
    y[N - WRONG:] = 1  # misclassified: no attack runs on them
    return x, y


def test_pgd20_and_fgsm_report_exactly_their_passes():
    torch.manual_seed(0)
    record = evaluate(Unfoolable(), points(), ["clean", "fgsm", "pgd20"], eps=8 / 255, batch_size=BATCH,
                      progress=False)
    assert record["clean_correct"] == CORRECT
    attacks = record["attacks"]
    # PGD-20: 20 steps of one forward and one backward on each clean-correct point, then evaluate's final check
    # of the adversarials (one forward per point)
    pgd = attacks["pgd20"]["cost"]
    assert (pgd["forward"], pgd["backward"]) == (CORRECT * 21, CORRECT * 20)
    assert (pgd["forward_per_point"], pgd["backward_per_point"]) == (21.0, 20.0)
    fgsm = attacks["fgsm"]["cost"]  # one step, then the final check
    assert (fgsm["forward"], fgsm["backward"]) == (CORRECT * 2, CORRECT)
    clean = attacks["clean"]["cost"]  # one forward of every point, per point over all points
    assert (clean["forward"], clean["backward"], clean["forward_per_point"]) == (N, 0, 1.0)
    total = record["cost"]
    # the pre-checks on the first batch: two forwards (randomness), one forward and backward (zero gradients)
    assert total["prechecks"] == {"forward": 3 * BATCH, "backward": BATCH}
    assert total["clean"] == {"forward": N, "backward": 0}
    assert total["forward"] == 3 * BATCH + N + CORRECT * 2 + CORRECT * 21
    assert total["backward"] == BATCH + CORRECT + CORRECT * 20
    assert total["device"] == "cpu" and total["precision"] == "float32"
    for entry in [total, pgd, fgsm, clean]:
        assert entry["seconds"] >= 0 and entry["process_seconds"] >= 0
    json.dumps(record)  # JSON-able


def test_no_clean_correct_point_has_no_per_point_cost():
    x, y = points()
    record = evaluate(Unfoolable(), (x, torch.ones_like(y)), ["pgd20"], eps=8 / 255, batch_size=BATCH,
                      progress=False)
    cost = record["attacks"]["pgd20"]["cost"]
    assert (cost["forward"], cost["backward"], cost["forward_per_point"]) == (0, 0, None)


def test_a_resumed_evaluation_reports_the_same_cost(tmp_path):
    state = tmp_path / "state.json"
    attacks = ["clean", "pgd20", "square"]
    options = {"square": {"n_queries": 30}}
    full = evaluate(Unfoolable(), points(), attacks, eps=8 / 255, batch_size=BATCH, progress=False,
                    attack_options=options, state_file=state)
    saved = json.loads(state.read_text())
    assert saved["clean_cost"]["1"] == {"forward": BATCH, "backward": 0,
                                        "process_seconds": saved["clean_cost"]["1"]["process_seconds"]}
    assert saved["attacks"]["pgd20"]["batches"]["0"]["forward"] == BATCH * 21  # batch 0: 4 clean-correct points

    # everything loaded: the record's cost comes from the state, seconds included
    again = evaluate(Unfoolable(), points(), attacks, eps=8 / 255, batch_size=BATCH, progress=False,
                     attack_options=options, state_file=state)
    assert again["cost"] == full["cost"]
    assert {k: e["cost"] for k, e in again["attacks"].items()} == {k: e["cost"] for k, e in full["attacks"].items()}

    # interrupted after the first batch of pgd20: the rest is computed on resume, the passes add up the same
    del saved["clean"]["2"], saved["clean_non_finite"]["2"], saved["clean_cost"]["2"]
    saved["attacks"]["pgd20"]["batches"] = {"0": saved["attacks"]["pgd20"]["batches"]["0"]}
    del saved["attacks"]["square"]
    state.write_text(json.dumps(saved))
    resumed = evaluate(Unfoolable(), points(), attacks, eps=8 / 255, batch_size=BATCH, progress=False,
                       attack_options=options, state_file=state)
    passes = ("forward", "backward", "forward_per_point", "backward_per_point")
    for name in attacks:
        assert {k: resumed["attacks"][name]["cost"][k] for k in passes} == \
            {k: full["attacks"][name]["cost"][k] for k in passes}, name
    for key in ("forward", "backward", "prechecks", "clean"):
        assert resumed["cost"][key] == full["cost"][key], key
    # Square: 30 queries per point (its start included) and the final check, no backward; the passes count what
    # the model evaluated, also the candidates Square evaluates ahead on few points and then discards
    square = full["attacks"]["square"]
    assert square["queries_mean"] == 30
    assert square["cost"]["forward"] >= CORRECT * (30 + 1) and square["cost"]["backward"] == 0


def test_frozen_copies_count_as_the_model():
    """AutoAttack evaluates frozen TorchScript copies of the model on the CPU: their passes count as the model's,
    so a run with copies reports the passes of a run without them, plus the few of the check that the copies agree
    with the model (uncounted copies would lose most of APGD-T's, FAB-T's and Square's)."""
    x, y = points()
    x, y = x[:CORRECT], y[:CORRECT]
    options = {"apgd-ce": {"n_iter": 3}, "apgd-t": {"n_iter": 3, "n_targets": 2},
               "fab-t": {"n_iter": 3, "n_targets": 2}, "square": {"n_queries": 10}}
    counts = {}
    for freeze in (True, False):
        counted = CountedModel(Unfoolable().eval())
        result = autoattack(counted, x, y, eps=8 / 255, options=options, freeze=freeze, return_details=True)
        counts[freeze] = (counted.count.forward, counted.count.backward)
        if freeze:
            assert any("frozen TorchScript" in note for note in result.notes), result.notes
    for frozen, plain in zip(counts[True], counts[False]):
        assert plain > 0 and abs(frozen - plain) <= 0.1 * plain, counts


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    root.mkdir()
    write_cifar10_archive(root / "cifar-10-python.tar.gz", per_batch=10)
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = tmp_path / "tiny.safetensors"
    save_model(create("tinycnn", num_classes=10, width=4), model)

    def run(*extra):
        code = main(["eval", "--checkpoint", str(model), "--dataset", "cifar10", "--data-root", str(root),
                     "--device", "cpu", "--quiet", "--batch-size", "4", *map(str, extra)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_eval_prints_the_cost_column_and_json(cli):
    code, out, err = cli("--attack", "pgd20", "--json")
    assert code == 0, err
    record = json.loads(out)
    correct = record["clean_correct"]
    cost = record["attacks"]["pgd20"]["cost"]
    assert (cost["forward"], cost["backward"]) == (correct * 21, correct * 20)
    assert record["cost"]["clean"] == {"forward": 10, "backward": 0}
    code, out, err = cli("--attack", "pgd20")
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("attack"))
    assert "fwd/pt" in header and "bwd/pt" in header
    row = next(line for line in out.splitlines() if line.startswith("pgd20"))
    if correct:
        assert " 21 " in row and " 20 " in row, row
    assert f"{record['cost']['forward']:,} forward" in out and "float32" in out


def test_the_report_states_the_passes_per_point(tmp_path):
    """``fastrobust report`` says what each extra evaluation cost, from the records' compute column."""
    root = tmp_path / "runs"
    write_run(root, "trades", "trades", 0, 0.82, 0.53, 600.0)
    record = {"eps": 8 / 255, "n": 10, "clean_acc": 0.7, "robust_acc": 0.5,
              "attacks": {"pgd100": {"robust_acc": 0.5, "settings": {},
                                     "cost": {"forward_per_point": 101.0, "backward_per_point": 100.0}}}}
    (root / "trades" / "eval.json").write_text(json.dumps({"model": "best.safetensors", "evaluations": [record]}))
    build_report(root, tmp_path / "r", html_page=False)
    assert "pgd100 [101 forward + 100 backward passes per point]" in (tmp_path / "r" / "report.md").read_text()
