"""The configuration of a training run: every setting, checked once where the config is built
(``TrainConfig.validate``), so the training loop carries no checks; and the device and precision it resolves to."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastrobust import methods as methods_lib
from fastrobust.core import precision
from fastrobust.core.contract import check_device
from fastrobust.core.values import check_eps, check_nonnegative_int, check_positive_int, pixel_text
from fastrobust.data import resolve_root
from fastrobust.errors import ConfigError
from fastrobust.methods.step_scaling import scale_steps
from fastrobust.train import averaging
from fastrobust.train.schedules import SCHEDULES, lr_schedule

AMP_MODES = ("auto", "off", "bf16", "fp16")
VALIDATE_MODELS = ("both", "trained", "averaged")
NAN_ACTIONS = ("stop", "rollback")
COLLAPSE_ACTIONS = ("warn", "stop", "restore")


NEEDS_VALIDATION = ("method {method} needs a validation split (its PGD check after every epoch triggers the fallback) "
                     "but val_size=0 leaves none, so it would silently train fast_at: set val_size > 0 (default 1000)")


def collapse_overrides(config: TrainConfig, method: methods_lib.Method) -> list[str]:
    """One line per collapse setting of ``config`` that ``method`` overrides with its own (Fast AT+)."""
    notes = []
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    action = getattr(method, "collapse_action", None)
    if action is not None and config.on_collapse not in (action, defaults["on_collapse"]):
        notes.append(f"on_collapse={config.on_collapse!r} is not used: {method.name} always does {action!r} "
                     "(restore the last good weights, then its PGD fallback)")
    margin = getattr(method, "collapse_margin", None)
    if margin is not None and config.collapse_margin not in (margin, defaults["collapse_margin"]):
        notes.append(f"collapse_margin={config.collapse_margin:g} is not used: {method.name} uses its own "
                     f"method.collapse_margin={margin:g} (set it with --set method.collapse_margin=...)")
    return notes


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint and result record.

    Every setting is checked once, with the reason and the fix, by ``validate()`` (``train`` calls it before any
    work), so the training loop carries no checks. The inline comments on the fields say the rest.

    Args:
        method: the training method's registered name (default ``"backward_smoothing"``, Chen et al.,
            "Efficient Robust Training via Backward Smoothing").
        method_params: the method's own parameters (default {}); step sizes not given scale with ``eps``
            (``methods.step_scaling``).
        model: the registry's architecture name (default ``"preactresnet18"``).
        model_params: extra keyword arguments of the model (default {}).
        activation: the model's activation (default ``"relu"``; ``model_params`` may override it).
        dataset: the dataset name (default ``"cifar10"``).
        data_root: where the data lives (default None: ``$FASTROBUST_DATA``, else ``~/.cache/fastrobust/data``);
            stored resolved.
        val_size: validation images carved from the training set, never the test split (default 1000; 0: none).
        train_subset, test_subset: use only this many training / test images (default None: all).
        eps: the budget in [0, 1] pixel units (text such as ``"8/255"`` is parsed); overrides the method's eps and
            the evaluation eps when given (default None: the method's, else 8/255).
        epochs, batch_size: training length and batch (defaults 100 and 128).
        lr, momentum, weight_decay, decay_norm_and_bias, nesterov: SGD (defaults 0.1, 0.9 in [0, 1), 5e-4, True,
            False).
        schedule, schedule_params: the learning-rate schedule, ``piecewise`` (default: x0.1 at 50% and 75% of the
            training, the Backward Smoothing paper's epochs 50 and 75 of 100), ``cyclic``, ``cosine`` or
            ``constant`` (``schedules.lr_schedule``).
        seed: the random seed (default 0).
        device: ``"auto"`` (default: CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: ``"auto"`` (default: bf16 on a CUDA GPU that supports it, else off), ``"off"``, ``"bf16"`` or
            ``"fp16"`` (with a grad scaler on CUDA).
        attack_precision: ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        channels_last: ``"auto"`` (default: on CUDA), ``"on"`` or ``"off"``.
        compile: train through ``torch.compile(model)`` (default False).
        deterministic, sync_bn: booleans (default False).
        val_pgd_steps, test_pgd_steps: PGD steps of validation and of the final test (defaults 10 and 20).
        eval_step_size, eval_batch_size: the evaluation attacks' step (default None) and batch (default 512).
        checkpoint_every, checkpoint_every_epochs: checkpoint cadence in steps and epochs (defaults 0 and 1).
        validate_every, validate_models: validation cadence in epochs (default 1) and which models (``both``,
            ``trained`` or ``averaged``; default ``both``).
        nan_check_every: check the loss for NaN/Inf every N steps (default 50).
        on_nan: ``"stop"`` (default) or ``"rollback"`` (to the last good state, learning rate halved; at most 3).
        on_collapse: on catastrophic overfitting (validation robust accuracy more than ``collapse_margin`` below its
            best): ``"warn"`` (default), ``"stop"`` or ``"restore"``.
        collapse_margin: that accuracy drop, in (0, 1] (default 0.1).
        select_by: ``"auto"`` (default), ``"robust"`` or ``"clean"``.
        ema_decay, ema_start_epoch, ema_select: weight averaging (defaults 0.0 = off, 0, ``"averaged"``).
        save_epoch_models: default 0 (never).
        out: the run folder (default None: a new timestamped folder, ``default_out``).
    Raises:
        ConfigError: from ``validate()``: a value out of range or not among its choices, two disagreeing budgets
            (``eps`` and ``method_params["eps"]``), or a validation plan that leaves out what a decision reads; the
            message names the setting and the fix.
    Example:
        >>> config = TrainConfig(method="fast_at", epochs=30, eps=8 / 255, out="runs/fast")
        >>> result = train(config)
    """

    method: str = "backward_smoothing"
    method_params: dict[str, Any] = field(default_factory=dict)
    model: str = "preactresnet18"
    model_params: dict[str, Any] = field(default_factory=dict)
    activation: str = "relu"
    dataset: str = "cifar10"
    data_root: str | None = None
    val_size: int = 1000
    train_subset: int | None = None
    test_subset: int | None = None
    eps: float | None = None  # overrides the method's eps and the evaluation eps when given
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # never on activation parameters (SmoothReLU's b): fastrobust.train.optim
    decay_norm_and_bias: bool = True  # false: no weight decay on BatchNorm parameters and biases either
    nesterov: bool = False
    schedule: str = "piecewise"
    schedule_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"peak": 0.5}; see schedules.lr_schedule
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    attack_precision: str = "auto"  # the attacks' precision inside a step (fastrobust.core.precision)
    channels_last: str = "auto"
    compile: bool = False
    deterministic: bool = False  # deterministic kernels only (fastrobust.core.precision.deterministic_algorithms)
    sync_bn: bool = False  # with several ranks (torchrun): BatchNorm statistics over the global batch (GPUs only)
    val_pgd_steps: int = 10
    test_pgd_steps: int = 20
    eval_step_size: float | None = None  # None: evaluate's rule for the attack's eps (default_step; 2/255 at 8/255)
    eval_batch_size: int = 512
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    checkpoint_every_epochs: int = 1  # epoch-end checkpoint, last and averaged weights: every N-th and the last epoch
    validate_every: int = 1  # validate after every N-th epoch and the last (best is chosen among validated epochs)
    validate_models: str = "both"  # with weight averaging, which are validated: both, trained or averaged
    nan_check_every: int = 50
    on_nan: str = "stop"
    on_collapse: str = "warn"
    collapse_margin: float = 0.1
    select_by: str = "auto"  # the validation metric that picks `best`: robust, clean, or auto (clean for natural)
    ema_decay: float = 0.0  # weight averaging (fastrobust.train.averaging): EMA decay per optimiser step; 0 = off
    ema_start_epoch: int = 0  # the average starts at the beginning of this epoch (0-based; 0 = first step)
    ema_select: str = "averaged"  # the weights `best` is chosen from: averaged, model or either
    save_epoch_models: int = 0  # also keep the weights of every N-th epoch in RUN/epochs/ (0 = never)
    out: str | None = None

    def validate(self) -> "TrainConfig":
        """Reject bad values before any work starts, each with the reason and the fix."""
        methods_lib.method_class(self.method)
        # stored resolved, so a resume (or an evaluation) from another working directory finds the data
        self.data_root = str(Path(self.data_root).expanduser().resolve()) if self.data_root not in (None, "") else None
        if self.eps is not None:
            self.eps = check_eps(self.eps)
        if self.eval_step_size is not None:
            self.eval_step_size = check_eps(self.eval_step_size, name="eval_step_size")
        for name in ("epochs", "batch_size", "eval_batch_size", "nan_check_every", "checkpoint_every_epochs",
                     "validate_every"):
            setattr(self, name, check_positive_int(getattr(self, name), name=name))
        for name in ("val_size", "checkpoint_every", "val_pgd_steps", "test_pgd_steps", "seed", "save_epoch_models"):
            setattr(self, name, check_nonnegative_int(getattr(self, name), name=name))
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                setattr(self, name, check_positive_int(getattr(self, name), name=name))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} must be a positive number")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be zero or positive")
        choices = {"schedule": SCHEDULES, "amp": AMP_MODES, "attack_precision": precision.ATTACK_PRECISIONS,
                   "on_nan": NAN_ACTIONS,
                   "on_collapse": COLLAPSE_ACTIONS, "channels_last": ("auto", "on", "off"),
                   "select_by": ("auto", "robust", "clean"), "validate_models": VALIDATE_MODELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        averaging.check_settings(self.ema_decay, self.ema_start_epoch, self.ema_select)
        if self.ema_decay and isinstance(self.epochs, int) and self.ema_start_epoch >= self.epochs:
            raise ConfigError(f"ema_start_epoch={self.ema_start_epoch} starts after the last epoch (0-based: at "
                              f"most {self.epochs - 1} with epochs={self.epochs}): no averaged model would ever be "
                              "made; start it earlier (or set ema_decay=0 for no averaging)")
        for name in ("sync_bn", "decay_norm_and_bias", "compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        lr_schedule(self.schedule, self.lr, self.epochs, **self.schedule_params)  # checks the schedule's parameters
        if not 0 < self.collapse_margin <= 1:
            raise ConfigError(f"collapse_margin={self.collapse_margin} must be in (0, 1] (an accuracy drop)")
        if self.eps is not None and "eps" in self.method_params:  # two budgets: which one was meant?
            given = check_eps(self.method_params["eps"], name="method eps")
            if abs(given - self.eps) > 1e-9:
                raise ConfigError(
                    f"eps {pixel_text(self.eps)} (--eps / eps) and the method's eps {pixel_text(given)} (--set "
                    "method.eps / method_params) disagree: give the budget once (--eps sets the method's too)")
        self.build_method()  # validates the method's own parameters
        if self.val_size == 0 and getattr(methods_lib.method_class(self.method), "needs_validation", False):
            raise ConfigError(NEEDS_VALIDATION.format(method=self.method))
        self._check_validation_plan()
        return self

    def _check_validation_plan(self) -> None:
        """The validation cadence and models must give every decision that reads validation its numbers: the
        choice of ``best`` (``ema_select``), collapse detection and methods that act on it (Fast AT+)."""
        averaging_on = bool(self.ema_decay)
        if self.validate_models == "averaged" and not averaging_on:
            raise ConfigError("validate_models=averaged validates the averaged model, but ema_decay=0 makes none: "
                              "set ema_decay (e.g. 0.99) or validate_models=both")
        if averaging_on and self.validate_models != "both":
            needed = {"averaged": ("averaged",), "model": ("trained",),
                      "either": ("trained", "averaged")}[self.ema_select]
            if self.validate_models not in needed or len(needed) > 1:
                raise ConfigError(
                    f"validate_models={self.validate_models} leaves out what ema_select={self.ema_select} picks best "
                    f"from ({' and '.join(needed)} weights): set validate_models="
                    f"{'both' if len(needed) > 1 else needed[0]} or ema_select="
                    f"{'model' if self.validate_models == 'trained' else 'averaged'}")
        method = methods_lib.method_class(self.method)
        every_epoch = self.validate_every == 1 and self.validate_models != "averaged"
        if getattr(method, "needs_validation", False) and not every_epoch:
            raise ConfigError(f"method {self.method} checks the trained model's validation after every epoch (its "
                              f"fallback follows a collapse): it needs validate_every=1 (given {self.validate_every}) "
                              f"and validate_models=both or trained (given {self.validate_models})")
        if self.validate_models == "averaged" and self.on_collapse != "warn":
            raise ConfigError(f"on_collapse={self.on_collapse} watches the trained model's validation, which "
                              "validate_models=averaged skips: set validate_models=both or on_collapse=warn")

    def method_settings(self) -> tuple[dict[str, Any], str | None]:
        """The method's parameters as the run uses them -- ``eps`` overriding the method's, and the step sizes
        not given scaled with it by each method's published rule (``methods.step_scaling``) -- and the line
        that says which step sizes are used (None when nothing is scaled)."""
        params = dict(self.method_params)
        if self.eps is not None and "eps" in {f.name for f in dataclasses.fields(methods_lib.method_class(self.method).Config)}:
            params["eps"] = self.eps
        return scale_steps(self.method, params)

    def build_method(self) -> methods_lib.Method:
        return methods_lib.create(self.method, **self.method_settings()[0])

    @property
    def selection_metric(self) -> str:
        """The validation accuracy that picks ``best``: natural training is chosen on clean accuracy
        (its robust accuracy is noise near zero and would pick an untrained early epoch)."""
        if self.select_by == "auto":
            return "val_clean_acc" if self.method == "natural" else "val_robust_acc"
        return f"val_{self.select_by}_acc"

    @property
    def attack_eps(self) -> float:
        """The eps of validation and test attacks: the run's eps, else the method's, else 8/255."""
        if self.eps is not None:
            return self.eps
        return float(getattr(self.build_method().config, "eps", 8 / 255))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(name, where=None, fix="--device cpu", names="auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: accepted by torch, not trainable here
        raise ConfigError(f"device={name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def autocast_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a grad scaler is needed)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "off":
        return None, False
    if amp == "fp16":
        return torch.float16, device.type == "cuda"
    return torch.bfloat16, False


def recorded_data_root() -> str:
    """The absolute data root a run without ``data_root`` reads (``$FASTROBUST_DATA``, else
    ``~/.cache/fastrobust/data``; ``fastrobust.data.resolve_root``), as its config.json records it."""
    return str(resolve_root(None).expanduser().resolve())


def split_sizes_note(train: int, val: int) -> str | None:
    """One warning line when the validation split (``val`` images) is larger than the training set (``train``
    images): each epoch's validation PGD then costs more than the training it checks (e.g. train_subset=100
    with the default val_size=1000); None otherwise."""
    if val <= train:
        return None
    return (f"warning: the validation split ({val} images, val_size) is larger than the training set ({train} "
            f"images, train_subset): each epoch validates more than it trains; give --val-size {max(1, train // 5)} "
            "or so, or a larger --train-subset")
