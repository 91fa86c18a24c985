"""CPU time of RayS: the batched search against the previous lockstep one, same points, same precision.

"batched" is ``fastrobust.attacks.rays`` (every example runs its own trials; each model call holds the next
query of every example still searching). "lockstep" is the implementation before it (git ref ``--before``,
default 050e480), in which the whole batch tries the same block and then runs its binary searches together,
run at the same, authors', precision (``tol = 1e-3 / sqrt(d)``). Both are timed INTERLEAVED in one process
(each round runs both, in alternating order) with process CPU time, on one thread. The attack review of
2026-11-30 (section 2.3) measured the authors' RayS at 195 CPU s against 155 s for "lockstep" at this precision
(200 CIFAR-10 points, 10,000 queries): multiply the lockstep/batched ratio printed here by 195/155 for an
estimate against the authors' code.

    python benchmarks/rays.py --checkpoint RUN --points 100 --queries 2000 --rounds 2 --json-out benchmarks/results/rays.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_before(ref: str):
    """``rays`` as it was at git ``ref`` (a module under fastrobust.attacks, so its relative imports work)."""
    source = subprocess.run(["git", "show", f"{ref}:src/fastrobust/attacks/rays.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("fastrobust.attacks._rays_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "fastrobust.attacks"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{ref}:rays.py", "exec"), module.__dict__)
    return module.rays


def count_calls(model: torch.nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder or .safetensors file (fastrobust model)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--points", type=int, default=100, help="first N class-balanced test points")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default="050e480", help="git ref of the lockstep implementation")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from fastrobust.attacks import rays
    from fastrobust.attacks.rays import official_tol
    from fastrobust.models.checkpoint import load_model
    from fastrobust.data import load_dataset
    from fastrobust.core.records import append_jsonl, environment

    torch.set_num_threads(1)
    model, _ = load_model(args.checkpoint, device="cpu")
    model.eval()
    data = load_dataset(args.dataset, args.data_root, val_size=0, test_subset=args.points)
    x = data.test.images.float().div(255)
    y = data.test.labels
    tol = official_tol(x[0].numel())
    before = load_before(args.before)
    variants = {"batched": lambda: rays(model, x, y, n_queries=args.queries),
                "lockstep": lambda: before(model, x, y, n_queries=args.queries, tol=tol)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    results, calls = {}, {}
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in order:
            counted, handle = count_calls(model)
            start = time.process_time()
            results[name] = variants[name]()
            seconds[name].append(time.process_time() - start)
            handle.remove()
            calls[name] = len(counted)
            print(f"round {round_} {name}: {seconds[name][-1]:.1f} CPU s, {calls[name]} model calls", file=sys.stderr)
    correct = results["batched"].distance > 0
    summary = {}
    for name, result in results.items():
        d = result.distance[correct]
        summary[name] = {"cpu_seconds": statistics.median(seconds[name]), "model_calls": calls[name],
                         "queries_mean": float(result.queries[correct].float().mean()),
                         "adbd_correct_only": float(d[torch.isfinite(d)].mean()),
                         "robust_acc": float((result.distance > args.eps).float().mean())}
    ratio = (results["lockstep"].distance[correct] / results["batched"].distance[correct])
    record = {"benchmark": "rays", "checkpoint": str(args.checkpoint), "points": args.points,
              "clean_correct": int(correct.sum()), "queries": args.queries, "tol": tol, "rounds": args.rounds,
              "variants": summary,
              "lockstep_over_batched_cpu": summary["lockstep"]["cpu_seconds"] / summary["batched"]["cpu_seconds"],
              "distance_ratio_lockstep_over_batched_median": float(ratio.median()),
              "environment": environment("cpu"), "threads": torch.get_num_threads(),
              "load_average": list(os.getloadavg())}
    print(json.dumps(record, indent=1))
    if args.json_out:
        append_jsonl(args.json_out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
