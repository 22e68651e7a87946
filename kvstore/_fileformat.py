"""The on-disk container of every saved index and store.

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

Writes are atomic: a temp file in the target's directory is written (under an
exclusive ``flock``), fsynced and renamed over the target, then the directory
is fsynced. A symlink at ``path`` is kept: its target is replaced. A failed
write leaves the previous file untouched and removes its temp file; temp files
of writers that were killed are removed by the next save to the same path.

Reads accept only regular files, check every size against the file before
allocating anything, verify the checksum, then every header field; anything
wrong is a :class:`CorruptFileError` naming the file. What is returned never
depends on the file staying as it was (see :func:`read_container`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import mmap as _mmap
import os
import re
import stat
import struct
import tempfile
import time
from typing import Any, BinaryIO

import numpy as np

__all__ = ["CorruptFileError", "FORMAT_VERSION", "MAGIC", "deserialize", "read_container", "serialize",
           "write_container"]

MAGIC = b"KVSTORE\x00"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_SIZE = hashlib.sha256().digest_size  # 32
MAX_HEADER_BYTES = 256 << 20   # a header beyond this is refused before it is read
MAX_JSON_DEPTH = 64            # nesting of the JSON header (the writers use < 10)
MAX_NDIM = 32
# numpy dtype strings of plain fixed-size numbers: bool, signed / unsigned ints, floats, complex.
_DTYPE_RE = re.compile(r"[<>|=]?[biufc][1-9][0-9]?")
_TMP_SUFFIX = ".tmp"
_STALE_EMPTY_TMP_SECONDS = 60.0


class CorruptFileError(ValueError):
    """A container file is truncated, altered, crafted, foreign or from a newer format version."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"{what} has dtype {dtype!s}; only plain numeric dtypes (bool, int, uint, float, complex) "
                        "can be stored")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"meta value {o!r} of type {type(o).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- writing

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
        try:
            header = json.dumps({"kind": kind, "meta": meta, "arrays": entries}, default=_json_default,
                                sort_keys=True, allow_nan=False).encode("utf-8")
        except ValueError as e:  # NaN / inf in meta: JSON has no such numbers
            raise TypeError(f"meta is not JSON-serialisable ({e})") from None
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


def serialize(kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes :func:`write_container` would write (for pickling and in-memory copies)."""
    head, placed = _plan(kind, meta, arrays)
    buf = io.BytesIO()
    _write_all(buf, head, placed)
    return buf.getvalue()


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


def _remove_stale_temps(directory: str, base: str) -> None:
    """Delete temp files of earlier saves to ``base`` whose writer is gone.

    A writer holds an exclusive ``flock`` on its temp file until it renames
    it, and the kernel drops the lock when the writer dies (even by
    ``kill -9``), so a temp file whose lock can be taken is orphaned. An
    empty one may belong to a writer that has created it but not locked it
    yet: it is left alone until it is a minute old.
    """
    pattern = re.compile(re.escape(f".{base}.") + r"[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))  # mkstemp's names
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size == 0 and time.time() - st.st_mtime < _STALE_EMPTY_TMP_SECONDS:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live writer holds it
            if os.stat(full, follow_symlinks=False).st_ino == st.st_ino:
                os.unlink(full)
        except OSError:
            pass
        finally:
            os.close(fd)


def write_container(path: str | os.PathLike, kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``kind``, the JSON-serialisable ``meta`` and the numeric ``arrays`` to ``path`` atomically.

    Raises ``TypeError`` (before touching the disk) for object / string /
    structured arrays, non-array values or non-JSON ``meta`` (NaN and inf
    included). When ``path`` is a symlink, the file it points to is replaced
    and the link is kept.
    """
    head, placed = _plan(kind, meta, arrays)
    path = os.path.realpath(os.fspath(path))
    directory, base = os.path.split(path)
    _remove_stale_temps(directory, base)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=_TMP_SUFFIX)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks the temp file as in use (see _remove_stale_temps)
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp creates 0600; use the usual permissions
        with os.fdopen(fd, "wb") as f:
            _write_all(f, head, placed)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still locked: a concurrent cleaner cannot take it before the rename
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


# --------------------------------------------------------------------------- reading

def _open_regular(path: str) -> tuple[int, int]:
    """``(fd, size)`` of ``path`` opened for reading; only a regular file is accepted.

    ``O_NONBLOCK`` keeps the open of a FIFO from waiting for a writer; the
    type is then checked on the open descriptor (no race with a rename).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no such file: {path}", path) from None
    except IsADirectoryError:
        raise CorruptFileError(path, "not a regular file (a directory)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket or other")
        raise CorruptFileError(path, f"not a regular file ({what})")
    return fd, st.st_size


def _read_exactly(fd: int, size: int, path: str) -> np.ndarray:
    buf = np.empty(size, dtype=np.uint8)
    view, got = memoryview(buf), 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise CorruptFileError(path, f"file shrank while being read ({got} of {size} bytes)")
        got += n
    return buf


def _snapshot(fd: int, size: int, path: str) -> int:
    """An unlinked copy of the open file ``fd`` (``size`` bytes) that no other process can
    open: in ``directory`` (same filesystem: the copy may be a reflink), else in the system
    temp folder. Returns its descriptor."""
    last: OSError | None = None
    for where in (os.path.dirname(os.path.abspath(path)), None):
        try:
            dst = tempfile.TemporaryFile(dir=where)
        except OSError as e:
            last = e
            continue
        try:
            out, done = dst.fileno(), 0
            while done < size:
                try:
                    n = os.copy_file_range(fd, out, size - done, done, done)
                except OSError as e:  # EXDEV / ENOSYS / EINVAL on some filesystems: copy by hand
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    n = os.pwrite(out, os.pread(fd, min(size - done, 1 << 24), done), done)
                if n == 0:  # mapping past the end of the copy would fault: refuse now
                    raise CorruptFileError(path, f"file shrank while being read ({done} of {size} bytes)")
                done += n
            return os.dup(out)
        except OSError as e:
            last = e
        finally:
            dst.close()
    raise last if last is not None else OSError("no snapshot location")  # pragma: no cover


def read_container(path: str | os.PathLike, mmap: bool = False, snapshot: bool = True
                   ) -> tuple[str, dict, dict[str, np.ndarray]]:
    """Read a file written by :func:`write_container`: ``(kind, meta, arrays)``.

    ``mmap=False``: the file is read into one private buffer; the arrays are
    writable views of it. ``mmap=True``: the arrays are copy-on-write views
    of a memory map (no copy in anonymous RAM; writes stay private). With
    ``snapshot=True`` (the default) the map is of a private, unlinked copy of
    the file (a reflink where the filesystem has them), so that truncating or
    rewriting the file afterwards cannot change or invalidate the arrays;
    ``snapshot=False`` maps the file itself: the caller then guarantees that
    nothing truncates or rewrites it in place while the arrays are alive
    (a truncation makes a later read of the arrays a ``SIGBUS``; saving over
    it with :func:`write_container` is safe, it replaces the file).

    The checksum is verified on the bytes the arrays are read from, before
    anything is returned. Raises ``FileNotFoundError`` for a missing file and
    :class:`CorruptFileError` (naming ``path``) for anything else wrong:
    not a regular file, foreign or truncated file, newer format version,
    checksum mismatch, inconsistent or oversized header.
    """
    path = os.fspath(path)
    fd, size = _open_regular(path)
    try:
        if size < _PREFIX.size + _DIGEST_SIZE:
            _check_prefix(os.pread(fd, len(MAGIC), 0), path)
            raise CorruptFileError(path, f"truncated file ({size} bytes)")
        _check_prefix(os.pread(fd, _PREFIX.size, 0), path, size)
        if not mmap:
            data = _read_exactly(fd, size, path)
        else:
            src = _snapshot(fd, size, path) if snapshot else os.dup(fd)
            try:
                data = np.frombuffer(_mmap.mmap(src, size, access=_mmap.ACCESS_COPY), dtype=np.uint8)
            finally:
                os.close(src)
    finally:
        os.close(fd)
    return _parse(data, path)


def deserialize(data: bytes | bytearray | memoryview | np.ndarray, name: str = "<bytes>"
                ) -> tuple[str, dict, dict[str, np.ndarray]]:
    """Parse the bytes of a container (as :func:`serialize` made them): ``(kind, meta, arrays)``.

    The arrays are writable copies; errors are :class:`CorruptFileError` naming ``name``.
    """
    buf = np.frombuffer(data, dtype=np.uint8).copy() if not isinstance(data, np.ndarray) \
        else np.array(data, dtype=np.uint8, copy=True).reshape(-1)
    if buf.size < _PREFIX.size + _DIGEST_SIZE:
        _check_prefix(buf[:len(MAGIC)].tobytes(), name)
        raise CorruptFileError(name, f"truncated ({buf.size} bytes)")
    _check_prefix(buf[:_PREFIX.size].tobytes(), name, buf.size)
    return _parse(buf, name)


def _check_prefix(prefix: bytes, path: str, size: int | None = None) -> None:
    """Magic, version and header length, checked before the rest of the file is read."""
    if len(prefix) < len(MAGIC) or prefix[:len(MAGIC)] != MAGIC:
        raise CorruptFileError(path, "not a kvstore file (bad magic bytes)")
    if size is None:
        return
    _, version, header_len = _PREFIX.unpack(prefix)
    if version > FORMAT_VERSION:
        raise CorruptFileError(path, f"written in format version {version} by a newer kvstore; this version "
                                     f"reads up to {FORMAT_VERSION}: upgrade kvstore")
    if version < 1:
        raise CorruptFileError(path, f"invalid format version {version}")
    if header_len > min(MAX_HEADER_BYTES, size - _PREFIX.size - _DIGEST_SIZE):
        raise CorruptFileError(path, f"header length {header_len} exceeds the file size or the "
                                     f"{MAX_HEADER_BYTES >> 20} MiB limit")


def _parse(data: np.ndarray, path: str) -> tuple[str, dict, dict[str, np.ndarray]]:
    """Checksum, header and arrays of a whole container held in ``data`` (uint8 ``[size]``)."""
    def fail(reason: str) -> CorruptFileError:
        return CorruptFileError(path, reason)

    body_end = data.size - _DIGEST_SIZE
    if hashlib.sha256(memoryview(data[:body_end])).digest() != data[body_end:].tobytes():
        raise fail("checksum mismatch (file truncated or altered)")
    header_len = int(_PREFIX.unpack(data[:_PREFIX.size].tobytes())[2])
    header_end = _PREFIX.size + header_len
    try:
        text = data[_PREFIX.size:header_end].tobytes().decode("utf-8")
        _check_json_depth(text)
        header = json.loads(text, parse_constant=_refuse_constant)
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        kind, meta, entries = header["kind"], header["meta"], header["arrays"]
        if not isinstance(kind, str) or not isinstance(meta, dict) or not isinstance(entries, list):
            raise TypeError("bad header field types")
        arrays = _read_arrays(data, entries, header_end, body_end)
    except (ValueError, TypeError, KeyError, RecursionError, OverflowError) as e:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"invalid header ({type(e).__name__}: {e})") from None
    return kind, meta, arrays


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _check_json_depth(text: str) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` before parsing it (the parser recurses)."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    if not stripped:
        return
    b = np.frombuffer(stripped.encode("utf-8"), dtype=np.uint8)
    step = np.zeros(b.size, dtype=np.int64)
    step[(b == ord("[")) | (b == ord("{"))] = 1
    step[(b == ord("]")) | (b == ord("}"))] = -1
    depth = int(np.cumsum(step).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} deep (limit {MAX_JSON_DEPTH})")


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_arrays(data: np.ndarray, entries: list, header_end: int, body_end: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    prev_end = header_end
    for e in entries:
        if not isinstance(e, dict):
            raise TypeError(f"array entry {e!r} is not an object")
        name, offset, length, shape, dstr = e["name"], e["offset"], e["length"], e["shape"], e["dtype"]
        if not isinstance(name, str) or name in arrays:
            raise ValueError(f"bad or duplicate array name {name!r}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise ValueError(f"array {name!r}: shape must be a list of at most {MAX_NDIM} ints")
        if not all(_nonneg_int(v) for v in [offset, length, *shape]):
            raise ValueError(f"array {name!r}: offset, length and shape must be non-negative ints")
        if not isinstance(dstr, str) or not _DTYPE_RE.fullmatch(dstr):
            raise ValueError(f"array {name!r}: dtype {dstr!r} is not a plain numeric dtype string")
        dtype = np.dtype(dstr)
        _check_dtype(dtype, f"array {name!r}")
        # Extents are checked against the file in Python ints (no overflow): even
        # an empty array may not claim more (its zero dims read as 1) than the file holds.
        if math.prod(max(1, v) for v in shape) * dtype.itemsize > body_end:
            raise ValueError(f"array {name!r}: shape {shape} is larger than the file")
        if length != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"array {name!r}: length {length} does not match shape {shape} and dtype {dtype}")
        if offset % ALIGN or offset < prev_end or offset + length > body_end:
            raise ValueError(f"array {name!r}: bad offset {offset} (length {length})")
        prev_end = offset + length
        arrays[name] = data[offset:offset + length].view(dtype).reshape(tuple(shape))
    return arrays
