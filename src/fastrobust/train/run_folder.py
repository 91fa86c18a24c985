"""The folder of a new training run: one run per folder, and nothing half-made left behind.

A folder *holds a run* when it has any of the files a training run writes (``RUN_FILES``). A new run
(``train``, ``Trainer``, ``fastrobust train --out``) refuses such a folder with a ConfigError, because writing
into it would mix two runs (``best``/``config``/``result`` replaced, ``metrics.jsonl`` appended, checkpoint
pruning keeping the old run's newer steps, a later resume continuing the old run under the new config) and
lose what the old run saved. The ways out: ``--resume FOLDER`` (``resume(folder)``) continues it; a new or
empty ``--out`` starts another. One case goes ahead: the folder holds only the *start of the same run*
(its ``config.json`` has the same settings and no checkpoint or result was written: a run that died before
its first checkpoint, re-run by the same command or by a sweep). It is restarted from scratch: nothing of it
can be continued, and the same settings write the same files again.

``check`` decides (and raises) before any work; ``clear`` removes such a start's files later, once every
setting has been checked, so a refused or failed start never deletes anything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fastrobust.core.output_files import folder_problem
from fastrobust.errors import ConfigError, FastRobustError
from fastrobust.evaluate import default_step
from fastrobust.train import state

# what a training run writes into its folder (eval.json, hessian.json and eval-state/ come from sweeps'
# evaluations of the run's weights, evaluations/ from `fastrobust eval`, so they go with them)
RUN_FILES = ("config.json", "result.json", "metrics.jsonl", "best.safetensors", "last.safetensors",
             "averaged.safetensors", "checkpoints", "epochs", "eval.json", "hessian.json", "eval-state",
             "evaluations")

FRESH, RESTART = "fresh", "restart"


def run_files(folder: Path) -> list[str]:
    """The run files present in ``folder`` (folders with a trailing ``/``), in ``RUN_FILES`` order."""
    if not folder.is_dir():
        return []
    return [name + ("/" if (folder / name).is_dir() else "") for name in RUN_FILES if (folder / name).exists()]


def _has_checkpoint(folder: Path) -> bool:
    return any((step / "state.json").is_file() for step in (folder / "checkpoints").glob("step-*"))


def without_legacy_eval_step(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a config.json) with an ``eval_step_size`` that runs stored before it defaulted to None (the
    fixed 2/255) read as None when evaluate's rule gives that same step for the run's eps and PGD steps: such
    a run is unchanged by the new default; one at another eps did validate with another step."""
    step = saved.get("eval_step_size")
    if step is None:
        return saved
    eps = saved.get("eps") if saved.get("eps") is not None else 8 / 255
    steps = [max(int(saved.get(k) or 1), 1) for k in ("val_pgd_steps", "test_pgd_steps")]
    if all(abs(default_step(float(eps), n, "linf") - float(step)) < 1e-9 for n in steps):
        return {**saved, "eval_step_size": None}
    return saved


def _differences(saved_file: Path, config: dict[str, Any], defaults: dict[str, Any]) -> list[str] | None:
    """The settings in which ``saved_file`` (a config.json) differs from ``config`` (``out`` aside); None
    when the file cannot be read. A setting the file lacks counts as its default (a field added since)."""
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    saved = without_legacy_eval_step(saved)
    now = json.loads(json.dumps(config, default=str))
    return sorted(key for key in now if key != "out" and saved.get(key, defaults.get(key)) != now[key])


def check(folder: Path, config: dict[str, Any], defaults: dict[str, Any]) -> str:
    """How a new run may use ``folder``: ``fresh`` (no run files) or ``restart`` (the same run's start, no
    checkpoint); else ConfigError naming the folder, what it holds and the ways out. Reads only.

    ``config``/``defaults``: the new run's settings and TrainConfig's defaults (``dataclasses.asdict``)."""
    present = run_files(folder)
    if not present:
        return FRESH
    holding = ", ".join(present)
    fixes = f"continue it with --resume {folder} (resume() in Python), or give a new or empty --out"
    if _has_checkpoint(folder) or (folder / "result.json").exists() or not (folder / "config.json").is_file():
        raise ConfigError(f"--out {folder} already holds a run ({holding}); nothing was written: {fixes}")
    differ = _differences(folder / "config.json", config, defaults)
    if differ is None:
        raise ConfigError(f"--out {folder} already holds a run whose config.json cannot be read ({holding}); "
                          "nothing was written: give a new or empty --out")
    if differ:
        raise ConfigError(f"--out {folder} already holds the start of another run ({holding}; {', '.join(differ)} "
                          f"differ); nothing was written: {fixes}")
    return RESTART


def clear(folder: Path) -> None:
    """Remove the run files of ``folder`` (``RUN_FILES`` only; anything else in it stays)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def undo_start(folder: Path, *, created: bool) -> None:
    """After a start that failed on a setting before its first checkpoint: remove what it wrote, and the
    folder itself when this run created it and nothing else is in it."""
    if _has_checkpoint(folder):
        return
    clear(folder)
    if created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else is in it
            pass


def keep_epochs_through(metrics_file: Path, epoch: int) -> int:
    """On resume from a checkpoint after ``epoch`` finished epochs: drop the lines of ``metrics.jsonl`` for
    later epochs (they are trained again, so they would appear twice) and a line cut by a crash; lines without
    an ``epoch`` stay. The file is replaced atomically; returns how many lines were dropped."""
    if not metrics_file.is_file():
        return 0
    kept, dropped = [], 0
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] > epoch:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        partial = metrics_file.with_name(metrics_file.name + ".tmp")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(metrics_file)
    return dropped


def check_resume_epochs(run_dir: Path, epochs: int, *, trained: int | None = None) -> None:
    """ConfigError when ``epochs`` is below the epochs already trained (``trained``, else read from the newest
    checkpoint's state.json alone: cheap, so ``resume`` checks it before any data is found or loaded)."""
    trained = state.trained_epochs(run_dir) if trained is None else trained
    if trained is not None and trained > epochs:
        raise ConfigError(f"{run_dir} has trained {trained} epochs already: epochs={epochs} "
                          f"would end it before that; give --epochs {trained} or more (or leave it out)")


def default_out(config: Any) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.method}-{config.model}-{config.dataset}-{stamp}")


def check_can_write(folder: Path) -> None:
    """Fail before any work when ``folder`` could not be created and written (``folder_problem``: a file in the
    way, a read-only or virtual filesystem such as /proc, no permission), or the disk is nearly full; leaves
    nothing behind (``check_folder_writable`` later makes the folder and probes it)."""
    problem = folder_problem(folder)
    if problem is not None:
        raise FastRobustError(f"cannot write to output folder {folder}: {problem}; choose another --out")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    _check_free_space(folder, existing)


def _check_free_space(folder: Path, existing: Path) -> None:
    free = os_free_bytes(existing)
    if free is not None and free < 50 * 2**20:
        raise FastRobustError(f"only {free / 2**20:.0f} MiB free under {folder}: free some disk space or choose another --out")


def check_folder_writable(folder: Path) -> None:
    """Fail before training when the output folder cannot be written or the disk is nearly full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as error:
        raise FastRobustError(f"cannot write to output folder {folder}: {error.strerror or error}; choose another --out") from None
    _check_free_space(folder, folder)


def os_free_bytes(folder: Path) -> int | None:
    """Bytes free for this user under ``folder``; None when the filesystem does not say (no statvfs, or one that
    reports no size at all, as virtual and some network filesystems do: "0 MiB free" would be the wrong cause)."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    if stats.f_blocks == 0:
        return None
    return stats.f_bavail * stats.f_frsize


