"""The on-disk container of every saved index (and, later, of whole stores).

Layout (all integers little-endian)::

    offset 0   magic            8 bytes  b"KVSTORE\\x00"
    offset 8   format version   u32      (FORMAT_VERSION)
    offset 12  header length    u64      (H)
    offset 20  JSON header      H bytes  UTF-8
    ...        zero padding, then each array's raw C-order bytes, every array
               starting at a file offset that is a multiple of ALIGN
    end - 32   SHA-256 of every byte before it

The JSON header is ``{"kind": str, "meta": {...}, "arrays": [{"name", "dtype",
"shape", "offset", "length"}, ...]}``; ``offset`` is absolute in the file,
``dtype`` a numpy dtype string with explicit byte order (e.g. ``"<f4"``).

Writes are atomic: a temp file in the target directory is written, fsynced and
renamed over ``path``, then the directory is fsynced. A failed write leaves the
previous file (if any) untouched and removes the temp file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["CorruptFileError", "FORMAT_VERSION", "MAGIC", "read_container", "write_container"]

MAGIC = b"KVSTORE\x00"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_SIZE = hashlib.sha256().digest_size  # 32
# bool, signed / unsigned ints, floats, complex: plain fixed-size numbers only.
_ALLOWED_DTYPE_KINDS = "biufc"


class CorruptFileError(ValueError):
    """A container file is truncated, altered, foreign or from a newer format version."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.kind not in _ALLOWED_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"{what} has dtype {dtype!s}; only plain numeric dtypes (bool, int, uint, float, complex) "
                        "can be stored")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"meta value {o!r} of type {type(o).__name__} is not JSON-serialisable")


def _plan(kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> tuple[bytes, list[tuple[int, np.ndarray]]]:
    """Validate the inputs and return ``(prefix + header bytes, [(offset, array), ...])``."""
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"kind must be a non-empty str, got {kind!r}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of numpy arrays, got {type(arrays).__name__}")
    prepared: list[tuple[str, np.ndarray]] = []
    for name, a in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array names must be str, got {name!r}")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"array {name!r} must be a numpy array, got {type(a).__name__}")
        _check_dtype(a.dtype, f"array {name!r}")
        prepared.append((name, a if a.flags.c_contiguous else a.copy(order="C")))  # keeps 0-d shape

    # The header's length depends on the offsets, which depend on the header's
    # length: iterate until the aligned data start no longer moves.
    data_start = 0
    while True:
        entries, placed, pos = [], [], data_start
        for name, a in prepared:
            entries.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                            "offset": pos, "length": a.nbytes})
            placed.append((pos, a))
            pos = _align(pos + a.nbytes)
        header = json.dumps({"kind": kind, "meta": meta, "arrays": entries},
                            default=_json_default, sort_keys=True).encode("utf-8")
        needed = _align(_PREFIX.size + len(header))
        if needed <= data_start:
            break
        data_start = needed
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    return head, placed


def _write_all(f: BinaryIO, head: bytes, placed: list[tuple[int, np.ndarray]]) -> None:
    h = hashlib.sha256()

    def put(b: bytes | memoryview) -> None:
        f.write(b)
        h.update(b)

    put(head)
    pos = len(head)
    for offset, a in placed:
        put(b"\x00" * (offset - pos))
        put(memoryview(a.reshape(-1).view(np.uint8)))
        pos = offset + a.nbytes
    f.write(h.digest())


def _current_umask() -> int:
    """The process umask, read without changing it where possible (``os.umask`` is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - non-Linux fallback
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


def write_container(path: str | os.PathLike, kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``kind``, the JSON-serialisable ``meta`` and the numeric ``arrays`` to ``path`` atomically.

    Raises ``TypeError`` (before touching the disk) for object / string /
    structured arrays, non-array values or non-JSON ``meta``.
    """
    head, placed = _plan(kind, meta, arrays)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp creates 0600; use the usual permissions
        with os.fdopen(fd, "wb") as f:
            _write_all(f, head, placed)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def read_container(path: str | os.PathLike, mmap: bool = False) -> tuple[str, dict, dict[str, np.ndarray]]:
    """Read a file written by :func:`write_container`: ``(kind, meta, arrays)``.

    Arrays are fresh writable copies, or with ``mmap=True`` copy-on-write
    views of the memory-mapped file (no second copy in RAM; writes stay
    private). The checksum is verified either way before anything is
    returned. Raises ``FileNotFoundError`` for a missing file and
    :class:`CorruptFileError` (naming ``path``) for anything else wrong:
    foreign or truncated file, newer format version, checksum mismatch,
    inconsistent header.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if mmap:
        if os.path.getsize(path) == 0:
            raise CorruptFileError(path, "not a kvstore file (empty)")
        data = memoryview(np.memmap(path, dtype=np.uint8, mode="c"))
    else:
        with open(path, "rb") as f:
            data = memoryview(f.read())

    def fail(reason: str) -> CorruptFileError:
        return CorruptFileError(path, reason)

    if len(data) < len(MAGIC) or bytes(data[:len(MAGIC)]) != MAGIC:
        raise fail("not a kvstore file (bad magic bytes)")
    if len(data) < _PREFIX.size + _DIGEST_SIZE:
        raise fail(f"truncated file ({len(data)} bytes)")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise fail(f"written in format version {version} by a newer kvstore; this version reads up to "
                   f"{FORMAT_VERSION}: upgrade kvstore")
    if version < 1:
        raise fail(f"invalid format version {version}")
    body_end = len(data) - _DIGEST_SIZE
    if hashlib.sha256(data[:body_end]).digest() != bytes(data[body_end:]):
        raise fail("checksum mismatch (file truncated or altered)")
    header_end = _PREFIX.size + header_len
    if header_end > body_end:
        raise fail(f"header length {header_len} exceeds the file size")
    try:
        header = json.loads(bytes(data[_PREFIX.size:header_end]).decode("utf-8"))
        kind, meta, entries = header["kind"], header["meta"], header["arrays"]
        if not isinstance(kind, str) or not isinstance(meta, dict) or not isinstance(entries, list):
            raise TypeError("bad header field types")
        arrays = _read_arrays(data, entries, header_end, body_end, copy=not mmap)
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"invalid header ({e})") from None
    return kind, meta, arrays


def _read_arrays(data: memoryview, entries: list, header_end: int, body_end: int, copy: bool = True
                 ) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    prev_end = header_end
    for e in entries:
        name, offset, length, shape = e["name"], e["offset"], e["length"], e["shape"]
        if not isinstance(name, str) or name in arrays:
            raise ValueError(f"bad or duplicate array name {name!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [offset, length, *shape]):
            raise ValueError(f"array {name!r}: offset, length and shape must be non-negative ints")
        dtype = np.dtype(e["dtype"])
        _check_dtype(dtype, f"array {name!r}")
        if length != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"array {name!r}: length {length} does not match shape {shape} and dtype {dtype}")
        if offset % ALIGN or offset < prev_end or offset + length > body_end:
            raise ValueError(f"array {name!r}: bad offset {offset} (length {length})")
        prev_end = offset + length
        a = np.frombuffer(data, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(tuple(shape))
        arrays[name] = a.copy() if copy else a
    return arrays
