"""benchmarks/gradient_slices.py runs end to end on a few small batches and reports the slice size the frozen copy
chose (SLICE_BYTES over the model's largest activation per row) and a positive per-row cost for both ways."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fastrobust.attacks._frozen import SLICE_BYTES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradient_slices_benchmark_reports_both_ways(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gradient_slices_bench", ROOT / "benchmarks" / "gradient_slices.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "record.jsonl"
    record = bench.main(["--width", "4", "--sizes", "8", "24", "--rows", "24", "--rounds", "1",
                         "--json-out", str(out)])
    (result,) = record["results"]
    # tinycnn width 4: its normalised input (3 x 32 x 32, 12 KiB per row in float32) outgrows every activation
    # (layer1's 8 channels at 16 x 16 are 8 KiB)
    assert result["slice_rows"] == SLICE_BYTES // max(3 * 32 * 32 * 4, 2 * 4 * 16 * 16 * 4) == 1024
    for times in result["us_per_row"].values():
        assert times["whole"] > 0 and times["sliced"] > 0
    assert out.read_text().count("\n") == 1
