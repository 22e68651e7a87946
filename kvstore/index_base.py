"""The interface every kvstore index shares (faiss-style, inner-product metric).

Subclasses implement ``_search_impl`` (validated float32 queries in, scores,
ids and per-query scanned counts out), ``_add_impl``, ``_reconstruct_impl``,
``_remove_impl`` and ``_state`` / ``_from_state``. Everything else (input
checking, the readers-writer lock, ``search`` vs ``search_with_stats``,
numpy / torch results, ``save``, copies and pickling through the file format)
lives here once.

Concurrency: every index holds one :class:`RWLock`. Searches, ``reconstruct``
and ``save`` share it; ``build``, ``add``, ``train``, ``remove_ids`` and
``reset`` take it alone.
"""
from __future__ import annotations

import operator
import os
import threading
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import numpy as np

from ._validate import as_input_type, check_k, check_trained, to_float32_matrix, to_id_array

# kind string (stored in files) -> index class; filled by ``register_index``.
INDEX_KINDS: dict[str, type["Index"]] = {}


def register_index(cls: type["Index"]) -> type["Index"]:
    """Class decorator: make ``cls`` loadable by ``kvstore.load_index``."""
    INDEX_KINDS[cls.KIND] = cls
    return cls


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (no writer starvation).

    Re-entrant: a thread holding the write lock may take either lock again, a
    reader may take the read lock again. A reader asking for the write lock
    would wait for itself: that is a ``RuntimeError``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> depth
        self._writer: int | None = None
        self._write_depth = 0
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._write_depth += 1
                as_writer = True
            else:
                as_writer = False
                if me not in self._readers:
                    while self._writer is not None or self._writers_waiting:
                        self._cond.wait()
                self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                if as_writer:
                    self._write_depth -= 1
                else:
                    self._readers[me] -= 1
                    if not self._readers[me]:
                        del self._readers[me]
                        if not self._readers:
                            self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._write_depth += 1
            else:
                if me in self._readers:
                    raise RuntimeError("an index cannot be modified from inside one of its own searches")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._cond.notify_all()


class Index:
    """Base class. Scores are inner products, returned in descending order.

    Results follow the input: torch queries (keys, ids) give torch tensors on
    the queries' device, numpy gives numpy.
    """

    KIND: ClassVar[str] = "abstract"

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 < int(dim) <= 1 << 16:
            raise ValueError(f"dim must be an int in [1, {1 << 16}], got {dim!r}")
        self._dim = int(dim)
        self._rw = RWLock()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def d(self) -> int:
        """The dimension, by faiss's name."""
        return self._dim

    @property
    def ntotal(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`add` can be called (faiss's flag; only IVF needs training)."""
        return True

    # --- search --------------------------------------------------------------
    def search_with_stats(self, queries: Any, k: int, **params: Any) -> tuple[Any, Any, Any]:
        """Search the ``k`` highest inner products of each query.

        queries: ``[nq, dim]`` float32/float16/bfloat16 (numpy or torch).
        Returns ``(D, I, scanned)``: ``D`` float32 ``[nq, k]`` descending,
        ``I`` int64 ``[nq, k]`` padded with -1 (and ``D`` with -inf) when fewer
        than ``k`` results exist, ``scanned`` int64 ``[nq]`` = dot products
        computed per query (keys and centroids alike).
        """
        q = to_float32_matrix(queries, "queries", self._dim, allow_empty=True)
        with self._rw.read():
            k = check_k(k, self.ntotal)
            check_trained(self.ntotal, type(self).__name__)
            if q.shape[0] == 0:
                out = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0,), np.int64)
            else:
                out = self._search_impl(q, k, **params)
        D, I, scanned = (np.ascontiguousarray(a, t) for a, t in zip(out, (np.float32, np.int64, np.int64)))
        return as_input_type(queries, D), as_input_type(queries, I), as_input_type(queries, scanned)

    def search(self, queries: Any, k: int, **params: Any) -> tuple[Any, Any]:
        """Like :meth:`search_with_stats` without the scanned counts: ``(D, I)``."""
        D, I, _ = self.search_with_stats(queries, k, **params)
        return D, I

    def _search_impl(self, q: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    # --- add / reconstruct / remove ----------------------------------------------
    def add(self, keys: Any) -> Any:
        """Append ``keys`` ``[m, dim]``; returns their ids ``[m]`` int64 (``ntotal`` before the call onwards).

        0 rows are allowed (nothing happens). On an empty index this is
        ``build(keys)`` where the index can build from keys alone.
        """
        x = to_float32_matrix(keys, "keys", self._dim, allow_empty=True)
        with self._rw.write():
            first = self.ntotal
            if x.shape[0]:
                first = self._add_impl(x)
        return as_input_type(keys, np.arange(first, first + x.shape[0], dtype=np.int64))

    def _add_impl(self, x: np.ndarray) -> int:
        """Append validated keys (under the write lock); returns the id of the first."""
        raise NotImplementedError  # pragma: no cover

    def reconstruct(self, key_id: int) -> np.ndarray:
        """The stored key ``key_id`` as float32 ``[dim]``."""
        if isinstance(key_id, bool) or not hasattr(key_id, "__index__"):
            raise TypeError(f"key_id must be an int, got {type(key_id).__name__}")
        return self._reconstruct_ids(np.array([operator.index(key_id)], np.int64))[0]

    def reconstruct_n(self, i0: int = 0, n: int | None = None) -> np.ndarray:
        """Keys ``i0 .. i0 + n - 1`` ``[n, dim]`` float32 (default: from ``i0`` to the end)."""
        with self._rw.read():
            total = self.ntotal
            for name, v in (("i0", i0), ("n", n)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                    raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            i0 = int(i0)
            n = total - i0 if n is None else int(n)
            if not (0 <= i0 <= total and 0 <= n <= total - i0):
                raise ValueError(f"keys {i0} .. {i0 + n - 1} are not all in [0, {total})")
            return self._reconstruct_ids(np.arange(i0, i0 + n, dtype=np.int64))

    def _reconstruct_ids(self, ids: np.ndarray) -> np.ndarray:
        with self._rw.read():
            if ids.size and (ids.min() < 0 or ids.max() >= self.ntotal):
                raise ValueError(f"key ids must be in [0, {self.ntotal}), got {ids.min()} .. {ids.max()}")
            if ids.size == 0:
                return np.zeros((0, self._dim), np.float32)
            return np.ascontiguousarray(self._reconstruct_impl(ids), np.float32)

    def _reconstruct_impl(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} cannot reconstruct keys")  # pragma: no cover

    def remove_ids(self, ids: Any) -> int:
        """Remove the keys ``ids`` (1-D ints; ids not stored are ignored); returns how many were removed.

        The remaining keys keep their order and are renumbered ``0 ..
        ntotal - 1`` (as faiss's flat indexes do): a key's id drops by the
        number of removed keys below it.
        """
        drop = to_id_array(ids, "ids")
        with self._rw.write():
            n = self.ntotal
            keep = np.ones(n, dtype=bool)
            drop = drop[(drop >= 0) & (drop < n)]
            keep[drop] = False
            removed = int(n - keep.sum())
            if removed:
                self._remove_impl(keep)
            return removed

    def _remove_impl(self, keep: np.ndarray) -> None:
        """Keep only the keys where ``keep`` ``[ntotal]`` is True, renumbered (under the write lock)."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove keys")  # pragma: no cover

    # --- persistence -------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "Index":
        raise NotImplementedError(f"{cls.__name__} cannot be loaded")  # pragma: no cover

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (versioned, checksummed).

        Runs under the read lock: searches go on meanwhile, writers wait.
        """
        from ._fileformat import write_container

        with self._rw.read():
            meta, arrays = self._state()
            write_container(path, self.KIND, meta, arrays)

    def serialize(self) -> np.ndarray:
        """The saved file's bytes as a uint8 array (faiss's ``serialize_index``)."""
        from ._fileformat import serialize

        with self._rw.read():
            meta, arrays = self._state()
            return np.frombuffer(serialize(self.KIND, meta, arrays), dtype=np.uint8)

    # Copies and pickles go through the file format: a copy shares nothing with the original.
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return deserialize_index, (self.serialize(),)

    def __copy__(self) -> "Index":
        return deserialize_index(self.serialize())

    def __deepcopy__(self, memo: dict) -> "Index":
        return self.__copy__()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self._dim}, ntotal={self.ntotal})"


def _from_container(kind: str, meta: dict, arrays: dict[str, np.ndarray], name: str) -> Index:
    """The index of a parsed container; any inconsistency is a ``CorruptFileError`` naming ``name``."""
    from ._fileformat import CorruptFileError
    # Import the modules that register persistable kinds.
    from . import faiss_indexes, flat, graph, wave  # noqa: F401

    cls = INDEX_KINDS.get(kind)
    if cls is None:
        raise CorruptFileError(name, f"unknown index kind {kind!r} (known: {sorted(INDEX_KINDS)})")
    try:
        return cls._from_state(meta, arrays)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        raise CorruptFileError(name, f"inconsistent index contents ({type(e).__name__}: {e})") from e


def load_index(path: str | os.PathLike) -> Index:
    """Load an index written by ``Index.save``; rejects truncated, altered, crafted or foreign files.

    Raises ``FileNotFoundError`` for a missing file and ``CorruptFileError``
    (naming the file) for everything else. The loaded index holds its own
    copy of the data: the file may be changed or deleted afterwards.
    """
    from ._fileformat import read_container

    kind, meta, arrays = read_container(path)
    return _from_container(kind, meta, arrays, os.fspath(path))


def deserialize_index(data: Any) -> Index:
    """The index of :meth:`Index.serialize`'s bytes (faiss's ``deserialize_index``)."""
    from ._fileformat import deserialize

    kind, meta, arrays = deserialize(data, "<serialized index>")
    return _from_container(kind, meta, arrays, "<serialized index>")
