"""torch.compile through one door: every model fastrobust compiles goes through ``compile_model``.

torch.compile (inductor) keeps what it builds in a cache folder shared by every run on the machine
(``TORCHINDUCTOR_CACHE_DIR``, by default ``torchinductor_USER`` in the temporary folder) and trusts a file it
finds there: a generated Python module or a compiled library cut short (a build killed half-way, a full disk)
makes every later start that needs it fail inside torch's build. Before compiling, the door removes such files
(a generated ``.py`` that does not parse or lost its end, an ELF ``.so`` shorter than its own header says, a
compiled-graph entry without its last byte), which torch then rebuilds, and says so in one line.
"""

from __future__ import annotations

import getpass
import os
import re
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

_ELF_MAGIC = b"\x7fELF"
_OUTPUT_CODE_FIRST_LINE = b"# AOT ID:"  # inductor's generated wrapper modules start so ...
_OUTPUT_CODE_LAST_CALL = b"compiled_module_main("  # ... and end with their benchmark stanza calling this
_TAIL_BYTES = 1024
_PICKLED_ENTRIES = ("fxgraph", "aotautograd")  # torch's compiled-graph entries, each one pickle
_PICKLE_PROTO, _PICKLE_STOP = 0x80, b"."  # a pickle (protocol 2+) starts with PROTO and ends with STOP
_ELF64_HEADER = 64  # bytes; e_shoff at 0x28 (8 bytes), e_shentsize and e_shnum at 0x3A and 0x3C (2 bytes each)


def inductor_cache_dir() -> Path:
    """The folder torch.compile's inductor keeps its builds in: ``$TORCHINDUCTOR_CACHE_DIR``, else torch's
    default (``torchinductor_USER`` in the temporary folder)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given).absolute()
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def damaged_cache_files(folder: Path) -> list[Path]:
    """The files of an inductor cache ``folder`` that are cut short: generated Python modules that do not parse
    or lack the end inductor writes, ELF shared libraries shorter than their header says (or empty), and
    compiled-graph entries (pickles) that lack the pickle's last byte. Nothing is unpickled: torch rebuilds a
    bad entry itself, but prints a traceback for each one it meets.

    Args:
        folder: the cache folder (a missing folder has no damaged files).

    Returns:
        The damaged files, sorted.
    """
    if not folder.is_dir():
        return []
    damaged = [path for path in folder.rglob("*.py") if not _complete_module(path)]
    damaged += [path for path in folder.rglob("*.so") if _truncated_library(path)]
    damaged += [path for entries in _PICKLED_ENTRIES for path in (folder / entries).rglob("*")
                if path.is_file() and _truncated_pickle(path)]
    return sorted(damaged)


def repair_cache(folder: Path, log: Callable[[str], None]) -> list[Path]:
    """Remove the damaged files of ``folder`` (``damaged_cache_files``; torch rebuilds them) and say so in one
    line through ``log``; returns the files removed (a file this user may not remove is named in the line)."""
    removed, kept = [], []
    for path in damaged_cache_files(folder):
        try:
            path.unlink(missing_ok=True)
            removed.append(path)
        except OSError:  # another user's cache folder: say so, torch's own error follows if it needs the file
            kept.append(path)
    if removed or kept:
        names = [path.name for path in removed + kept]
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        done = f"removed {len(removed)} damaged file(s)" if removed else "found damaged files"
        left = f", could not remove {len(kept)}" if kept else ""
        log(f"torch.compile cache {folder}: {done} left by an interrupted build ({shown}){left}; torch rebuilds "
            "what is removed. If compilation still fails, delete that folder (it is only a cache) or set "
            "TORCHINDUCTOR_CACHE_DIR to another")
    return removed


def compile_model(model: nn.Module, log: Callable[[str], None] = print, **options: Any) -> nn.Module:
    """``torch.compile(model, **options)`` after removing damaged files from the compile cache (``repair_cache``).

    Args:
        model: the module to compile.
        log: where the one-line note on a repaired cache goes (default print).
        **options: passed to ``torch.compile`` (e.g. ``dynamic=False``, ``mode="reduce-overhead"``).

    Returns:
        torch's compiled wrapper of ``model`` (it compiles at its first call).
    """
    repair_cache(inductor_cache_dir(), log)
    return torch.compile(model, **options)


def _complete_module(path: Path) -> bool:
    """Whether a generated Python module parses and, when it is inductor's output code (its first line
    ``# AOT ID: ...``), still ends with the benchmark stanza inductor writes last (a module cut at a line end
    parses, and fails only when torch looks for what it lost)."""
    try:
        source = path.read_bytes()
    except OSError:  # unreadable: torch reports it itself
        return True
    try:
        compile(source, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return not source.startswith(_OUTPUT_CODE_FIRST_LINE) or _OUTPUT_CODE_LAST_CALL in source[-_TAIL_BYTES:]


def _truncated_pickle(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            first = handle.read(1)
            handle.seek(max(size - 1, 0))
            last = handle.read(1)
    except OSError:
        return False
    return size == 0 or (first[0] == _PICKLE_PROTO and last != _PICKLE_STOP)


def _truncated_library(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            header = handle.read(_ELF64_HEADER)
    except OSError:
        return False
    if header[:4] != _ELF_MAGIC:  # not ELF (another platform's library): not checked, unless cut inside the magic
        return len(header) < len(_ELF_MAGIC) and _ELF_MAGIC.startswith(header)
    if len(header) < _ELF64_HEADER:
        return True
    if header[4] != 2 or header[5] not in (1, 2):  # ELF64 only; 1/2: little/big endian
        return False
    order = "<" if header[5] == 1 else ">"
    (section_offset,) = struct.unpack_from(order + "Q", header, 0x28)
    entry_size, entries = struct.unpack_from(order + "HH", header, 0x3A)
    return size < section_offset + entry_size * entries
