"""Decode latency of kvstore's GPU path against full attention (torch SDPA), one layer.

One decoder layer with the Llama-3-8B attention layout (32 query heads, 8 KV
heads, ``d = 128``, bf16) over generated attention-like KV
(:mod:`kvstore.datasets.attention_like`: topic passages, drift, RoPE, outlier
channels, sinks; decode queries peaked on a few needle passages, the recent
tokens and the sinks). For every context x batch that fits in GPU memory:

* **full attention**: torch SDPA decode at the same shapes, the best of
  flash / efficient / cuDNN, each both with ``enable_gqa=True`` and with the
  group's query heads as query rows (``q.view(B, Hkv, G, d)``: the same maths,
  no KV copy); the fastest is the baseline;
* **kvstore**: :class:`kvstore.gpu.wave_layer.GpuWaveLayer` in ``gpu_only``
  and ``offload`` mode (only ``cache_ratio`` of the KV on the GPU, the rest in
  pinned host memory), the same through ``KVStore.attend`` (mode ``store``:
  what a user calls, validation and NaN checks included) and, at small points,
  the graph split (:class:`kvstore.gpu.graph_split.GraphSplitLayer`); all with
  the :class:`~kvstore.StoreConfig` defaults unless ``--preset`` or a budget
  option says otherwise;
* latency: CUDA events around each call, warm-up first, median over
  ``--reps`` calls rotating ``--query-sets`` query sets;
* output error ``||o - o_full|| / ||o_full||`` per query head (median, p99)
  against ``o_full`` computed in fp32 from the same bf16 KV, beside the
  **oracle at equal bytes** (exact attention over the ``f * N`` keys of highest
  true score, one set shared by the GQA group, ``f`` the fraction of the KV
  bytes the layer read) and the ratio of the two;
* GPU memory: ``torch.cuda.memory_allocated`` delta over the build and
  ``layer.stats()['gpu_bytes']``; offload cache hit ratio; KV read fraction;
* index build time (synchronised) against an SDPA causal prefill of the same
  context (one layer, ``--prefill-chunk`` query chunks against the growing
  prefix; measured at batch 1 and scaled by the batch: prefill is compute
  bound, so linear in the batch).

``--distribution flat`` generates flatter attention (query temperatures 3-10
instead of 6-30: the top 1% of keys holds about a third of the mass).

Memory is estimated before allocating (:func:`estimate_memory`); points that
do not fit are skipped with the reason recorded. Writes ``<out>/decode.json``,
``decode.md`` (its section; ``kvstore bench e2e`` keeps its own) and
``decode.png`` (speed-up vs context, one line per batch and mode). Needs a CUDA
GPU. Run ``kvstore bench decode --help``.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .._args import Parser
from ..datasets.attention_like import AttentionLikeSpec, attention_stats, decode_queries, generate_kv
from ..config import StoreConfig
from ..gpu.estimation import ESTIMATORS
from ..gpu.wave_layer import WaveGpuConfig
from ..metrics import oracle_attention
from ._output import Results, add_out_argument, plot_or_note, pyplot, save_plot

_WAVE = WaveGpuConfig()  # the layer's defaults (the store's) are the benchmark's
PRESETS = {"defaults": StoreConfig, "retroinfer": StoreConfig.retroinfer}
DISTRIBUTIONS = {"default": AttentionLikeSpec(), "flat": AttentionLikeSpec(tau_range=(3.0, 10.0))}

GiB = 1 << 30
DEFAULT_CONTEXTS = (32768, 131072, 524288, 1048576)
DEFAULT_BATCHES = (1, 8, 32)
MODES = ("gpu_only", "offload", "store")
LAYER_MODES = ("gpu_only", "offload")
METHODS = ("wave", "graph")
GRAPH_MODE = "graph_split"
# An index build works one sequence at a time: the cluster-sorted copy of its K and V plus the k-means work
# space (fp32 keys) come to about this many times the sequence's bf16 KV.
BUILD_WORKSPACE = 2.0
TARGETS_DOC = (
    "gpu_only 128K batch 8 >= 6x SDPA and 1M batch 1 >= 6x, median error <= 2x the oracle at equal bytes; "
    "KVStore.attend >= 5x SDPA at those points and within 10% of the bare layer; offload (<= 10% of the KV on the "
    "GPU) >= 3x at 128K batch 8, >= 1x at 128K batch 1, >= 4x at 1M batch 8; gpu_only step <= 1.5x its bytes-read "
    "floor; index build <= 5% of the prefill at 128K")


def require_cuda(what: str) -> None:
    """Raise RuntimeError naming ``what`` unless a CUDA device is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU (torch.cuda.is_available() is False; torch {torch.__version__})"
                           "; run it on a GPU machine with a CUDA build of torch")


def parse_size(text: str) -> int:
    """``"32768"``, ``"32K"``, ``"1M"`` (binary: K = 1024) -> int."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 32768, 128K, 1M)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


def fmt_size(n: int) -> str:
    """131072 -> ``"128K"``, 1048576 -> ``"1M"``."""
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


# --- memory ---------------------------------------------------------------------------------------------------------
def kv_bytes(batch: int, context: int, spec: AttentionLikeSpec = AttentionLikeSpec(), elem_bytes: int = 2) -> int:
    """Bytes of K and V of one layer, ``2 x B x Hkv x N x d`` elements."""
    return 2 * batch * spec.num_kv_heads * context * spec.head_dim * elem_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one benchmark point (bytes), by phase; see :func:`estimate_memory`."""

    kv_bytes: int
    gpu_peak_bytes: int
    host_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    def check(self, gpu_free: int, host_free: int, headroom: float = 0.95) -> tuple[bool, str]:
        """(fits, reason): the GPU peak must be <= ``headroom * gpu_free``, host bytes <= ``headroom * host_free``."""
        if self.gpu_peak_bytes > headroom * gpu_free:
            return False, (f"needs ~{self.gpu_peak_bytes / GiB:.1f} GiB of GPU memory, {gpu_free / GiB:.1f} GiB free "
                           f"(KV {self.kv_bytes / GiB:.1f} GiB)")
        if self.host_bytes > headroom * host_free:
            return False, (f"needs ~{self.host_bytes / GiB:.1f} GiB of host memory, {host_free / GiB:.1f} GiB "
                           "available")
        return True, ""


def index_bytes(batch: int, context: int, spec: AttentionLikeSpec = AttentionLikeSpec(),
                tokens_per_cluster: int = 16) -> int:
    """The wave index's meta data on the GPU: per cluster a bf16 centroid, an fp32 value sum, size and offset."""
    per_cluster = 2 * spec.head_dim + 4 * spec.head_dim + 4 + 8
    return batch * spec.num_kv_heads * (-(-context // tokens_per_cluster)) * per_cluster


def estimate_memory(batch: int, context: int, mode: str, spec: AttentionLikeSpec = AttentionLikeSpec(), *,
                    cache_ratio: float = 0.1, tokens_per_cluster: int = 16, query_sets: int = 8,
                    with_prefill: bool = False, build_workspace: float = BUILD_WORKSPACE) -> MemoryEstimate:
    """Peak memory of a point in ``mode`` (``gpu_only``, ``offload``, ``graph_split`` or ``baseline``).

    The benchmark holds the generated bf16 KV on the GPU all along (SDPA needs
    it). Phases: *baseline* = KV + the fp32 reference work space of one (row,
    KV head) + (``with_prefill``) the batch-1 prefill queries (outputs are
    written over them); *build* = KV + the layer's GPU part + a build work
    space of ``build_workspace`` x one sequence's KV. The layer's GPU part:
    ``gpu_only`` a cluster-ordered copy of the KV plus the index
    (:func:`index_bytes`); ``offload`` ``cache_ratio`` of the KV plus the
    index, and the whole KV in pinned host memory; ``graph_split`` only the
    steady zone, with the keys and values in fp32 and the graphs (a key copy
    and 32 int32 edges a key) in host memory.
    """
    mode = "gpu_only" if mode == "store" else mode
    if mode not in (*MODES, GRAPH_MODE, "baseline"):
        raise ValueError(f"mode must be one of {(*MODES, GRAPH_MODE, 'baseline')}, got {mode!r}")
    H, Hq, d = spec.num_kv_heads, spec.num_q_heads, spec.head_dim
    kv = kv_bytes(batch, context, spec)
    ref = 2 * context * d * 4 + 3 * query_sets * spec.group * context * 4
    prefill = (Hq + 2 * spec.group) * context * d * 2 if with_prefill else 0  # queries + a head's expanded KV
    meta = index_bytes(batch, context, spec, tokens_per_cluster)
    workspace = int(build_workspace * kv / batch)
    gen = 6 * H * 16384 * d * 4
    parts = {"kv": kv, "reference": ref, "prefill": prefill, "generation": gen}
    host = 0
    if mode == "gpu_only":
        parts.update(layer=kv + meta, build_workspace=workspace)
    elif mode == "offload":
        parts.update(layer=int(cache_ratio * kv) + meta, build_workspace=workspace)
        host = kv
    elif mode == GRAPH_MODE:
        parts.update(layer=batch * H * 2 * 2 * (4 + 64) * d * 2, build_workspace=0)
        host = 2 * kv + batch * H * context * (4 * (d + 1) + 32 * 4)
    else:
        parts.update(layer=0, build_workspace=0)
    baseline_peak = kv + max(ref, prefill, gen)
    build_peak = kv + parts["layer"] + parts["build_workspace"]
    return MemoryEstimate(kv, max(baseline_peak, build_peak), host, parts)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (falls back to total physical memory)."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- attention references and baselines -------------------------------------------------------------------------
@torch.no_grad()
def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact decode attention in fp32: ``q [S, B, Hq, d]`` over ``k, v [B, Hkv, N, d]`` -> ``[S, B, Hq, d]`` fp32.

    Query head ``j`` uses KV head ``j // (Hq / Hkv)``; one (row, KV head) at a time.
    """
    S, B, Hq, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.empty(S, B, Hq, v.shape[-1], dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hkv):
            qq = q[:, b, h * G:(h + 1) * G].reshape(S * G, d).float()
            p = torch.softmax((qq @ k[b, h].float().T) / math.sqrt(d), dim=-1)
            out[:, b, h * G:(h + 1) * G] = (p @ v[b, h].float()).view(S, G, -1)
    return out


def relative_errors(o: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||o - ref|| / ||ref||`` over the last dim, flattened, float64 on CPU."""
    o, ref = o.double(), ref.double()
    return ((o - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten().cpu()


def error_summary(errors: torch.Tensor) -> dict[str, float]:
    """Median and p99 of relative errors (NaN counts as an infinite error)."""
    e = torch.nan_to_num(errors.double(), nan=math.inf)
    return {"error_median": float(e.median()), "error_p99": float(torch.quantile(e, 0.99))
            if torch.isfinite(e).all() else math.inf}


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return {n: getattr(SDPBackend, a) for n, a in names.items() if hasattr(SDPBackend, a)}


def sdpa_decode_variants(k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Full-attention decode callables ``q [B, Hq, d] -> o [B, Hq, d]`` over ``k, v [B, Hkv, N, d]``.

    Names ``<layout>_<backend>``: layout ``gqa`` passes ``q[:, :, None]`` with
    ``enable_gqa=True``; ``grouped`` passes ``q.view(B, Hkv, G, d)`` (a group's
    query heads as query rows of their KV head; exact, no KV copy). Backends
    are pinned with ``torch.nn.attention.sdpa_kernel``. A variant the running
    torch does not support raises when called.
    """
    from torch.nn.attention import sdpa_kernel

    F = torch.nn.functional
    B, Hkv = k.shape[:2]
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for bname, backend in _sdpa_backends().items():
        def gqa(q: torch.Tensor, backend=backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]

        def grouped(q: torch.Tensor, backend=backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q.view(B, Hkv, -1, q.shape[-1]), k, v)
            return o.reshape(B, -1, v.shape[-1])

        out[f"gqa_{bname}"] = gqa
        out[f"grouped_{bname}"] = grouped
    return out


@torch.no_grad()
def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 8192,
                             out: torch.Tensor | None = None, per_head: bool | None = None) -> torch.Tensor:
    """Causal self-attention of a whole context, ``chunk`` queries at a time against the growing prefix.

    q ``[B, Hq, N, d]``, k, v ``[B, Hkv, N, d]`` -> ``[B, Hq, N, d]`` (written
    into ``out``; ``out=q`` is allowed: chunk ``i`` is written after its
    queries are used and later chunks read only keys and values). Each chunk
    is one SDPA call with a lower-right causal mask and ``enable_gqa``. On a
    GPU whose flash kernel cannot take that (torch would materialise the mask
    and use the math kernel), each KV head's keys and values are expanded over
    its query group once and the chunks run per KV head instead (``per_head``
    forces either way; None decides as above).
    """
    from torch.nn.attention.bias import causal_lower_right

    F = torch.nn.functional
    B, Hq, N, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.empty_like(q) if out is None else out
    bounds = [(s, min(N, s + chunk)) for s in range(0, N, chunk)]
    if per_head is None:
        per_head = q.is_cuda and not _flash_takes(q[:, :, :chunk], k[:, :, :chunk], v[:, :, :chunk])
    if not per_head:
        for s, e in bounds:
            out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e],
                                                            attn_mask=causal_lower_right(e - s, e), enable_gqa=True)
        return out
    for h in range(Hkv):
        kh = k[:, h:h + 1].expand(-1, G, -1, -1).contiguous()
        vh = v[:, h:h + 1].expand(-1, G, -1, -1).contiguous()
        hs = slice(h * G, (h + 1) * G)
        for s, e in bounds:
            out[:, hs, s:e] = F.scaled_dot_product_attention(q[:, hs, s:e], kh[:, :, :e], vh[:, :, :e],
                                                             attn_mask=causal_lower_right(e - s, e))
        del kh, vh
    return out


def _flash_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's flash kernel accepts these GQA inputs (else a lower-right causal mask is materialised,
    ``chunk x N`` booleans and the math kernel: far too big at long contexts)."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True)))
    except (ImportError, TypeError, RuntimeError):
        return False


# --- timing -----------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[int], Any], reps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``reps`` calls ``fn(i)`` after ``warmup`` calls.

    CUDA: one pair of CUDA events around each call, read after a single final
    synchronisation (no host sync between calls). CPU: ``perf_counter``.
    """
    for i in range(warmup):
        fn(i)
    if device.type != "cuda":
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            times.append(1e3 * (time.perf_counter() - t0))
        return times
    torch.cuda.synchronize(device)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(i)
        b.record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) for a, b in ev]


def timed_seconds(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, wall seconds) of ``fn()``, synchronising the device before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    r = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return r, time.perf_counter() - t0


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _gpu_free(device: torch.device) -> int:
    if device.type != "cuda":
        return host_available_bytes()
    return torch.cuda.mem_get_info(device)[0]


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


# --- one point ------------------------------------------------------------------------------------------------------
@dataclass
class Options:
    """Everything a run needs besides the point list (see ``--help``)."""

    reps: int = 50
    warmup: int = 10
    query_sets: int = 8
    cache_ratio: float = _WAVE.cache_ratio
    prefill_chunk: int = 8192
    graph_max_tokens: int = 32768
    cuda_graph: bool = True
    backend: str = "auto"
    seed: int = 0
    headroom: float = 0.95
    budget_seconds: float = 1800.0
    graph_train_queries: int = 256
    estimator: str = _WAVE.estimator
    prefill: bool = True
    preset: str = "defaults"
    candidates: float | None = None
    retrieval: float | None = None
    estimation: float | None = None
    centroid_dtype: str | None = None
    candidate_dtype: str | None = None
    distribution: str = "default"

    def store_config(self, mode: str = "gpu_only") -> StoreConfig:
        """The wave StoreConfig of the run: the preset, with the budget options that were given."""
        names = ("candidates", "retrieval", "estimation", "centroid_dtype", "candidate_dtype")
        over = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        base = PRESETS[self.preset]()
        from dataclasses import replace

        return replace(base, gpu_mode="gpu_only" if mode == "store" else mode, cache_ratio=self.cache_ratio,
                       gpu_estimator=self.estimator, **over)


@dataclass
class PointData:
    """Generated KV, decode queries and the fp32 reference of one (context, batch)."""

    k: torch.Tensor  # [B, Hkv, N, d]
    v: torch.Tensor
    q: torch.Tensor  # [S, B, Hq, d]
    ref: torch.Tensor  # [S, B, Hq, d] fp32


def make_point_data(batch: int, context: int, spec: AttentionLikeSpec, opts: Options, device: torch.device
                    ) -> PointData:
    k, v = generate_kv(batch, context, spec, device=device, seed=opts.seed)
    q = decode_queries(k, spec, num_sets=opts.query_sets, seed=opts.seed)
    return PointData(k, v, q, reference_attention(q, k, v))


_BANDWIDTH: dict[str, float] = {}


@torch.no_grad()
def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read + write counted once each, as a kernel
    that reads its inputs once moves them), measured once per device: the ceiling a memory-bound step is held to."""
    key = str(device)
    if key not in _BANDWIDTH:
        if device.type != "cuda":
            _BANDWIDTH[key] = math.nan
        else:
            a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            b = torch.empty_like(a)
            ms = statistics.median(time_calls(lambda i: b.copy_(a), 20, 3, device))
            _BANDWIDTH[key] = 2 * a.numel() / (ms / 1e3)
            del a, b
    return _BANDWIDTH[key]


@torch.no_grad()
def oracle_summary(data: PointData, fraction: float) -> dict[str, float]:
    """The oracle at equal bytes (:func:`kvstore.metrics.oracle_attention`, one key set shared by each GQA group)
    at ``fraction`` of the KV: its output error median and p99 over the point's query sets and heads."""
    S, B, Hq, d = data.q.shape
    H, N = data.k.shape[1], data.k.shape[2]
    G = Hq // H
    errs = []
    for s in range(S):
        for b in range(B):
            o = oracle_attention(data.q[s, b].reshape(H, G, d), data.k[b], data.v[b], fraction, shared=True)
            errs.append(relative_errors(o.reshape(Hq, -1), data.ref[s, b]))
    e = error_summary(torch.cat(errs))
    return {"oracle_error_median": e["error_median"], "oracle_error_p99": e["error_p99"]}


def measure_sdpa(data: PointData, opts: Options, device: torch.device) -> dict[str, Any]:
    """Time every SDPA decode variant that runs and is correct; the fastest is the baseline."""
    S = data.q.shape[0]
    timings: dict[str, float] = {}
    notes: dict[str, str] = {}
    best_err = None
    for name, fn in sdpa_decode_variants(data.k, data.v).items():
        try:
            with warnings.catch_warnings():  # torch warns at length about each backend it cannot use
                warnings.simplefilter("ignore")
                o = torch.stack([fn(data.q[s]) for s in range(S)])
        except RuntimeError as e:
            notes[name] = f"unsupported: {str(e).splitlines()[0][:120]}"
            continue
        err = error_summary(relative_errors(o, data.ref))
        if not err["error_median"] < 0.05:  # a kernel must not win by being wrong
            notes[name] = f"rejected: error median {err['error_median']:.3g}"
            continue
        timings[name] = statistics.median(time_calls(lambda i: fn(data.q[i % S]), opts.reps, opts.warmup, device))
        if best_err is None or timings[name] <= min(timings.values()):
            best_err = err
    if not timings:
        raise RuntimeError(f"no SDPA decode variant ran: {notes}")
    best = min(timings, key=timings.get)
    return {"sdpa_ms": timings[best], "sdpa_backend": best, "sdpa_variants_ms": timings, "sdpa_notes": notes,
            "sdpa_error_median": best_err["error_median"], "sdpa_error_p99": best_err["error_p99"]}


def measure_prefill(data: PointData, spec: AttentionLikeSpec, opts: Options, device: torch.device) -> float:
    """Seconds of a batch-1 causal SDPA prefill of the whole context (first batch row's KV)."""
    k, v = data.k[:1], data.v[:1]
    g = torch.Generator(device=device).manual_seed(opts.seed + 7)
    q = torch.randn(1, spec.num_q_heads, k.shape[2], spec.head_dim, generator=g, device=device, dtype=k.dtype)
    chunk = min(opts.prefill_chunk, k.shape[2])
    chunked_causal_attention(q[:, :, :chunk], k[:, :, :chunk], v[:, :, :chunk], chunk)  # warm-up
    _, secs = timed_seconds(lambda: chunked_causal_attention(q, k, v, chunk, out=q), device)
    return secs


def _wave_config(mode: str, opts: Options) -> WaveGpuConfig:
    return WaveGpuConfig.from_store(opts.store_config(mode), cuda_graph=opts.cuda_graph, backend=opts.backend)


class _StoreLayer:
    """A one-layer :class:`kvstore.KVStore` (defaults of the run's config) behind the layers' decode/stats calls:
    what a user's ``store.attend`` costs, validation and NaN/inf checks included."""

    def __init__(self, data: "PointData", opts: Options) -> None:
        from ..store import KVStore

        B, H, N, d = data.k.shape
        self.store = KVStore(1, H, d, opts.store_config("store"), device=data.k.device)
        self.store.prefill(0, data.k, data.v)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.store.attend(0, q[:, :, None])[:, :, 0]

    def stats(self) -> dict[str, Any]:
        st = self.store.stats()["layers"][0]
        return {**st.get("gpu", {}), "read_fraction": st.get("read_fraction")}


def graph_train_queries(data: PointData, spec: AttentionLikeSpec, opts: Options) -> torch.Tensor | None:
    """``[B, Hq, Nq, d]`` training queries for the graph: decode-like queries independent of the test ones."""
    if opts.graph_train_queries <= 0:
        return None
    q = decode_queries(data.k, spec, num_sets=opts.graph_train_queries, seed=opts.seed, query_seed=opts.seed + 10_007)
    return q.permute(1, 2, 0, 3).contiguous()


def layer_builder(mode: str, data: PointData, spec: AttentionLikeSpec, opts: Options) -> Callable[[], Any]:
    """A call that builds the kvstore layer of ``mode`` over the point's KV (the graph's training queries are
    generated first, outside the timed build)."""
    if mode == GRAPH_MODE:
        from ..gpu.graph_split import GraphSplitConfig, GraphSplitLayer

        q_train = graph_train_queries(data, spec, opts)
        return lambda: GraphSplitLayer.build(data.k, data.v, q_train=q_train,
                                             config=GraphSplitConfig(top_k=100, ef=128))
    from ..gpu.wave_layer import GpuWaveLayer

    if mode == "store":
        return lambda: _StoreLayer(data, opts)
    cfg = _wave_config(mode, opts)
    return lambda: GpuWaveLayer.build(data.k, data.v, cfg, device=data.k.device)


def measure_layer(mode: str, data: PointData, spec: AttentionLikeSpec, opts: Options, device: torch.device
                  ) -> dict[str, Any]:
    """Build the layer, then its error, latency, memory and stats."""
    build = layer_builder(mode, data, spec, opts)
    _free_device_memory(device)
    before = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layer, build_s = timed_seconds(build, device)
    held = _allocated(device) - before
    peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0
    S = data.q.shape[0]
    o = torch.stack([layer.decode(data.q[s]).clone() for s in range(S)])
    row: dict[str, Any] = {"build_s": build_s, "alloc_delta_bytes": held, "build_peak_bytes": peak,
                           **error_summary(relative_errors(o, data.ref))}
    for i in range(opts.warmup):
        layer.decode(data.q[i % S])
    if hasattr(layer, "reset_stats"):
        layer.reset_stats()
    times = time_calls(lambda i: layer.decode(data.q[i % S]), opts.reps, 0, device)
    row["kvstore_ms"] = statistics.median(times)
    row["kvstore_ms_p90"] = sorted(times)[int(0.9 * (len(times) - 1))]
    stats = dict(layer.stats()) if hasattr(layer, "stats") else {}
    row["gpu_bytes"] = stats.get("gpu_bytes")
    row["gpu_kv_bytes"] = stats.get("gpu_kv_bytes")
    row["host_bytes"] = stats.get("host_bytes")
    row["read_fraction"] = stats.get("read_fraction")
    row["hit_ratio"] = stats.get("hit_ratio")
    row["layer_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if row["read_fraction"] is not None:
        row.update(oracle_summary(data, row["read_fraction"]))
        row["ratio_to_oracle"] = row["error_median"] / max(row["oracle_error_median"], 1e-12)
        # the time to read the step's bytes at the measured copy bandwidth
        bw = copy_bandwidth(device)
        row["bytes_read"] = row["read_fraction"] * kv_bytes(*data.k.shape[:1], data.k.shape[2])
        row["floor_ms"] = 1e3 * row["bytes_read"] / bw if bw == bw else math.nan
        row["over_floor"] = row["kvstore_ms"] / row["floor_ms"] if row["floor_ms"] == row["floor_ms"] else math.nan
    del layer, o
    _free_device_memory(device)
    return row


def point_modes(methods: Sequence[str], modes: Sequence[str], batch: int, context: int, opts: Options
                ) -> list[tuple[str, str]]:
    """(mode, skip reason or "") for every mode this point runs or skips; offload first (it holds less)."""
    out: list[tuple[str, str]] = []
    if "wave" in methods:
        out += [(m, "") for m in ("offload", "gpu_only", "store") if m in modes]
    if "graph" in methods:
        too_big = batch * context > opts.graph_max_tokens
        out.append((GRAPH_MODE, f"graph split runs only up to batch x context = {opts.graph_max_tokens} tokens "
                                "(CPU index build)" if too_big else ""))
    return out


def run_point(context: int, batch: int, methods: Sequence[str], modes: Sequence[str], spec: AttentionLikeSpec,
              opts: Options, device: torch.device, prefill_cache: dict[int, float],
              deadline: float) -> list[dict[str, Any]]:
    """All rows of one (context, batch): one per mode, each with the shared baseline numbers."""
    base = {"context": context, "batch": batch, "kv_bytes": kv_bytes(batch, context, spec)}
    plan = point_modes(methods, modes, batch, context, opts)
    free, host = _gpu_free(device), host_available_bytes()
    need_prefill = context not in prefill_cache
    checks = {}
    for mode, skip in plan:
        est = estimate_memory(batch, context, mode, spec, cache_ratio=opts.cache_ratio, query_sets=opts.query_sets,
                              with_prefill=need_prefill)
        checks[mode] = (skip,) if skip else ("",) + est.check(free, host, opts.headroom)
        base.setdefault("estimate_gpu_peak_bytes", {})[mode] = est.gpu_peak_bytes
    base_est = estimate_memory(batch, context, "baseline", spec, query_sets=opts.query_sets,
                               with_prefill=need_prefill)
    ok, why = base_est.check(free, host, opts.headroom)
    if not ok:
        return [{**base, "mode": m, "status": "skipped", "note": skip or why} for m, skip in plan]
    rows: list[dict[str, Any]] = []
    try:
        data = make_point_data(batch, context, spec, opts, device)
        base["attention"] = attention_stats(data.q, data.k, sink=spec.sink_tokens, window=spec.window)
        base.update(measure_sdpa(data, opts, device))
        if need_prefill and not opts.prefill:
            prefill_cache[context] = math.nan
        elif need_prefill:
            try:
                prefill_cache[context] = measure_prefill(data, spec, opts, device)
            except torch.cuda.OutOfMemoryError as e:
                prefill_cache[context] = math.nan
                base["prefill_note"] = f"prefill out of memory: {str(e).splitlines()[0][:160]}"
            _free_device_memory(device)
        base["prefill_batch1_s"] = prefill_cache[context]
        base["prefill_s"] = prefill_cache[context] * batch
        for mode, _ in plan:
            skip, *fit = checks[mode]
            if skip or not fit[0]:
                rows.append({**base, "mode": mode, "status": "skipped", "note": skip or fit[1]})
                continue
            if time.perf_counter() > deadline:
                rows.append({**base, "mode": mode, "status": "skipped", "note": "time budget exhausted"})
                continue
            try:
                r = measure_layer(mode, data, spec, opts, device)
            except torch.cuda.OutOfMemoryError as e:
                _free_device_memory(device)
                rows.append({**base, "mode": mode, "status": "oom", "note": str(e).splitlines()[0][:200]})
                continue
            except Exception as e:  # one failing mode must not lose the sweep; the traceback goes to stderr
                traceback.print_exc()
                _free_device_memory(device)
                rows.append({**base, "mode": mode, "status": "error",
                             "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
                continue
            r["speedup"] = base["sdpa_ms"] / r["kvstore_ms"]
            r["build_over_prefill"] = r["build_s"] / base["prefill_s"] if base["prefill_s"] > 0 else math.nan
            for key in ("gpu_bytes", "gpu_kv_bytes"):
                if r.get(key) is not None:
                    r[key.replace("bytes", "fraction")] = r[key] / base["kv_bytes"]
            rows.append({**base, "mode": mode, "status": "ok", "note": "", **r})
    except torch.cuda.OutOfMemoryError as e:
        done = {r["mode"] for r in rows}
        rows += [{**base, "mode": m, "status": "oom", "note": str(e).splitlines()[0][:200]}
                 for m, _ in plan if m not in done]
    finally:
        data = None
        _free_device_memory(device)
    return rows


# --- reports --------------------------------------------------------------------------------------------------------
def _f(x: Any, spec: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows (one per context, batch, mode) plus skipped points."""
    head = ("| context | batch | mode | kvstore ms | bytes floor ms (x) | SDPA ms (variant) | speed-up | "
            "error median / p99 | oracle median (x) | "
            "GPU held: all (KV part), % of KV | alloc delta | hit ratio | KV read | build s | prefill s | "
            "build / prefill |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "ok":
            continue
        gb, gk = r.get("gpu_bytes"), r.get("gpu_kv_bytes")
        held = "-" if gb is None else f"{gb / GiB:.2f} GiB, {100 * gb / r['kv_bytes']:.1f}%"
        if gk is not None:
            held += f" ({100 * gk / r['kv_bytes']:.1f}%)"
        lines.append(
            f"| {fmt_size(r['context'])} | {r['batch']} | {r['mode']} | {_f(r.get('kvstore_ms'), '.3f')} | "
            f"{_f(r.get('floor_ms'), '.3f')} ({_f(r.get('over_floor'), '.2f', 'x')}) | "
            f"{_f(r.get('sdpa_ms'), '.3f')} ({r.get('sdpa_backend', '-')}) | {_f(r.get('speedup'), '.1f', 'x')} | "
            f"{_f(r.get('error_median'), '.4f')} / {_f(r.get('error_p99'), '.4f')} | "
            f"{_f(r.get('oracle_error_median'), '.4f')} ({_f(r.get('ratio_to_oracle'), '.2f', 'x')}) | {held} | "
            f"{_f(r.get('alloc_delta_bytes', 0) / GiB, '.2f', ' GiB')} | {_f(r.get('hit_ratio'), '.3f')} | "
            f"{_f(None if r.get('read_fraction') is None else 100 * r['read_fraction'], '.2f', '%')} | "
            f"{_f(r.get('build_s'), '.2f')} | {_f(r.get('prefill_s'), '.2f')} | "
            f"{_f(None if r.get('build_over_prefill') is None else 100 * r['build_over_prefill'], '.1f', '%')} |")
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {fmt_size(r['context'])}, batch {r['batch']}, {r['mode']}: {r['status']} ({r.get('note', '')})"
                  for r in skipped]
    return "\n".join(lines) + "\n"


def attention_table(rows: Sequence[dict[str, Any]]) -> str:
    """How peaked the generated attention is, per measured (context, batch)."""
    lines = ["| context | batch | top-1% mass | top-100 mass | sink mass | last-64 mass | exp(entropy) / N |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        a = r.get("attention")
        if not a or (r["context"], r["batch"]) in seen:
            continue
        seen.add((r["context"], r["batch"]))

        def c(name: str, pct: bool = False) -> str:
            m = 100 if pct else 1
            s = a[name]
            return f"{m * s['median']:.3g} [{m * s['p10']:.3g}, {m * s['p90']:.3g}]" + ("%" if pct else "")

        lines.append(f"| {fmt_size(r['context'])} | {r['batch']} | {c('top_fraction_mass')} | {c('top_k_mass')} | "
                     f"{c('sink_mass')} | {c('window_mass')} | {c('effective_support', True)} |")
    return "\n".join(lines) + "\n"


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals in TARGETS_DOC, each with the measured value and whether it is met (None: not measured)."""
    ok = [r for r in rows if r.get("status") == "ok"]

    def find(mode: str, context: int, batch: int) -> dict[str, Any] | None:
        return next((r for r in ok if (r["mode"], r["context"], r["batch"]) == (mode, context, batch)), None)

    out = []

    def speed(name: str, mode: str, context: int, batch: int, goal: float) -> None:
        r = find(mode, context, batch)
        val = None if r is None else r["speedup"]
        met = None if r is None else val >= goal
        if r is not None and mode == "offload":  # the KV on the GPU (cache + steady zone), index excluded
            frac = r.get("gpu_kv_fraction")
            met = bool(met and frac is not None and frac <= 0.10 + 1e-9)
        out.append({"target": name, "value": val, "met": met,
                    "detail": "" if r is None else f"{r['kvstore_ms']:.3f} ms vs SDPA {r['sdpa_ms']:.3f} ms"})

    for context, batch, label in ((131072, 8, "128K batch 8"), (1048576, 1, "1M batch 1")):
        speed(f"gpu_only {label} >= 6x SDPA", "gpu_only", context, batch, 6.0)
        r = find("gpu_only", context, batch)
        ratio = None if r is None else r.get("ratio_to_oracle")
        out.append({"target": f"gpu_only {label}: median error <= 2x the oracle at equal bytes", "value": ratio,
                    "met": None if ratio is None else ratio <= 2.0,
                    "detail": "" if ratio is None else f"{r['error_median']:.4f} vs oracle {r['oracle_error_median']:.4f}"})
        over_floor = None if r is None else r.get("over_floor")
        out.append({"target": f"gpu_only {label}: step <= 1.5x its bytes-read floor", "value": over_floor,
                    "met": None if over_floor is None or over_floor != over_floor else over_floor <= 1.5,
                    "detail": "" if over_floor is None else f"{r['kvstore_ms']:.3f} vs {r['floor_ms']:.3f} ms"})
        speed(f"KVStore.attend {label} >= 5x SDPA", "store", context, batch, 5.0)
        st, bare = find("store", context, batch), r
        over = None if st is None or bare is None else st["kvstore_ms"] / bare["kvstore_ms"] - 1
        out.append({"target": f"KVStore.attend {label} within 10% of the bare layer", "value": over,
                    "met": None if over is None else over <= 0.10,
                    "detail": "" if over is None else f"{st['kvstore_ms']:.3f} vs {bare['kvstore_ms']:.3f} ms"})
    speed("offload (<= 10% of KV on GPU) >= 3x at 128K batch 8", "offload", 131072, 8, 3.0)
    speed("offload >= 1x at 128K batch 1", "offload", 131072, 1, 1.0)
    speed("offload >= 4x at 1M batch 8", "offload", 1048576, 8, 4.0)
    wave = [r for r in ok if r["mode"] in LAYER_MODES]
    at128 = [r["build_over_prefill"] for r in wave if r["context"] == 131072 and math.isfinite(r["build_over_prefill"])]
    worst_b = max(at128, default=None)
    out.append({"target": "index build <= 5% of prefill at 128K", "value": worst_b,
                "met": None if worst_b is None else worst_b <= 0.05, "detail": "worst over batches and modes"})
    return out


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t in targets:
        v = t["value"]
        val = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        detail = f" ({t['detail']})" if t["detail"] else ""
        lines.append(f"| {t['target']} | {val}{detail} | {met} |")
    return "\n".join(lines) + "\n"


def write_section(path: pathlib.Path, name: str, text: str) -> None:
    """Replace the ``<!-- name:begin -->...<!-- name:end -->`` section of ``path`` (append it if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + block.rstrip("\n") + old[b:]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    path.write_text(new)


def plot(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    """Speed-up over SDPA against context (log x), one line per (batch, mode); error on a second panel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in rows if r.get("status") == "ok"]
    for batch, mode in sorted({(r["batch"], r["mode"]) for r in ok}):
        pts = sorted((r["context"], r["speedup"], r["error_median"]) for r in ok
                     if (r["batch"], r["mode"]) == (batch, mode))
        style = {"gpu_only": "-", "offload": "--"}.get(mode, ":")
        x = [p[0] for p in pts]
        axes[0].plot(x, [p[1] for p in pts], style, marker="o", label=f"batch {batch}, {mode}")
        axes[1].plot(x, [p[2] for p in pts], style, marker="o", label=f"batch {batch}, {mode}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ticks = sorted({r["context"] for r in ok})
        if ticks:
            ax.set_xticks(ticks, [fmt_size(t) for t in ticks])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("speed-up over torch SDPA (decode latency)")
    axes[1].set_yscale("log")
    axes[1].axhline(0.05, color="grey", lw=0.8, ls="--")
    axes[1].set_ylabel("output error, median over query heads")
    if ok:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_plot(fig, path)


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)
    return env


def report(rows: Sequence[dict[str, Any]], env: dict[str, Any], args: dict[str, Any], out: pathlib.Path,
           seconds: float) -> str:
    """Write ``decode.json``, the decode section of ``decode.md`` and ``decode.png``; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    targets = check_targets(rows)
    title = (f"One-layer decode, Llama-3-8B layout (32 q / 8 KV heads, d=128, bf16), "
             f"{env.get('gpu', env['device'])}")
    budgets = ", ".join([f"{n} {args[n]:g}" for n in ("candidates", "retrieval", "estimation")
                         if args.get(n) is not None]
                        + [f"{n} {args[n]}" for n in ("centroid_dtype", "candidate_dtype") if args.get(n)])
    wave = (f"wave: StoreConfig {args.get('preset', 'defaults')}"
            f"{' (' + budgets + ')' if budgets else ''}, estimator {args.get('estimator', _WAVE.estimator)}, "
            f"attention distribution {args.get('distribution', 'default')}")
    (out / "decode.json").write_text(json.dumps({"title": title, "environment": env, "args": args,
                                                  "seconds": seconds, "targets": targets, "rows": list(rows)},
                                                 indent=1, default=str))
    md = "\n".join([
        f"## {title}", "",
        f"torch {env['torch']}; latency = median of "
        f"{'CUDA-event' if env['device'].startswith('cuda') else 'wall-clock (CPU smoke run: meaningless)'} "
        f"timings of {args.get('reps')} calls rotating "
        f"{args.get('query_sets')} query sets after {args.get('warmup')} warm-up calls; SDPA = the fastest correct "
        "torch SDPA variant at the same shapes; error = ||o - o_full|| / ||o_full|| per query head against fp32 "
        "attention over the same bf16 KV; prefill = causal SDPA of the whole context, measured at batch 1, times "
        f"the batch. Run time {seconds / 60:.1f} min. {wave}.", "",
        table(rows), "### Goals", "", targets_table(targets),
        "### Generated attention (median [p10, p90] over query heads)", "", attention_table(rows),
    ])
    write_section(out / "decode.md", "decode", md)
    plot_or_note(lambda path: plot(rows, path, title), out / "decode.png")
    return md


# --- main -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="kvstore bench decode", description=__doc__)
    p.add_argument("--contexts", type=parse_size, nargs="+", default=list(DEFAULT_CONTEXTS),
                   help="context lengths (e.g. 32K 128K 512K 1M; default all four)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="batch sizes (1 8 32)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="wave layer modes; store = gpu_only through KVStore.attend")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="wave (GpuWaveLayer) and/or graph (GraphSplitLayer, small points only)")
    p.add_argument("--reps", type=int, default=50, help="timed calls per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    p.add_argument("--query-sets", type=int, default=8, help="decode query sets rotated through (default 8)")
    p.add_argument("--cache-ratio", type=float, default=_WAVE.cache_ratio, help="offload: fraction of the KV cached on the GPU")
    p.add_argument("--prefill-chunk", type=int, default=8192, help="query chunk of the prefill timing (8192)")
    p.add_argument("--graph-max-tokens", type=parse_size, default=32768,
                   help="graph split only where batch x context <= this (default 32K)")
    p.add_argument("--no-cuda-graph", action="store_true", help="WaveGpuConfig(cuda_graph=False)")
    p.add_argument("--backend", choices=("auto", "cuda", "torch"), default="auto", help="kvstore op backend")
    p.add_argument("--budget-seconds", type=float, default=1800.0,
                   help="stop starting new points after this many seconds (default 1800)")
    p.add_argument("--headroom", type=float, default=0.95, help="use at most this fraction of free memory")
    p.add_argument("--graph-train-queries", type=int, default=256,
                   help="training queries per query head for the graph (decode-like, independent of the test ones)")
    p.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu: a CPU run only smoke-tests the pipeline at tiny sizes, its timings "
                        "mean nothing")
    p.add_argument("--estimator", choices=ESTIMATORS, default=_WAVE.estimator,
                   help="wave estimation zone: centroid (RetroInfer) or fs_iso (finite-sample corrected, "
                        "kvstore.gpu.estimation)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="defaults",
                   help="wave budgets: the StoreConfig defaults or the published RetroInfer ones")
    p.add_argument("--candidates", type=float, default=None, help="wave: override the candidates budget")
    p.add_argument("--retrieval", type=float, default=None, help="wave: override the retrieval budget")
    p.add_argument("--estimation", type=float, default=None, help="wave: override the estimation budget")
    p.add_argument("--centroid-dtype", choices=("int8", "kv"), default=None,
                   help="wave: override how the step reads the centroids (StoreConfig.centroid_dtype)")
    p.add_argument("--candidate-dtype", choices=("int8", "kv"), default=None,
                   help="wave: override how the step reads the candidates' keys (StoreConfig.candidate_dtype)")
    p.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="default",
                   help="generated attention: default, or flat (the top 1%% of keys holds about a third of the mass)")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill timing (and the build / prefill ratio)")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p, "decode")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        try:
            require_cuda("kvstore bench decode")
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    opts = Options(reps=a.reps, warmup=a.warmup, query_sets=a.query_sets, cache_ratio=a.cache_ratio,
                   prefill_chunk=a.prefill_chunk, graph_max_tokens=a.graph_max_tokens, cuda_graph=not a.no_cuda_graph,
                   backend=a.backend, seed=a.seed, headroom=a.headroom, budget_seconds=a.budget_seconds,
                   graph_train_queries=a.graph_train_queries, estimator=a.estimator, prefill=not a.no_prefill,
                   preset=a.preset,
                   candidates=a.candidates, retrieval=a.retrieval, estimation=a.estimation,
                   centroid_dtype=a.centroid_dtype, candidate_dtype=a.candidate_dtype, distribution=a.distribution)
    results = Results("decode", a.out)
    spec = DISTRIBUTIONS[a.distribution]
    points = [(c, b) for c in sorted(a.contexts) for b in sorted(a.batches)]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x: Iterable, **_: Any) -> Iterable:
            return x
    t0 = time.perf_counter()
    deadline = t0 + opts.budget_seconds
    rows: list[dict[str, Any]] = []
    prefill: dict[int, float] = {}
    bar = tqdm(points, desc="decode", unit="point")
    for context, batch in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{fmt_size(context)} x {batch}")
        if time.perf_counter() > deadline:
            rows += [{"context": context, "batch": batch, "mode": m, "status": "skipped",
                      "note": "time budget exhausted", "kv_bytes": kv_bytes(batch, context, spec)}
                     for m, _ in point_modes(a.methods, a.modes, batch, context, opts)]
            continue
        rows += run_point(context, batch, a.methods, a.modes, spec, opts, device, prefill, deadline)
    md = report(rows, environment(device), {**vars(a), **asdict(opts)}, results.dir,
                time.perf_counter() - t0)
    print(md)
    results.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
