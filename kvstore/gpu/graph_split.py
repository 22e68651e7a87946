"""One layer of RetrievalAttention's CPU/GPU split (the graph method with the KV offloaded).

Per head slot ``g = b * Hkv + kv_head`` (a sequence's KV head):

* the *steady zone* (the first ``sink`` tokens, the last ``window`` prefill tokens and every appended token)
  stays on ``k.device`` (the GPU) and is attended exactly there;
* the *middle* tokens ``[sink, N - window)`` live in CPU memory as float32, indexed by one
  :class:`kvstore.graph.AttentionGraphIndex` per slot. A decode step runs one graph search per slot for the
  slot's group of query heads, then each query head attends its own ``top_k`` of the keys found, all in one
  C++ call over every slot (``kvstore._C.graph_attention``, OpenMP over slots, GIL released);
* the two partials merge on the GPU by log-sum-exp. Only the queries ``[B, Hq, D]`` and the CPU partial
  ``(o [B, Hq, Dv], lse [B, Hq])`` cross the bus.

The GPU partial is launched before the CPU waits for the queries, so the two halves overlap.
Everything runs on CPU tensors too (then both halves run on the CPU).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..attention.core import attention_with_lse, merge_partials
from .cluster_ops import check_tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class GraphSplitConfig:
    """Budgets of :class:`GraphSplitLayer` (defaults: RetrievalAttention's published ones).

    sink / window: tokens at the start / end of the prefill kept on the GPU; top_k: keys each query head
    attends among those the graph search finds; group_k: keys one group search keeps for the slot's query
    heads to pick from (None: ``top_k * heads per KV head``); ef: beam width of the search (raised to
    group_k); degree: graph out-degree; num_threads: OpenMP threads of the CPU half (None: all);
    scale: softmax scale (None: ``1/sqrt(D)``); seed: makes graph builds deterministic.
    """

    sink: int = 4
    window: int = 64
    top_k: int = 100
    ef: int = 128
    degree: int = 32
    num_threads: int | None = None
    group_k: int | None = None
    scale: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sink", "window"):
            _check_int(getattr(self, name), name, 0)
        for name in ("top_k", "ef"):
            _check_int(getattr(self, name), name, 1)
        _check_int(self.degree, "degree", 2)
        if self.num_threads is not None:
            _check_int(self.num_threads, "num_threads", 1)
        if self.group_k is not None:
            _check_group_k(self.group_k, self.top_k)
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite number or None, got {self.scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(x: Any, name: str, low: int) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")


def _check_group_k(group_k: Any, top_k: int) -> None:
    _check_int(group_k, "group_k", 1)
    if group_k < top_k:
        raise ValueError(f"group_k must be >= top_k ({top_k}), got {group_k}")


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def graph_partial(indexes: Sequence[Any], keys: Sequence[np.ndarray], values: Sequence[np.ndarray],
                  queries: np.ndarray, top_k: int, ef: int, scale: float, group_k: int | None = None,
                  num_threads: int | None = None, out: tuple[np.ndarray, ...] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CPU partial of every slot of a layer in one C++ call.

    indexes: ``H`` :class:`kvstore.graph.AttentionGraphIndex` (one per slot); keys[h] ``[n_h, D]`` and
    values[h] ``[n_h, Dv]`` float32 C-contiguous numpy, row ``i`` belonging to graph id ``i``;
    queries ``[H, G, D]`` float32. Per slot: one group search keeping ``group_k`` keys (default
    ``top_k * G``, beam ``max(ef, group_k)``), then each query head's exact attention over its own
    ``top_k`` of them (ties: smaller id first). out: optional ``(o, lse, scanned, ids)`` arrays to write into.

    Returns ``o [H, G, Dv]`` float32, ``lse [H, G]`` float32 (``-inf`` for a slot without keys),
    ``scanned [H]`` int64 (keys the search read, each scored against the G heads) and
    ``ids [H, G, top_k]`` int64 (each head's keys by descending score, -1 padded).
    """
    from .._core import core

    _check_int(top_k, "top_k", 1)
    _check_int(ef, "ef", 1)
    if group_k is not None:
        _check_group_k(group_k, top_k)
    if num_threads is not None:
        _check_int(num_threads, "num_threads", 1)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for name, seq in (("keys", keys), ("values", values)):
        if len(seq) != len(indexes):
            raise ValueError(f"{name} has {len(seq)} entries, expected one per index ({len(indexes)})")
    if not isinstance(queries, np.ndarray) or queries.ndim != 3 or queries.shape[0] != len(indexes):
        raise ValueError(f"queries must be a numpy array [H={len(indexes)}, G, D], "
                         f"got {getattr(queries, 'shape', type(queries).__name__)}")
    graphs = [ix._g for ix in indexes]
    o, lse, scanned, ids = out if out is not None else (None, None, None, None)
    return core().graph_attention(graphs, keys, values, queries, int(top_k), int(group_k or 0), int(ef),
                                  float(scale), int(num_threads or 0), o, lse, scanned, ids)


class GraphSplitLayer:
    """RetrievalAttention's CPU/GPU split for one layer of ``B`` sequences of equal length (module docstring).

    Build with :meth:`build`; :meth:`decode` attends a step's queries, :meth:`append` adds the step's new
    key/value to the GPU window; :meth:`stats` reports memory and what the last step read.
    """

    def __init__(self) -> None:  # use build()
        self.cfg: GraphSplitConfig
        self._last: dict[str, Any] | None = None
        self._host: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, k: torch.Tensor, v: torch.Tensor, q_train: torch.Tensor | None = None,
              config: GraphSplitConfig | None = None) -> "GraphSplitLayer":
        """Split a prefilled layer and index its middle tokens.

        k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]`` (CUDA or CPU, bf16/fp16/f32, one dtype and device);
        q_train ``[B, Hq, Nq, D]``: training queries, e.g. the prompt's queries (``Hq`` a multiple of
        ``Hkv``; query head ``h`` belongs to KV head ``h // (Hq // Hkv)``); None: the keys stand in.
        The sink + last ``window`` tokens stay on ``k.device``; the middle tokens go to CPU float32 and one
        :class:`kvstore.graph.AttentionGraphIndex` per ``(b, kv head)`` is built on them.
        """
        from ..graph import AttentionGraphIndex

        cfg = GraphSplitConfig() if config is None else config
        if not isinstance(cfg, GraphSplitConfig):
            raise TypeError(f"config must be a GraphSplitConfig, got {type(cfg).__name__}")
        check_tensor(k, "k", 4, _DTYPES, layout="[B, Hkv, N, D]")
        check_tensor(v, "v", 4, _DTYPES, layout="[B, Hkv, N, Dv]")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, Hkv, N]")
        if min(k.shape) == 0 or v.shape[3] == 0:
            raise ValueError(f"k and v must not be empty, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"k ({k.dtype}, {k.device}) and v ({v.dtype}, {v.device}) must share dtype and device")
        B, Hkv, N, D = k.shape
        if q_train is not None:
            check_tensor(q_train, "q_train", 4, _DTYPES, layout="[B, Hq, Nq, D]")
            if q_train.shape[0] != B or q_train.shape[3] != D or q_train.shape[2] == 0 \
                    or q_train.shape[1] == 0 or q_train.shape[1] % Hkv:
                raise ValueError(f"q_train must be [B={B}, Hq (a multiple of Hkv={Hkv}), Nq > 0, D={D}], "
                                 f"got {tuple(q_train.shape)}")
            _check_finite(q_train, "q_train")
        _check_finite(k, "k")
        _check_finite(v, "v")

        t0 = time.perf_counter()
        self = cls()
        self.cfg, self.device, self.dtype = cfg, k.device, k.dtype
        self.B, self.Hkv, self.H, self.D, self.Dv = B, Hkv, B * Hkv, D, v.shape[3]
        self.Hq = None if q_train is None else q_train.shape[1]
        self.scale = 1.0 / math.sqrt(D) if cfg.scale is None else float(cfg.scale)
        self.sink = min(cfg.sink, N)
        self.length = N
        win = min(cfg.window, N - self.sink)
        self.n = N - self.sink - win

        steady = [slice(0, self.sink), slice(N - win, N)]
        self.steady_used = self.sink + win
        self._alloc_steady(max(self.steady_used + 64, 2 * self.steady_used))
        self.steady_k[:, :, :self.steady_used] = torch.cat([k[:, :, s] for s in steady], 2)
        self.steady_v[:, :, :self.steady_used] = torch.cat([v[:, :, s] for s in steady], 2)

        mid = slice(self.sink, self.sink + self.n)
        km = k[:, :, mid].to("cpu", torch.float32).reshape(self.H, self.n, D).contiguous().numpy()
        vm = v[:, :, mid].to("cpu", torch.float32).reshape(self.H, self.n, self.Dv).contiguous().numpy()
        self.keys = [km[h] for h in range(self.H)]
        self.values = [vm[h] for h in range(self.H)]
        self.indexes: list[AttentionGraphIndex] = []
        if self.n > 0:
            G = None if q_train is None else q_train.shape[1] // Hkv
            for h in range(self.H):
                b, kvh = divmod(h, Hkv)
                train = km[h] if q_train is None else q_train[b, kvh * G:(kvh + 1) * G].reshape(-1, D)
                ix = AttentionGraphIndex(D, degree=cfg.degree, ef_search=cfg.ef, seed=cfg.seed,
                                         num_threads=cfg.num_threads or 0, progress=False)
                self.indexes.append(ix.build(km[h], train))
        self.build_seconds = time.perf_counter() - t0
        return self

    def _alloc_steady(self, cap: int) -> None:
        """(Re)allocate the steady buffers ``[B, Hkv, cap, D|Dv]`` on the device, keeping the used rows."""
        old = getattr(self, "steady_k", None), getattr(self, "steady_v", None)
        self.steady_k = torch.empty(self.B, self.Hkv, cap, self.D, device=self.device, dtype=self.dtype)
        self.steady_v = torch.empty(self.B, self.Hkv, cap, self.Dv, device=self.device, dtype=self.dtype)
        if old[0] is not None:
            self.steady_k[:, :, :self.steady_used] = old[0][:, :, :self.steady_used]
            self.steady_v[:, :, :self.steady_used] = old[1][:, :, :self.steady_used]

    def _host_buffers(self, G: int) -> tuple[torch.Tensor, ...]:
        """CPU tensors (pinned when the layer is on CUDA) for q ``[H, G, D]``, o, lse, scanned and ids."""
        key = (G, self.cfg.top_k)
        if key not in self._host:
            pin = self.device.type == "cuda"
            H, f32, i64 = self.H, torch.float32, torch.int64
            shapes = (((H, G, self.D), f32), ((H, G, self.Dv), f32), ((H, G), f32), ((H,), i64),
                      ((H, G, self.cfg.top_k), i64))
            self._host = {key: tuple(torch.empty(s, dtype=t, pin_memory=pin) for s, t in shapes)}
        return self._host[key]

    # ------------------------------------------------------------------ decode
    def decode(self, q: torch.Tensor, return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of one decode step over every token of the layer.

        q ``[B, Hq, D]`` on the layer's device (``Hq`` a multiple of ``Hkv``). Returns o ``[B, Hq, Dv]`` in
        ``q.dtype``, and with ``return_lse`` also lse ``[B, Hq]`` float32 (natural log, of ``scale * q.k``).
        """
        check_tensor(q, "q", 3, _DTYPES, layout="[B, Hq, D]")
        if q.shape[0] != self.B or q.shape[2] != self.D or q.shape[1] == 0 or q.shape[1] % self.Hkv:
            raise ValueError(f"q must be [B={self.B}, Hq (a multiple of Hkv={self.Hkv}), D={self.D}], "
                             f"got {tuple(q.shape)}")
        if self.Hq is not None and q.shape[1] != self.Hq:
            raise ValueError(f"q has {q.shape[1]} heads but the graphs were trained with {self.Hq}")
        if q.device != self.device:
            raise ValueError(f"q is on {q.device}, the layer on {self.device}")
        G = q.shape[1] // self.Hkv
        qg = q.reshape(self.B, self.Hkv, G, self.D)
        if self.n > 0:
            hq, ho, hl, hs, hi = self._host_buffers(G)
            hq.copy_(qg.reshape(self.H, G, self.D).float(), non_blocking=True)
            ready = None
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
        # Launched before waiting on the CPU half: the GPU attends the steady zone meanwhile.
        used = self.steady_used
        o, lse = attention_with_lse(qg, self.steady_k[:, :, :used], self.steady_v[:, :, :used], self.scale)
        if self.n > 0:
            if ready is not None:
                ready.synchronize()
            graph_partial(self.indexes, self.keys, self.values, hq.numpy(), self.cfg.top_k, self.cfg.ef,
                          self.scale, self.cfg.group_k, self.cfg.num_threads,
                          out=(ho.numpy(), hl.numpy(), hs.numpy(), hi.numpy()))
            oc = ho.to(self.device, non_blocking=True).view(self.B, self.Hkv, G, self.Dv)
            lc = hl.to(self.device, non_blocking=True).view(self.B, self.Hkv, G)
            o, lse = merge_partials([(o, lse), (oc, lc)])
            self._last = {"G": G, "scanned": hs, "ids": hi}
        else:
            self._last = {"G": G, "scanned": None, "ids": None}
        o = o.reshape(self.B, self.Hkv * G, self.Dv).to(q.dtype)
        return (o, lse.reshape(self.B, self.Hkv * G).float()) if return_lse else o

    def last_positions(self) -> torch.Tensor:
        """Sequence positions each query head of the last step attended among the middle tokens,
        ``[B, Hq, top_k]`` int64 on the CPU (by descending score, -1 padded)."""
        if self._last is None:
            raise RuntimeError("no decode step yet")
        G, ids = self._last["G"], self._last["ids"]
        if ids is None:
            return torch.full((self.B, self.Hkv * G, self.cfg.top_k), -1, dtype=torch.int64)
        pos = torch.where(ids >= 0, ids + self.sink, ids)
        return pos.reshape(self.B, self.Hkv * G, self.cfg.top_k).clone()

    # ------------------------------------------------------------------ updates
    def append(self, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """Add one decoded token per sequence to the GPU window: k1 ``[B, Hkv, D]``, v1 ``[B, Hkv, Dv]``
        (on the layer's device; cast to its dtype). The middle tokens and their graphs do not change."""
        for name, x, dim in (("k1", k1, self.D), ("v1", v1, self.Dv)):
            check_tensor(x, name, 3, _DTYPES, layout=f"[B, Hkv, {dim}]")
            if tuple(x.shape) != (self.B, self.Hkv, dim):
                raise ValueError(f"{name} must be [B={self.B}, Hkv={self.Hkv}, {dim}], got {tuple(x.shape)}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device}, the layer on {self.device}")
        if self.steady_used == self.steady_k.shape[2]:
            self._alloc_steady(2 * self.steady_used)
        self.steady_k[:, :, self.steady_used] = k1.to(self.dtype)
        self.steady_v[:, :, self.steady_used] = v1.to(self.dtype)
        self.steady_used += 1
        self.length += 1

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Memory held and what the last decode step read.

        gpu_bytes: the steady buffers allocated on the layer's device (gpu_kv_bytes: the rows in use);
        host_bytes: middle keys and values (float32) + the graphs (their own key copy, edges, norms);
        read_fraction: vectors the last step read (steady keys and values, keys the searches scored, distinct
        values attended per slot) over the vectors full attention reads (every key and value once), in elements;
        build_seconds: time :meth:`build` took.
        """
        el = self.steady_k.element_size()
        gpu = (self.steady_k.numel() + self.steady_v.numel()) * el
        gpu_kv = self.H * self.steady_used * (self.D + self.Dv) * el
        graphs = sum(ix.ntotal * (4 * (self.D + 1) + 4 * ix.degree) for ix in self.indexes)
        host = 4 * self.H * self.n * (self.D + self.Dv) + graphs
        out: dict[str, Any] = {"gpu_bytes": gpu, "gpu_kv_bytes": gpu_kv, "host_bytes": host,
                               "graph_bytes": graphs, "steady_tokens": self.steady_used, "middle_tokens": self.n,
                               "length": self.length, "build_seconds": self.build_seconds, "read_fraction": None}
        if self._last is not None:
            read = self.H * self.steady_used * (self.D + self.Dv)
            if self._last["ids"] is not None:
                ids = self._last["ids"].reshape(self.H, -1).numpy()
                values = sum(int(np.unique(r[r >= 0]).size) for r in ids)
                scanned = int(self._last["scanned"].sum())
                read += scanned * self.D + values * self.Dv
                out.update(keys_scanned=scanned, values_read=values)
            out["read_fraction"] = read / (self.H * self.length * (self.D + self.Dv))
        return out
