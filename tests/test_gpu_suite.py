"""The GPU suite never rots: --smoke runs every stage on the CPU (tiny model, synthetic CIFAR-10-shaped JPEGs);
with faked stages, the default budget is shown to hold every stage in the order of value even when each uses its
whole cap; each benchmark keeps what it measured when it is stopped; the canary reports each trainer feature; the
carry-prep script builds the folder and prints the command."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import benchutil as bu  # noqa: E402
import gpu_suite  # noqa: E402

from fastrobust import methods as methods_lib  # noqa: E402
from fastrobust.core import precision  # noqa: E402
from fastrobust.train import TrainingStopped  # noqa: E402


def test_smoke_runs_every_stage_and_prints_the_table_last(tmp_path, capsys, one_thread):
    before = dict(os.environ)
    code = gpu_suite.main(["--smoke", "--baselines", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert code == 0 and dict(os.environ) == before  # the suite's FASTROBUST_CACHE does not leak to the caller
    record = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    stages = record["stages"]
    for name in ("env", "data", *[s for s in gpu_suite.STAGES if s != "baselines"], "fast_at", "trades"):
        assert stages[name]["status"] == "ok", (name, stages[name].get("error"), stages[name].get("traceback"))
    started = re.findall(r"\] stage (\w+) \(", (tmp_path / "out" / "gpu_suite.log").read_text())
    assert started == ["env", "data", *gpu_suite.STAGES[:-1], "fast_at", "trades"]  # the order of value
    assert stages["env"]["git_commit"] and stages["data"]["train"] == 1100 - 1000
    assert [(r["feature"], r["status"]) for r in stages["canary"]["rows"]] == [(f, "ok") for f in gpu_suite.CANARY_FEATURES]
    natural = stages["natural"]
    assert all(natural[k]["images_per_second"] > 0 for k in ("eager", "eager_ema", "compiled"))
    assert {r["method"] for r in stages["cost"]["results"]} == set(methods_lib.available_methods())
    assert [r["method"] for r in stages["epoch"]["results"]] == ["backward_smoothing", "trades"]
    for name in ("speedrun", "fast_at", "trades"):
        run = stages[name]
        assert run["epochs_completed"] == 1 and run["seconds_to_trained"] > 0 and run["best_weights"] == "averaged"
        assert {"pgd20", "autoattack-fast"} == set(run["evaluation"]["attacks"])
        assert all(0 <= a["robust_acc"] <= run["evaluation"]["clean_acc"] for a in run["evaluation"]["attacks"].values())
    assert stages["fast_at"]["config"]["method"] == "fast_at" and stages["speedrun"]["config"]["method"] == "backward_smoothing"
    summary = stages["autoattack"]["record"]["summary"]
    assert {"fastrobust-auto-cl", "fastrobust"} <= set(summary)  # the GPU configuration and fp32, both timed
    kinds = [r["kind"] for r in stages["precision"]["records"]]
    assert kinds[0] == "timing" and kinds.count("run") == 2  # the step times first (--timing-first)
    table = (tmp_path / "out" / "gpu_suite.md").read_text()
    printed = capsys.readouterr().out.rstrip()
    assert printed.endswith(table.rstrip())  # the Markdown table is the last thing printed
    measurements = [line.split("|")[1].strip() for line in table.splitlines()[4:] if line.startswith("|")]
    assert measurements[0] == "canary: bf16 autocast" and "SMOKE" in table
    assert "speedrun (backward_smoothing, compile off)" in table and "| natural img/s" in table
    if importlib.util.find_spec("pyautoattack") is not None:  # the test extra: the official-AutoAttack rows run
        assert set(summary["comparisons"]) == {"fastrobust-auto-cl", "fastrobust"}
        assert_every_row_has_figures(table)
    else:
        assert_every_row_has_figures(table, except_rows=("AutoAttack official",))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"gpu_suite.json", "gpu_suite.md", "gpu_suite.log"}


# "-" (a figure read under a key the record lacks), None/nan, a stage not run, or a record dumped unparsed
MISSING = re.compile(r"(?:^|[\s(/;,])-(?=$|[\s)/;,])|\bNone\b|\bnan\b|not run|not reached|skipped|no record|error|"
                     r"failed|[{}]|\.\.\.", re.IGNORECASE)


def assert_every_row_has_figures(table: str, *, except_rows: tuple[str, ...] = ()) -> None:
    """Every measurement row of gpu_suite.md (but those starting with ``except_rows``) shows a parsed figure."""
    rows = [line.split("|")[1:-1] for line in table.splitlines()[4:] if line.startswith("|")]
    assert len(rows) >= 10, table
    for what, value, _target in rows:
        if what.strip().startswith(except_rows):
            continue
        assert re.search(r"\d", value) and not MISSING.search(value), f"row {what.strip()!r} has no figure: {value!r}"


def aa_rows(record: dict) -> list[str]:
    return [line for line in gpu_suite.markdown_summary(record).splitlines() if "AutoAttack official" in line]


def test_the_table_check_catches_a_missing_figure():
    record = {"suite": {"budget_seconds": 1, "smoke": True}, "stages": {
        "autoattack": {"status": "ok", "n_points": 8, "record": {"summary": {"ratio": 2.0}}}}}  # keys never written
    row = aa_rows(record)[0]
    assert row.split("|")[2].strip() == "-"
    with pytest.raises(AssertionError, match="has no figure"):
        assert_every_row_has_figures("\n".join(["h", "", "| a | b | c |", "|---|---|---|"] + [f"| r{i} | {i} s |  |" for i in range(10)] + [row]))
    record["stages"]["autoattack"]["record"] = {"summary": {
        "official": {"robust": 3, "median_s": 10.0}, "fastrobust-auto-cl": {"robust": 3, "median_s": 4.0},
        "comparisons": {"fastrobust-auto-cl": {"ratio_of_medians": 2.5}}}}
    gpu_row, fp32_row = aa_rows(record)
    assert "2.50x (official 10.0 s" in gpu_row and "robust 3 vs 3" in gpu_row and ">= 5x" in gpu_row
    assert fp32_row.split("|")[2].strip() == "-"  # the fp32 run never came: shown as missing, not invented


def fake_suite(tmp_path, monkeypatch, *, cuda: bool = True, smi="nvidia-smi failed: NVML: Driver Not Loaded"):
    """A non-smoke Suite at the default budget whose clock advances only by what the fake stages say: every timed
    stage uses its WHOLE cap (the worst case); env and data take 25 s. Returns (suite, clock, calls)."""
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]))
    clock = {"t": 0.0}
    calls: list[tuple[str, float, list]] = []
    suite.elapsed = lambda: clock["t"]
    monkeypatch.setattr(gpu_suite, "nvidia_smi", lambda: smi)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: SimpleNamespace(
        name="H100", total_memory=80 * 2**30, major=9, minor=0, multi_processor_count=132))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)

    def data() -> dict:
        clock["t"] += 25.0
        suite.data_root = str(tmp_path / "data")
        return {"decode_seconds": 7.0, "cpu_count": 16}

    suite.stage_data = data

    def run_process(command, timeout, *, label):  # a benchmark or child that runs to its cap
        calls.append((label, timeout, command))
        clock["t"] += timeout
        return f"stopped at its cap of {timeout:.0f} s"

    suite.run_process = run_process
    return suite, clock, calls


def test_the_default_budget_holds_every_stage_in_order_even_when_each_uses_its_whole_cap(tmp_path, monkeypatch):
    suite, clock, calls = fake_suite(tmp_path, monkeypatch)
    assert suite.run() == 0  # nvidia-smi failed, but torch sees the GPU: the suite runs (review D5)
    stages = suite.record["stages"]
    order = [label for label, _timeout, _command in calls]
    assert order == ["canary", "cost.py", "train", "autoattack.py", "precision_study.py", "epoch.py", "natural"]
    caps = {name: stages[name]["cap_seconds"] for name in gpu_suite.DEFAULT_STAGES}
    for name, cap in caps.items():
        assert stages[name]["status"] in ("ok", "error") and cap >= gpu_suite.NEEDS[name], (name, cap)
    assert caps["canary"] <= 45 and caps["speedrun"] >= 180  # a short canary; the speedrun fits a cold compile
    assert "fast_at" not in stages and "trades" not in stages  # baselines only with --baselines
    assert clock["t"] <= gpu_suite.DEFAULT_BUDGET <= 540  # everything stopped at its cap, still inside the budget
    assert stages["env"]["gpu"] == "H100" and "nvidia-smi failed" in stages["env"]["nvidia_smi_before"]
    epoch_argv = next(command for label, _t, command in calls if label == "epoch.py")
    subset, batch = (int(epoch_argv[epoch_argv.index(flag) + 1]) for flag in ("--train-subset", "--batch-size"))
    assert subset // batch >= 100  # at least 100 steps per timed epoch (review B5)
    aa_argv = next(command for label, _t, command in calls if label == "autoattack.py")
    versions = aa_argv[aa_argv.index("--versions") + 1:aa_argv.index("--versions") + 4]
    assert versions == ["fastrobust-auto-cl", "official", "fastrobust"] and "--progress-out" in aa_argv
    assert aa_argv[aa_argv.index("--versions") + 4] == "fastrobust-auto-cl-compile"  # compile (CUDA graphs) last
    train = json.loads(next(command for label, _t, command in calls if label == "train")[5])
    assert train["overrides"]["compile"] is True  # nothing measured before it: the preset as shipped (S1)
    assert train["deadline_seconds"] == pytest.approx(caps["speedrun"] - gpu_suite.KILL_GRACE - gpu_suite.EVAL_RESERVE)


def test_the_baselines_get_their_share_of_a_larger_budget(tmp_path, monkeypatch):
    suite, clock, calls = fake_suite(tmp_path, monkeypatch)
    suite.args.budget_seconds = suite.budget = 900.0
    suite.stages.add("baselines")
    suite.stage_baseline = lambda method, cap: clock.__setitem__("t", clock["t"] + cap) or {"method": method}
    assert suite.run() == 0
    stages = suite.record["stages"]
    assert stages["fast_at"]["status"] == stages["trades"]["status"] == "ok"
    assert stages["fast_at"]["cap_seconds"] >= 120 and stages["trades"]["cap_seconds"] >= 120
    assert clock["t"] <= 900


def test_without_any_gpu_the_suite_stops_after_the_data_stage_and_says_why(tmp_path, monkeypatch):
    suite, _clock, calls = fake_suite(tmp_path, monkeypatch, cuda=False, smi="nvidia-smi not available (FileNotFoundError)")
    assert suite.run() == 1 and calls == []
    assert suite.record["suite"]["stopped"].startswith("no GPU: torch.cuda.is_available() is False")
    assert "Stopped: no GPU" in (tmp_path / "out" / "gpu_suite.md").read_text()
    assert gpu_suite.no_gpu_reason({"name": "H100"}, True) is None


def test_auto_compiles_the_speedrun_as_the_preset_ships_unless_the_canary_saw_compile_fail(tmp_path):
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--out", str(tmp_path), "--work-dir", str(tmp_path / "w")]))
    assert suite.compile_choice() == (True, "auto: the preset's own setting (compile on)")
    suite.record["stages"]["canary"] = {"rows": [{"feature": "torch.compile", "status": "not reached"}]}
    assert suite.compile_choice()[0] is True  # stopped at the canary's cap is no failure
    suite.record["stages"]["canary"] = {"rows": [{"feature": "torch.compile", "status": "failed",
                                                  "error": "BackendCompilerFailed: no C compiler"}]}
    assert suite.compile_choice() == (False, "auto: compile failed in the canary (BackendCompilerFailed: no C compiler)")
    suite.args.speedrun_compile = "on"
    assert suite.compile_choice() == (True, "--speedrun-compile on")
    suite.log.close()


def test_the_first_epochs_overhead_is_the_compile_and_gives_the_as_shipped_estimate():
    assert gpu_suite.compile_overhead([70.0, 10.0, 11.0]) == pytest.approx(59.5)
    assert gpu_suite.compile_overhead([12.0]) is None
    stage = {"epoch_seconds": [70.0, 10.0, 11.0], "seconds_launch_to_fit": 15.0, "seconds_to_trained": 122.5}
    shipped = gpu_suite.as_shipped_estimate(stage, 30)
    assert shipped["wall_seconds_per_epoch"] == pytest.approx((122.5 - 15 - 59.5) / 3)
    assert shipped["seconds"] == pytest.approx(15 + 59.5 + 30 * 16.0)


def test_speedrun_epochs_are_fitted_to_the_measured_step_time(tmp_path):
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--out", str(tmp_path), "--work-dir", str(tmp_path / "w")]))
    suite.record["stages"]["cost"] = {"results": [{"method": "natural", "median_s": 0.02},
                                                  {"method": "backward_smoothing", "median_s": 0.08}]}
    epochs, plan = suite.plan_epochs("backward_smoothing", 300.0, compile_=False)
    # 98 steps of batch 500: 98 * 0.08 * 500/512 * 1.1 + validation 2 * 1000 * 11 / 512 * 0.02 * 0.8
    assert plan["estimated_epoch_seconds"] == pytest.approx(98 * 0.08 * 500 / 512 * 1.1 + 2 * 1000 * 11 / 512 * 0.02 * 0.8)
    assert epochs == int((300 - 20) // plan["estimated_epoch_seconds"]) and plan["step_seconds_from"] == "cost.py"
    compiled, plan = suite.plan_epochs("backward_smoothing", 300.0, compile_=True)
    assert plan["estimated_compile_seconds"] == gpu_suite.COLD_COMPILE_ESTIMATE and compiled < epochs
    suite.log.close()


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """A CIFAR-10-shaped JPEG archive of 20 training and 10 test images, decoded into this test's cache."""
    monkeypatch.setenv("FASTROBUST_CACHE", str(tmp_path / "cache"))
    gpu_suite.make_smoke_archive(tmp_path / "data", train_per_class=2, test_per_class=1)
    return tmp_path / "data"


def test_a_stopped_autoattack_benchmark_keeps_its_finished_runs(tiny_cifar, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("autoattack_bench", ROOT / "benchmarks" / "autoattack.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ran = []

    def run_version(version, model, x, y, eps, args, batch, device):
        ran.append((version, bench.settings_of(version, args) if version != "official" else None))
        if len(ran) == 2:
            raise KeyboardInterrupt  # the suite's SIGTERM at the stage's cap, during the second run
        return x.clone(), {"apgd-ce": 1.0}, []

    monkeypatch.setattr(bench, "run_version", run_version)
    final, progress = tmp_path / "aa.jsonl", tmp_path / "aa-progress.jsonl"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--model", "tinycnn", "--data-root", str(tiny_cifar), "--n-points", "6", "--repeats", "1",
                    "--versions", "fastrobust-auto-cl", "official", "fastrobust", "--json-out", str(final),
                    "--progress-out", str(progress)])
    assert ran[0] == ("fastrobust-auto-cl", ("auto", True, False))  # precision auto, channels-last: the GPU configuration
    assert bench.settings_of("fastrobust-auto-cl-compile", None) == ("auto", True, True)  # ... and compiled
    record, partial = gpu_suite.last_record(final, progress)
    assert partial and not final.exists() and record["version"] == "fastrobust-auto-cl"
    assert set(record["summary"]) == {"fastrobust-auto-cl"} and record["summary"]["fastrobust-auto-cl"]["median_s"] >= 0
    row = aa_rows({"suite": {"budget_seconds": 1, "smoke": True},
                   "stages": {"autoattack": {"status": "ok", "n_points": 6, "record": record, "partial": partial}}})[0]
    assert "fastrobust bf16 + channels_last" in row and "partial: stopped at its cap" in row


def test_a_stopped_epoch_benchmark_keeps_its_finished_methods(tmp_path, monkeypatch):
    import epoch as epoch_bench
    from helpers import synthetic_dataset

    import fastrobust.data

    def fast(name, data, args, params):
        if name == "trades":
            raise KeyboardInterrupt  # stopped at the cap during the second method
        return [{"seconds": 2.0, "images": 20, "mean_loss": 1.0}, {"seconds": 1.0, "images": 20, "mean_loss": 1.0}]

    monkeypatch.setattr(epoch_bench, "fast_epochs", fast)
    monkeypatch.setattr(epoch_bench, "reference_epochs", lambda *a: [{"seconds": 4.0, "images": 20}, {"seconds": 3.0, "images": 20}])
    monkeypatch.setattr(fastrobust.data, "load_dataset", lambda *a, **k: synthetic_dataset(train=8))
    progress = tmp_path / "epoch-progress.jsonl"
    with pytest.raises(KeyboardInterrupt):
        epoch_bench.main(["--model-param", "width=4", "--batch-size", "4", "--methods", "backward_smoothing", "trades",
                          "--progress-out", str(progress)])
    record, partial = gpu_suite.last_record(tmp_path / "none.jsonl", progress)
    assert partial and [(r["method"], r["speedup"]) for r in record["results"]] == [("backward_smoothing", 3.0)]
    assert record["config"]["steps_per_epoch"] == 2 and "fewer than 100" in record["notes"][0]
    images, labels = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    assert epoch_bench.reference_loader(images, labels, 2, workers=1, pin_memory=False).persistent_workers
    assert not epoch_bench.reference_loader(images, labels, 2, workers=0, pin_memory=False).persistent_workers


def test_cost_writes_every_round_as_it_goes(tmp_path, one_thread):
    import cost

    progress, final = tmp_path / "cost-progress.jsonl", tmp_path / "cost.jsonl"
    record = cost.main(["--synthetic", "--model", "tinycnn", "--model-param", "width=4", "--batch-size", "8", "--steps", "2",
                        "--warmup", "1", "--methods", "natural", "fast_at", "--json-out", str(final),
                        "--progress-out", str(progress)])
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [(r["rounds_done"], r["partial"]) for r in lines] == [(1, True), (2, False)]
    assert [len(r["times_s"]) for r in lines[0]["results"]] == [1, 1] and lines[-1]["results"] == record["results"]


class AttackPrecisionProbe(nn.Module):
    """A 'method' that records whether its attack part runs under autocast, as the trainer's methods ask for it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, model, x, y):
        with precision.attack_autocast():
            self.seen.append(torch.is_autocast_enabled("cpu"))
        loss = nn.functional.cross_entropy(model(x), y)
        return loss, {"loss": loss.detach()}


def test_fast_step_runs_the_attack_at_the_trainers_attack_precision():
    """benchutil.fast_step as Trainer._step: autocast for the step, and the attack's own precision inside it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    device = torch.device("cpu")
    probe = AttackPrecisionProbe()
    for policy in (None, precision.resolve("fp32", "cpu", torch.bfloat16)):  # None: the trainer's default "auto"
        step = bu.fast_step(probe, model, bu.build_optimizer(model, device), device, torch.bfloat16, False,
                            attack_policy=policy)
        step(x, y)
    assert probe.seen == [True, False]  # auto follows bf16 training; fp32 attacks leave autocast


def test_the_canary_reports_each_feature_and_what_a_failure_was(tiny_cifar, tmp_path, one_thread):
    params = {**gpu_suite.CANARY_SMOKE, "train_subset": 12, "val_size": 4, "test_subset": 6, "batch_size": 4,
              "eval_batch_size": 8, "device": "cpu", "data_root": str(tiny_cifar), "work": str(tmp_path / "canary"),
              "compile_backend": "no_such_backend"}
    result = tmp_path / "canary.jsonl"
    canary = gpu_suite.Canary(params, result)
    canary.row("stop mid-epoch (SIGTERM)", canary.stop)
    canary.row("resume", canary.resumed, needs="stop mid-epoch (SIGTERM)")
    canary.row("torch.compile", canary.compiled)
    rows = gpu_suite.canary_rows(gpu_suite.read_json_or_lines(result), "stopped at its cap of 40 s")
    by = {r["feature"]: r for r in rows}
    assert by["stop mid-epoch (SIGTERM)"]["detail"]["stopped_at"] == "epoch 1, batch 2 of 3"
    assert by["resume"]["status"] == "ok" and by["resume"]["detail"]["epochs"] == [1, 2]
    compiled = by["torch.compile"]
    assert compiled["status"] == "failed" and "no_such_backend" in compiled["error"] and "\n" not in compiled["error"]
    assert by["bf16 autocast"] == {"feature": "bf16 autocast", "status": "not reached",
                                   "reason": "not reached (stopped at its cap of 40 s)"}
    assert not isinstance(torch.compile, functools.partial)  # the backend patch is undone
    canary.rows.clear()
    canary.row("resume", canary.resumed, needs="stop mid-epoch (SIGTERM)")
    assert canary.rows["resume"]["status"] == "skipped"  # a resume without a stopped run is not tried

    def stopped_at_the_cap():  # the suite's SIGTERM reaches a run's trainer, which stops and says so
        raise TrainingStopped("SIGTERM received: stopped at epoch 1, batch 1; checkpoint saved")

    canary.row("torch.compile", stopped_at_the_cap)
    assert canary.rows["torch.compile"]["status"] == "not finished"  # not a failure of the feature


def test_prepare_gpu_carry_builds_the_folder_and_prints_the_command(tmp_path):
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
    done = subprocess.run(["bash", str(script)], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    carry = repo / ".gpu-carry"
    assert (carry / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz").read_bytes() == b"archive"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert (carry / "COMMIT").read_text().startswith(head)
    if importlib.util.find_spec("pyautoattack") is not None:
        assert (carry / "site" / "pyautoattack" / "autoattack.py").is_file()
        assert not (carry / "site" / "pyautoattack" / "examples").exists()
    else:
        assert "pyautoattack not found" in done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("command:")).split(":", 1)[1].strip()
    assert command.endswith("python3 benchmarks/gpu_suite.py --out gpu-suite-out")  # the default budget
    assert "PYTHONPATH=src:.gpu-carry/site FASTROBUST_DATA=.gpu-carry/data" in command
    assert f"{gpu_suite.DEFAULT_BUDGET:.0f} s" in done.stdout
    readme = (ROOT / "benchmarks" / "README.md").read_text() + (ROOT / "docs" / "performance.md").read_text()
    assert command in readme  # the documented command is the one the script prints
    shorter = subprocess.run(["bash", str(script), "240"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert "gpu_suite.py --budget-seconds 240 --out gpu-suite-out" in shorter.stdout
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
            return {"epochs_completed": 0}, "exit status 1: torch._dynamo.exc.BackendCompilerFailed"
        return {"epochs_completed": 3, "evaluation": {"n": 1000}, "epoch_seconds": [12.0, 10.0, 10.0]}, None

    monkeypatch.setattr(suite, "child", fake_child)
    out = suite.train_stage(None, 200.0, epochs=3, compile_=True, planning={"compile": True})
    assert [c["compile"] for c in calls] == [True, False] and out["epochs_completed"] == 3
    assert calls[1]["out"] != calls[0]["out"]  # a fresh run folder: the failed one may hold a config
    assert out["planning"]["compile"] is False and "BackendCompilerFailed" in out["planning"]["compile_failed"]
    assert out["first_epoch_overhead_seconds"] == pytest.approx(2.0)
    suite.log.close()


def test_a_training_child_stops_at_its_deadline_and_still_evaluates(tmp_path):
    """The GPU path of a timed stage: a child process, SIGTERM at the deadline, the finished epochs evaluated."""
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]))
    suite.data_root = str(gpu_suite.make_smoke_archive(tmp_path / "data").parents[1])
    suite.env["FASTROBUST_DATA"] = suite.data_root
    overrides = suite.speedrun_overrides(None, 500, False, str(tmp_path / "run"))
    params = {"preset": "speedrun", "overrides": overrides, "deadline_seconds": 9, "eval_points": 32,
              "attacks": ["pgd20"], "eval_batch_size": 32}
    out, error = suite.child("train", params, timeout=120, subprocess_=True)
    assert error is None, error
    assert "stopped" in out["stopped"] and 1 <= out["epochs_completed"] < 500  # mid-epoch or at an epoch's end
    assert 0 <= out["evaluation"]["attacks"]["pgd20"]["robust_acc"] <= out["evaluation"]["clean_acc"]
    assert out["seconds_to_trained"] < 60 and 0 < out["seconds_launch_to_fit"] < out["seconds_to_trained"]
    assert suite.run_process([sys.executable, "-c", "import time; time.sleep(60)"], 1, label="sleeper").startswith("stopped")
    suite.log.close()
