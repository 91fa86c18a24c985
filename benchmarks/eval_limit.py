"""AutoAttack against its limit: the model evaluations it must make, at the fastest cost one evaluation can have.

An attack's **limit** is the passes it makes (forward rows, and forward+backward rows, counted at the model's call
by ``core.passes.CountedModel`` per batch size) times the cost of one evaluation of the fastest copy of the model
at that batch size: per row, the minimum over the eager model, a channels-last copy, the frozen TorchScript copies
the attacks use (``attacks/_frozen.py``: the gradient copy for forward+backward, the query copy for forwards) and,
with ``--probe-compile``, the ``torch.compile`` copy on padded buckets (``attacks/_compiled.py``). The cost is
probed at the powers of two up to the largest batch the attack used and interpolated (log-log) in between; each
probe evaluates about ``--probe-rows`` rows, best of two, process CPU seconds.

The limit is fastrobust's own passes (the official makes more: it iterates broken points to the end); both
implementations are divided by it. AutoAttack standard (l_inf, 8/255) runs on the first ``--n-points``
class-balanced test images, one batch, official / fastrobust / fastrobust with ``compile=True`` interleaved (rotated
every repeat), each run and the probe in a fresh process of their own (``--same-process``: all in this one, as
before: a run after the official's in the same process measured 10-12% slower, the probe 5%, at 1,000 points); time
is process CPU seconds plus the CPU seconds of finished child processes (inductor's C++ compiler), per attack and in
total. Printed: a Markdown table (attack, passes, limit, each version's seconds and its ratio to the limit, official
/ fastrobust; the points robust for only one of the official and each other version); a JSON record is appended to
``--json-out``, the table written to ``--markdown-out``.

    OMP_NUM_THREADS=1 python benchmarks/eval_limit.py --checkpoint runs/quickstart --n-points 200 \\
        --json-out benchmarks/results/eval-limit-cpu.jsonl --markdown-out benchmarks/results/eval-limit-200.md
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in this process: its CPU time is counted

import argparse
import copy
import importlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import base_record, load_average, set_threads, write_record

from fastrobust.attacks import autoattack
from fastrobust.attacks._compiled import compiled_copy
from fastrobust.attacks._frozen import frozen_copies
from fastrobust.attacks.official import official_available, official_runner, run_official
from fastrobust.core.passes import CountedModel, PassCount

aa_module = importlib.import_module("fastrobust.attacks.autoattack")
frozen_module = importlib.import_module("fastrobust.attacks._frozen")
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
REST = "rest"  # clean pass, confirmations, pre-checks, copies' checks: everything outside the components
VERSIONS = ("official", "fastrobust", "fastrobust-compile")
OFFICIAL_ATTRS = {"apgd-ce": "apgd", "apgd-t": "apgd_targeted", "fab-t": "fab", "square": "square"}
Calls = dict[tuple[str, int], int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a fastrobust run folder or .safetensors model file")
    parser.add_argument("--label", default=None)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None, help="default: $FASTROBUST_DATA")
    parser.add_argument("--n-points", type=int, default=200)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-rows", type=int, default=512, help="rows evaluated per cost probe (default 512)")
    parser.add_argument("--probe-compile", action="store_true",
                        help="also probe the torch.compile copy (compiles every power of two up to the largest "
                             "batch: minutes on a CPU)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--markdown-out", default=None)
    parser.add_argument("--same-process", action="store_true",
                        help="run every version and the probe in this process (default: each in a fresh one)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a version or "probe": one job, then exit
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-largest", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- the limit ----------------------------------------------------------------------------------
def calls_since(calls: Calls, before: Calls) -> Calls:
    """The calls of each (kind, rows) logged since ``before`` (a copy of the log)."""
    return {key: n - before.get(key, 0) for key, n in calls.items() if n - before.get(key, 0)}


def passes_of(calls: Calls) -> dict[str, int]:
    """Forward and backward rows of a call log."""
    return {kind: sum(rows * n for (k, rows), n in calls.items() if k == kind) for kind in ("forward", "backward")}


def interpolate(costs: dict[int, float], rows: int) -> float:
    """Per-row seconds at ``rows``, log-log between the two probed batch sizes around it (the nearest outside)."""
    sizes = sorted(costs)
    if rows <= sizes[0]:
        return costs[sizes[0]]
    if rows >= sizes[-1]:
        return costs[sizes[-1]]
    upper = next(i for i, s in enumerate(sizes) if s >= rows)
    a, b = sizes[upper - 1], sizes[upper]
    if b == rows:
        return costs[b]
    w = (math.log(rows) - math.log(a)) / (math.log(b) - math.log(a))
    return math.exp((1 - w) * math.log(costs[a]) + w * math.log(costs[b]))


def limit_seconds(calls: Calls, forward_cost: dict[int, float], gradient_cost: dict[int, float]) -> float:
    """The seconds the calls must take: every call of ``rows`` rows whose output got a backward costs ``rows`` x
    the forward+backward cost per row at that batch size (``gradient_cost``), every other call ``rows`` x the
    forward cost per row (``forward_cost``); both map probed batch sizes to per-row seconds.

    Args:
        calls: ``{("forward" | "backward", rows): calls}`` (``PassCount(calls={})``).
        forward_cost: per-row seconds of a forward, by batch size.
        gradient_cost: per-row seconds of a forward+backward, by batch size.
    Returns:
        Seconds.
    """
    total = 0.0
    for (kind, rows), n in calls.items():
        if kind != "forward":
            continue
        with_backward = min(n, calls.get(("backward", rows), 0))
        total += rows * (with_backward * interpolate(gradient_cost, rows)
                         + (n - with_backward) * interpolate(forward_cost, rows))
    return total


# ---- the probe ----------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """Process CPU seconds plus those of finished children (inductor's compiler runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def per_row(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, target_rows: int) -> tuple[float, float]:
    """(per-row seconds of ``fn`` on ``x``, best of two rounds of about ``target_rows`` rows; the first call's
    seconds, which includes any compilation)."""
    start = cpu_seconds()
    fn(x)
    first = cpu_seconds() - start
    reps = max(2, math.ceil(target_rows / len(x)))
    best = math.inf
    for _ in range(2):
        start = cpu_seconds()
        for _ in range(reps):
            fn(x)
        best = min(best, (cpu_seconds() - start) / (reps * len(x)))
    return best, first


def copies_to_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, with_compile: bool) -> dict[str, Any]:
    """name -> (module for forwards, module for forward+backward, input layout)."""
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = {"eager": (model, model, torch.contiguous_format),
           "channels-last": (channels_last, channels_last, torch.channels_last)}
    frozen = frozen_copies(model, x, y)
    if frozen.grad_model is not None:
        out["frozen"] = (frozen.query_model, frozen.grad_model, torch.contiguous_format)
    if with_compile:
        compiled = compiled_copy(model, x.device.type)
        out["compiled"] = (compiled, compiled, torch.contiguous_format)
    return out


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, largest: int, rows: int,
          with_compile: bool) -> dict[str, Any]:
    """Per-row seconds of a forward and of a forward+backward of each copy at the powers of two up to
    ``largest``; the fastest per size; the first-call (compile) seconds of each copy."""
    sizes = [1 << k for k in range(max(largest, 1).bit_length())]
    if sizes[-1] < largest:
        sizes.append(largest)
    pool = x.repeat(math.ceil(sizes[-1] / len(x)), 1, 1, 1)[:sizes[-1]]
    labels = y.repeat(math.ceil(sizes[-1] / len(y)))[:sizes[-1]]
    table: dict[str, dict[str, dict[int, float]]] = {}
    first_calls: dict[str, float] = {}
    for name, (fwd, grad, layout) in copies_to_probe(model, x, y, with_compile).items():
        table[name] = {"forward": {}, "gradient": {}}
        first_calls[name] = 0.0
        for size in sizes:
            batch, target = pool[:size].contiguous(memory_format=layout), labels[:size]

            def forward(b, fwd=fwd):
                with torch.no_grad():
                    return fwd(b)

            def gradient(b, grad=grad, target=target):
                b = b.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(grad(b), target), [b])
                return g

            for kind, fn in (("forward", forward), ("gradient", gradient)):
                seconds, first = per_row(fn, batch, rows)
                table[name][kind][size] = seconds
                first_calls[name] += first
    best = {kind: {size: min(table[name][kind][size] for name in table) for size in sizes}
            for kind in ("forward", "gradient")}
    fastest = {kind: {size: min(table, key=lambda name: table[name][kind][size]) for size in sizes}
               for kind in ("forward", "gradient")}
    return {"sizes": sizes, "per_copy": table, "best": best, "fastest": fastest, "first_call_s": first_calls}


# ---- the runs -----------------------------------------------------------------------------------
class PerAttack:
    """Seconds and the call log of each component, by wrapping the callables each implementation runs."""

    def __init__(self, count: PassCount):
        self.count = count
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, Calls] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            before, start = dict(self.count.calls), cpu_seconds()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + cpu_seconds() - start
                for key, n in calls_since(self.count.calls, before).items():
                    log = self.calls.setdefault(name, {})
                    log[key] = log.get(key, 0) + n
        return timed


def run_once(version: str, model: nn.Module, x, y, eps: float, seed: int) -> dict[str, Any]:
    """One AutoAttack standard of ``version`` on a counted copy: adversarials, seconds and calls per component
    and in total (the rest outside the components as ``REST``), compile seconds of the compiled version."""
    count = PassCount(calls={})
    counted = CountedModel(model, count)
    timer = PerAttack(count)
    compile_first_calls: list[float] = []
    frozen_module._CACHE.clear()  # every run pays for its own frozen copies
    torch._dynamo.reset()  # ... and its own compilation (inductor's on-disk cache stays: say so in the record)
    start = cpu_seconds()  # after the resets: dynamo's reset imports dynamo the first time (1.3 s)
    if version == "official":
        runner = official_runner(counted, eps=eps, seed=seed, device=x.device)
        for name, attr in OFFICIAL_ATTRS.items():
            attack = getattr(runner, attr)
            attack.perturb = timer.wrap(name, attack.perturb)
        x_adv = run_official(counted, x, y, eps=eps, seed=seed, batch_size=len(x), runner=runner)
    else:
        saved = dict(aa_module._FUNCTIONS)
        saved_copy = aa_module.compiled_copy
        aa_module.compiled_copy = first_call_timer(saved_copy, compile_first_calls)
        try:
            for name in COMPONENTS:
                aa_module._FUNCTIONS[name] = timer.wrap(name, saved[name])
            x_adv = autoattack(counted, x, y, eps=eps, generator=torch.Generator().manual_seed(seed),
                               compile=version == "fastrobust-compile")
        finally:
            aa_module._FUNCTIONS.update(saved)
            aa_module.compiled_copy = saved_copy
    total = cpu_seconds() - start
    rest_calls = dict(count.calls)
    for log in timer.calls.values():
        for key, n in log.items():
            rest_calls[key] -= n
    timer.calls[REST] = {key: n for key, n in rest_calls.items() if n}
    timer.seconds[REST] = total - sum(timer.seconds.values())
    return {"x_adv": x_adv, "seconds": total, "per_attack_s": timer.seconds, "calls": timer.calls,
            "compile_s": sum(compile_first_calls), "compile_first_calls": compile_first_calls}


def first_call_timer(make: Callable, sink: list[float]) -> Callable:
    """``compiled_copy`` whose copy records, in ``sink``, the CPU seconds of the first call of every (batch size,
    grad mode), the calls that compile (a later call of the same shape costs milliseconds)."""
    def wrapped(model, device_type):
        stand_in = make(model, device_type)
        bucketed = stand_in.model if isinstance(stand_in, CountedModel) else stand_in
        bucketed.inner = FirstCalls(bucketed.inner, sink)
        return stand_in
    return wrapped


class FirstCalls(nn.Module):
    def __init__(self, inner: nn.Module, sink: list[float]):
        super().__init__()
        self.inner, self.sink, self.seen = inner, sink, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], torch.is_grad_enabled())
        if key in self.seen:
            return self.inner(x)
        self.seen.add(key)
        start = cpu_seconds()
        out = self.inner(x)
        self.sink.append(cpu_seconds() - start)
        return out


# ---- the table ----------------------------------------------------------------------------------
def table_rows(runs: dict[str, dict[str, Any]], costs: dict[str, Any]) -> list[dict[str, Any]]:
    """Per component and in total: fastrobust's passes, the limit, each version's seconds and ratio to it."""
    reference = runs.get("fastrobust") or runs.get("fastrobust-compile")
    forward, gradient = costs["best"]["forward"], costs["best"]["gradient"]
    rows = []
    for name in (*COMPONENTS, REST):
        calls = reference["calls"].get(name, {})
        row = {"attack": name, "passes": passes_of(calls), "limit_s": limit_seconds(calls, forward, gradient)}
        for version, run in runs.items():
            row[f"{version}_s"] = run["per_attack_s"].get(name, 0.0)
            row[f"{version}_passes"] = passes_of(run["calls"].get(name, {}))
        rows.append(row)
    total = {"attack": "total", "limit_s": sum(r["limit_s"] for r in rows),
             "passes": {k: sum(r["passes"][k] for r in rows) for k in ("forward", "backward")}}
    for version, run in runs.items():
        total[f"{version}_s"] = run["seconds"]
        total[f"{version}_passes"] = {k: sum(r[f"{version}_passes"][k] for r in rows) for k in ("forward", "backward")}
    rows.append(total)
    return rows


def markdown(record: dict[str, Any]) -> str:
    versions = record["versions"]
    head = ["attack", "passes fwd / bwd", "limit s"]
    for version in versions:
        head += [f"{version} s", f"{version} / limit"]
    if "official" in versions and "fastrobust" in versions:
        head.append("official / fastrobust")
    cfg = record["config"]
    title = (f"AutoAttack standard, {cfg['label']}, {cfg['n_points']} points (clean-correct "
             f"{record['clean_correct']}, robust {record['robust']}), {cfg['threads']} thread(s), process CPU s "
             f"(median of {cfg['repeats']})")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in record["table"]:
        limit = row["limit_s"]
        cells = [row["attack"], f"{row['passes']['forward']:,} / {row['passes']['backward']:,}", f"{limit:.1f}"]
        for version in versions:
            s = row[f"{version}_s"]
            cells += [f"{s:.1f}", f"{s / limit:.2f}x" if limit else "-"]
        if "official" in versions and "fastrobust" in versions:
            f = row["fastrobust_s"]
            cells.append(f"{row['official_s'] / f:.2f}x" if f else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for version in versions:
        if version != "fastrobust" and f"{version}_passes" in record["table"][-1]:
            p = record["table"][-1][f"{version}_passes"]
            lines.append(f"- {version} made {p['forward']:,} forward / {p['backward']:,} backward rows")
    for version, points in record.get("differ_from_official", {}).items():
        lines.append(f"- points robust for one of official and {version} only: "
                     + (f"{len(points)} ({', '.join(map(str, points[:20]))})" if points else "none"))
    if record.get("compile"):
        c = record["compile"]
        lines.append(f"- compile: {c['compile_s']:.1f} s in the compiled run ({c['shapes']} first calls); "
                     f"break-even {c['break_even']}")
    fastest = record["costs"]["fastest"]
    sizes = record["costs"]["sizes"]
    lines.append("- fastest copy per batch size (forward | forward+backward): "
                 + ", ".join(f"{s}: {fastest['forward'][s]} | {fastest['gradient'][s]}" for s in sizes))
    return "\n".join(lines)


def differing_points(robust_points: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per version other than the official: the points robust in exactly one of the two (empty without the
    official)."""
    if "official" not in robust_points:
        return {}
    official = set(robust_points["official"])
    return {version: sorted(official ^ set(points))
            for version, points in robust_points.items() if version != "official"}


def median_run(items: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(items, key=lambda r: r["seconds"])[len(items) // 2]


def break_even(runs: dict[str, dict[str, Any]], attacked: int) -> dict[str, Any] | None:
    """Compile seconds against the seconds the compiled copy saves per attacked point."""
    if "fastrobust" not in runs or "fastrobust-compile" not in runs:
        return None
    compiled, eager = runs["fastrobust-compile"], runs["fastrobust"]
    compile_s = compiled["compile_s"]
    saved = eager["seconds"] - (compiled["seconds"] - compile_s)
    per_point = saved / max(attacked, 1)
    points = f"{compile_s / per_point:,.0f} attacked points" if per_point > 0 else "never (no seconds saved)"
    return {"compile_s": compile_s, "run_without_compile_s": compiled["seconds"] - compile_s,
            "saved_s": saved, "saved_per_point_s": per_point, "break_even": points,
            "shapes": len(compiled["compile_first_calls"])}


def load_inputs(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model (eval mode), the first ``--n-points`` class-balanced test images and labels, and which of them the
    model classifies correctly."""
    from fastrobust.data import load_dataset
    from fastrobust.models.checkpoint import load_model

    dataset = load_dataset(args.dataset, args.data_root, val_size=0, test_subset=args.n_points)
    model, _ = load_model(args.checkpoint, device=torch.device("cpu"))
    model.eval()
    x = dataset.test.images.float() / 255
    y = dataset.test.labels.long()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    return model, x, y, clean


def run_measured(version: str, model: nn.Module, x, y, clean, args: argparse.Namespace) -> dict[str, Any]:
    """``run_once`` and the points it leaves robust (correct on the clean image and on its adversarial): how many,
    and which."""
    run = run_once(version, model, x, y, args.eps, args.seed)
    with torch.no_grad():
        robust = (model(run.pop("x_adv")).argmax(1) == y) & clean
    run["robust"], run["robust_points"] = int(robust.sum()), robust.nonzero().squeeze(1).tolist()
    return run


def run_probe(model: nn.Module, x, y, clean, largest: int, args: argparse.Namespace) -> dict[str, Any]:
    """The cost probe on 64 clean-correct points (any 64 when none is), and its own CPU seconds."""
    start = cpu_seconds()
    costs = probe(model, x[clean][:64] if clean.any() else x[:64], y[clean][:64] if clean.any() else y[:64],
                  largest, args.probe_rows, args.probe_compile)
    return {"costs": costs, "probe_s": cpu_seconds() - start}


# ---- fresh processes ------------------------------------------------------------------------------
def to_json(value: Any) -> Any:
    """Tuple and integer dict keys as text (("forward", 8) -> "forward:8"), for the trip through JSON."""
    if isinstance(value, dict):
        return {(":".join(map(str, k)) if isinstance(k, tuple) else str(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def calls_from_json(log: dict[str, int]) -> Calls:
    return {(key.split(":")[0], int(key.split(":")[1])): n for key, n in log.items()}


def costs_from_json(costs: dict[str, Any]) -> dict[str, Any]:
    sized = {kind: {int(size): t for size, t in d.items()} for kind, d in costs["best"].items()}
    fastest = {kind: {int(size): name for size, name in d.items()} for kind, d in costs["fastest"].items()}
    per_copy = {name: {kind: {int(s): t for s, t in d.items()} for kind, d in v.items()}
                for name, v in costs["per_copy"].items()}
    return {**costs, "best": sized, "fastest": fastest, "per_copy": per_copy}


def in_fresh_process(argv: list[str], job: str, largest: int = 0) -> dict[str, Any]:
    """Run ``job`` (a version, or "probe") in a new Python process with this script's arguments; its result."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", job, "--worker-out", str(out),
                   "--worker-largest", str(largest)]
        subprocess.run(command, check=True)
        result = json.loads(out.read_text())
    if job == "probe":
        return {"costs": costs_from_json(result["costs"]), "probe_s": result["probe_s"]}
    result["calls"] = {name: calls_from_json(log) for name, log in result["calls"].items()}
    return result


def worker(args: argparse.Namespace) -> None:
    """One job of ``in_fresh_process``: its result as JSON in ``--worker-out``."""
    model, x, y, clean = load_inputs(args)
    if args.worker == "probe":
        result = run_probe(model, x, y, clean, args.worker_largest, args)
    else:
        result = run_measured(args.worker, model, x, y, clean, args)
    Path(args.worker_out).write_text(json.dumps(to_json(result)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        worker(args)
        return {}
    model, x, y, clean = load_inputs(args)
    versions = [v for v in args.versions if v != "official" or official_available()]
    load_before = load_average()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}
    robust: dict[str, int] = {}
    robust_points: dict[str, list[int]] = {}
    for r in range(args.repeats):
        order = versions[r % len(versions):] + versions[:r % len(versions)]
        for version in order:
            if args.same_process:
                run = run_measured(version, model, x, y, clean, args)
            else:
                run = in_fresh_process(argv, version)
            robust[version] = run.pop("robust")
            robust_points[version] = run.pop("robust_points")
            runs[version].append(run)
            print(f"repeat {r + 1}/{args.repeats} {version}: {run['seconds']:.1f} CPU s, robust {robust[version]}",
                  file=sys.stderr, flush=True)
    chosen = {v: median_run(items) for v, items in runs.items()}
    reference = chosen.get("fastrobust") or chosen["fastrobust-compile"]
    largest = max(rows for log in reference["calls"].values() for (_, rows) in log)
    probed = (run_probe(model, x, y, clean, largest, args) if args.same_process
              else in_fresh_process(argv, "probe", largest))
    costs, probe_s = probed["costs"], probed["probe_s"]
    print(f"cost probe: {probe_s:.1f} CPU s", file=sys.stderr)
    record = base_record("eval_limit", torch.device("cpu"), {
        "label": args.label or Path(args.checkpoint).name, "checkpoint": str(args.checkpoint),
        "n_points": len(y), "eps": args.eps, "seed": args.seed, "repeats": args.repeats, "threads": args.threads,
        "probe_rows": args.probe_rows, "probe_compile": args.probe_compile,
        "processes": "one" if args.same_process else "fresh per run and probe",
        "inductor_env": {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR")}})
    record.update(versions=versions, clean_correct=int(clean.sum()), robust=robust,
                  load_average_before_after=[load_before, load_average()], probe_s=probe_s,
                  runs=to_json(runs), costs={**costs, "per_copy": to_json(costs["per_copy"])},
                  table=table_rows(chosen, costs))
    record["compile"] = break_even(chosen, int(clean.sum()))
    record["differ_from_official"] = differing_points(robust_points)
    write_record(args.json_out, record)
    text = markdown(record)
    print(text)
    if args.markdown_out:
        Path(args.markdown_out).write_text(text + "\n")
    return record


if __name__ == "__main__":
    main()
