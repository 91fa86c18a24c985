"""A run folder's evaluation records: every ``fastrobust eval`` of a run's weights, kept side by side.

``fastrobust eval --checkpoint RUN`` (or a weights file inside RUN) writes its record to
``RUN/evaluations/<UTC time>-<attacks>.json``, one file per evaluation, written atomically and never
overwritten: a later evaluation adds a file, so the folder keeps the history and ``fastrobust report`` shows,
for each attack, the latest evaluation on each point set. Each file is the evaluation record (the one ``--json``
prints) with three more keys: ``written`` (the UTC time, ISO 8601), ``weights`` (the evaluated file, relative to
the run folder: ``best.safetensors``, ``last.safetensors``, ``checkpoints/step-N/model.safetensors`` ...) and
``points`` (which test points, ``evaluated_points``: ``{"split": "test", "selection": "balanced_head",
"count": N or null}``, the key sweeps store in ``eval.json``; for a leaderboard protocol ``{"split": "test",
"selection": "official_head" | "head", "count": N, "of": the test split's size}``, ``official_head`` only when the
split is in the official test order, ``head`` for the first N of another order).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

from fastrobust.core.files import atomic_write_json

EVALUATIONS_DIR = "evaluations"


def _stamp(now: datetime.datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


def evaluated_points(record: dict[str, Any], test_subset: int | None) -> dict[str, Any]:
    """The ``points`` key of an evaluation record: which test points it evaluated.

    Args:
        record: the evaluation record; with a ``protocol`` (``robustbench_evaluation``'s), the first ``n`` points
            of the test split in its order.
        test_subset: without a protocol, the number of class-balanced points (None: the whole test split).

    Returns:
        ``{"split": "test", "selection": "balanced_head", "count": test_subset}``, or for a protocol
        ``{"split": "test", "selection": "official_head" (the official test order) or "head" (another order),
        "count": n, "of": the test split's size or None}``.
    """
    protocol = record.get("protocol")
    if not protocol:
        return {"split": "test", "selection": "balanced_head", "count": test_subset}
    selection = "official_head" if protocol.get("official_order") is True else "head"
    return {"split": "test", "selection": selection, "count": record.get("n"), "of": protocol.get("test_images")}


def save_evaluation(run_dir: str | Path, record: dict[str, Any], *, weights: str, points: dict[str, Any],
                    now: datetime.datetime | None = None) -> Path:
    """Write one evaluation record into ``run_dir/evaluations/`` as a new file (atomically; an existing file is
    never replaced).

    Args:
        run_dir: the run folder.
        record: the evaluation record (``fastrobust.evaluate.evaluate``'s, with the command's keys).
        weights: the evaluated weights file, relative to ``run_dir`` (e.g. ``best.safetensors``).
        points: the test points evaluated (see the module docstring).
        now: the time written (default: now, UTC); names the file.

    Returns:
        The path written.

    Raises:
        OSError: the folder cannot be written.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    folder = Path(run_dir) / EVALUATIONS_DIR
    attacks = "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", name) for name in record.get("attacks", {})) or "clean"
    base = f"{_stamp(now)}-{attacks[:80]}"
    path = folder / f"{base}.json"
    counter = 1
    while path.exists():  # two evaluations in the same millisecond: both kept
        counter += 1
        path = folder / f"{base}-{counter}.json"
    atomic_write_json(path, {**record, "written": now.isoformat(), "weights": weights, "points": points})
    return path


def read_evaluations(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The evaluation records of ``run_dir/evaluations/``, oldest first (by file name, the time written), and the
    names of the files that could not be read."""
    folder = Path(run_dir) / EVALUATIONS_DIR
    records, unreadable = [], []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            unreadable.append(path.name)
            continue
        if isinstance(record, dict) and isinstance(record.get("attacks"), dict):
            records.append({**record, "file": f"{EVALUATIONS_DIR}/{path.name}"})
        else:
            unreadable.append(path.name)
    return records, unreadable
