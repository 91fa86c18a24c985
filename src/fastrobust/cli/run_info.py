"""What a fastrobust run folder says about itself: the folder a checkpoint belongs to, the dataset it was trained
on and the eps it was trained and tested at (the defaults of ``fastrobust eval`` and ``fastrobust analyze``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastrobust.errors import ConfigError


def run_folder(checkpoint: Path) -> Path | None:
    """The fastrobust run folder a checkpoint belongs to (the folder itself, the folder of a model file, the run
    of RUN/checkpoints or RUN/epochs, or the run above RUN/checkpoints/step-N), None when it is not in one."""
    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    candidates = (start, start.parent) if start.name in ("checkpoints", "epochs") else (start, start.parent.parent)
    for folder in candidates:
        if (folder / "config.json").is_file() and ((folder / "best.safetensors").exists()
                                                   or (folder / "last.safetensors").exists()
                                                   or (folder / "checkpoints").is_dir()):
            return folder
    return None


def trained_on(checkpoint: Path) -> tuple[str | None, Path | None]:
    """(the dataset a fastrobust run was trained on, its run folder): from result.json (the data actually used),
    else config.json; (None, None) outside a run or when unreadable."""
    run = run_folder(checkpoint)
    if run is None:
        return None, None
    for name, field in (("result.json", lambda d: d["dataset"]["name"]), ("config.json", lambda d: d["dataset"])):
        try:
            value = field(json.loads((run / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value:
            return value, run
    return None, run


def run_eps(run: Path | None) -> float | None:
    """The l_inf eps a fastrobust run was tested at (result.json), else trained at (config.json); None outside a
    run, when unreadable, or when the run left eps to its method."""
    if run is None:
        return None
    for name, field in (("result.json", lambda d: d["test"]["eps"]), ("config.json", lambda d: d["eps"])):
        try:
            value = field(json.loads((run / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
            return float(value)
    return None


def dataset_or_run_dataset(given: str | None, run_dataset: str | None, run: Path | None, *, command: str,
                           say: bool = True) -> str:
    """``--dataset`` when given, else the run's dataset (said on stderr as ``fastrobust COMMAND: ...``);
    ConfigError when neither names one."""


    if given is not None:
        return given
    if run_dataset is None:
        raise ConfigError("--dataset is needed (the checkpoint is not in a fastrobust run folder that names its "
                          "dataset): e.g. --dataset cifar10")
    if say:
        print(f"fastrobust {command}: --dataset {run_dataset} (the dataset of run {run})", file=sys.stderr)
    return run_dataset
