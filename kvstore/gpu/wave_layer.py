"""One layer's wave attention on the GPU (RetroInfer), in two modes.

* ``gpu_only``: the whole KV, in cluster order, stays on the GPU; the index
  only saves reads.
* ``offload``: the KV lives in pinned CPU memory in cluster order; the GPU holds
  the steady zone, the meta index (centroids, sizes, value sums) and a cache of
  clusters in fixed pages (``cache_ratio`` of the indexed tokens), LRU at
  cluster granularity (:class:`kvstore.gpu.wave_buffer.WaveBuffer`, planned on a
  C++ thread pool with the GIL released). Missed clusters are read zero-copy
  over the bus by the attention kernel and admitted into the cache afterwards
  by the copy kernel, on the same stream.

Layout: the ``G = B * Hkv`` head slots of a layer are batched. Slot ``g``
holds its sink + recent tokens in the steady buffer ``[G, S_cap, D]`` and its
middle tokens in cluster order, rows ``g * n : (g + 1) * n`` of the sorted KV
``[G * n, D]``; cluster ``c`` of slot ``g`` is rows ``offsets[g, c] :
offsets[g, c + 1]`` of the slot.

A decode step: rank every centroid of the slot with each query head of its
group (:func:`kvstore.gpu.cluster_ops.cluster_scores`), take the ``r`` best
clusters (retrieval zone, exact) and the next ``e`` (estimation zone), and run
:func:`kvstore.gpu.attention_ops.sparse_decode_attention` over the steady run +
the retrieval runs, merged with the estimation partial by log-sum-exp.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import GPU_MODES, StoreConfig
from ..wave import cluster_radii, clusters_for, segment_bounds

MODES = GPU_MODES
SRC_HOST, SRC_CACHE, SRC_STEADY = 0, 1, 2   # source ids of the offload run table (kvstore.gpu.wave_buffer)


@dataclass
class WaveGpuConfig:
    """Budgets and layout of :class:`GpuWaveLayer` (the budgets and their defaults are :class:`StoreConfig`'s).

    candidates / retrieval / estimation / candidates_floor / retrieval_floor / calibrate / estimate_rest /
    rank_radius: the wave step's budgets and ranking (:mod:`kvstore.attention.selection`,
    :meth:`StoreConfig.wave_budget`); centroid_dtype: ``"int8"`` (centroids stored and read as int8 with a float32
    scale a cluster) or ``"kv"`` (the KV dtype); candidate_dtype: ``"int8"`` (gpu_only: the candidates' keys
    scored from int8 copies of the sorted keys, a float32 scale a key, kept beside them) or ``"kv"`` (the stored
    keys; offload always scores those); estimator: the cluster
    scores the step ranks and estimates with, ``"centroid"`` (``q.c``) or ``"fs_iso"`` (:mod:`kvstore.gpu.estimation`:
    the finite-sample correction ``q.c + g_n(sigma)`` from each cluster's isotropic key variance, ranked by estimated
    mass); cache_ratio: offload mode, share of the indexed tokens the GPU cache holds; page_tokens: cache page
    size; update_interval: recent tokens beyond the window that are clustered and appended to the index at once;
    cuda_graph: capture the gpu_only decode step in a CUDA graph. The offload mode runs the published step
    (the best clusters attended whole, the next estimated, the rest dropped) with these budgets' candidates as its
    retrieval zone.
    """

    mode: str = StoreConfig.gpu_mode
    cache_ratio: float = StoreConfig.cache_ratio
    sink: int = StoreConfig.sink
    window: int = StoreConfig.window
    candidates: float | int = StoreConfig.candidates
    retrieval: float | int = StoreConfig.retrieval
    estimation: float | int = StoreConfig.estimation
    candidates_floor: int = StoreConfig.candidates_floor
    retrieval_floor: int = StoreConfig.retrieval_floor
    calibrate: bool = StoreConfig.calibrate
    estimate_rest: bool = StoreConfig.estimate_rest
    rank_radius: float = StoreConfig.rank_radius
    centroid_dtype: str = StoreConfig.centroid_dtype
    candidate_dtype: str = StoreConfig.candidate_dtype
    estimator: str = StoreConfig.gpu_estimator
    tokens_per_cluster: int = StoreConfig.tokens_per_cluster
    segment_len: int = StoreConfig.segment_len
    kmeans_iters: int = StoreConfig.kmeans_iters
    page_tokens: int = 8
    update_interval: int = StoreConfig.update_interval
    num_threads: int | None = None
    cuda_graph: bool = True
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.page_tokens <= 1 << 20:
            raise ValueError(f"page_tokens must be in [1, 2**20], got {self.page_tokens}")
        from .estimation import ESTIMATORS

        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.backend not in ("auto", "torch", "cuda"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {self.backend!r}")
        self._store = self.store_config()      # validates the shared fields with StoreConfig's messages

    @classmethod
    def from_store(cls, c: StoreConfig, **layer: Any) -> "WaveGpuConfig":
        """The layer configuration of a store's config; ``layer`` sets the layer's own fields (page_tokens,
        cuda_graph, backend) or replaces shared ones."""
        kw = dict(mode=c.gpu_mode, cache_ratio=c.cache_ratio, sink=c.sink, window=c.window, candidates=c.candidates,
                  retrieval=c.retrieval, estimation=c.estimation, candidates_floor=c.candidates_floor,
                  retrieval_floor=c.retrieval_floor, calibrate=c.calibrate, estimate_rest=c.estimate_rest,
                  rank_radius=c.rank_radius, centroid_dtype=c.centroid_dtype,
                  candidate_dtype=c.candidate_dtype, estimator=c.gpu_estimator, tokens_per_cluster=c.tokens_per_cluster,
                  segment_len=c.segment_len,
                  kmeans_iters=c.kmeans_iters, update_interval=c.update_interval,
                  num_threads=c.num_threads or None, seed=c.seed)
        return cls(**{**kw, **layer})

    def store_config(self) -> StoreConfig:
        """The equivalent :class:`StoreConfig` (method wave)."""
        names = ("sink", "window", "candidates", "retrieval", "estimation", "candidates_floor", "retrieval_floor",
                 "calibrate", "estimate_rest", "rank_radius", "centroid_dtype", "candidate_dtype", "tokens_per_cluster",
                 "segment_len", "kmeans_iters", "update_interval", "seed", "cache_ratio")
        return StoreConfig(method="wave", gpu_mode=self.mode, gpu_estimator=self.estimator,
                           num_threads=self.num_threads or 0, **{n: getattr(self, n) for n in names})

    def budget(self, context: int, indexed: int):
        """The step's budgets in tokens (:class:`kvstore.attention.selection.WaveBudget`)."""
        return self._store.wave_budget(context, indexed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_store", None)
        return d


def _stage_host_runs(kv_k: torch.Tensor, kv_v: torch.Tensor, src: torch.Tensor, row: torch.Tensor,
                     length: torch.Tensor, copy_src_row: torch.Tensor, dev: torch.device) -> tuple[Any, ...]:
    """Without pinned memory the kernel cannot read the host KV: copy the rows of the step's host runs to the
    device and point the host runs (and the admissions, which come from them) at that staging copy."""
    from .attention_ops import KVSource

    host = torch.nonzero(src == SRC_HOST).flatten()
    starts, lens = row[host], length[host].to(torch.int64)
    stage_off = torch.cumsum(lens, 0) - lens
    idx = torch.repeat_interleave(starts - stage_off, lens) + torch.arange(int(lens.sum()))
    staged = KVSource(kv_k[idx].to(dev), kv_v[idx].to(dev))
    row = row.clone()
    row[host] = stage_off
    if copy_src_row.numel():
        order = torch.argsort(starts)
        i = order[torch.searchsorted(starts[order], copy_src_row, right=True) - 1]
        copy_src_row = stage_off[i] + (copy_src_row - starts[i])
    return staged, row, copy_src_row


# Middle tokens (per KV head) clustered in one k-means call: sequences of one length are grouped up to this many
# tokens, so that the work space (f32 keys) stays near that of one 512K-token sequence.
_GROUP_TOKENS = 1 << 19


def _clusters_of(m: int, cfg: "WaveGpuConfig") -> int:
    """Clusters the k-means makes of m middle tokens (every segment's share)."""
    if m == 0:
        return 0
    b = segment_bounds(m, cfg.tokens_per_cluster, cfg.segment_len)
    return sum(clusters_for(b[i + 1] - b[i], cfg.tokens_per_cluster) for i in range(len(b) - 1))


def _contiguous(r: torch.Tensor) -> bool:
    """Whether the (CPU, ascending) positions r are one range."""
    return r.numel() == 0 or int(r[-1]) - int(r[0]) + 1 == r.numel()


def _build_groups(rows: list[torch.Tensor], sink: list[int], mid: list[int], H: int) -> list[tuple[int, int]]:
    """Runs [b0, b1) of consecutive sequences clustered together: one middle length, their middle tokens a range
    at one offset, at most _GROUP_TOKENS tokens a head (sequences without middle tokens are skipped)."""
    out: list[tuple[int, int]] = []
    for b, m in enumerate(mid):
        if not m:
            continue
        start = int(rows[b][sink[b]]) if _contiguous(rows[b]) else -1
        if out:
            b0, b1 = out[-1]
            same = (b1 == b and mid[b0] == m and start >= 0 and _contiguous(rows[b0])
                    and int(rows[b0][sink[b0]]) == start and (b1 - b0 + 1) * m <= _GROUP_TOKENS)
            if same:
                out[-1] = (b0, b + 1)
                continue
        out.append((b, b + 1))
    return out


def _middle(x: torch.Tensor, rows: list[torch.Tensor], sink: list[int], mid: list[int], b0: int, b1: int,
            dev: torch.device) -> torch.Tensor:
    """The middle tokens of sequences b0 .. b1 - 1 (one group of _build_groups) on dev: x [B, H, N, D] ->
    [(b1 - b0) * H, m, D], a view of x where possible."""
    m = mid[b0]
    r = rows[b0]
    if _contiguous(r):
        s0 = int(r[sink[b0]])
        part = x[b0:b1, :, s0:s0 + m]
    else:
        part = x[b0:b1][:, :, r[sink[b0]:sink[b0] + m].to(x.device)]
    return part.reshape((b1 - b0) * x.shape[1], m, x.shape[3]).to(dev)


def _check_kv(k: Any, v: Any) -> None:
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, Hkv, N, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, Hkv, N]")
    if k.shape[2] == 0 or k.shape[0] == 0 or k.shape[1] == 0:
        raise ValueError(f"k must hold at least one token of one sequence, got shape {tuple(k.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k ({k.dtype}) and v ({v.dtype}) must have one dtype")


class GpuWaveLayer:
    """Wave attention of one layer for a batch of sequences of equal length (see module docstring).

    Build with :meth:`build`; :meth:`decode` attends a step's queries, :meth:`append` adds the step's new
    key/value. ``stats()`` reports memory and what the last step read.
    """

    def __init__(self) -> None:  # use build()
        self.cfg: WaveGpuConfig
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_failed = False

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, k: torch.Tensor, v: torch.Tensor, config: WaveGpuConfig | None = None,
              device: str | torch.device | None = None, mask: torch.Tensor | None = None,
              lengths: Any = None) -> "GpuWaveLayer":
        """Index a prefilled layer.

        k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]`` (bf16/fp16/f32; CUDA, or CPU in which case each sequence is
        moved to ``device`` for clustering); mask ``[B, N]`` bool (True: real token; padding on either side, as
        left-padded batches have) or None. Each sequence's first ``sink`` and last ``window`` real tokens form
        its steady zone; its middle tokens are clustered by segmented spherical k-means, one sequence at a time.
        Sequences of different lengths share the layer: every slot keeps its own lengths, and its step is the
        one it would have alone.
        """
        from .cluster_ops import cluster_order  # noqa: F401 - fail early if the ops are missing
        from .kmeans import segmented_kmeans_gpu

        del lengths  # the mask says it
        cfg = config or WaveGpuConfig()
        _check_kv(k, v)
        self = cls()
        self.cfg = cfg
        dev = torch.device(device) if device is not None else (k.device if k.is_cuda else
                                                               torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu"))
        if dev.type == "cuda" and dev.index is None:  # "cuda" is the current device, as tensors put there say
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = dev, k.dtype
        B, H, N, D = k.shape
        Dv = v.shape[-1]
        self.B, self.Hkv, self.D, self.Dv = B, H, D, Dv
        G = B * H
        self.G = G
        self.scale = 1.0 / math.sqrt(D)
        t0 = time.perf_counter()
        rows = [torch.arange(N) if mask is None else mask[b].to("cpu", torch.bool).nonzero().squeeze(1)
                for b in range(B)]
        seq = [int(r.numel()) for r in rows]
        sink = [min(cfg.sink, n) for n in seq]
        win = [min(cfg.window, n - s) for n, s in zip(seq, sink)]
        mid = [n - s - w for n, s, w in zip(seq, sink, win)]
        self.seq_len = seq
        self.sink_len = [x for x in sink for _ in range(H)]                              # per slot
        self.steady_len = [s + w for s, w in zip(sink, win) for _ in range(H)]
        self.mid_len = [x for x in mid for _ in range(H)]
        self.n = max(mid)
        # steady zone: sink + window, with room for update_interval new tokens before re-indexing
        self.s_cap = cfg.sink + cfg.window + cfg.update_interval
        self.steady_k = torch.zeros(G, self.s_cap, D, dtype=k.dtype, device=dev)
        self.steady_v = torch.zeros(G, self.s_cap, Dv, dtype=k.dtype, device=dev)
        for b in range(B):
            rb = rows[b].to(k.device)
            sl = slice(b * H, (b + 1) * H)
            st = torch.cat([rb[:sink[b]], rb[seq[b] - win[b]:]])
            self.steady_k[sl, :st.numel()] = k[b][:, st].to(dev)
            self.steady_v[sl, :st.numel()] = v[b][:, st].to(dev)
        self._alloc_index(max(_clusters_of(m, cfg) for m in mid), k.dtype)
        for b0, b1 in _build_groups(rows, sink, mid, H):
            kb, vb = _middle(k, rows, sink, mid, b0, b1, dev), _middle(v, rows, sink, mid, b0, b1, dev)
            a, cen, sizes = segmented_kmeans_gpu(kb, cfg.tokens_per_cluster, cfg.segment_len, cfg.kmeans_iters,
                                                 cfg.seed, backend=cfg.backend)
            self._store_sequences(slice(b0 * H, b1 * H), kb, vb, a, cen, sizes)
            del kb, vb, a, cen, sizes
        self._finish_build()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.build_seconds = time.perf_counter() - t0
        self._last: dict[str, Any] = {}
        self.reset_stats()
        return self

    @property
    def length(self) -> int:
        """Tokens seen by the longest sequence."""
        return max(self.seq_len)

    def seq_lengths(self) -> list[int]:
        """Tokens seen per sequence."""
        return list(self.seq_len)

    def _alloc_index(self, C: int, dtype: torch.dtype) -> None:
        """Empty clusters (size 0, never read) and ``n`` rows a slot; every slot's CSR ends at its own rows."""
        G, dev, n = self.G, self.device, self.n
        self.C = C
        int8 = self.cfg.centroid_dtype == "int8"
        self.centroids = torch.zeros(G, C, self.D, dtype=torch.int8 if int8 else dtype, device=dev)  # ranking copy
        self.centroid_scale = torch.zeros(G, C, dtype=torch.float32, device=dev)      # int8 centroids only
        self.sizes = torch.zeros(G, C, dtype=torch.float32, device=dev)
        self.value_sums = torch.zeros(G, C, self.Dv, dtype=torch.float32, device=dev)
        self.key_var = torch.zeros(G, C, dtype=torch.float32, device=dev)            # isotropic, fs_iso only
        self.radii = torch.zeros(G, C, dtype=torch.float32, device=dev)              # largest member distance
        self.offsets = torch.zeros(G, C + 1, dtype=torch.int64, device=dev)           # rows within the slot
        if self.cfg.mode == "gpu_only":
            self.kv_k = torch.zeros(G * n, self.D, dtype=dtype, device=dev)
            self.kv_v = torch.zeros(G * n, self.Dv, dtype=dtype, device=dev)
            self.pinned = False
        else:
            self._alloc_pinned_kv(G * n)  # every slot's rows are written by _store_sequences

    def _int8_centroids(self) -> bool:
        return self.centroids.dtype == torch.int8

    def _centroid_scale(self) -> torch.Tensor | None:
        """The int8 centroids' scales [G, C] (None: centroids in the KV dtype)."""
        return self.centroid_scale if self._int8_centroids() else None

    def centroid_values(self) -> torch.Tensor:
        """The centroids [G, C, D] as float32 (int8 ones dequantized)."""
        from .cluster_ops import dequantize_rows

        return dequantize_rows(self.centroids, self._centroid_scale())

    def _put_centroids(self, centroids: torch.Tensor, scales: torch.Tensor, rows: Any, cols: slice,
                       cen: torch.Tensor) -> None:
        """Write float centroids ``cen`` [S, Cb, D] into ``centroids[rows, cols]`` in the stored form."""
        if centroids.dtype == torch.int8:
            from .cluster_ops import quantize_rows

            centroids[rows, cols], scales[rows, cols] = quantize_rows(cen)
        else:
            centroids[rows, cols] = cen.to(centroids.dtype)

    def _load_centroids(self, arrays: dict[str, Any], tensor: Any) -> None:
        """Centroids of a saved layer in this config's form (a file of the other form is converted)."""
        G, C = self.G, self.C
        import numpy as np

        saved_int8 = "centroid_scale" in arrays and np.asarray(arrays["centroids"]).dtype == np.int8
        if saved_int8:
            cen = tensor("centroids", torch.int8)
            scale = tensor("centroid_scale", torch.float32)
            if not torch.isfinite(scale).all() or (scale < 0).any():
                raise ValueError("centroid_scale must be finite and >= 0")
            cen_f = cen.float() * scale[..., None]
        else:
            cen_f = tensor("centroids", torch.float32)
        self.centroids = torch.zeros(G, C, self.D, dtype=torch.int8 if self.cfg.centroid_dtype == "int8"
                                     else self.dtype, device=self.device)
        self.centroid_scale = torch.zeros(G, C, dtype=torch.float32, device=self.device)
        if saved_int8 and self.cfg.centroid_dtype == "int8":
            self.centroids, self.centroid_scale = cen, scale
        else:
            self._put_centroids(self.centroids, self.centroid_scale, slice(None), slice(None), cen_f)

    def _alloc_pinned_kv(self, rows: int) -> None:
        """Offload: kv_k / kv_v of ``rows`` rows in pinned host memory (pageable, with a warning, if pinning
        fails)."""
        from .wave_buffer import pinned_empty

        self.kv_k, p1 = pinned_empty((rows, self.D), self.dtype)
        self.kv_v, p2 = pinned_empty((rows, self.Dv), self.dtype)
        self.pinned = p1 and p2

    def _set_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The sorted KV becomes k [rows, D], v [rows, Dv]: taken as they are on the device (gpu_only) or copied
        into pinned host memory (offload)."""
        if self.cfg.mode == "gpu_only":
            self.kv_k, self.kv_v, self.pinned = k.to(self.device, self.dtype), v.to(self.device, self.dtype), False
        else:
            self._alloc_pinned_kv(k.shape[0])
            self.kv_k.copy_(k)
            self.kv_v.copy_(v)

    def _store_sequences(self, sl: slice, kb: torch.Tensor, vb: torch.Tensor, assign: torch.Tensor,
                         cen: torch.Tensor, sizes: torch.Tensor) -> None:
        """Write the clusters of the slots ``sl`` (sequences of one middle length m): kb/vb [S, m, D],
        assign [S, m], cen [S, C_b, D] f32, sizes [S, C_b]."""
        from .cluster_ops import cluster_order, cluster_store

        H, m = kb.shape[0], kb.shape[1]
        Cb = cen.shape[1]
        order, offsets = cluster_order(assign, Cb)                                       # [S, m], [S, Cb+1]
        self._put_centroids(self.centroids, self.centroid_scale, sl, slice(0, Cb), cen)
        self.sizes[sl, :Cb] = sizes.float()
        self.offsets[sl, :Cb + 1] = offsets.to(torch.int64)
        self.offsets[sl, Cb + 1:] = m                                                  # empty clusters at the end
        if self.cfg.estimator == "fs_iso":
            from .estimation import isotropic_variance

            self.key_var[sl, :Cb] = isotropic_variance(kb, assign, Cb)
        kv_k = self.kv_k.view(self.G, self.n, self.D)
        kv_v = self.kv_v.view(self.G, self.n, self.Dv)
        on_device = kv_k.device == kb.device
        # sorted straight into the index (gpu_only), or on the device and then into pinned memory as one DMA each
        out_k = kv_k[sl] if on_device else torch.empty(H, m, self.D, dtype=self.dtype, device=kb.device)
        out_v = kv_v[sl] if on_device else torch.empty(H, m, self.Dv, dtype=self.dtype, device=kb.device)
        vs, radii = cluster_store(kb.to(self.dtype), vb.to(self.dtype), assign, order, offsets, cen, out_k, out_v)
        self.value_sums[sl, :Cb] = vs
        self.radii[sl, :Cb] = radii
        if not on_device:
            kv_k[sl, :m].copy_(out_k, non_blocking=self.pinned)
            kv_v[sl, :m].copy_(out_v, non_blocking=self.pinned)
        if m < self.n and self.kv_k.device.type == "cpu":  # rows no cluster holds, never read: zeros, not garbage
            kv_k[sl, m:].zero_()
            kv_v[sl, m:].zero_()

    def _finish_build(self) -> None:
        cfg, G, dev = self.cfg, self.G, self.device
        self.slot_base = torch.arange(G, device=dev, dtype=torch.int64) * self.n      # first row of each slot
        # read by the (graph-captured) decode step, updated in place by append()
        self._steady_len_dev = torch.tensor(self.steady_len, dtype=torch.int64, device=dev)
        self._steady_row = torch.arange(G, device=dev, dtype=torch.int64) * self.s_cap
        self._layout_r = None
        from ..attention.selection import ClusterBounds

        # [G, C, Dv] in the KV dtype: the step reads the mean values of every zone cluster (as many bytes as the
        # exact tokens' values at the default budgets); float32 would double that
        self.mean_values = (self.value_sums / self.sizes.clamp_min(1)[..., None]).to(self.dtype)
        self.value_mean = self.value_sums.sum(1) / self.sizes.sum(1, keepdim=True).clamp_min(1)  # [G, Dv]
        self.bounds = ClusterBounds(self.sizes)
        self.key_codes, self.key_scale = self._key_copies() if cfg.mode == "gpu_only" else (None, None)
        if cfg.estimator == "fs_iso":
            from .estimation import fs_table

            nmax = max(1, int(self.sizes.max())) if self.C else 1
            self._fs_table, self._fs_slope = fs_table(nmax, dev)
            self._key_sd = self.key_var.sqrt()
            self._log_sizes = torch.log(self.sizes)                                  # -inf for empty clusters
            self._value_mean = self.value_sums.sum(1) / self.sizes.sum(1, keepdim=True).clamp_min(1)
        if cfg.mode == "offload":
            from .wave_buffer import WaveBuffer

            pages = int(cfg.cache_ratio * self.n) // cfg.page_tokens
            self.pages_per_slot = pages
            rows = (self.offsets + self.slot_base[:, None]).cpu()
            self.buffer = WaveBuffer(rows, pages, cfg.page_tokens, cfg.num_threads)
            self.cache_k = torch.zeros(G * pages * cfg.page_tokens, self.D, dtype=self.dtype, device=dev)
            self.cache_v = torch.zeros(G * pages * cfg.page_tokens, self.Dv, dtype=self.dtype, device=dev)
            self.steady_rows = torch.arange(G, dtype=torch.int64) * self.s_cap
        self._graph = None

    def _key_copies(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """candidate_dtype int8: int8 copies of the sorted keys ``[G * n, D]`` and their float32 scales ``[G * n]``
        (:func:`kvstore.gpu.cluster_ops.quantize_rows`), made a chunk of rows at a time so that the float
        intermediate stays small; (None, None) for ``"kv"``."""
        if self.cfg.candidate_dtype != "int8":
            return None, None
        from .cluster_ops import quantize_rows

        rows = self.kv_k.shape[0]
        codes = torch.empty(rows, self.D, dtype=torch.int8, device=self.kv_k.device)
        scale = torch.empty(rows, dtype=torch.float32, device=self.kv_k.device)
        step = max(1, (1 << 26) // max(self.D, 1))
        for i in range(0, rows, step):
            codes[i:i + step], scale[i:i + step] = quantize_rows(self.kv_k[i:i + step])
        return codes, scale

    # ------------------------------------------------------------------ decode
    def _check_q(self, q: Any) -> torch.Tensor:
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 3 or q.shape[0] != self.B or q.shape[2] != self.D or q.shape[1] % self.Hkv:
            raise ValueError(f"q must be [B={self.B}, Hq (a multiple of {self.Hkv}), D={self.D}], "
                             f"got {tuple(q.shape)}")
        if q.device != self.device:
            raise ValueError(f"q is on {q.device}, the layer on {self.device}")
        if q.dtype != self.dtype:
            raise TypeError(f"q must be {self.dtype} like the KV, got {q.dtype}")
        return q

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """q ``[B, Hq, D]`` -> o ``[B, Hq, Dv]`` (q's dtype): one decode step of attention."""
        return self.decode_with_lse(q)[0]

    def decode_with_lse(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`decode`, also returning lse ``[B, Hq]`` (f32) of the attended part."""
        q = self._check_q(q)
        if self.cfg.mode == "offload":
            return self._decode_offload(q)
        if self.cfg.cuda_graph and self.device.type == "cuda" and not self._graph_failed:
            return self._decode_graphed(q)
        return self._decode_gpu_only(q)

    def _rank(self, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scores for the estimation zone [G, Hg, C], retrieval ids [G, r], estimation ids [G, e], lse of the
        clusters outside both zones [G, Hg] or None)."""
        from .cluster_ops import cluster_scores, select_clusters

        r, e = self.cfg.budget(self.length, self.n).clusters(self.n, self.C)   # the published step: one count
        if self.cfg.estimator == "centroid":
            scores, probs = cluster_scores(qg, self.centroids, self.sizes, self.scale, backend=self.cfg.backend,
                                           radii=self.radii if self.cfg.rank_radius else None,
                                           rank_radius=self.cfg.rank_radius, centroid_scale=self._centroid_scale())
            ret, est = select_clusters(probs, r, e, backend=self.cfg.backend)
            return scores, ret, est, None
        from .estimation import fs_cluster_scores

        G, Hg = qg.shape[0], qg.shape[1]
        scores, probs, lse_all = fs_cluster_scores(qg, self.centroids, self.sizes, self._key_sd, self._fs_table,
                                                   self._fs_slope, self.scale, backend=self.cfg.backend,
                                                   centroid_scale=self._centroid_scale())
        ret, est = select_clusters(probs, r, e, backend=self.cfg.backend)
        live = torch.isfinite(lse_all)                                   # [G, Hg]; False: no live cluster
        top = torch.where(live, lse_all, torch.zeros_like(lse_all))
        ids = torch.cat([ret, est], 1)                                   # [G, r + e]
        picked = (torch.gather(scores, 2, ids[:, None, :].expand(G, Hg, r + e))
                  + torch.gather(self._log_sizes, 1, ids)[:, None, :])
        left = 1 - torch.exp(torch.logsumexp(picked, -1) - top)          # share of the mass outside both zones
        lse_rest = torch.where(live & (left > 0), lse_all + torch.log(left.clamp_min(1e-30)),
                               torch.full_like(left, -math.inf))
        return scores, ret, est, lse_rest

    def _attend(self, qg: torch.Tensor, sources: list, runs, est_part, r: int, rest: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The sparse attention of a step: qg [G, Hg, D] over ``runs`` into ``sources`` (the steady zone's
        source appended last), the estimation zone ``est_part`` and, for fs_iso, the rest term. Returns
        (o [G, Hg, Dv], lse [G, Hg], estimation clusters a slot)."""
        from .attention_ops import KVSource, sparse_decode_attention

        sources = sources + [KVSource(self.steady_k.view(-1, self.D), self.steady_v.view(-1, self.Dv))]
        e = 0 if est_part is None else est_part.ids.shape[1]
        ns, es = self._splits(qg.shape[1], r, e)
        o, lse = sparse_decode_attention(qg, sources, runs, est_part, self.scale, backend=self.cfg.backend,
                                         num_splits=ns, est_splits=es or None)
        o, lse = self._add_rest(o, lse, rest)
        return o, lse, e

    def _add_rest(self, o: torch.Tensor, lse: torch.Tensor, lse_rest: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge o [G, Hg, Dv] / lse [G, Hg] with the clusters outside both zones (fs_iso): their estimated mass
        with the slot's mean value."""
        if lse_rest is None:
            return o, lse
        from .attention_ops import merge_attention_partials

        G, Hg = lse.shape
        o_rest = self._value_mean[:, None, :].expand(G, Hg, self.Dv)
        mo, ml = merge_attention_partials(torch.stack([o.float(), o_rest]).reshape(2, G * Hg, self.Dv),
                                          torch.stack([lse, lse_rest]).reshape(2, G * Hg), out_dtype=o.dtype,
                                          backend=self.cfg.backend)
        return mo.reshape(G, Hg, self.Dv), ml.reshape(G, Hg)

    def _run_layout(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids and CSR offsets of the gpu_only run table (steady run, then r clusters a slot): constant
        for a given r, so made once (not in every step, nor in every captured graph)."""
        if self._layout_r != r:
            G, dev = self.G, self.device
            src = torch.zeros(G, r + 1, dtype=torch.int32, device=dev)
            src[:, 0] = 1
            self._layout = (src.reshape(-1), (torch.arange(G + 1, device=dev, dtype=torch.int32) * (r + 1)))
            self._layout_r = r
        return self._layout

    def _splits(self, Hg: int, r: int, e: int) -> tuple[int, int]:
        """Kernel blocks per slot (exact, estimation) for r retrieved clusters of ~n / C rows and e estimated."""
        from .attention_ops import plan_splits

        rows = max(self.steady_len) + (r * self.n) // max(self.C, 1)
        return plan_splits(self.G, Hg, self.D, self.Dv, self.dtype, rows, e, self.device)

    def _slots(self):
        from ..attention.selection import SteadyZone, WaveSlots

        int8_keys = self.key_codes is not None
        slots = WaveSlots(self.centroids, self.sizes, self.mean_values, self.value_mean, self.offsets,
                          self.key_codes if int8_keys else self.kv_k, self.kv_v, self.slot_base,
                          self.radii if self.cfg.rank_radius else None, self._centroid_scale(),
                          self.key_scale if int8_keys else None)
        return slots, SteadyZone(self.steady_k, self.steady_v, self._steady_len_dev)

    def _budget(self):
        """This step's budgets: one :class:`WaveBudget` when every sequence has the same, else the per-slot
        tensors (made when the budgets change)."""
        H = self.Hkv
        per_seq = [self.cfg.budget(self.seq_len[b], self.mid_len[b * H]) for b in range(self.B)]
        if all(b == per_seq[0] for b in per_seq):
            return per_seq[0]
        key = tuple(per_seq)
        if getattr(self, "_slot_budget_key", None) != key:
            from ..attention.selection import slot_budgets

            self._slot_budget = slot_budgets([b for b in per_seq for _ in range(H)], self.device)
            self._slot_budget_key = key
        return self._slot_budget

    def _decode_gpu_only(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The wave step of :mod:`kvstore.attention.selection` over every slot at once."""
        from ..attention.selection import wave_attend

        G, Hg = self.G, q.shape[1] // self.Hkv
        qg = q.reshape(G, Hg, self.D)
        slots, steady = self._slots()
        budget = self._budget()
        scores = None
        if self.C and self.cfg.estimator == "fs_iso":
            from .estimation import fs_cluster_scores

            scores = fs_cluster_scores(qg, self.centroids, self.sizes, self._key_sd, self._fs_table, self._fs_slope,
                                       self.scale, backend=self.cfg.backend, centroid_scale=self._centroid_scale())[:2]
        o, lse, step = wave_attend(qg, slots, steady, budget, self.bounds, self.scale, scores=scores,
                                   backend=self.cfg.backend)
        self._last = {"step": step, "budget": budget, "Hg": Hg}
        return o.to(q.dtype).reshape(self.B, self.Hkv * Hg, self.Dv), lse.float().reshape(self.B, self.Hkv * Hg)

    def _decode_graphed(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gpu_only step replayed from a CUDA graph (captured on first use for this query shape)."""
        key = (tuple(q.shape), self.C, self.n, tuple(self.cfg.budget(self.seq_len[b], self.mid_len[b * self.Hkv])
                                                    for b in range(self.B)))
        if self._graph is None or self._graph_key != key:
            self._graph = None
            static_q = q.clone()
            try:
                s = torch.cuda.Stream(self.device)
                s.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(s):
                    for _ in range(2):  # warm-up outside the graph (allocator, lazy init)
                        self._decode_gpu_only(static_q)
                torch.cuda.current_stream(self.device).wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static_o = self._decode_gpu_only(static_q)
            except Exception as e:  # capture is an optimisation: fall back to eager launches
                warnings.warn(f"CUDA graph capture of the wave decode step failed ({e}); running eagerly",
                              RuntimeWarning)
                self._graph_failed = True
                return self._decode_gpu_only(q)
            self._graph, self._graph_key, self._static_q, self._static_o = g, key, static_q, static_o
        self._static_q.copy_(q)
        self._graph.replay()
        return self._static_o[0].clone(), self._static_o[1].clone()

    def _decode_offload(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .attention_ops import Estimation, KVSource, RunTable
        from .cluster_ops import copy_rows

        G, Hg = self.G, q.shape[1] // self.Hkv
        qg = q.reshape(G, Hg, self.D)
        dev = self.device
        steady_len = torch.tensor(self.steady_len, dtype=torch.int32)
        host = KVSource(self.kv_k, self.kv_v)
        rest = None
        if self.C > 0:
            scores, ret, est, rest = self._rank(qg)
            ret_host = ret.to("cpu")                      # the one sync of the step: the CPU plans the cache
            plan = self.buffer.plan(ret_host, self.steady_rows, steady_len)
            run_row, copy_src_row = plan.run_row, plan.copy_src_row
            if not self.pinned:  # pageable memory: stage the step's host runs through a device copy
                host, run_row, copy_src_row = _stage_host_runs(self.kv_k, self.kv_v, plan.run_src, run_row,
                                                               plan.run_len, copy_src_row, dev)
            runs = RunTable(plan.run_src.to(dev, non_blocking=True), run_row.to(dev, non_blocking=True),
                            plan.run_len.to(dev, non_blocking=True), plan.run_offsets.to(dev, non_blocking=True))
            est_part = Estimation(scores, self.sizes, self.value_sums, est) if est.shape[1] else None
            r = ret.shape[1]
        else:
            plan, est_part, r = None, None, 0
            runs = RunTable(torch.full((G,), SRC_STEADY, dtype=torch.int32, device=dev),
                            torch.arange(G, dtype=torch.int64, device=dev) * self.s_cap,
                            steady_len.to(dev), torch.arange(G + 1, dtype=torch.int32, device=dev))
        o, lse, e = self._attend(qg, [host, KVSource(self.cache_k, self.cache_v)], runs, est_part, r, rest)
        if plan is not None and plan.copy_len.numel():
            # admissions after the attention on the same stream: pages read this step are overwritten only after
            copy_rows(self.cache_k, self.cache_v, host.k, host.v, copy_src_row.to(dev, non_blocking=True),
                      plan.copy_dst_row.to(dev, non_blocking=True), plan.copy_len.to(dev, non_blocking=True),
                      backend=self.cfg.backend)
        if plan is not None:
            for i, x in enumerate((plan.hits, plan.misses, plan.hit_tokens, plan.miss_tokens)):
                self._hits[i] += int(x)
        self._last = {"run_len": runs.length, "r": r, "e": 0 if est_part is None else est_part.ids.shape[1],
                      "Hg": Hg}
        return o.reshape(self.B, self.Hkv * Hg, self.Dv), lse.reshape(self.B, self.Hkv * Hg)

    # ------------------------------------------------------------------ updates
    def append(self, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """Add one decoded token per sequence: k1 ``[B, Hkv, D]``, v1 ``[B, Hkv, Dv]`` (the layer's device/dtype).

        The token joins its slot's steady zone; once a steady zone is full, every slot's tokens beyond its window
        (``update_interval`` of them in a slot whose prompt was longer than sink + window) are clustered and
        appended to the index as new clusters. No host synchronisation but at re-indexing.
        """
        for name, x, dim in (("k1", k1, self.D), ("v1", v1, self.Dv)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (self.B, self.Hkv, dim):
                raise ValueError(f"{name} must be a tensor [B={self.B}, Hkv={self.Hkv}, {dim}], "
                                 f"got {getattr(x, 'shape', type(x).__name__)}")
        if max(self.steady_len) == self.s_cap:
            self._reindex()
        slot = torch.arange(self.G, device=self.device)
        self.steady_k[slot, self._steady_len_dev] = k1.reshape(self.G, self.D).to(self.device, self.dtype)
        self.steady_v[slot, self._steady_len_dev] = v1.reshape(self.G, self.Dv).to(self.device, self.dtype)
        self._steady_len_dev += 1
        self.steady_len = [x + 1 for x in self.steady_len]
        self.seq_len = [x + 1 for x in self.seq_len]

    def _reindex(self) -> None:
        """Move every slot's tokens beyond its window into the index (new clusters after the slot's old ones)."""
        from .cluster_ops import cluster_order
        from .kmeans import segmented_kmeans_gpu

        cfg, G, dev, D, Dv = self.cfg, self.G, self.device, self.D, self.Dv
        move = [max(0, st - sk - cfg.window) for st, sk in zip(self.steady_len, self.sink_len)]
        n0, C0 = self.n, self.C
        n1 = max(m + md for m, md in zip(move, self.mid_len))
        groups: dict[int, list[int]] = {}
        for g, m in enumerate(move):
            if m:
                groups.setdefault(m, []).append(g)
        clustered = []
        for m, slots in groups.items():
            idx = torch.tensor(slots, device=dev)
            start = torch.tensor([self.sink_len[g] for g in slots], device=dev)[:, None] + torch.arange(m, device=dev)
            kn = torch.gather(self.steady_k[idx], 1, start[..., None].expand(-1, -1, D))
            vn = torch.gather(self.steady_v[idx], 1, start[..., None].expand(-1, -1, Dv))
            a, cen, sizes = segmented_kmeans_gpu(kn, cfg.tokens_per_cluster, cfg.segment_len, cfg.kmeans_iters,
                                                 cfg.seed, backend=cfg.backend)
            clustered.append((slots, idx, kn, vn, a, cen, sizes))
        C1 = max((c[5].shape[1] for c in clustered), default=0)
        C = C0 + C1

        def grow(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            pad = torch.full((G, C1, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, pad], 1)

        centroids, sizes_all, vsums, kvar = grow(self.centroids), grow(self.sizes), grow(self.value_sums), \
            grow(self.key_var)
        cen_scale = grow(self.centroid_scale)
        radii = grow(self.radii)
        mid = torch.tensor(self.mid_len, device=dev)
        offsets = torch.cat([self.offsets, mid[:, None].expand(G, C1)], 1)           # new clusters empty ...
        kv_k = torch.zeros(G, n1, D, dtype=self.dtype, device=dev)
        kv_v = torch.zeros(G, n1, Dv, dtype=self.dtype, device=dev)
        kv_k[:, :n0] = self.kv_k.view(G, n0, D).to(dev)
        kv_v[:, :n0] = self.kv_v.view(G, n0, Dv).to(dev)
        for slots, idx, kn, vn, a, cen, sz in clustered:
            m, Cn = kn.shape[1], cen.shape[1]
            order, offs = cluster_order(a, Cn)
            base = mid[idx]
            self._put_centroids(centroids, cen_scale, idx, slice(C0, C0 + Cn), cen)
            sizes_all[idx, C0:C0 + Cn] = sz.float()
            vs = torch.zeros(len(slots), Cn, Dv, dtype=torch.float32, device=dev)
            vs.scatter_add_(1, a[..., None].expand(-1, m, Dv), vn.float())
            vsums[idx, C0:C0 + Cn] = vs
            radii[idx, C0:C0 + Cn] = cluster_radii(kn, cen, a).to(radii.device)
            if cfg.estimator == "fs_iso":
                from .estimation import isotropic_variance

                kvar[idx, C0:C0 + Cn] = isotropic_variance(kn, a, Cn)
            o = offsets[idx]
            o[:, C0:C0 + Cn + 1] = offs + base[:, None]                             # ... but in the moving slots
            o[:, C0 + Cn + 1:] = (base + m)[:, None]
            offsets[idx] = o
            rows = base[:, None] + torch.arange(m, device=dev)
            kv_k[idx[:, None], rows] = torch.gather(kn, 1, order[..., None].expand(-1, -1, D))
            kv_v[idx[:, None], rows] = torch.gather(vn, 1, order[..., None].expand(-1, -1, Dv))
        # steady zones: drop the moved tokens, keep the sink and the rest in order
        shift = torch.tensor(move, device=dev)[:, None]
        sink = torch.tensor(self.sink_len, device=dev)[:, None]
        j = torch.arange(self.s_cap, device=dev)[None, :]
        src = torch.where(j < sink, j, (j + shift).clamp(max=self.s_cap - 1))
        self.steady_k = torch.gather(self.steady_k, 1, src[..., None].expand(-1, -1, D))
        self.steady_v = torch.gather(self.steady_v, 1, src[..., None].expand(-1, -1, Dv))
        self.steady_len = [st - m for st, m in zip(self.steady_len, move)]
        self.mid_len = [md + m for md, m in zip(self.mid_len, move)]
        self.n, self.C = n1, C
        self.centroids, self.sizes, self.value_sums, self.offsets = centroids, sizes_all, vsums, offsets
        self.key_var, self.radii, self.centroid_scale = kvar, radii, cen_scale
        self._set_kv(kv_k.reshape(G * n1, D), kv_v.reshape(G * n1, Dv))
        self._finish_build()

    # ------------------------------------------------------------------ persistence
    _STATE_TENSORS = ("steady_k", "steady_v", "kv_k", "kv_v", "centroids", "sizes", "value_sums", "key_var",
                      "offsets", "radii", "centroid_scale")
    _STATE_INTS = ("B", "Hkv", "D", "Dv", "n", "C", "s_cap")
    _STATE_LISTS = ("seq_len", "sink_len", "steady_len", "mid_len")

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Everything the layer holds, for :meth:`KVStore.save`: ``(meta, arrays)``, arrays as numpy (bfloat16
        widened to float32, losslessly)."""
        from ..attention.heads import to_numpy

        meta = {"config": self.cfg.to_dict(), "dtype": str(self.dtype),
                **{k: int(getattr(self, k)) for k in self._STATE_INTS},
                **{k: [int(x) for x in getattr(self, k)] for k in self._STATE_LISTS}}
        return meta, {name: to_numpy(getattr(self, name)) for name in self._STATE_TENSORS}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, Any], device: str | torch.device
                   ) -> "GpuWaveLayer":
        """Rebuild a layer saved by :meth:`state` on ``device``; ``ValueError`` naming what is inconsistent."""
        import numpy as np

        from ..attention.heads import _DTYPES

        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
        if not isinstance(meta.get("config"), dict):
            raise ValueError("config must be a dict")
        cfg = WaveGpuConfig(**meta["config"])
        if "seq_len" not in meta and "steady_used" in meta:      # a layer saved before per-sequence lengths
            B, H = meta["B"], meta["Hkv"]
            meta = dict(meta, seq_len=[meta["length"]] * B, sink_len=[meta["sink_used"]] * (B * H),
                        steady_len=[meta["steady_used"]] * (B * H), mid_len=[meta["n"]] * (B * H))
        ints = {k: meta.get(k) for k in cls._STATE_INTS}
        for k, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 40:
                raise ValueError(f"{k} must be an int >= 0, got {v!r}")
        B, H, D, Dv, n, C, s_cap = (ints[k] for k in ("B", "Hkv", "D", "Dv", "n", "C", "s_cap"))
        G = B * H
        lists = {k: meta.get(k) for k in cls._STATE_LISTS}
        for k, v in lists.items():
            want = B if k == "seq_len" else G
            if not isinstance(v, list) or len(v) != want or any(isinstance(x, bool) or not isinstance(x, int)
                                                                 or x < 0 for x in v):
                raise ValueError(f"{k} must be a list of {want} ints >= 0")
        for g in range(G):
            if not (lists["sink_len"][g] <= lists["steady_len"][g] <= s_cap and lists["mid_len"][g] <= n
                    and lists["steady_len"][g] + lists["mid_len"][g] == lists["seq_len"][g // H]):
                raise ValueError(f"inconsistent lengths of slot {g}")
        shapes = {"steady_k": (G, s_cap, D), "steady_v": (G, s_cap, Dv), "kv_k": (G * n, D), "kv_v": (G * n, Dv),
                  "centroids": (G, C, D), "sizes": (G, C), "value_sums": (G, C, Dv), "key_var": (G, C),
                  "offsets": (G, C + 1)}
        for name in ("radii", "centroid_scale"):  # layers saved before these were kept: derived below
            if name in arrays:
                shapes[name] = (G, C)
        for name, shape in shapes.items():
            if name not in arrays:
                raise ValueError(f"missing array {name}")
            if tuple(arrays[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(arrays[name].shape)}, expected {shape}")
        if G == 0:
            raise ValueError("a layer holds at least one slot")
        offsets = np.asarray(arrays["offsets"])
        mid = np.asarray(lists["mid_len"])
        if offsets.dtype.kind != "i" or (offsets[:, 0] != 0).any() or (offsets[:, -1] != mid).any() \
                or (np.diff(offsets, axis=1) < 0).any() or not np.array_equal(
                    np.diff(offsets, axis=1).astype(np.float64), np.asarray(arrays["sizes"], dtype=np.float64)):
            raise ValueError("offsets are not a CSR of the slot rows matching the sizes")
        self = cls()
        self.cfg = cfg
        self.device, self.dtype = torch.device(device), dtype
        for k, v in {**ints, **lists}.items():
            setattr(self, k, v)
        self.G, self.scale = G, 1.0 / math.sqrt(D)

        def tensor(name: str, dt: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.array(arrays[name])).to(self.device, dt)

        self.steady_k, self.steady_v = tensor("steady_k", dtype), tensor("steady_v", dtype)
        self._load_centroids(arrays, tensor)
        self.sizes, self.value_sums = tensor("sizes", torch.float32), tensor("value_sums", torch.float32)
        self.key_var, self.offsets = tensor("key_var", torch.float32), tensor("offsets", torch.int64)
        self._set_kv(*(torch.from_numpy(np.array(arrays[name])).to(dtype) for name in ("kv_k", "kv_v")))
        if "radii" in arrays:
            radii = np.asarray(arrays["radii"])
            if radii.dtype.kind != "f" or not np.isfinite(radii).all() or (radii < 0).any():
                raise ValueError("radii must be finite and >= 0")
            self.radii = tensor("radii", torch.float32)
        else:
            self.radii = self._radii_from_kv()
        self._finish_build()
        self.build_seconds = 0.0
        self._last = {}
        self.reset_stats()
        return self

    def _radii_from_kv(self) -> torch.Tensor:
        """Each cluster's radius [G, C] recomputed from the stored (cluster-sorted) keys and the centroids."""
        G, C, n = self.G, self.C, self.n
        rows = torch.arange(n, device=self.offsets.device)
        cluster = (torch.searchsorted(self.offsets[:, 1:].contiguous(), rows.expand(G, n).contiguous(), right=True)
                   .clamp(max=max(C - 1, 0)))                                  # rows past mid_len: masked below
        live = rows[None, :] < self.offsets[:, -1:]
        keys = self.kv_k.view(G, n, self.D).to(self.offsets.device).float()
        cen = self.centroid_values()
        if C == 0:
            return torch.zeros(G, 0, dtype=torch.float32, device=self.device)
        r = cluster_radii(torch.where(live[..., None], keys, torch.gather(cen, 1, cluster[..., None].expand(
            G, n, self.D))), cen, cluster)
        return r.to(self.device)

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        self._hits = [0, 0, 0, 0]   # clusters hit, missed; tokens hit, missed (offload)

    def stats(self) -> dict[str, Any]:
        """Memory held and what the last decode step read.

        gpu_bytes: KV (steady zone, cluster cache or the whole sorted KV) + meta index on the GPU;
        gpu_kv_bytes: the KV part alone; host_bytes: pinned KV; read_fraction: bytes the last step read over
        the bytes full attention reads (the whole KV once); hit_ratio: offload cache hits over retrieved
        clusters since reset_stats().
        """
        el = self.steady_k.element_size()
        fs = self.cfg.estimator == "fs_iso"
        key_copies = 0 if self.key_codes is None else self.key_codes.numel() + self.key_scale.numel() * 4
        meta = (self.centroids.numel() * self.centroids.element_size() + self._int8_centroids() * self.sizes.numel() * 4
                + self.sizes.numel() * 4 + key_copies
                + self.value_sums.numel() * 4 + self.offsets.numel() * 8 + (self.key_var.numel() * 4 if fs else 0)
                + (self.radii.numel() * 4 if self.cfg.rank_radius else 0))
        steady = (self.steady_k.numel() + self.steady_v.numel()) * el
        kv_all = (self.kv_k.numel() + self.kv_v.numel()) * el
        if self.cfg.mode == "gpu_only":
            gpu_kv, host = steady + kv_all, 0
        else:
            gpu_kv, host = steady + (self.cache_k.numel() + self.cache_v.numel()) * el, kv_all
        full = self.Hkv * sum(self.seq_len) * (self.D + self.Dv) * el
        out: dict[str, Any] = {"mode": self.cfg.mode, "gpu_bytes": gpu_kv + meta, "gpu_kv_bytes": gpu_kv,
                               "meta_bytes": meta, "host_bytes": host, "full_kv_bytes": full,
                               "build_seconds": self.build_seconds, "clusters_per_slot": self.C,
                               "pinned": bool(getattr(self, "pinned", False)) if self.cfg.mode == "offload" else None}
        # centroids, sizes (and sigmas, radii)
        index_read = self.G * self.C * (self.D * self.centroids.element_size() + self._int8_centroids() * 4 + 4
                                        + (4 if fs else 0) + (4 if self.cfg.rank_radius else 0))
        if self._last.get("step") is not None:
            # gpu_only: candidates' keys (int8 copies and their scales, or the stored keys), the exact tokens'
            # values (their scores come from the candidates'), the steady zone's keys and values, the mean values
            # of the candidate and estimation clusters and the slot's mean value
            step, Hg = self._last["step"], self._last["Hg"]
            exact = int((step.exact_rows >= 0).sum())
            zone = int((step.candidates >= 0).sum() + (step.estimation >= 0).sum())
            key_row = self.D * el if self.key_codes is None else self.D + 4
            read = (int(step.candidate_rows.sum()) * key_row + exact * self.Dv * el
                    + sum(self.steady_len) * (self.D + self.Dv) * el + index_read
                    + (zone * self.mean_values.element_size() + self.G * 4) * self.Dv)
            out["read_fraction"] = read / full
            out["tokens_exact"] = (exact + sum(self.steady_len)) / self.G
            out["tokens_scored"] = int(step.candidate_rows.sum()) / self.G
        elif self._last:
            tokens = int(self._last["run_len"].sum())
            e = self._last["e"]
            read = tokens * (self.D + self.Dv) * el + index_read + self.G * e * self.Dv * 4
            out["read_fraction"] = read / full
            out["tokens_exact"] = tokens / self.G
        if self.cfg.mode == "offload":
            h, m, ht, mt = self._hits
            out["hit_ratio"] = h / (h + m) if h + m else None
            out["token_hit_ratio"] = ht / (ht + mt) if ht + mt else None
        return out
