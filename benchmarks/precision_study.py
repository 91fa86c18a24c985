"""Attack precision study: the same runs trained with the attack in fp32 and in bf16 (training in bf16 both times).

For each method (default: trades, fast_trades, backward_smoothing), seed and attack precision, one run of the
real trainer (``fastrobust.train.train``) with ``amp=--amp`` (bf16: the GPU default) and
``attack_precision=fp32|bf16`` on a class-balanced CIFAR-10 subset; the only difference between the arms of a
seed is the precision of the attack inside each training step (same data order, same initial weights, same
random draws). Each run reports the test clean and PGD-20 accuracy of its best checkpoint (chosen on the
validation split) and of its last epoch, and, with ``--aa-n N``, a reduced AutoAttack (APGD-CE + APGD-T,
``--aa-iters`` iterations, 3 targets) of the best checkpoint on N test images spread evenly over the
(class-sorted) test split. Then the training step time of the two precisions is measured INTERLEAVED in one
process (round-robin blocks, the same batch), CPU process time on CPU, CUDA events on GPU.

On CPU, torch's bf16 autocast emulates the GPU's bf16 numerics (the rounding of every product and sum);
its speed says nothing about a GPU, where bf16 is the fast path. One JSON line per run and one summary line
go to ``--json-out``; the summary table (mean, std and the per-seed paired difference bf16 - fp32) is printed.

    OMP_NUM_THREADS=1 python benchmarks/precision_study.py --device cpu --model tinycnn --seeds 0 1 2 \\
        --json-out benchmarks/results/precision-cpu.jsonl
    python benchmarks/precision_study.py --device cuda --model preactresnet18 --train-subset 10000 --epochs 10 \\
        --batch-size 128 --lr 0.1 --test-subset 1000 --aa-n 500 --seeds 0 1 --json-out benchmarks/results/precision-cuda.jsonl

The CLI is stable (the GPU suite, benchmarks/gpu_suite.py, runs the PreActResNet-18 version).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

from fastrobust import methods as methods_lib  # noqa: E402
from fastrobust.core.precision import resolve  # noqa: E402

METHOD_PARAMS = {  # the BS paper's settings (presets cifar10-resnet18-*)
    "trades": {"steps": 10, "step_size": 2 / 255, "beta": 6.0},
    "fast_trades": {"steps": 1, "step_size": 6 / 255, "beta": 6.0},
    "backward_smoothing": {"step_size": 8 / 255, "gamma": 1.0, "beta": 10.0},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--model", default="tinycnn")
    parser.add_argument("--model-param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_PARAMS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16", "auto"],
                        help="attack precisions compared (fp16 is loss-scaled)")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "off"], help="the training forward/backward precision")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--test-subset", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--aa-n", type=int, default=200, help="AutoAttack-fast on N test images spread over the split (0: skip)")
    parser.add_argument("--aa-iters", type=int, default=25, help="APGD iterations of the reduced AutoAttack")
    parser.add_argument("--timing-rounds", type=int, default=10, help="interleaved timed blocks per precision")
    parser.add_argument("--timing-block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--timing-first", action="store_true",
                        help="time the steps of a method before training its runs (a run stopped early then keeps "
                             "the speed comparison, the cheapest part)")
    parser.add_argument("--data-root", default=None, help="default: $FASTROBUST_DATA")
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder, deleted)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", default=None, help="append one JSON line per run and a summary line")
    parser.add_argument("--table-from", default=None, metavar="FILE.jsonl",
                        help="train nothing: print the table of every run and timing record in FILE (several "
                             "invocations' seeds pooled)")
    return parser.parse_args(argv)


def train_one(args: argparse.Namespace, data: Any, out: Path, method: str, seed: int, precision: str) -> dict[str, Any]:
    from fastrobust.evaluate import evaluate
    from fastrobust.train import TrainConfig, Trainer

    config = TrainConfig(
        method=method, method_params=dict(METHOD_PARAMS.get(method, {})), model=args.model,
        model_params=bu.parse_params(args.model_param), dataset="cifar10", eps=8 / 255, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, schedule=args.schedule, seed=seed, device=args.device,
        amp=args.amp, attack_precision=precision, val_size=args.val_size, out=str(out / f"{method}-{precision}-s{seed}"),
    )
    cpu0 = time.process_time()
    trainer = Trainer(config, dataset=data, progress=False, log=lambda _message: None)
    result = trainer.fit()
    record: dict[str, Any] = {
        "kind": "run", "method": method, "seed": seed, "attack_precision": precision, "amp": args.amp,
        "clean_acc": result["test"]["clean_acc"], "pgd20_acc": result["test"]["pgd20_acc"], "n": result["test"]["n"],
        "best_epoch": result["best_epoch"], "train_seconds": result["train_seconds"],
        "process_seconds": time.process_time() - cpu0,
    }
    from fastrobust.models.checkpoint import load_model
    from fastrobust.evaluate import pgd_accuracy

    # the last epoch's model too: the paired runs share data order and draws up to the attack's rounding, while
    # the best epoch is picked on 200 validation images, a noisy choice that can differ between the arms
    last, _ = load_model(Path(config.out) / "last.safetensors", device=trainer.device)
    final = pgd_accuracy(last, data.test.images, data.test.labels, eps=8 / 255, steps=20, step_size=2 / 255,
                         batch_size=config.eval_batch_size, device=trainer.device)
    record.update(clean_acc_last=final["clean_acc"], pgd20_acc_last=final["robust_acc"])
    if args.aa_n:
        model, _ = load_model(Path(config.out) / "best.safetensors", device=trainer.device)
        n = min(args.aa_n, len(data.test.labels))
        spread = torch.linspace(0, len(data.test.labels) - 1, n).round().long()  # the split is sorted by class
        iters = {"n_iter": args.aa_iters}
        aa = evaluate(model, (data.test.images[spread], data.test.labels[spread]), ["autoattack-fast"], eps=8 / 255,
                      batch_size=max(n, 1), progress=False, seed=seed,
                      attack_options={"autoattack-fast": {"apgd-ce": iters, "apgd-t": {**iters, "n_targets": 3}}})
        record.update(aa_acc=aa["robust_acc"], aa_n=n, aa_clean_acc=aa["clean_acc"])
    return record


def time_steps(args: argparse.Namespace, data: Any, method: str, device: torch.device) -> dict[str, Any]:
    """Median training-step time of each attack precision, interleaved round-robin on one real batch."""
    dtype = bu.amp_dtype(args.amp, device)
    x = data.train.images[: args.batch_size].float().div(255).to(device)
    y = data.train.labels[: args.batch_size].to(device)
    steps = {}
    for precision in args.precisions:
        model = bu.build_model(args.model, bu.parse_params(args.model_param), device, channels_last=device.type == "cuda")
        built = methods_lib.create(method, **METHOD_PARAMS.get(method, {}))
        optimizer = bu.build_optimizer(model, device, lr=args.lr)
        steps[precision] = bu.fast_step(built, model, optimizer, device, dtype, channels_last=device.type == "cuda",
                                        lr=args.lr, attack_policy=resolve(precision, device.type, dtype))
    for step in steps.values():  # warm-up
        for _ in range(2):
            step(x, y)
    times: dict[str, list[float]] = {p: [] for p in steps}
    order = list(steps)
    for round_ in range(args.timing_rounds):
        for precision in order[round_ % len(order):] + order[: round_ % len(order)]:
            bu.sync(device)
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            for _ in range(args.timing_block):
                steps[precision](x, y)
            bu.sync(device)
            elapsed = (time.process_time() - start_cpu) if device.type == "cpu" else (time.perf_counter() - start_wall)
            times[precision].append(elapsed / args.timing_block)
    medians = {p: statistics.median(v) for p, v in times.items()}
    reference = medians.get("fp32") or next(iter(medians.values()))
    return {"kind": "timing", "method": method, "clock": "process" if device.type == "cpu" else "wall",
            "median_step_seconds": medians, "ratio_to_fp32": {p: m / reference for p, m in medians.items()},
            "raw": times}


def timed(args: argparse.Namespace, data: Any, method: str, device: torch.device, command: str) -> dict[str, Any]:
    """``time_steps`` for ``method``, written to ``--json-out`` and printed as soon as it is measured."""
    timing = time_steps(args, data, method, device)
    timing["command"] = command
    bu.write_record(args.json_out, timing)
    print(json.dumps({k: v for k, v in timing.items() if k not in ("raw", "command")}), flush=True)
    return timing


def summarise(runs: list[dict[str, Any]], timings: list[dict[str, Any]], precisions: list[str]) -> list[str]:
    def mean_std(values: list[float]) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    lines = ["| method | attack | seeds | best: clean | best: PGD-20 | best: AutoAttack (reduced) | best epoch per seed "
             "| last: clean | last: PGD-20 | last PGD-20 minus fp32's (mean; per seed) | step time / fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        timing = next((t for t in reversed(timings) if t["method"] == method), None)
        for precision in precisions:
            mine = [r for r in runs if r["method"] == method and r["attack_precision"] == precision]
            fp32 = {r["seed"]: r for r in runs if r["method"] == method and r["attack_precision"] == "fp32"}
            diffs = [r["pgd20_acc_last"] - fp32[r["seed"]]["pgd20_acc_last"] for r in mine if r["seed"] in fp32]
            diff = "-" if precision == "fp32" or not diffs else (
                f"{statistics.mean(diffs):+.3f} ({', '.join(f'{d:+.3f}' for d in diffs)})")
            ratio = f"{timing['ratio_to_fp32'][precision]:.2f}" if timing else "-"
            lines.append(f"| {method} | {precision} | {len(mine)} | {mean_std([r['clean_acc'] for r in mine])} | "
                         f"{mean_std([r['pgd20_acc'] for r in mine])} | "
                         f"{mean_std([r['aa_acc'] for r in mine if 'aa_acc' in r])} | "
                         f"{', '.join(str(r['best_epoch']) for r in mine)} | "
                         f"{mean_std([r['clean_acc_last'] for r in mine])} | {mean_std([r['pgd20_acc_last'] for r in mine])} | "
                         f"{diff} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.table_from:
        records = [json.loads(line) for line in Path(args.table_from).read_text().splitlines() if line.strip()]
        runs = [r for r in records if r.get("kind") == "run"]
        timings = [r for r in records if r.get("kind") == "timing"]
        precisions = list(dict.fromkeys(r["attack_precision"] for r in runs))
        table = summarise(runs, [t for t in timings if t["method"] in {r["method"] for r in runs}], precisions)
        print("\n".join(table))
        return {"table": table}
    bu.set_threads(args.threads)
    from fastrobust.data import load_dataset
    from fastrobust.train import resolve_device

    device = resolve_device(args.device)
    data = load_dataset("cifar10", args.data_root, val_size=args.val_size, train_subset=args.train_subset,
                        test_subset=args.test_subset)
    command = "python benchmarks/precision_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out) if args.out else Path(scratch)
        for method in args.methods:
            if args.timing_first:
                timings.append(timed(args, data, method, device, command))
            for seed in args.seeds:
                for precision in args.precisions:
                    record = train_one(args, data, out, method, seed, precision)
                    record["command"] = command
                    runs.append(record)
                    bu.write_record(args.json_out, record)
                    print(json.dumps({k: v for k, v in record.items() if k != "command"}), flush=True)
            if not args.timing_first:
                timings.append(timed(args, data, method, device, command))
    table = summarise(runs, timings, args.precisions)
    summary = bu.base_record("precision_study", device, vars(args))
    summary.update(kind="summary", command=command, table=table)
    bu.write_record(args.json_out, summary)
    print("\n".join(table))
    return summary


if __name__ == "__main__":
    main()
