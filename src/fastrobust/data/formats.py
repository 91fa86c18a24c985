"""Readers for the official file formats, written from their specifications.

Every reader returns numpy arrays: images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``.
Nothing here imports torch, so the decode workers stay light.
"""

from __future__ import annotations

import gzip
import io
import multiprocessing
import os
import re
import struct
import tarfile
import zipfile
import zlib
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from fastrobust.data._safe_pickle import safe_loads
from fastrobust.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- CIFAR python batches
def cifar_batch(data: bytes, *, what: str, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR python batch (a pickled dict with ``data`` [N, 3072] and ``labels``)."""
    batch = safe_loads(data, what=what)
    if not isinstance(batch, dict):
        raise DataError(f"{what}: expected a pickled dict, found {type(batch).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{what}: missing key 'data' or {label_key!r} (found {sorted(map(str, batch))})")
    images = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{what}: 'data' must be uint8 [N, 3072], found {images.dtype} {list(images.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{what}: mismatched counts: {len(images)} images but {len(labels)} labels")
    return images.reshape(-1, 3, 32, 32), labels


def cifar_meta_names(data: bytes, *, what: str, key: str) -> list[str] | None:
    meta = safe_loads(data, what=what)
    if not isinstance(meta, dict):
        return None
    meta = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in meta.items()}
    names = meta.get(key)
    if names is None:
        return None
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


# --------------------------------------------------------------------------- MNIST IDX
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed): magic 0,0,type,ndim; big-endian int32 dims; data."""
    path = os.fspath(path)
    if data is None:
        with open(path, "rb") as handle:
            data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path}: corrupt gzip stream ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX size mismatch: header says {list(dims)} ({count * dtype.itemsize} bytes) "
            f"but the file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------- MATLAB v5 .mat
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_NUMERIC = {6, 7, 8, 9, 10, 11, 12, 13, 14, 15}  # double, single, int8 ... uint64
_MX_DTYPE = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}


def _mat_tag(buf: bytes, pos: int, endian: str, what: str) -> tuple[int, int, int, int]:
    """Return (type, nbytes, data_start, next_element) of the element whose tag is at ``pos``."""
    if pos + 8 > len(buf):
        raise DataError(f"{what}: truncated MAT element tag at byte {pos}")
    first, second = struct.unpack(endian + "II", buf[pos : pos + 8])
    if first >> 16:  # small data element: 2-byte size, 2-byte type, up to 4 bytes of data
        mtype, nbytes = first & 0xFFFF, first >> 16
        return mtype, nbytes, pos + 4, pos + 8
    mtype, nbytes = first, second
    start = pos + 8
    if mtype == _MI_COMPRESSED:
        return mtype, nbytes, start, start + nbytes
    return mtype, nbytes, start, start + nbytes + (-nbytes % 8)


def _mat_numeric(buf: bytes, pos: int, endian: str, what: str) -> tuple[np.ndarray, int]:
    mtype, nbytes, start, end = _mat_tag(buf, pos, endian, what)
    if mtype not in _MI:
        raise DataError(f"{what}: unsupported MAT data type {mtype}")
    if start + nbytes > len(buf):
        raise DataError(f"{what}: truncated MAT data (needs {nbytes} bytes at {start})")
    dtype = np.dtype(endian + _MI[mtype])
    return np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=start), end


def _mat_matrix(buf: bytes, start: int, end: int, endian: str, what: str) -> tuple[str, np.ndarray] | None:
    """Parse the body of a miMATRIX element; returns (name, array) for numeric arrays, else None."""
    flags, pos = _mat_numeric(buf, start, endian, what)
    if flags.size < 1:
        raise DataError(f"{what}: malformed MAT array flags")
    mx_class = int(flags[0]) & 0xFF
    is_complex = bool(int(flags[0]) & 0x0800)
    if mx_class not in _MX_NUMERIC:
        return None  # cell, struct, char, sparse...: not needed here
    dims, pos = _mat_numeric(buf, pos, endian, what)
    name_arr, pos = _mat_numeric(buf, pos, endian, what)
    name = name_arr.tobytes().decode("latin1")
    real, pos = _mat_numeric(buf, pos, endian, what)
    if is_complex:
        raise DataError(f"{what}: variable {name!r} is complex; a real array was expected")
    shape = tuple(int(d) for d in dims)
    count = int(np.prod(shape, dtype=np.int64))
    if real.size != count:
        raise DataError(f"{what}: variable {name!r} has {real.size} values for shape {list(shape)}")
    array = real.astype(np.dtype(_MX_DTYPE[mx_class]), copy=False).reshape(shape, order="F")
    return name, array


def read_mat(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read the numeric variables of a MATLAB v5 .mat file (plain or zlib-compressed elements)."""
    path = os.fspath(path)
    what = path
    wanted = set(names) if names is not None else None
    with open(path, "rb") as handle:
        buf = handle.read()
    if len(buf) < 128:
        raise DataError(f"{what}: too short to be a MATLAB .mat file")
    if buf[:8] == b"\x89HDF\r\n\x1a\n" or buf[512:520] == b"\x89HDF\r\n\x1a\n":
        raise DataError(f"{what}: MATLAB v7.3 (HDF5) files are not supported; save it with -v7 or -v6")
    indicator = buf[126:128]
    if indicator == b"IM":
        endian = "<"
    elif indicator == b"MI":
        endian = ">"
    else:
        raise DataError(f"{what}: not a MATLAB v5 .mat file (endian indicator {indicator!r})")
    result: dict[str, np.ndarray] = {}
    pos = 128
    while pos + 8 <= len(buf):
        mtype, nbytes, start, end = _mat_tag(buf, pos, endian, what)
        if mtype == _MI_COMPRESSED:
            try:
                inner = zlib.decompressobj().decompress(buf[start : start + nbytes])
            except zlib.error as error:
                raise DataError(f"{what}: corrupt compressed MAT element at byte {pos} ({error})") from None
            itype, inbytes, istart, _ = _mat_tag(inner, 0, endian, what)
            if itype == _MI_MATRIX:
                parsed = _mat_matrix(inner, istart, istart + inbytes, endian, what)
                if parsed and (wanted is None or parsed[0] in wanted):
                    result[parsed[0]] = parsed[1]
        elif mtype == _MI_MATRIX:
            parsed = _mat_matrix(buf, start, start + nbytes, endian, what)
            if parsed and (wanted is None or parsed[0] in wanted):
                result[parsed[0]] = parsed[1]
        pos = end
        if wanted is not None and wanted.issubset(result):
            break
    return result


# --------------------------------------------------------------------------- image trees
def natural_key(name: str) -> tuple:
    """Sort ``2.png`` before ``10.png``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not os.path.basename(name).startswith(".")


def read_members(path: str, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Bytes of every file whose relative path passes ``keep``, from a directory, .tar(.gz) or .zip."""

    out: dict[str, bytes] = {}
    if os.path.isdir(path):
        for folder, _, files in os.walk(path):
            for name in files:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                if keep(rel):
                    with open(full, "rb") as handle:
                        out[rel] = handle.read()
        return out
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and keep(info.filename):
                        out[info.filename] = archive.read(info)
            return out
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isfile() and keep(name):
                    handle = archive.extractfile(member)
                    out[name] = handle.read() if handle else b""
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read archive {path}: {error} (is the file complete? re-download it)") from None
    return out


SIZE_MISMATCH = "image of another size"


def _decode_error(name: str, source: str, reason: str) -> DataError:
    if reason.startswith(SIZE_MISMATCH):
        return DataError(f"{reason.split(':', 1)[0]} {name} in {source}:{reason.split(':', 1)[1]}")
    return DataError(f"corrupt or unreadable image {name} in {source}: {reason}")


def decode_images(
    blobs: list[bytes], *, mode: str, size: tuple[int, int] | None
) -> tuple[np.ndarray | None, int, str]:
    """Decode encoded images to ``uint8 [N, C, H, W]``; on failure return (None, index, reason)."""

    channels = 1 if mode == "L" else 3
    out = None
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                image = image.convert(mode)
                array = np.asarray(image, dtype=np.uint8)
        except Exception as error:  # PIL raises many types for corrupt data
            text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", str(error))
            return None, i, f"{type(error).__name__}: {text}"
        if array.ndim == 2:
            array = array[:, :, None]
        if out is None:
            height, width = size if size is not None else array.shape[:2]
            out = np.empty((len(blobs), channels, height, width), dtype=np.uint8)
        if array.shape[:2] != out.shape[2:]:
            return None, i, (f"{SIZE_MISMATCH}: {array.shape[1]}x{array.shape[0]} pixels where the others are "
                             f"{out.shape[3]}x{out.shape[2]} (resize the images to one size)")
        out[i] = array.transpose(2, 0, 1)
    if out is None:
        out = np.empty((0, channels, *(size or (0, 0))), dtype=np.uint8)
    return out, -1, ""


def _decode_chunk(args):
    blobs, mode, size = args
    return decode_images(blobs, mode=mode, size=size)


def decode_many(
    blobs: list[bytes], names: list[str], *, mode: str, size: tuple[int, int] | None, source: str,
    workers: int | None = None,
) -> np.ndarray:
    """Decode many images, in a process pool when there are enough of them; errors name file and archive."""
    if not blobs:
        channels = 1 if mode == "L" else 3
        return np.empty((0, channels, *(size or (0, 0))), dtype=np.uint8)
    if size is None:  # fix the size from the first image so that chunks agree
        first, index, reason = decode_images(blobs[:1], mode=mode, size=None)
        if first is None:
            raise _decode_error(names[0], source, reason)
        size = (first.shape[2], first.shape[3])
    chunk = 2000
    jobs = [(blobs[i : i + chunk], mode, size) for i in range(0, len(blobs), chunk)]
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
    results = None
    if workers > 1 and len(jobs) > 1:
        try:
            context = multiprocessing.get_context("fork")
            with context.Pool(workers) as pool:
                results = pool.map(_decode_chunk, jobs)
        except (OSError, ValueError, RuntimeError):
            results = None
    if results is None:
        results = [_decode_chunk(job) for job in jobs]
    for j, (array, index, reason) in enumerate(results):
        if array is None:
            raise _decode_error(names[j * chunk + index], source, reason)
    return np.concatenate([r[0] for r in results], axis=0)
