"""AutoAttack speed: the authors' code (``pyautoattack``) and fastrobust's, on the same model and points.

Both run AutoAttack "standard" (l_inf, eps 8/255 by default) on the first ``--n-points`` (class-balanced) test
images, one batch each, interleaved A/B/B/A over ``--repeats`` in one process with the same thread count.
Time is process CPU seconds on the CPU (what a shared machine cannot inflate much) and wall seconds with
``torch.cuda.synchronize`` on CUDA. Printed: robust accuracy of each, the points where they disagree, median
time and the ratio official / fastrobust, peak memory (resident set on CPU, ``max_memory_allocated`` on CUDA),
and where the time goes per attack in both. ``--nproc-scaling 1 2`` also times ``fastrobust eval --attack
autoattack`` on 1 and 2 processes (gloo on CPU). One JSON record per run is appended to ``--json-out``; the
Markdown table comes last. Without ``pyautoattack`` only fastrobust runs, and the record says so.

Versions: ``official``; ``fastrobust`` (``--precision``, ``--channels-last``; fp32 NCHW by default, the
like-for-like comparison); ``fastrobust-auto-cl`` (``precision="auto"``, bf16 forwards on CUDA, fp32 on the
CPU, and a channels-last model: the configuration the GPU speed target is about). With ``--progress-out FILE``
one JSON line per timed run is appended as soon as the run ends, with the summary of the runs so far, so a
benchmark stopped at a time limit keeps what it measured. On CUDA each version first runs once untimed on two
points (``--warmup``), so the first timed run does not pay for CUDA's lazy start-up.

    OMP_NUM_THREADS=1 python benchmarks/autoattack.py --checkpoint runs/quickstart --dataset cifar10 \\
        --n-points 48 --device cpu --repeats 3 --threads 1 --json-out benchmarks/results/autoattack-cpu.jsonl
    python benchmarks/autoattack.py --model preactresnet18 --dataset cifar10 --n-points 1000 --device cuda \\
        --repeats 2 --json-out benchmarks/results/autoattack-cuda.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import base_record, hardware, load_average, set_threads, write_progress, write_record  # noqa: E402

from fastrobust.attacks import autoattack  # noqa: E402
from fastrobust.attacks.official import official_available, official_runner, official_version, run_official  # noqa: E402
from fastrobust.core.values import parse_number  # noqa: E402

aa_module = importlib.import_module("fastrobust.attacks.autoattack")
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("official", "fastrobust", "fastrobust-auto-cl", "fastrobust-auto-cl-compile")
GPU_VARIANT = "fastrobust-auto-cl"  # precision "auto" (bf16 on CUDA) and channels-last
COMPILED_VARIANT = "fastrobust-auto-cl-compile"  # the same with compile=True (CUDA graphs on padded buckets)
# the warm-up run: every component once, a few iterations, on two points
WARMUP_OPTIONS = {"apgd-ce": {"n_iter": 2}, "apgd-t": {"n_iter": 2, "n_targets": 1},
                  "fab-t": {"n_iter": 2, "n_targets": 1}, "square": {"n_queries": 2}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a fastrobust run folder or .safetensors model file")
    source.add_argument("--model", help="a model name (fastrobust models): randomly initialised unless --train-quick")
    parser.add_argument("--train-quick", action="store_true",
                        help="train --model first with a short recipe (--train-method/-epochs/-subset; the "
                             "quickstart recipe by default)")
    parser.add_argument("--train-method", default="backward_smoothing")
    parser.add_argument("--train-epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--train-out", default=None, help="run folder of --train-quick (default: a temporary one)")
    parser.add_argument("--label", default=None, help="the model's name in the table (default: derived)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None, help="default: $FASTROBUST_DATA")
    parser.add_argument("--n-points", type=int, default=48, help="the first N (class-balanced) test images")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of both (official batch_size, fastrobust max_rows); default: all points")
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--versions", nargs="+", default=["official", "fastrobust"], choices=VERSIONS,
                        help="run in this order (reversed every other repeat); fastrobust-auto-cl: precision auto "
                             "(bf16 on CUDA) with a channels-last model, the GPU configuration")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                        help="the `fastrobust` version's attack forwards (default fp32)")
    parser.add_argument("--channels-last", action="store_true", help="the `fastrobust` version: channels-last model and inputs")
    parser.add_argument("--warmup", default="auto", choices=("auto", "on", "off"),
                        help="one untimed run of each version on two points first (auto: on CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both versions)")
    parser.add_argument("--nproc-scaling", type=int, nargs="*", default=None, metavar="N",
                        help="also time `fastrobust eval --attack autoattack` on these process counts (e.g. 1 2)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--progress-out", default=None,
                        help="append one JSON line per timed run as soon as it ends (with the summary so far)")
    return parser.parse_args(argv)


# ---- model and points --------------------------------------------------------------------------
def build_model(args: argparse.Namespace, dataset, device: torch.device) -> tuple[nn.Module, dict[str, Any], str | None]:
    """(model, description, checkpoint path usable by `fastrobust eval` or None)."""
    from fastrobust.models.checkpoint import load_model
    from fastrobust.models import create

    if args.checkpoint:
        model, meta = load_model(args.checkpoint, device=device)
        label = args.label or Path(args.checkpoint).name
        return model.eval(), {"label": label, "checkpoint": str(args.checkpoint), **_model_info(meta)}, args.checkpoint
    if args.train_quick:
        from fastrobust.train import TrainConfig, train

        out = Path(args.train_out or tempfile.mkdtemp(prefix="aa-bench-"))
        if not (out / "result.json").is_file():
            config = TrainConfig(method=args.train_method, model=args.model, dataset=args.dataset,
                                 data_root=args.data_root, epochs=args.train_epochs, train_subset=args.train_subset,
                                 test_subset=200, val_size=200, val_pgd_steps=5, test_pgd_steps=5,
                                 batch_size=128, lr=0.05, schedule="cosine", device=str(device), out=str(out),
                                 seed=args.seed)
            train(config, progress=False, log=lambda _: None)
        model, meta = load_model(out, device=device)
        label = args.label or f"{args.model} {args.train_method} {args.train_epochs}ep/{args.train_subset}"
        return model.eval(), {"label": label, "trained": str(out), **_model_info(meta)}, str(out)
    torch.manual_seed(args.seed)
    model = create(args.model, num_classes=dataset.num_classes, mean=list(dataset.mean), std=list(dataset.std),
                   image_size=dataset.image_shape[-1]).to(device).eval()
    return model, {"label": args.label or f"{args.model} (random init)", "model": args.model}, None


def _model_info(meta: dict[str, Any]) -> dict[str, Any]:
    return {"model": meta.get("model", {}).get("name") if isinstance(meta.get("model"), dict) else meta.get("model")}


# ---- measurement -------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Process CPU seconds on the CPU; wall seconds (after a synchronize) on CUDA."""
    if device.type == "cuda":
        sync(device)
        return time.perf_counter()
    return time.process_time()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    """Peak memory of the block in MiB: CUDA max_memory_allocated, else the resident set's high-water mark
    (reset through /proc/self/clear_refs; the process-wide ru_maxrss where that is not available)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_mib=peak / 2**20, extra_mib=(peak - base) / 2**20, kind="cuda max_memory_allocated")
        return
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        kind = "VmHWM after clear_refs"
    except OSError:
        kind = "ru_maxrss (process lifetime)"
    yield
    peak = _status_kib("VmHWM") if kind.startswith("VmHWM") else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update(peak_mib=peak / 1024, extra_mib=(peak - (base or 0)) / 1024, kind=kind)


class AttackClock:
    """Seconds per AutoAttack component, by wrapping the callables each implementation runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = clock(self.device)
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + clock(self.device) - start
        return timed


def run_official_once(model, x, y, eps, seed, batch, device) -> tuple[torch.Tensor, dict[str, float]]:
    runner = official_runner(model, eps=eps, seed=seed, device=device)
    timer = AttackClock(device)
    for name, attr in (("apgd-ce", "apgd"), ("apgd-t", "apgd_targeted"), ("fab-t", "fab"), ("square", "square")):
        attack = getattr(runner, attr)
        attack.perturb = timer.wrap(name, attack.perturb)
    x_adv = run_official(model, x, y, eps=eps, seed=seed, batch_size=batch, runner=runner)
    return x_adv, timer.seconds


def run_fastrobust_once(model, x, y, eps, seed, batch, device, precision, channels_last, compile_=False):
    from fastrobust.attacks import _frozen

    _frozen._CACHE.clear()  # every run pays for its own frozen copies
    timer = AttackClock(device)
    saved = dict(aa_module._FUNCTIONS)
    try:
        for name in COMPONENTS:
            aa_module._FUNCTIONS[name] = timer.wrap(name, saved[name])
        generator = torch.Generator(device=device).manual_seed(seed)
        result = autoattack(model, x, y, eps=eps, generator=generator, max_rows=batch, precision=precision,
                            channels_last=channels_last, compile=compile_, return_details=True)
    finally:
        aa_module._FUNCTIONS.update(saved)
    return result.x_adv, timer.seconds, result.notes


def settings_of(version: str, args: argparse.Namespace) -> tuple[str, bool, bool]:
    """(precision, channels_last, compile) of a fastrobust version."""
    if version in (GPU_VARIANT, COMPILED_VARIANT):
        return "auto", True, version == COMPILED_VARIANT
    return args.precision, args.channels_last, False


def run_version(version: str, model, x, y, eps, args, batch, device):
    """One AutoAttack of ``version``: (x_adv, seconds per component, notes)."""
    if version == "official":
        x_adv, per_attack = run_official_once(model, x, y, eps, args.seed, batch, device)
        return x_adv, per_attack, []
    precision, channels_last, compile_ = settings_of(version, args)
    return run_fastrobust_once(model, x, y, eps, args.seed, batch, device, precision, channels_last, compile_)


def warm_up(versions: list[str], model, x, y, eps, args, device) -> None:
    """Each version once, untimed, on two points (fastrobust: every component for a few iterations; official:
    a forward and backward in fp32), so that CUDA's lazy start-up (kernels, cuDNN and cuBLAS handles) is not
    charged to the first timed run."""
    points = slice(0, 2)
    for version in versions:
        if version == "official":
            x_warm = x[points].clone().requires_grad_(True)
            model(x_warm).sum().backward()
            model.zero_grad(set_to_none=True)
            continue
        precision, channels_last, _ = settings_of(version, args)  # compiling is part of the timed run
        autoattack(model, x[points], y[points], eps=eps, options=WARMUP_OPTIONS, precision=precision,
                   channels_last=channels_last, generator=torch.Generator(device=device).manual_seed(args.seed))
    sync(device)


def robust_flags(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Robust per point, re-checked in fp32 here (and the adversarial inside the ball and [0,1])."""
    delta = (x_adv - x).flatten(1).abs().amax(1)
    if bool((delta > eps * (1 + 1e-5) + 1e-7).any()) or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError("an adversarial left the eps-ball or [0,1]")
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).cpu()


# ---- process scaling ---------------------------------------------------------------------------
def nproc_scaling(args, checkpoint: str | None, model: nn.Module, counts: list[int]) -> list[dict[str, Any]]:
    """Wall and CPU seconds of `fastrobust eval --attack autoattack --nproc N` (sharded batches) per N."""
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            from fastrobust.models.checkpoint import save_model

            checkpoint = save_model(model, Path(tmp) / "model.safetensors")
        batch = math.ceil(args.n_points / max(counts))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or torch.get_num_threads()))
        results: dict[int, list[tuple[float, float, float]]] = {n: [] for n in counts}
        for r in range(args.repeats):
            for n in (counts if r % 2 == 0 else counts[::-1]):
                out = Path(tmp) / f"eval-{n}-{r}.jsonl"
                cmd = [sys.executable, "-m", "fastrobust", "eval", "--checkpoint", str(checkpoint), "--dataset",
                       args.dataset, "--attack", "autoattack", "--test-subset", str(args.n_points), "--batch-size",
                       str(batch), "--device", "cpu", "--eps", args.eps, "--seed", str(args.seed), "--quiet",
                       "--out", str(out), "--nproc", str(n)]
                if args.data_root:
                    cmd += ["--data-root", args.data_root]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                robust = json.loads(out.read_text().splitlines()[-1])["robust_acc"]
                results[n].append((wall, cpu, robust))
        rows = []
        base = statistics.median(w for w, _, _ in results[counts[0]])
        for n in counts:
            walls = [w for w, _, _ in results[n]]
            rows.append({"nproc": n, "batch_size": batch, "wall_s": walls, "cpu_s": [c for _, c, _ in results[n]],
                         "robust_acc": sorted({r for _, _, r in results[n]}),
                         "speedup_vs_first": base / statistics.median(walls)})
        return rows


# ---- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    from fastrobust.data import load_dataset

    device = torch.device(args.device)
    eps = parse_number(args.eps, name="--eps")
    dataset = load_dataset(args.dataset, args.data_root, val_size=0, test_subset=args.n_points)
    model, model_info, checkpoint = build_model(args, dataset, device)
    for p in model.parameters():
        p.requires_grad_(True)
    x = (dataset.test.images.float() / 255).to(device)
    y = dataset.test.labels.long().to(device)
    batch = args.batch_size or len(y)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).cpu()
    versions = list(dict.fromkeys(args.versions))
    notes = []
    if "official" in versions and not official_available():
        versions.remove("official")
        notes.append("pyautoattack is not installed: fastrobust only (pip install pyautoattack)")
        print(f"note: {notes[-1]}", file=sys.stderr)
    if args.warmup == "on" or (args.warmup == "auto" and device.type == "cuda"):
        warm_up(versions, model, x, y, eps, args, device)
    load_before = load_average()
    runs: dict[str, list[dict[str, Any]]] = {}
    timer = "process CPU seconds" if device.type == "cpu" else "wall seconds (cuda synchronize)"
    progress_head = {"benchmark": "autoattack", "record": "run", "n_points": len(y), "device": str(device),
                     "model": model_info, "clean_correct": int(clean.sum()), "versions": versions, "timer": timer,
                     "run_notes": notes}
    for r in range(args.repeats):
        for version in (versions if r % 2 == 0 else versions[::-1]):
            memory: dict[str, float] = {}
            with peak_memory(device, memory):
                start = clock(device)
                x_adv, per_attack, notes_run = run_version(version, model, x, y, eps, args, batch, device)
                seconds = clock(device) - start
            robust = robust_flags(model, x_adv, x, y, eps) & clean
            runs.setdefault(version, []).append({"seconds": seconds, "per_attack": per_attack, "memory": memory,
                                                 "robust": robust.tolist(), "notes": notes_run})
            print(f"repeat {r + 1}/{args.repeats} {version}: robust {int(robust.sum())}/{len(y)} "
                  f"in {seconds:.1f} s ({'CPU' if device.type == 'cpu' else 'wall'})", file=sys.stderr, flush=True)
            write_progress(args.progress_out, {**progress_head, "repeat": r, "version": version, "seconds": seconds,
                                               "robust_count": int(robust.sum()), "per_attack": per_attack,
                                               "notes": notes_run, "summary": summarise(runs, clean)})
    summary = summarise(runs, clean)
    record = base_record("autoattack", device, {
        "model": model_info, "dataset": args.dataset, "n_points": len(y), "eps": eps, "norm": "linf",
        "version": "standard", "seed": args.seed, "batch_size": batch, "repeats": args.repeats,
        "precision": args.precision, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
        "timer": timer, "versions": versions,
    })
    record["environment"]["official"] = official_version()
    record["load_average_before_after"] = [load_before, load_average()]
    record["hardware_after"] = hardware(device)
    record["notes"] = notes
    record["clean_correct"] = int(clean.sum())
    record["runs"] = runs
    record["summary"] = summary
    if args.nproc_scaling:
        record["nproc_scaling"] = nproc_scaling(args, checkpoint, model, args.nproc_scaling)
    write_record(args.json_out, record)
    print(markdown(record))
    return record


def summarise(runs: dict[str, list[dict[str, Any]]], clean: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for version, items in runs.items():
        flags = [tuple(item["robust"]) for item in items]
        out[version] = {
            "robust": sum(flags[0]), "robust_acc": sum(flags[0]) / len(flags[0]),
            "same_flags_every_repeat": len(set(flags)) == 1,
            "median_s": statistics.median(item["seconds"] for item in items),
            "seconds": [item["seconds"] for item in items],
            "per_attack_median_s": {name: statistics.median(item["per_attack"].get(name, 0.0) for item in items)
                                    for name in COMPONENTS},
            "peak_mib": max(item["memory"].get("peak_mib", 0.0) for item in items),
            "extra_mib": max(item["memory"].get("extra_mib", 0.0) for item in items),
        }
    if "official" in runs:  # every fastrobust version against the official, on the first repeat's flags
        official = runs["official"]
        comparisons = {}
        for version, ours in runs.items():
            if version == "official":
                continue
            a, b = official[0]["robust"], ours[0]["robust"]
            comparisons[version] = {
                "disagreements": {"robust_only_official": [i for i, (p, q) in enumerate(zip(a, b)) if p and not q],
                                  "robust_only_fastrobust": [i for i, (p, q) in enumerate(zip(a, b)) if q and not p]},
                "ratio_of_medians": out["official"]["median_s"] / out[version]["median_s"],
                "paired_ratios": [o["seconds"] / f["seconds"] for o, f in zip(official, ours)]}
        out["comparisons"] = comparisons
        if "fastrobust" in comparisons:  # the fp32 comparison, where earlier records kept it
            out.update(comparisons["fastrobust"])
    return out


def markdown(record: dict[str, Any]) -> str:
    cfg, summary = record["config"], record["summary"]
    unit = "CPU s" if cfg["timer"].startswith("process") else "wall s"
    lines = [f"AutoAttack standard, {cfg['model']['label']}, {cfg['n_points']} points "
             f"(clean-correct {record['clean_correct']}), eps {cfg['eps']:.5f}, {cfg['threads']} thread(s), "
             f"{record['hardware']['cpu_model'] if cfg['timer'].startswith('process') else record['hardware'].get('gpu')}",
             "",
             f"| version | robust acc | {unit} (median of {cfg['repeats']}) | APGD-CE | APGD-T | FAB-T | Square "
             f"| peak MiB (+run) |",
             "|---|---|---|---|---|---|---|---|"]
    for version in VERSIONS:
        if version not in summary:
            continue
        s = summary[version]
        parts = " | ".join(f"{s['per_attack_median_s'][n]:.1f}" for n in COMPONENTS)
        lines.append(f"| {version} | {100 * s['robust_acc']:.2f}% | {s['median_s']:.1f} | {parts} "
                     f"| {s['peak_mib']:.0f} (+{s['extra_mib']:.0f}) |")
    for version, c in summary.get("comparisons", {}).items():
        d = c["disagreements"]
        lines += ["", f"ratio official / {version}: **{c['ratio_of_medians']:.2f}x** (paired: "
                      f"{', '.join(f'{r:.2f}' for r in c['paired_ratios'])}); points robust only for the "
                      f"official: {d['robust_only_official']}, only for {version}: {d['robust_only_fastrobust']}"]
    for row in record.get("nproc_scaling", []):
        lines.append(f"- fastrobust eval --nproc {row['nproc']} (batch {row['batch_size']}): wall "
                     f"{statistics.median(row['wall_s']):.1f} s, speed-up {row['speedup_vs_first']:.2f}x, "
                     f"robust acc {row['robust_acc']}")
    for note in record.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
