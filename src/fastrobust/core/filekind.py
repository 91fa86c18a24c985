"""What a file that should be a checkpoint really is, read from its first bytes (nothing is unpickled or run).

Used to turn a failed load into "not a checkpoint: it looks like an HTML page" (a failed download saved under
the checkpoint's name), "text", "a truncated archive", ... instead of a loader's low-level message, which for an
HTML page reads like a security refusal ("Unsupported operand 60"). A file that parses as a pickle is never
described here: the refusal of a pickle that would run code stays the loader's (``checkpoint.import_state_dict``),
which asks :func:`plain_pickle_globals` whether a refused file is a plain ``pickle.dump`` stream (not torch.save's
format: protocols 4 and 5 read as "damaged" to torch's unpickler) to say so and how to convert it.
"""

from __future__ import annotations

import io
import json
import pickletools
import struct
import warnings
import zipfile
from pathlib import Path

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".pt2", ".bin", ".ckpt")  # the model files fastrobust loads
_HEAD = 1 << 16  # bytes read to classify
_MARKUP = (b"<!doctype html", b"<html", b"<head", b"<body", b"<meta", b"<title", b"<script", b"<div", b"<p>",
           b"<h1", b"<center", b"<a ")


UNRECOGNISED = "data in no recognised checkpoint format (not safetensors, zip or pickle): a corrupt or unrelated file"


def looks_like(path: str | Path) -> str | None:
    """A short description ("an HTML page", "text", "a truncated zip archive", "data in no recognised checkpoint format",
    ...) when the file at ``path`` is certainly not a checkpoint of any kind fastrobust reads; None when it may be
    one (a complete zip, a safetensors file, a pickle stream) or cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
            handle.seek(0, 2)
            size = handle.tell()
    except OSError:
        return None
    return describe(head, size, path)


def describe(head: bytes, size: int, path: str | Path | None = None) -> str | None:
    """:func:`looks_like` on the first bytes ``head`` of a file of ``size`` bytes (``path`` to test zips)."""
    if size == 0:
        return "an empty file"
    if head[:2] == b"PK":
        if path is not None and not zipfile.is_zipfile(path):
            return "a truncated or damaged zip archive (an interrupted download or copy)"
        return None
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed file (an archive, not a checkpoint)"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (unpack it first)"
    safetensors = _safetensors_problem(head, size)
    if safetensors is not None:
        return safetensors
    if _is_safetensors(head) or _is_pickle(head, size):
        return None
    text = _as_text(head)
    if text is None:
        return UNRECOGNISED
    stripped = text.lstrip("\ufeff \t\r\n").lower().encode()
    if stripped.startswith(b"<") and any(tag in stripped[:4096] for tag in _MARKUP):
        return "an HTML page (a failed or redirected download: fetch the file again)"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<"):
        return "an XML or HTML document"
    if stripped[:1] in (b"{", b"[") and size <= _HEAD:
        try:
            json.loads(text)
            return "a JSON file"
        except ValueError:
            pass
    return "text"


def _safetensors_problem(head: bytes, size: int) -> str | None:
    """A safetensors file starts with a little-endian u64 header length, then a JSON header ``{...``."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length < 2 or length > 100_000_000:
        return None
    if 8 + length > size:
        return f"a truncated safetensors file ({size} bytes, its header alone needs {8 + length})"
    return None


def _is_safetensors(head: bytes) -> bool:
    """A plausible safetensors start: a u64 header length, then ``{`` (its completeness: ``_safetensors_problem``)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= 100_000_000


def _is_pickle(head: bytes, size: int) -> bool:
    """Whether the bytes parse as a pickle opcode stream up to STOP (parsed by pickletools, never executed).
    The legacy torch format is a series of pickles starting with a protocol-2 PROTO opcode."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    try:
        with warnings.catch_warnings():  # decoding a garbage "string" argument warns about its escapes
            warnings.simplefilter("ignore", DeprecationWarning)
            for opcode, _arg, _pos in pickletools.genops(io.BytesIO(head)):
                if opcode.name == "STOP":
                    return True
    except Exception:  # noqa: BLE001 - genops raises ValueError and others on non-pickles
        return False
    return size > len(head)  # a long stream cut off by the head: give it the benefit of the doubt


# torch.save's legacy (non-zip) format opens with a pickled magic number: PROTO 2, LONG1 of 10 bytes,
# 0x1950a86a20f9469cfc6c
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def plain_pickle_globals(path: str | Path) -> list[str] | None:
    """The globals (``module.name``) a plain pickle stream names, as ``pickle.dump`` writes it (any protocol);
    None when the file is no such stream: a torch.save file (a zip archive, or the legacy format that opens with
    torch's magic number), safetensors, a damaged stream or anything else. The opcodes are parsed up to STOP by
    pickletools, never executed; the names are read for a message, not to decide what is safe."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(TORCH_LEGACY_MAGIC))
            if head[:2] == b"PK" or head.startswith(TORCH_LEGACY_MAGIC) or _is_safetensors(head):
                return None
            handle.seek(0)
            return _stream_globals(handle)
    except Exception:  # noqa: BLE001 - genops raises ValueError and others on non-pickles; OSError
        return None


def _stream_globals(handle: io.BufferedIOBase) -> list[str] | None:
    """The globals named by the pickle stream read from ``handle`` (None unless it parses up to STOP)."""
    names: list[str] = []
    strings: list[str] = []  # the last strings pushed: STACK_GLOBAL (protocol 4+) takes module and name from them
    with warnings.catch_warnings():  # decoding a garbage "string" argument warns about its escapes
        warnings.simplefilter("ignore", DeprecationWarning)
        for opcode, arg, _pos in pickletools.genops(handle):
            if opcode.name == "GLOBAL":  # protocols 0-3: "module name"
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif "UNICODE" in opcode.name:
                strings = [*strings[-1:], str(arg)]
            if opcode.name == "STOP":
                return list(dict.fromkeys(names))
    return None


def _as_text(head: bytes) -> str | None:
    """The head decoded as UTF-8 when it reads as text (no NUL bytes, few control characters)."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a multi-byte character cut by the head
            return None
        text = head[: error.start].decode("utf-8")
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\r\n\f")
    return text if controls <= max(2, len(text) // 100) else None


def not_a_checkpoint(path: str | Path, *, what: str = "a checkpoint") -> str | None:
    """The one-line message ``PATH is not WHAT: it looks like ...`` when the file surely is not one, else None."""
    kind = looks_like(path)
    return None if kind is None else f"{path} is not {what}: it looks like {kind}"


def checkpoint_format(path: str | Path) -> str | None:
    """Which loader a model file needs, from its content: ``"safetensors"``, ``"torchscript"`` (torch.jit.save),
    ``"export"`` (torch.export.save, .pt2), ``"torch"`` (torch.save, zip or legacy pickle format), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            handle.seek(0, 2)
            size = handle.tell()
    except OSError:
        return None
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        leaves = {name.split("/", 1)[-1] for name in names}
        if "archive_format" in leaves or any(leaf.startswith("models/") for leaf in leaves):
            return "export"
        if "constants.pkl" in leaves or any(leaf.startswith("code/") for leaf in leaves):
            return "torchscript"
        if "data.pkl" in leaves:
            return "torch"
        return None
    if len(head) >= 9 and head[8:9] == b"{" and _safetensors_problem(head, size) is None:
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch"
    return None
