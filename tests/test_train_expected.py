"""A finished preset run says how its result compares with the result the preset declares (docs/results.md)."""

from __future__ import annotations

import math

import pytest
from helpers import write_image_folder

from fastrobust.cli import main
from fastrobust.errors import ConfigError
from fastrobust.train.expected import Expected, changed_settings, compare
from fastrobust.train.presets import available_presets, load_preset, make_config, preset_expected

QUICKSTART = Expected("docs/results.md", seeds=3, test_points=1000,
                      metrics={"clean_acc": (32.27, 2.03), "pgd20_acc": (19.53, 0.38)})


def test_the_band_joins_the_seed_spread_and_the_sampling_error():
    mean, sd = QUICKSTART.band("pgd20_acc", 1000)
    sampling = 100 * math.sqrt(0.1953 * 0.8047 / 1000)  # 1.254 points
    assert mean == 19.53 and sd == pytest.approx(math.sqrt(0.38 ** 2 + sampling ** 2))
    assert sd == pytest.approx(1.310, abs=1e-3)
    assert QUICKSTART.band("pgd20_acc", 200)[1] > sd  # fewer points: a wider band


def test_a_run_inside_the_band_is_compared_without_a_flag():
    line = compare({"clean_acc": 0.303, "pgd20_acc": 0.207, "n": 1000}, QUICKSTART, "quickstart")
    assert line == ("expected of preset quickstart (3 seeds, docs/results.md): clean 30.3 %, expected 32.3 +- 2.5; "
                    "PGD-20 20.7 %, expected 19.5 +- 1.3")


def test_a_run_far_from_the_band_is_flagged():
    line = compare({"clean_acc": 0.32, "pgd20_acc": 0.10, "n": 1000}, QUICKSTART, "quickstart")
    assert line.endswith("PGD-20 more than two standard deviations away: check the torch build, the dataset copy "
                         "and the settings (docs/results.md)")
    assert "clean and" not in line  # clean is inside its band


def test_every_shipped_expected_result_parses_and_stays_out_of_the_settings():
    declared = [name for name in available_presets() if preset_expected(name) is not None]
    assert {"quickstart", "speedrun-cpu"} <= set(declared)
    for name in declared:
        assert "expected" not in load_preset(name)
        make_config(load_preset(name))  # the settings alone build a config


@pytest.mark.parametrize("bad, needle", [
    ({"source": "x", "seeds": 3, "test_points": 10, "clean_acc": "32"}, "expected.clean_acc must read 'MEAN +- STD'"),
    ({"source": "x", "clean_acc": "1 +- 2"}, "needs source, seeds and test_points"),
    ([1, 2], "must be a mapping")])
def test_a_malformed_expected_result_is_one_line_naming_the_file(bad, needle):
    with pytest.raises(ConfigError, match="my.yaml") as error:
        Expected.parse(bad, "my.yaml")
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_changed_settings_ignore_where_a_run_goes_but_not_what_it_trains():
    preset = {"epochs": 5, "eps": "8/255", "method": "backward_smoothing"}
    assert changed_settings({**preset, "out": "runs/x", "device": "cpu", "seed": 3}, preset) == []
    assert changed_settings({**preset, "epochs": 2, "ema_decay": 0.99}, preset) == ["ema_decay", "epochs"]


def test_a_finished_preset_run_prints_the_comparison(tmp_path, capsys, one_thread):
    data = tmp_path / "data"
    write_image_folder(data, ["a", "b"], {"train": 16, "test": 4})
    preset = tmp_path / "tiny.yaml"
    preset.write_text("description: a tiny preset\ndataset: imagefolder\nmodel: tinycnn\nmodel_params: {width: 4}\n"
                      "method: natural\nepochs: 1\nbatch_size: 8\nval_size: 8\nval_pgd_steps: 1\ntest_pgd_steps: 1\n"
                      "expected:\n  source: my notes\n  seeds: 1\n  test_points: 8\n  clean_acc: 50 +- 0\n")
    base = ["train", "--preset", str(preset), "--data-root", str(data), "--device", "cpu", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"expected of preset {preset} (1 seed, my notes): clean ")
    assert ", expected 50.0 +- 17.7" in lines[-1]  # 8 points: sqrt(0.25 / 8) = 17.7 points
    assert main([*base, "--out", str(tmp_path / "run2"), "--epochs", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"preset {preset}'s expected result is for its own settings, and this run changed epochs: no comparison")
    # a flag that repeats the preset's own value ("1" from the command line, 1 in the file) changes nothing
    assert main([*base, "--out", str(tmp_path / "run3"), "--epochs", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"expected of preset {preset} (1 seed")


def test_a_malformed_expected_result_is_refused_before_training(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("dataset: imagefolder\nmodel: tinycnn\nmethod: natural\nepochs: 1\n"
                      "expected:\n  source: my notes\n  clean_acc: 50\n")
    assert main(["train", "--preset", str(preset), "--data-root", str(tmp_path / "nowhere"), "--device", "cpu",
                 "--out", str(tmp_path / "run")]) == 2
    assert "bad.yaml: expected.clean_acc must read" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
