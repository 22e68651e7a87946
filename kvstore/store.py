"""KVStore: a sequence batch's KV cache, per layer and KV head, held as indexes.

``prefill`` stores the prompt's keys and values (building each head's index),
``append`` adds decoded tokens, and ``attend`` answers a decode query with the
configured method, reading only a small part of the cache. Sequences of one
batch may have different lengths (a mask marks real tokens).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from .attention.core import full_attention
from .attention.heads import HEADS, Access, HeadCache
from .config import StoreConfig

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class KVStore:
    """KV cache of ``num_layers`` layers, each ``[B, num_kv_heads, N, head_dim]``.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention layout.
        config: the decode method and its budgets (:class:`StoreConfig`).
        device: where the KV and the attention live (``"cuda"``: the current
            CUDA device). A CUDA store runs the wave method on GPU wave layers.
        value_dim: value head dim if it differs from ``head_dim``.
        fingerprint: what the KV belongs to (e.g. the model's name and
            layout); saved with the store and checked by :meth:`load`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, config: StoreConfig | None = None,
                 device: str | torch.device = "cpu", value_dim: int | None = None,
                 fingerprint: dict | None = None) -> None:
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.config = config if config is not None else StoreConfig()
        if not isinstance(self.config, StoreConfig):
            raise TypeError(f"config must be a StoreConfig, got {type(config).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the tensors say "cuda:<i>"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.fingerprint = fingerprint
        self.batch_size: int | None = None
        self._heads: list[list[list[HeadCache]] | None] = [None] * num_layers  # [layer][b][h]
        self._last_access: list[list[list[Access]] | None] = [None] * num_layers

    # --- validation -----------------------------------------------------------
    def _check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer

    def _check_kv(self, k: Any, v: Any, what: str, finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Type, shape and device checks (host only); ``finite``: also NaN/inf (reads the data: a GPU sync)."""
        for name, x, dim in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{what}: {name} must be a torch tensor, got {type(x).__name__}")
            if x.dtype not in _DTYPES:
                raise TypeError(f"{what}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
            if x.dim() != 4 or x.shape[1] != self.num_kv_heads or x.shape[3] != dim:
                raise ValueError(f"{what}: {name} must be [B, {self.num_kv_heads}, N, {dim}], got {tuple(x.shape)}")
            if x.device != self.device and not (x.device.type == self.device.type == "cpu"):
                raise ValueError(f"{what}: {name} is on {x.device}, the store is on {self.device}")
        if finite:
            _check_finite(what, k, "k")
            _check_finite(what, v, "v")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in [B, H, N]")
        if self.batch_size is not None and k.shape[0] != self.batch_size:
            raise ValueError(f"{what}: batch size {k.shape[0]} differs from the store's {self.batch_size}")
        return k, v

    def _check_mask(self, mask: Any, B: int, N: int, what: str) -> torch.Tensor:
        if mask is None:
            return torch.ones(B, N, dtype=torch.bool)
        if not isinstance(mask, torch.Tensor) or mask.shape != (B, N):
            raise ValueError(f"{what}: mask must be a [B={B}, N={N}] tensor")
        return mask.to("cpu", torch.bool)

    # --- token flow ---------------------------------------------------------------
    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> None:
        """Store a prompt's KV for one layer (replacing what the layer held).

        k ``[B, Hkv, N, D]``, v ``[B, Hkv, N, Dv]``; q ``[B, Hq, N, D]`` (the
        prompt's post-RoPE queries; needed by the graph method to train its
        index); mask ``[B, N]`` bool, True for real tokens (padding on either
        side is skipped; real tokens keep their order).
        """
        layer = self._check_layer(layer)
        k, v = self._check_kv(k, v, "prefill")
        B, H, N, _ = k.shape
        mask = self._check_mask(mask, B, N, "prefill")
        if q is not None:
            if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] != B or q.shape[2] != N \
                    or q.shape[3] != self.head_dim or q.shape[1] % H:
                raise ValueError(f"prefill: q must be [B={B}, Hq (multiple of {H}), N={N}, {self.head_dim}]")
            _check_finite("prefill", q, "q")
        elif self.config.method == "graph":
            raise ValueError("prefill: the graph method needs q (the prompt's queries) to train its index")
        if self._gpu_wave(mask):
            self._heads[layer] = self._build_gpu_layer(k, v)
            self.batch_size = B
            return
        heads = [[self._new_head(k.dtype) for _ in range(H)] for _ in range(B)]
        for b in range(B):
            rows = mask[b].nonzero().squeeze(1).to(k.device)
            for h in range(H):
                qb = None
                if q is not None:
                    G = q.shape[1] // H
                    qb = q[b, h * G:(h + 1) * G].index_select(1, rows.to(q.device))
                heads[b][h].prefill(k[b, h].index_select(0, rows), v[b, h].index_select(0, rows), qb)
        # Swapped in only once every head is built: a failed prefill leaves the layer as it was.
        self._heads[layer] = heads
        self.batch_size = B

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add decoded tokens: k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``, mask ``[B, T]``.

        Called at every layer of every decode step: with ``mask=None`` and
        ``config.check_finite=False`` it makes no device->host synchronisation.
        """
        layer = self._check_layer(layer)
        heads = self._layer(layer)
        k, v = self._check_kv(k, v, "append", finite=self.config.check_finite)
        B, H, T, _ = k.shape
        # mask=None (every token real, the decode case) selects no rows: no mask is built,
        # and no row index is copied to the device (a blocking host->device copy waits for the GPU).
        mask = None if mask is None else self._check_mask(mask, B, T, "append")
        if not isinstance(heads, list):  # a GpuWaveLayer: batch decoding without padding
            if mask is not None and not bool(mask.all()):
                raise ValueError("append: the GPU wave layer takes no padding in decoded tokens")
            for t in range(T):
                heads.append(k[:, :, t], v[:, :, t])
            return
        for b in range(B):
            if mask is None:
                for h in range(H):
                    heads[b][h].append(k[b, h], v[b, h])
                continue
            rows = mask[b].nonzero().squeeze(1).to(k.device)
            if rows.numel() == 0:
                continue
            for h in range(H):
                heads[b][h].append(k[b, h].index_select(0, rows), v[b, h].index_select(0, rows))

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Decode attention: q ``[B, Hq, 1, D]`` -> out ``[B, Hq, 1, Dv]`` (q's dtype).

        Called at every layer of every decode step; unlike
        :meth:`attend_with_lse` it does not copy the lse to the CPU (a
        device->host synchronisation on a CUDA store).
        """
        return self._attend(layer, q, with_lse=False)[0]

    def attend_with_lse(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Like :meth:`attend`, also returning lse ``[B, Hq]`` (fp32, on the CPU) and the
        per-(sequence, KV head) :class:`Access` records of what was read."""
        return self._attend(layer, q, with_lse=True)

    def _attend(self, layer: int, q: torch.Tensor, with_lse: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        layer = self._check_layer(layer)
        heads = self._layer(layer)
        H = self.num_kv_heads
        if not isinstance(q, torch.Tensor) or q.dtype not in _DTYPES:
            raise TypeError("attend: q must be a float32/float16/bfloat16 torch tensor")
        batch = len(heads) if isinstance(heads, list) else heads.B
        if q.dim() != 4 or q.shape[0] != batch or q.shape[2] != 1 or q.shape[3] != self.head_dim \
                or q.shape[1] % H:
            raise ValueError(f"attend: q must be [B={batch}, Hq (multiple of {H}), 1, {self.head_dim}], "
                             f"got {tuple(q.shape)}")
        if self.config.check_finite:
            _check_finite("attend", q, "q")
        G = q.shape[1] // H
        if not isinstance(heads, list):  # a GpuWaveLayer
            o, lse = heads.decode_with_lse(q[:, :, 0])
            self._last_access[layer] = None
            return o[:, :, None], lse.float().cpu() if with_lse else None, []
        out = torch.empty(q.shape[0], q.shape[1], 1, self.value_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32) if with_lse else None
        access: list[list[Access]] = []
        for b, row in enumerate(heads):
            acc_row = []
            for h, head in enumerate(row):
                o, l, acc = head.decode(q[b, h * G:(h + 1) * G, 0])
                out[b, h * G:(h + 1) * G, 0] = o.to(q.dtype)
                if lse is not None:
                    lse[b, h * G:(h + 1) * G] = l.float().cpu()
                acc_row.append(acc)
            access.append(acc_row)
        self._last_access[layer] = access
        return out, lse, access

    def _layer(self, layer: int) -> list[list[HeadCache]]:
        heads = self._heads[layer]
        if heads is None:
            raise RuntimeError(f"layer {layer} holds no tokens: call prefill(layer, k, v) first")
        return heads

    def _gpu_wave(self, mask: torch.Tensor) -> bool:
        """A CUDA store runs the wave method as one batched GpuWaveLayer per layer (unless prompts are padded)."""
        return self.device.type == "cuda" and self.config.method == "wave" and bool(mask.all())

    def _build_gpu_layer(self, k: torch.Tensor, v: torch.Tensor):
        from .gpu.wave_layer import GpuWaveLayer, WaveGpuConfig

        c = self.config
        if not (isinstance(c.retrieval, float) and isinstance(c.estimation, float)):
            raise ValueError("the GPU wave layer takes retrieval and estimation as fractions of the context")
        cfg = WaveGpuConfig(mode=c.gpu_mode, cache_ratio=c.cache_ratio, estimator=c.gpu_estimator, sink=c.sink,
                            window=c.window,
                            retrieval=c.retrieval, estimation=c.estimation, tokens_per_cluster=c.tokens_per_cluster,
                            segment_len=c.segment_len, kmeans_iters=c.kmeans_iters,
                            update_interval=c.update_interval, num_threads=c.num_threads or None, seed=c.seed)
        return GpuWaveLayer.build(k, v, cfg, device=self.device)

    def _new_head(self, dtype: torch.dtype) -> HeadCache:
        return HEADS[self.config.method](self.config, self.head_dim, self.value_dim, self.device, dtype)

    # --- persistence --------------------------------------------------------------
    def layout(self) -> dict[str, int]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "value_dim": self.value_dim}

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole store (every layer and head: KV, indexes, steady
        zone, config, fingerprint) to ``path``: atomically (a temp file,
        fsync, rename), versioned and checksummed. A failed save leaves any
        previous file at ``path`` intact."""
        _save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", fingerprint: dict | None = None,
             mmap: bool = True) -> "KVStore":
        """Load a store written by :meth:`save`. ``fingerprint``: refuse a
        store saved for another model (``ValueError``). ``mmap``: map the
        file instead of reading a second copy into RAM. A truncated, altered
        or foreign file raises ``CorruptFileError`` naming it; nothing is
        returned half-loaded."""
        return _load(path, device, fingerprint, mmap)

    # --- reporting ----------------------------------------------------------------
    def seq_lengths(self, layer: int = 0) -> list[int]:
        """Tokens seen per sequence (including tokens a method dropped)."""
        heads = self._layer(self._check_layer(layer))
        if not isinstance(heads, list):
            return [heads.length] * heads.B
        return [row[0].length for row in heads]

    def stats(self) -> dict[str, Any]:
        """Per layer: tokens stored, KV elements read by the last decode step
        against full attention, and index sizes."""
        layers = []
        for i, heads in enumerate(self._heads):
            if heads is None:
                layers.append(None)
                continue
            if not isinstance(heads, list):
                st = heads.stats()
                entry = {"tokens": [heads.length] * heads.B, "gpu": st}
                if "read_fraction" in st:
                    entry["read_fraction"] = st["read_fraction"]
                layers.append(entry)
                continue
            d, dv = self.head_dim, self.value_dim
            full = sum(hd.length * (d + dv) for row in heads for hd in row)
            entry: dict[str, Any] = {
                "tokens": [row[0].length for row in heads],
                "tokens_stored": sum(hd.stored_tokens() for row in heads for hd in row),
                "tokens_indexed": sum(hd.indexed for row in heads for hd in row),
                "index_bytes": sum(hd.index_bytes() for row in heads for hd in row),
            }
            acc = self._last_access[i]
            if acc is not None:
                read = sum(a.elems(d, dv) for row in acc for a in row)
                entry["read_fraction"] = read / full if full else math.nan
            layers.append(entry)
        return {"method": self.config.method, "layers": layers}


def _check_finite(what: str, x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf. Reads the data back on the host:
    on a CUDA tensor it waits for the GPU (see ``StoreConfig.check_finite``)."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: {name} contains NaN or inf")


STORE_KIND = "kvstore_store"


def _save(store: "KVStore", path: str | os.PathLike) -> None:
    from .attention.heads import head_state
    from ._fileformat import write_container

    layers_meta: list[Any] = []
    arrays: dict[str, Any] = {}
    for li, heads in enumerate(store._heads):
        if heads is None:
            layers_meta.append(None)
            continue
        if not isinstance(heads, list):  # a GpuWaveLayer
            m, a = heads.state()
            layers_meta.append({"gpu_wave": m})
            arrays.update({f"L{li}.W.{k}": v for k, v in a.items()})
            continue
        rows = []
        for b, row in enumerate(heads):
            metas = []
            for h, head in enumerate(row):
                m, a = head_state(head)
                metas.append(m)
                arrays.update({f"L{li}.B{b}.H{h}.{k}": v for k, v in a.items()})
            rows.append(metas)
        layers_meta.append(rows)
    meta = {"layout": store.layout(), "config": store.config.to_dict(), "fingerprint": store.fingerprint,
            "batch_size": store.batch_size, "layers": layers_meta}
    write_container(path, STORE_KIND, meta, arrays)


def _load(path: str | os.PathLike, device: str | torch.device, fingerprint: dict | None, mmap: bool) -> "KVStore":
    from .attention.heads import head_from_state
    from ._fileformat import CorruptFileError, read_container

    kind, meta, arrays = read_container(path, mmap=mmap)
    name = os.fspath(path)
    if kind != STORE_KIND:
        raise ValueError(f"{name} holds a {kind!r}, not a saved KVStore")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{name} was saved for a different model or layout: saved {meta.get('fingerprint')}, "
                         f"expected {fingerprint}")
    try:
        lay = meta["layout"]
        store = KVStore(lay["num_layers"], lay["num_kv_heads"], lay["head_dim"],
                        StoreConfig.from_dict(meta["config"]), device, value_dim=lay["value_dim"],
                        fingerprint=meta.get("fingerprint"))
        cls = HEADS[store.config.method]
        if len(meta["layers"]) != store.num_layers:
            raise ValueError("layer count does not match the layout")
        for li, rows in enumerate(meta["layers"]):
            if rows is None:
                continue
            if isinstance(rows, dict):  # a GpuWaveLayer
                from .gpu.wave_layer import GpuWaveLayer

                prefix = f"L{li}.W."
                a = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
                layer = GpuWaveLayer.from_state(rows["gpu_wave"], a, store.device)
                if (layer.Hkv, layer.D, layer.Dv) != (store.num_kv_heads, store.head_dim, store.value_dim):
                    raise ValueError(f"layer {li} does not match the layout")
                store._heads[li] = layer
                continue
            heads = []
            for b, metas in enumerate(rows):
                if len(metas) != store.num_kv_heads:
                    raise ValueError(f"layer {li} has {len(metas)} heads, the layout {store.num_kv_heads}")
                row = []
                for h, m in enumerate(metas):
                    prefix = f"L{li}.B{b}.H{h}."
                    a = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
                    row.append(head_from_state(cls, store.config, store.head_dim, store.value_dim, store.device, m, a))
                heads.append(row)
            store._heads[li] = heads
        store.batch_size = meta["batch_size"]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CorruptFileError(name, f"inconsistent store contents ({e})") from None
    return store


def decode_attention(q: torch.Tensor, store: KVStore, layer: int) -> torch.Tensor:
    """``store.attend(layer, q)`` as a function: q ``[B, Hq, 1, D]`` -> ``[B, Hq, 1, Dv]``."""
    return store.attend(layer, q)


__all__ = ["KVStore", "decode_attention", "full_attention"]
