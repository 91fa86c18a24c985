"""Training: the config and its validation, the trainer loop, the run folder, resumable state, weight
averaging, schedules, optimiser groups, user modules and presets.

``from fastrobust.train import TrainConfig, train, resume`` is the public face.
"""

from fastrobust.errors import StopRequested, TrainingStopped
from fastrobust.train.config import TrainConfig, resolve_device
from fastrobust.train.console import describe_best
from fastrobust.train.trainer import RESUME_OVERRIDES, Trainer, read_run_config, resume, train

__all__ = [
    "RESUME_OVERRIDES",
    "StopRequested",
    "TrainConfig",
    "Trainer",
    "TrainingStopped",
    "describe_best",
    "read_run_config",
    "resolve_device",
    "resume",
    "train",
]
