"""Store configuration: which decode method, and its budgets in readable units.

A budget given as a float is a fraction of the current context length; an
int is a count of tokens (for ``estimation`` of the wave method, a count of
clusters). Budgets are resolved at every decode step, so they follow the
context as it grows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

GPU_MODES = ("gpu_only", "offload")
GPU_ESTIMATORS = ("centroid", "fs_iso")  # kvstore.gpu.estimation

METHODS = ("full", "wave", "graph", "streaming", "quest")


@dataclass
class StoreConfig:
    """Configuration of a :class:`kvstore.KVStore`.

    Attributes:
        method: ``"wave"`` (RetroInfer tripartite attention), ``"graph"``
            (RetrievalAttention), ``"streaming"`` (StreamingLLM: sink + window
            only), ``"quest"`` (Quest-style page selection) or ``"full"``.
        sink: first tokens always attended exactly.
        window: most recent tokens always attended exactly.
        retrieval: wave: tokens attended exactly from the best clusters
            (float: fraction of the context; int: tokens).
        estimation: wave: clusters estimated from centroid, size and value sum
            (float: fraction of the context in tokens; int: clusters).
        tokens_per_cluster, segment_len, kmeans_iters: wave index build.
        update_interval: tokens decoded before the oldest ones leave the
            window and join the index.
        top_k: graph: keys retrieved per query head and attended exactly.
        ef: graph: search beam width (>= top_k).
        graph_degree: graph: out-degree bound.
        page_size: quest: tokens per page.
        pages: quest: tokens attended exactly from the best pages (float:
            fraction of the context; int: tokens).
        seed: index builds are deterministic for a seed.
        num_threads: C++ threads (0: all).
        gpu_mode: wave on a CUDA store: ``"gpu_only"`` (whole KV on the GPU)
            or ``"offload"`` (KV in pinned CPU memory, a GPU cache of clusters);
            see :class:`kvstore.gpu.wave_layer.GpuWaveLayer`.
        cache_ratio: offload: share of the indexed tokens the GPU cache holds.
        gpu_estimator: wave on a CUDA store: the estimation zone's estimator,
            ``"centroid"`` (RetroInfer) or ``"fs_iso"`` (finite-sample
            corrected, :mod:`kvstore.gpu.estimation`; with retrieval 0.05 and
            estimation 0.116 it measured a median output error of 0.026-0.040
            on generated data, see ``docs/decode.md``).
        check_finite: check every decode step's keys, values (``append``) and
            queries (``attend``) for NaN/inf and raise ``ValueError`` naming
            the argument. On a CUDA tensor the check makes the CPU wait for the
            GPU (``torch.isfinite(x).all()`` is read back on the host) at every
            layer of every step, which stalls the launch queue; ``False`` skips
            it (then non-finite input is not detected and its output is
            undefined). Shape, dtype and device checks always run (they read no
            tensor data), and ``prefill`` always checks (once per sequence).
    """

    method: str = "wave"
    sink: int = 4
    window: int = 64
    retrieval: float | int = 0.018
    estimation: float | int = 0.232
    tokens_per_cluster: int = 16
    segment_len: int = 8192
    kmeans_iters: int = 10
    update_interval: int = 1024
    top_k: int = 100
    ef: int = 128
    graph_degree: int = 32
    page_size: int = 16
    pages: float | int = 0.05
    seed: int = 0
    num_threads: int = 0
    gpu_mode: str = "gpu_only"
    cache_ratio: float = 0.1
    gpu_estimator: str = "centroid"
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("sink", "window", "update_interval", "top_k", "ef", "graph_degree", "page_size",
                     "tokens_per_cluster", "segment_len", "kmeans_iters", "num_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for name in ("update_interval", "top_k", "ef", "page_size", "tokens_per_cluster", "segment_len"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be >= 1")
        if self.gpu_mode not in GPU_MODES:
            raise ValueError(f"gpu_mode must be 'gpu_only' or 'offload', got {self.gpu_mode!r}")
        if not (isinstance(self.cache_ratio, (int, float)) and 0 < self.cache_ratio <= 1):
            raise ValueError(f"cache_ratio must be in (0, 1], got {self.cache_ratio!r}")
        if self.gpu_estimator not in GPU_ESTIMATORS:
            raise ValueError(f"gpu_estimator must be 'centroid' or 'fs_iso', got {self.gpu_estimator!r}")
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"check_finite must be a bool, got {self.check_finite!r}")
        if self.graph_degree < 2:
            raise ValueError("graph_degree must be >= 2")
        for name in ("retrieval", "estimation", "pages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and v > 1):
                raise ValueError(f"{name} must be a fraction in [0, 1] (float) or a count >= 0 (int), got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be finite")

    @staticmethod
    def _tokens(budget: float | int, context: int) -> int:
        return int(math.ceil(budget * context)) if isinstance(budget, float) else int(budget)

    def retrieval_clusters(self, context: int) -> int:
        """Wave: clusters of the retrieval zone at this context length."""
        return int(math.ceil(self._tokens(self.retrieval, context) / self.tokens_per_cluster))

    def estimation_clusters(self, context: int) -> int:
        """Wave: clusters of the estimation zone at this context length."""
        if isinstance(self.estimation, float):
            return int(math.ceil(self.estimation * context / self.tokens_per_cluster))
        return int(self.estimation)

    def quest_tokens(self, context: int) -> int:
        return self._tokens(self.pages, context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreConfig":
        """Inverse of :meth:`to_dict`; fields missing from ``d`` (e.g. a file
        saved before they existed) take their defaults."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown StoreConfig fields: {sorted(unknown)}")
        return cls(**d)
