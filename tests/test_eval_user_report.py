"""A new user's report on the evaluation side (CLI ``fastrobust eval``, ``evaluate``, ``sanity_checks``): files
that must not be written into, the l2 budget, fixed-batch programs, messages, Python API inputs, record details.
Each test failed before its fix (the third trial's
sanity-check test guards the new large-eps warning from firing on sanity's own large eps)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import synthetic_dataset, write_cifar10_archive
from test_report import md_row, write_run
from torch import nn

import fastrobust.evaluate
import fastrobust.evaluate.leaderboard
import fastrobust.evaluate.sanity
from fastrobust.analysis.report import build_report, wilson_interval
from fastrobust.cli import main
from fastrobust.core.contract import eps_size_note
from fastrobust.core.output_files import check_writable, folder_problem
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.evaluate import evaluate
from fastrobust.models import create
from fastrobust.models.checkpoint import load_model, save_model
from fastrobust.train import TrainConfig, train
from fastrobust.train import run_folder as train_run_folder
from fastrobust.train.evaluations import read_evaluations


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 in the official archive format (10 test images)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_archive(root / "cifar-10-python.tar.gz", per_batch=10)
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    torch.manual_seed(0)
    save_model(create("tinycnn", num_classes=10), path)
    return path


@pytest.fixture
def cli(cifar_root, monkeypatch, capsys, one_thread):
    """``fastrobust eval`` on the tiny CIFAR-10; returns (exit code, stdout, stderr, evaluate's keyword arguments)
    -- the keyword arguments are empty when evaluate was never called."""
    monkeypatch.setenv("FASTROBUST_CACHE", str(cifar_root / "cache"))
    seen: dict = {}
    real = fastrobust.evaluate.evaluate

    def capture(model, *args, **kwargs):
        seen.update(kwargs)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fastrobust.evaluate, "evaluate", capture)

    def run(checkpoint, *extra, dataset=True, quiet=True):
        seen.clear()
        argv = ["eval", "--checkpoint", str(checkpoint), *(["--dataset", "cifar10"] if dataset else []),
                "--data-root", str(cifar_root), "--attack", "clean", "--device", "cpu", *(["--quiet"] if quiet else []), *map(str, extra)]
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err, dict(seen)

    return run


def one_line_error(code, err, *needles):
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ----------------------------------------------------------------------------- 1. --out and --state
def test_out_never_appends_to_a_model_or_other_file(cli, model_file, tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(model_file.read_bytes())
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dataset": "cifar10", "epochs": 3}, indent=2))
    blob = tmp_path / "weights.data"
    blob.write_bytes(bytes(range(256)) * 4)
    for target, needle in ((victim, "model file"), (config, "not a JSON-lines records file"),
                           (blob, "not a JSON-lines records file")):
        before = target.read_bytes()
        code, _, err, seen = cli(model_file, "--out", target)
        one_line_error(code, err, f"--out {target}")
        assert needle in err
        assert target.read_bytes() == before and not seen  # refused before any attack ran


def test_unwritable_out_is_refused_before_the_evaluation(cli, model_file, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, _, err, seen = cli(model_file, "--out", tmp_path / "a-file" / "results.jsonl")
    one_line_error(code, err, "cannot be created", "is a file, not a folder")
    assert not seen
    code, _, err, seen = cli(model_file, "--out", tmp_path)
    one_line_error(code, err, "is a folder")
    assert not seen


def test_out_appends_to_its_own_records(cli, model_file, tmp_path):
    out = tmp_path / "nested" / "results.jsonl"
    for _ in range(2):
        code, _, err, _ = cli(model_file, "--out", out)
        assert code == 0, err
    assert [json.loads(line)["attacks"]["clean"]["robust"] >= 0 for line in out.read_text().splitlines()] == [True] * 2


def test_a_failed_sanity_check_is_a_failing_exit_status_after_the_record_is_written(cli, model_file, tmp_path,
                                                                                     monkeypatch):
    """`eval --sanity` exited 0 when a check failed, so a script took a distrusted number for a pass."""
    verdicts = {"passed": True}

    def checks(*args, **kwargs):
        return [{"name": "more_steps", "passed": True, "detail": "fine"},
                {"name": "large_eps", "passed": verdicts["passed"], "detail": "PGD-20 at eps 0.5 leaves 40%"}]

    monkeypatch.setattr(fastrobust.evaluate.sanity, "sanity_checks", checks)
    out = tmp_path / "results.jsonl"
    code, stdout, err, _ = cli(model_file, "--sanity", "--out", out)
    assert code == 0, err
    verdicts["passed"] = False
    code, stdout, err, _ = cli(model_file, "--sanity", "--out", out)
    assert code == 3
    assert "sanity FAIL large_eps" in stdout
    assert "sanity check(s) failed: large_eps" in err and "Traceback" not in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sanity"][1]["passed"] for r in records] == [True, False]  # the failing record is kept too


def test_state_that_is_not_a_state_file_gets_one_line(cli, model_file, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dataset": "cifar10"}))
    garbage = tmp_path / "state.json"
    garbage.write_bytes(model_file.read_bytes())  # a model under a state file's name
    for state, needle in ((model_file, "named like a model file"), (tmp_path, "is a folder"),
                          (config, "not an evaluation state file"), (garbage, "it looks like a model file")):
        before = state.read_bytes() if state.is_file() else None
        code, _, err, seen = cli(model_file, "--state", state)
        one_line_error(code, err, str(state), needle)
        assert "UnicodeDecodeError" not in err and "delete" not in err and not seen
        assert before is None or state.read_bytes() == before


# ----------------------------------------------------------------------------- 2. the l2 budget
def test_l2_without_eps_uses_the_l2_budget(cli, model_file):
    code, _, err, seen = cli(model_file, "--norm", "l2")
    assert code == 0, err
    assert seen["eps"] == 0.5 and seen["norm"] == "l2"
    assert "--eps 0.5 (the usual l2 budget" in err


def test_l2_eps_beyond_the_image_box_is_refused_everywhere(cli, model_file):
    diameter = math.sqrt(3 * 32 * 32)
    code, _, err, seen = cli(model_file, "--norm", "l2", "--eps", "60")
    one_line_error(code, err, "--eps=60", f"{diameter:.4g}")
    assert not seen
    model = create("tinycnn", num_classes=10, image_size=8)
    data = (torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    for call in (lambda: evaluate(model, data, ["clean"], eps=14, norm="l2", progress=False),
                 lambda: fastrobust.evaluate.sanity.sanity_checks(model, data, eps=14, norm="l2")):
        with pytest.raises(ConfigError, match=r"larger than the diameter .* sqrt\(192\)"):
            call()
    with pytest.warns(UserWarning, match="is large for 3x8x8 images"):  # just inside: accepted, with the warning
        evaluate(model, data, ["clean"], eps=13.8, norm="l2", progress=False)


# ----------------------------------------------------------------------------- 3. fixed-batch torch.export programs
def test_fixed_batch_export_program_runs_on_any_batch(cli, tmp_path):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    torch.export.save(torch.export.export(net, (torch.rand(4, 3, 32, 32),)), str(tmp_path / "fixed.pt2"))
    code, out, err, _ = cli(tmp_path / "fixed.pt2", "--batch-size", "3", "--json")
    assert code == 0, err
    assert "exactly 4 images" in err and "dynamic_shapes" in err
    record = json.loads(out)
    assert record["n"] == 10 and record["model_source"]["fixed_batch"] == 4
    from fastrobust.models.programs import load_export

    program = load_export(tmp_path / "fixed.pt2")
    x = torch.rand(7, 3, 32, 32)
    torch.testing.assert_close(program(x), net(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 4. messages
def test_random_bytes_are_not_called_a_refused_pickle(cli, tmp_path):
    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.uint8).numpy().tobytes())
    code, _, err, _ = cli(tmp_path / "noise.pt", "--model", "tinycnn")
    one_line_error(code, err, "no recognised checkpoint format")
    assert "refused" not in err and "pickle stream" not in err


def test_a_pickled_whole_module_is_refused_with_the_state_dict_hint(cli, tmp_path):
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), tmp_path / "whole.pt")
    code, _, err, _ = cli(tmp_path / "whole.pt", "--model", "tinycnn")
    one_line_error(code, err, "refused to load", "torch.save(model.state_dict(), PATH)")


def test_torch_compile_prefix_is_stripped(tmp_path):
    from fastrobust.models.checkpoint import import_state_dict
    from fastrobust.models.layouts import strip_prefixes

    net = nn.Linear(3, 2)
    torch.save({f"_orig_mod.{k}": v for k, v in net.state_dict().items()}, tmp_path / "compiled.pt")
    assert set(strip_prefixes(import_state_dict(tmp_path / "compiled.pt"))) == {"weight", "bias"}
    assert set(strip_prefixes({f"module._orig_mod.{k}": v for k, v in net.state_dict().items()})) == {"weight", "bias"}


def test_train_state_file_points_to_the_model_file(cli, tmp_path):
    from fastrobust.train import state as training_state

    model = create("tinycnn", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    snap = training_state.capture(model, optimizer, {}, torch.device("cpu"), {"global_step": 5, "epoch": 0})
    folder = training_state.write(tmp_path, snap, model)
    code, _, err, _ = cli(folder / "train_state.safetensors", "--model", "tinycnn")
    one_line_error(code, err, "not model weights", str(folder / "model.safetensors"))


def test_no_hint_names_a_download_flag_that_eval_lacks(cli, model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTROBUST_DATA", str(tmp_path / "none"))
    code, _, err = cli(model_file, "--data-root", tmp_path / "none")[:3]
    assert code == 2 and "Traceback" not in err
    assert "pass --download" not in err and "fastrobust data cifar10 --download" in err


# ----------------------------------------------------------------------------- 5. the Python API
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    model = create("tinycnn", num_classes=4, image_size=8).eval()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    return model, x, y


def test_one_attack_name_as_a_string(small, one_thread):
    model, x, y = small
    assert list(evaluate(model, (x, y), "pgd20", eps=8 / 255, progress=False)["attacks"]) == ["pgd20"]


def test_eps_as_a_zero_dim_tensor(small, one_thread):
    model, x, y = small
    record = evaluate(model, (x, y), ["fgsm"], eps=torch.tensor(8 / 255), progress=False)
    assert record["eps"] == pytest.approx(8 / 255)


def test_model_returning_a_tuple_is_one_clear_error(small):
    model, x, y = small

    class WithFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, images):
            return self.inner(images), images.flatten(1)

    with pytest.raises(FastRobustError, match=r"returned a tuple.*model\(x\)\[0\]"):
        evaluate(WithFeatures(), (x, y), ["fgsm"], eps=8 / 255, progress=False)


def test_channels_last_images_empty_data_and_wrong_channels_are_refused(small):
    model, x, y = small
    with pytest.raises(ConfigError, match=r"channels-last \[B, H, W, C\].*permute\(0, 3, 1, 2\)"):
        evaluate(model, (x.permute(0, 2, 3, 1), y), ["clean"], eps=8 / 255, progress=False)
    with pytest.raises(ConfigError, match="holds no images"):
        evaluate(model, (x[:0], y[:0]), ["clean"], eps=8 / 255, progress=False)
    with pytest.raises(ConfigError, match=r"1 channel\(s\).*in_channels=3"):
        evaluate(model, (x[:, :1], y), ["clean"], eps=8 / 255, progress=False)
    with pytest.raises(ConfigError, match="holds no images"):
        fastrobust.evaluate.sanity.sanity_checks(model, (x[:0], y[:0]), eps=8 / 255)


def test_uint8_images_of_only_zeros_and_ones_warn(small):
    model, x, y = small
    mask = (x > 0.5).to(torch.uint8)
    with pytest.warns(UserWarning, match="uint8 holding only 0 and 1: a mask"):
        evaluate(model, (mask, y), ["clean"], eps=8 / 255, progress=False)


# ----------------------------------------------------------------------------- 6. record details
def test_broken_by_follows_the_attack_order():
    from fastrobust.evaluate.record import build_record
    from fastrobust.evaluate.state import EvaluationState

    settings = {"autoattack": {"options": {"apgd-ce": {}, "apgd-t": {}, "fab-t": {}, "square": {}}}}
    cost = {"forward": 0, "backward": 0, "process_seconds": 0.0}  # each batch's passes (state version 3)
    batch = {"robust": [False] * 4, "non_finite": [0] * 4, "seconds": 0.0,
             "broken_by": ["square", "apgd-t", "apgd-ce", "square"], **cost}
    state = EvaluationState(clean={"0": [True] * 4}, clean_non_finite={"0": [0] * 4}, clean_cost={"0": cost},
                            attacks={"autoattack": {"batches": {"0": batch}}})
    record = build_record(nn.Identity(), state, ["autoattack"], settings, {}, eps=8 / 255, norm="linf", n=4,
                          n_batches=1, batch_size=4, seed=0, device=torch.device("cpu"), seconds=0.0, num_classes=10,
                          dim=3072)
    assert list(record["attacks"]["autoattack"]["broken_by"].items()) == [("apgd-ce", 1), ("apgd-t", 1), ("square", 2)]


def test_gaussian_noise_counts_are_whole_numbers(small, one_thread):
    model, x, y = small
    entry = evaluate(model, (x, y), ["gaussian-noise"], eps=8 / 255, progress=False)["attacks"]["gaussian-noise"]
    assert type(entry["robust"]) is int and type(entry["broken"]) is int and entry["pairs"] == 6 * 10


# ----------------------------------------------------------------------------- 7. sanity checks on a balanced head
def test_sanity_checks_take_a_class_balanced_head(small, monkeypatch):
    model, _, _ = small
    x = torch.rand(12, 3, 8, 8)
    y = torch.tensor([0] * 6 + [1] * 6)  # class-sorted
    seen = {}

    def stop(model_, data, *args, **kwargs):
        seen["labels"] = data[1]
        raise RuntimeError("enough")

    monkeypatch.setattr(fastrobust.evaluate.sanity, "evaluate", stop)
    with pytest.raises(RuntimeError, match="enough"):
        fastrobust.evaluate.sanity.sanity_checks(model, (x, y), eps=8 / 255, n=4)
    assert seen["labels"].tolist() == [0, 0, 1, 1]


def test_sanity_black_box_pass_text_says_what_was_compared(small, monkeypatch):
    model, x, y = small
    accs = {"fgsm": 0.5, "pgd20": 0.4, "pgd100": 0.4, "autoattack-fast": 0.375, "square": 0.45, "rays": 0.5}

    def fake(model_, data, attacks, **kwargs):
        return {"attacks": {name: {"robust_acc": accs[name] if name in accs else 0.0} for name in attacks},
                "device": "cpu"}

    monkeypatch.setattr(fastrobust.evaluate.sanity, "evaluate", fake)
    flags = {f["name"]: f for f in fastrobust.evaluate.sanity.sanity_checks(model, (x, y), eps=8 / 255)}
    detail = flags["black_box"]["detail"]
    assert flags["black_box"]["passed"], detail
    assert "square 0.4500, rays 0.5000" in detail and "lowest white-box accuracy 0.3750" in detail
    assert "PGD-20, PGD-100, AutoAttack-fast" in detail and "no sign of gradient masking" in detail


# ----------------------------------------------------------------------------- 8. run folders
def test_checkpoint_folder_and_dataset_from_the_run(cli, model_file, tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-000000005"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(model_file.read_bytes())
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10"}))
    code, out, err, _ = cli(step, "--json", dataset=False)
    assert code == 0, err
    assert "--dataset cifar10 (the dataset of run" in err
    assert json.loads(out)["dataset"] == "cifar10"



def test_eval_names_the_model_it_loaded_at_the_start(cli, model_file):
    code, _, err, _ = cli(model_file, "--json", quiet=False)
    assert code == 0, err
    params = sum(p.numel() for p in create("tinycnn", num_classes=10).parameters())
    assert f"model tinycnn, {params:,} parameters, input normalisation none (the model takes [0,1] pixels)" in err


def test_ctrl_c_during_eval_says_how_to_resume(cli, model_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastrobust.evaluate, "evaluate", interrupted)
    code, _, err, _ = cli(model_file)
    assert code == 130 and "add --state FILE" in err
    code, _, err, _ = cli(model_file, "--state", tmp_path / "s.json")
    assert code == 130 and f"kept in --state {tmp_path / 's.json'}: run the same command again" in err


# ----------------------------------------------------------------------------- second trial: l2 eps in l_inf units
def test_an_l2_eps_that_looks_like_an_linf_budget_warns_once_on_the_command_line(cli, model_file):
    code, out, err, seen = cli(model_file, "--norm", "l2", "--eps", "8/255", "--json")
    assert code == 0, err
    assert seen["norm"] == "l2"
    notes = [line for line in err.splitlines() if "l2 radius 0.0314 is small for 3x32x32 images" in line]
    assert len(notes) == 1, err  # once, before the attack (not repeated among the warnings printed at the end)
    assert notes[0] == ("fastrobust eval: warning: l2 radius 0.0314 is small for 3x32x32 images (an l2 ball of that "
                        "radius barely changes the image, so few points break); the usual CIFAR-10 l2 budget is 0.5 "
                        "(did you mean --norm linf?)")
    assert "UserWarning" not in err  # said in the command's words, not as a Python warning
    assert any("is small for 3x32x32 images" in text for text in json.loads(out)["warnings"])
    for extra in (("--norm", "l2", "--eps", "0.5"), ("--eps", "8/255")):
        code, _, err, _ = cli(model_file, *extra)
        assert code == 0 and "is small for" not in err, err


def test_an_l2_eps_that_looks_like_an_linf_budget_warns_in_evaluate_and_sanity_checks(one_thread):
    images = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(300, 10))
    with pytest.warns(UserWarning, match=r"l2 radius 0.0314 is small for 3x10x10 images.*did you mean norm='linf'"):
        record = evaluate(model, (images, labels), ["clean"], eps=8 / 255, norm="l2", progress=False)
    assert any("is small for 3x10x10" in text for text in record["warnings"])
    with pytest.warns(UserWarning, match=r"l2 radius 0.0314 is small"):
        fastrobust.evaluate.sanity.sanity_checks(model, (images, labels), eps=8 / 255, norm="l2", n=4, square_queries=2, apgd_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(model, (images, labels), ["clean"], eps=0.5, norm="l2", progress=False)
        tiny = nn.Sequential(nn.Flatten(), nn.Linear(25, 10))  # 25 values: a small radius can be meant
        evaluate(tiny, (images[:, :1, :5, :5], labels), ["clean"], eps=0.05, norm="l2", progress=False)


# ----------------------------------------------------------------------------- second trial: RUN/checkpoints
def test_the_checkpoints_folder_of_a_run_names_its_step_folders(cli, model_file, tmp_path):
    run = tmp_path / "run"
    for step in ("step-000000005", "step-000000010"):
        (run / "checkpoints" / step).mkdir(parents=True)
        (run / "checkpoints" / step / "model.safetensors").write_bytes(model_file.read_bytes())
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10"}))
    (run / "best.safetensors").write_bytes(model_file.read_bytes())
    code, _, err, _ = cli(run / "checkpoints", dataset=False)
    lines = err.strip().splitlines()
    assert lines[0].startswith("fastrobust eval: --dataset cifar10 (the dataset of run"), err  # RUN's dataset
    assert code == 2 and "Traceback" not in err and len(lines) == 2, err
    for needle in ("holds the checkpoint folders step-000000005, step-000000010: pass one, e.g. ",
                   str(run / "checkpoints" / "step-000000010") + " (the latest)",
                   f"or the run folder {run} for its best/last model"):
        assert needle in lines[1], lines[1]
    code, _, err, _ = cli(run / "checkpoints" / "step-000000010", "--json", dataset=False)
    assert code == 0, err


def test_a_folder_of_model_files_names_them(cli, model_file, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "tiny.safetensors").write_bytes(model_file.read_bytes())
    code, _, err, _ = cli(folder)
    one_line_error(code, err, "holds tiny.safetensors: pass the model file itself, e.g. "
                              f"{folder / 'tiny.safetensors'}")


# ----------------------------------------------------------------------------- third trial: the run's eps
def test_a_run_trained_at_another_eps_is_evaluated_at_its_eps(cli, model_file, tmp_path):
    run = tmp_path / "run4"
    run.mkdir()
    (run / "best.safetensors").write_bytes(model_file.read_bytes())
    (run / "config.json").write_text(json.dumps({"dataset": "cifar10", "eps": 4 / 255}))
    (run / "result.json").write_text(json.dumps({"dataset": {"name": "cifar10"}, "test": {"eps": 4 / 255}}))
    code, _, err, seen = cli(run)
    assert code == 0, err
    assert seen["eps"] == pytest.approx(4 / 255)  # not the 8/255 default, silently
    assert "--eps 4/255 (the eps run" in err
    code, _, err, seen = cli(run, "--eps", "8/255")  # given: kept
    assert code == 0 and seen["eps"] == pytest.approx(8 / 255) and "the eps run" not in err
    (run / "result.json").write_text(json.dumps({"dataset": {"name": "cifar10"}, "test": {"eps": 8 / 255}}))
    code, _, err, seen = cli(run)  # the default eps: nothing to say
    assert code == 0 and seen["eps"] == pytest.approx(8 / 255) and "the eps run" not in err


def test_out_refuses_a_training_log(cli, model_file, tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"epoch": 1, "lr_start": 0.1, "val_robust_acc": 0.2}) + "\n")
    before = log.read_bytes()
    code, _, err, seen = cli(model_file, "--out", log)
    assert code == 2 and not seen, err  # refused before any attack
    assert "line 1 is not an evaluation record" in err and "epoch" in err
    assert log.read_bytes() == before
    code, _, err, _ = cli(model_file, "--out", tmp_path / "results.jsonl")  # a new file, then appended to
    assert code == 0, err
    code, _, err, _ = cli(model_file, "--out", tmp_path / "results.jsonl")
    assert code == 0, err
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_a_verdict_status_reaches_the_caller_through_the_nproc_launcher(monkeypatch, tmp_path):
    """Under --nproc rank 0 returned 3, torchrun turned it into its own failure (a traceback, status 1)."""
    import subprocess

    from fastrobust.core import distributed as dist_lib

    def fake_torchrun(command, env):
        path = env[dist_lib.EXIT_STATUS_ENV]
        monkeypatch.setenv(dist_lib.EXIT_STATUS_ENV, path)
        assert dist_lib.exit_status(3, dist_lib.Context(rank=0, world_size=2, local_rank=0)) == 0
        assert dist_lib.exit_status(3, dist_lib.Context(rank=1, world_size=2, local_rank=1)) == 0
        return 0  # every worker exited 0

    monkeypatch.setattr(subprocess, "call", fake_torchrun)
    assert dist_lib.relaunch(2, ["eval", "--checkpoint", "m.safetensors", "--sanity", "--nproc", "2"]) == 3
    monkeypatch.setattr(subprocess, "call", lambda command, env: 1)  # a crash stays a crash
    assert dist_lib.relaunch(2, ["eval", "--checkpoint", "m.safetensors"]) == 1
    monkeypatch.delenv(dist_lib.EXIT_STATUS_ENV, raising=False)
    assert dist_lib.exit_status(3, dist_lib.Context()) == 3  # one process: the status itself


# ----------------------------------------------------------------------------- the record kept in the run folder
def _run_folder(root: Path, model: Path) -> Path:
    write_run(root, "run", "fast_at", 0, 0.82, 0.53, 60.0)
    run = root / "run"
    (run / "best.safetensors").write_bytes(model.read_bytes())
    return run


def test_eval_of_a_run_keeps_each_record_in_the_run_and_the_report_fills_autoattack(cli, model_file, tmp_path):
    run = _run_folder(tmp_path / "runs", model_file)
    out = tmp_path / "extra.jsonl"
    code, _, err, _ = cli(run, "--attack", "pgd100", "--out", out, dataset=False)
    assert code == 0, err
    code, _, err, _ = cli(run / "best.safetensors", "--attack", "autoattack-fast", "--queries", "20", dataset=False)
    assert code == 0, err
    records, unreadable = read_evaluations(run)
    assert unreadable == [] and len(records) == 2  # the second did not replace the first
    assert [sorted(r["attacks"]) for r in records] == [["clean", "pgd100"], ["autoattack-fast", "clean"]]
    assert {r["weights"] for r in records} == {"best.safetensors"}
    assert records[0]["points"] == {"split": "test", "selection": "balanced_head", "count": None}
    assert len(out.read_text().splitlines()) == 1  # --out still gets its line
    build_report(tmp_path / "runs", tmp_path / "report", html_page=False)
    md = (tmp_path / "report" / "report.md").read_text()
    row = md_row(md, "fast_at")
    n = records[1]["n"]
    aa = records[1]["attacks"]["autoattack-fast"]["robust_acc"]
    low, high = wilson_interval(aa, n)
    assert row[4] == f"{aa * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}] †"  # not "-"
    assert md_row(md, "Method")[4] == f"AutoAttack (n={n})"  # the column names its points


# ----------------------------------------------------------------------------- Ctrl-C: one line, with what to do next
@pytest.mark.parametrize("state", [False, True], ids=["no-state", "with-state"])
def test_ctrl_c_during_an_evaluation_prints_one_line_that_says_how_to_resume(cli, model_file, tmp_path, monkeypatch,
                                                                           state):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastrobust.evaluate, "evaluate", interrupted)
    extra = ["--state", tmp_path / "state.json"] if state else []
    code, out, err, _ = cli(model_file, *extra)
    assert code == 130 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastrobust eval: interrupted; ")
    assert (f"kept in --state {tmp_path / 'state.json'}" if state else "add --state FILE") in err


# ----------------------------------------------------------------------------- third trial: files, weights, eps
VIRTUAL = Path("/proc")  # a filesystem with no disk behind it, where os.access still says yes to root
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux") or not (VIRTUAL / "self").is_dir(),
                                reason="needs Linux's /proc")


# ---- 1. files checked before any work
@needs_proc
def test_out_state_and_model_info_on_a_virtual_filesystem_are_refused_before_the_evaluation(cli, model_file):
    targets = (("--out", VIRTUAL / "missing" / "results.jsonl"), ("--out", VIRTUAL / "results.jsonl"),
               ("--state", VIRTUAL / "eval-state.json"))
    for flag, target in targets:
        code, _, err, seen = cli(model_file, flag, target)
        one_line_error(code, err, f"{flag} {target} cannot be created", "/proc is a virtual filesystem")
        assert not seen  # before: every attack ran, then "cannot be written (No such file or directory)"

@needs_proc
def test_model_info_on_a_virtual_filesystem_is_refused_before_the_evaluation(cifar_root, model_file, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(fastrobust.evaluate.leaderboard, "robustbench_evaluation", None)  # never reached
    code = main(["eval", "--checkpoint", str(model_file), "--dataset", "cifar10", "--data-root", str(cifar_root),
                 "--device", "cpu", "--protocol", "robustbench", "--model-info", str(VIRTUAL / "info.json")])
    one_line_error(code, capsys.readouterr().err, f"--model-info {VIRTUAL / 'info.json'} cannot be created")


def test_a_missing_folder_is_fine_a_file_in_the_way_is_not_and_nothing_is_left_behind(tmp_path):
    target = tmp_path / "new" / "deeper" / "results.jsonl"
    assert check_writable(target, what="--out") == target
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, no folder was made
    (tmp_path / "a-file").write_text("x")
    assert folder_problem(tmp_path / "a-file" / "sub") == f"{tmp_path / 'a-file'} is a file, not a folder"


def test_a_folder_where_no_file_can_be_made_is_refused_even_when_os_access_says_yes(tmp_path, monkeypatch):
    """os.access is True for root everywhere (and on read-only mounts): the probe file is what decides."""
    def refuse(*args, **kwargs):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    assert os.access(tmp_path, os.W_OK)
    with pytest.raises(ConfigError, match=r"--out .* cannot be created: the folder .* is not writable "
                                          r"\(Permission denied\); give a path in a folder you can write"):
        check_writable(tmp_path / "results.jsonl", what="--out")


@needs_proc
def test_train_out_on_a_virtual_filesystem_names_it_not_free_space(tmp_path):
    with pytest.raises(FastRobustError) as error:
        train_run_folder.check_can_write(VIRTUAL / "run")
    assert "/proc is a virtual filesystem" in str(error.value) and "MiB free" not in str(error.value)
    assert train_run_folder.os_free_bytes(VIRTUAL) is None  # reports no size: "0 MiB free" was the wrong cause


@needs_proc
def test_report_out_on_a_virtual_filesystem_is_one_line_before_any_run_is_read(tmp_path):
    with pytest.raises(FastRobustError, match=r"^the report folder /proc/x cannot be written: /proc is a virtual "
                                              r"filesystem .*; choose another --out$"):
        build_report(tmp_path / "no-runs-here", VIRTUAL / "x")


# ---- 2. and 5. a run's weights
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished one-epoch run with a mid-epoch checkpoint (RUN/checkpoints/step-N with state.json's hashes)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(method="natural", model="tinycnn", model_params={"width": 4}, dataset="synthetic",
                         epochs=1, batch_size=64, lr=0.05, val_pgd_steps=1, test_pgd_steps=1, device="cpu",
                         checkpoint_every=2, out=str(out))
    train(config, dataset=synthetic_dataset(train=128, val=32, test=32), progress=False, log=lambda _: None)
    return out


def flip_bytes(path: Path, count: int = 8) -> None:
    """Overwrite ``count`` bytes at the end of the file (tensor data, not the header) with their complement."""
    data = bytearray(path.read_bytes())
    data[-count:] = bytes(255 - b for b in data[-count:])
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_weights_changed_since_saving_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    step = max((run / "checkpoints").glob("step-*"))
    load_model(step)  # intact: loads
    flip_bytes(step / "model.safetensors")
    for given in (step, step / "model.safetensors"):
        with pytest.raises(FastRobustError) as error:
            load_model(given)  # before: loaded the damaged weights and evaluated them
        message = str(error.value)
        assert message.startswith(f"{step / 'model.safetensors'} has changed since it was saved")
        assert str(step / "state.json") in message and "evaluate another checkpoint" in message
        assert "\n" not in message


def test_best_and_last_weights_changed_since_saving_are_refused_by_their_recorded_sha256(tiny_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("best.safetensors", "last.safetensors"):
        load_model(run / name)  # intact: loads
        flip_bytes(run / name)
        with pytest.raises(FastRobustError, match=rf"^{run / name} has changed since it was saved: its weights do "
                                                  "not match the sha256 recorded in its header"):
            load_model(run / name)  # before: loaded and evaluated
    code, _, err, seen = cli(run, dataset=False)  # the run folder: its best model (after a line on its dataset)
    assert code == 2 and "Traceback" not in err and not seen, err
    assert err.strip().splitlines()[-1].startswith(f"fastrobust eval: error: {run / 'best.safetensors'} has changed "
                                                   "since it was saved"), err


def test_an_interrupted_run_names_its_newest_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("best.safetensors", "last.safetensors"):
        (run / name).unlink()
    newest = max((run / "checkpoints").glob("step-*"))
    with pytest.raises(FastRobustError) as error:
        load_model(run)  # before: "... is it a fastrobust run?"
    message = str(error.value)
    assert message.startswith(f"run {run} has no finished weights yet")
    assert f"evaluate its newest checkpoint {newest}" in message and f"fastrobust train --resume {run}" in message
    assert "is it a fastrobust run" not in message


# ---- 3. l2/l1 eps too large
def test_an_implausibly_large_l2_eps_warns_once_on_the_command_line(cli, model_file):
    code, _, err, _ = cli(model_file, "--norm", "l2", "--eps", "8")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "is large for" in line]
    expected = ("fastrobust eval: warning: l2 radius 8 is large for 3x32x32 images (spread evenly over its 3072 values "
                "it changes each by 36.8/255, more than 16/255, twice the usual l_inf budget 8/255: the attack may "
                "change what the image shows, so a low robust accuracy says little); the usual CIFAR-10 budgets are "
                "0.5 for l2 and 12 for l1")
    assert notes == [expected], err
    assert "UserWarning" not in err
    for extra in (("--norm", "l2", "--eps", "0.5"), ("--norm", "l2", "--eps", "3"), ("--norm", "l1", "--eps", "12")):
        code, _, err, _ = cli(model_file, *extra)
        assert code == 0 and "is large for" not in err, err


def test_the_large_eps_rule_in_numbers():
    shape = (3, 32, 32)  # 3072 values: l2 above 16/255 * sqrt(3072) = 3.48, l1 above 16/255 * 3072 = 192.8
    assert eps_size_note(3.4, "l2", shape) is None and "l2 radius 3.6 is large" in eps_size_note(3.6, "l2", shape)
    assert eps_size_note(190, "l1", shape) is None and "l1 radius 200 is large" in eps_size_note(200, "l1", shape)
    assert eps_size_note(0.5, "linf", shape) is None


def test_sanity_checks_own_large_eps_does_not_warn(one_thread):
    images = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(300, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastrobust.evaluate.sanity.sanity_checks(model, (images, torch.tensor([0, 1, 2, 3])), eps=0.5, norm="l2", progress=False)
    assert not [w for w in caught if "is large for" in str(w.message)]


# ---- 4. the model line
def test_a_model_without_normalisation_says_so(cli, tmp_path):
    plain, normalised = tmp_path / "plain.safetensors", tmp_path / "normalised.safetensors"
    save_model(create("tinycnn", num_classes=10, width=4), plain)
    save_model(create("tinycnn", num_classes=10, width=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), normalised)
    code, _, err, _ = cli(plain, quiet=False)
    assert code == 0 and "input normalisation none (the model takes [0,1] pixels)" in err, err
    code, _, err, _ = cli(normalised, quiet=False)
    assert code == 0 and "input normalisation from the weights (fastrobust model) mean [0.5, 0.5, 0.5], " \
                         "std [0.25, 0.25, 0.25]" in err, err
