"""Result records: every number fastrobust reports is a JSON object carrying its provenance."""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fastrobust import __version__
from fastrobust.core.precision import determinism, float32_precision


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The fastrobust version, plus the git commit when running from a checkout (asked once per process)."""

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def device_description(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where a number was computed: versions, the device, and the float32 precision (TF32 on CUDA) and
    determinism settings in force (``fastrobust.core.precision``)."""
    return {
        "fastrobust": code_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_description(device),
        "float32_precision": float32_precision(),
        "determinism": determinism(),
    }


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (flushed and fsynced: a crash loses at most this line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read the JSON lines of a file, ignoring a last line cut short by a crash."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
