"""A resumed run's optimiser state keeps its parameters' memory layout (review A1).

On CUDA the trainer's model is channels_last and its SGD is fused; the fused kernel refuses momentum buffers
whose strides differ from their parameters'. A checkpoint stores tensors contiguous, so the restore must put
each state tensor back in its parameter's layout. The CPU shows the strides (its kernels do not check them).
"""

from __future__ import annotations

import torch

from fastrobust.train import Trainer, TrainConfig
from fastrobust.train import state as training_state

from helpers import synthetic_dataset

QUIET = dict(progress=False, log=lambda _: None)


def channels_last_config(tmp_path) -> TrainConfig:
    return TrainConfig(method="natural", model="tinycnn", model_params={"width": 4}, dataset="synthetic", epochs=1,
                       batch_size=64, lr=0.05, momentum=0.9, val_pgd_steps=1, test_pgd_steps=1, device="cpu",
                       channels_last="on", out=str(tmp_path / "run"))


def momentum_layouts(optimizer: torch.optim.Optimizer) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(parameter strides, momentum strides) for every parameter with a momentum buffer."""
    pairs = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                pairs.append((param.stride(), buffer.stride()))
    return pairs


def test_disk_round_trip_restores_momentum_in_each_parameters_layout(tmp_path, one_thread):
    """Train a step of a channels_last tinycnn, write the checkpoint, restore it into a fresh trainer."""
    torch.manual_seed(0)
    data = synthetic_dataset(train=64)
    trainer = Trainer(channels_last_config(tmp_path), dataset=data, **QUIET)
    x, y = next(iter(trainer.loader.epoch(0)))
    trainer.model.train()
    trainer._step(x, y)
    trainer.global_step = 1
    trainer.save_checkpoint()

    fresh = Trainer(channels_last_config(tmp_path / "fresh"), dataset=data, **QUIET)
    snapshot = training_state.load_latest(trainer.out)
    training_state.restore(snapshot, fresh.model, fresh.optimizer, fresh.device, rng=False)
    pairs = momentum_layouts(fresh.optimizer)
    four_d = [pair for pair, param in zip(pairs, fresh.model.parameters()) if param.dim() == 4]
    assert len(four_d) == 4 and any(p != tuple(sorted(p, reverse=True)) for p, _ in four_d)  # channels_last weights
    assert all(param == buffer for param, buffer in pairs), pairs
    original = [trainer.optimizer.state[p]["momentum_buffer"] for p in trainer.model.parameters()]
    restored = [fresh.optimizer.state[p]["momentum_buffer"] for p in fresh.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(original, restored, strict=True))  # the values are kept


def test_resume_of_a_channels_last_run_keeps_the_layout(tmp_path, one_thread):
    """What ``fastrobust train --resume`` does: the resumed trainer's momentum buffers match their parameters."""
    data = synthetic_dataset(train=64)
    Trainer(channels_last_config(tmp_path), dataset=data, **QUIET).fit()
    config = channels_last_config(tmp_path)
    config.epochs = 2
    resumed = Trainer(config, dataset=data, resume=True, **QUIET)
    pairs = momentum_layouts(resumed.optimizer)
    assert pairs and all(param == buffer for param, buffer in pairs), pairs
