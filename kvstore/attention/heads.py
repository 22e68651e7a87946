"""Per-(sequence, KV head) caches: one class per decode method.

Every cache holds a *steady zone* (the first ``sink`` tokens and the recent,
not yet indexed tokens) attended exactly, and a method-specific store for the
tokens in between. Tokens move from the recent zone into the index in chunks
of ``update_interval`` once more than ``window`` are recent, so the index
grows with the sequence while the newest tokens are always exact.

``decode(q)`` takes the query heads of this KV head ``[G, d]`` and returns
``(o [G, dv], lse [G], Access)``; ``Access`` counts what the step read, for
the bytes-read measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import StoreConfig
from .core import attention_with_lse, estimate_clusters, merge_partials


@dataclass
class Access:
    """What one decode step of one KV head read.

    key_vectors / value_vectors: stored key / value rows read; meta_elems:
    scalars of index metadata read (centroids, value sums, sizes, page
    bounds, int8 key copies; an int8 element counts as half a scalar, see
    :func:`vector_elems`); exact_positions: sequence positions attended
    exactly.
    """

    key_vectors: int = 0
    value_vectors: int = 0
    meta_elems: int = 0
    exact_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def elems(self, d: int, dv: int) -> int:
        return self.key_vectors * d + self.value_vectors * dv + self.meta_elems


def vector_elems(d: int, dtype: str) -> int:
    """What reading one centroid or key of ``d`` dimensions costs, in 16-bit elements (the unit of ``Access``):
    ``d``, or for int8 rows (``dtype="int8"``) ``d / 2`` and two for the float32 scale."""
    return -(-d // 2) + 2 if dtype == "int8" else d


class HeadCache:
    """Steady zone + an index of the middle tokens (subclasses fill in the index)."""

    def __init__(self, cfg: StoreConfig, d: int, dv: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.d, self.dv, self.device, self.dtype = cfg, d, dv, device, dtype
        self.scale = 1.0 / math.sqrt(d)
        empty = torch.zeros(0, d, device=device, dtype=dtype)
        self.sink_k, self.sink_v = empty, torch.zeros(0, dv, device=device, dtype=dtype)
        self.recent_k, self.recent_v = self.sink_k, self.sink_v
        self.recent_pos = torch.zeros(0, dtype=torch.long)
        self.length = 0          # tokens seen
        self.indexed = 0         # tokens held by the index (or dropped, for streaming)

    # --- token flow ----------------------------------------------------------
    def prefill(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None) -> None:
        """k ``[n, d]``, v ``[n, dv]``; q ``[G, n, d]`` (queries of this KV head's group, graph only)."""
        self.append(k, v, q, build=True)

    def append(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None, build: bool = False) -> None:
        n0 = self.length
        n = k.shape[0]
        pos = torch.arange(n0, n0 + n)
        take_sink = max(0, min(self.cfg.sink - self.sink_k.shape[0], n))
        if take_sink:
            self.sink_k = torch.cat([self.sink_k, k[:take_sink]])
            self.sink_v = torch.cat([self.sink_v, v[:take_sink]])
        self.recent_k = torch.cat([self.recent_k, k[take_sink:]])
        self.recent_v = torch.cat([self.recent_v, v[take_sink:]])
        self.recent_pos = torch.cat([self.recent_pos, pos[take_sink:]])
        self.length += n
        # At prefill everything beyond the window is indexed at once; during
        # decoding the oldest update_interval tokens move once the window overflows.
        if build:
            move = self.recent_k.shape[0] - self.cfg.window
            if move > 0:
                qm = None if q is None else q[:, take_sink:take_sink + move]
                self._move_to_index(move, qm)
        else:
            while self.recent_k.shape[0] >= self.cfg.window + self.cfg.update_interval:
                self._move_to_index(self.cfg.update_interval, None)

    def _move_to_index(self, m: int, q: torch.Tensor | None) -> None:
        k, v, pos = self.recent_k[:m], self.recent_v[:m], self.recent_pos[:m]
        self._index(k, v, pos, q)
        self.recent_k, self.recent_v, self.recent_pos = self.recent_k[m:], self.recent_v[m:], self.recent_pos[m:]
        self.indexed += m

    def _index(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, q: torch.Tensor | None) -> None:
        raise NotImplementedError

    # --- decoding ------------------------------------------------------------
    def steady(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = torch.cat([self.sink_k, self.recent_k])
        v = torch.cat([self.sink_v, self.recent_v])
        pos = torch.cat([torch.arange(self.sink_k.shape[0]), self.recent_pos])
        return k, v, pos

    def decode(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Access]:
        k, v, pos = self.steady()
        o, lse = attention_with_lse(q, k, v, self.scale)
        acc = Access(key_vectors=k.shape[0], value_vectors=k.shape[0], exact_positions=pos)
        if self.indexed == 0:
            return o, lse, acc
        parts, extra = self._decode_index(q)
        acc.key_vectors += extra.key_vectors
        acc.value_vectors += extra.value_vectors
        acc.meta_elems += extra.meta_elems
        acc.exact_positions = torch.cat([acc.exact_positions, extra.exact_positions])
        o, lse = merge_partials([(o, lse), *parts])
        return o, lse, acc

    def _decode_index(self, q: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Access]:
        raise NotImplementedError

    def index_bytes(self) -> int:
        """Bytes of index structures beyond the KV itself."""
        return 0

    def stored_tokens(self) -> int:
        return self.length


class FullHead(HeadCache):
    """Full attention: nothing is ever indexed (the window is unbounded)."""

    def append(self, k, v, q=None, build=False):  # noqa: D102 - same contract
        n0 = self.length
        self.recent_k = torch.cat([self.recent_k, k])
        self.recent_v = torch.cat([self.recent_v, v])
        self.recent_pos = torch.cat([self.recent_pos, torch.arange(n0, n0 + k.shape[0])])
        self.length += k.shape[0]


class StreamingHead(HeadCache):
    """StreamingLLM: sink + window exact; tokens leaving the window are dropped."""

    def append(self, k, v, q=None, build=False):  # noqa: D102
        super().append(k, v, q, build)
        if self.recent_k.shape[0] > self.cfg.window:  # drop at every step, not in chunks
            self._move_to_index(self.recent_k.shape[0] - self.cfg.window, None)

    def _index(self, k, v, pos, q):
        pass  # evicted

    def _decode_index(self, q):
        return [], Access()

    def stored_tokens(self) -> int:
        return self.length - self.indexed


class WaveHead(HeadCache):
    """The wave method: clusters ranked by centroid, candidates scored exactly, the best tokens attended, the rest
    estimated (:mod:`kvstore.attention.selection`)."""

    _TENSORS = ("positions",)

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        from ..wave import WaveIndex

        c = self.cfg
        self.index = WaveIndex(self.d, tokens_per_cluster=c.tokens_per_cluster, segment_len=c.segment_len,
                               kmeans_iters=c.kmeans_iters, seed=c.seed)
        self.positions = torch.zeros(0, dtype=torch.long)  # index id -> sequence position
        self._slots = None

    def _index(self, k, v, pos, q):
        kf, vf = k.float(), v.float()
        if self.index.ntotal == 0:
            self.index.build(kf, vf)
        else:
            self.index.add(kf, vf)
        self.positions = torch.cat([self.positions, pos])
        self._slots = None

    def slots(self):
        """The index as one slot of :func:`kvstore.attention.selection.wave_attend` (and its row capacity)."""
        if self._slots is None:
            from .selection import ClusterBounds, WaveSlots

            from ..gpu.cluster_ops import quantize_rows

            ix = self.index
            sizes = ix.sizes.float()
            mean_values = ix.value_sums / sizes.clamp_min(1)[:, None]
            value_mean = ix.value_sums.double().sum(0) / max(ix.ntotal, 1)
            cen, cen_scale = ix.centroids[None], None
            if self.cfg.centroid_dtype == "int8":
                cen, cen_scale = quantize_rows(cen)
            keys, key_scale = ix.keys_sorted, None
            if self.cfg.candidate_dtype == "int8":
                keys, key_scale = quantize_rows(keys)
            slots = WaveSlots(cen, sizes[None], mean_values[None].float(), value_mean[None].float(),
                              ix.offsets[None], keys, ix.values_sorted,
                              torch.zeros(1, dtype=torch.long, device=ix.offsets.device),
                              ix.radii[None] if self.cfg.rank_radius else None, cen_scale, key_scale)
            self._slots = (slots, ClusterBounds(slots.sizes))
        return self._slots

    def decode(self, q):
        if self.indexed == 0:
            return super().decode(q)
        from .selection import SteadyZone, wave_attend

        k, v, pos = self.steady()
        slots, cap = self.slots()
        ix = self.index
        budget = self.cfg.wave_budget(self.length, ix.ntotal)
        dev = slots.keys.device
        # the index holds float32 keys and values: the step runs in float32
        f32 = dict(device=dev, dtype=torch.float32)
        o, lse, step = wave_attend(q[None].to(**f32), slots, SteadyZone(k[None].to(**f32), v[None].to(**f32),
                                                                          k.shape[0]), budget, cap, self.scale)
        rows = step.exact_rows[0]
        rows = rows[rows >= 0]
        n_cand = int(step.candidate_rows[0])
        C = ix.num_clusters
        zone = int((step.candidates >= 0).sum() + (step.estimation >= 0).sum())
        int8_keys = self.cfg.candidate_dtype == "int8"
        acc = Access(key_vectors=k.shape[0] + (0 if int8_keys else n_cand),
                     value_vectors=k.shape[0] + int(rows.numel()),
                     meta_elems=C * (vector_elems(self.d, self.cfg.centroid_dtype)
                                     + (2 if self.cfg.rank_radius else 1)) + zone * self.dv + self.dv
                     + (n_cand * vector_elems(self.d, "int8") if int8_keys else 0),
                     exact_positions=torch.cat([pos, self.positions[ix.order[rows].cpu()]]))
        return o[0].to(q.device), lse[0].to(q.device), acc

    def index_bytes(self) -> int:
        ix = self.index
        if ix.ntotal == 0:
            return 0
        n = ix.centroids.numel() + ix.sizes.numel() + ix.offsets.numel() * 2 + ix.order.numel() * 2
        key_copies = ix.ntotal * (self.d + 4) if self.cfg.candidate_dtype == "int8" else 0  # int8 rows, f32 scales
        return 4 * (n + (ix.value_sums.numel() if ix.value_sums is not None else 0)) + key_copies


class GraphHead(HeadCache):
    """RetrievalAttention: steady zone exact, top-k keys from the graph exact."""

    _TENSORS = ("keys", "values", "positions")

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        from ..graph import AttentionGraphIndex

        c = self.cfg
        self.index = AttentionGraphIndex(self.d, degree=c.graph_degree, ef_search=max(c.ef, c.top_k),
                                         seed=c.seed, num_threads=c.num_threads, progress=False)
        self.keys = torch.zeros(0, self.d, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(0, self.dv, dtype=self.dtype, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long)

    def _index(self, k, v, pos, q):
        if self.index.ntotal == 0:
            # Prefill queries train the graph; without them (a context that
            # first outgrows the window while decoding) the keys stand in.
            train = k if q is None else q.reshape(-1, q.shape[-1])
            self.index.build(k, train)
        else:
            self.index.add(k)
        self.keys = torch.cat([self.keys, k])
        self.values = torch.cat([self.values, v])
        self.positions = torch.cat([self.positions, pos])

    def _decode_index(self, q):
        # One traversal for the whole GQA group: each key read once, scored by
        # every head; top_k per query head, so the group keeps top_k * G keys.
        kk = min(self.cfg.top_k * q.shape[0], self.index.ntotal)
        _, ids, scanned = self.index.search_group(q[None].float(), kk, ef=max(self.cfg.ef, kk))
        ids = np.unique(ids[ids >= 0])
        sel = torch.from_numpy(ids).to(self.keys.device)
        parts = [attention_with_lse(q, self.keys[sel], self.values[sel], self.scale)]
        acc = Access(key_vectors=int(scanned.sum()), value_vectors=int(sel.numel()),
                     exact_positions=self.positions[sel.cpu()])
        return parts, acc

    def index_bytes(self) -> int:
        return 4 * self.index.ntotal * self.index.degree


class QuestHead(HeadCache):
    """Quest-style: per-page min/max key bounds; the best pages attended exactly."""

    _TENSORS = ("keys", "values", "positions", "kmin", "kmax", "page_start")

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.keys = torch.zeros(0, self.d, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(0, self.dv, dtype=self.dtype, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.kmin = torch.zeros(0, self.d, device=self.device)
        self.kmax = torch.zeros(0, self.d, device=self.device)
        self.page_start = torch.zeros(0, dtype=torch.long)

    def _index(self, k, v, pos, q):
        P = self.cfg.page_size
        # Pages never straddle two index chunks: a chunk's last page may be short.
        for p0 in range(0, k.shape[0], P):
            page = k[p0:p0 + P].float()
            self.kmin = torch.cat([self.kmin, page.min(0).values[None]])
            self.kmax = torch.cat([self.kmax, page.max(0).values[None]])
        starts = torch.arange(0, k.shape[0], P) + self.keys.shape[0]
        self.page_start = torch.cat([self.page_start, starts])
        self.keys = torch.cat([self.keys, k])
        self.values = torch.cat([self.values, v])
        self.positions = torch.cat([self.positions, pos])

    def _decode_index(self, q):
        qf = q.float()
        bound = torch.maximum(qf[:, None, :] * self.kmin[None], qf[:, None, :] * self.kmax[None]).sum(-1)  # [G, P]
        score = bound.max(0).values
        npages = self.kmin.shape[0]
        # pages are short where an index chunk ends: count the budget in real tokens (mean page size)
        want = min(npages, int(math.ceil(self.cfg.quest_tokens(self.length) * npages / max(self.keys.shape[0], 1))))
        top = torch.argsort(score, descending=True, stable=True)[:want]
        ends = torch.cat([self.page_start[1:], torch.tensor([self.keys.shape[0]])])
        rows = _ranges(self.page_start[top], ends[top]).to(self.keys.device)
        parts = [attention_with_lse(q, self.keys[rows], self.values[rows], self.scale)]
        acc = Access(key_vectors=int(rows.numel()), value_vectors=int(rows.numel()),
                     meta_elems=2 * npages * self.d, exact_positions=self.positions[rows.cpu()])
        return parts, acc

    def index_bytes(self) -> int:
        return 4 * 2 * self.kmin.numel()


class OracleHead(FullHead):
    """The oracle at a budget: the query heads of this KV head attend exactly one set of ``retrieval`` keys, the
    union of their keys of highest true score (:func:`kvstore.metrics.oracle_keep`, reads shared by the GQA group
    as the wave and graph methods share theirs), and the steady zone; the rest dropped. It scores every key to find
    them, so it is a yardstick for what a sparse method could reach reading that many tokens, not a fast method;
    ``Access`` counts the tokens attended."""

    def decode(self, q):
        from ..metrics import oracle_keep

        k, v, pos = self.steady()
        n = k.shape[0]
        m = min(n, max(1, self.cfg._tokens(self.cfg.retrieval, self.length)))
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (q.to(dt) @ k.to(dt).T) * self.scale                           # [G, n]
        keep = oracle_keep(s[None], torch.tensor([m]), shared=True)[0]
        s = s.masked_fill(~keep, -math.inf)
        o = torch.softmax(s, -1) @ v.to(dt)
        read = keep.any(0)
        return o, torch.logsumexp(s, -1), Access(key_vectors=int(read.sum()), value_vectors=int(read.sum()),
                                                 exact_positions=pos[read])


HEADS: dict[str, type[HeadCache]] = {
    "full": FullHead, "wave": WaveHead, "graph": GraphHead, "streaming": StreamingHead, "quest": QuestHead,
    "oracle": OracleHead,
}


def _ranges(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(s, e)`` for each pair (int64, on the inputs' device)."""
    starts, ends = starts.long(), ends.long()
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=starts.device)
    first = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens)
    return first + torch.arange(total, device=starts.device)


# --- persistence -------------------------------------------------------------
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy for saving (bfloat16 widened to float32, losslessly)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return np.ascontiguousarray(t.numpy())


def head_state(head: HeadCache) -> tuple[dict, dict[str, np.ndarray]]:
    """Everything a head holds: ``(meta, arrays)``."""
    meta = {"length": head.length, "indexed": head.indexed, "dtype": str(head.dtype)}
    arrays = {n: to_numpy(getattr(head, n)) for n in ("sink_k", "sink_v", "recent_k", "recent_v", "recent_pos")}
    for name in getattr(head, "_TENSORS", ()):
        arrays[name] = to_numpy(getattr(head, name))
    index = getattr(head, "index", None)
    if index is not None and index.ntotal > 0:
        imeta, iarrays = index._state()
        meta["index"] = imeta
        arrays.update({f"index.{k}": v for k, v in iarrays.items()})
    return meta, arrays


def _check_head_parts(head: HeadCache, d: int, dv: int) -> None:
    """What a loaded head holds must be what its method reads at ``decode`` (``ValueError`` otherwise)."""
    index = getattr(head, "index", None)
    n_index = 0 if index is None else index.ntotal
    if isinstance(head, WaveHead):
        if n_index != head.indexed or head.positions.shape[0] != n_index:
            raise ValueError("the wave index, its positions and the indexed count disagree")
        if n_index and index.value_dim != dv:
            raise ValueError(f"the wave index holds values of dim {index.value_dim}, the store {dv}")
    if isinstance(head, GraphHead):
        if not (n_index == head.keys.shape[0] == head.values.shape[0] == head.positions.shape[0] == head.indexed):
            raise ValueError("the graph index, its keys, values, positions and the indexed count disagree")
    if isinstance(head, QuestHead):
        n, P = head.keys.shape[0], head.page_start.shape[0]
        if not (n == head.values.shape[0] == head.positions.shape[0] == head.indexed) \
                or tuple(head.kmin.shape) != (P, d) or tuple(head.kmax.shape) != (P, d) \
                or (n and (P == 0 or int(head.page_start[0]) != 0 or bool((head.page_start.diff() <= 0).any())
                           or int(head.page_start[-1]) >= n)):
            raise ValueError("quest pages do not match the keys")


def head_from_state(cls: type[HeadCache], cfg: StoreConfig, d: int, dv: int, device: torch.device, meta: dict,
                    arrays: dict[str, np.ndarray]) -> HeadCache:
    """Rebuild a head saved by :func:`head_state`; ``ValueError`` on anything inconsistent."""
    dtype = _DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
    head = cls(cfg, d, dv, device, dtype)

    def tensor(name: str, cols: int | None, kind: str = "f") -> torch.Tensor:
        a = arrays[name]
        if a.dtype.kind != kind or (cols is not None and (a.ndim != 2 or a.shape[1] != cols)) \
                or (cols is None and a.ndim != 1):
            raise ValueError(f"{name}: unexpected {a.dtype} array of shape {a.shape}")
        t = torch.from_numpy(a)
        return t.to(device, dtype) if kind == "f" else t.long()

    head.sink_k, head.sink_v = tensor("sink_k", d), tensor("sink_v", dv)
    head.recent_k, head.recent_v = tensor("recent_k", d), tensor("recent_v", dv)
    head.recent_pos = tensor("recent_pos", None, "i")
    for name in getattr(cls, "_TENSORS", ()):
        a = arrays[name]
        t = torch.from_numpy(a)
        setattr(head, name, t.long() if a.dtype.kind == "i" else t.to(device, dtype if name in ("keys", "values")
                                                                          else torch.float32))
    for name in ("length", "indexed"):
        x = meta.get(name)
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    head.length, head.indexed = meta["length"], meta["indexed"]
    if head.sink_k.shape[0] != head.sink_v.shape[0] or head.recent_k.shape[0] != head.recent_v.shape[0] \
            or head.recent_k.shape[0] != head.recent_pos.shape[0] \
            or head.sink_k.shape[0] + head.recent_k.shape[0] + head.indexed != head.length:
        raise ValueError("token counts do not add up")
    for name in ("recent_pos", "positions"):
        p = getattr(head, name, None)
        if p is not None and p.numel() and (int(p.min()) < 0 or int(p.max()) >= head.length):
            raise ValueError(f"{name} must lie in [0, length)")
    for name in ("sink_k", "sink_v", "recent_k", "recent_v", "keys", "values", "kmin", "kmax"):
        t = getattr(head, name, None)
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if "index" in meta:
        if not isinstance(meta["index"], dict):
            raise ValueError("index metadata must be a dict")
        iarrays = {k[len("index."):]: v for k, v in arrays.items() if k.startswith("index.")}
        head.index = type(head.index)._from_state(meta["index"], iarrays)
    _check_head_parts(head, d, dv)
    return head
