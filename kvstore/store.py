"""KVStore: a sequence batch's KV cache, one :class:`kvstore.layers.LayerCache` per layer.

``prefill`` stores the prompt's keys and values (building each layer's index),
``append`` adds decoded tokens, and ``attend`` answers a decode query with the
configured method, reading only a small part of the cache. Sequences of one
batch may have different lengths (a mask marks real tokens). Which layer
implementation holds a layer follows from the method and the device
(:func:`kvstore.layers.layer_class`); the store only validates and routes.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .attention.core import full_attention
from .config import StoreConfig
from .layers import LayerCache, Layout, layer_class

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_DIM = 1 << 16
FINITE_CHECK_EVERY = 64   # CUDA stores: steps between the host's reads of the deferred NaN/inf flags


def _check_dim(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_DIM:
        raise ValueError(f"{name} must be an int in [1, {_MAX_DIM}], got {v!r}")
    return v


class KVStore:
    """KV cache of ``num_layers`` layers, each ``[B, num_kv_heads, N, head_dim]``.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention layout.
        config: the decode method and its budgets (:class:`StoreConfig`).
        device: where the KV and the attention live (``"cuda"``: the current
            CUDA device). A CUDA store runs the batched GPU layers (wave, graph, full).
        value_dim: value head dim if it differs from ``head_dim``.
        fingerprint: what the KV belongs to (e.g. the model's name and
            layout); saved with the store and checked by :meth:`load`.

    With ``config.check_finite`` (the default) decoded keys, values and queries
    are checked for NaN/inf: on the CPU at once, on CUDA on the device with no
    host wait, the flag read at every :data:`FINITE_CHECK_EVERY` steps and
    wherever the host waits anyway (``attend_with_lse``, ``stats``, ``save``);
    a bad input then raises ``ValueError`` naming the layer.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, config: StoreConfig | None = None,
                 device: str | torch.device = "cpu", value_dim: int | None = None,
                 fingerprint: dict | None = None) -> None:
        self.num_layers = _check_dim(num_layers, "num_layers")
        self.num_kv_heads = _check_dim(num_kv_heads, "num_kv_heads")
        self.head_dim = _check_dim(head_dim, "head_dim")
        self.value_dim = head_dim if value_dim is None else _check_dim(value_dim, "value_dim")
        self.config = config if config is not None else StoreConfig()
        if not isinstance(self.config, StoreConfig):
            raise TypeError(f"config must be a StoreConfig, got {type(config).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the tensors say "cuda:<i>"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.fingerprint = fingerprint
        self.batch_size: int | None = None
        self._layers: list[LayerCache | None] = [None] * num_layers
        self._bad: list[torch.Tensor | None] = [None] * num_layers   # deferred NaN/inf flags (CUDA)
        self._steps = 0

    @property
    def layout(self) -> Layout:
        return Layout(self.num_kv_heads, self.head_dim, self.value_dim)

    def layer_cache(self, layer: int) -> LayerCache | None:
        """The :class:`kvstore.layers.LayerCache` holding ``layer`` (None before its prefill)."""
        return self._layers[self._check_layer(layer)]

    # --- validation -----------------------------------------------------------
    def _check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer

    def _check_kv(self, k: Any, v: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Type, shape and device checks (host only, no tensor data read)."""
        for name, x, dim in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{what}: {name} must be a torch tensor, got {type(x).__name__}")
            if x.dtype not in _DTYPES:
                raise TypeError(f"{what}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
            if x.dim() != 4 or x.shape[1] != self.num_kv_heads or x.shape[3] != dim:
                raise ValueError(f"{what}: {name} must be [B, {self.num_kv_heads}, N, {dim}], got {tuple(x.shape)}")
            if x.device != self.device and not (x.device.type == self.device.type == "cpu"):
                raise ValueError(f"{what}: {name} is on {x.device}, the store is on {self.device}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in [B, H, N]")
        if self.batch_size is not None and k.shape[0] != self.batch_size:
            raise ValueError(f"{what}: batch size {k.shape[0]} differs from the store's {self.batch_size}")
        return k, v

    def _check_mask(self, mask: Any, B: int, N: int, what: str) -> torch.Tensor | None:
        """None for no padding; else a CPU bool ``[B, N]``."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.shape != (B, N):
            raise ValueError(f"{what}: mask must be a [B={B}, N={N}] tensor")
        mask = mask.to("cpu", torch.bool)
        return None if bool(mask.all()) else mask

    def _watch_finite(self, layer: int, what: str, **xs: torch.Tensor) -> None:
        """NaN/inf check of decode inputs: at once on the CPU, deferred (no host wait) on CUDA."""
        if not self.config.check_finite:
            return
        for name, x in xs.items():
            if not x.numel():
                continue
            if x.device.type != "cuda":
                _check_finite(what, x, name)
                continue
            from ._validate import max_entry

            bad = ~(x.abs().amax() <= max_entry(x.shape[-1]))                  # NaN compares False: bad too
            self._bad[layer] = bad if self._bad[layer] is None else self._bad[layer] | bad

    def check_finite_flags(self) -> None:
        """Raise ``ValueError`` naming the first layer whose decode inputs held NaN or inf since the last check
        (a CUDA store defers the check; this reads the flags, which waits for the GPU)."""
        for li, bad in enumerate(self._bad):
            if bad is not None:
                self._bad[li] = None
                if bool(bad):
                    raise ValueError(f"layer {li}: a decode step's keys, values or queries contained NaN or inf")

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
        _check_finite("prefill", k, "k")
        _check_finite("prefill", v, "v")
        if q is not None:
            if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] != B or q.shape[2] != N \
                    or q.shape[3] != self.head_dim or q.shape[1] % H:
                raise ValueError(f"prefill: q must be [B={B}, Hq (multiple of {H}), N={N}, {self.head_dim}]")
            _check_finite("prefill", q, "q")
        elif self.config.method == "graph":
            raise ValueError("prefill: the graph method needs q (the prompt's queries) to train its index")
        cls = layer_class(self.config, self.device, mask)
        # Swapped in only once built: a failed prefill leaves the layer as it was.
        self._layers[layer] = cls.build(self.config, self.layout, k, v, q, mask, self.device)
        self._bad[layer] = None
        self.batch_size = B

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add decoded tokens: k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``, mask ``[B, T]``.

        Called at every layer of every decode step; with ``mask=None`` it makes
        no device->host synchronisation.
        """
        layer = self._check_layer(layer)
        cache = self._layer(layer)
        k, v = self._check_kv(k, v, "append")
        self._watch_finite(layer, "append", k=k, v=v)
        B, _, T, _ = k.shape
        # mask=None (every token real, the decode case) reads nothing from the device
        cache.append(k, v, self._check_mask(mask, B, T, "append"))

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Decode attention: q ``[B, Hq, 1, D]`` -> out ``[B, Hq, 1, Dv]`` (q's dtype).

        Called at every layer of every decode step; unlike
        :meth:`attend_with_lse` it does not copy the lse to the CPU (a
        device->host synchronisation on a CUDA store).
        """
        return self._attend(layer, q, with_lse=False)[0]

    def attend_with_lse(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Like :meth:`attend`, also returning lse ``[B, Hq]`` (fp32, on the CPU) and the
        per-(sequence, KV head) :class:`~kvstore.attention.heads.Access` records of what was read
        (empty for layers that do not record them)."""
        out = self._attend(layer, q, with_lse=True)
        self.check_finite_flags()
        return out

    def _attend(self, layer: int, q: torch.Tensor, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        layer = self._check_layer(layer)
        cache = self._layer(layer)
        H = self.num_kv_heads
        if not isinstance(q, torch.Tensor) or q.dtype not in _DTYPES:
            raise TypeError("attend: q must be a float32/float16/bfloat16 torch tensor")
        batch = cache.batch_size
        if q.dim() != 4 or q.shape[0] != batch or q.shape[2] != 1 or q.shape[3] != self.head_dim \
                or q.shape[1] % H:
            raise ValueError(f"attend: q must be [B={batch}, Hq (multiple of {H}), 1, {self.head_dim}], "
                             f"got {tuple(q.shape)}")
        if q.device != self.device and not (q.device.type == self.device.type == "cpu"):
            raise ValueError(f"attend: q is on {q.device}, the store is on {self.device}")
        self._watch_finite(layer, "attend", q=q)
        o, lse = cache.attend(q[:, :, 0])
        self._steps += 1
        if self.device.type == "cuda" and self._steps % (FINITE_CHECK_EVERY * self.num_layers) == 0:
            self.check_finite_flags()
        access = cache.last_access() or []
        return o[:, :, None], (lse.float().cpu() if with_lse else None), access

    def _layer(self, layer: int) -> LayerCache:
        cache = self._layers[layer]
        if cache is None:
            raise RuntimeError(f"layer {layer} holds no tokens: call prefill(layer, k, v) first")
        return cache

    def reset(self, layer: int | None = None) -> None:
        """Forget the tokens of ``layer`` (every layer when None); the next call for it must be a prefill."""
        layers = range(self.num_layers) if layer is None else [self._check_layer(layer)]
        for li in layers:
            self._layers[li] = None
            self._bad[li] = None
        if all(x is None for x in self._layers):
            self.batch_size = None

    def __copy__(self) -> "KVStore":
        # a shallow copy would share the layers, and a later append to one would change the other
        return copy.deepcopy(self)

    # --- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the whole store (every layer: KV, indexes, steady zone, config, fingerprint) to ``path``:
        atomically (a temp file, fsync, rename), versioned and checksummed. A failed save leaves any previous
        file at ``path`` intact."""
        self.check_finite_flags()
        _save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", fingerprint: dict | None = None,
             mmap: bool = True) -> "KVStore":
        """Load a store written by :meth:`save`. ``fingerprint``: refuse a store saved for another model
        (``ValueError``). ``mmap``: map the file instead of reading a second copy into RAM; the loaded store
        does not depend on the file afterwards (it maps a private snapshot, see ``docs/guarantees.md``). A
        truncated, altered, crafted or foreign file raises ``CorruptFileError`` naming it; nothing is returned
        half-loaded."""
        return _load(path, device, fingerprint, mmap)

    # --- reporting ----------------------------------------------------------------
    def seq_lengths(self, layer: int = 0) -> list[int]:
        """Tokens seen per sequence (including tokens a method dropped)."""
        return self._layer(self._check_layer(layer)).seq_lengths()

    def stats(self) -> dict[str, Any]:
        """Per layer: tokens stored, KV bytes read by the last decode step against full attention
        (``read_fraction``), index sizes, and the layer implementation (``layer``)."""
        self.check_finite_flags()
        layers = []
        for cache in self._layers:
            layers.append(None if cache is None else {"layer": cache.kind, **cache.stats()})
        return {"method": self.config.method, "layers": layers}


def _check_finite(what: str, x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN, inf or entries so large that a float32 dot product over its last
    dim could overflow (:func:`kvstore._validate.check_magnitude`). Reads the data back on the host."""
    from ._validate import check_magnitude

    if x.numel():
        check_magnitude(float(x.detach().abs().amax()), f"{what}: {name}", x.shape[-1])


STORE_KIND = "kvstore_store"


def _save(store: "KVStore", path: str | os.PathLike) -> None:
    from ._fileformat import write_container

    layers_meta: list[Any] = []
    arrays: dict[str, Any] = {}
    for li, cache in enumerate(store._layers):
        if cache is None:
            layers_meta.append(None)
            continue
        m, a = cache.state()
        layers_meta.append({"kind": cache.kind, "state": m})
        arrays.update({f"L{li}.{k}": x for k, x in a.items()})
    meta = {"layout": {"num_layers": store.num_layers, **store.layout._asdict()}, "config": store.config.to_dict(),
            "fingerprint": store.fingerprint, "batch_size": store.batch_size, "layers": layers_meta}
    write_container(path, STORE_KIND, meta, arrays)


def _layer_entry(entry: Any, li: int, arrays: dict[str, Any]) -> tuple[str, dict, dict] | None:
    """(kind, state meta, arrays) of a saved layer, also from files written before layers had kinds."""
    if entry is None:
        return None
    prefix = f"L{li}."
    if isinstance(entry, list):                                   # per-head rows
        kind, state, prefix = "heads", {"rows": entry}, f"L{li}."
    elif isinstance(entry, dict) and "gpu_wave" in entry:         # a GPU wave layer
        kind, state, prefix = "wave", entry["gpu_wave"], f"L{li}.W."
    elif isinstance(entry, dict) and isinstance(entry.get("kind"), str) and isinstance(entry.get("state"), dict):
        kind, state = entry["kind"], entry["state"]
    else:
        raise ValueError(f"layer {li}: unreadable entry")
    return kind, state, {k[len(prefix):]: x for k, x in arrays.items() if k.startswith(prefix)}


def _load(path: str | os.PathLike, device: str | torch.device, fingerprint: dict | None, mmap: bool) -> "KVStore":
    from ._fileformat import CorruptFileError, read_container
    from .layers import LAYER_KINDS

    kind, meta, arrays = read_container(path, mmap=mmap)
    name = os.fspath(path)
    if kind != STORE_KIND:
        raise ValueError(f"{name} holds a {kind!r}, not a saved KVStore")
    if not isinstance(meta, dict):
        raise CorruptFileError(name, "the store's metadata is not a dict")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{name} was saved for a different model or layout: saved {meta.get('fingerprint')}, "
                         f"expected {fingerprint}")
    try:
        lay = meta["layout"]
        if not isinstance(lay, dict):
            raise ValueError("layout must be a dict")
        n_layers = _check_dim(lay["num_layers"], "num_layers")
        layers = meta["layers"]
        # checked against the file before anything per layer is allocated
        if not isinstance(layers, list) or len(layers) != n_layers:
            raise ValueError("layers must be a list with one entry per layer")
        if not isinstance(meta["config"], dict):
            raise ValueError("config must be a dict")
        store = KVStore(n_layers, lay["num_kv_heads"], lay["head_dim"], StoreConfig.from_dict(meta["config"]), device,
                        value_dim=lay["value_dim"], fingerprint=meta.get("fingerprint"))
        batch = meta["batch_size"]
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError("batch_size must be None or an int >= 1")
        kinds = LAYER_KINDS
        for li, entry in enumerate(layers):
            parsed = _layer_entry(entry, li, arrays)
            if parsed is None:
                continue
            lkind, state, a = parsed
            if lkind not in kinds:
                raise ValueError(f"layer {li}: unknown layer kind {lkind!r}")
            cache = kinds[lkind].from_state(state, a, store.config, store.layout, store.device)
            if cache.batch_size != batch:
                raise ValueError(f"layer {li} holds {cache.batch_size} sequences, the store {batch}")
            store._layers[li] = cache
        store.batch_size = batch
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
        raise CorruptFileError(name, f"inconsistent store contents ({e})") from None
    return store


def decode_attention(q: torch.Tensor, store: KVStore, layer: int) -> torch.Tensor:
    """``store.attend(layer, q)`` as a function: q ``[B, Hq, 1, D]`` -> ``[B, Hq, 1, Dv]``."""
    return store.attend(layer, q)


__all__ = ["KVStore", "decode_attention", "full_attention"]
