"""The frozen gradient copy's per-row cost at growing batch sizes, whole and in slices (``attacks/_frozen.py``).

A forward+backward over many rows holds every layer's activation at once; on Linux glibc serves such allocations
with fresh pages that the kernel faults in and zeroes at every call, so the per-row cost steps up past a batch size
that goes with the largest activation. The frozen gradient copy therefore evaluates a large batch in slices of at
most ``SLICE_BYTES`` of its largest activation. This prints, per batch size, the CPU microseconds per row of
the input gradient of the cross-entropy through the copy evaluated whole and in its slices (interleaved, best of
``--rounds`` rounds of about ``--rows`` rows each, after an untimed round), their ratio, and the slice size the
copy chose; a JSON record is appended to ``--json-out``.

    OMP_NUM_THREADS=1 python benchmarks/gradient_slices.py --model tinycnn --width 16 32 64 \\
        --json-out benchmarks/results/gradient-slices-cpu.jsonl

Run it once more with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736`` (glibc keeps freed
memory) to see the whole batches' step vanish.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import base_record, load_average, set_threads, write_record

from fastrobust.attacks import _frozen
from fastrobust.models import create as create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinycnn")
    parser.add_argument("--width", type=int, nargs="+", default=[16], help="model widths to measure (default 16)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768, 1000])
    parser.add_argument("--rows", type=int, default=2000, help="rows per timed round and size (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def per_row_us(grad_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int) -> float:
    """CPU microseconds per row of one round of input gradients on ``x`` (about ``rows`` rows in all)."""
    reps = max(2, rows // len(x))
    start = time.process_time()
    for _ in range(reps):
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(grad_model(xr), y), [xr])
    return (time.process_time() - start) / (reps * len(x)) * 1e6


def measure(width: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = create_model(args.model, width=width).eval()
    largest = max(args.sizes)
    x, y = torch.rand(largest, 3, 32, 32), torch.randint(0, 10, (largest,))
    # the gradient copy as frozen_copies builds it, without its agreement check (which only decides whether the
    # attacks may use it, and can refuse a model at random initialisation, whose gradients are near zero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+ marks TorchScript deprecated (_frozen.py)
        frozen = _frozen._frozen_channels_last(model, x[:64])
    if frozen is None:
        raise SystemExit(f"{args.model} width {width}: its channels-last copy cannot be traced")
    copy = _frozen.ContiguousGradients(frozen, rows=_frozen._slice_rows(model, x))
    chosen = copy.rows
    best = {size: {"whole": float("inf"), "sliced": float("inf")} for size in args.sizes}
    for round_ in range(args.rounds + 1):  # round 0 warms up (oneDNN primitives per shape), untimed
        for size in args.sizes:
            for kind in ("whole", "sliced"):
                copy.rows = None if kind == "whole" else chosen
                us = per_row_us(copy, x[:size], y[:size], args.rows if round_ else 1)
                if round_:
                    best[size][kind] = min(best[size][kind], us)
    return {"width": width, "slice_rows": chosen, "us_per_row": {str(s): v for s, v in best.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    load_before = load_average()
    results = [measure(width, args) for width in args.width]
    record = base_record("gradient_slices", torch.device("cpu"), {
        "model": args.model, "widths": args.width, "sizes": args.sizes, "rows": args.rows, "rounds": args.rounds,
        "threads": args.threads, "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}})
    record.update(results=results, load_average_before_after=[load_before, load_average()])
    print(f"{args.model}, input gradient through the frozen copy, CPU us per row (best of {args.rounds}), "
          f"{args.threads} thread(s)\n")
    print("| width (slice rows) | batch | whole | sliced | sliced / whole |\n|---|---|---|---|---|")
    for result in results:
        for size, t in result["us_per_row"].items():
            print(f"| {result['width']} ({result['slice_rows']}) | {size} | {t['whole']:.1f} | {t['sliced']:.1f} | "
                  f"{t['sliced'] / t['whole']:.2f} |")
    write_record(args.json_out, record)
    return record


if __name__ == "__main__":
    main()
