"""The interface every kvstore index shares (faiss-style, inner-product metric).

Subclasses implement ``_search_impl`` (validated float32 queries in, scores,
ids and per-query scanned counts out) and, if persistable, ``_state`` /
``_from_state``. Everything else (input checking, ``search`` vs
``search_with_stats``, ``save``) lives here once.
"""
from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from ._validate import check_k, check_trained, to_float32_matrix

# kind string (stored in files) -> index class; filled by ``register_index``.
INDEX_KINDS: dict[str, type["Index"]] = {}


def register_index(cls: type["Index"]) -> type["Index"]:
    """Class decorator: make ``cls`` loadable by ``kvstore.load_index``."""
    INDEX_KINDS[cls.KIND] = cls
    return cls


class Index:
    """Base class. Scores are inner products, returned in descending order."""

    KIND: ClassVar[str] = "abstract"

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self._dim = int(dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_queries(self, queries: Any, k: int) -> tuple[np.ndarray, int]:
        q = to_float32_matrix(queries, "queries", self._dim, allow_empty=True)
        k = check_k(k, self.ntotal)
        check_trained(self.ntotal, type(self).__name__)
        return q, k

    def search_with_stats(self, queries: Any, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Search the ``k`` highest inner products of each query.

        queries: ``[nq, dim]`` float32/float16/bfloat16 (numpy or torch).
        Returns ``(D, I, scanned)``: ``D`` float32 ``[nq, k]`` descending,
        ``I`` int64 ``[nq, k]`` padded with -1 (and ``D`` with -inf) when fewer
        than ``k`` results exist, ``scanned`` int64 ``[nq]`` = dot products
        computed per query (keys and centroids alike).
        """
        q, k = self._check_queries(queries, k)
        if q.shape[0] == 0:
            return (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0,), np.int64))
        D, I, scanned = self._search_impl(q, k, **params)
        return (np.ascontiguousarray(D, np.float32), np.ascontiguousarray(I, np.int64),
                np.ascontiguousarray(scanned, np.int64))

    def search(self, queries: Any, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search_with_stats` without the scanned counts: ``(D, I)``."""
        D, I, _ = self.search_with_stats(queries, k, **params)
        return D, I

    def _search_impl(self, q: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover

    # --- persistence -------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "Index":
        raise NotImplementedError(f"{cls.__name__} cannot be loaded")  # pragma: no cover

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (versioned, checksummed)."""
        from ._fileformat import write_container

        meta, arrays = self._state()
        write_container(path, self.KIND, meta, arrays)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self._dim}, ntotal={self.ntotal})"


def load_index(path: str | os.PathLike) -> Index:
    """Load an index written by ``Index.save``; rejects truncated, altered or foreign files."""
    from ._fileformat import read_container

    kind, meta, arrays = read_container(path)
    # Import the modules that register persistable kinds.
    from . import flat, graph, wave  # noqa: F401
    cls = INDEX_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"{os.fspath(path)}: unknown index kind {kind!r}")
    try:
        return cls._from_state(meta, arrays)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: inconsistent index contents ({e})") from e
