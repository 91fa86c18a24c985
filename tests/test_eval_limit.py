"""benchmarks/eval_limit.py: an attack's limit (its passes per batch size x the fastest per-row cost there) on a
hand-made call log, and the call log PassCount keeps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastrobust.core.passes import CountedModel, PassCount

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("eval_limit_bench", ROOT / "benchmarks" / "eval_limit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_limit_of_a_hand_made_log(bench):
    # 3 gradient calls of 8 rows, 2 forward-only calls of 8 rows, 1 forward-only call of 32 rows, 1 of 16 rows
    calls = {("forward", 8): 5, ("backward", 8): 3, ("forward", 32): 1, ("forward", 16): 1}
    forward = {8: 1e-3, 32: 4e-3}   # per-row seconds at the probed sizes (log-log in between)
    gradient = {8: 5e-3, 32: 20e-3}
    expected = (3 * 8 * 5e-3 + 2 * 8 * 1e-3 + 32 * 4e-3 + 16 * 2e-3)  # at 16: the geometric mean 2e-3
    assert bench.limit_seconds(calls, forward, gradient) == pytest.approx(expected)
    assert bench.passes_of(calls) == {"forward": 8 * 5 + 32 + 16, "backward": 24}
    assert bench.interpolate(forward, 4) == forward[8] and bench.interpolate(forward, 64) == forward[32]


def test_table_rows_divide_each_version_by_fastrobusts_limit(bench):
    costs = {"best": {"forward": {8: 1e-3}, "gradient": {8: 4e-3}}}
    run = {"seconds": 2.0, "per_attack_s": {"apgd-ce": 0.5, "rest": 1.5},
           "calls": {"apgd-ce": {("forward", 8): 10, ("backward", 8): 10}, "rest": {("forward", 8): 1}}}
    official = {"seconds": 4.0, "per_attack_s": {"apgd-ce": 1.0}, "calls": {"apgd-ce": {("forward", 8): 20}}}
    rows = {row["attack"]: row for row in bench.table_rows({"fastrobust": run, "official": official}, costs)}
    assert rows["apgd-ce"]["limit_s"] == pytest.approx(10 * 8 * 4e-3)
    assert rows["rest"]["limit_s"] == pytest.approx(8 * 1e-3)
    assert rows["total"]["limit_s"] == pytest.approx(10 * 8 * 4e-3 + 8 * 1e-3)
    assert rows["total"]["official_s"] == 4.0 and rows["apgd-ce"]["official_passes"] == {"forward": 160, "backward": 0}


def test_pass_count_logs_calls_per_batch_size():
    count = PassCount(calls={})
    model = CountedModel(nn.Linear(3, 2), count)
    x = torch.rand(5, 3, requires_grad=True)
    model(x).sum().backward()
    with torch.no_grad():
        model(torch.rand(7, 3))
    assert count.calls == {("forward", 5): 1, ("backward", 5): 1, ("forward", 7): 1}
    assert count.snapshot() == (12, 5)
    assert PassCount().calls is None  # no log unless asked


def test_a_runs_call_log_and_the_probes_costs_survive_the_trip_from_a_fresh_process(bench):
    """Each run and the probe run in a process of their own and come back as JSON: call logs keyed by (kind, rows)
    and costs keyed by batch size read back as they were."""
    import json

    run = {"seconds": 1.5, "calls": {"apgd-ce": {("forward", 8): 3, ("backward", 8): 2}}, "robust": 4}
    back = json.loads(json.dumps(bench.to_json(run)))
    assert {name: bench.calls_from_json(log) for name, log in back["calls"].items()} == run["calls"]
    costs = {"sizes": [1, 2], "best": {"forward": {1: 0.5, 2: 0.25}, "gradient": {1: 1.0, 2: 0.75}},
             "fastest": {"forward": {1: "eager", 2: "frozen"}, "gradient": {1: "frozen", 2: "frozen"}},
             "per_copy": {"eager": {"forward": {1: 0.5, 2: 0.3}, "gradient": {1: 1.1, 2: 0.8}}},
             "first_call_s": {"eager": 0.1}}
    assert bench.costs_from_json(json.loads(json.dumps(bench.to_json(costs)))) == costs


def test_points_that_differ_from_the_official(bench):
    points = {"official": [1, 4, 7], "fastrobust": [1, 4, 7], "fastrobust-compile": [1, 7, 9]}
    assert bench.differing_points(points) == {"fastrobust": [], "fastrobust-compile": [4, 9]}
    assert bench.differing_points({"fastrobust": [1]}) == {}
