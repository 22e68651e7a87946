"""faiss baselines behind the kvstore ``Index`` interface: ``IVFIndex`` and ``HNSWIndex``.

Both use the inner-product metric. faiss is optional (``pip install
'kvstore[faiss]'``) and imported only when one of these classes is built.
Neither index can be saved (``save`` raises ``NotImplementedError``).

``scanned`` (docs/design.md) per query:

- IVF: ``nlist`` centroid scores + the sizes of the ``nprobe`` lists probed.
  The probed lists come from our own call to the coarse quantizer, and the
  search is run on exactly those lists (``search_preassigned``).
- HNSW: faiss's per-search distance counter (``faiss.cvar.hnsw_stats.ndis``,
  upper-level greedy descent and level-0 beam search) + 1 for the entry
  point, which faiss scores without counting it. The counter is a process
  global summed over a whole ``search`` call, so queries are searched one at
  a time under a module lock. faiss parallelises HNSW search over queries
  only, so a one-query search gains nothing from more threads and only pays
  for waking them (measured: 2x slower with 2 threads than with 1): the loop
  runs with ``faiss.omp_set_num_threads(1)`` and restores the previous value
  afterwards. (OpenMP thread counts are per calling thread, so other threads'
  faiss / torch work is unaffected; ``build`` keeps using every core.)
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from ._validate import check_positive_int, to_float32_matrix
from .index_base import Index

__all__ = ["IVFIndex", "HNSWIndex"]

# faiss's HNSW statistics are process-global: serialise the searches that read them.
_HNSW_STATS_LOCK = threading.Lock()

# faiss warns when k-means gets fewer than this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39


def _import_faiss(what: str) -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError(f"faiss is needed for {what}: pip install 'kvstore[faiss]' (or faiss-gpu)") from e
    return faiss


@contextmanager
def _omp_threads(faiss: Any, n: int) -> Iterator[None]:
    """Run the block with faiss's OpenMP thread count (of this thread) set to ``n``."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class _FaissIndex(Index):
    """Shared plumbing: validation, ``build`` = reset + add, faiss result normalisation."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._faiss = _import_faiss(type(self).__name__)
        self._index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def reset(self) -> None:
        """Drop every key (and, for IVF, the trained centroids)."""
        self._index = None

    def build(self, keys: Any, train_queries: Any = None) -> None:
        """Replace the contents with ``keys`` ``[n, dim]``. ``train_queries`` is ignored (interface symmetry)."""
        x = to_float32_matrix(keys, "keys", self._dim)
        self.reset()
        self._index = self._new_index(x)
        self._index.add(x)

    def add(self, keys: Any) -> None:
        """Append ``keys`` ``[n, dim]``; on an empty index this is :meth:`build`."""
        x = to_float32_matrix(keys, "keys", self._dim)
        if self._index is None:
            self.build(x)
        else:
            self._index.add(x)

    def _new_index(self, x: np.ndarray) -> Any:
        """A fresh (trained) faiss index for the keys ``x`` ``[n, dim]``."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _finish(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """faiss pads missing results with id -1 and score -FLT_MAX; make the scores -inf."""
        D = np.where(I < 0, np.float32(-np.inf), D).astype(np.float32, copy=False)
        return D, I.astype(np.int64, copy=False)


class IVFIndex(_FaissIndex):
    """faiss ``IndexIVFFlat`` (``IndexFlatIP`` coarse quantizer, inner product).

    nlist: number of lists; clamped at build time to
        ``max(1, ntotal // 39)`` so that k-means has the 39 points per
        centroid faiss asks for (:attr:`nlist` reports the value used).
    nprobe: lists probed per query (default for :meth:`search`).
    seed: k-means seed (training is deterministic for a given seed).
    """

    KIND = "ivf"

    def __init__(self, dim: int, nlist: int = 1024, nprobe: int = 16, seed: int = 0) -> None:
        super().__init__(dim)
        self._nlist_requested = check_positive_int(nlist, "nlist")
        self.nprobe = check_positive_int(nprobe, "nprobe")
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self._lock = threading.Lock()  # guards the faiss index's nprobe during a search

    @property
    def nlist(self) -> int:
        """Lists in the built index (the requested ``nlist`` before build)."""
        return self._nlist_requested if self._index is None else int(self._index.nlist)

    def _new_index(self, x: np.ndarray) -> Any:
        faiss = self._faiss
        nlist = min(self._nlist_requested, max(1, x.shape[0] // MIN_POINTS_PER_CENTROID))
        quantizer = faiss.IndexFlatIP(self._dim)
        index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a ref
        index.cp.seed = self.seed
        index.cp.min_points_per_centroid = 1  # nlist is clamped above; this only silences nlist=1, n<39
        index.train(x)
        return index

    def _search_impl(self, q: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = self._index
        nprobe = min(check_positive_int(self.nprobe if nprobe is None else nprobe, "nprobe"), index.nlist)
        # Probe lists chosen here and handed to the search, so scanned counts exactly the lists searched.
        Dq, Iq = index.quantizer.search(q, nprobe)
        sizes = np.zeros(index.nlist + 1, dtype=np.int64)  # last slot: the -1 "no list" id
        for l in np.unique(Iq[Iq >= 0]):
            sizes[l] = index.invlists.list_size(int(l))
        scanned = index.nlist + sizes[Iq].sum(axis=1)
        with self._lock:
            index.nprobe = nprobe  # faiss's search_preassigned wrapper requires Iq.shape[1] == index.nprobe
            D, I = index.search_preassigned(q, k, Iq, Dq)
        return (*self._finish(D, I), scanned)


class HNSWIndex(_FaissIndex):
    """faiss ``IndexHNSWFlat`` with the inner-product metric.

    M: graph degree (2*M on level 0); ef_construction: build beam width;
    ef_search: default search beam width (faiss uses ``max(ef, k)``).
    The graph is built with faiss's OpenMP-parallel insertion, so its exact
    shape (not its quality) can vary between runs.
    """

    KIND = "hnsw"

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 200, ef_search: int = 64) -> None:
        super().__init__(dim)
        self.M = check_positive_int(M, "M", minimum=2)
        self.ef_construction = check_positive_int(ef_construction, "ef_construction")
        self.ef_search = check_positive_int(ef_search, "ef_search")

    def _new_index(self, x: np.ndarray) -> Any:
        index = self._faiss.IndexHNSWFlat(self._dim, self.M, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _search_impl(self, q: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        faiss = self._faiss
        params = faiss.SearchParametersHNSW()
        params.efSearch = check_positive_int(self.ef_search if ef is None else ef, "ef")
        nq = q.shape[0]
        D = np.empty((nq, k), dtype=np.float32)
        I = np.empty((nq, k), dtype=np.int64)
        scanned = np.empty(nq, dtype=np.int64)
        stats = faiss.cvar.hnsw_stats
        with _HNSW_STATS_LOCK, _omp_threads(faiss, 1):
            for i in range(nq):
                stats.reset()
                D[i:i + 1], I[i:i + 1] = self._index.search(q[i:i + 1], k, params=params)
                scanned[i] = stats.ndis + 1  # + the entry point, scored but not counted by faiss
        return (*self._finish(D, I), scanned)
