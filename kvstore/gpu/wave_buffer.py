"""The wave buffer's CPU side (RetroInfer, offload mode): pinned host memory and the GPU cache's LRU planner.

The whole KV of a layer lives in pinned CPU memory in cluster order; the GPU keeps some clusters in a cache of
fixed pages of ``page_tokens`` rows (cache row = ``page * page_tokens + i``). Each decode step the GPU ranks the
clusters and takes the top ``r`` of every head slot; :meth:`WaveBuffer.plan` then decides, per slot, which of them
are cache hits (read from their pages) and which are misses (read zero-copy from the pinned host rows this step and
admitted into the cache afterwards by the copy kernel, evicting the slot's least recently used clusters). The
planning runs in C++ (``kvstore._C.WaveBufferPlanner``, csrc/wave_buffer.h) on a thread pool with the GIL
released; csrc/wave_buffer.h states the exact rules. This module owns nothing on the GPU.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

SRC_HOST, SRC_CACHE, SRC_STEADY = 0, 1, 2  # run sources of the plan's run table

_pin_warned = False
_pin_lock = threading.Lock()


def _warn_pin_once(why: str) -> None:
    global _pin_warned
    with _pin_lock:
        if _pin_warned:
            return
        _pin_warned = True
    warnings.warn(f"pinned (page-locked) host memory is unavailable ({why}); using pageable memory instead: "
                  "host-to-GPU reads are slower and cannot be zero-copy", RuntimeWarning, stacklevel=3)


def pinned_empty(shape: int | Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """An uninitialised CPU tensor of ``shape`` and ``dtype``, in pinned memory when possible.

    Returns ``(tensor, pinned)``. When pinning fails (no CUDA device or driver, or the memlock limit), warns once
    per process (RuntimeWarning) and returns pageable memory with ``pinned=False``.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    if not isinstance(dims, Sequence) or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                                 for d in dims):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    if any(int(d) < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes, got {tuple(int(d) for d in dims)}")
    size = tuple(int(d) for d in dims)
    try:
        return torch.empty(size, dtype=dtype, pin_memory=True), True
    except RuntimeError as e:
        _warn_pin_once(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return torch.empty(size, dtype=dtype), False


class WaveBufferPlan(NamedTuple):
    """One decode step's plan for all ``G`` head slots (CPU tensors, pinned when the buffer is).

    run_src int32 ``[R]`` (``SRC_HOST`` 0 / ``SRC_CACHE`` 1 / ``SRC_STEADY`` 2), run_row int64 ``[R]`` (first row
    in that source), run_len int32 ``[R]``, run_offsets int32 ``[G + 1]`` (runs of slot g are
    ``run_offsets[g]:run_offsets[g + 1]``: the steady run first, then the retrieval clusters in the order given);
    copy_src_row / copy_dst_row int64 ``[M]`` and copy_len int32 ``[M]``: admissions, host rows -> cache rows,
    one per page, to run after the step's attention on the same stream. hits / misses count clusters (empty
    clusters are neither), hit_tokens / miss_tokens their rows. ``buffer`` is the int32 tensor all the arrays
    are views of (one host-to-device copy moves them all: :meth:`to`).
    """

    run_src: torch.Tensor
    run_row: torch.Tensor
    run_len: torch.Tensor
    run_offsets: torch.Tensor
    copy_src_row: torch.Tensor
    copy_dst_row: torch.Tensor
    copy_len: torch.Tensor
    hits: int
    misses: int
    hit_tokens: int
    miss_tokens: int
    buffer: torch.Tensor

    def __repr__(self) -> str:
        return (f"WaveBufferPlan(runs={self.run_src.numel()}, slots={self.run_offsets.numel() - 1}, "
                f"copies={self.copy_len.numel()}, hits={self.hits}, misses={self.misses}, "
                f"hit_tokens={self.hit_tokens}, miss_tokens={self.miss_tokens}, device={self.buffer.device})")

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "WaveBufferPlan":
        """The same plan on ``device`` with a single copy of ``buffer`` (non-blocking from pinned memory)."""
        buf = self.buffer.to(device, non_blocking=non_blocking)
        return WaveBufferPlan(*_views(buf, self.run_src.numel(), self.copy_len.numel(),
                                      self.run_offsets.numel() - 1),
                              self.hits, self.misses, self.hit_tokens, self.miss_tokens, buf)


def _nwords(R: int, M: int, G: int) -> tuple[int, int]:
    """int32 words of the packed plan: the int64 arrays (run_row, copy_src_row, copy_dst_row), then the int32
    ones (run_src, run_len, run_offsets, copy_len)."""
    return 2 * (R + 2 * M), 2 * R + G + 1 + M


def _views(buf: torch.Tensor, R: int, M: int, G: int) -> tuple[torch.Tensor, ...]:
    """The seven plan arrays (WaveBufferPlan's field order) as views of the packed int32 ``buf``."""
    w64, w32 = _nwords(R, M, G)
    a, b = buf.split([w64, w32])
    run_row, copy_src, copy_dst = a.view(torch.int64).split([R, M, M])
    run_src, run_len, run_offsets, copy_len = b.split([R, R, G + 1, M])
    return run_src, run_row, run_len, run_offsets, copy_src, copy_dst, copy_len


def _pack(d: dict, buf: np.ndarray, R: int, M: int) -> None:
    """Copies the planner's arrays into the packed int32 numpy view ``buf`` (layout of :func:`_views`)."""
    w64 = 2 * (R + 2 * M)
    a = buf[:w64].view(np.int64)
    a[:R] = d["run_row"]
    a[R:R + M] = d["copy_src_row"]
    a[R + M:] = d["copy_dst_row"]
    at = w64
    for name in ("run_src", "run_len", "run_offsets", "copy_len"):
        x = d[name]
        buf[at:at + x.shape[0]] = x
        at += x.shape[0]


def _as_index_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """A CPU numpy integer array from a tensor (any device) or array-like; TypeError / ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        a = x.detach().cpu().numpy()
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    return a


def _check_int(x: Any, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


class WaveBuffer:
    """LRU planner of the wave buffer's GPU cache, for ``G`` head slots of one layer.

    cluster_rows: integer ``[G, C + 1]`` (tensor on any device, or array): cluster ``c`` of slot ``g`` is host KV
    rows ``cluster_rows[g, c] : cluster_rows[g, c + 1]`` (non-decreasing per slot). pages_per_slot: cache pages
    each slot owns (slot g owns pages ``g * pages_per_slot : (g + 1) * pages_per_slot``, so the GPU cache has
    :attr:`cache_rows` rows). page_tokens: rows a page. num_threads: planning threads, ``None``/0 = the CPUs of
    this process's affinity mask (pools are shared between buffers of the same size). pin: put the plans in
    pinned memory (``None`` = when CUDA is available; falls back to pageable memory, warning once).

    Not thread-safe: plan one buffer from one thread at a time (a concurrent call raises RuntimeError).
    """

    def __init__(self, cluster_rows: Any, pages_per_slot: int, page_tokens: int = 8, num_threads: int | None = None,
                 pin: bool | None = None) -> None:
        from .._core import core

        rows = _as_index_array(cluster_rows, "cluster_rows", 2)
        pages_per_slot = _check_int(pages_per_slot, "pages_per_slot", 0)
        page_tokens = _check_int(page_tokens, "page_tokens", 1)
        num_threads = 0 if num_threads is None else _check_int(num_threads, "num_threads", 0)
        if rows.shape[0] < 1 or rows.shape[1] < 1:
            raise ValueError(f"cluster_rows must be [G >= 1, C + 1 >= 1], got shape {tuple(rows.shape)}")
        self._planner = core().WaveBufferPlanner(rows, pages_per_slot, page_tokens, num_threads)
        self._pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._zeros_rows = np.zeros(rows.shape[0], dtype=np.int64)
        self._zeros_len = np.zeros(rows.shape[0], dtype=np.int32)
        self.reset_stats()

    # ------------------------------------------------------------------ properties
    @property
    def num_slots(self) -> int:
        return int(self._planner.num_slots)

    @property
    def num_clusters(self) -> int:
        return int(self._planner.num_clusters)

    @property
    def pages_per_slot(self) -> int:
        return int(self._planner.pages_per_slot)

    @property
    def page_tokens(self) -> int:
        return int(self._planner.page_tokens)

    @property
    def num_pages(self) -> int:
        """Pages of the whole GPU cache (all slots)."""
        return self.num_slots * self.pages_per_slot

    @property
    def cache_rows(self) -> int:
        """Rows the GPU cache tensors need: ``num_pages * page_tokens``."""
        return self.num_pages * self.page_tokens

    @property
    def num_threads(self) -> int:
        return int(self._planner.num_threads)

    @property
    def pinned(self) -> bool:
        """Whether plans are returned in pinned memory."""
        return self._pin

    # ------------------------------------------------------------------ planning
    def plan(self, retrieval_ids: Any, steady_rows: Any = None, steady_len: Any = None) -> WaveBufferPlan:
        """Plans one decode step and updates the cache mapping (the caller must run the plan's copies).

        retrieval_ids: integer ``[G, r]`` (any device; copied to the host, which syncs a CUDA tensor), distinct
        cluster ids in ``[0, C)`` per row, in the order their runs should appear. steady_rows int64 ``[G]`` /
        steady_len int32 ``[G]``: the steady run of each slot (first row in the steady source, length; no run when
        0); ``None`` = no steady runs. Returns a :class:`WaveBufferPlan` of CPU tensors.
        """
        ids = _as_index_array(retrieval_ids, "retrieval_ids", 2)
        srow = self._zeros_rows if steady_rows is None else _as_index_array(steady_rows, "steady_rows", 1)
        slen = self._zeros_len if steady_len is None else _as_index_array(steady_len, "steady_len", 1)
        d = self._planner.plan(ids, srow, slen)
        R, M, G = d["run_src"].shape[0], d["copy_len"].shape[0], self.num_slots
        buf = self._alloc(sum(_nwords(R, M, G)))
        _pack(d, buf.numpy(), R, M)
        counts = (int(d["hits"]), int(d["misses"]), int(d["hit_tokens"]), int(d["miss_tokens"]))
        for i, c in enumerate(counts):
            self._counts[i] += c
        self._steps += 1
        return WaveBufferPlan(*_views(buf, R, M, G), *counts, buf)

    def _alloc(self, words: int) -> torch.Tensor:
        # A fresh tensor every step: torch's pinned caching allocator does not hand a block out again before
        # the non-blocking copies that read it have finished, which a reused buffer would not guarantee.
        if self._pin:
            buf, self._pin = pinned_empty(words, torch.int32)
            return buf
        return torch.empty(words, dtype=torch.int32)

    def reset(self) -> None:
        """Empties the cache of every slot (the statistics are kept: :meth:`reset_stats`)."""
        self._planner.reset()

    def cached_clusters(self, g: int) -> list[int]:
        """Cluster ids cached for slot g, least recently used first."""
        return list(self._planner.cached_clusters(_check_int(g, "g", 0)))

    def cluster_pages(self, g: int, c: int) -> list[int]:
        """Global cache pages holding cluster c of slot g, in row order (empty when it is not cached)."""
        return list(self._planner.cluster_pages(_check_int(g, "g", 0), _check_int(c, "c", 0)))

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self._counts = [0, 0, 0, 0]  # hits, misses, hit_tokens, miss_tokens
        self._steps = 0

    @property
    def stats(self) -> dict[str, int | float]:
        """Running totals since the last :meth:`reset_stats`: steps, hits, misses (clusters), hit_tokens,
        miss_tokens, hit_ratio (clusters) and token_hit_ratio."""
        h, m, ht, mt = self._counts
        return {"steps": self._steps, "hits": h, "misses": m, "hit_tokens": ht, "miss_tokens": mt,
                "hit_ratio": self.hit_ratio, "token_hit_ratio": self.token_hit_ratio}

    @property
    def hit_ratio(self) -> float:
        """hits / (hits + misses), in clusters, since the last :meth:`reset_stats` (0.0 before any)."""
        h, m = self._counts[0], self._counts[1]
        return h / (h + m) if h + m else 0.0

    @property
    def token_hit_ratio(self) -> float:
        """hit_tokens / (hit_tokens + miss_tokens) since the last :meth:`reset_stats` (0.0 before any)."""
        h, m = self._counts[2], self._counts[3]
        return h / (h + m) if h + m else 0.0

    def __repr__(self) -> str:
        return (f"WaveBuffer(G={self.num_slots}, C={self.num_clusters}, pages_per_slot={self.pages_per_slot}, "
                f"page_tokens={self.page_tokens}, num_threads={self.num_threads}, pinned={self.pinned})")
