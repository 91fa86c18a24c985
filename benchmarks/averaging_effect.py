"""The effect of weight averaging (EMA) on robust accuracy: the trained weights against their average.

Weight averaging does not change training (the trainer's random streams and steps are the same with or
without it; tests/test_averaging.py checks that the trained weights are bit-identical), so ONE run with
``ema_decay > 0`` and ``save_epoch_models=1`` gives both arms on the same seed:

- ``model``: the trained weights of the epoch with the best validation robust accuracy (what the trainer
  selects without averaging; collapsed epochs excluded, as the trainer does), from ``epochs/``;
- ``averaged``: the averaged weights of the epoch with the best averaged validation robust accuracy
  (``best.safetensors`` with ``ema_select: averaged``);
- ``model-last`` / ``averaged-last``: the final weights of each.

Each is evaluated on the same N class-balanced test points (``fastrobust.data.balanced_head``: the test
split is sorted by class) with ``fastrobust.evaluate.evaluate``: PGD-20, and a reduced AutoAttack-fast by
default. Runs are kept under ``--out`` (an existing finished run is not trained again).
One JSON line per run and variant goes to ``--json-out``; the table gives mean ± std over seeds.

    OMP_NUM_THREADS=1 python benchmarks/averaging_effect.py --preset quickstart --methods backward_smoothing fast_at \
        --seeds 0 1 2 --set ema_decay=0.98 --out runs/averaging-effect --json-out benchmarks/results/averaging-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

VARIANTS = ("model", "averaged", "model-last", "averaged-last")
REDUCED_AA = {"autoattack-fast": {"apgd-ce": {"n_iter": 25}, "apgd-t": {"n_iter": 25, "n_targets": 3}}}


def run_settings(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    from fastrobust.train.presets import load_preset, parse_assignments

    settings = load_preset(args.preset) if args.preset else {}
    if settings.get("method") not in (None, method):  # another method does not inherit the preset's parameters
        settings.pop("method_params", None)
    extra = parse_assignments(args.set)
    settings["method_params"] = {**settings.get("method_params", {}), **extra.pop("method_params", {})}
    settings.update(extra)
    settings.update(method=method, seed=seed, save_epoch_models=1, out=str(Path(args.out) / f"{method}_seed-{seed}"))
    return settings


def model_files(run: Path) -> dict[str, Path]:
    """The four variants' weight files of a finished run (see the module docstring)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "epoch" in r and "collapse" not in r and "val_robust_acc" in r]
    best_model_epoch = max(epochs, key=lambda r: r["val_robust_acc"])["epoch"]  # first maximum, as the trainer
    result = json.loads((run / "result.json").read_text())
    if result.get("best_weights") != "averaged":
        raise SystemExit(f"{run}: best.safetensors holds the {result.get('best_weights')} weights; "
                         "run with ema_decay > 0 and ema_select=averaged")
    return {"model": run / "epochs" / f"epoch-{best_model_epoch:03d}.safetensors", "averaged": run / "best.safetensors",
            "model-last": run / "last.safetensors", "averaged-last": run / "averaged.safetensors"}


def train_timed(config: Any, data: Any) -> dict[str, Any]:
    """Train a run; the process CPU and wall seconds from the start to a trained model (before the test)."""
    from fastrobust.train import Trainer

    start = {"cpu": time.process_time(), "wall": time.perf_counter()}
    timing: dict[str, Any] = {"torch_threads": torch.get_num_threads()}

    class TimedTrainer(Trainer):
        def finish(self) -> dict[str, Any]:  # the model is trained when finish() starts
            timing.update(cpu_seconds_to_trained=time.process_time() - start["cpu"],
                          wall_seconds_to_trained=time.perf_counter() - start["wall"])
            return super().finish()

    TimedTrainer(config, dataset=data, progress=False, log=lambda _m: None).fit()
    return timing


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--methods", nargs="+", default=["backward_smoothing"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as fastrobust train --set")
    parser.add_argument("--test-points", type=int, default=1000, help="N test points of the run's test split, taken round-robin over its classes")
    parser.add_argument("--attacks", nargs="+", default=["pgd20", "autoattack-fast"])
    parser.add_argument("--full-autoattack-fast", action="store_true",
                        help="AutoAttack-fast at its full strength (default: APGD-CE 25 it. + APGD-T 25 it., 3 targets)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--out", default="runs/averaging-effect")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    from fastrobust.models.checkpoint import load_model
    from fastrobust.data import balanced_head, load_dataset
    from fastrobust.evaluate import evaluate
    from fastrobust.train.presets import make_config

    options = {} if args.full_autoattack_fast else REDUCED_AA
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        for seed in args.seeds:
            config = make_config(run_settings(args, method, seed)).validate()
            if config.ema_decay == 0:
                raise SystemExit("set ema_decay > 0 (e.g. --set ema_decay=0.98): the averaged arm needs it")
            run = Path(config.out)
            data = load_dataset(config.dataset, config.data_root, val_size=config.val_size,
                                train_subset=config.train_subset, test_subset=config.test_subset)
            timing_file = run / "time_to_trained.json"
            if not (run / "result.json").is_file():
                print(f"training {run} ...", flush=True)
                timing_file.write_text(json.dumps(train_timed(config, data)))
            timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            val = {"best_val_robust_acc": max((m.get("val_robust_acc", -1) for m in metrics), default=None),
                   "best_ema_val_robust_acc": max((m.get("ema_val_robust_acc", -1) for m in metrics), default=None)}
            images, labels = balanced_head(data.test.images, data.test.labels, args.test_points)
            result = json.loads((run / "result.json").read_text())
            for variant, file in model_files(run).items():
                if variant not in args.variants:
                    continue
                model, meta = load_model(file)
                record = evaluate(model, (images, labels), args.attacks, eps=config.attack_eps,
                                  batch_size=args.eval_batch_size, device="cpu", progress=False, seed=0,
                                  attack_options={k: v for k, v in options.items() if k in args.attacks})
                row = {"benchmark": "averaging_effect", "method": method, "seed": seed, "variant": variant,
                       "file": str(file), "epoch": meta.get("epoch"), "clean_acc": record["clean_acc"],
                       "robust_acc": record["robust_acc"], "attacks": {k: v["robust_acc"] for k, v in record["attacks"].items()},
                       "n": record["n"], "ema_decay": config.ema_decay, "ema_start_epoch": config.ema_start_epoch,
                       "train_seconds": result["train_seconds"], **timing, **val,
                       "config": result["config"], "environment": result["environment"],
                       "attack_options": options, "command": " ".join(sys.argv)}
                rows.append(row)
                print(f"{method} seed {seed} {variant:14s} epoch {row['epoch']}: clean {row['clean_acc']:.4f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in row["attacks"].items()), flush=True)
                bu.write_record(args.json_out, row)
    print_table(rows, args.attacks)
    return rows


def print_table(rows: list[dict[str, Any]], attacks: list[str]) -> None:
    """Mean ± std over seeds, in %, per method and variant (Markdown)."""
    def cell(values: list[float]) -> str:
        pct = [100 * v for v in values]
        return f"{statistics.fmean(pct):.2f} ± {statistics.stdev(pct):.2f}" if len(pct) > 1 else f"{pct[0]:.2f}"

    print("\n| method | weights | seeds | clean | " + " | ".join(attacks) + " |")
    print("|---|---|---|---|" + "---|" * len(attacks))
    for method in dict.fromkeys(r["method"] for r in rows):
        for variant in VARIANTS:
            group = [r for r in rows if r["method"] == method and r["variant"] == variant]
            if group:
                print(f"| {method} | {variant} | {len(group)} | {cell([r['clean_acc'] for r in group])} | "
                      + " | ".join(cell([r["attacks"][a] for r in group]) for a in attacks) + " |")


if __name__ == "__main__":
    main()
