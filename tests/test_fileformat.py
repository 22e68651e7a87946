"""The saved-file container: round trips, corruption detection, atomic writes."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from kvstore import _fileformat
from kvstore._fileformat import MAGIC, CorruptFileError, read_container, write_container

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f16": np.linspace(-1, 1, 7).astype(np.float16),
    "f64_3d": np.random.default_rng(0).standard_normal((2, 3, 5)),
    "i64": np.array([-1, 0, 2**40], dtype=np.int64),
    "u8": np.arange(255, dtype=np.uint8),
    "i32_empty_rows": np.zeros((0, 16), dtype=np.int32),
    "empty": np.zeros(0, dtype=np.float32),
    "bool": np.array([True, False, True]),
    "scalar": np.array(2.5),
    "big_endian": np.arange(4, dtype=">i4"),
    "non_contiguous": np.arange(20.0).reshape(4, 5).T,
}
META = {"dim": 4, "name": "test", "nested": {"a": [1, 2.5, None]}, "np_int": np.int64(7)}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "index.kvs"
    write_container(path, "flat", META, ARRAYS)
    return path


def test_round_trip(saved):
    kind, meta, arrays = read_container(saved)
    assert kind == "flat"
    assert meta == {**META, "np_int": 7}
    assert list(arrays) == list(ARRAYS)
    for name, a in ARRAYS.items():
        b = arrays[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(b, a)
        assert b.flags.writeable and b.flags.c_contiguous
    arrays["f32"][0, 0] = 99  # a copy, not a view of the file buffer


def test_layout_alignment_and_checksum(saved):
    data = saved.read_bytes()
    assert data[:8] == MAGIC
    version, header_len = struct.unpack_from("<IQ", data, 8)
    assert version == 1
    header = json.loads(data[20:20 + header_len])
    assert all(e["offset"] % 64 == 0 for e in header["arrays"])
    import hashlib
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]


def test_no_arrays(tmp_path):
    write_container(tmp_path / "x", "empty", {}, {})
    assert read_container(tmp_path / "x") == ("empty", {}, {})


def _assert_corrupt(path):
    with pytest.raises(CorruptFileError) as e:
        read_container(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
    return e.value


@pytest.mark.parametrize("cut", [1, 5, 8, 19, 40, 200, -33, -32, -1])
def test_truncated(saved, cut):
    data = saved.read_bytes()
    saved.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut])
    _assert_corrupt(saved)


@pytest.mark.parametrize("where", ["magic", "version_low", "header_len", "header", "padding", "data_start",
                                   "data_mid", "data_end", "checksum_first", "checksum_last"])
def test_flipped_byte(saved, where):
    data = bytearray(saved.read_bytes())
    _, header_len = struct.unpack_from("<IQ", data, 8)
    header = json.loads(data[20:20 + header_len])
    first = header["arrays"][0]
    offsets = {
        "magic": 3, "version_low": 8, "header_len": 12, "header": 20 + header_len // 2,
        "padding": 20 + header_len, "data_start": first["offset"],
        "data_mid": (first["offset"] + len(data) - 32) // 2, "data_end": len(data) - 33,
        "checksum_first": len(data) - 32, "checksum_last": len(data) - 1,
    }
    data[offsets[where]] ^= 0x10
    saved.write_bytes(bytes(data))
    _assert_corrupt(saved)


def test_wrong_magic(saved):
    data = saved.read_bytes()
    saved.write_bytes(b"NOTKVST\x00" + data[8:])
    assert "magic" in str(_assert_corrupt(saved))


def test_future_version(saved):
    data = bytearray(saved.read_bytes())
    struct.pack_into("<I", data, 8, 2)
    saved.write_bytes(bytes(data))
    err = _assert_corrupt(saved)
    assert "newer" in str(err) and "version 2" in str(err)


@pytest.mark.parametrize("content", [b"", b"x", os.urandom(4096), b"dim,ntotal\n1,2\n" * 10,
                                     MAGIC + os.urandom(100)])
def test_foreign_file(tmp_path, content):
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    _assert_corrupt(path)


def test_valid_checksum_but_bad_header(tmp_path):
    """A file with a correct checksum and inconsistent offsets is still rejected."""
    import hashlib
    header = json.dumps({"kind": "flat", "meta": {}, "arrays": [
        {"name": "a", "dtype": "<f4", "shape": [1000], "offset": 64, "length": 4000}]}).encode()
    body = MAGIC + struct.pack("<IQ", 1, len(header)) + header
    body += b"\x00" * (128 - len(body))
    path = tmp_path / "bad"
    path.write_bytes(body + hashlib.sha256(body).digest())
    _assert_corrupt(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.kvs"
    with pytest.raises(FileNotFoundError, match="nope.kvs"):
        read_container(path)


def _dir_listing(path):
    return sorted(os.listdir(path.parent))


@pytest.mark.parametrize("bad", [
    {"obj": np.array([1, "a"], dtype=object)},
    {"str": np.array(["abc"])},
    {"rec": np.zeros(2, dtype=[("a", "f4")])},
    {"list": [1.0, 2.0]},
])
def test_refused_arrays_leave_previous_file(saved, bad):
    before, listing = saved.read_bytes(), _dir_listing(saved)
    with pytest.raises(TypeError):
        write_container(saved, "flat", {}, {"ok": np.zeros(3), **bad})
    assert saved.read_bytes() == before
    assert _dir_listing(saved) == listing


def test_bad_meta_refused(saved):
    before = saved.read_bytes()
    with pytest.raises(TypeError):
        write_container(saved, "flat", {"x": object()}, {})
    assert saved.read_bytes() == before


def test_failed_replace_leaves_previous_file(saved, monkeypatch):
    before, listing = saved.read_bytes(), _dir_listing(saved)

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(_fileformat.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_container(saved, "flat", {}, {"a": np.ones(1000)})
    assert saved.read_bytes() == before
    assert _dir_listing(saved) == listing


def test_failed_write_midway_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "new.kvs"

    def boom(*a):
        raise OSError("fsync failed")

    monkeypatch.setattr(_fileformat.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        write_container(path, "flat", {}, {"a": np.ones(10)})
    assert os.listdir(tmp_path) == []


def test_overwrite(saved):
    write_container(saved, "other", {"v": 2}, {"x": np.ones(3, np.int16)})
    kind, meta, arrays = read_container(saved)
    assert (kind, meta) == ("other", {"v": 2})
    np.testing.assert_array_equal(arrays["x"], np.ones(3, np.int16))
    assert _dir_listing(saved) == [saved.name]


def test_mmap_read_matches_copy_and_rejects_corruption(tmp_path):
    from kvstore._fileformat import CorruptFileError, read_container, write_container

    arrays = {"a": np.arange(1000, dtype=np.float32).reshape(10, 100), "b": np.arange(7, dtype=np.int64)}
    p = tmp_path / "m.kvs"
    write_container(p, "test", {"x": 1}, arrays)
    kind, meta, got = read_container(p, mmap=True)
    assert kind == "test" and meta == {"x": 1}
    for k in arrays:
        assert np.array_equal(got[k], arrays[k])
    got["a"][0, 0] = -1  # copy-on-write: the file is untouched
    assert read_container(p)[2]["a"][0, 0] == 0
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="m.kvs"):
        read_container(p, mmap=True)
    (tmp_path / "empty.kvs").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty.kvs"):
        read_container(tmp_path / "empty.kvs", mmap=True)


# --- files that are not what they seem --------------------------------------------

def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer
    err = _assert_corrupt(fifo)
    assert "FIFO" in err.reason
    err = _assert_corrupt(tmp_path)
    assert "directory" in err.reason
    with pytest.raises(CorruptFileError, match="device"):
        read_container("/dev/zero")  # endless: must be refused before reading
    with pytest.raises(CorruptFileError, match="device"):
        read_container("/dev/zero", mmap=True)


def _crafted(path, header: bytes, body_len: int = 64) -> None:
    """A container with a correct checksum around an arbitrary header."""
    import hashlib
    body = MAGIC + struct.pack("<IQ", 1, len(header)) + header
    body += b"\x00" * (-len(body) % 64 + body_len)
    path.write_bytes(body + hashlib.sha256(body).digest())


@pytest.mark.parametrize("header, word", [
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (json.dumps({"kind": "flat", "meta": {"x": float("nan")}, "arrays": []}).encode(), "NaN"),
    (b'{"kind": "flat", "meta": {"x": ' + b"9" * 5000 + b'}, "arrays": []}', "invalid header"),
    (b'"just a string"', "not a JSON object"),
    (b'{"kind": "flat", "meta": "str", "arrays": []}', "field types"),
    (b'{"kind": "flat", "meta": {}, "arrays": ["x"]}', "not an object"),
    (b'{"kind": "flat", "meta": {}, "arrays": [{"name": "a", "dtype": "<f4", "shape": [18446744073709551616], '
     b'"offset": 128, "length": 0}]}', "larger than the file"),
    (b'{"kind": "flat", "meta": {}, "arrays": [{"name": "a", "dtype": "<f4", "shape": [0, 4611686018427387904], '
     b'"offset": 128, "length": 0}]}', "larger than the file"),
    (b'{"kind": "flat", "meta": {}, "arrays": [{"name": "a", "dtype": "O", "shape": [1], '
     b'"offset": 128, "length": 8}]}', "dtype"),
    (b'{"kind": "flat", "meta": {}, "arrays": [{"name": "a", "dtype": "<U4", "shape": [1], '
     b'"offset": 128, "length": 16}]}', "dtype"),
    (b'{"kind": "flat", "meta": {}, "arrays": [{"name": "a", "dtype": "<f4", "shape": [' + b"1, " * 40 + b'1], '
     b'"offset": 128, "length": 4}]}', "shape"),
    (b'{"kind": "flat", "meta": {}, "arrays": [{"name": "a", "dtype": "<f4", "shape": [2], '
     b'"offset": 128, "length": 8}, {"name": "b", "dtype": "<f4", "shape": [2], "offset": 128, "length": 8}]}',
     "offset"),
    (b"\xff\xfe", "invalid header"),
])
def test_crafted_headers_with_valid_checksums(tmp_path, header, word):
    path = tmp_path / "crafted.kvs"
    _crafted(path, header)
    err = _assert_corrupt(path)
    assert word in str(err)


def test_oversized_header_length_refused_before_reading(tmp_path):
    path = tmp_path / "big.kvs"
    path.write_bytes(MAGIC + struct.pack("<IQ", 1, 2**63) + b"\x00" * 100)
    assert "header length" in _assert_corrupt(path).reason


@pytest.mark.parametrize("snapshot", [True, False])
def test_mmap_load_survives_in_place_changes(tmp_path, snapshot):
    """A snapshot map (the default) keeps the loaded arrays as they were when the
    file is rewritten in place or truncated; a direct map is only promised to
    survive saves (which replace the file)."""
    a = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    p = tmp_path / "m.kvs"
    write_container(p, "test", {}, {"a": a})
    got = read_container(p, mmap=True, snapshot=snapshot)[2]["a"]
    write_container(p, "test", {}, {"a": a + 1})  # a save replaces the file: both kinds keep their arrays
    np.testing.assert_array_equal(got, a)
    if not snapshot:
        return
    with open(p, "r+b") as f:  # rewrite in place, then truncate to nothing
        f.seek(4096)
        f.write(b"\xff" * 65536)
        f.truncate(10)
    np.testing.assert_array_equal(got, a)


def test_reading_is_copy_not_view_of_the_file(tmp_path):
    p = tmp_path / "c.kvs"
    write_container(p, "test", {}, {"a": np.arange(10.0)})
    got = read_container(p)[2]["a"]
    p.write_bytes(b"")
    np.testing.assert_array_equal(got, np.arange(10.0))


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    target = tmp_path / "real.kvs"
    link = tmp_path / "link.kvs"
    write_container(target, "test", {"v": 1}, {})
    link.symlink_to(target)
    write_container(link, "test", {"v": 2}, {})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_container(target)[1] == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["link.kvs", "real.kvs"]


def test_nan_meta_refused_on_write(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        write_container(tmp_path / "x", "flat", {"ef": float("nan")}, {})
    assert os.listdir(tmp_path) == []


_HOLD_TEMP = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, b"x" * 1000)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_temp_files_of_killed_saves_are_removed(tmp_path):
    """A writer killed by SIGKILL leaves its temp file unlocked; the next save removes it,
    while the temp file of a writer that is still running is left alone."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "s.kvs"
    write_container(path, "test", {}, {})
    dead, live = tmp_path / ".s.kvs.deadbeef.tmp", tmp_path / ".s.kvs.aliveabc.tmp"
    procs = []
    for name in (dead, live):
        p = subprocess.Popen([sys.executable, "-c", _HOLD_TEMP, str(name)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    other = tmp_path / ".other.kvs.deadbeef.tmp"  # another file's temp: not this save's business
    other.write_bytes(b"x")
    try:
        write_container(path, "test", {"v": 2}, {})
        assert sorted(os.listdir(tmp_path)) == sorted([path.name, live.name, other.name])
    finally:
        procs[1].kill()
        procs[1].wait()
    write_container(path, "test", {"v": 3}, {})
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, other.name])
    assert read_container(path)[1] == {"v": 3}
