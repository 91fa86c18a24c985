"""Files an evaluation will write, checked before any work: a results file that cannot be written (or is a model,
or a folder) must stop the command at once, not after hours of attacks, and never be appended to.

``check_writable(path, what=...)``: not a folder, not named like a model file, and creatable (``folder_problem``: the
nearest existing folder above it takes a new file; missing folders are created when the file is written).
``check_records_file(path, what=...)``: that, and an existing non-empty file must be JSON lines (one JSON object per
line), as ``fastrobust eval --out`` appends. Both raise one ConfigError line naming the path and the fix.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fastrobust.core.filekind import MODEL_SUFFIXES as LOADABLE_SUFFIXES
from fastrobust.core.filekind import checkpoint_format, describe
from fastrobust.errors import ConfigError

MODEL_SUFFIXES = (*LOADABLE_SUFFIXES, ".onnx")  # files never to write JSON into: the loadable ones and ONNX

_READ = 1 << 20  # bytes of an existing records file that are checked


def check_writable(path: str | Path, *, what: str, example: str = "results.jsonl") -> Path:
    """``path`` as a Path when a file can be written there; ConfigError otherwise (``what``: e.g. ``--out``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file: give a file path such as {path / example}")
    if path.suffix.lower() in MODEL_SUFFIXES:
        raise ConfigError(f"{what} {path} is named like a model file ({path.suffix}): fastrobust writes JSON there, "
                          f"which would destroy a model; give another path such as {path.with_name(example)}")
    if path.exists():
        try:  # opened for appending and closed: nothing in it changes (os.access says yes to root everywhere)
            with open(path, "ab"):
                pass
        except OSError as error:
            raise ConfigError(f"{what} {path} is not writable ({error.strerror or error}): give a path you can "
                              "write") from None
        return path
    problem = folder_problem(path.parent)
    if problem is not None:
        raise ConfigError(f"{what} {path} cannot be created: {problem}; give a path in a folder you can write")
    return path


def folder_problem(folder: str | Path) -> str | None:
    """Why no new file could be written in ``folder`` (its missing folders made first), or None when one can.

    The nearest existing folder above it must be a folder, and a probe file must be creatable (and is removed)
    there: ``os.access`` says yes to root everywhere and knows nothing of a virtual filesystem such as /proc or a
    read-only mount, where the write would fail only after the work. Nothing is left behind.

    Args:
        folder: the folder the file (or a new folder) goes into; it need not exist.

    Returns:
        None, or the reason as a phrase: ``"/proc is a virtual filesystem (no disk behind it), not a place for
        files"``, ``"/data is on a read-only filesystem"``, ``"the folder /srv is not writable (Permission
        denied)"``, ``"/tmp/a-file is a file, not a folder"``.
    """
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".fastrobust-probe-")
    except OSError as error:
        return _why_not_writable(existing, error)
    os.close(handle)
    os.unlink(probe)
    return None


def _why_not_writable(folder: Path, error: OSError) -> str:
    """The failed probe of ``folder`` in words: the kind of filesystem when that is the cause, else the OS reason."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        stats = None
    if stats is not None and stats.f_flag & os.ST_RDONLY:
        return f"{folder} is on a read-only filesystem"
    if stats is not None and stats.f_blocks == 0:
        return f"{folder} is a virtual filesystem (no disk behind it), not a place for files"
    return f"the folder {folder} is not writable ({error.strerror or error})"


def check_records_file(path: str | Path, *, what: str, record_keys: tuple[str, ...] = ()) -> Path:
    """``check_writable``, and an existing non-empty file must hold JSON lines (each line one JSON object with
    every key of ``record_keys``): a model, a pretty-printed JSON file, text, binary data or another tool's
    JSON lines (a run's metrics.jsonl, say) is refused rather than appended to."""
    path = check_writable(path, what=what)
    if not path.is_file():
        return path
    with open(path, "rb") as handle:
        head = handle.read(_READ)
        size = handle.seek(0, 2)
    if not head:
        return path
    refuse = f"{what} {path} exists and is not a JSON-lines records file"
    fix = "records are appended to it; give a new path or a .jsonl file of earlier records"
    kind = checkpoint_format(path)
    if kind is not None:
        raise ConfigError(f"{refuse}: it is a model file ({kind}); {fix}")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{refuse}: it looks like {describe(head, size) or 'binary data'}; {fix}") from None
    lines = text.splitlines()
    if size > len(head) and lines:
        lines = lines[:-1]  # may be cut by the read
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            ok = isinstance(value, dict)
        except ValueError:
            ok = False
        if ok and any(key not in value for key in record_keys):
            keys = ", ".join(list(value)[:4]) + (", ..." if len(value) > 4 else "")
            raise ConfigError(f"{refuse}: line {number} is not an evaluation record (its keys are {keys}; "
                              f"records have {', '.join(record_keys)}); {fix}")
        if not ok:
            kind = describe(head, size)
            looks = f"it looks like {kind}" if kind not in (None, "text") else f"line {number} is not a JSON object"
            raise ConfigError(f"{refuse}: {looks}; {fix}")
    return path
