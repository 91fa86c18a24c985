"""Time to decode a dataset archive into the cache (fastrobust.data), with N decode processes.

Each measurement decodes into a fresh temporary cache (nothing is reused) and reports the wall time and the
CPU time of this process and of its decode workers. The decode (``fastrobust.data.formats.decode_many``)
runs chunks of 2,000 images in a process pool of up to ``os.cpu_count()`` workers; ``--workers`` forces the
pool size, so 1 vs N shows what the pool buys and which part stays serial (reading the archive, the
channel statistics, writing the cache).

    OMP_NUM_THREADS=1 python benchmarks/decode.py --workers 1 2 --json-out benchmarks/results/decode-cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None, help="default: $FASTROBUST_DATA")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, os.cpu_count() or 1])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import fastrobust.data.formats as formats
    from fastrobust.data import load_dataset

    original = formats.decode_many
    rows = []
    try:
        for workers in args.workers:
            formats.decode_many = lambda *a, _w=workers, **k: original(*a, **{**k, "workers": _w})
            with tempfile.TemporaryDirectory() as cache:
                before, wall = os.times(), time.perf_counter()
                data = load_dataset(args.dataset, args.data_root, cache_dir=cache, val_size=0)
                after, wall = os.times(), time.perf_counter() - wall
            row = {"benchmark": "decode", "dataset": args.dataset, "workers": workers, "wall_seconds": wall,
                   "cpu_seconds_main": (after.user + after.system) - (before.user + before.system),
                   "cpu_seconds_workers": (after.children_user + after.children_system)
                   - (before.children_user + before.children_system),
                   "images": len(data.train.labels) + len(data.val.labels) + len(data.test.labels),
                   "cpu_count": os.cpu_count(), "load_average": bu.load_average()}
            rows.append(row)
            print(f"{workers} worker(s): {wall:.1f} s wall, CPU {row['cpu_seconds_main']:.1f} s here + "
                  f"{row['cpu_seconds_workers']:.1f} s in workers (load {row['load_average']})", flush=True)
            bu.write_record(args.json_out, row)
    finally:
        formats.decode_many = original
    return rows


if __name__ == "__main__":
    main()
