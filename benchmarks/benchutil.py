"""Shared pieces of the speed benchmarks: the environment record, timers, and the fast training step.

The fast step mirrors ``fastrobust.train.Trainer._step`` piece by piece (per-step learning rate,
channels_last input, autocast and the attacks' precision around the method call, ``zero_grad(set_to_none=True)``,
backward, optimiser step, or ``method.train_step`` when the method owns its updates) and builds the optimiser
exactly as the trainer does (fused SGD on CUDA, foreach SGD on CPU). Nothing in it reads a value back to the host.
Every benchmark that times a step also takes a ``--progress-out FILE``: one JSON line per measured unit
(round, run, method) as soon as it is measured, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fastrobust import methods as methods_lib
from fastrobust.core import precision
from fastrobust.models import create as create_model
from fastrobust.core.records import append_jsonl, environment
from fastrobust.train import resolve_device
from fastrobust.train.config import autocast_settings

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


# ---- environment ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def hardware(device: torch.device) -> dict[str, Any]:
    """Everything a timing depends on besides the code: device, CPU, threads and the machine's load."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15": load_average(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def base_record(kind: str, device: torch.device, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "benchmark": kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "environment": environment(device),
        "hardware": hardware(device),
    }


def write_record(path: str | None, record: dict[str, Any]) -> None:
    if path:
        append_jsonl(path, record)
        print(f"appended the record to {path}")


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


# ---- timing --------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time on CPU; CUDA events on the GPU (read after one synchronize at the end)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start: Any = None
        self._stop: Any = None

    def start(self) -> "Stopwatch":
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._stop = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def stop(self) -> "Stopwatch":
        if self.device.type == "cuda":
            self._stop.record()
        else:
            self._stop = time.perf_counter()
        return self

    def seconds(self) -> float:
        if self.device.type == "cuda":
            self._stop.synchronize()
            return self._start.elapsed_time(self._stop) / 1000.0
        return self._stop - self._start


def median(values: list[float]) -> float:
    return statistics.median(values)


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# ---- model, optimiser, step ----------------------------------------------------------------
def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["width=32", "dropout=0.1"]`` -> ``{"width": 32, "dropout": 0.1}`` (ints, floats, else strings)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-param {item!r}: expected NAME=VALUE, e.g. width=32")
        for cast in (int, float):
            try:
                params[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key] = value
    return params


def build_model(name: str, params: dict[str, Any], device: torch.device, *, channels_last: bool,
                num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD),
                         image_size=32, **params).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: nn.Module, device: torch.device, lr: float = 0.1) -> torch.optim.Optimizer:
    """The trainer's optimiser: SGD momentum 0.9, weight decay 5e-4, fused on CUDA, foreach on CPU."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                           **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    dtype, needs_scaler = autocast_settings(amp, device)
    if needs_scaler:
        raise SystemExit("--amp fp16 needs a grad scaler; the benchmarks time bf16 or fp32 (use --amp bf16/off)")
    return dtype


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    def make() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)
    return make


def fast_step(method: methods_lib.Method, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
              dtype: torch.dtype | None, channels_last: bool, lr: float = 0.1,
              attack_policy: precision.AttackPrecision | None = None) -> Callable[[torch.Tensor, torch.Tensor], dict]:
    """One training step as ``Trainer._step`` does it (no host synchronisation).

    Args:
        method: the training method (its ``train_step`` is used when it owns its updates, as the trainer does).
        model: the model called by the method (a ``torch.compile`` wrapper is fine).
        optimizer: the optimiser (``build_optimizer``).
        device: where the batches are.
        dtype: the autocast dtype of the training forward (None: float32).
        channels_last: whether batches are converted to channels_last first.
        lr: the learning rate set before every step.
        attack_policy: the precision of the attacks inside the step; None: the trainer's default
            ``attack_precision="auto"`` for ``device`` and ``dtype`` (``fastrobust.core.precision.resolve``).

    Returns:
        ``step(x, y) -> stats``.
    """
    autocast = autocast_factory(device, dtype)
    custom = getattr(method, "train_step", None)
    policy = attack_policy if attack_policy is not None else precision.resolve("auto", device.type, dtype)

    def step(x: torch.Tensor, y: torch.Tensor) -> dict:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if custom is not None:  # the trainer calls it without an attack-precision block, and so do we
            return custom(model, x, y, optimizer, autocast=autocast, scaler=None)[1]
        with autocast(), precision.attack_precision(policy):
            loss, stats = method(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return stats

    return step


def write_progress(path: str | None, record: dict[str, Any]) -> None:
    """Append ``record`` to the progress file ``path`` (nothing when None): one line per measured unit, written
    the moment it is measured (flushed), so that a run stopped at a time limit keeps what it measured."""
    if path:
        append_jsonl(path, record)


def resolve(device_name: str) -> torch.device:
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # the trainer leaves cuDNN at its default; so do we
    return device
