"""A new user's training runs: one run per --out folder, --resume with flags, settings checked before the folder
is made, metrics of a mid-epoch resume, weight averaging in the console lines, presets listed with what they
are, and progress bars only on a terminal."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

import fastrobust.data
import fastrobust.train.trainer
from fastrobust.cli import main
from fastrobust.errors import ConfigError
from fastrobust.train.run_folder import keep_epochs_through
from fastrobust.train import Trainer, TrainConfig, resume, train

from helpers import crash_at_step, synthetic_dataset

QUIET = dict(progress=False, log=lambda _message: None)


def config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    settings = dict(method="fast_at", model="tinycnn", dataset="synthetic", epochs=1, batch_size=32, lr=0.05,
                    schedule="cosine", val_pgd_steps=1, test_pgd_steps=1, out=str(tmp_path / name), device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def cli_train(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--method", "fast_at", "--model", "tinycnn", "--dataset", "cifar10", "--epochs", "1",
            "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--set", "val_pgd_steps=1",
            "--set", "test_pgd_steps=1", *extra]


@pytest.fixture
def synthetic_cli(monkeypatch):
    """The CLI loads the synthetic dataset whatever --dataset says (no files needed)."""
    data = synthetic_dataset()
    monkeypatch.setattr(fastrobust.train.trainer, "load_dataset", lambda *a, **k: data)
    return data


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. an --out folder that holds a run ---------------------------------------------------------------
def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_nothing_is_lost(tmp_path, synthetic_cli, capsys):
    run = tmp_path / "run"
    assert main(cli_train(tmp_path, "--out", str(run), "--quiet")) == 0
    capsys.readouterr()
    before = folder_digest(run)
    assert {"config.json", "metrics.jsonl", "best.safetensors", "result.json"} <= set(before)

    for extra in (["--lr", "0.2"], []):  # another run, and the very same command again
        assert main(cli_train(tmp_path, "--out", str(run), "--quiet", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(run) in err[0], err
        assert f"--resume {run}" in err[0] and "new or empty --out" in err[0], err
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(tmp_path, lr=0.2), dataset=synthetic_cli, **QUIET)
    assert folder_digest(run) == before


def test_a_start_without_checkpoint_of_other_settings_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**vars(config(tmp_path)), "lr": 0.3}))
    with pytest.raises(ConfigError, match="start of another run.*lr"):
        Trainer(config(tmp_path), dataset=synthetic_dataset(), **QUIET)
    assert json.loads((run / "config.json").read_text())["lr"] == 0.3


# ---- 2. --resume and the other flags ---------------------------------------------------------------------
def test_resume_refuses_flags_that_change_the_run_and_honours_epochs(tmp_path, synthetic_cli, capsys):
    run = tmp_path / "run"
    assert main(cli_train(tmp_path, "--out", str(run), "--quiet")) == 0
    capsys.readouterr()
    before = folder_digest(run)

    assert main(["train", "--resume", str(run), "--lr", "0.2", "--eps", "4/255", "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "lr (stored 0.05, given 0.2)" in err[0] and "eps (stored None, given 0.0156863)" in err[0], err
    assert "--epochs" in err[0] and "new --out" in err[0], err
    assert main(["train", "--resume", str(run), "--set", "method.step_size=0.01"]) == 2
    assert "method_params" in capsys.readouterr().err
    assert folder_digest(run) == before

    # flags that repeat the stored settings are fine; --epochs extends the run
    assert main(["train", "--resume", str(run), "--method", "fast_at", "--lr", "0.05", "--epochs", "2",
                 "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert json.loads((run / "result.json").read_text())["config"]["epochs"] == 2

    assert main(["train", "--resume", str(run), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained 2 epochs already" in err[0] and "--epochs 2 or more" in err[0], err


def test_resume_overrides_are_limited_and_data_root_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(data_root="data").validate().data_root == str(tmp_path / "data")
    with pytest.raises(ConfigError, match="lr cannot change"):
        resume(tmp_path / "run", overrides={"lr": 0.1}, **QUIET)


# ---- 4. settings checked before the run folder is made ----------------------------------------------------
@pytest.mark.parametrize("overrides", [{"method": "madry"}, {"eps": 8.0}, {"epochs": 0},
                                       {"method": "slat", "method_params": {"latent_modules": "no_such_layer"}}])
def test_bad_settings_leave_no_run_folder(tmp_path, overrides):
    with pytest.raises(ConfigError):
        train(config(tmp_path, **overrides), dataset=synthetic_dataset(), **QUIET)
    assert not (tmp_path / "run").exists()


def test_bad_cli_settings_leave_no_run_folder(tmp_path, synthetic_cli, capsys):
    assert main(cli_train(tmp_path, "--out", str(tmp_path / "run"), "--eps", "8")) == 2
    assert "did you mean 8/255" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- 5. metrics of an epoch resumed mid-way ---------------------------------------------------------------
def test_mid_epoch_resume_reports_the_whole_epoch_once(tmp_path, monkeypatch):
    data = synthetic_dataset()
    settings = dict(epochs=2, checkpoint_every=4)  # 6 batches per epoch: a checkpoint at step 4 and 10
    train(config(tmp_path, "straight", **settings), dataset=data, **QUIET)

    with crash_at_step(monkeypatch, 5):  # mid-epoch 1, after the checkpoint at step 4
        train(config(tmp_path, "crashed", **settings), dataset=data, **QUIET)
    resume(tmp_path / "crashed", dataset=data, **QUIET)

    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "crashed")
    assert [m["epoch"] for m in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        assert b["train_images"] == a["train_images"] == len(data.train.labels)
        for key in ("train_loss", "train_adv_acc", "val_robust_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key


def test_resume_drops_metric_lines_of_epochs_trained_again(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": epoch, "train_loss": 1.0}) for epoch in (1, 2, 3)]
    metrics_file.write_text("\n".join([lines[0], json.dumps({"note": "x"}), *lines[1:]]) + "\n" + '{"epoch": 4, "tr')
    assert keep_epochs_through(metrics_file, 2) == 2
    assert [json.loads(line) for line in metrics_file.read_text().splitlines()] == \
        [{"epoch": 1, "train_loss": 1.0}, {"note": "x"}, {"epoch": 2, "train_loss": 1.0}]
    assert keep_epochs_through(metrics_file, 2) == 0


# ---- 3. weight averaging on the console ---------------------------------------------------------------
def test_averaged_validation_is_shown_per_epoch_and_in_the_summary(tmp_path, synthetic_cli, capsys):
    assert main(cli_train(tmp_path, "--out", str(tmp_path / "run"), "--epochs", "2", "--set", "ema_decay=0.5",
                          "--set", "ema_select=either")) == 0
    captured = capsys.readouterr()
    epoch_lines = [line for line in captured.err.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, captured.err
    for line in epoch_lines:
        assert "trained val clean" in line and "averaged val clean" in line, line
    assert "new best (" in epoch_lines[0], epoch_lines[0]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    weights = "averaged" if result["best_weights"] == "averaged" else "trained"
    summary = captured.out.strip().splitlines()[-1]
    assert f"best: epoch {result['best_epoch']}, {weights} weights" in summary, summary
    val = result["best_val"]
    assert f"averaged clean {val['ema_val_clean_acc']:.3f} robust {val['ema_val_robust_acc']:.3f}" in summary, summary
    assert f"trained clean {val['val_clean_acc']:.3f}" in summary, summary


# ---- 6. presets listed with what they are -------------------------------------------------------------
def test_list_presets_shows_each_description(capsys):
    from fastrobust.train.presets import available_presets, preset_descriptions

    assert main(["train", "--list-presets"]) == 0
    shown: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("    "):
            shown[name].append(line.strip())
        elif line.strip() and not line.startswith("("):
            name = line.strip()
            shown[name] = []
    assert set(available_presets()) <= set(shown)
    for preset, text in preset_descriptions().items():  # every description in full, wrapped, never cut
        assert " ".join(shown[preset]) == text, preset
        assert all(len(line) <= 110 - 4 for line in shown[preset])
    assert "Not yet tuned on a GPU." in " ".join(shown["cifar10-preactresnet18-speedrun"])  # its last sentence
    assert shown["speedrun"] == ["alias of cifar10-preactresnet18-speedrun"]


# ---- 7. progress bars only on a terminal --------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bar_only_when_stderr_is_a_terminal(tmp_path, monkeypatch, terminal):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    train(config(tmp_path), dataset=synthetic_dataset(), progress=True, log=lambda _message: None)
    assert ("epoch 1/1" in stream.getvalue()) == terminal, stream.getvalue()[:200]
