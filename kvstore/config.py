"""Store configuration: which decode method, and its budgets in readable units.

A budget given as a float is a fraction of the current context length; an
int is a count of tokens. Budgets are resolved at every decode step, so they
follow the context as it grows; a budget that covers the context reads every
token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ._validate import INT32_MAX, MAX_COUNT, check_num_threads, check_positive_int, check_seed

GPU_MODES = ("gpu_only", "offload")
GPU_ESTIMATORS = ("centroid", "fs_iso")  # kvstore.gpu.estimation
READ_DTYPES = ("int8", "kv")

METHODS = ("full", "wave", "graph", "streaming", "quest", "oracle")

def budget_context(context: int) -> int:
    """The context length fractional budgets apply to: ``context`` rounded up to a multiple of the largest power of
    two not above ``context / 16`` (at least 64), i.e. by less than 1/16."""
    q = 1 << max(6, context.bit_length() - 5)
    return -(-context // q) * q


@dataclass
class StoreConfig:
    """Configuration of a :class:`kvstore.KVStore`.

    Attributes:
        method: ``"wave"`` (RetroInfer tripartite attention), ``"graph"``
            (RetrievalAttention), ``"streaming"`` (StreamingLLM: sink + window
            only), ``"quest"`` (Quest-style page selection), ``"full"``, or
            ``"oracle"`` (the query heads of a KV head attend one set of
            ``retrieval`` keys, the union of their keys of highest true score:
            the yardstick of the accuracy benchmarks; it scores every key to
            find them).
        sink: first tokens always attended exactly.
        window: most recent tokens always attended exactly.
        candidates: wave: tokens of the best-ranked clusters whose keys are
            read and scored (from their int8 copies by default, see
            ``candidate_dtype``; float: fraction of the context; int:
            tokens); at least ``candidates_floor`` tokens.
        retrieval: wave: tokens attended exactly, the best of the candidates
            by score (their values are read, their scores are the
            candidates'); at least
            ``retrieval_floor``. oracle: tokens attended per KV head (shared by its
            query heads).
        estimation: wave: tokens' worth of the next clusters, estimated from
            centroid, size and mean value.
        candidates_floor, retrieval_floor: wave: the least tokens of each, so
            that short contexts keep enough (see ``docs/attention.md``).
        calibrate: wave: correct the centroid mass estimates by the exact
            masses of the candidates.
        estimate_rest: wave: count the clusters outside every zone (estimated
            mass, the slot's mean value) instead of dropping them.
        rank_radius: wave: clusters are ranked by ``q . c + rank_radius * |q|
            * radius`` (scaled like the scores), ``radius`` being the largest
            distance of a member key from the centroid ``c``: a cluster that
            holds one far key (the one a copying head needs) ranks higher than
            its mean alone would put it. 0 ranks by the centroid only.
        centroid_dtype: wave: how the step reads the centroids it ranks
            every cluster by: ``"int8"`` (one byte a dimension and a float32
            scale a cluster, half the bytes of 16-bit centroids: the largest
            read of a step after the candidates' keys) or ``"kv"`` (the KV
            dtype, as published).
        candidate_dtype: wave: how the step reads the keys of its candidate
            clusters, whose scores pick the exact tokens and give the
            candidates' exact mass: ``"int8"`` (an int8 copy of the indexed
            keys with a float32 scale a key, kept beside them: half the bytes
            of the largest read of a step, scores to within the int8 rounding
            of the keys) or ``"kv"`` (the stored keys: scores exact, and a
            budget covering the context equals exact attention).
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
    candidates: float | int = 0.1
    retrieval: float | int = 0.03
    estimation: float | int = 0.2
    candidates_floor: int = 256
    retrieval_floor: int = 32
    calibrate: bool = True
    estimate_rest: bool = True
    rank_radius: float = 0.25
    centroid_dtype: str = "int8"
    candidate_dtype: str = "int8"
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
        ranges = (("sink", 0, INT32_MAX), ("window", 0, INT32_MAX), ("update_interval", 1, INT32_MAX),
                  ("top_k", 1, MAX_COUNT // 64), ("ef", 1, MAX_COUNT), ("graph_degree", 2, 1024),
                  ("page_size", 1, INT32_MAX), ("tokens_per_cluster", 1, INT32_MAX), ("segment_len", 1, 1 << 62),
                  ("kmeans_iters", 0, 10_000), ("candidates_floor", 0, INT32_MAX), ("retrieval_floor", 0, INT32_MAX))
        for name, lo, hi in ranges:
            try:
                setattr(self, name, check_positive_int(getattr(self, name), name, lo, hi))
            except TypeError as e:
                raise ValueError(str(e)) from None
        try:
            self.seed = check_seed(self.seed)
            self.num_threads = check_num_threads(self.num_threads)
        except TypeError as e:
            raise ValueError(str(e)) from None
        if self.gpu_mode not in GPU_MODES:
            raise ValueError(f"gpu_mode must be 'gpu_only' or 'offload', got {self.gpu_mode!r}")
        if isinstance(self.cache_ratio, bool) or not (isinstance(self.cache_ratio, (int, float))
                                                      and 0 < self.cache_ratio <= 1):
            raise ValueError(f"cache_ratio must be in (0, 1], got {self.cache_ratio!r}")
        for name in ("centroid_dtype", "candidate_dtype"):
            if getattr(self, name) not in READ_DTYPES:
                raise ValueError(f"{name} must be 'int8' or 'kv', got {getattr(self, name)!r}")
        if self.gpu_estimator not in GPU_ESTIMATORS:
            raise ValueError(f"gpu_estimator must be 'centroid' or 'fs_iso', got {self.gpu_estimator!r}")
        for name in ("check_finite", "calibrate", "estimate_rest"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        r = self.rank_radius
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0 <= r <= 100):
            raise ValueError(f"rank_radius must be a number in [0, 100], got {r!r}")
        self.rank_radius = float(r)
        for name in ("candidates", "retrieval", "estimation", "pages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and v > 1):
                raise ValueError(f"{name} must be a fraction in [0, 1] (float) or a count >= 0 (int), got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be finite")
            if isinstance(v, int) and v > INT32_MAX:
                raise ValueError(f"{name} must be at most {INT32_MAX} tokens, got {v}")

    @classmethod
    def retroinfer(cls, **overrides: Any) -> "StoreConfig":
        """The wave method as published (RetroInfer): 16-token clusters, the best clusters covering 1.8% of the
        context attended exactly (all their tokens), the next 23.2% estimated from their centroids, the rest
        dropped, no calibration, no floors, clusters ranked by their centroids, centroids and keys read in the KV
        dtype. For comparisons; ``overrides`` replace fields."""
        base = cls(method="wave", tokens_per_cluster=16, candidates=0.018, retrieval=1.0, estimation=0.232,
                   candidates_floor=0, retrieval_floor=0, calibrate=False, estimate_rest=False, rank_radius=0.0,
                   centroid_dtype="kv", candidate_dtype="kv")
        return replace(base, **overrides)

    def wave_budget(self, context: int, indexed: int):
        """Wave: the step's budgets in tokens (:class:`kvstore.attention.selection.WaveBudget`) for ``context``
        tokens seen, of which ``indexed`` are held by the clusters. Fractions apply to the context rounded up by
        at most 1/16 (:func:`budget_context`), so that a step's shapes (and a captured CUDA graph) change rarely."""
        from .attention.selection import step_budget

        context = budget_context(context)
        cand = max(self._tokens(self.candidates, context), self.candidates_floor)
        ret = max(self._tokens(self.retrieval, context), self.retrieval_floor)
        return step_budget(cand, ret, self._tokens(self.estimation, context), context, indexed,
                           calibrate=self.calibrate, rest=self.estimate_rest, rank_radius=self.rank_radius)

    @staticmethod
    def _tokens(budget: float | int, context: int) -> int:
        return int(math.ceil(budget * context)) if isinstance(budget, float) else int(budget)

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
