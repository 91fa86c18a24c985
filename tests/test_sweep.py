"""Sweeps: planning and validation, skipping finished runs, resuming after a crash, the CLI's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastrobust.analysis.sweep import load_spec, plan_sweep, run_name, run_sweep
from fastrobust.cli import main
from fastrobust.errors import ConfigError
from fastrobust.train import Trainer

from helpers import synthetic_dataset

BASE = {"model": "tinycnn", "dataset": "synthetic", "epochs": 1, "batch_size": 64, "lr": 0.05, "schedule": "cosine",
        "val_pgd_steps": 1, "test_pgd_steps": 2, "device": "cpu", "eps": "8/255"}


def spec(**extra):
    data = {"base": dict(BASE), "methods": {"fast_at": {"step_size": "8/255"}},
            "grid": {"method": ["natural", "fast_at"], "seed": [0, 1]}}
    data.update(extra)
    return data


class CountingLoader:
    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, config):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt  # the machine "crashes" while the sweep is under way
        return synthetic_dataset(train=128, val=32, test=32)


def quiet(**kw):
    return dict(progress=False, log=lambda _m: None, **kw)


def test_plan_names_and_settings(tmp_path):
    runs = plan_sweep(load_spec(spec(grid={"method": ["natural", "fast_at"], "seed": [0, 1], "lr": [0.05]})), tmp_path)
    assert [r.name for r in runs] == ["natural_seed-0", "natural_seed-1", "fast_at_seed-0", "fast_at_seed-1"]
    assert runs[2].config.method_params == {"step_size": "8/255"} and runs[0].config.method_params == {}
    assert runs[3].config.seed == 1 and runs[3].config.out == str(tmp_path / "fast_at_seed-1")
    assert run_name({"method.step_size": "6/255", "method.beta": 6}) == "step_size-6of255_beta-6"


def test_method_param_grid_and_per_method_params(tmp_path):
    data = spec(grid={"method": ["backward_smoothing"], "method.gamma": [0.5, 1.0]},
                methods={"backward_smoothing": {"beta": 10, "step_size": "8/255"}})
    runs = plan_sweep(load_spec(data), tmp_path)
    assert [r.name for r in runs] == ["gamma-0.5", "gamma-1"]
    assert runs[0].config.build_method().config.gamma == 0.5 and runs[0].config.build_method().config.beta == 10


def test_sweep_skips_finished_runs_and_writes_sweep_json(tmp_path):
    loader = CountingLoader()
    summary = run_sweep(spec(), tmp_path, dataset_loader=loader, **quiet())
    assert [r["status"] for r in summary["runs"]] == ["done"] * 4
    names = [r["name"] for r in summary["runs"]]
    for name in names:
        assert (tmp_path / name / "result.json").is_file()
    stamps = {name: (tmp_path / name / "result.json").stat().st_mtime_ns for name in names}
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["counts"] == {"done": 4} and saved["runs"][0]["test"]["clean_acc"] >= 0

    again = CountingLoader()
    summary = run_sweep(spec(), tmp_path, dataset_loader=again, **quiet())
    assert again.calls == 0  # nothing trained, no data loaded
    assert [r["action"] for r in summary["runs"]] == ["skipped"] * 4
    assert stamps == {name: (tmp_path / name / "result.json").stat().st_mtime_ns for name in names}


def test_crash_mid_sweep_then_rerun_completes_only_the_missing_runs(tmp_path, monkeypatch):
    # first attempt: runs 1 and 2 finish; run 3 crashes in the middle of its second epoch; run 4 never starts
    original_step = Trainer._step

    def crashing_step(self, x, y):
        if self.out.name == "fast_at_seed-0" and self.epoch == 1 and self.batch == 1:
            raise KeyboardInterrupt
        return original_step(self, x, y)

    two_epochs = spec(grid={"method": ["natural", "fast_at"], "seed": [0, 1]})
    two_epochs["base"]["epochs"] = 2
    monkeypatch.setattr(Trainer, "_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(two_epochs, tmp_path, dataset_loader=CountingLoader(), **quiet())
    monkeypatch.setattr(Trainer, "_step", original_step)
    saved = {r["name"]: r["status"] for r in json.loads((tmp_path / "sweep.json").read_text())["runs"]}
    assert saved == {"natural_seed-0": "done", "natural_seed-1": "done", "fast_at_seed-0": "interrupted",
                     "fast_at_seed-1": "pending"}
    assert not (tmp_path / "fast_at_seed-0" / "result.json").exists()
    assert list((tmp_path / "fast_at_seed-0" / "checkpoints").glob("step-*"))  # epoch 1 was checkpointed
    stamps = {n: (tmp_path / n / "result.json").stat().st_mtime_ns for n in ("natural_seed-0", "natural_seed-1")}

    dry = run_sweep(two_epochs, tmp_path, dataset_loader=CountingLoader(), dry_run=True, **quiet())
    assert [r["status"] for r in dry["runs"]] == ["done", "done", "resume", "train"]

    summary = run_sweep(two_epochs, tmp_path, dataset_loader=CountingLoader(), **quiet())
    actions = {r["name"]: r["action"] for r in summary["runs"]}
    assert actions == {"natural_seed-0": "skipped", "natural_seed-1": "skipped", "fast_at_seed-0": "resumed",
                       "fast_at_seed-1": "trained"}
    assert all(r["status"] == "done" for r in summary["runs"])
    assert stamps == {n: (tmp_path / n / "result.json").stat().st_mtime_ns for n in stamps}
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "fast_at_seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # resumed inside epoch 2, no epoch repeated


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    loader = CountingLoader()
    bad = spec(grid={"method": ["natural"], "seed": [0, 1]})

    calls = {"n": 0}

    def flaky(config):
        calls["n"] += 1
        if config.seed == 0:
            raise RuntimeError("disk on fire")
        return loader(config)

    summary = run_sweep(bad, tmp_path, dataset_loader=flaky, **quiet())
    status = {r["name"]: (r["status"], r.get("error")) for r in summary["runs"]}
    assert status["seed-0"][0] == "failed" and "disk on fire" in status["seed-0"][1]
    assert status["seed-1"][0] == "done"
    summary = run_sweep(bad, tmp_path, dataset_loader=loader, **quiet())
    assert {r["name"]: r["action"] for r in summary["runs"]} == {"seed-0": "trained", "seed-1": "skipped"}


def test_evaluate_writes_eval_json_and_is_skipped_when_present(tmp_path):
    data = spec(grid={"method": ["fast_at"]}, evaluate={"attacks": ["pgd100", "fgsm"], "eps": ["4/255", "8/255"],
                                                        "test_subset": 16, "options": {"pgd100": {"steps": 3}}})
    run_sweep(data, tmp_path, dataset_loader=CountingLoader(), **quiet())
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(round(r["eps"] * 255) for r in record["evaluations"]) == [4, 8]
    assert all(r["n"] == 16 and {"pgd100", "fgsm"} <= set(r["attacks"]) for r in record["evaluations"])
    # result present, eval.json lost: only the evaluation is redone
    (tmp_path / "run" / "eval.json").unlink()
    again = CountingLoader()
    summary = run_sweep(data, tmp_path, dataset_loader=again, **quiet())
    assert summary["runs"][0]["action"] == "evaluated" and (tmp_path / "run" / "eval.json").is_file()
    summary = run_sweep(data, tmp_path, dataset_loader=CountingLoader(), **quiet())
    assert summary["runs"][0]["action"] == "skipped"


def test_changed_spec_on_an_existing_folder_is_refused(tmp_path):
    run_sweep(spec(grid={"method": ["natural"]}), tmp_path, dataset_loader=CountingLoader(), **quiet())
    changed = spec(grid={"method": ["natural"]})
    changed["base"]["lr"] = 0.01
    with pytest.raises(ConfigError, match="other settings.*lr"):
        run_sweep(changed, tmp_path, dataset_loader=CountingLoader(), **quiet())
    # a record written before a TrainConfig field existed still matches when the spec leaves it at its default
    result_file = tmp_path / "run" / "result.json"
    result = json.loads(result_file.read_text())
    del result["config"]["nesterov"]
    result_file.write_text(json.dumps(result))
    summary = run_sweep(spec(grid={"method": ["natural"]}), tmp_path, dataset_loader=CountingLoader(), **quiet())
    assert summary["runs"][0]["action"] == "skipped"


@pytest.mark.parametrize("bad, message", [
    ({"grid": {"method": ["natural"]}, "bsae": {}}, "unknown key(s) bsae"),
    ({"grid": {"method": "natural"}}, "grid.method must be a non-empty list"),
    ({"grid": {"method": ["natural", "madry"]}}, "unknown method 'madry'"),
    ({"grid": {"lr": [0.1, -1]}}, "lr=-1"),
    ({"grid": {"learning_rate": [0.1]}}, "unknown setting(s) learning_rate"),
    ({"grid": {"method": ["trades"], "method.gama": [1]}}, "trades has no parameter gama"),
    ({"grid": {"method": ["trades"]}, "evaluate": ["pgd1000"]}, "evaluate attack 'pgd1000' is unknown"),
    ({"grid": {"eps": ["8/0"]}}, "eps"),
    ({"grid": {"seed": [0]}, "base": {"epochs": "ten"}}, "epochs"),
])
def test_bad_specs_fail_before_any_run_with_one_line(tmp_path, capsys, bad, message):
    spec_file = tmp_path / "spec.yaml"
    import yaml

    data = {"base": dict(BASE)}
    data["base"].update(bad.pop("base", {}))
    data.update(bad)
    spec_file.write_text(yaml.safe_dump(data))
    code = main(["sweep", str(spec_file), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("grid: [unclosed\n")
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not valid YAML" in err
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_specs_are_valid(tmp_path):
    folder = Path(__file__).resolve().parents[1] / "sweeps"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) >= 5
    for file in files:
        runs = plan_sweep(load_spec(file), tmp_path / file.stem)
        assert runs, file
