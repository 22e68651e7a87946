"""The wave index (RetroInfer): keys clustered segment by segment.

The keys of one KV head are split into segments of ``segment_len`` consecutive
tokens and clustered by spherical (inner-product) k-means inside each segment,
about ``tokens_per_cluster`` tokens per cluster. Each cluster keeps its
centroid (the plain mean of its keys), its size and, when values are given,
the sum of its values (fp32), and the KV itself is stored in cluster order, so
that a cluster is one contiguous run (CSR membership). A query scores every
centroid, takes the ``n_probe`` best clusters and scores their members
exactly. See ``docs/design.md`` ("Wave index") and ``csrc/kmeans.h``.

The clustering runs in C++/OpenMP for CPU input and in torch (same algorithm,
same init, same iterations) when the keys are a CUDA tensor; the index then
lives on that device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._core import core
from ._validate import (INT32_MAX, as_input_type, check_magnitude, check_matrix_shape, check_num_threads,
                        check_positive_int, check_seed, to_float32_matrix)
from .exact import _order_ties_by_id
from .index_base import Index, register_index

__all__ = ["WaveIndex", "segment_bounds", "clusters_for", "cluster_radii"]

_MASK64 = (1 << 64) - 1
_PHASE_STEPS = 1024          # resolution of the init stride phase (csrc/kmeans.cpp: kPhaseSteps)
_SCORE_BUDGET = 1 << 24      # floats of one [queries, C] or [segments, tokens, clusters] score block
_GATHER_BUDGET = {"cpu": 1 << 23, "cuda": 1 << 26}  # floats of member keys a search gathers at once
MAX_KMEANS_ITERS = 10_000


# --------------------------------------------------------------------------- clustering (shared rules)
def cluster_radii(keys: torch.Tensor, centroids: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """Each cluster's radius: the largest distance of a member key from its centroid.

    keys ``[..., N, d]``, centroids ``[..., C, d]``, cluster int64 ``[..., N]`` (each key's cluster; leading dims
    are independent slots). Returns float32 ``[..., C]`` (0 for an empty cluster), computed in float32 on the
    keys' device. The decode step ranks by ``q . c + rank_radius * |q| * radius`` (:mod:`kvstore.attention.
    selection`): an upper bound of a member's score when ``rank_radius`` is 1 (Cauchy-Schwarz)."""
    idx = cluster[..., None].expand(*cluster.shape, centroids.shape[-1])
    dist = (keys.float() - torch.gather(centroids.float(), -2, idx)).norm(dim=-1)
    out = torch.zeros(*centroids.shape[:-1], dtype=torch.float32, device=keys.device)
    return out.scatter_reduce_(-1, cluster, dist, "amax")


def segment_bounds(n: int, tokens_per_cluster: int, segment_len: int) -> list[int]:
    """Segment bounds ``[0, b1, ..., n]`` of ``n`` tokens: runs of ``segment_len``
    tokens, a last run shorter than ``2 * tokens_per_cluster`` joining the previous one."""
    b = list(range(0, n, segment_len)) + [n]
    if len(b) > 2 and b[-1] - b[-2] < 2 * tokens_per_cluster:
        del b[-2]
    return b


def clusters_for(n_s: int, tokens_per_cluster: int) -> int:
    """Clusters of a segment of ``n_s`` tokens: ``max(1, round(n_s / tokens_per_cluster))`` (half up)."""
    return max(1, (2 * n_s + tokens_per_cluster) // (2 * tokens_per_cluster))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _init_rows(n_s: int, C: int, seed: int) -> list[int]:
    """Evenly strided tokens of a segment, phase from ``splitmix64(seed)`` (as in C++)."""
    phase = _splitmix64(seed & _MASK64) % _PHASE_STEPS
    return [((j * _PHASE_STEPS + phase) * n_s) // (C * _PHASE_STEPS) for j in range(C)]


def _normalised(c: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (computed in float64; zero rows stay zero)."""
    cd = c.double()
    return (cd / cd.norm(dim=-1, keepdim=True).clamp_min(1e-300)).float()


def _iterate_segments(X: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Spherical k-means of ``S`` equal-sized segments at once.

    X: centred keys ``[S, L, d]``; c: initial centroids ``[S, C, d]``.
    Returns the final assignment ``[S, L]`` int64 (local cluster ids).
    """
    S, L, d = X.shape
    C = c.shape[1]
    seg = torch.arange(S, device=X.device)[:, None]
    norm2 = None
    for it in range(iters + 1):
        scores = torch.bmm(X, _normalised(c).transpose(1, 2))  # [S, L, C]
        best, a = scores.max(dim=2)  # first maximum wins, as in C++
        del scores
        if it == iters:
            return a
        flat = (seg * C + a).reshape(-1)
        sums = torch.zeros(S * C, d, dtype=torch.float64, device=X.device)
        sums.index_add_(0, flat, X.reshape(-1, d).double())
        cnt = torch.bincount(flat, minlength=S * C)
        means = (sums / cnt.clamp_min(1)[:, None]).float().reshape(S, C, d)
        empty = (cnt == 0).reshape(S, C)
        c = torch.where(empty[..., None], c, means)
        if bool(empty.any()):
            if norm2 is None:
                norm2 = X.double().pow(2).sum(2)
            b = best.double().clamp_min(0)
            resid = norm2 - b * b
            for s in torch.nonzero(empty.any(1)).flatten().tolist():
                ej = torch.nonzero(empty[s]).flatten()
                # farthest from the centroid ray first, ties by lowest token index
                pick = torch.sort(-resid[s], stable=True).indices[:ej.numel()]
                c[s, ej] = X[s, pick]
    raise AssertionError("unreachable")  # pragma: no cover


def _kmeans_torch(keys: torch.Tensor, tokens_per_cluster: int, segment_len: int, iters: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin of ``kvstore._C.segmented_kmeans`` (used for CUDA tensors).

    keys: float32 ``[n, d]`` on any device. Returns ``(assign, centroids,
    sizes)`` on that device: int64 ``[n]``, float32 ``[C, d]`` (plain means of
    the members), float32 ``[C]``.
    """
    n, d = keys.shape
    dev = keys.device
    mean = (keys.double().sum(0) / n).float()
    x = keys - mean
    bounds = segment_bounds(n, tokens_per_cluster, segment_len)
    nseg = len(bounds) - 1
    cs = [clusters_for(bounds[s + 1] - bounds[s], tokens_per_cluster) for s in range(nseg)]
    cbase = np.concatenate([[0], np.cumsum(cs)]).astype(np.int64)
    prov = torch.empty(n, dtype=torch.int64, device=dev)  # provisional global cluster ids
    s0 = 0
    while s0 < nseg:
        L, C = bounds[s0 + 1] - bounds[s0], cs[s0]
        s1 = s0 + 1
        cap = max(1, _SCORE_BUDGET // max(1, L * C))
        while s1 < nseg and s1 - s0 < cap and bounds[s1 + 1] - bounds[s1] == L:
            s1 += 1
        S = s1 - s0
        X = x[bounds[s0]:bounds[s1]].reshape(S, L, d)
        rows = torch.tensor([_init_rows(L, C, seed + s) for s in range(s0, s1)], dtype=torch.int64, device=dev)
        c0 = X[torch.arange(S, device=dev)[:, None], rows]  # [S, C, d]
        a = _iterate_segments(X, c0, iters)
        base = torch.as_tensor(cbase[s0:s1], device=dev)[:, None]
        prov[bounds[s0]:bounds[s1]] = (a + base).reshape(-1)
        s0 = s1
    cnt = torch.bincount(prov, minlength=int(cbase[-1]))
    keep = cnt > 0
    remap = torch.cumsum(keep.to(torch.int64), 0) - 1
    assign = remap[prov]
    counts = cnt[keep]
    sums = torch.zeros(counts.numel(), d, dtype=torch.float64, device=dev).index_add_(0, assign, keys.double())
    centroids = (sums / counts[:, None]).float()
    return assign, centroids, counts.float()


def _kmeans_cpu(keys: np.ndarray, tokens_per_cluster: int, segment_len: int, iters: int, seed: int,
                num_threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, c, s = core().segmented_kmeans(keys, tokens_per_cluster, segment_len, iters, seed, num_threads)
    return torch.from_numpy(a.astype(np.int64)), torch.from_numpy(c), torch.from_numpy(s)


# --------------------------------------------------------------------------- input checks

def _to_tensor(x: Any, name: str, dim: int | None = None, device: torch.device | None = None,
               allow_empty: bool = False) -> torch.Tensor:
    """``x`` as a contiguous float32 ``[n, dim]`` tensor on ``device`` (default:
    its own device; CPU for numpy). Same checks and messages as
    :func:`kvstore._validate.to_float32_matrix`, without moving CUDA tensors
    through the host."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        if not x.dtype.is_floating_point or x.is_complex():
            raise TypeError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {x.dtype}")
        check_matrix_shape(tuple(x.shape), name, dim, allow_empty)
        t = x.detach().to(torch.float32).contiguous()
        if t.numel():
            check_magnitude(float(t.abs().max()), name, t.shape[1])
        return t if device is None else t.to(device)
    t = torch.from_numpy(to_float32_matrix(x, name, dim, allow_empty))
    return t if device is None or torch.device(device).type == "cpu" else t.to(device)


# --------------------------------------------------------------------------- index

@dataclass(frozen=True)
class _State:
    """One consistent snapshot of the index (searches read it without a lock)."""

    centroids: torch.Tensor              # [C, d] float32, plain means
    sizes: torch.Tensor                  # [C] float32
    value_sums: torch.Tensor | None      # [C, dv] float32
    offsets: torch.Tensor                # [C + 1] int64
    order: torch.Tensor                  # [N] int64 input ids in cluster order
    keys_sorted: torch.Tensor            # [N, d] float32
    values_sorted: torch.Tensor | None   # [N, dv] float32
    segment_of_cluster: torch.Tensor     # [C] int64
    num_segments: int
    radii: torch.Tensor | None = None    # [C] float32, derived on first use (WaveIndex.radii)

    @property
    def n(self) -> int:
        return int(self.order.shape[0])

    @property
    def C(self) -> int:
        return int(self.sizes.shape[0])

    @staticmethod
    def empty(dim: int) -> "_State":
        z = torch.zeros
        return _State(z(0, dim), z(0), None, z(1, dtype=torch.int64), z(0, dtype=torch.int64), z(0, dim), None,
                      z(0, dtype=torch.int64), 0)


_FIELDS = ("centroids", "sizes", "value_sums", "offsets", "order", "keys_sorted", "values_sorted",
           "segment_of_cluster")


def _appended(buf: torch.Tensor, used: int, new: torch.Tensor) -> torch.Tensor:
    """Write ``new`` after the first ``used`` rows of ``buf`` (growing it by
    doubling); returns the buffer holding them. Rows below ``used`` are never
    written, so snapshots taken earlier stay valid."""
    need = used + new.shape[0]
    if buf.shape[0] < need:
        grown = torch.empty((max(need, 2 * buf.shape[0]),) + tuple(buf.shape[1:]), dtype=buf.dtype,
                            device=buf.device)
        grown[:used] = buf[:used]
        buf = grown
    buf[used:need] = new
    return buf


@register_index
class WaveIndex(Index):
    """Segmented spherical k-means clusters over keys, searched by centroid then members.

    Args:
        dim: vector dimension (head_dim).
        tokens_per_cluster: mean cluster size; a segment of ``n_s`` tokens gets
            ``max(1, round(n_s / tokens_per_cluster))`` clusters.
        segment_len: tokens per segment (clustered independently).
        kmeans_iters: k-means iterations before the final assignment pass.
        seed: fixes the init's stride phase (build is deterministic for a seed,
            whatever the thread count).
        n_probe: default number of clusters a search scores exactly.
        num_threads: OpenMP threads of the C++ clustering (0: all available).

    After :meth:`build`, with ``N`` tokens and ``C`` clusters, the index holds
    torch tensors on the keys' device (CPU for numpy input):
    ``centroids [C, d]``, ``sizes [C]`` (float32), ``value_sums [C, dv]`` or
    None, ``offsets [C + 1]`` int64 (CSR), ``order [N]`` int64 (input ids in
    cluster order: cluster ``c`` is ``order[offsets[c]:offsets[c + 1]]``),
    ``keys_sorted [N, d]`` and ``values_sorted [N, dv]`` (or None) in that
    order, ``segment_of_cluster [C]`` int64. Treat them as read-only.
    """

    KIND = "wave"

    def __init__(
        self,
        dim: int,
        tokens_per_cluster: int = 16,
        segment_len: int = 8192,
        kmeans_iters: int = 10,
        seed: int = 0,
        n_probe: int = 32,
        num_threads: int = 0,
    ) -> None:
        super().__init__(dim)
        self.tokens_per_cluster = check_positive_int(tokens_per_cluster, "tokens_per_cluster", 1, INT32_MAX)
        self.segment_len = check_positive_int(segment_len, "segment_len", 1, 1 << 62)
        self.kmeans_iters = check_positive_int(kmeans_iters, "kmeans_iters", 0, MAX_KMEANS_ITERS)
        self.seed = check_seed(seed)
        self.n_probe = check_positive_int(n_probe, "n_probe", 1, INT32_MAX)
        self.num_threads = check_num_threads(num_threads)
        self.build_stats: dict[str, Any] = {}
        self._st = _State.empty(self._dim)
        self._bufs: dict[str, torch.Tensor | None] = {f: getattr(self._st, f) for f in _FIELDS}
        # Searches read self._st (one snapshot) under the read lock; build/add/to/remove_ids take the write lock.

    # --- shape and content -------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self._st.n

    @property
    def num_clusters(self) -> int:
        return self._st.C

    @property
    def num_segments(self) -> int:
        return self._st.num_segments

    @property
    def value_dim(self) -> int | None:
        v = self._st.values_sorted
        return None if v is None else int(v.shape[1])

    @property
    def device(self) -> torch.device:
        return self._st.centroids.device

    @property
    def centroids(self) -> torch.Tensor:
        """``[C, d]`` float32: plain mean of each cluster's keys."""
        return self._st.centroids

    @property
    def sizes(self) -> torch.Tensor:
        """``[C]`` float32: members per cluster."""
        return self._st.sizes

    @property
    def value_sums(self) -> torch.Tensor | None:
        """``[C, dv]`` float32 (summed in float64): sum of each cluster's values, or None."""
        return self._st.value_sums

    @property
    def offsets(self) -> torch.Tensor:
        """``[C + 1]`` int64 CSR offsets into ``order`` / ``keys_sorted`` / ``values_sorted``."""
        return self._st.offsets

    @property
    def order(self) -> torch.Tensor:
        """``[N]`` int64: input ids of the tokens, sorted by cluster (input order within one)."""
        return self._st.order

    @property
    def keys_sorted(self) -> torch.Tensor:
        """``[N, d]`` float32 keys in cluster order."""
        return self._st.keys_sorted

    @property
    def values_sorted(self) -> torch.Tensor | None:
        """``[N, dv]`` float32 values in cluster order, or None."""
        return self._st.values_sorted

    @property
    def radii(self) -> torch.Tensor:
        """``[C]`` float32: largest distance of a member key from its centroid (:func:`cluster_radii`), derived
        from the stored keys when first asked for after a change."""
        st = self._st
        if st.radii is None:
            cluster = torch.repeat_interleave(torch.arange(st.C, device=st.offsets.device),
                                              st.offsets[1:] - st.offsets[:-1], output_size=st.n)
            # a cache on the immutable snapshot: concurrent readers may both compute it, to the same value
            object.__setattr__(st, "radii", cluster_radii(st.keys_sorted, st.centroids, cluster))
        return st.radii

    @property
    def segment_of_cluster(self) -> torch.Tensor:
        """``[C]`` int64: the segment each cluster was formed in (segments of later adds continue the count)."""
        return self._st.segment_of_cluster

    def members(self, c: int) -> np.ndarray:
        """Input ids ``[size_c]`` int64 of the tokens of cluster ``c``."""
        st = self._st
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"c must be an int, got {type(c).__name__}")
        if not 0 <= int(c) < st.C:
            raise ValueError(f"c must be in [0, {st.C}), got {c}")
        lo, hi = (int(v) for v in st.offsets[int(c):int(c) + 2].tolist())
        return st.order[lo:hi].cpu().numpy().copy()

    # --- build / add ---------------------------------------------------------
    def build(self, keys: Any, values: Any = None) -> "WaveIndex":
        """Cluster ``keys`` ``[N, dim]`` (and carry ``values`` ``[N, dv]``, any
        ``dv``), replacing any previous content. numpy or torch,
        float32/float16/bfloat16; a CUDA tensor clusters on the GPU and keeps
        the index there. Returns ``self``."""
        kt = _to_tensor(keys, "keys", self._dim)
        vt = None if values is None else _to_tensor(values, "values", device=kt.device)
        if vt is not None and vt.shape[0] != kt.shape[0]:
            raise ValueError(f"values has {vt.shape[0]} rows but keys has {kt.shape[0]}")
        t0 = time.perf_counter()
        with self._rw.write():
            part, nseg = self._cluster(kt, vt, 0, 0)
            state = _State(**part, num_segments=nseg)
            self._bufs = dict(part)
            self._st = state
        self.build_stats = {"seconds": time.perf_counter() - t0, "clusters": state.C, "segments": nseg,
                            "device": str(kt.device)}
        return self

    def add(self, keys: Any, values: Any = None) -> np.ndarray:
        """Append ``keys`` ``[m, dim]`` (with ``values`` ``[m, dv]`` iff the index
        stores values), clustered on their own as new segment(s); returns their
        ids ``[m]`` int64 (continuing from ``ntotal``). On an empty index this
        is :meth:`build`."""
        with self._rw.write():
            st = self._st
            if st.n == 0:
                kt = _to_tensor(keys, "keys", self._dim, allow_empty=True)
                if kt.shape[0] == 0:
                    return as_input_type(keys, np.zeros(0, np.int64))
                self.build(kt, values)
                return as_input_type(keys, np.arange(self.ntotal, dtype=np.int64))
            dev = st.centroids.device
            kt = _to_tensor(keys, "keys", self._dim, device=dev, allow_empty=True)
            vt = None
            if st.values_sorted is not None:
                if values is None:
                    raise ValueError("values are required: this index stores values "
                                     f"(value dim {st.values_sorted.shape[1]})")
                vt = _to_tensor(values, "values", int(st.values_sorted.shape[1]), device=dev, allow_empty=True)
                if vt.shape[0] != kt.shape[0]:
                    raise ValueError(f"values has {vt.shape[0]} rows but keys has {kt.shape[0]}")
            elif values is not None:
                raise ValueError("values given, but this index was built without values")
            if kt.shape[0] == 0:
                return as_input_type(keys, np.zeros(0, np.int64))
            part, nseg = self._cluster(kt, vt, st.n, st.num_segments)
            n, C = st.n, st.C
            used = {"centroids": C, "sizes": C, "value_sums": C, "offsets": C + 1, "order": n,
                    "keys_sorted": n, "values_sorted": n, "segment_of_cluster": C}
            new = dict(part)
            new["offsets"] = part["offsets"][1:] + n
            bufs: dict[str, torch.Tensor | None] = {}
            views: dict[str, torch.Tensor | None] = {}
            for f in _FIELDS:
                if new[f] is None:
                    bufs[f] = views[f] = None
                    continue
                bufs[f] = _appended(self._bufs[f], used[f], new[f])
                views[f] = bufs[f][:used[f] + new[f].shape[0]]
            self._bufs = bufs
            self._st = _State(**views, num_segments=st.num_segments + nseg)
        return as_input_type(keys, np.arange(n, n + kt.shape[0], dtype=np.int64))

    def _cluster(self, kt: torch.Tensor, vt: torch.Tensor | None, id_base: int,
                 seg_base: int) -> tuple[dict[str, torch.Tensor | None], int]:
        """Cluster one call's keys; returns the new clusters' fields (ids from
        ``id_base``, segments from ``seg_base``) and the number of segments."""
        n = kt.shape[0]
        if kt.device.type == "cpu":
            assign, centroids, sizes = _kmeans_cpu(kt.numpy(), self.tokens_per_cluster, self.segment_len,
                                                   self.kmeans_iters, self.seed, self.num_threads)
        else:
            assign, centroids, sizes = _kmeans_torch(kt, self.tokens_per_cluster, self.segment_len,
                                                     self.kmeans_iters, self.seed)
        dev = kt.device
        C = centroids.shape[0]
        bounds = segment_bounds(n, self.tokens_per_cluster, self.segment_len)
        seg_len = torch.tensor(np.diff(bounds), dtype=torch.int64, device=dev)
        seg_of_token = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=dev), seg_len)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=C)
        offsets = torch.zeros(C + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        seg_of_cluster = torch.zeros(C, dtype=torch.int64, device=dev)
        seg_of_cluster[assign[order]] = seg_of_token[order] + seg_base
        part: dict[str, torch.Tensor | None] = {
            "centroids": centroids.to(dev), "sizes": sizes.to(dev), "value_sums": None, "offsets": offsets,
            "order": order + id_base, "keys_sorted": kt[order], "values_sorted": None,
            "segment_of_cluster": seg_of_cluster,
        }
        if vt is not None:
            vs = vt[order]
            sums = torch.zeros(C, vt.shape[1], dtype=torch.float64, device=dev)
            sums.index_add_(0, assign[order], vs.double())
            part["values_sorted"], part["value_sums"] = vs, sums.float()
        return part, len(bounds) - 1

    def to(self, device: str | torch.device) -> "WaveIndex":
        """Move every stored tensor to ``device`` (searches then run there); returns ``self``."""
        device = torch.device(device)
        with self._rw.write():
            st = self._st
            views = {f: (None if getattr(st, f) is None else getattr(st, f).to(device).contiguous())
                     for f in _FIELDS}
            self._bufs = dict(views)
            self._st = _State(**views, num_segments=st.num_segments)
        return self

    # --- faiss conventions: reconstruct, remove_ids, copies ----------------------
    def _reconstruct_impl(self, ids: np.ndarray) -> np.ndarray:
        st = self._st
        pos = torch.empty_like(st.order)
        pos[st.order] = torch.arange(st.n, device=st.order.device)
        return st.keys_sorted[pos[torch.from_numpy(ids).to(pos.device)]].cpu().numpy()

    def _remove_impl(self, keep: np.ndarray) -> None:
        """Drop tokens; clusters keep their other members (plain means and value sums recomputed),
        emptied clusters disappear, ids are renumbered in order."""
        st = self._st
        dev = st.order.device
        if not keep.any():
            self._st = _State.empty(self._dim)
            self._bufs = {f: getattr(self._st, f) for f in _FIELDS}
            return
        keep_t = torch.from_numpy(keep).to(dev)
        rows = keep_t[st.order]                                        # kept rows, in cluster order
        new_id = torch.cumsum(keep_t.to(torch.int64), 0) - 1
        cluster = torch.repeat_interleave(torch.arange(st.C, device=dev), st.offsets[1:] - st.offsets[:-1])[rows]
        cnt = torch.bincount(cluster, minlength=st.C)
        live = cnt > 0
        cluster = (torch.cumsum(live.to(torch.int64), 0) - 1)[cluster]
        cnt = cnt[live]
        keys = st.keys_sorted[rows]
        sums = torch.zeros(cnt.numel(), self._dim, dtype=torch.float64, device=dev).index_add_(0, cluster,
                                                                                                keys.double())
        offsets = torch.zeros(cnt.numel() + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(cnt, 0)
        values = value_sums = None
        if st.values_sorted is not None:
            values = st.values_sorted[rows]
            value_sums = torch.zeros(cnt.numel(), values.shape[1], dtype=torch.float64, device=dev).index_add_(
                0, cluster, values.double()).float()
        views = {"centroids": (sums / cnt[:, None]).float(), "sizes": cnt.float(), "value_sums": value_sums,
                 "offsets": offsets, "order": new_id[st.order[rows]], "keys_sorted": keys, "values_sorted": values,
                 "segment_of_cluster": st.segment_of_cluster[live]}
        self._bufs = dict(views)
        self._st = _State(**views, num_segments=st.num_segments)

    def __copy__(self) -> "WaveIndex":
        return super().__copy__().to(self.device)  # through the file format (CPU), then back where it was

    def __deepcopy__(self, memo: dict) -> "WaveIndex":
        return self.__copy__()

    # --- search --------------------------------------------------------------
    def _search_impl(self, q: np.ndarray, k: int, n_probe: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score every centroid, then the members of the ``n_probe`` best clusters.

        Returns ``D`` float32 ``[nq, k]``, ``I`` int64 ``[nq, k]`` (input ids,
        -1 / -inf padded past the members probed), ``scanned`` int64 ``[nq]``
        = C + members of the probed clusters.
        """
        p = self.n_probe if n_probe is None else check_positive_int(n_probe, "n_probe")
        st = self._st
        C = st.C
        p = min(p, C)
        dev = st.centroids.device
        qt = torch.from_numpy(q).to(dev)
        nq = q.shape[0]
        D = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=dev)
        I = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
        scanned = torch.empty(nq, dtype=torch.int64, device=dev)
        counts = st.offsets[1:] - st.offsets[:-1]
        max_rows = max(1, _GATHER_BUDGET.get(dev.type, _GATHER_BUDGET["cpu"]) // self._dim)
        step = max(1, _SCORE_BUDGET // max(1, C))
        for q0 in range(0, nq, step):
            qb = qt[q0:q0 + step]
            top = torch.topk(qb @ st.centroids.T, p, dim=1).indices  # [b, p]
            cnt = counts[top]
            per_q = cnt.sum(1)
            scanned[q0:q0 + qb.shape[0]] = per_q + C
            rows = per_q.tolist()
            i = 0
            while i < len(rows):  # sub-blocks whose padded gather fits the budget
                j, width = i + 1, rows[i]
                while j < len(rows) and (j - i + 1) * max(width, rows[j]) <= max_rows:
                    width = max(width, rows[j])
                    j += 1
                d_, i_ = _score_members(st, qb[i:j], top[i:j], cnt[i:j], width, k)
                D[q0 + i:q0 + j, :d_.shape[1]] = d_
                I[q0 + i:q0 + j, :i_.shape[1]] = i_
                i = j
        return D.cpu().numpy(), I.cpu().numpy(), scanned.cpu().numpy()

    # --- persistence -------------------------------------------------------
    _PARAMS = ("tokens_per_cluster", "segment_len", "kmeans_iters", "seed", "n_probe", "num_threads")

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        st = self._st
        meta = {"dim": self._dim, **{p: getattr(self, p) for p in self._PARAMS}, "ntotal": st.n,
                "num_clusters": st.C, "num_segments": st.num_segments, "has_values": st.values_sorted is not None}
        arrays = {f: np.ascontiguousarray(getattr(st, f).cpu().numpy()) for f in _FIELDS
                  if getattr(st, f) is not None}
        return meta, arrays

    @classmethod
    def _from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "WaveIndex":
        idx = cls(meta["dim"], **{p: meta[p] for p in cls._PARAMS})
        st = _state_from_arrays(idx.dim, meta, arrays)
        idx._bufs = {f: getattr(st, f) for f in _FIELDS}
        idx._st = st
        return idx


def _score_members(st: _State, qs: torch.Tensor, top: torch.Tensor, cnt: torch.Tensor, width: int,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of the members of each query's probed clusters and their top-k.

    qs ``[b, d]``; top, cnt ``[b, p]`` (probed clusters, their sizes); width =
    the most members any of the ``b`` queries probes. Returns scores and input
    ids ``[b, min(k, width)]``, best first, ties by lower id.
    """
    dev = qs.device
    b = qs.shape[0]
    flat_cnt = cnt.reshape(-1)
    per_q = cnt.sum(1)
    total = int(per_q.sum())
    first = torch.cumsum(flat_cnt, 0) - flat_cnt  # where each probed cluster starts in the flat list
    rows = (torch.repeat_interleave(st.offsets[top].reshape(-1) - first, flat_cnt, output_size=total)
            + torch.arange(total, device=dev))
    qid = torch.repeat_interleave(torch.arange(b, device=dev), per_q, output_size=total)
    pos = torch.arange(total, device=dev) - (torch.cumsum(per_q, 0) - per_q)[qid]
    R = torch.zeros((b, width), dtype=torch.int64, device=dev)
    valid = torch.zeros((b, width), dtype=torch.bool, device=dev)
    R[qid, pos] = rows
    valid[qid, pos] = True
    scores = torch.bmm(st.keys_sorted[R], qs[:, :, None]).squeeze(2).masked_fill(~valid, float("-inf"))
    vs, ix = torch.topk(scores, min(k, width), dim=1)
    ids = torch.where(valid.gather(1, ix), st.order[R.gather(1, ix)], -1)
    return _order_ties_by_id(vs, ids)


def _state_from_arrays(dim: int, meta: dict, arrays: dict[str, np.ndarray]) -> _State:
    """Rebuild a snapshot from saved arrays, rejecting anything inconsistent (ValueError)."""
    def count(name: str) -> int:
        v = meta[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        return v

    n, C, nseg = count("ntotal"), count("num_clusters"), count("num_segments")
    has_values = meta["has_values"]
    if not isinstance(has_values, bool):
        raise ValueError(f"has_values must be a bool, got {has_values!r}")
    # num_segments counts the segments ever formed (removals may empty some of them).
    if (n == 0) != (C == 0) or C > n or (n > 0 and nseg < 1) or nseg > 1 << 62:
        raise ValueError(f"inconsistent counts: ntotal={n}, num_clusters={C}, num_segments={nseg}")

    def get(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        a = arrays[name]
        if a.dtype != dtype or a.shape != shape:
            raise ValueError(f"{name} must be {np.dtype(dtype)} of shape {shape}, got {a.dtype} {a.shape}")
        if a.dtype.kind == "f" and a.size:
            top = max(float(a.max()), -float(a.min()))
            if name in ("centroids", "keys_sorted", "values_sorted"):
                check_magnitude(top, name, a.shape[-1])  # NaN / inf / overflowing scores
            elif not np.isfinite(top):
                raise ValueError(f"{name} contains NaN or inf")
        return a

    centroids = get("centroids", np.float32, (C, dim))
    sizes = get("sizes", np.float32, (C,))
    offsets = get("offsets", np.int64, (C + 1,))
    order = get("order", np.int64, (n,))
    keys_sorted = get("keys_sorted", np.float32, (n, dim))
    seg = get("segment_of_cluster", np.int64, (C,))
    values_sorted = value_sums = None
    if has_values:
        vs = arrays["values_sorted"]
        if vs.ndim != 2 or vs.shape[1] == 0:
            raise ValueError(f"values_sorted must be 2-D [ntotal, dv], got shape {vs.shape}")
        values_sorted = get("values_sorted", np.float32, (n, vs.shape[1]))
        value_sums = get("value_sums", np.float32, (C, vs.shape[1]))
    elif "values_sorted" in arrays or "value_sums" in arrays:
        raise ValueError("values stored but has_values is false")
    sizes_i = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != n or (sizes_i < 1).any():
        raise ValueError("offsets must rise strictly from 0 to ntotal")
    if not (sizes == sizes_i.astype(np.float32)).all():
        raise ValueError("sizes do not match offsets")
    if n and (order.min() < 0 or order.max() >= n or not (np.bincount(order, minlength=n) == 1).all()):
        raise ValueError("order is not a permutation of 0..ntotal-1")
    if C and (seg[0] < 0 or seg[-1] >= nseg or (np.diff(seg) < 0).any()):
        raise ValueError("segment_of_cluster must be non-decreasing in [0, num_segments)")
    t = torch.from_numpy
    return _State(t(centroids), t(sizes), None if value_sums is None else t(value_sums), t(offsets), t(order),
                  t(keys_sorted), None if values_sorted is None else t(values_sorted), t(seg), nseg)
