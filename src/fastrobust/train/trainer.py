"""The training loop. It knows no method by name: it asks a method for a loss and steps the optimiser.

``train(TrainConfig(...))`` builds data, model and method, trains with per-step learning rates,
validates clean and PGD accuracy after every epoch on a split carved from the training set (never
the test split), keeps ``best`` (by validation robust accuracy) and ``last``, writes resumable
checkpoints, and ends with the test clean and PGD-20 accuracy of ``best`` in ``result.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from fastrobust.core import distributed as dist_lib
from fastrobust.core import precision
from fastrobust.core.compiling import compile_model
from fastrobust.core.filekind import looks_like
from fastrobust.core.files import atomic_write_json
from fastrobust.core.records import append_jsonl, environment
from fastrobust.data import DeviceLoader, load_dataset
from fastrobust.errors import ConfigError, FastRobustError, StopRequested, TrainingStopped
from fastrobust.evaluate import pgd_accuracy
from fastrobust.models import create as create_model
from fastrobust.models.checkpoint import load_model, read_model_file, save_model
from fastrobust.train import averaging, run_folder
from fastrobust.train import state as training_state
from fastrobust.train import user_modules as user_model
from fastrobust.train.config import (
    NEEDS_VALIDATION,
    TrainConfig,
    autocast_settings,
    collapse_overrides,
    recorded_data_root,
    resolve_device,
    split_sizes_note,
)
from fastrobust.train.console import epoch_line, is_terminal
from fastrobust.train.optim import parameter_groups
from fastrobust.train.run_folder import check_can_write, check_folder_writable, check_resume_epochs, default_out
from fastrobust.train.schedules import lr_schedule

LONG_STEP_SECONDS = 2.0  # after a step this long, a Ctrl-C is acknowledged at once (the stop waits for the step)
STOPPING = ("SIGINT received: stopping after this step and saving a checkpoint; Ctrl-C again to stop at once "
            "without one")


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (only in the main thread). A first
    SIGINT while steps are long (the last one took over LONG_STEP_SECONDS) is acknowledged at once with one line
    to ``announce``, since the stop itself waits for the step to end."""

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.signal: int | None = None
        self.step_seconds: float | None = None  # the wall time of the last step; None before the first ends
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        long_steps = self.step_seconds is not None and self.step_seconds > LONG_STEP_SECONDS
        if signum == signal.SIGINT and long_steps and self._announce is not None:
            self._announce(STOPPING)

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if (self.signal == signal.SIGINT and isinstance(exc, Exception) and not isinstance(exc, FastRobustError)):
            # a Ctrl-C at a terminal reaches the whole process group: a child the step was waiting on (the C++
            # compiler of torch.compile, or torch's probe for one) died of it, and the step failed of that death
            # in whatever words it uses ("no working C++ compiler"): the user stopped the run
            raise KeyboardInterrupt from exc


def _to_stderr(line: str) -> None:
    """One line on stderr from a signal handler: a write the signal interrupted may hold the stream's lock."""
    try:
        print(line, file=sys.stderr, flush=True)
    except RuntimeError:  # reentrant call inside the buffered stderr
        os.write(2, (line + "\n").encode())


class Trainer:
    """The state of one run; ``fit()`` trains to the end (or to a requested stop)."""

    # ------------ assembly: data, model, method, optimiser, run folder (every setting checked before the folder)
    def __init__(self, config: TrainConfig, *, dataset: Any = None, progress: bool = True,
                 log: Callable[[str], None] = print, resume: bool = False, model: nn.Module | None = None) -> None:
        """``resume``: continue the run in ``config.out`` from its newest checkpoint. Otherwise ``config.out``
        must hold no other run (ConfigError, ``fastrobust.train.run_folder``): nothing saved there is touched.
        Every setting is checked, the data loaded and the model and method built before the folder is made."""
        user_model.adopt_config(config, model, resume=resume)  # model=: config.model becomes "module"
        self.config = config.validate()
        load_root = config.data_root  # None: $FASTROBUST_DATA, else the default cache (downloaded there once)
        if dataset is None and config.data_root is None and config.dataset != "imagefolder":
            # recorded resolved whatever supplied it, so that a resume (or evaluation) reads the same data
            config.data_root = recorded_data_root()
        self.dist = dist_lib.setup(config.device)  # one process unless torchrun started several
        self.log = log if self.dist.is_main else (lambda _message: None)
        self.progress = progress and self.dist.is_main
        self.device = dist_lib.local_device(resolve_device(config.device), self.dist)
        self.out = Path(config.out or default_out(config))
        if self.dist.active:  # every rank uses rank 0's folder name (default_out holds a timestamp)
            self.out = Path(dist_lib.broadcast_object(str(self.out)))
        self.config.out = str(self.out)
        if not resume and self.dist.restart_count > 0:  # torchrun --max-restarts: continue where the job died
            resume = dist_lib.on_main(lambda: any((self.out / "checkpoints").glob("step-*")), self.dist)
            if resume:
                self.log(f"torchrun restart {self.dist.restart_count}: resuming {self.out} from its last checkpoint")
        self.resumed = resume
        defaults = asdict(TrainConfig())
        self._folder_use = None if resume else dist_lib.on_main(  # only rank 0 reads and writes the folder
            lambda: run_folder.check(self.out, asdict(self.config), defaults), self.dist)
        dist_lib.on_main(lambda: check_can_write(self.out), self.dist)
        self.autocast_dtype, needs_scaler = autocast_settings(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if needs_scaler else None
        self.attack_policy = precision.resolve(config.attack_precision, self.device.type, self.autocast_dtype)
        self.channels_last = config.channels_last == "on" or (config.channels_last == "auto" and self.device.type == "cuda")

        torch.manual_seed(config.seed)
        self.data = dataset if dataset is not None else load_dataset(
            config.dataset, load_root, val_size=config.val_size,
            train_subset=config.train_subset, test_subset=config.test_subset,
        )
        split_note = split_sizes_note(len(self.data.train.labels), len(self.data.val.labels))
        if split_note is not None:
            self.log(split_note)
        channels, height, _ = self.data.image_shape
        model_kwargs = dict(config.model_params)
        model_kwargs.setdefault("activation", config.activation)
        if model is not None:  # the user's module, trained as it is (it sees pixels in [0, 1])
            self.model = user_model.checked(model, self.data).to(self.device)
        else:
            self.model = create_model(
                config.model, num_classes=self.data.num_classes, in_channels=channels,
                mean=list(self.data.mean), std=list(self.data.std), image_size=height, **model_kwargs,
            ).to(self.device)
        self.model_source = user_model.source(self.model, config.model, given=model is not None)
        if config.sync_bn and self.dist.active:
            self.model = dist_lib.convert_sync_batchnorm(self.model, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.grad_sync: dist_lib.GradientSync | None = None
        if self.dist.active:  # same start on every rank, then a random stream of its own (docs/distributed.md)
            dist_lib.broadcast_module(self.model)
            self.grad_sync = dist_lib.GradientSync(self.model, buffers=not config.sync_bn)
            torch.manual_seed(dist_lib.rank_seed(config.seed, self.dist.rank))
        self._agreed_stop: int | None = None
        self.averager = averaging.WeightAverager.from_config(config, self.model)  # None without averaging
        self.forward_model: nn.Module = compile_model(self.model, self.log) if config.compile else self.model
        self.method = config.build_method()
        if self.grad_sync is not None:  # parameters the method owns (SPROUT's u) follow the global batch too
            self.method.gradient_reduce = self.grad_sync.all_reduce
        for note in collapse_overrides(config, self.method):
            self.log(note)
        steps_note = config.method_settings()[1]
        if steps_note is not None:
            self.log(steps_note)
        if getattr(self.method, "needs_validation", False) and len(self.data.val.labels) == 0:
            raise ConfigError(NEEDS_VALIDATION.format(method=config.method) + " (the dataset given has no val split)")
        check_model = getattr(self.method, "check_model", None)  # settings that name parts of the model (SLAT)
        if check_model is not None:
            check_model(self.model)
        self.optimizer = torch.optim.SGD(
            parameter_groups(self.model, config.weight_decay, decay_norm_and_bias=config.decay_norm_and_bias),
            lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov,
            **({"fused": True} if self.device.type == "cuda" else {"foreach": True}),
        )
        rest = len(self.data.train.labels) % config.batch_size  # drop a last batch that leaves a rank one image
        self.loader = DeviceLoader(
            self.data.train, config.batch_size, device=self.device, shuffle=True,
            crop_padding=self.data.crop_padding, flip=self.data.flip,
            drop_last=0 < rest < 2 * self.dist.world_size, seed=config.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        if len(self.loader) == 0:
            raise ConfigError(f"batch_size={config.batch_size} leaves no batch of {len(self.data.train.labels)} training images")
        self.schedule = lr_schedule(config.schedule, config.lr, config.epochs, **config.schedule_params)
        self.lr_scale = 1.0
        self.epoch = 0
        self.batch = 0
        self.global_step = 0
        self.best: dict[str, Any] = {"epoch": None, "metric": config.selection_metric, "value": -1.0}
        self.peak_val_robust = -1.0  # the best validation robust accuracy so far: the collapse reference
        self.train_seconds = 0.0
        self.overhead_seconds = {"validation": 0.0, "saving": 0.0}  # after the epochs: validation; models, checkpoints
        self.last_good: training_state.Snapshot | None = None
        collapse_action = getattr(self.method, "collapse_action", None) or config.on_collapse
        # the in-memory copy of the last good state is read only by a NaN rollback or a collapse restore
        self.keeps_last_good = config.on_nan == "rollback" or collapse_action == "restore"
        self.partial: dict[str, Any] | None = None  # the sums of the epoch's batches before a mid-epoch checkpoint
        self.data_fingerprint = training_state.data_fingerprint(self.data)
        if resume:
            self._resume()
        self._created_out = dist_lib.on_main(self._make_folder, self.dist)

    def _make_folder(self) -> bool:
        """Make (or, to restart the same run's checkpoint-less start, clear) the run folder now that every
        setting is checked; returns whether this run created it."""
        created = not self.out.exists()
        if self._folder_use == run_folder.RESTART:
            run_folder.clear(self.out)
            self.log(f"{self.out}: restarting a run of the same settings that never reached a checkpoint")
        check_folder_writable(self.out)
        return created

    # ---- the loop ----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------ one step: the method's loss, the backward and the optimiser
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        progress = self.epoch + self.batch / len(self.loader)
        lr = self.schedule(progress) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.grad_sync is not None:  # this rank's share of the global batch weights its gradient
            global_size = min(self.loader.batch_size, self.loader.num_samples - self.batch * self.loader.batch_size)
            self.grad_sync.weight = y.shape[0] / global_size
        custom_step = getattr(self.method, "train_step", None)
        if custom_step is not None:  # methods that own several updates per batch (SPROUT)
            return custom_step(self.forward_model, x, y, self.optimizer, autocast=self._autocast, scaler=self.scaler)[1]
        with self._autocast(), precision.attack_precision(self.attack_policy):
            loss, stats = self.method(self.forward_model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return stats

    # ------------ one epoch: the steps, the NaN check every few steps, a requested stop agreed across ranks
    def _train_epoch(self, stop: _StopFlag) -> dict[str, float]:

        self.model.train()
        # the batches before a mid-epoch checkpoint count once: rank 0 starts from their (global) sums
        carried, self.partial = self.partial, None
        sums: dict[str, Any] = {key: (value if self.dist.is_main else 0.0) for key, value in (carried or {}).get("sums", {}).items()}
        seen = int((carried or {}).get("images", 0)) if self.dist.is_main else 0
        self._running = {"sums": sums, "seen": seen}
        fresh = 0  # images of this call (for images/s)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        batches = self.loader.epoch(self.epoch, start_batch=self.batch)
        bar = tqdm(batches, total=len(self.loader), initial=self.batch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not (self.progress and is_terminal(sys.stderr)), leave=False, unit="batch",
                   dynamic_ncols=True)
        start = time.perf_counter()
        last = time.perf_counter()
        for x, y in bar:
            stats = self._step(x, y)
            now = time.perf_counter()
            stop.step_seconds, last = now - last, now  # the time between steps: all of a step, on any device
            if self.averager is not None:
                self.averager.update(self.model, self.epoch)
            size = y.shape[0]
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + value.detach().float() * size
            nonfinite |= ~torch.isfinite(stats["loss"])
            seen += size
            fresh += size
            self._running["seen"] = seen
            self.batch += 1
            self.global_step += 1
            if self.global_step % self.config.nan_check_every == 0 and self._agree(nonfinite):
                raise _NonFinite()
            if not bar.disable and self.global_step % 20 == 0:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(sums['loss']) / seen:.3f}", img_s=f"{fresh / max(elapsed, 1e-9):.0f}")
            if self.config.checkpoint_every and self.global_step % self.config.checkpoint_every == 0 and self.batch < len(self.loader):
                if self._agree(bool(nonfinite) or not self._weights_finite()):  # never checkpoint NaN/Inf weights
                    raise _NonFinite()
                self.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.save_checkpoint()
            if self._stop_signal(stop, sync=self.global_step % 10 == 0) is not None:
                break
        bar.close()
        if self._agree(bool(nonfinite) or not self._weights_finite()):
            raise _NonFinite()
        self.train_seconds += time.perf_counter() - start
        if self.dist.active:  # the epoch's means over the global batch
            keys = sorted(sums)
            totals = dist_lib.sum_counts([float(sums[k]) for k in keys] + [float(seen)], device=self.device)
            sums, seen = dict(zip(keys, totals[:-1])), int(totals[-1])
        return {f"train_{k}": float(v) / max(seen, 1) for k, v in sums.items()} | {"train_images": seen}

    def _agree(self, flag: bool | torch.Tensor) -> bool:
        """``flag`` true on any rank (every rank calls this at the same step); ``bool(flag)`` with one process."""
        return dist_lib.any_rank(flag, self.device) if self.dist.active else bool(flag)

    def _stop_signal(self, stop: "_StopFlag", *, sync: bool) -> int | None:
        """The signal that stops the run. With several ranks all must stop at the same step: they agree on
        it (one tiny all-reduce) only at ``sync`` points (every 10 steps and at epoch ends)."""
        if not self.dist.active:
            return stop.signal
        if sync and self._agreed_stop is None and dist_lib.any_rank(stop.signal is not None, self.device):
            self._agreed_stop = stop.signal or signal.SIGTERM
        return self._agreed_stop

    def _weights_finite(self) -> bool:
        """Whether every floating-point parameter and buffer is finite (one sync; before any checkpoint)."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    # ------------ validation and the choice of best (never on the test split)
    def _validate_epoch(self) -> dict[str, Any]:
        """The validation of the epoch just trained, as ``validate_every`` and ``validate_models`` ask (the last
        epoch is always validated); {} when it is skipped. ``val_seconds``: the time it took."""
        config = self.config
        epoch = self.epoch + 1
        if len(self.data.val.labels) == 0 or (epoch % config.validate_every and epoch != config.epochs):
            return {}
        start = time.perf_counter()
        record: dict[str, Any] = {}
        if config.validate_models != "averaged" or self.averager is None:
            record.update(self.validate())
        if config.validate_models != "trained":
            record.update(self._validate_averaged())
        seconds = time.perf_counter() - start
        self.overhead_seconds["validation"] += seconds
        return {**record, "val_seconds": seconds}

    def validate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Clean and PGD accuracy on the validation split of ``model`` (default: the trained model)."""
        if len(self.data.val.labels) == 0:
            return {}
        if model is None and self.grad_sync is not None:
            self.grad_sync.broadcast_buffers()
        result = pgd_accuracy(
            model if model is not None else self.model, self.data.val.images, self.data.val.labels, eps=self.config.attack_eps,
            steps=self.config.val_pgd_steps, step_size=self.config.eval_step_size,  # None: eps's rule
            batch_size=self.config.eval_batch_size, device=self.device, distributed=self.dist.active,
        )
        return {"val_clean_acc": result["clean_acc"], "val_robust_acc": result["robust_acc"]}

    def _validate_averaged(self) -> dict[str, float]:
        """The averaged model's validation metrics (``ema_val_*``), once averaging has started."""
        if self.averager is None or not self.averager.started:
            return {}
        if self.dist.active:
            dist_lib.broadcast_module(self.averager.module)
        return {averaging.PREFIX + key: value for key, value in self.validate(self.averager.module).items()}

    def _update_best(self, record: dict[str, Any]) -> tuple[bool, str]:
        """Make this epoch ``best`` (and write ``best.safetensors``) when its validation beats the best so far.
        An epoch that was not validated (``validate_every``) is ``best`` only until the first validation, so a
        run stopped before it still has its latest weights there; without a validation split every epoch is.
        Returns (whether it became best, which weights competed: "model" or "averaged")."""
        metric = self.config.selection_metric
        weights, value = averaging.best_candidate(record, metric, self.config.ema_select, self.averager)
        if "collapse" in record:
            return False, weights
        provisional = self.best["epoch"] is None or self.best["value"] < 0  # no validated best yet
        if len(self.data.val.labels) == 0:
            new_best = True
        else:
            new_best = provisional or (value is not None and value > self.best["value"])
        if new_best:
            self.best = {"epoch": self.epoch, "metric": metric, "value": -1.0 if value is None else value,
                         **({"weights": weights} if self.averager is not None else {}),
                         "val": {key: record[key] for key in _VAL_KEYS if key in record}}
            if self.dist.is_main:
                chosen = self.model if weights == "model" else self.averager.module
                save_model(chosen, self.out / "best.safetensors",
                           {"epoch": self.epoch, "run": str(self.out), "weights": weights})
        return new_best, weights

    # ------------ checkpoints and resume
    # ---- checkpoints -------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step, "best": self.best,
            "peak_val_robust": self.peak_val_robust,
            "lr_scale": self.lr_scale, "train_seconds": self.train_seconds, "config": asdict(self.config),
            "overhead_seconds": dict(self.overhead_seconds),
            "world_size": self.dist.world_size, "model_source": self.model_source,
            "data_fingerprint": self.data_fingerprint, "partial_epoch": self.partial if self.batch else None,
        }

    def _method_state(self) -> dict[str, torch.Tensor]:
        return self.method.state_dict()

    def _capture(self, info: dict[str, Any] | None = None) -> training_state.Snapshot:
        """Everything needed to continue from here, the averaged model's state included."""
        averaged = None
        if self.averager is not None:
            if self.dist.active:  # buffers may differ across ranks: keep rank 0's, as for the model
                dist_lib.broadcast_module(self.averager.module)
            averaged = self.averager.state_dict()
        return training_state.capture(self.model, self.optimizer, self._method_state(), self.device,
                                      self._info() if info is None else info, averaged)

    def _restore_averaged(self, snapshot: training_state.Snapshot) -> None:
        if self.averager is not None:
            self.averager.load_state_dict(snapshot.averaged)

    def save_checkpoint(self) -> Path | None:
        """Every rank calls it; rank 0 writes the global state plus each rank's random state (returns None elsewhere)."""
        if self.grad_sync is not None:
            self.grad_sync.broadcast_buffers()
        if self.batch:  # mid-epoch: the sums of the epoch so far go with it (metrics.jsonl covers the whole epoch)
            self.partial = self._partial_totals()
        snapshot = self._capture()
        if self.dist.active:
            states = dist_lib.gather_objects(snapshot.rng)
            snapshot.rng = {**states[0], **{f"rng/rank{r}/{key[len('rng/'):]}": value.clone()
                                             for r, state in enumerate(states) for key, value in state.items()}}
            if not self.dist.is_main:
                return None
        return training_state.write(self.out, snapshot, self.model)

    def _partial_totals(self) -> dict[str, Any]:
        """The epoch so far over every rank: stat sums, images and seconds (JSON-able, for a checkpoint)."""
        sums, keys = self._running["sums"], sorted(self._running["sums"])
        totals = [float(sums[key]) for key in keys] + [float(self._running["seen"])]
        if self.dist.active:
            totals = dist_lib.sum_counts(totals, device=self.device)
        return {"sums": dict(zip(keys, totals[:-1])), "images": int(totals[-1]),
                "seconds": self._epoch_before + time.perf_counter() - self._epoch_start}

    def _rank_rng(self, snapshot: training_state.Snapshot) -> dict[str, torch.Tensor] | None:
        """This rank's saved random state, or None when the checkpoint was written by another number of ranks."""
        saved_world = int(snapshot.info.get("world_size", 1))
        if saved_world != self.dist.world_size:
            return None
        if saved_world == 1:
            return snapshot.rng
        prefix = f"rng/rank{self.dist.rank}/"
        return {f"rng/{key[len(prefix):]}": value for key, value in snapshot.rng.items() if key.startswith(prefix)}

    def _resume(self) -> None:
        snapshot = dist_lib.on_main(lambda: training_state.load_latest(self.out, warn=self.log), self.dist)
        user_model.check_resume(self.out, snapshot, self.model, self.model_source)
        training_state.restore(snapshot, self.model, self.optimizer, self.device, rng=False)
        rng = self._rank_rng(snapshot)
        if rng is not None:
            training_state.set_rng_state(rng, self.device)
        else:  # weights, optimiser, data order exact; the methods' random draws start a new stream
            torch.manual_seed(dist_lib.rank_seed(self.config.seed, self.dist.rank, snapshot.info["global_step"]))
            self.log(f"the checkpoint was written by {snapshot.info.get('world_size', 1)} rank(s), this run has "
                     f"{self.dist.world_size}: random streams reseeded (weights, optimiser and data order are exact)")
        self.method.load_state_dict({k: v.to(self.device) for k, v in snapshot.method.items()})
        self._restore_averaged(snapshot)
        info = snapshot.info
        saved_data = info.get("data_fingerprint")  # absent in checkpoints written before it was recorded
        if saved_data is not None and saved_data != self.data_fingerprint:
            raise FastRobustError(
                f"the {self.data.name} data loaded now ({self.data.source}) is not the data {self.out} was trained on "
                f"(data fingerprint {self.data_fingerprint}, the checkpoint's {saved_data}): give --data-root the "
                "folder that holds the run's data")
        check_resume_epochs(self.out, self.config.epochs, trained=info["epoch"])
        self.epoch, self.batch, self.global_step = info["epoch"], info["batch"], info["global_step"]
        self.partial = info.get("partial_epoch") if self.batch else None
        if self.dist.is_main:  # epochs after the checkpoint are trained again: their old lines go
            dropped = run_folder.keep_epochs_through(self.out / "metrics.jsonl", self.epoch)
            if dropped:
                self.log(f"metrics.jsonl: dropped {dropped} line(s) after epoch {self.epoch} (trained again from the checkpoint)")
        self.best, self.lr_scale, self.train_seconds = info["best"], info["lr_scale"], info["train_seconds"]
        self.peak_val_robust = info["peak_val_robust"]
        self.overhead_seconds.update(info.get("overhead_seconds") or {})  # absent in checkpoints of older versions
        self.last_good = self._capture(info) if self.keeps_last_good else None
        self.log(f"resumed {self.out} at epoch {self.epoch + 1}, batch {self.batch} (from {snapshot.path.name})")

    def _save_epoch_models(self, *, latest: bool) -> None:
        """With ``latest`` (the epochs that checkpoint): ``last.safetensors`` and ``averaged.safetensors`` (the
        trained and averaged models now); and, with ``save_epoch_models`` N, the trained weights of every N-th
        epoch as ``epochs/epoch-NNN.safetensors`` (for per-epoch analyses)."""
        meta = {"epoch": self.epoch, "run": str(self.out)}
        if latest:
            save_model(self.model, self.out / "last.safetensors", meta)
        if latest and self.averager is not None and self.averager.started:
            save_model(self.averager.module, self.out / "averaged.safetensors", {**meta, "weights": "averaged",
                       "ema_decay": self.averager.decay, "ema_updates": self.averager.updates})
        every = self.config.save_epoch_models
        if every and self.epoch % every == 0:
            (self.out / "epochs").mkdir(exist_ok=True)
            save_model(self.model, self.out / "epochs" / f"epoch-{self.epoch:03d}.safetensors", meta)

    # ------------ failures: NaN rollback, catastrophic overfitting
    def _restore_last_good(self) -> None:
        assert self.last_good is not None
        training_state.restore(self.last_good, self.model, self.optimizer, self.device, rng=False)
        self.method.load_state_dict({k: v.to(self.device) for k, v in self.last_good.method.items()})
        self._restore_averaged(self.last_good)

    def _handle_nonfinite(self, rollbacks: int) -> int:
        where = f"epoch {self.epoch + 1}, batch {self.batch}"
        if self.config.on_nan == "stop" or rollbacks >= 3:
            saved = (f"the last good checkpoint is intact in {self.out}" if any((self.out / "checkpoints").glob("step-*"))
                     else "no checkpoint had been written yet")
            if rollbacks >= 3:
                raise TrainingStopped(f"the loss became NaN or Inf at {where} again after {rollbacks} rollbacks "
                                      f"(learning rate x{self.lr_scale:g}); {saved}. Lower --lr or try --amp off")
            raise TrainingStopped(f"the loss became NaN or Inf at {where}; {saved}. "
                                  "Lower --lr, try --amp off, or use --on-nan rollback")
        assert self.last_good is not None
        self._restore_last_good()
        self.epoch, self.batch = self.last_good.info["epoch"], self.last_good.info["batch"]
        self.partial = self.last_good.info.get("partial_epoch") if self.batch else None
        self.global_step = self.last_good.info["global_step"]
        self.lr_scale *= 0.5
        self.log(f"the loss became NaN or Inf at {where}: rolled back to epoch {self.epoch} with lr x{self.lr_scale:g}")
        if self.dist.is_main:
            append_jsonl(self.out / "metrics.jsonl", {"event": "nan_rollback", "at": where, "lr_scale": self.lr_scale})
        return rollbacks + 1

    def _handle_collapse(self, record: dict[str, Any]) -> None:
        """Catastrophic overfitting: validation robust accuracy falling far below its best."""
        margin = getattr(self.method, "collapse_margin", self.config.collapse_margin)
        action = getattr(self.method, "collapse_action", None) or self.config.on_collapse
        best = self.peak_val_robust
        if "val_robust_acc" not in record or best < 0 or record["val_robust_acc"] >= best - margin:
            return
        record["collapse"] = {"best": best, "now": record["val_robust_acc"], "margin": margin, "action": action}
        message = (f"epoch {self.epoch + 1}: validation robust accuracy collapsed from {best:.3f} to "
                   f"{record['val_robust_acc']:.3f} (catastrophic overfitting)")
        if action == "stop":
            raise TrainingStopped(f"{message}; stopped. best model kept in {self.out}/best.safetensors")
        if action == "restore" and self.last_good is not None:
            self._restore_last_good()
            after = getattr(self.method, "after_restore", None)
            if after is not None:
                after()
            record["collapse"]["restored_to_epoch"] = self.last_good.info["epoch"]
            self.log(f"{message}; restored the weights of epoch {self.last_good.info['epoch']}")
        else:
            self.log(f"{message}; continuing (use --on-collapse restore or stop)")

    # ------------ the loop, and the end: test accuracy of best and the result record
    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs`` (or to a requested stop: TrainingStopped), then ``finish()``. A new run
        that fails on a setting before its first checkpoint leaves no half-made run folder behind. With
        ``config.deterministic`` torch runs deterministic kernels only, from the first step to the end of the
        final evaluation (the previous settings come back after)."""
        try:
            with precision.deterministic_algorithms(self.config.deterministic):
                return self._fit()
        except ConfigError:
            if not self.resumed and self.dist.is_main:
                run_folder.undo_start(self.out, created=self._created_out)
            raise

    def _fit(self) -> dict[str, Any]:
        config = self.config
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
        if self.last_good is None and self.keeps_last_good:
            self.last_good = self._capture()
        rollbacks = 0
        with _StopFlag(_to_stderr if self.dist.is_main else None) as stop:
            while self.epoch < config.epochs:
                method_info = self.method.start_epoch(self.epoch)
                self._epoch_start = time.perf_counter()
                self._epoch_before = float((self.partial or {}).get("seconds", 0.0))  # before a mid-epoch checkpoint
                try:
                    train_metrics = self._train_epoch(stop)
                except _NonFinite:
                    rollbacks = self._handle_nonfinite(rollbacks)
                    continue
                stopping = self._stop_signal(stop, sync=True)
                if stopping is not None and self.batch < len(self.loader):
                    self.save_checkpoint()
                    name = signal.Signals(stopping).name
                    raise StopRequested(
                        f"{name} received: stopped at epoch {self.epoch + 1}, batch {self.batch}; checkpoint saved. "
                        f"Resume with: fastrobust train --resume {self.out}"
                    )
                epoch_seconds = self._epoch_before + time.perf_counter() - self._epoch_start
                lr_end = self.optimizer.param_groups[0]["lr"]  # the lr of the epoch's last step
                record: dict[str, Any] = {"epoch": self.epoch + 1, "lr_start": self.schedule(self.epoch) * self.lr_scale,
                                          "lr_end": lr_end, "lr": lr_end, **train_metrics}  # lr: = lr_end (older readers)
                record.update(self._validate_epoch())
                record.update(epoch_seconds=epoch_seconds, images_per_second=train_metrics["train_images"] / epoch_seconds)
                if method_info:
                    record["method"] = method_info
                if self.dist.active:  # every rank decides best/collapse from rank 0's record
                    record = dist_lib.broadcast_object(record)
                self._handle_collapse(record)
                self.epoch += 1
                self.batch = 0
                self.partial = None
                saving_start = time.perf_counter()
                new_best, weights = self._update_best(record)
                checked = "val_seconds" in record or len(self.data.val.labels) == 0  # validated (or nothing to)
                if "collapse" not in record and checked:
                    self.peak_val_robust = max(self.peak_val_robust, record.get("val_robust_acc", -1.0))
                    if self.keeps_last_good:
                        self.last_good = self._capture()
                checkpointing = (self.epoch % config.checkpoint_every_epochs == 0 or self.epoch == config.epochs
                                 or self._stop_signal(stop, sync=True) is not None)
                if self.dist.is_main:
                    self._save_epoch_models(latest=checkpointing)
                if self.dist.is_main:  # before the checkpoint: a resume drops lines after its epoch, never lacks one
                    append_jsonl(self.out / "metrics.jsonl", record)
                if checkpointing:
                    self.save_checkpoint()
                self.overhead_seconds["saving"] += time.perf_counter() - saving_start
                if self.progress:
                    self.log(epoch_line(record, best=weights if new_best else None,
                                         averaged=self.averager is not None))
                if self._stop_signal(stop, sync=True) is not None:
                    if not checkpointing:  # the signal came while this epoch's records were written
                        self.save_checkpoint()
                    raise StopRequested(f"stopped after epoch {self.epoch}; checkpoint saved. Resume with: fastrobust train --resume {self.out}")
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Evaluate ``best`` on the test split (clean and PGD-20) and write ``result.json``."""

        if self.model_source["source"] == "module":  # a copy of the user's module with the best weights
            best_model = user_model.best_copy(self.model, self.out / "best.safetensors", self.dist, self.device)
        elif self.dist.active:  # rank 0 reads best.safetensors (other machines may not see the folder)

            state, model_config, _ = dist_lib.on_main(lambda: read_model_file(self.out / "best.safetensors"), self.dist)
            best_model = create_model(**model_config)
            best_model.load_state_dict(state)
            best_model = best_model.to(self.device).eval()
        else:
            best_model, _ = load_model(self.out / "best.safetensors", device=self.device)
        test = pgd_accuracy(
            best_model, self.data.test.images, self.data.test.labels, eps=self.config.attack_eps,
            steps=self.config.test_pgd_steps, step_size=self.config.eval_step_size,
            batch_size=self.config.eval_batch_size, device=self.device, distributed=self.dist.active,
        )
        result = {
            "config": asdict(self.config),
            "model_source": self.model_source,
            "seed": self.config.seed,
            "method_cost_passes": self.method.cost.passes,
            "method_config": asdict(self.method.config),  # every parameter as used: defaults, eps, scaled steps
            "environment": environment(self.device),
            "dataset": {"name": self.data.name, "source": self.data.source, "train": len(self.data.train.labels),
                        "val": len(self.data.val.labels), "test": len(self.data.test.labels)},
            "train_seconds": self.train_seconds,
            # after the epochs: validation, and writing models and checkpoints (validate_every, checkpoint_every_epochs)
            "epoch_overhead_seconds": dict(self.overhead_seconds),
            "best_epoch": self.best["epoch"],
            "best_selected_by": self.best["metric"],
            "best_val_value": self.best["value"],
            "best_weights": self.best.get("weights", "model"),
            "best_val": self.best.get("val", {}),  # the validation accuracies of the best epoch (ema_: averaged)
            "peak_val_robust_acc": self.peak_val_robust,
            "test": {"clean_acc": test["clean_acc"], f"pgd{self.config.test_pgd_steps}_acc": test["robust_acc"],
                     "n": test["n"], "eps": self.config.attack_eps, "step_size": test["step_size"]},
        }
        if self.dist.active:
            result["world_size"] = self.dist.world_size
        if self.dist.is_main:
            atomic_write_json(self.out / "result.json", result)
        return result


class _NonFinite(Exception):
    pass


_VAL_KEYS = ("val_clean_acc", "val_robust_acc", averaging.PREFIX + "val_clean_acc", averaging.PREFIX + "val_robust_acc")


def check_new_run_folder(config: TrainConfig) -> None:
    """Make the refusals ``Trainer(config)`` makes about ``config.out`` (a bad setting, another run in the folder,
    a folder that cannot be written) without loading data or building anything: for a caller about to do
    something slow first (the command line's time probe of a GPU preset on a CPU). Reads only; ``config`` is
    not changed.

    Args:
        config: the new run's settings; ``out`` None (a new timestamped folder) checks the settings only.

    Raises:
        ConfigError: a bad setting, or ``config.out`` holds another run (``fastrobust.train.run_folder.check``).
        FastRobustError: ``config.out`` cannot be created and written, or its disk is nearly full.
    """
    recorded = copy.deepcopy(config).validate()  # what Trainer records in config.json, checked against the folder's
    if recorded.out is None:
        return
    if recorded.data_root is None and recorded.dataset != "imagefolder":
        recorded.data_root = recorded_data_root()
    run_folder.check(Path(recorded.out), asdict(recorded), asdict(TrainConfig()))
    check_can_write(Path(recorded.out))


def train(config: TrainConfig, *, dataset: Any = None, progress: bool = True,
          log: Callable[[str], None] = print, model: nn.Module | None = None) -> dict[str, Any]:
    """Train a model as ``config`` says and return the result record (also in ``RUN/result.json``).

    Builds data, model and method, trains with per-step learning rates, validates clean and PGD accuracy on a
    split carved from the training set, keeps ``best`` and ``last``, writes resumable checkpoints, and ends with
    the test clean and PGD accuracy of ``best``. Every setting is checked, the data loaded and the model and
    method built before the run folder is made.

    ``model``: train this ``nn.Module`` (pixels in [0, 1] -> logits; trained in place) instead of building
    ``config.model`` from the registry; ``config.model`` then reads ``"module"`` (docs/models.md).
    ``config.out`` must not hold another run (ConfigError): ``resume(out)`` continues one.

    Args:
        config: the run's ``TrainConfig`` (validated here).
        dataset: a loaded dataset to train on instead of ``config.dataset`` (default None).
        progress: show progress bars (default True; rank 0 only).
        log: where progress lines go (default ``print``).
        model: a module to train instead of ``config.model`` (default None).
    Returns:
        The result record (a dict): ``config``, ``test`` (``clean_acc``, ``pgd{N}_acc``, ``n``, ``eps``,
        ``step_size``), ``best_epoch``, ``best_val``, ``train_seconds``, the environment and more.
    Raises:
        ConfigError: a bad setting (``TrainConfig.validate``) or an ``out`` folder holding another run; the message
            names the fix.
        TrainingStopped: training ended early on purpose (signal, NaN, collapse); the message says how to continue.
    Example:
        >>> result = train(TrainConfig(method="fast_at", epochs=30, out="runs/fast"))
    """
    return Trainer(config, dataset=dataset, progress=progress, log=log, model=model).fit()


RESUME_OVERRIDES = ("epochs", "device", "data_root")  # what a resumed run may change: nothing of its result


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run folder was started with (its ``config.json``); FastRobustError when it has none or
    the file is damaged."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FastRobustError(f"{run_dir} is not a fastrobust run folder (no config.json)")
    try:
        saved = json.loads(config_file.read_text())
    except ValueError as error:  # UnicodeDecodeError too

        kind = looks_like(config_file)
        raise FastRobustError(f"{config_file} is damaged or not a fastrobust config "
                              f"({f'it looks like {kind}' if kind else error}); "
                              "restore it from a checkpoint's state.json 'config' or start a new run") from None
    if not isinstance(saved, dict):
        raise FastRobustError(f"{config_file} is damaged or not a fastrobust config (not a mapping); "
                              "restore it from a checkpoint's state.json 'config' or start a new run")
    return saved


def resume(run_dir: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
           dataset: Any = None, overrides: dict[str, Any] | None = None,
           model: nn.Module | None = None) -> dict[str, Any]:
    """Continue a run from its newest intact checkpoint (same data order and random streams).

    ``overrides`` may only hold what does not change the run (``RESUME_OVERRIDES``): ``epochs`` (train longer;
    not fewer than already trained), ``device`` and ``data_root`` (the same data in another place: the data
    fingerprint in the checkpoint must match). Anything else is a ConfigError: start a new run for it.
    A run that trained a module passed as ``train(config, model=...)`` needs the same module again (``model``).
    Under torchrun, rank 0 reads the run folder and every rank gets its config; the checkpoint may come from
    any number of ranks (docs/distributed.md says what is exact).

    Args:
        run_dir: the run folder (holding ``config.json`` and ``checkpoints/``).
        progress: show progress bars (default True).
        log: where progress lines go (default ``print``).
        dataset: a loaded dataset instead of the recorded one (default None).
        overrides: ``epochs``, ``device`` and/or ``data_root`` (default None).
        model: the module a ``train(config, model=...)`` run trained (default None).
    Returns:
        The result record, as ``train`` returns it.
    Raises:
        ConfigError: an override outside ``RESUME_OVERRIDES``, or fewer ``epochs`` than already trained; start a
            new run instead.
        FastRobustError: ``run_dir`` has no or a damaged ``config.json``, or the data is not the run's; the message
            names the fix.
        TrainingStopped: training ended early on purpose (signal, NaN, collapse).
    Example:
        >>> result = resume("runs/fast", overrides={"epochs": 40})
    """
    run_dir = Path(run_dir)
    changing = sorted(set(overrides or {}) - set(RESUME_OVERRIDES))
    if changing:
        raise ConfigError(f"resume continues {run_dir}'s own settings; {', '.join(changing)} cannot change them: "
                          f"start a new run (only {', '.join(RESUME_OVERRIDES)} apply to a resumed run)")
    config_file = run_dir / "config.json"
    ctx = dist_lib.setup((overrides or {}).get("device", "auto"))
    saved = dist_lib.on_main(lambda: read_run_config(run_dir), ctx)
    try:
        saved.update(overrides or {})
        saved["out"] = str(run_dir)
        config = TrainConfig(**saved)
    except (ValueError, TypeError, AttributeError) as error:  # damaged or hand-edited config.json
        raise FastRobustError(f"{config_file} is damaged or not a fastrobust config ({error}); "
                              "restore it from a checkpoint's state.json 'config' or start a new run") from None
    if "epochs" in (overrides or {}):  # before any data is found, loaded or downloaded
        dist_lib.on_main(lambda: check_resume_epochs(run_dir, config.epochs), ctx)
    return Trainer(config, dataset=dataset, progress=progress, log=log, resume=True, model=model).fit()
