"""One prepared GPU run that answers what the speed targets and the paper need, in one command of about 9 minutes.

Stages, most valuable first (each guarded: a failure is recorded with its error and the suite goes on; each timed
stage gets its share of the time left and is skipped, with the reason, when too little is left):

1. ``env``: GPU, driver, clocks (nvidia-smi; without it, torch's view of the GPU), torch / CUDA / cuDNN
   versions, the command, the git commit (``.gpu-carry/COMMIT`` from ``benchmarks/prepare_gpu_carry.sh``, else git).
2. ``data``: CIFAR-10 decoded from the archive into a fresh cache (timed); every later stage reads that cache.
3. ``canary``: the trainer as a user runs it on a GPU, on a tiny model: bf16 autocast, channels_last, weight
   averaging, a SIGTERM in the middle of an epoch, ``resume``, one epoch with ``torch.compile``; one row per
   feature: ok, or the one-line error.
4. ``cost``: ``benchmarks/cost.py``: every method's training step on PreActResNet-18 at batch 512 (bf16,
   channels_last): each method's first CUDA steps, its measured/declared cost, and the step times that the
   speedrun's epochs are fitted to.
5. ``speedrun``: time to robustness: the ``speedrun`` preset as shipped (``torch.compile`` on, unless the canary
   saw compile fail) on full CIFAR-10 with its epochs fitted to the stage's time, then PGD-20 and
   AutoAttack-fast on 1,000 test points; the first epoch's extra time is the cold compile.
6. ``autoattack``: ``benchmarks/autoattack.py`` on the speedrun's model: fastrobust with bf16 and channels_last
   (the GPU configuration) first, then the official AutoAttack (``pyautoattack``), then fastrobust in fp32.
7. ``precision``: ``benchmarks/precision_study.py``: the attack inside training in bf16 against fp32 (Fast
   TRADES, whose one attack step is the one bf16 hurts most): step times first, then two short paired runs.
8. ``epoch``: ``benchmarks/epoch.py``: the fast path against the authors'-style reference, 100 steps per epoch.
9. ``natural``: natural img/s of PreActResNet-18 at batch 512: eager, with weight averaging, compiled.
10. ``baselines`` (``--baselines``, with a larger budget): ``fast_at`` and ``trades`` on the speedrun's schedule.

Every stage writes its records as it goes (per row, round, run or method), so a stage stopped at its cap keeps
what it measured. Heavy stages run in child processes, asked to stop (SIGTERM) ``KILL_GRACE`` seconds before
their cap and killed at it, so the suite ends inside its budget. ``--smoke`` runs every stage on the CPU with a
tiny model, a synthetic JPEG copy of CIFAR-10's layout and a few batches (in-process where it can), as a test.
Records go to ``OUT/gpu_suite.json`` (rewritten after every stage), the output to ``OUT/gpu_suite.log``, and the
Markdown table, printed last, to ``OUT/gpu_suite.md``.

    python benchmarks/gpu_suite.py --out gpu-suite-out               # on a GPU machine: about 9 minutes
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite-smoke    # anywhere, about a minute

benchmarks/README.md says how to prepare the data folder for a machine without network; docs/performance.md
holds the results.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CARRY = ROOT / ".gpu-carry"
for _path in (ROOT / "src", HERE):  # this checkout's code, with or without PYTHONPATH=src
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import benchutil as bu  # noqa: E402
from fastrobust import methods as methods_lib  # noqa: E402
from fastrobust.core.records import append_jsonl, read_jsonl  # noqa: E402
from fastrobust.data import balanced_head, load_dataset  # noqa: E402
from fastrobust.data.datasets import CIFAR10_CLASSES, resolve_root  # noqa: E402
from fastrobust.evaluate import evaluate  # noqa: E402
from fastrobust.models.checkpoint import load_model  # noqa: E402
from fastrobust.train import Trainer, TrainingStopped, resume  # noqa: E402
from fastrobust.train.averaging import WeightAverager  # noqa: E402
from fastrobust.train.presets import load_preset, make_config  # noqa: E402

# the timed stages, in the order they run (env and data always run first); baselines only with --baselines
STAGES = ("canary", "cost", "speedrun", "autoattack", "precision", "epoch", "natural", "baselines")
DEFAULT_STAGES = STAGES[:-1]
# each stage's nominal seconds at the default budget. A stage's cap is its weight's share of the time left,
# against the stages after it that will run, so time a stage does not use flows on to the later ones
WEIGHTS = {"canary": 40, "cost": 30, "speedrun": 200, "autoattack": 90, "precision": 45, "epoch": 40, "natural": 45,
           "baselines": 300}
# below these seconds a stage could not say anything useful: it is skipped, with the reason
NEEDS = {"canary": 15, "cost": 15, "speedrun": 90, "autoattack": 30, "precision": 30, "epoch": 20, "natural": 15,
         "fast_at": 60, "trades": 60}
DEFAULT_BUDGET = 530.0  # seconds: the whole suite, from its start to the table
RESERVE = 10.0  # seconds kept at the end for the summary
KILL_GRACE = 10.0  # a child is asked to stop (SIGTERM) this long before its cap and killed (SIGKILL) at the cap
COLD_COMPILE_ESTIMATE = 60.0  # seconds: a cold torch.compile of Backward Smoothing's PreActResNet-18 graphs (a guess;
# the speedrun records the real one as its first epoch's overhead)
EVAL_RESERVE = 45.0  # seconds a training stage keeps for PGD-20 + AutoAttack-fast on 1,000 points and loading
CANARY_FEATURES = ("bf16 autocast", "channels_last", "weight averaging", "stop mid-epoch (SIGTERM)", "resume",
                   "torch.compile")
# the canary's tiny runs: on the GPU about 1-2 s each plus a cold compile of a tiny model; in smoke a few batches
# and the "eager" compile backend (inductor's C++ build takes minutes on a small CPU)
CANARY_GPU = {"model": "tinycnn", "model_params": {"width": 16}, "train_subset": 2000, "val_size": 200,
              "test_subset": 200, "batch_size": 100, "eval_batch_size": 200, "stop_at": 10, "compile_backend": None}
CANARY_SMOKE = {"model": "tinycnn", "model_params": {"width": 4}, "train_subset": 200, "val_size": 50,
                "test_subset": 40, "batch_size": 50, "eval_batch_size": 50, "stop_at": 2, "compile_backend": "eager"}
REDUCED_AA = {"apgd-ce": {"n_iter": 5}, "apgd-t": {"n_iter": 5, "n_targets": 2}}  # smoke only
NVIDIA_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                 "power.draw", "power.limit", "temperature.gpu", "memory.total", "memory.used", "utilization.gpu")


# ---------------------------------------------------------------------------------------------- small helpers
def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json_or_lines(path: Path) -> Any:
    """A JSON file, or a JSON-lines file as a list (a line cut short by a kill is dropped); None when absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return read_jsonl(path)


def last_record(final: Path, progress: Path) -> tuple[dict[str, Any], bool]:
    """A benchmark's record: the last one of its ``--json-out`` file when it finished, else the last line of
    its ``--progress-out`` file (what it had measured when it stopped; ``partial`` True). ({}, False) when neither."""
    for path, partial in ((final, False), (progress, True)):
        records = read_json_or_lines(path)
        records = records if isinstance(records, list) else [records] if records else []
        if records:
            return records[-1], partial or bool(records[-1].get("partial"))
    return {}, False


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (at most 300 characters)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")[:300]


def git_commit() -> str:
    """The commit of the code: .gpu-carry/COMMIT (a copy without .git), else git rev-parse."""
    if (CARRY / "COMMIT").is_file():
        return (CARRY / "COMMIT").read_text().strip()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no .gpu-carry/COMMIT, no git)"


def nvidia_smi() -> dict[str, Any] | str:
    """One read-only query of the GPU's state (clocks in MHz, power in W, memory in MiB); a note without it."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_FIELDS)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi not available ({type(error).__name__})"
    if out.returncode != 0:
        return f"nvidia-smi failed: {out.stderr.strip()[:200]}"
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return dict(zip(NVIDIA_FIELDS, (v.strip() for v in first.split(","))))


def no_gpu_reason(smi: dict[str, Any] | str, cuda_available: bool) -> str | None:
    """Why the suite cannot run (None when torch sees a GPU: a failing nvidia-smi only costs the clock readings)."""
    if cuda_available:
        return None
    seen = f"nvidia-smi sees {smi.get('name')}" if isinstance(smi, dict) else smi
    return f"no GPU: torch.cuda.is_available() is False ({seen}); run with --smoke on a CPU machine"


def make_smoke_archive(root: Path, train_per_class: int = 110, test_per_class: int = 26) -> Path:
    """A CIFAR-10-shaped JPEG archive (the mirror's layout, random 32x32 images) for --smoke."""
    path = root / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for label, name in enumerate(CIFAR10_CLASSES):
                for i in range(count):  # a class-dependent colour plus noise: learnable
                    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float32)
                    image = np.clip(base * 0.6 + rng.uniform(0, 100, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                    info = tarfile.TarInfo(f"CIFAR-10-images/{split}/{name}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)
    return path


def preset_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``speedrun`` preset's settings with ``overrides``; another method does not inherit the preset
    method's parameters."""
    settings = load_preset("speedrun")
    if "method" in overrides and overrides["method"] != settings.get("method"):
        settings.pop("method_params", None)
    settings.update(overrides)
    return settings


# ---------------------------------------------------------------------------------------------- the canary
class MidEpochStop:
    """The trainer's loader, with a SIGTERM to this process just before batch ``at`` (1-based) of the first epoch
    it serves: what ``kill PID`` does to a training run in the middle of an epoch, at a known batch."""

    def __init__(self, loader: Any, at: int) -> None:
        self.loader = loader
        self.at = at
        self.sent = False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index, batch in enumerate(self.loader.epoch(epoch, start_batch=start_batch), start=start_batch + 1):
            if index == self.at and not self.sent:
                self.sent = True
                signal.raise_signal(signal.SIGTERM)  # the trainer's handler: finish this step, checkpoint, stop
            yield batch


@contextlib.contextmanager
def compile_backend(backend: str | None) -> Iterator[None]:
    """``torch.compile`` with ``backend`` inside the block (CPU tests: "eager" skips inductor's C++ build);
    None leaves torch's default (inductor), as a user's run has it."""
    if backend is None:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


class Canary:
    """Runs the trainer feature by feature on a tiny model; ``rows`` (appended to ``result`` as JSON lines
    as each ends) say which feature works: ok, failed (one line), skipped (a feature it needs failed), or not
    finished (the suite stopped the canary at its cap: a SIGTERM the trainer turns into a stop)."""

    def __init__(self, params: dict[str, Any], result: Path) -> None:
        self.params = params
        self.result = result
        self.work = Path(params.get("work") or tempfile.mkdtemp(prefix="canary-"))
        self.data = load_dataset("cifar10", params.get("data_root"), val_size=params["val_size"],
                                 train_subset=params["train_subset"], test_subset=params["test_subset"])
        self.rows: dict[str, dict[str, Any]] = {}

    def config(self, name: str, **changes: Any):
        """The speedrun preset on the canary's tiny model and data (1 epoch, no averaging, no compile) + ``changes``."""
        p = self.params
        settings = preset_settings({
            "model": p["model"], "model_params": p.get("model_params", {}), "device": p["device"],
            "data_root": p.get("data_root"), "train_subset": p["train_subset"], "val_size": p["val_size"],
            "test_subset": p["test_subset"], "batch_size": p["batch_size"], "eval_batch_size": p["eval_batch_size"],
            "epochs": 1, "val_pgd_steps": 2, "test_pgd_steps": 2, "amp": "bf16", "channels_last": "off",
            "ema_decay": 0.0, "validate_models": "both", "compile": False, "out": str(self.work / name)})
        settings.update(changes)
        return make_config(settings)

    def trainer(self, config) -> Trainer:
        return Trainer(config, dataset=self.data, progress=False, log=lambda _message: None)

    def row(self, feature: str, check: Callable[[], dict[str, Any]], *, needs: str | None = None) -> None:
        start = time.perf_counter()
        if needs is not None and self.rows.get(needs, {}).get("status") != "ok":
            row: dict[str, Any] = {"status": "skipped", "reason": f"needs {needs!r}, which did not work"}
        else:
            try:
                row = {"status": "ok", "detail": check()}
            except TrainingStopped as stopped:  # the suite's SIGTERM at the canary's cap, not the feature's fault
                row = {"status": "not finished", "reason": f"stopped at the canary's cap ({one_line(stopped)})"}
            except Exception as error:  # noqa: BLE001 - each feature's failure is its row, the others still run
                row = {"status": "failed", "error": one_line(error)}
        row.update(feature=feature, seconds=round(time.perf_counter() - start, 3))
        self.rows[feature] = row
        append_jsonl(self.result, row)
        print(f"canary {feature}: {row['status']} {row.get('error') or row.get('reason') or row.get('detail')}", flush=True)

    # -- the features, each on top of the ones before ----------------------------------------------------
    def bf16(self) -> dict[str, Any]:
        trainer = self.trainer(self.config("bf16"))
        trainer.fit()
        if trainer.autocast_dtype != torch.bfloat16:
            raise RuntimeError(f"amp=bf16 trained with autocast dtype {trainer.autocast_dtype}")
        return {**self.settings(trainer), "train_loss": self.last_metrics(trainer)["train_loss"]}

    def channels_last(self) -> dict[str, Any]:
        trainer = self.trainer(self.config("channels-last", channels_last="on"))
        trainer.fit()
        weights = [p for p in trainer.model.parameters() if p.dim() == 4]
        if not weights or not all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
            raise RuntimeError("channels_last=on left convolution weights in another memory format")
        return {**self.settings(trainer), "conv_weights_channels_last": len(weights)}

    def averaging(self) -> dict[str, Any]:
        trainer = self.trainer(self.config("averaging", channels_last="on", ema_decay=0.9))
        result = trainer.fit()
        if not (trainer.out / "averaged.safetensors").is_file():
            raise RuntimeError("weight averaging wrote no averaged.safetensors")
        return {**self.settings(trainer), "best_weights": result.get("best_weights")}

    def stop(self) -> dict[str, Any]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the stop needs the main thread (the trainer's SIGTERM handler lives there)")
        trainer = self.trainer(self.config("stopped", channels_last="on", ema_decay=0.9, epochs=2))
        at = max(1, min(self.params["stop_at"], len(trainer.loader) - 1))
        trainer.loader = MidEpochStop(trainer.loader, at)
        try:
            trainer.fit()
        except TrainingStopped as stopped:
            message = str(stopped)
        else:
            raise RuntimeError("the run was not stopped by SIGTERM")
        if (trainer.epoch, trainer.batch) != (0, at) or not any((trainer.out / "checkpoints").glob("step-*")):
            raise RuntimeError(f"stopped at epoch {trainer.epoch + 1}, batch {trainer.batch} (expected epoch 1, "
                               f"batch {at}) or without a checkpoint: {message}")
        return {"stopped_at": f"epoch 1, batch {at} of {len(trainer.loader)}", "message": message}

    def resumed(self) -> dict[str, Any]:
        run = self.work / "stopped"
        result = resume(run, progress=False, log=lambda _message: None, dataset=self.data)
        epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r]
        if epochs != [1, 2] or not (run / "result.json").is_file():
            raise RuntimeError(f"the resumed run ended with epochs {epochs} in metrics.jsonl (expected [1, 2])")
        return {"epochs": epochs, "test": result.get("test")}

    def compiled(self) -> dict[str, Any]:
        with compile_backend(self.params.get("compile_backend")):
            trainer = self.trainer(self.config("compiled", channels_last="on", ema_decay=0.9, compile=True))
            trainer.fit()
        first = self.last_metrics(trainer)
        return {**self.settings(trainer), "epoch_seconds_with_compile": first.get("epoch_seconds"),
                "backend": self.params.get("compile_backend") or "inductor (torch's default)"}

    # -- what a row reports ----------------------------------------------------------------------------
    @staticmethod
    def settings(trainer: Trainer) -> dict[str, Any]:
        """What the trainer resolved: autocast and attack dtypes, memory format, optimiser kind."""
        defaults = trainer.optimizer.defaults
        return {"device": str(trainer.device), "autocast": str(trainer.autocast_dtype),
                "attack_dtype": str(trainer.attack_policy.dtype), "channels_last": trainer.channels_last,
                "optimizer": "fused SGD" if defaults.get("fused") else "foreach SGD" if defaults.get("foreach") else "SGD"}

    @staticmethod
    def last_metrics(trainer: Trainer) -> dict[str, Any]:
        records = [r for r in read_jsonl(trainer.out / "metrics.jsonl") if "epoch" in r]
        if not records or not math.isfinite(records[-1].get("train_loss", float("nan"))):
            raise RuntimeError(f"no finite training loss in {trainer.out / 'metrics.jsonl'}")
        return records[-1]

    def run(self) -> None:
        self.row("bf16 autocast", self.bf16)
        self.row("channels_last", self.channels_last)
        self.row("weight averaging", self.averaging)
        self.row("stop mid-epoch (SIGTERM)", self.stop)
        self.row("resume", self.resumed, needs="stop mid-epoch (SIGTERM)")
        self.row("torch.compile", self.compiled)


def child_canary(params: dict[str, Any], result: Path) -> None:
    """The canary (``Canary``): one JSON line per feature in ``result``, written as each ends."""
    Canary(params, result).run()


def canary_rows(lines: Any, error: str | None) -> list[dict[str, Any]]:
    """One row per canary feature in order: what the canary wrote, else why it has no result."""
    written = {row["feature"]: row for row in (lines if isinstance(lines, list) else []) if "feature" in row}
    missing = f"not reached ({error})" if error else "not reached"
    return [written.get(feature, {"feature": feature, "status": "not reached", "reason": missing})
            for feature in CANARY_FEATURES]


# ---------------------------------------------------------------------------------------------- other children
def child_natural(params: dict[str, Any], result: Path) -> None:
    """Natural training steps (the trainer's step: benchutil.fast_step) of ``model`` at ``batch``: img/s eager,
    eager with weight averaging after every step, and compiled (compile time = the warm-up steps' time); the
    record is rewritten after each of the three."""
    device = bu.resolve(params["device"])
    dtype = bu.amp_dtype(params.get("amp", "auto"), device)
    channels_last = device.type == "cuda"
    batch = params["batch"]
    data = load_dataset("cifar10", params.get("data_root"), val_size=0, train_subset=batch * 4, test_subset=10)
    batches = [(data.train.images[i * batch:(i + 1) * batch].to(device).float().div_(255),
                data.train.labels[i * batch:(i + 1) * batch].to(device)) for i in range(4)]
    method = methods_lib.create("natural")
    out: dict[str, Any] = {"model": params["model"], "model_params": params.get("model_params", {}), "batch": batch,
                           "device": str(device), "amp": str(dtype) if dtype else "fp32", "channels_last": channels_last}

    def measure(label: str, backend: str | None = None, averaged: bool = False) -> None:
        model = bu.build_model(params["model"], params.get("model_params", {}), device, channels_last=channels_last)
        model.train()
        optimizer = bu.build_optimizer(model, device)
        forward = torch.compile(model, backend=backend) if backend else model
        step = bu.fast_step(method, forward, optimizer, device, dtype, channels_last)
        averager = WeightAverager(model, decay=0.999) if averaged else None

        def one(i: int) -> None:
            x, y = batches[i % len(batches)]
            step(x, y)
            if averager is not None:
                averager.update(model, 0)

        start = time.perf_counter()
        for i in range(params["warmup"]):
            one(i)
        bu.sync(device)
        warm = time.perf_counter() - start
        watch = bu.Stopwatch(device).start()
        for i in range(params["steps"]):
            one(i)
        seconds = watch.stop().seconds()
        out[label] = {"images_per_second": params["steps"] * batch / seconds, "step_seconds": seconds / params["steps"],
                      "warmup_seconds": warm, "warmup_steps": params["warmup"], "timed_steps": params["steps"],
                      **({"compile_backend": backend} if backend else {})}
        write_json(result, out)
        print(f"natural {label}: {out[label]['images_per_second']:.0f} img/s (warm-up {warm:.1f} s)", flush=True)

    measure("eager")
    measure("eager_ema", averaged=True)
    if params.get("compile_backend"):
        measure("compiled", backend=params["compile_backend"])


def child_train(params: dict[str, Any], result: Path) -> None:
    """Train a preset (with overrides) under a deadline, then evaluate its best model on N class-balanced test points.

    The deadline sends SIGTERM to this process: the trainer finishes its step, checkpoints and stops; the
    finished epochs' best model is still evaluated. Times are wall-clock from ``launch_time`` (the parent's
    clock just before starting this process). The training record is written before the evaluation starts."""
    launch = params.get("launch_time", time.time())
    overrides = dict(params.get("overrides", {}))
    config = make_config(preset_settings(overrides))
    out: dict[str, Any] = {"preset": params["preset"], "overrides": overrides}
    data = load_dataset(config.dataset, config.data_root, val_size=config.val_size,
                        train_subset=config.train_subset, test_subset=config.test_subset)
    trained_at: dict[str, float] = {}
    timer: threading.Timer | None = None

    class TimedTrainer(Trainer):
        def finish(self) -> dict[str, Any]:  # the model is trained when finish() starts: no stop from here on
            trained_at["t"] = time.time()
            if timer is not None:
                timer.cancel()
            return super().finish()

    trainer = TimedTrainer(config, dataset=data, progress=False, log=lambda m: print(m, flush=True))
    deadline = params.get("deadline_seconds")
    if deadline:
        timer = threading.Timer(max(1.0, deadline - (time.time() - launch)), lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    started = time.time()
    stopped = None
    try:
        trainer.fit()
    except TrainingStopped as error:
        stopped = str(error)
        trained_at.setdefault("t", time.time())
    finally:
        if timer is not None:
            timer.cancel()
    run = Path(config.out)
    metrics = [r for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r] if (run / "metrics.jsonl").is_file() else []
    final = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    out.update(config=final.get("config") or dict(vars(config)), run=str(run), stopped=stopped,
               epochs_planned=config.epochs, epochs_completed=len(metrics),
               seconds_to_trained=trained_at["t"] - launch, seconds_trainer_to_trained=trained_at["t"] - started,
               seconds_launch_to_fit=started - launch, train_seconds=trainer.train_seconds,
               epoch_seconds=[r.get("epoch_seconds") for r in metrics],
               val=[{k: r.get(k) for k in ("epoch", "val_robust_acc", "ema_val_robust_acc", "val_clean_acc", "ema_val_clean_acc")}
                    for r in metrics],
               best_epoch=final.get("best_epoch", trainer.best.get("epoch")),
               best_weights=final.get("best_weights", trainer.best.get("weights")),
               test_pgd20_from_trainer=final.get("test"))
    write_json(result, out)  # the training is measured: kept even if the evaluation is cut short
    for r in metrics:  # the trainer runs without progress output here: one line per epoch afterwards
        print(f"epoch {r['epoch']}: {r.get('epoch_seconds', 0):.1f} s, loss {r.get('train_loss', float('nan')):.4f}, val robust "
              f"{r.get('val_robust_acc', float('nan')):.4f} (averaged {r.get('ema_val_robust_acc', float('nan')):.4f})", flush=True)
    print(f"trained {out['epochs_completed']}/{config.epochs} epochs: {out['seconds_to_trained']:.1f} s from launch "
          f"to a trained model ({out['train_seconds']:.1f} s of training steps)", flush=True)
    if not (run / "best.safetensors").is_file():
        raise RuntimeError("no epoch finished: no model to evaluate")
    model, meta = load_model(run / "best.safetensors", device=trainer.device)
    images, labels = balanced_head(data.test.images, data.test.labels, params.get("eval_points", 1000))
    attacks = params.get("attacks", ["pgd20", "autoattack-fast"])
    record = evaluate(model, (images, labels), attacks, eps=config.attack_eps, batch_size=params.get("eval_batch_size", 500),
                      progress=False, seed=0, attack_options=params.get("attack_options") or None)
    out["evaluation"] = {"n": record["n"], "clean_acc": record["clean_acc"], "robust_acc": record["robust_acc"],
                         "attacks": {k: {"robust_acc": v["robust_acc"], "seconds": v.get("seconds")} for k, v in record["attacks"].items()},
                         "attack_options": params.get("attack_options"), "seconds": record["seconds"],
                         "model": f"best.safetensors ({meta.get('weights', 'model')} weights, epoch {meta.get('epoch')})"}
    if torch.cuda.is_available():
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    write_json(result, out)
    print("evaluated: " + ", ".join(f"{k} {v['robust_acc']:.4f}" for k, v in out["evaluation"]["attacks"].items()), flush=True)


CHILDREN: dict[str, Callable[[dict[str, Any], Path], None]] = {"canary": child_canary, "natural": child_natural,
                                                               "train": child_train}


def compile_overhead(epoch_seconds: list[float | None]) -> float | None:
    """The first epoch's extra seconds over the later ones' median: the cold compile (and first-call set-up)."""
    times = [t for t in epoch_seconds if isinstance(t, (int, float))]
    if len(times) < 2:
        return None
    return max(0.0, times[0] - statistics.median(times[1:]))


def as_shipped_estimate(stage: dict[str, Any], preset_epochs: int) -> dict[str, float] | None:
    """Seconds from launch to a trained model for the preset's own epochs, from a speedrun of >= 2 epochs:
    start-up + first-epoch overhead + epochs x the measured wall time per epoch (steps, validation, checkpoints)."""
    epochs = stage.get("epoch_seconds") or []
    overhead = compile_overhead(epochs)
    startup, total = stage.get("seconds_launch_to_fit"), stage.get("seconds_to_trained")
    if overhead is None or startup is None or total is None:
        return None
    per_epoch = (total - startup - overhead) / len(epochs)
    return {"seconds": startup + overhead + preset_epochs * per_epoch, "startup_seconds": startup,
            "first_epoch_overhead_seconds": overhead, "wall_seconds_per_epoch": per_epoch, "epochs": preset_epochs}


# ---------------------------------------------------------------------------------------------- the suite
class SkipStage(Exception):
    """A stage that cannot run here (missing script, budget): recorded as skipped with this reason."""


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.budget = float(args.budget_seconds)
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else args.device
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_suite.log", "a", buffering=1)  # noqa: SIM115 - closed by finish()
        self.stages = set(args.stages) | ({"baselines"} if args.baselines else set())
        self.record: dict[str, Any] = {"suite": {"budget_seconds": self.budget, "smoke": self.smoke,
                                                 "command": " ".join(shlex.quote(a) for a in sys.argv),
                                                 "work_dir": str(self.work), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                 "order": [s for s in STAGES if s in self.stages]},
                                       "stages": {}}
        self.data_root: str | None = None
        self.env = dict(os.environ)
        paths = [str(ROOT / "src")] + ([str(CARRY / "site")] if (CARRY / "site").is_dir() else [])
        self.env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["FASTROBUST_CACHE"] = str(self.work / "decoded")  # this process too, while run() runs
        for path in reversed(paths):
            if path not in sys.path:
                sys.path.insert(0, path)
        if self.smoke:
            self.env["OMP_NUM_THREADS"] = "1"

    # -- time ----------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed() - (2.0 if self.smoke else RESERVE)

    def cap(self, part: str) -> float:
        """Seconds for ``part``: its weight's share of the time left, against the parts from it on that will run
        (the last weighted part gets all that is left)."""
        names = [n for n in WEIGHTS if n in self.stages]
        later = sum(WEIGHTS[n] for n in names[names.index(part):])
        return max(0.0, self.remaining()) * WEIGHTS[part] / later

    def needs(self, name: str) -> float:
        return 0.0 if self.smoke else NEEDS.get(name, 0.0)

    # -- output --------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[suite {self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def save(self) -> None:
        self.record["suite"]["elapsed_seconds"] = self.elapsed()
        write_json(self.out / "gpu_suite.json", self.record)

    def stage(self, name: str, function: Callable[[], dict[str, Any] | None], *, available: float | None = None) -> dict[str, Any]:
        """Run one guarded stage; skipped when ``available`` seconds (default: the time left) are below its need."""
        entry: dict[str, Any] = {"status": "skipped"}
        available = self.remaining() if available is None else available
        if available < self.needs(name):
            entry["reason"] = f"budget: {max(available, 0):.0f} s for it, the stage needs about {self.needs(name):.0f} s"
        else:
            start = time.perf_counter()
            self.say(f"stage {name} ({available:.0f} s) ...")
            try:
                entry = {"status": "ok", **(function() or {})}
            except SkipStage as reason:
                entry = {"status": "skipped", "reason": str(reason)}
            except Exception as error:  # noqa: BLE001 - one failed stage must not lose the others
                entry = {"status": "error", "error": one_line(error), "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = time.perf_counter() - start
            entry["cap_seconds"] = available
        self.record["stages"][name] = entry
        self.say(f"stage {name}: {entry['status']}" + (f" ({entry.get('reason') or entry.get('error')})"
                                                       if entry["status"] != "ok" else f" in {entry['seconds']:.1f} s"))
        self.save()
        return entry

    # -- children ------------------------------------------------------------------------------------------
    def child(self, kind: str, params: dict[str, Any], timeout: float, *,
              subprocess_: bool | None = None) -> tuple[Any, str | None]:
        """Run a child measurement (``CHILDREN[kind]``) with a hard timeout: (what it wrote, even when it failed
        or was stopped; the reason it did not finish, or None). In smoke mode it runs in this process by default."""
        result = self.work / f"{kind}-{time.monotonic_ns()}.json"
        params = {**params, "launch_time": time.time()}
        use_subprocess = (not self.smoke) if subprocess_ is None else subprocess_
        if not use_subprocess:
            params.pop("deadline_seconds", None)  # a SIGTERM timer would hit this process: in-process runs are tiny
        error = None
        if use_subprocess:
            command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-params", json.dumps(params),
                       "--child-out", str(result)]
            error = self.run_process(command, timeout, label=kind)
        else:
            try:
                CHILDREN[kind](params, result)
            except Exception as exc:  # noqa: BLE001
                error = one_line(exc)
        return read_json_or_lines(result), error

    def run_process(self, command: list[str], timeout: float, *, label: str) -> str | None:
        """Run ``command`` with its output streamed to the log; SIGTERM ``KILL_GRACE`` seconds before ``timeout``
        (half of it for short ones), SIGKILL at ``timeout``. Returns None on success, else the reason."""
        stop_at = max(timeout - KILL_GRACE, timeout / 2, 0.5)
        self.say(f"{label}: {' '.join(shlex.quote(c) for c in command[:3])} ... (SIGTERM at {stop_at:.0f} s, "
                 f"SIGKILL at {timeout:.0f} s)")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        tail: list[str] = []

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                print(f"  [{label}] {line}", flush=True)
                self.log.write(f"  [{label}] {line}\n")
                tail.append(line)
                del tail[:-20]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=stop_at)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=max(timeout - stop_at, 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            reader.join(timeout=5)
            return f"stopped at its cap of {timeout:.0f} s"
        reader.join(timeout=5)
        if code != 0:
            return f"exit status {code}: " + " | ".join(tail[-3:])
        return None

    def script(self, name: str, argv: list[str], timeout: float, *,
               progress_out: bool = True) -> tuple[dict[str, Any], bool, str | None, list[Any]]:
        """Run ``benchmarks/NAME`` with ``--json-out`` and ``--progress-out`` (unless ``progress_out`` is False:
        a script that appends each measured unit to ``--json-out`` itself) (its ``main(argv)`` in this process in
        smoke mode, else a child process): (its record, whether partial, the error, every ``--json-out`` line)."""
        stem = Path(name).stem
        final, progress = self.work / f"{stem}.jsonl", self.work / f"{stem}-progress.jsonl"
        argv = [*argv, "--json-out", str(final)] + (["--progress-out", str(progress)] if progress_out else [])
        if self.smoke:
            try:
                importlib.import_module(stem).main(argv)
                error = None
            except SystemExit as exc:
                error = None if not exc.code else f"exit {exc.code}"
            except Exception as exc:  # noqa: BLE001
                error = one_line(exc)
        else:
            error = self.run_process([sys.executable, str(HERE / name), *argv], timeout, label=name)
        record, partial = last_record(final, progress)
        lines = read_json_or_lines(final) or []
        return record, partial, error, lines if isinstance(lines, list) else [lines]

    def benchmark(self, name: str, argv: list[str], timeout: float) -> dict[str, Any]:
        """``script`` as a stage entry: the record (or what a stopped run wrote), wall time and error."""
        started = time.perf_counter()
        record, partial, error, _lines = self.script(name, argv, timeout)
        if error and not record:
            raise RuntimeError(error)
        return {**record, "partial": partial, "wall_seconds": time.perf_counter() - started,
                **({"child_error": error} if error else {})}

    # -- env and data ----------------------------------------------------------------------------------------
    def stage_env(self) -> dict[str, Any]:
        info: dict[str, Any] = {"git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "device": self.device, "nvidia_smi_before": nvidia_smi(),
                                "pyautoattack": "importable" if importlib.util.find_spec("pyautoattack") else None}
        smi = info["nvidia_smi_before"]
        if isinstance(smi, dict):
            info["gpu"] = smi.get("name")
        return info

    def stage_data(self) -> dict[str, Any]:
        if self.smoke:
            root = self.work / "data"
            make_smoke_archive(root)
        else:
            root = Path(self.args.data_root) if self.args.data_root else resolve_root(None)
        self.data_root = str(Path(root).resolve())
        self.env["FASTROBUST_DATA"] = self.data_root
        start = time.perf_counter()
        data = load_dataset("cifar10", root, val_size=1000)
        seconds = time.perf_counter() - start
        again = time.perf_counter()
        load_dataset("cifar10", root, val_size=1000)
        return {"source_archive": str(data.source).split(" (")[0].replace(str(ROOT) + "/", ""),
                "decode_seconds": seconds, "cached_load_seconds": time.perf_counter() - again,
                "cpu_count": os.cpu_count(), "decode_pool": f"up to {min(os.cpu_count() or 1, 25)} processes (2,000 images each)",
                "train": len(data.train.labels), "val": len(data.val.labels), "test": len(data.test.labels)}

    def cuda_info(self) -> str | None:
        """torch's view of the GPU, added to the env record after the data stage (whose decode pool forks: this
        process touches CUDA only after it); the reason the suite cannot run, or None."""
        env = self.record["stages"].get("env", {})
        available = torch.cuda.is_available()
        env["cuda_available"] = available
        if available:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                       cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        self.save()
        return None if self.smoke else no_gpu_reason(env.get("nvidia_smi_before", "not asked"), available)

    def model_spec(self) -> dict[str, Any]:
        return {"model": "tinycnn", "model_params": {"width": 8}} if self.smoke else {"model": "preactresnet18", "model_params": {}}

    def model_argv(self) -> list[str]:
        spec = self.model_spec()
        params = [token for item, value in spec["model_params"].items() for token in ("--model-param", f"{item}={value}")]
        return ["--model", spec["model"], *params]

    # -- the timed stages ----------------------------------------------------------------------------------
    def stage_canary(self, cap: float) -> dict[str, Any]:
        sizes = CANARY_SMOKE if self.smoke else CANARY_GPU
        params = {**sizes, "device": self.device, "data_root": self.data_root, "work": str(self.work / "canary")}
        lines, error = self.child("canary", params, timeout=cap)
        rows = canary_rows(lines, error)
        return {"rows": rows, "failed": [r["feature"] for r in rows if r["status"] != "ok"], "spec": sizes,
                **({"child_error": error} if error else {})}

    def stage_cost(self, cap: float) -> dict[str, Any]:
        return self.benchmark("cost.py", ["--device", self.device, *self.model_argv(), "--batch-size",
                                          "32" if self.smoke else "512", "--steps", "2" if self.smoke else "8",
                                          "--warmup", "1" if self.smoke else "2"]
                              + (["--data-root", self.data_root] if self.data_root else []), cap)

    def compile_choice(self) -> tuple[bool, str]:
        """Whether the speedrun compiles, and why: ``--speedrun-compile on|off`` as given; ``auto``: off when the
        canary's compile failed, else the preset's own setting (nothing before the speedrun measures a
        PreActResNet-18 compile, so the preset as shipped is what gets timed)."""
        choice = self.args.speedrun_compile
        if choice != "auto":
            return choice == "on", f"--speedrun-compile {choice}"
        canary = next((r for r in (self.record["stages"].get("canary") or {}).get("rows", [])
                       if r["feature"] == "torch.compile"), None)
        if canary is not None and canary["status"] == "failed":
            return False, f"auto: compile failed in the canary ({canary['error']})"
        preset = bool(load_preset("speedrun").get("compile", False))
        return preset, f"auto: the preset's own setting (compile {'on' if preset else 'off'})"

    def plan_epochs(self, method: str, seconds: float, compile_: bool) -> tuple[int, dict[str, Any]]:
        """How many epochs of ``method`` fit in ``seconds`` (from cost.py's step times when measured)."""
        preset = load_preset("speedrun")
        batch = int(preset["batch_size"])
        steps = -(-49000 // batch)
        cost = (self.record["stages"].get("cost") or {}).get("results") or []
        by = {r["method"]: r["median_s"] for r in cost if "median_s" in r}
        natural = by.get("natural") or 0.05
        step = by.get(method, natural * {"backward_smoothing": 3.4, "fast_at": 1.8, "trades": 9.0}.get(method, 4.0))
        step *= batch / 512  # cost.py times batch 512
        validation = 2 * 1000 * 11 / 512 * natural * 0.8  # PGD-10 on 1,000 points, trained and averaged models
        epoch = steps * step * 1.1 + validation
        measured = compile_overhead((self.record["stages"].get("speedrun") or {}).get("epoch_seconds") or [])
        compile_seconds = (measured if measured is not None else COLD_COMPILE_ESTIMATE) if compile_ else 0.0
        startup = 20.0
        epochs = int((seconds - startup - compile_seconds) // epoch) if epoch > 0 else 0
        return epochs, {"estimated_epoch_seconds": epoch, "estimated_compile_seconds": compile_seconds,
                        "estimated_startup_seconds": startup, "step_seconds_used": step, "batch_size": batch,
                        "step_seconds_from": "cost.py" if method in by else "an assumed ratio to natural"}

    def speedrun_overrides(self, method: str | None, epochs: int, compile_: bool, out: str) -> dict[str, Any]:
        overrides: dict[str, Any] = {"epochs": epochs, "out": out, "device": self.device, "data_root": self.data_root,
                                     "test_subset": 64 if self.smoke else 1000, "compile": compile_}
        if method:
            overrides["method"] = method
        if self.smoke:
            overrides.update(self.model_spec(), train_subset=256, val_size=64, batch_size=64, eval_batch_size=500,
                             amp="off", channels_last="off", val_pgd_steps=2, test_pgd_steps=2)
        return overrides

    def train_stage(self, method: str | None, cap: float, *, epochs: int | None = None,
                    compile_: bool = False, planning: dict[str, Any] | None = None) -> dict[str, Any]:
        name = method or "speedrun"
        run = str(self.work / "runs" / name)
        attack_options = {"autoattack-fast": REDUCED_AA} if self.smoke else None
        eval_reserve = 8.0 if self.smoke else EVAL_RESERVE
        params = {"preset": "speedrun", "overrides": self.speedrun_overrides(method, epochs or 1, compile_, run),
                  "deadline_seconds": max(cap - KILL_GRACE - eval_reserve, 5.0), "eval_points": 64 if self.smoke else 1000,
                  "eval_batch_size": 500, "attacks": ["pgd20", "autoattack-fast"], "attack_options": attack_options}
        started = time.perf_counter()
        out, error = self.child("train", params, timeout=cap)
        out = out if isinstance(out, dict) else {}
        if error:
            out["child_error"] = error
        out["planning"] = planning
        failed = error and "evaluation" not in out
        if failed and compile_ and not out.get("epochs_completed") and "stopped at its cap" not in error:
            left = cap - (time.perf_counter() - started)  # torch.compile failed: the same run without it
            self.say(f"{name}: failed with compile on ({error}); again without compile in {left:.0f} s")
            params["overrides"]["compile"] = False
            params["overrides"]["out"] = run + "-eager"
            params["deadline_seconds"] = max(left - KILL_GRACE - eval_reserve, 5.0)
            retry, retry_error = self.child("train", params, timeout=left)
            retry = retry if isinstance(retry, dict) else {}
            if retry_error:
                retry["child_error"] = retry_error
            retry["planning"] = {**(planning or {}), "compile": False, "compile_failed": error}
            out, failed = retry, retry_error and "evaluation" not in retry
        if failed:
            raise RuntimeError(out["child_error"])
        out["first_epoch_overhead_seconds"] = compile_overhead(out.get("epoch_seconds") or [])
        return out

    def stage_speedrun(self, cap: float) -> dict[str, Any]:
        if self.smoke:
            return self.train_stage(None, cap, epochs=1, planning={"smoke": True, "compile": False})
        compile_, why = self.compile_choice()
        budget = cap - KILL_GRACE - EVAL_RESERVE
        if self.args.speedrun_epochs is not None:
            epochs = self.args.speedrun_epochs or int(load_preset("speedrun")["epochs"])
            planning = {"epochs_from": "--speedrun-epochs", **self.plan_epochs("backward_smoothing", budget, compile_)[1]}
        else:
            epochs, planning = self.plan_epochs("backward_smoothing", budget, compile_)
            planning["epochs_from"] = "fitted to the stage's time"
        if epochs < 1:
            raise SkipStage(f"not one epoch fits in {cap:.0f} s ({planning})")
        planning.update(compile=compile_, compile_choice=why, cap_seconds=cap)
        self.say(f"speedrun: {epochs} epochs, compile {compile_} ({why})")
        out = self.train_stage(None, cap, epochs=epochs, compile_=compile_, planning=planning)
        out["as_shipped"] = as_shipped_estimate(out, int(load_preset("speedrun")["epochs"]))
        return out

    def autoattack_model(self) -> tuple[list[str], str]:
        """The speedrun's best model, else a randomly initialised one (which times the code, not the target)."""
        stage = self.record["stages"].get("speedrun", {})
        best = Path(stage.get("run") or "") / "best.safetensors"
        if stage.get("run") and best.is_file():
            return ["--checkpoint", str(best)], f"the speedrun's best model ({stage.get('epochs_completed')} epochs)"
        return self.model_argv()[:2], "random init (no speedrun model): times the code path, not the target"

    def stage_autoattack(self, cap: float) -> dict[str, Any]:
        model_argv, model = self.autoattack_model()
        # the official standard AutoAttack takes an estimated 30-60 s on 500 points of a trained PreActResNet-18
        points = 8 if self.smoke else 500 if cap >= 150 else 300 if cap >= 80 else 150
        argv = [*model_argv, "--dataset", "cifar10", "--n-points", str(points), "--device", self.device, "--repeats", "1",
                "--versions", "fastrobust-auto-cl", "official", "fastrobust"]
        # the compiled copy (CUDA graphs on padded buckets) last, so that a stop at the cap keeps the others; not in
        # the CPU smoke run, where inductor's C++ build would take minutes
        argv += ["fastrobust-auto-cl-compile"] if not self.smoke else ["--warmup", "on"]
        argv += ["--data-root", self.data_root] if self.data_root else []
        record, partial, error, _lines = self.script("autoattack.py", argv, cap)
        if error and not record:
            raise RuntimeError(error)
        return {"n_points": points, "model": model, "record": record, "partial": partial,
                **({"child_error": error} if error else {})}

    def stage_precision(self, cap: float) -> dict[str, Any]:
        if self.smoke:
            argv = ["--device", "cpu", "--model", "tinycnn", "--model-param", "width=8", "--methods", "fast_trades",
                    "--seeds", "0", "--train-subset", "64", "--val-size", "32", "--test-subset", "32", "--epochs", "1",
                    "--batch-size", "32", "--aa-n", "8", "--aa-iters", "2", "--timing-rounds", "1", "--timing-block", "1"]
        else:
            argv = ["--device", self.device, "--model", "preactresnet18", "--methods", "fast_trades", "--seeds", "0",
                    "--train-subset", "10000", "--val-size", "500", "--test-subset", "1000", "--epochs", "3",
                    "--batch-size", "256", "--lr", "0.1", "--aa-n", "0", "--timing-rounds", "5"]
        argv += ["--timing-first"] + (["--data-root", self.data_root] if self.data_root else [])
        started = time.perf_counter()
        _record, _partial, error, lines = self.script("precision_study.py", argv, cap, progress_out=False)
        if error and not lines:
            raise RuntimeError(error)
        return {"records": [{k: v for k, v in r.items() if k not in ("raw", "command", "table")} for r in lines],
                "wall_seconds": time.perf_counter() - started, **({"child_error": error} if error else {})}

    def stage_epoch(self, cap: float) -> dict[str, Any]:
        steps, batch = (2, 32) if self.smoke else (100, 128)
        out = self.benchmark("epoch.py", ["--device", self.device, *self.model_argv(), "--batch-size", str(batch),
                                          "--methods", "backward_smoothing", "trades", "--train-subset", str(steps * batch),
                                          "--epochs", "2"] + (["--data-root", self.data_root] if self.data_root else []), cap)
        out["steps_per_epoch"] = steps
        return out

    def stage_natural(self, cap: float) -> dict[str, Any]:
        params = {**self.model_spec(), "device": self.device, "data_root": self.data_root, "batch": 32 if self.smoke else 512,
                  "warmup": 2 if self.smoke else 10, "steps": 3 if self.smoke else 50,
                  "compile_backend": "eager" if self.smoke else "inductor"}
        started = time.perf_counter()
        out, error = self.child("natural", params, timeout=cap)  # a compile can take minutes: a capped child
        out = out if isinstance(out, dict) else {}
        if error and not out:
            raise RuntimeError(error)
        return {**out, "wall_seconds": time.perf_counter() - started, **({"child_error": error} if error else {})}

    def stage_baseline(self, method: str, cap: float) -> dict[str, Any]:
        speedrun = self.record["stages"].get("speedrun", {})
        if speedrun.get("status") != "ok":
            raise SkipStage("the speedrun did not finish: no schedule to repeat")
        epochs = int(speedrun.get("epochs_completed") or 0)
        if epochs < 1:
            raise SkipStage("the speedrun finished no epoch")
        compile_ = bool((speedrun.get("planning") or {}).get("compile"))
        if not self.smoke:
            fit, planning = self.plan_epochs(method, cap - KILL_GRACE - EVAL_RESERVE, compile_)
            if fit < epochs:
                raise SkipStage(f"{epochs} epochs of {method} do not fit in {cap:.0f} s (about {fit} would: {planning})")
        return self.train_stage(method, cap, epochs=epochs, compile_=compile_,
                                planning={"epochs_from": "the speedrun's completed epochs", "compile": compile_})

    # -- the whole run -------------------------------------------------------------------------------------
    def run(self) -> int:
        saved = dict(os.environ)
        try:
            return self._run()
        finally:  # the suite sets FASTROBUST_CACHE for its children; a caller (a test) gets its environment back
            os.environ.clear()
            os.environ.update(saved)

    def _run(self) -> int:
        os.environ["FASTROBUST_CACHE"] = self.env["FASTROBUST_CACHE"]
        self.say(f"GPU suite: budget {self.budget:.0f} s, device {self.device}, out {self.out}, work {self.work}")
        env = self.stage("env", self.stage_env)  # env and data always run
        if env["status"] == "error" and not self.smoke:
            return self.finish(1)
        self.stage("data", self.stage_data)
        problem = self.cuda_info()
        if problem is not None:
            self.record["suite"]["stopped"] = problem
            self.say(problem)
            return self.finish(1)
        timed = {"canary": self.stage_canary, "cost": self.stage_cost, "speedrun": self.stage_speedrun,
                 "autoattack": self.stage_autoattack, "precision": self.stage_precision, "epoch": self.stage_epoch,
                 "natural": self.stage_natural}
        for name, function in timed.items():
            if name in self.stages:
                cap = self.cap(name)
                self.stage(name, functools.partial(function, cap), available=cap)
        if "baselines" in self.stages:  # fast_at gets half of the baselines' share, trades what is left
            cap = self.cap("baselines") / 2
            self.stage("fast_at", functools.partial(self.stage_baseline, "fast_at", cap), available=cap)
            cap = max(self.remaining(), 0.0)
            self.stage("trades", functools.partial(self.stage_baseline, "trades", cap), available=cap)
        return self.finish(0)

    def finish(self, code: int) -> int:
        env = self.record["stages"].get("env")
        if env and env.get("status") == "ok":
            env["nvidia_smi_after"] = nvidia_smi()
        self.save()
        table = markdown_summary(self.record)
        (self.out / "gpu_suite.md").write_text(table + "\n")
        self.say(f"done in {self.elapsed():.0f} s; records in {self.out / 'gpu_suite.json'}")
        print("\n" + table, flush=True)
        self.log.write("\n" + table + "\n")
        self.log.close()
        return code


# ---------------------------------------------------------------------------------------------- the table
def _fmt(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.{digits}f}%" if pct else f"{value:,.{digits}f}"


def _status(stage: dict[str, Any]) -> str:
    return f"{stage.get('status', 'not run')}: {stage.get('reason') or stage.get('error') or ''}".strip(": ")


def _partial(entry: dict[str, Any]) -> str:
    return " (partial: stopped at its cap)" if entry.get("partial") else ""


AA_LABELS = {"fastrobust-auto-cl": "fastrobust bf16 + channels_last", "fastrobust": "fastrobust fp32",
             "fastrobust-auto-cl-compile": "fastrobust bf16 + channels_last + compile (CUDA graphs)"}


GPU_ONLY_AA_VERSIONS = ("fastrobust-auto-cl-compile",)  # not run by --smoke (a CPU compile takes minutes)


def _aa_rows(stage: dict[str, Any], smoke: bool = False) -> list[tuple[str, str, str]]:
    """The official / fastrobust time ratio of each fastrobust version in autoattack.py's record (its
    ``summary``: each version's median seconds and robust count; ``comparisons``: the ratios). A smoke run has
    no row for the versions it does not run."""
    if stage.get("status") != "ok":
        return [("official vs fastrobust AutoAttack (autoattack.py)", _status(stage), ">= 5x")]
    record = stage.get("record") or {}
    summary = record.get("summary") or {}
    comparisons = summary.get("comparisons") or {}
    rows = []
    for version, label in AA_LABELS.items():
        if smoke and version in GPU_ONLY_AA_VERSIONS:
            continue
        what = f"AutoAttack official / {label} time (autoattack.py, n={stage.get('n_points', '-')})"
        target = ">= 5x" if version == "fastrobust-auto-cl" else ""
        ours = summary.get(version) or {}
        ratio = (comparisons.get(version) or {}).get("ratio_of_medians")
        if not ours:
            rows.append((what, "-" + _partial(stage), target))
        elif not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
            rows.append((what, f"no official run; {label} {_fmt(ours.get('median_s'), 1)} s, robust "
                               f"{ours.get('robust', '-')} points{_partial(stage)}", target))
        else:
            official = summary.get("official") or {}
            rows.append((what, f"{ratio:.2f}x (official {_fmt(official.get('median_s'), 1)} s, {label} "
                               f"{_fmt(ours.get('median_s'), 1)} s; robust {official.get('robust', '-')} vs "
                               f"{ours.get('robust', '-')} points){_partial(stage)}", target))
    return rows


def _precision_rows(stage: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The attack precision study's step-time ratio and the paired PGD-20 difference of the last epochs."""
    what = "attack precision in training (precision_study.py"
    if stage.get("status") != "ok":
        return [(f"{what})", _status(stage), "")]
    records = stage.get("records") or []
    timing = next((r for r in records if r.get("kind") == "timing"), {})
    runs = {r.get("attack_precision"): r for r in records if r.get("kind") == "run"}
    method = timing.get("method") or next(iter(runs.values()), {}).get("method", "-")
    medians = timing.get("median_step_seconds") or {}
    rows = [(f"{what}, {method}): step time, bf16 / fp32 attack",
             f"{_fmt((timing.get('ratio_to_fp32') or {}).get('bf16'))} (fp32 {_fmt(medians.get('fp32'), 4)} s, "
             f"bf16 {_fmt(medians.get('bf16'), 4)} s per step)", "")]
    fp32, bf16 = runs.get("fp32") or {}, runs.get("bf16") or {}
    if fp32 and bf16:
        diff = bf16["pgd20_acc_last"] - fp32["pgd20_acc_last"]
        value = f"{diff:+.3f} (fp32 {fp32['pgd20_acc_last']:.3f}, bf16 {bf16['pgd20_acc_last']:.3f}; n={fp32.get('n')})"
    else:
        value = f"- ({len(runs)} of 2 runs finished)"
    rows.append((f"{what}, {method}): PGD-20 of the last epoch, bf16 minus fp32 attack", value, "about 0"))
    return rows


def markdown_summary(record: dict[str, Any]) -> str:
    """The suite's results as one Markdown table, in the stages' order (the layout of docs/performance.md)."""
    stages = record.get("stages", {})
    env = stages.get("env", {})
    rows: list[tuple[str, str, str]] = []

    def add(what: str, value: str, target: str = "") -> None:
        rows.append((what, value, target))

    canary = stages.get("canary", {})
    if canary.get("status") == "ok":
        for row in canary.get("rows", []):
            value = (f"ok ({row['seconds']:.1f} s)" if row["status"] == "ok" else
                     f"{row['status']}: {row.get('error') or row.get('reason', '')}")
            add(f"canary: {row['feature']}", value, "ok")
    else:
        add("canary", _status(canary), "ok")
    cost = stages.get("cost", {})
    results = cost.get("results") or []
    if results:
        worst = max(results, key=lambda r: r["measured_over_declared"])
        add(f"max measured/declared step cost (cost.py){_partial(cost)}",
            f"{worst['measured_over_declared']:.2f} ({worst['method']})", "<= 1.15")
        by = {r["method"]: r for r in results}
        if "trades" in by and "backward_smoothing" in by:
            add("trades / backward_smoothing step time", f"{by['trades']['median_s'] / by['backward_smoothing']['median_s']:.2f}", ">= 2.7")
    else:
        add("cost.py", _status(cost) if cost.get("status") != "ok" else cost.get("child_error", "-"))
    for name in ("speedrun", "fast_at", "trades"):
        stage = stages.get(name, {})
        if name != "speedrun" and not stage:
            continue
        if stage.get("status") != "ok":
            add(name, _status(stage))
            continue
        evaluation = stage.get("evaluation") or {}
        attacks = evaluation.get("attacks") or {}
        epochs = stage.get("epoch_seconds") or []
        compiled = "compile on" if (stage.get("planning") or {}).get("compile") else "compile off"
        label = f"speedrun (backward_smoothing, {compiled})" if name == "speedrun" else f"{name}, same schedule ({compiled})"
        first = f"; first epoch {_fmt(epochs[0], 1)} s" if len(epochs) > 1 else ""
        add(f"{label}: epochs, time to a trained model", f"{stage.get('epochs_completed')} epochs, "
            f"{_fmt(stage.get('seconds_to_trained'), 0)} s ({_fmt(stage.get('train_seconds'), 0)} s of steps; "
            f"epoch {_fmt(min(epochs), 1) if epochs else '-'} s{first})", "< 12 s per epoch (BS)" if name == "speedrun" else "")
        add(f"{label}: clean / PGD-20 / AutoAttack-fast (n={evaluation.get('n', '-')})",
            f"{_fmt(evaluation.get('clean_acc'), 2, True)} / {_fmt((attacks.get('pgd20') or {}).get('robust_acc'), 2, True)} / "
            f"{_fmt((attacks.get('autoattack-fast') or {}).get('robust_acc'), 2, True)}")
        shipped = stage.get("as_shipped")
        if name == "speedrun" and shipped:
            add(f"speedrun as shipped ({shipped['epochs']} epochs), estimated from this run",
                f"{shipped['seconds']:.0f} s to a trained model (start-up {shipped['startup_seconds']:.0f} s, first-epoch "
                f"overhead {shipped['first_epoch_overhead_seconds']:.0f} s, {shipped['wall_seconds_per_epoch']:.1f} s per epoch)",
                "about 5 minutes")
    for row in _aa_rows(stages.get("autoattack", {}), smoke=bool((record.get("suite") or {}).get("smoke"))):
        add(*row)
    for row in _precision_rows(stages.get("precision", {})):
        add(*row)
    epoch = stages.get("epoch", {})
    for row in epoch.get("results") or []:
        add(f"fast path vs reference, {row['method']} (epoch.py, {epoch.get('steps_per_epoch', '?')} steps per epoch)"
            f"{_partial(epoch)}", f"{row['speedup']:.2f}x ({row['fast']['images_per_second']:,.0f} vs "
            f"{row['reference']['images_per_second']:,.0f} img/s)", ">= 3x")
    if not epoch.get("results"):
        add("fast path vs reference (epoch.py)", _status(epoch) if epoch.get("status") != "ok" else epoch.get("child_error", "-"))
    natural = stages.get("natural", {})
    for label, name in (("eager", "eager"), ("eager_ema", "eager + weight averaging"), ("compiled", "torch.compile")):
        entry = natural.get(label) or {}
        extra = f" (compile/warm-up {entry['warmup_seconds']:.0f} s)" if label == "compiled" and entry else ""
        value = _fmt(entry.get("images_per_second"), 0) + extra if entry else (
            _status(natural) if natural.get("status") != "ok" else natural.get("child_error", "-"))
        add(f"natural img/s, {natural.get('model', 'preactresnet18')} batch {natural.get('batch', 512)}, "
            f"{natural.get('amp', 'bf16')}, {name}", value, ">= 20,000" if label == "eager" else "")
    data = stages.get("data", {})
    add("CIFAR-10 decode (archive -> cache)", f"{_fmt(data.get('decode_seconds'), 1)} s on {data.get('cpu_count', '?')} cores")
    suite = record["suite"]
    head = (f"GPU suite: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')} (CUDA {env.get('cuda', '-')}), "
            f"commit {env.get('git_commit', '?')}, budget {suite['budget_seconds']:.0f} s, "
            f"elapsed {suite.get('elapsed_seconds', 0):.0f} s{' (SMOKE: CPU, tiny model)' if suite['smoke'] else ''}")
    lines = [head, "", "| measurement | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if suite.get("stopped"):
        lines += ["", f"Stopped: {suite['stopped']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET,
                        help=f"the whole suite ends inside this many seconds (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU, tiny model, synthetic data (a test)")
    parser.add_argument("--out", default="gpu-suite-out", help="folder for gpu_suite.json, gpu_suite.md and gpu_suite.log")
    parser.add_argument("--work-dir", default=None, help="runs, caches and child records (default: a new temp folder)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-root", default=None, help="where cifar10-jpeg/ lies (default $FASTROBUST_DATA)")
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=STAGES,
                        help="which stages after env and data, run in the order listed here (default: all but baselines)")
    parser.add_argument("--baselines", action="store_true",
                        help="also train fast_at and trades on the speedrun's schedule (give about 350 s more budget)")
    parser.add_argument("--speedrun-epochs", type=int, default=None,
                        help="N: train the speedrun N epochs; 0: the preset's own epochs (default: fit the stage's time)")
    parser.add_argument("--speedrun-compile", default="auto", choices=["auto", "on", "off"],
                        help="auto: the preset's own setting (on), unless the canary's compile failed")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        CHILDREN[args.child](json.loads(args.child_params), Path(args.child_out))
        return 0
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
