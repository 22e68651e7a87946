"""The attention-aware graph index (RetrievalAttention / RoarGraph projection).

Built over one KV head's keys from the queries of that head, so that a decode
query walks from the keys the training queries liked best to its own top keys
after scoring a few percent of the cache. See ``docs/graph.md``.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ._core import core
from ._validate import (MAX_COUNT, check_k, check_num_threads, check_positive_int, check_seed, check_trained,
                        to_float32_matrix)
from .exact import exact_topk
from .index_base import Index, register_index


@register_index
class AttentionGraphIndex(Index):
    """Proximity graph over keys whose edges come from training queries.

    Args:
        dim: vector dimension (head_dim).
        degree: hard bound on out-edges per key (M).
        train_topk: exact top keys per training query used for projection (Nq_k).
        max_train_queries: training queries beyond this are subsampled
            (seeded); default 200 000 when the labels are computed on CUDA,
            32 768 on the CPU.
        ef_construction: beam width of the searches made during build and add.
        ef_search: default beam width of ``search`` (``ef`` overrides it).
        num_entry_points: entry points of every search: the favourite key of
            each of this many clusters of the training queries (default
            sqrt(N), clipped to [8, 1024]).
        pivots_per_query: how many of a training query's best keys get linked
            to its other top keys (1 is RoarGraph's projection).
        geometric_degree: edges per key to its nearest keys in L2 (default
            3/8 of ``degree``); they keep
            the graph navigable for decode queries that drift from the
            training queries (0: projection edges only).
        exact_geometric_limit: up to this many keys, those L2 neighbours are
            exact (blocked matmul, O(N^2)); above it they are found by
            searching the graph with each key.
        seed: makes build deterministic (subsampling and entry-point fill).
        num_threads: OpenMP threads (0: all available).
        device: where exact top-k labels are computed ("cuda"/"cpu"; default:
            CUDA when available).
        progress: show a progress bar for builds of more than 100K keys.
    """

    KIND = "attention_graph"

    def __init__(
        self,
        dim: int,
        degree: int = 32,
        train_topk: int = 64,
        max_train_queries: int | None = None,
        ef_construction: int = 128,
        ef_search: int = 64,
        num_entry_points: int | None = None,
        pivots_per_query: int = 1,
        geometric_degree: int | None = None,
        exact_geometric_limit: int = 65_536,
        seed: int = 0,
        num_threads: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(dim)
        self.degree = check_positive_int(degree, "degree", 2, 1024)
        self.train_topk = check_positive_int(train_topk, "train_topk", 1, MAX_COUNT)
        self.max_train_queries = None if max_train_queries is None else check_positive_int(
            max_train_queries, "max_train_queries", 1, 1 << 40)
        self.ef_construction = check_positive_int(ef_construction, "ef_construction", 1, MAX_COUNT)
        self.ef_search = check_positive_int(ef_search, "ef_search", 1, MAX_COUNT)
        self.num_entry_points = None if num_entry_points is None else check_positive_int(
            num_entry_points, "num_entry_points", 1, MAX_COUNT)
        self.pivots_per_query = check_positive_int(pivots_per_query, "pivots_per_query", 1, MAX_COUNT)
        if geometric_degree is None:
            geometric_degree = (3 * self.degree) // 8
        self.geometric_degree = check_positive_int(geometric_degree, "geometric_degree", 0, self.degree - 1)
        self.exact_geometric_limit = check_positive_int(exact_geometric_limit, "exact_geometric_limit", 0, 1 << 40)
        self.seed = check_seed(seed)
        self.num_threads = check_num_threads(num_threads)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be None, a str or a torch.device, got {type(device).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        self.device = device
        self.progress = progress
        self.build_stats: dict[str, Any] = {}
        # Searches share self._rw (and the C++ graph's own lock); add / remove take them alone.
        # build makes a new graph on the side and swaps it in under the write lock.
        self._g = core().GraphIndex(self._dim, self.degree)

    @property
    def ntotal(self) -> int:
        return int(self._g.size)

    def build(self, keys: Any, train_queries: Any) -> "AttentionGraphIndex":
        """Build the graph, replacing any previous content.

        keys: ``[N, dim]``; train_queries: ``[Nq, dim]`` (the prefill queries
        of the query heads sharing this KV head). float32/float16/bfloat16,
        numpy or torch.
        """
        k = to_float32_matrix(keys, "keys", self._dim)
        tq = to_float32_matrix(train_queries, "train_queries", self._dim)
        t0 = time.perf_counter()
        cap = self.max_train_queries or _default_train_cap(self.device)
        if tq.shape[0] > cap:
            rng = np.random.default_rng(self.seed)
            tq = tq[np.sort(rng.choice(tq.shape[0], cap, replace=False))]
        bar = _progress_bar(self.progress and k.shape[0] >= 100_000, "graph build")
        _, labels = exact_topk(tq, k, min(self.train_topk, k.shape[0]), device=self.device)
        geo = self._exact_l2_neighbors(k)
        entries = self._query_cluster_entries(tq, labels[:, 0], k.shape[0])
        t_labels = time.perf_counter() - t0
        bar(0.2)
        g = core().GraphIndex(self._dim, self.degree)
        stats = g.build(k, labels, geo, self.geometric_degree, self.ef_construction, len(entries), 256,
                        self.pivots_per_query, self.seed, self.num_threads, entries,
                        lambda f: bar(0.2 + 0.8 * f))
        bar(None)
        with self._rw.write():
            self._g = g  # swapped in only once complete: a failed build keeps the old graph
        stats.update(seconds=time.perf_counter() - t0, label_seconds=t_labels, train_queries=int(tq.shape[0]))
        self.build_stats = stats
        return self

    def _query_cluster_entries(self, train: np.ndarray, top1: np.ndarray, n_keys: int) -> np.ndarray:
        """Entry points that cover the query distribution ``[E]`` int64.

        The training queries are clustered (k-means in L2, seeded, a few
        iterations); each cluster contributes the key that is the best key of
        most of its queries. A decode query then starts next to the keys that
        queries like it preferred, instead of climbing from a few global hubs
        (which strands out-of-distribution queries in the wrong region).
        """
        E = self.num_entry_points or int(np.clip(np.sqrt(n_keys), 8, 1024))
        E = min(E, train.shape[0])
        rng = np.random.default_rng(self.seed)
        cent = train[np.sort(rng.choice(train.shape[0], E, replace=False))].astype(np.float32)
        for _ in range(8):
            assign = _nearest_l2(train, cent, 1, self.device)[:, 0]
            counts = np.bincount(assign, minlength=E)
            sums = np.zeros_like(cent, dtype=np.float64)
            np.add.at(sums, assign, train)
            live = counts > 0
            cent[live] = (sums[live] / counts[live, None]).astype(np.float32)
        assign = _nearest_l2(train, cent, 1, self.device)[:, 0]
        # most frequent pivot per cluster, clusters by size (largest first)
        pairs = np.unique(np.stack([assign, top1]), axis=1, return_counts=True)
        (clu, piv), cnt = pairs
        order = np.lexsort((piv, -cnt, clu))
        clu, piv = clu[order], piv[order]
        first = np.r_[True, clu[1:] != clu[:-1]]
        by_size = np.argsort(-np.bincount(assign, minlength=E)[clu[first]], kind="stable")
        entries = piv[first][by_size]
        return np.ascontiguousarray(entries[np.sort(np.unique(entries, return_index=True)[1])], np.int64)

    def _exact_l2_neighbors(self, keys: np.ndarray) -> np.ndarray:
        """Each key's ``geometric_degree`` nearest keys in L2 ``[N, g]`` when the
        exact O(N^2) pass is affordable, else ``[N, 0]`` (the C++ build then
        finds them by searching the graph)."""
        g = min(self.geometric_degree, keys.shape[0] - 1)
        if g <= 0 or keys.shape[0] > self.exact_geometric_limit:
            return np.zeros((keys.shape[0], 0), np.int64)
        ids = _nearest_l2(keys, keys, g + 1, self.device)  # the key itself is among them
        # drop the key itself wherever ties put it, keep the g others in order
        others = ids != np.arange(keys.shape[0])[:, None]
        order = np.argsort(~others, axis=1, kind="stable")[:, :g]
        return np.ascontiguousarray(np.take_along_axis(ids, order, axis=1))

    @property
    def is_trained(self) -> bool:
        """True once built: :meth:`add` needs the graph that :meth:`build` makes from training queries."""
        return self.ntotal > 0

    def _add_impl(self, x: np.ndarray) -> int:
        """Insert keys produced later, each linked to its nearest keys in L2 found by searching the graph."""
        if self.ntotal == 0:
            raise RuntimeError("AttentionGraphIndex is empty: call build(keys, train_queries) before add()")
        return int(self._g.add(x, self.ef_construction, self.num_threads))

    def _reconstruct_impl(self, ids: np.ndarray) -> np.ndarray:
        return self._g.reconstruct(ids)

    def _remove_impl(self, keep: np.ndarray) -> None:
        self._g.remove(keep, self.ef_construction, self.num_threads)

    def _search_impl(self, q: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ef = self.ef_search if ef is None else check_positive_int(ef, "ef", 1, MAX_COUNT)
        return self._g.search(q, k, max(ef, k), self.num_threads)

    def search_group(self, queries: Any, k: int, ef: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One search per group of queries (the query heads that share a KV head).

        queries ``[ngroups, group, dim]``. Each key visited is read once and
        scored against every query of the group; keys rank by their best score
        in the group. Returns ``(D, I, scanned)``: ``[ngroups, k]`` float32
        and int64 (-1 padded) and ``[ngroups]`` int64 keys read.
        """
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().to("cpu", torch.float32).numpy()
        if not isinstance(queries, np.ndarray) or queries.ndim != 3:
            raise ValueError("queries must be a 3-D array [ngroups, group, dim]")
        flat = to_float32_matrix(queries.reshape(-1, queries.shape[-1]), "queries", self._dim, allow_empty=True)
        k = check_k(k, self.ntotal)
        ef = self.ef_search if ef is None else check_positive_int(ef, "ef", 1, MAX_COUNT)
        if queries.shape[0] == 0 or queries.shape[1] == 0:
            raise ValueError("queries must hold at least one group of at least one query")
        with self._rw.read():
            check_trained(self.ntotal, type(self).__name__)
            return self._g.search_group(flat.reshape(queries.shape), k, max(ef, k), self.num_threads)

    def reachable_count(self) -> int:
        """Keys reachable from the entry points (equals ``ntotal`` for a valid graph)."""
        with self._rw.read():
            return int(self._g.count_reachable())

    def neighbors(self) -> np.ndarray:
        """Out-edges ``[N, degree]`` int32, -1 padded (a copy)."""
        with self._rw.read():
            return self._g.get_state()[1]

    # --- persistence -------------------------------------------------------
    _PARAMS = ("degree", "train_topk", "max_train_queries", "ef_construction", "ef_search", "num_entry_points",
               "pivots_per_query", "geometric_degree", "exact_geometric_limit", "seed", "num_threads")

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        keys, nbrs, entry = self._g.get_state()
        meta = {"dim": self._dim, **{p: getattr(self, p) for p in self._PARAMS}}
        return meta, {"keys": keys, "neighbors": nbrs, "entry_points": entry}

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "AttentionGraphIndex":
        """Rebuild a saved graph; ``ValueError`` unless it is consistent and every key is reachable."""
        idx = cls(meta["dim"], **{p: meta[p] for p in cls._PARAMS}, progress=False)
        keys, nbrs, entry = arrays["keys"], arrays["neighbors"], arrays["entry_points"]
        if keys.dtype != np.float32 or nbrs.dtype != np.int32 or entry.dtype != np.int32:
            raise ValueError("unexpected array dtypes")
        if keys.ndim != 2 or nbrs.shape != (keys.shape[0], idx.degree) or entry.ndim != 1:
            raise ValueError(f"keys {keys.shape}, neighbors {nbrs.shape} (degree {idx.degree}) and entry points "
                             f"{entry.shape} do not fit together")
        if keys.shape[0]:
            to_float32_matrix(keys, "keys", idx.dim)  # NaN / inf / overflowing keys
        idx._g.set_state(keys, nbrs, entry)  # checks ids and entry points
        reached = idx.reachable_count()
        if reached != idx.ntotal:
            raise ValueError(f"only {reached} of {idx.ntotal} keys are reachable from the entry points")
        return idx


def _default_train_cap(device: str | None) -> int:
    """Training queries kept by default: the exact labels are a dense
    ``Nq x N`` product, cheap on a GPU, the bulk of a CPU build."""
    import torch

    from .exact import default_device

    dev = torch.device(device) if device is not None else default_device()
    return 200_000 if dev.type == "cuda" else 32_768


def _nearest_l2(x: np.ndarray, centres: np.ndarray, k: int, device: str | None) -> np.ndarray:
    """Ids of each row's ``k`` nearest centres in L2 ``[n, k]``, nearest first.

    ``argmin |a - c|^2 = argmax [a, 1] . [2c, -|c|^2]``: the blocked
    inner-product top-k of :func:`exact_topk` on augmented vectors.
    """
    q = np.hstack([x, np.ones((x.shape[0], 1), np.float32)])
    c = np.hstack([2 * centres, -np.einsum("ed,ed->e", centres, centres)[:, None]]).astype(np.float32)
    return exact_topk(q, c, k, device=device)[1]


def _progress_bar(enabled: bool, desc: str):
    """Returns ``update(fraction)``; ``update(None)`` closes the bar."""
    if not enabled:
        return lambda f: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda f: None
    bar = tqdm(total=100, desc=desc, unit="%")

    def update(f: float | None) -> None:
        if f is None:
            bar.close()
            return
        bar.n = int(100 * f)
        bar.refresh()

    return update
