"""What a training run will cost on this machine, said before it starts: ``fastrobust train ... --plan``.

A short timed probe runs the method's real training step (model, method, optimiser, precision and memory format as
the trainer builds them) on random images of the dataset's shape, a few steps after warm-up, without loading the
data or creating a run folder. Its time per step, times the steps per epoch, gives the epoch; the validation
(PGD on the validation split) is estimated from the same step time through the passes it makes. The estimate is
the eager step: with ``compile`` the first epoch adds a compilation the probe does not measure.

The same probe warns before a preset sized for a GPU starts on a CPU (hours instead of minutes), naming the CPU
preset to use instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastrobust.core import precision
from fastrobust.data.datasets import SPECS
from fastrobust.errors import ConfigError
from fastrobust.models import create as create_model
from fastrobust.train.config import TrainConfig, autocast_settings, resolve_device
from fastrobust.train.optim import parameter_groups

# training images of each dataset's official train split (the validation split is carved from it)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "mnist": 60_000, "tiny-imagenet": 100_000}
GPU_SIZED_MODELS = ("preactresnet18", "resnet18", "resnet34", "resnet50", "wrn28_10", "wrn34_10", "wideresnet")
CPU_PRESETS = "speedrun-cpu (or quickstart)"
SLOW_STEP_SECONDS = 5.0  # a step slower than this is timed once: more would add minutes to a rough estimate


@dataclass(frozen=True)
class Plan:
    """A run's expected cost on this machine (seconds are estimates from a timed probe)."""

    device: str
    precision: str
    channels_last: bool
    compile: bool
    declared_passes: float  # the method's forward+backward passes per step (a forward alone counts 1/3)
    step_seconds: float
    steps_per_epoch: int
    epoch_seconds: float
    validation_seconds: float
    epochs: int
    timed_steps: int = 1  # fewer than asked when the steps were slow (SLOW_STEP_SECONDS)
    stopped_early: bool = False

    @property
    def total_seconds(self) -> float:
        return self.epochs * (self.epoch_seconds + self.validation_seconds)

    def lines(self) -> list[str]:
        """The plan as a person reads it."""
        compiled = " (the first epoch adds a compilation the probe does not measure)" if self.compile else ""
        return [
            f"device {self.device}; precision {self.precision}; channels_last {'on' if self.channels_last else 'off'};"
            f" compile {'on' if self.compile else 'off'}",
            f"method cost: {self.declared_passes:g} forward+backward passes per step (declared)",
            (f"probe: {self.step_seconds:.3g} s per step{self._timed_note()} -> {self.steps_per_epoch} steps, "
             f"about {duration(self.epoch_seconds)} per epoch + {duration(self.validation_seconds)} validation"),
            f"estimate: about {duration(self.total_seconds)} for {self.epochs} epochs on this machine{compiled}",
        ]


    def _timed_note(self) -> str:
        if not self.stopped_early:
            return ""
        return (f" (timed on {self.timed_steps} step{'s' if self.timed_steps > 1 else ''} only: steps over "
                f"{SLOW_STEP_SECONDS:g} s are not timed again)")


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def train_images(config: TrainConfig) -> int | None:
    """Images trained on per epoch: the train split less the validation split, or ``train_subset``."""
    if config.train_subset is not None:
        return config.train_subset
    total = TRAIN_IMAGES.get(config.dataset)
    return None if total is None else max(total - config.val_size, 0)


def probe(config: TrainConfig, *, warmup: int = 1, steps: int = 3,
          log: Callable[[str], None] | None = None) -> Plan:
    """Time ``steps`` training steps (after ``warmup``) of ``config`` on random images; see the module docstring.
    Once a timed step has taken over ``SLOW_STEP_SECONDS`` on average, no further step is timed: the plan says so.

    Args:
        config: the run's settings (validated here).
        warmup: untimed steps first (default 1: allocation, kernel choice).
        steps: timed steps at most (default 3).
        log: told one line before the first step (what is timed, on which device), as the probe can take
            minutes (a GPU-sized model on a CPU); default None: nothing said.

    Returns:
        The plan.

    Raises:
        ConfigError: a bad setting (as ``train`` would), or a dataset whose image shape is unknown (imagefolder).
    """
    config.validate()
    spec = SPECS.get(config.dataset)
    if spec is None or spec.image_shape is None or spec.num_classes is None:
        raise ConfigError(f"--plan needs a dataset of known image shape, not {config.dataset!r}: time a short run "
                          "instead (--epochs 1 --train-subset N)")
    device = resolve_device(config.device)
    autocast_dtype, _ = autocast_settings(config.amp, device)
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")
    channels, side, _ = spec.image_shape
    model = create_model(config.model, num_classes=spec.num_classes, in_channels=channels, image_size=side,
                         activation=config.activation, **config.model_params).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = config.build_method()
    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum)
    policy = precision.resolve(config.attack_precision, device.type, autocast_dtype)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.rand(config.batch_size, *spec.image_shape, generator=generator).to(device)
    y = torch.randint(0, spec.num_classes, (config.batch_size,), generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def step() -> None:  # as Trainer._step
        custom = getattr(method, "train_step", None)
        if custom is not None:  # methods that own several updates per batch (SPROUT)
            custom(model, x, y, optimizer, autocast=autocast, scaler=None)
            return
        with autocast(), precision.attack_precision(policy):
            loss, _ = method(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if log is not None:
        log(f"timing {steps} training step{'s' if steps != 1 else ''} (after {warmup} warm-up) of this config on "
            f"{device} ...")
    for _ in range(warmup):
        step()
    _synchronize(device)
    timed = 0
    start = time.perf_counter()
    while timed < steps:
        step()
        _synchronize(device)
        timed += 1
        if (time.perf_counter() - start) / timed > SLOW_STEP_SECONDS:
            break
    step_seconds = (time.perf_counter() - start) / timed
    images = train_images(config)
    steps_per_epoch = math.ceil(images / config.batch_size) if images else 0
    passes = method.cost.passes
    # validation: clean + PGD-k on val_size images, each pass costing what a step's passes cost per image
    per_image_pass = step_seconds / max(passes, 1e-9) / config.batch_size
    validation = config.val_size * (config.val_pgd_steps + 1) * per_image_pass if config.val_size else 0.0
    name = str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else "fp32"
    return Plan(device=str(device), precision=name, channels_last=channels_last, compile=config.compile,
                declared_passes=passes, step_seconds=step_seconds, steps_per_epoch=steps_per_epoch,
                epoch_seconds=steps_per_epoch * step_seconds, validation_seconds=validation, epochs=config.epochs,
                timed_steps=timed, stopped_early=timed < steps)


def gpu_preset_on_cpu(config: TrainConfig, preset: str | None) -> bool:
    """Whether ``config`` (from ``preset``) is a GPU-sized run about to start on a CPU: a residual network on
    a whole dataset with no CPU device asked for by name is hours of CPU time."""
    return (preset is not None and config.model.lower() in GPU_SIZED_MODELS and config.train_subset is None
            and resolve_device(config.device).type == "cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_runs(configs: list[dict[str, Any]]) -> dict[int, float | None]:
    """Estimated training seconds of each run config (``TrainConfig`` fields as a dict), keyed by ``id`` of the
    dict: one probe per distinct setting (runs that differ only in seed or output folder share it); None where no
    probe can run (a dataset of unknown shape)."""
    probes: dict[str, Plan | None] = {}
    out: dict[int, float | None] = {}
    for fields in configs:
        key = json.dumps({k: v for k, v in fields.items() if k not in ("seed", "out")}, sort_keys=True, default=str)
        if key not in probes:
            try:
                probes[key] = probe(TrainConfig(**fields), warmup=1, steps=1)
            except ConfigError:
                probes[key] = None
        plan = probes[key]
        out[id(fields)] = None if plan is None else plan.total_seconds
    return out
