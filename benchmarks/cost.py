"""Measured cost of every training method, as a multiple of one natural training step.

For each registered method: the median seconds of one full training step (the method's loss, backward
and optimiser step, or ``method.train_step``) built exactly as the trainer builds it, after warm-up,
divided by natural's. All methods are timed INTERLEAVED in one process: each round runs every method
once (``--block`` steps each) in a rotated order, so a change in machine load hits every method alike.
The table compares the measured ratio with the declared ``method.cost.passes``. With ``--progress-out FILE``
a record of every method's times so far is appended after each round, so a run stopped early keeps its rounds.

    python benchmarks/cost.py --model tinycnn --model-param width=16 --batch-size 128 --json-out benchmarks/results/cost.jsonl
    python benchmarks/cost.py --device cuda --model preactresnet18 --batch-size 512 --json-out benchmarks/results/cost.jsonl
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

from fastrobust import methods as methods_lib  # noqa: E402


def load_batch(batch_size: int, device: torch.device, data_root: str | None, synthetic: bool):
    """A real CIFAR-10 training batch when the data is there (else random pixels): float [0,1] on device."""
    if not synthetic:
        try:
            from fastrobust.data import load_dataset

            data = load_dataset("cifar10", data_root, val_size=0, train_subset=batch_size, test_subset=1)
            x = data.train.images[:batch_size].float().div_(255)
            y = data.train.labels[:batch_size]
            if len(y) == batch_size:
                return x.to(device), y.to(device), "cifar10"
        except Exception as error:  # noqa: BLE001 - any data problem: fall back to random pixels
            print(f"(CIFAR-10 not loaded: {str(error)[:120]}; timing on random pixels)")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return x.to(device), y.to(device), "random"


def result_rows(names: list[str], runs: dict[str, dict], times: dict[str, list[float]]) -> list[dict]:
    """Each method's median step time, its ratio to natural's (of medians, and paired within rounds) and
    measured over declared passes, from the rounds timed so far."""
    natural = bu.median(times["natural"])
    rows = []
    for name in names:
        med = bu.median(times[name])
        # the ratio within each round (same load for both), as a robustness check of the ratio of medians
        paired = bu.median([t / n for t, n in zip(times[name], times["natural"])])
        passes = runs[name]["method"].cost.passes
        q1, q3 = bu.quartiles(times[name])
        rows.append({"method": name, "declared_passes": round(passes, 4), "median_s": med, "q1_s": q1, "q3_s": q3,
                     "ratio": med / natural, "paired_ratio": paired, "measured_over_declared": med / natural / passes,
                     "times_s": list(times[name])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinycnn")
    parser.add_argument("--model-param", action="append", default=[], metavar="NAME=VALUE",
                        help="model keyword, e.g. width=32 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one timed block per method per round)")
    parser.add_argument("--block", type=int, default=1, help="steps per timed block (median over rounds of the block mean)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"],
                        help="auto = the trainer's default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                        help="auto = the trainer's default: on for CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as the trainer's --compile")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--synthetic", action="store_true", help="time on random pixels (no dataset needed)")
    parser.add_argument("--json-out", default=None, help="append one JSON record to this file")
    parser.add_argument("--progress-out", default=None,
                        help="append the record so far after every round (partial: true until the last)")
    args = parser.parse_args(argv)

    bu.set_threads(args.threads)
    device = bu.resolve(args.device)
    dtype = bu.amp_dtype(args.amp, device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    names = args.methods or methods_lib.available_methods()
    names = ["natural", *[n for n in names if n != "natural"]]  # the unit first
    params = bu.parse_params(args.model_param)
    x, y, data_source = load_batch(args.batch_size, device, args.data_root, args.synthetic)
    load_before = bu.load_average()

    base = bu.build_model(args.model, params, device, channels_last=channels_last)
    runs = {}
    for name in names:
        method = methods_lib.create(name)
        model = copy.deepcopy(base)  # every method starts from the same weights
        model.train()
        optimizer = bu.build_optimizer(model, device)
        forward_model = torch.compile(model) if args.compile else model  # as the trainer's --compile
        runs[name] = {"method": method, "step": bu.fast_step(method, forward_model, optimizer, device, dtype, channels_last)}

    # warm-up, round-robin
    for _ in range(args.warmup):
        for name in names:
            runs[name]["step"](x, y)
    bu.sync(device)

    record = bu.base_record("cost", device, {
        "model": args.model, "model_params": params, "batch_size": args.batch_size, "device": str(device),
        "amp": str(dtype) if dtype else "fp32", "channels_last": channels_last, "compile": args.compile, "rounds": args.steps,
        "block": args.block, "warmup": args.warmup, "data": data_source, "interleaved": True,
    })
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.steps):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        watches = []
        for name in order:
            watch = bu.Stopwatch(device).start()
            for _ in range(args.block):
                runs[name]["step"](x, y)
            watches.append((name, watch.stop()))
        bu.sync(device)
        for name, watch in watches:
            times[name].append(watch.seconds() / args.block)
        bu.write_progress(args.progress_out, {**record, "results": result_rows(names, runs, times),
                                              "rounds_done": round_ + 1, "partial": round_ + 1 < args.steps})
    load_after = bu.load_average()
    rows = result_rows(names, runs, times)

    print(f"\n{args.model} {params or ''} batch {args.batch_size} on {device} "
          f"({'bf16 autocast' if dtype else 'fp32'}{', channels_last' if channels_last else ''}); "
          f"{torch.get_num_threads()} threads; load {load_before} -> {load_after}; data {data_source}; "
          f"{args.steps} rounds x {args.block} step(s), warm-up {args.warmup}")
    print(f"{'method':24s} {'passes':>7s} {'s/step':>9s} {'ratio':>7s} {'paired':>7s} {'meas/decl':>9s}")
    for r in rows:
        print(f"{r['method']:24s} {r['declared_passes']:7.2f} {r['median_s']:9.4f} {r['ratio']:7.2f} "
              f"{r['paired_ratio']:7.2f} {r['measured_over_declared']:9.2f}")
    by = {r["method"]: r for r in rows}
    if "trades" in by and "backward_smoothing" in by:
        print(f"trades / backward_smoothing time ratio: {by['trades']['median_s'] / by['backward_smoothing']['median_s']:.2f}")

    record["hardware"]["load_average_after"] = load_after
    record["results"] = rows
    bu.write_record(args.json_out, record)
    return record


if __name__ == "__main__":
    main()
