"""The GPU suite never rots: --smoke runs every stage on the CPU (tiny model, synthetic CIFAR-10-shaped JPEGs),
the budget skips what does not fit, and the carry-prep script builds the folder and prints the device command."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402

from fastrobust import methods as methods_lib  # noqa: E402


def test_smoke_runs_every_stage_and_prints_the_table_last(tmp_path, capsys, one_thread):
    before = dict(os.environ)
    code = gpu_suite.main(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert code == 0 and dict(os.environ) == before  # the suite's FASTROBUST_CACHE does not leak to the caller
    record = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    stages = record["stages"]
    for name in ("env", "data", "speed", "speedrun", "fast_at", "trades"):
        assert stages[name]["status"] == "ok", (name, stages[name].get("error"), stages[name].get("traceback"))
    assert stages["env"]["git_commit"] and stages["data"]["train"] == 1100 - 1000
    natural = stages["speed"]["natural"]
    assert all(natural[k]["images_per_second"] > 0 for k in ("eager", "eager_ema", "compiled"))  # compiled in a child process
    assert {r["method"] for r in stages["speed"]["cost"]["results"]} == set(methods_lib.available_methods())
    assert [r["method"] for r in stages["speed"]["epoch"]["results"]] == ["backward_smoothing", "trades"]
    for name in ("speedrun", "fast_at", "trades"):
        run = stages[name]
        assert run["epochs_completed"] == 1 and run["seconds_to_trained"] > 0 and run["best_weights"] == "averaged"
        assert {"pgd20", "autoattack-fast"} == set(run["evaluation"]["attacks"])
        assert all(0 <= a["robust_acc"] <= run["evaluation"]["clean_acc"] for a in run["evaluation"]["attacks"].values())
    assert stages["fast_at"]["config"]["method"] == "fast_at" and stages["speedrun"]["config"]["method"] == "backward_smoothing"
    for name, script in (("autoattack", "autoattack.py"), ("precision", "precision_study.py")):
        if (ROOT / "benchmarks" / script).is_file() and name == "precision":
            assert stages[name]["status"] == "ok", stages[name]
        elif not (ROOT / "benchmarks" / script).is_file():
            assert stages[name]["status"] == "skipped" and script in stages[name]["reason"]
    table = (tmp_path / "out" / "gpu_suite.md").read_text()
    printed = capsys.readouterr().out.rstrip()
    assert printed.endswith(table.rstrip())  # the Markdown table is the last thing printed
    assert "| natural img/s" in table and "speedrun (backward_smoothing)" in table and "SMOKE" in table
    if importlib.util.find_spec("pyautoattack") is not None:  # the test extra: the official-AutoAttack row runs
        assert stages["autoattack"]["status"] == "ok", stages["autoattack"]
        assert_every_row_has_figures(table)
    else:
        assert_every_row_has_figures(table, except_rows=("official vs fastrobust AutoAttack",))
    assert "gpu_suite.log" in {p.name for p in (tmp_path / "out").iterdir()}
    assert len(list((tmp_path / "out").iterdir())) <= 8  # the device tool brings back at most 8 files


# "-" (a figure read under a key the record lacks), None/nan, a stage not run, or a record dumped unparsed
MISSING = re.compile(r"(?:^|[\s(/;,])-(?=$|[\s)/;,])|\bNone\b|\bnan\b|not run|skipped|no record|error|failed|[{}]|\.\.\.",
                     re.I)


def assert_every_row_has_figures(table: str, *, except_rows: tuple[str, ...] = ()) -> None:
    """Every measurement row of gpu_suite.md (but those starting with ``except_rows``) shows a parsed figure."""
    rows = [line.split("|")[1:-1] for line in table.splitlines()[4:] if line.startswith("|")]
    assert len(rows) >= 10, table
    for what, value, _target in rows:
        if what.strip().startswith(except_rows):
            continue
        assert re.search(r"\d", value) and not MISSING.search(value), f"row {what.strip()!r} has no figure: {value!r}"


def test_the_table_check_catches_a_missing_figure():
    record = {"suite": {"budget_seconds": 1, "smoke": True}, "stages": {
        "autoattack": {"status": "ok", "record": {"summary": {"ratio": 2.0}}}}}  # a key autoattack.py never writes
    row = next(line for line in gpu_suite.markdown_summary(record).splitlines() if "AutoAttack (autoattack.py)" in line)
    assert row.split("|")[2].strip() == "-"
    with pytest.raises(AssertionError, match="has no figure"):
        assert_every_row_has_figures("\n".join(["h", "", "| a | b | c |", "|---|---|---|"] + [f"| r{i} | {i} s |  |" for i in range(10)] + [row]))
    record["stages"]["autoattack"]["record"] = [{"summary": {"ratio_of_medians": 2.5, "official": {"robust": 3},
                                                             "fastrobust": {"robust": 3}}}]
    row = next(line for line in gpu_suite.markdown_summary(record).splitlines() if "AutoAttack (autoattack.py)" in line)
    assert "2.50x" in row and "robust 3 vs 3" in row


def test_a_spent_budget_skips_every_timed_stage(tmp_path, capsys, one_thread):
    assert gpu_suite.main(["--smoke", "--budget-seconds", "0.5", "--out", str(tmp_path / "out"),
                           "--work-dir", str(tmp_path / "work")]) == 0
    stages = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["stages"]
    assert stages["env"]["status"] == "ok" and stages["data"]["status"] == "ok"
    for name in ("speed", "speedrun", "autoattack", "fast_at", "trades", "precision"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"].startswith("budget"), name
    assert "| speedrun | skipped: budget" in capsys.readouterr().out


def test_speedrun_epochs_are_fitted_to_the_measured_step_time(tmp_path):
    args = gpu_suite.parse_args(["--out", str(tmp_path), "--work-dir", str(tmp_path / "w")])
    suite = gpu_suite.Suite(args)
    suite.record["stages"]["speed"] = {"cost": {"results": [{"method": "natural", "median_s": 0.02},
                                                            {"method": "backward_smoothing", "median_s": 0.08}]}}
    epochs, plan = suite.plan_epochs("backward_smoothing", 300.0, compile_=False)
    # 98 steps of batch 500: 98 * 0.08 * 500/512 * 1.1 + validation 2 * 1000 * 11 / 512 * 0.02 * 0.8
    assert plan["estimated_epoch_seconds"] == pytest.approx(98 * 0.08 * 500 / 512 * 1.1 + 2 * 1000 * 11 / 512 * 0.02 * 0.8)
    assert epochs == int((300 - 20) // plan["estimated_epoch_seconds"]) == plan["epochs_in_300_seconds"]
    suite.log.close()


def test_prepare_gpu_carry_builds_the_folder_and_prints_the_device_command(tmp_path):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    script = repo / "benchmarks" / "prepare_gpu_carry.sh"
    script.write_bytes((ROOT / "benchmarks" / "prepare_gpu_carry.sh").read_bytes())
    (repo / ".gitignore").write_text("/.gpu-carry/\n")
    data = tmp_path / "data" / "cifar10-jpeg"
    data.mkdir(parents=True)
    (data / "cifar10-jpeg.tar.gz").write_bytes(b"archive")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=repo, check=True)
    env = dict(os.environ, FASTROBUST_DATA=str(tmp_path / "data"), PYTHON=sys.executable, GPU_CARRY_DOWNLOAD="0")
    done = subprocess.run(["bash", str(script), "240"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    carry = repo / ".gpu-carry"
    assert (carry / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz").read_bytes() == b"archive"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert (carry / "COMMIT").read_text().startswith(head)
    try:
        import pyautoattack  # noqa: F401

        assert (carry / "site" / "pyautoattack" / "autoattack.py").is_file()
        assert not (carry / "site" / "pyautoattack" / "examples").exists()
    except ImportError:
        assert "pyautoattack not found" in done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command:")).split(":", 1)[1].strip()
    assert len(command) <= 2000 and "gpu_suite.py --budget-seconds 240 --out $OUT" in command
    assert "PYTHONPATH=src:.gpu-carry/site" in command and "timeout_s 330" in done.stdout
    missing = subprocess.run(["bash", str(script)], cwd=repo, env=dict(env, FASTROBUST_DATA=str(tmp_path / "nowhere")),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "set FASTROBUST_DATA" in missing.stderr


def test_decode_benchmark_times_a_fresh_decode_per_pool_size(tmp_path):
    import decode

    gpu_suite.make_smoke_archive(tmp_path / "data", train_per_class=12, test_per_class=3)
    rows = decode.main(["--data-root", str(tmp_path / "data"), "--workers", "1", "2",
                        "--json-out", str(tmp_path / "decode.jsonl")])
    assert [r["workers"] for r in rows] == [1, 2] and all(r["images"] == 150 and r["wall_seconds"] > 0 for r in rows)
    assert len((tmp_path / "decode.jsonl").read_text().splitlines()) == 2


def test_a_speedrun_that_fails_to_compile_runs_again_without_compile(tmp_path, monkeypatch):
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--out", str(tmp_path), "--work-dir", str(tmp_path / "w")]))
    calls = []

    def fake_child(kind, params, timeout, subprocess_=None):
        calls.append(dict(params["overrides"]))
        if params["overrides"]["compile"]:
            return {"child_error": "exit status 1: torch._dynamo.exc.BackendCompilerFailed", "epochs_completed": 0}
        return {"epochs_completed": 3, "evaluation": {"n": 1000}}

    monkeypatch.setattr(suite, "child", fake_child)
    out = suite.train_stage(None, 200.0, epochs=3, compile_=True, planning={"compile": True})
    assert [c["compile"] for c in calls] == [True, False] and out["epochs_completed"] == 3
    assert out["planning"]["compile"] is False and "BackendCompilerFailed" in out["planning"]["compile_failed"]
    suite.log.close()


def test_a_training_child_stops_at_its_deadline_and_still_evaluates(tmp_path):
    """The GPU path of a timed stage: a child process, SIGTERM at the deadline, the finished epochs evaluated."""
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]))
    suite.data_root = str(gpu_suite.make_smoke_archive(tmp_path / "data").parents[1])
    suite.env["FASTROBUST_DATA"] = suite.data_root
    overrides = suite.speedrun_overrides(None, 500, False, str(tmp_path / "run"))
    params = {"preset": "speedrun", "overrides": overrides, "deadline_seconds": 9, "eval_points": 32,
              "attacks": ["pgd20"], "eval_batch_size": 32}
    out = suite.child("train", params, timeout=120, subprocess_=True)
    assert "child_error" not in out, out.get("child_error")
    assert "stopped" in out["stopped"] and 1 <= out["epochs_completed"] < 500  # mid-epoch or at an epoch's end
    assert 0 <= out["evaluation"]["attacks"]["pgd20"]["robust_acc"] <= out["evaluation"]["clean_acc"]
    assert out["seconds_to_trained"] < 60
    assert suite.run_process([sys.executable, "-c", "import time; time.sleep(60)"], 1, label="sleeper").startswith("timed out")
    suite.log.close()
