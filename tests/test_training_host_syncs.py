"""No host synchronisation in a training step (review C2, C3; docs/performance.md).

What makes the host wait for a GPU, counted on the CPU:
- ``aten._local_scalar_dense``: what ``.item()``, ``bool()``, ``float()`` of a tensor and data-dependent
  indexing call (a read-back);
- host-to-device copies: ``aten._to_copy`` / ``aten.copy_`` from a CPU tensor to another device (blocking on
  CUDA). On a CPU run every tensor is on the CPU, so these are counted on ``device="meta"``, which stands in
  for cuda wherever nothing needs real values;
- ``torch.tensor(data, device=...)``: builds a tensor from host data on a device (a copy on CUDA that a
  dispatch mode does not see: it runs below the mode), counted by wrapping ``torch.tensor``.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from fastrobust import methods
from fastrobust.train import Trainer, TrainConfig
from fastrobust.train.averaging import WeightAverager

from helpers import synthetic_dataset

QUIET = dict(progress=False, log=lambda _: None)


class HostSyncs(TorchDispatchMode):
    """Counts read-backs (``aten._local_scalar_dense``) and host-to-device copies inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.uploads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        elif _uploads(func, args, kwargs):
            self.uploads += 1
        return func(*args, **kwargs)


def _uploads(func, args, kwargs) -> bool:
    """Whether an op copies a CPU tensor to another device."""
    if func is torch.ops.aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
    elif func is torch.ops.aten.copy_.default:
        source, target = args[1], args[0].device
    else:
        return False
    return source.device.type == "cpu" and target is not None and torch.device(target).type != "cpu"


@contextlib.contextmanager
def counting_tensor_uploads(monkeypatch):
    """Counts ``torch.tensor(..., device=D)`` calls (an upload when D is a GPU); yields the running list."""
    calls: list[object] = []
    real = torch.tensor

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            calls.append(kwargs["device"])
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "tensor", tensor)
        yield calls


# ----------------------------------------------------------------------------- weight averaging (C2)
def test_averager_update_copies_nothing_to_the_device_and_reads_nothing_back():
    """torch's AveragedModel uploaded its CPU counter once per dtype group per update (2 per step)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("meta")  # meta stands in for cuda
    averager = WeightAverager(model, decay=0.9)
    with HostSyncs() as counts:
        for _ in range(3):
            averager.update(model, 0)
    assert (counts.uploads, counts.reads) == (0, 0)
    assert averager.updates == 3 and averager.module[0].weight.device.type == "meta"


def test_averager_keeps_torchs_numbers():
    """The float tensors equal AveragedModel(get_ema_multi_avg_fn) bit for bit; the int counter is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ours = WeightAverager(model, decay=0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(4):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        model.train()
        model(torch.rand(2, 3, 6, 6))
        ours.update(model, 0)
        torchs.update_parameters(model)
    mine, reference = ours.state_dict(), torchs.state_dict()
    assert mine.keys() == reference.keys()  # checkpoints of either load into the other
    floats = [key for key, value in reference.items() if value.is_floating_point()]
    assert len(floats) == 6 and all(torch.equal(mine[key], reference[key]) for key in floats)
    assert int(mine["n_averaged"]) == 4
    assert torch.equal(mine["module.1.num_batches_tracked"], model[1].num_batches_tracked)


# ----------------------------------------------------------------------------- SPROUT (C3)
def test_sprout_builds_no_tensor_from_host_data_per_augmentation(monkeypatch):
    """noisy_mixup built Beta's concentration with torch.tensor(alpha, device=...) for every augmentation."""
    torch.manual_seed(0)
    method = methods.create("sprout", n_aug=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    method.train_step(model, x, y, optimizer)  # creates u
    with counting_tensor_uploads(monkeypatch) as uploads, HostSyncs() as counts:
        method.train_step(model, x, y, optimizer)
    assert (len(uploads), counts.reads) == (0, 0)


# ----------------------------------------------------------------------------- the trainer's step
@pytest.mark.parametrize("method", ["natural", "fast_at", "trades", "backward_smoothing", "slat", "sprout"])
def test_training_step_with_averaging_reads_nothing_back(tmp_path, monkeypatch, one_thread, method):
    """A whole step (the method, the optimiser, the weight average) makes no read-back: the trainer reads its
    device-side NaN flag only every ``nan_check_every`` steps (docs/performance.md)."""
    config = TrainConfig(method=method, model="tinycnn", model_params={"width": 4}, dataset="synthetic", epochs=1,
                         batch_size=32, lr=0.05, val_pgd_steps=1, test_pgd_steps=1, device="cpu", ema_decay=0.9,
                         nan_check_every=1000, out=str(tmp_path / "run"))
    if method == "trades":
        config.method_params = {"steps": 2}
    trainer = Trainer(config, dataset=synthetic_dataset(train=128), **QUIET)
    steps = {"count": 0, "reads": 0, "uploads": 0}
    original_step, original_update = Trainer._step, WeightAverager.update

    def counted(function):
        def run(*args, **kwargs):
            with HostSyncs() as counts, counting_tensor_uploads(monkeypatch) as uploads:
                result = function(*args, **kwargs)
            steps["reads"] += counts.reads
            steps["uploads"] += counts.uploads + len(uploads)
            return result
        return run

    def step(self, x, y):
        steps["count"] += 1
        return counted(original_step)(self, x, y)

    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(WeightAverager, "update", counted(original_update))
    trainer.model.train()
    trainer._running = {"sums": {}, "seen": 0}
    trainer._train_epoch(stop=SimpleNamespace(signal=None))
    assert steps["count"] == 4
    assert (steps["reads"], steps["uploads"]) == (0, 0), steps


def epoch_reads(tmp_path, name: str, nan_check_every: int) -> tuple[int, int]:
    """(read-backs, statistics) of one 4-step epoch of natural training with weight averaging."""
    config = TrainConfig(method="natural", model="tinycnn", model_params={"width": 4}, dataset="synthetic", epochs=1,
                         batch_size=32, lr=0.05, val_pgd_steps=1, test_pgd_steps=1, device="cpu", ema_decay=0.9,
                         nan_check_every=nan_check_every, out=str(tmp_path / name))
    trainer = Trainer(config, dataset=synthetic_dataset(train=128), **QUIET)
    trainer.model.train()
    with HostSyncs() as counts:
        trainer._train_epoch(stop=SimpleNamespace(signal=None))
    return counts.reads, len(trainer._running["sums"])


def test_an_epoch_reads_the_nan_flag_every_nan_check_every_steps_and_its_means_once(tmp_path, one_thread):
    """Per epoch: the NaN/Inf flag every nan_check_every steps, and at the end the flag, the weights' finiteness
    (one read) and the epoch's mean statistics (one read each); nothing per step."""
    rare, stats = epoch_reads(tmp_path, "rare", 1000)
    every_second, _ = epoch_reads(tmp_path, "every-second", 2)
    assert rare == 2 + stats and stats == 2  # natural: loss, acc
    assert every_second == rare + 2  # steps 2 and 4 of 4
