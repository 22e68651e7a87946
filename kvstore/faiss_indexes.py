"""faiss baselines behind the kvstore ``Index`` interface: ``IVFIndex`` and ``HNSWIndex``.

Both use the inner-product metric. faiss is optional (``pip install
'kvstore[faiss]'``) and imported only when one of these classes is built.
Both are saved in kvstore's own container (plain arrays: vectors, list ids,
graph links), not as faiss's serialised bytes, so that a loaded file is
checked field by field before faiss sees it.

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

faiss itself is not safe under a concurrent add and search: the index's
readers-writer lock (``kvstore.index_base``) serialises them.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from ._validate import MAX_COUNT, check_positive_int, check_seed, to_float32_matrix
from .index_base import Index, register_index

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


def _array(a: np.ndarray, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A saved array checked for dtype and shape (``ValueError`` naming it)."""
    if a.dtype != dtype or a.shape != shape:
        raise ValueError(f"{name} must be {np.dtype(dtype)} of shape {shape}, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def _vectors(a: np.ndarray, name: str, n: int, dim: int) -> np.ndarray:
    a = _array(a, name, np.float32, (n, dim))
    return to_float32_matrix(a, name, dim, allow_empty=True)  # NaN / inf / overflow


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
        with self._rw.write():
            self._index = None

    def build(self, keys: Any, train_queries: Any = None) -> "_FaissIndex":
        """Replace the contents with ``keys`` ``[n, dim]``; returns ``self``. ``train_queries`` is ignored."""
        x = to_float32_matrix(keys, "keys", self._dim)
        index = self._new_index(x)
        index.add(x)
        with self._rw.write():
            self._index = index
        return self

    def _add_impl(self, x: np.ndarray) -> int:
        first = self.ntotal
        if self._index is None or not self._index.is_trained:
            index = self._new_index(x)
            index.add(x)
            self._index = index
        else:
            self._index.add(x)
        return first

    def _reconstruct_impl(self, ids: np.ndarray) -> np.ndarray:
        return self._index.reconstruct_batch(ids)

    def _remove_impl(self, keep: np.ndarray) -> None:
        # faiss renumbers nothing (IVF) or cannot remove at all (HNSW): rebuild from the arrays.
        meta, arrays = self._state()
        self._index = self._index_from_arrays(*self._kept(meta, arrays, keep))

    def _new_index(self, x: np.ndarray) -> Any:
        """A fresh (trained) faiss index for the keys ``x`` ``[n, dim]``."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _finish(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """faiss pads missing results with id -1 and score -FLT_MAX; make the scores -inf."""
        D = np.where(I < 0, np.float32(-np.inf), D).astype(np.float32, copy=False)
        return D, I.astype(np.int64, copy=False)


@register_index
class IVFIndex(_FaissIndex):
    """faiss ``IndexIVFFlat`` (``IndexFlatIP`` coarse quantizer, inner product).

    nlist: number of lists; clamped at training time to
        ``max(1, n // 39)`` so that k-means has the 39 points per
        centroid faiss asks for (:attr:`nlist` reports the value used).
    nprobe: lists probed per query (default for :meth:`search`).
    seed: k-means seed (training is deterministic for a given seed).

    :meth:`train` learns the centroids alone; :meth:`add` on an untrained
    index trains on the keys it is given first; :meth:`build` does both.
    """

    KIND = "ivf"

    def __init__(self, dim: int, nlist: int = 1024, nprobe: int = 16, seed: int = 0) -> None:
        super().__init__(dim)
        self._nlist_requested = check_positive_int(nlist, "nlist", 1, MAX_COUNT)
        self.nprobe = check_positive_int(nprobe, "nprobe", 1, MAX_COUNT)
        self.seed = check_positive_int(seed, "seed", 0, (1 << 31) - 1)  # faiss's k-means seed is an int
        self._nprobe_lock = threading.Lock()  # the faiss index's nprobe is set for each search

    @property
    def nlist(self) -> int:
        """Lists in the trained index (the requested ``nlist`` before training)."""
        return self._nlist_requested if self._index is None else int(self._index.nlist)

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def train(self, keys: Any) -> "IVFIndex":
        """Learn the centroids from ``keys`` ``[n, dim]``, dropping any stored keys; returns ``self``."""
        x = to_float32_matrix(keys, "keys", self._dim)
        index = self._new_index(x)
        with self._rw.write():
            self._index = index
        return self

    def _new_index(self, x: np.ndarray) -> Any:
        faiss = self._faiss
        nlist = min(self._nlist_requested, max(1, x.shape[0] // MIN_POINTS_PER_CENTROID))
        quantizer = faiss.IndexFlatIP(self._dim)
        index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a ref
        index.cp.seed = self.seed
        index.cp.min_points_per_centroid = 1  # nlist is clamped above; this only silences nlist=1, n<39
        index.train(x)
        index.set_direct_map_type(faiss.DirectMap.Array)  # for reconstruct
        return index

    def _search_impl(self, q: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = self._index
        nprobe = min(check_positive_int(self.nprobe if nprobe is None else nprobe, "nprobe", 1, MAX_COUNT),
                     index.nlist)
        # Probe lists chosen here and handed to the search, so scanned counts exactly the lists searched.
        Dq, Iq = index.quantizer.search(q, nprobe)
        sizes = np.zeros(index.nlist + 1, dtype=np.int64)  # last slot: the -1 "no list" id
        for l in np.unique(Iq[Iq >= 0]):
            sizes[l] = index.invlists.list_size(int(l))
        scanned = index.nlist + sizes[Iq].sum(axis=1)
        with self._nprobe_lock:
            index.nprobe = nprobe  # faiss's search_preassigned wrapper requires Iq.shape[1] == index.nprobe
            D, I = index.search_preassigned(q, k, Iq, Dq)
        return (*self._finish(D, I), scanned)

    # --- persistence -------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"dim": self._dim, "nlist": self._nlist_requested, "nprobe": self.nprobe, "seed": self.seed,
                "trained": self.is_trained}
        if not self.is_trained:
            return meta, {}
        faiss, index = self._faiss, self._index
        inv, nl = index.invlists, int(index.nlist)
        sizes = np.array([inv.list_size(l) for l in range(nl)], dtype=np.int64)
        ids = [faiss.rev_swig_ptr(inv.get_ids(l), int(sizes[l])).copy() for l in range(nl) if sizes[l]]
        codes = [faiss.rev_swig_ptr(inv.get_codes(l), int(sizes[l]) * self._dim * 4).copy()
                 for l in range(nl) if sizes[l]]
        arrays = {
            "centroids": index.quantizer.reconstruct_n(0, nl),
            "list_sizes": sizes,
            "ids": np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
            "vectors": (np.concatenate(codes).view(np.float32).reshape(-1, self._dim) if codes
                        else np.zeros((0, self._dim), np.float32)),
        }
        return meta, arrays

    @staticmethod
    def _kept(meta: dict, arrays: dict[str, np.ndarray], keep: np.ndarray) -> tuple:
        """The arrays with only the kept keys, ids renumbered."""
        ids, sizes = arrays["ids"], arrays["list_sizes"]
        new_id = np.cumsum(keep) - 1
        mask = keep[ids]
        lists = np.repeat(np.arange(sizes.size), sizes)
        return (arrays["centroids"], np.bincount(lists[mask], minlength=sizes.size).astype(np.int64),
                new_id[ids[mask]], arrays["vectors"][mask])

    def _index_from_arrays(self, centroids: np.ndarray, sizes: np.ndarray, ids: np.ndarray,
                           vectors: np.ndarray) -> Any:
        faiss = self._faiss
        quantizer = faiss.IndexFlatIP(self._dim)
        quantizer.add(centroids)
        index = faiss.IndexIVFFlat(quantizer, self._dim, centroids.shape[0], faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for l in np.nonzero(sizes)[0]:
            lo, hi = int(starts[l]), int(starts[l + 1])
            lid, codes = np.ascontiguousarray(ids[lo:hi]), np.ascontiguousarray(vectors[lo:hi]).view(np.uint8)
            index.invlists.add_entries(int(l), hi - lo, faiss.swig_ptr(lid), faiss.swig_ptr(codes))
        index.ntotal = int(ids.size)
        index.set_direct_map_type(faiss.DirectMap.Array)
        return index

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "IVFIndex":
        idx = cls(meta["dim"], nlist=meta["nlist"], nprobe=meta["nprobe"], seed=meta["seed"])
        if not isinstance(meta["trained"], bool):
            raise ValueError(f"trained must be a bool, got {meta['trained']!r}")
        if not meta["trained"]:
            if arrays:
                raise ValueError("an untrained IVF index holds no arrays")
            return idx
        sizes = arrays["list_sizes"]
        if sizes.dtype != np.int64 or sizes.ndim != 1 or not 1 <= sizes.size <= idx._nlist_requested \
                or (sizes < 0).any():
            raise ValueError(f"list_sizes must be int64 [nlist <= {idx._nlist_requested}], non-negative")
        nl, n = int(sizes.size), int(sizes.sum())
        centroids = _vectors(arrays["centroids"], "centroids", nl, idx.dim)
        ids = _array(arrays["ids"], "ids", np.int64, (n,))
        if n and (ids.min() < 0 or ids.max() >= n or not (np.bincount(ids, minlength=n) == 1).all()):
            raise ValueError("ids are not a permutation of 0..ntotal-1")
        vectors = _vectors(arrays["vectors"], "vectors", n, idx.dim)
        idx._index = idx._index_from_arrays(centroids, sizes, ids, vectors)
        return idx


@register_index
class HNSWIndex(_FaissIndex):
    """faiss ``IndexHNSWFlat`` with the inner-product metric.

    M: graph degree (2*M on level 0); ef_construction: build beam width;
    ef_search: default search beam width (faiss uses ``max(ef, k)``).
    The graph is built with faiss's OpenMP-parallel insertion, so its exact
    shape (not its quality) can vary between runs. :meth:`remove_ids`
    rebuilds the graph from the remaining keys (faiss's HNSW cannot remove).
    """

    KIND = "hnsw"

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 200, ef_search: int = 64) -> None:
        super().__init__(dim)
        self.M = check_positive_int(M, "M", 2, 512)
        self.ef_construction = check_positive_int(ef_construction, "ef_construction", 1, MAX_COUNT)
        self.ef_search = check_positive_int(ef_search, "ef_search", 1, MAX_COUNT)

    def _new_index(self, x: np.ndarray | None = None) -> Any:
        index = self._faiss.IndexHNSWFlat(self._dim, self.M, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _search_impl(self, q: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        faiss = self._faiss
        params = faiss.SearchParametersHNSW()
        params.efSearch = check_positive_int(self.ef_search if ef is None else ef, "ef", 1, MAX_COUNT)
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

    # --- persistence -------------------------------------------------------
    _GRAPH = ("levels", "offsets", "neighbors")

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"dim": self._dim, "M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                "ntotal": self.ntotal}
        if self.ntotal == 0:
            return meta, {}
        h = self._index.hnsw
        meta.update(entry_point=int(h.entry_point), max_level=int(h.max_level))
        arrays = {f: self._faiss.vector_to_array(getattr(h, f)) for f in self._GRAPH}
        arrays["offsets"] = arrays["offsets"].astype(np.int64)
        arrays["vectors"] = self._index.reconstruct_n(0, self.ntotal)
        return meta, arrays

    @staticmethod
    def _kept(meta: dict, arrays: dict[str, np.ndarray], keep: np.ndarray) -> tuple:
        return (arrays["vectors"][keep],)

    def _index_from_arrays(self, vectors: np.ndarray) -> Any:
        index = self._new_index()
        if vectors.shape[0]:
            index.add(vectors)
        return index

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "HNSWIndex":
        idx = cls(meta["dim"], M=meta["M"], ef_construction=meta["ef_construction"], ef_search=meta["ef_search"])
        n = check_positive_int(meta["ntotal"], "ntotal", 0, (1 << 31) - 1)
        if n == 0:
            if arrays:
                raise ValueError("an empty HNSW index holds no arrays")
            return idx
        faiss, index = idx._faiss, idx._new_index()
        h = index.hnsw
        cum = faiss.vector_to_array(h.cum_nneighbor_per_level).astype(np.int64)
        levels = _array(arrays["levels"], "levels", np.int32, (n,))
        if levels.min() < 1 or levels.max() >= cum.size:
            raise ValueError(f"levels must be in [1, {cum.size - 1}]")
        offsets = _array(arrays["offsets"], "offsets", np.int64, (n + 1,))
        if offsets[0] != 0 or not (np.diff(offsets) == cum[levels]).all():
            raise ValueError("offsets do not match the levels")
        neighbors = _array(arrays["neighbors"], "neighbors", np.int32, (int(offsets[-1]),))
        if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n):
            raise ValueError("neighbors hold an id out of range")
        entry, top = check_positive_int(meta["entry_point"], "entry_point", 0, n - 1), meta["max_level"]
        if top != int(levels.max()) - 1 or int(levels[entry]) - 1 != top:
            raise ValueError("entry_point / max_level do not match the levels")
        index.storage.add(_vectors(arrays["vectors"], "vectors", n, idx.dim))
        faiss.copy_array_to_vector(levels, h.levels)
        faiss.copy_array_to_vector(offsets.astype(np.uint64), h.offsets)
        faiss.copy_array_to_vector(neighbors, h.neighbors)
        h.entry_point, h.max_level, index.ntotal = entry, top, n
        idx._index = index
        return idx
