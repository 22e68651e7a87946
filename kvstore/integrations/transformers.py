"""kvstore as a drop-in decode attention for Hugging Face transformers.

>>> import kvstore.integrations.transformers  # registers attn_implementation="kvstore"
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvstore")
>>> model.generate(**inputs, max_new_tokens=32)                         # a KVStoreCache, StoreConfig()
>>> model.generate(**inputs, max_new_tokens=32, cache_config={"method": "quest"})
>>> cache = KVStoreCache(model.config, StoreConfig(method="wave"))      # to keep it: stats, save
>>> model.generate(**inputs, cache=cache, max_new_tokens=32)

The prompt (prefill) is attended exactly: on CUDA without padding in one causal
SDPA call (flash attention: GQA and the causal mask inside the kernel, no KV
copy), otherwise in query chunks so no ``N x N`` score matrix is held; its keys,
values and queries then fill a :class:`kvstore.KVStore`, and every decode step
attends through the store. Llama-, Mistral-, Qwen2/3- and Gemma-2/3-family
models are supported (any GQA layout; head_dim 64, 128, 256, ...).

How the pieces behave (transformers' own conventions where it has one):

* **Which cache.** ``attn_implementation="kvstore"`` alone is enough: when
  ``generate`` (and so ``pipeline``) would build its default cache, it builds a
  :class:`KVStoreCache` instead, with ``generation_config.cache_config`` (a
  :class:`~kvstore.StoreConfig` or a dict of its fields; default
  ``StoreConfig()``). transformers has no registry of cache implementations, so
  :func:`register` wraps ``GenerationMixin._prepare_cache_for_generation``; the
  wrapper acts only for models using a registered kvstore attention or given a
  KVStoreCache. ``cache=`` is the keyword for passing a cache (transformers
  5.24 deprecates ``past_key_values=``). Any other cache (a ``DynamicCache``,
  ``cache_implementation="static"``, ``use_cache=False``) is refused with a
  ``ValueError`` before anything runs, and a decode step that reaches the
  attention function without a KVStoreCache raises: kvstore never silently
  falls back to full attention. A forward without any cache (``model(ids)``:
  scoring, one prefill) is exact, as a prefill always is.
* **Device and dtype** come from the first key states, as in ``DynamicCache``:
  the store is created at the first update, on the keys' device, and picks its
  layer implementation from that device (the batched GPU layers on CUDA).
  ``device=`` pins it instead. After :meth:`KVStoreCache.reset` the next batch
  may have another size, device or dtype.
* **Hybrid models** (``config.layer_types`` mixing ``"sliding_attention"`` and
  ``"full_attention"``: Gemma 2/3, Qwen2/3 with ``use_sliding_window``): a
  sliding layer keeps transformers' ``DynamicSlidingWindowLayer`` inside the
  KVStoreCache and attends exactly over its window; the store holds only the
  global layers. A model whose every layer is sliding (Mistral with
  ``sliding_window`` set) is refused: the store would hold nothing.
* **Scaling and softcapping.** Prefill and window layers use the model's
  ``scaling``; the store attends with ``1/sqrt(head_dim)``, so a decode query
  is multiplied by ``scaling * sqrt(head_dim)`` first (exact; Gemma's
  ``query_pre_attn_scalar``). Attention-logit softcapping
  (``attn_logit_softcapping``, Gemma 2) cannot be applied inside the store and
  is refused; bidirectional attention too.
* **Tensor parallelism** (transformers' ``tp_plan`` / ``DistributedConfig(tp_size=N)``, or torch's
  ``parallelize_module``): each rank's attention sees only its own KV heads, and its KVStoreCache stores and
  attends just those; the head count comes from the key states, the rank's slice of the model's heads from the
  sharded ``k_proj`` weight, and both go into the store's fingerprint (``"shard"``). Decoding adds no
  cross-rank traffic. :meth:`KVStoreCache.save` is then collective: one file per rank plus a manifest (see
  ``docs/tensor_parallel.md``).
* **Beam search, assisted/speculative decoding, crop.** The store cannot
  reorder, duplicate or drop its sequences' tokens, so ``reorder_cache``,
  ``crop`` (other than ``crop(0)``), ``batch_repeat_interleave`` and
  ``batch_select_indices`` raise ``NotImplementedError``, and ``generate``
  refuses beam search and assisted generation up front with a ``ValueError``
  naming the mode. Greedy search and sampling (also ``num_return_sequences``)
  work.
"""
from __future__ import annotations

import functools
import math
import os
import re
import threading
from typing import Any, NamedTuple

import torch

from ..config import StoreConfig
from ..store import KVStore

SUPPORTED = ">=5.24,<6"  # transformers versions this module is tested with
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text")
PREFILL_CHUNK = 1024


def _installed_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("kvstore.integrations.transformers needs transformers: pip install 'kvstore[hf]'") from e
    found = _installed_version()
    m = re.match(r"(\d+)\.(\d+)", found)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if major != 5 or minor < 24:
        raise ImportError(f"kvstore.integrations.transformers supports transformers {SUPPORTED}, found {found}")
    return transformers


_tf = _require_transformers()
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer  # noqa: E402

_NAMES: set[str] = set()  # attn_implementation names registered for kvstore_attention


class _Step(NamedTuple):
    """What a cache layer's update hands to the attention function that runs right after it."""

    cache: "KVStoreCache"
    layer: int
    kind: str            # "prefill", "extend" (store layers) or "window" (sliding layers)
    key: torch.Tensor    # the key states the update returned: the attention function must receive this object
    value: torch.Tensor


_active = threading.local()  # .step: the _Step of the cache layer just updated, per thread


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a == b or a.type == b.type == "cpu"


# --- tensor parallelism -----------------------------------------------------------------------
MANIFEST_KIND = "kvstore_tp_manifest"   # the container kind of the manifest a sharded save writes at ``path``
_MANIFEST_MAX_BYTES = 4 << 20           # a larger file at ``path`` is a store, never a manifest
_DIGEST_BYTES = 32                      # the SHA-256 that ends every container file (kvstore/_fileformat.py)


def _distributed() -> tuple[int, int]:
    """``(rank, world size)`` of torch.distributed's default group; ``(0, 1)`` when it is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _kv_head_slice(module: torch.nn.Module, local: int, total: int, head_dim: int, layer: int) -> tuple[int, int]:
    """``[start, stop)``: which of the model's ``total`` KV heads this process's attention ``module`` holds, its
    key states having ``local`` heads.

    Read from the sharded ``k_proj`` weight when it is a DTensor (transformers' tensor parallelism and torch's
    ``parallelize_module`` both shard it by rows, ``head_dim`` rows per head); else every head when none is
    missing; else, on ``world`` ranks each holding ``total / world`` heads, the rank-ordered even split.
    """
    weight = getattr(getattr(module, "k_proj", None), "weight", None)
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
            if shape[0] == local * head_dim and offset[0] % head_dim == 0:
                start = offset[0] // head_dim
                return start, start + local
    if local == total:
        return 0, total
    rank, world = _distributed()
    if world > 1 and local * world == total:
        return rank * local, (rank + 1) * local
    raise ValueError(f"layer {layer}: the key states have {local} KV heads, config.num_key_value_heads is {total}, "
                     f"and kvstore cannot tell which of them this process holds (k_proj.weight is not a DTensor and "
                     f"the {total} heads are not split evenly over a torch.distributed world of {world}); shard the "
                     f"model with transformers' tensor parallelism (DistributedConfig(tp_size=...)) or torch's "
                     f"parallelize_module")


def _shard_text(shard: dict | None, total: int) -> str:
    if not shard:
        return f"all {total} KV heads (no tensor-parallel shard)"
    a, b = shard["kv_heads"]
    return f"KV heads [{a}, {b}) of {total}, rank {shard['rank']} of {shard['world_size']}"


def _store_shard(store: KVStore) -> dict | None:
    """The ``"shard"`` a store's fingerprint records (None: the store holds every KV head of the model)."""
    return store.fingerprint.get("shard") if isinstance(store.fingerprint, dict) else None


def _fingerprint_diff(saved: Any, expected: dict) -> str:
    """What differs between two fingerprints, field by field (``name: saved X, this model Y``)."""
    if not isinstance(saved, dict):
        return f"saved {saved!r}, expected {expected}"
    keys = [k for k in list(expected) + [k for k in saved if k not in expected] if saved.get(k) != expected.get(k)]
    return "; ".join(f"{k}: saved {saved.get(k)!r}, this model {expected.get(k)!r}" for k in keys)


def _file_digest(path: str) -> str:
    """The SHA-256 a container file ends with (hex): it identifies the file's contents."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < _DIGEST_BYTES:
            return ""  # no container: matches no recorded digest
        f.seek(-_DIGEST_BYTES, os.SEEK_END)
        return f.read(_DIGEST_BYTES).hex()


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> str:
    """The file rank ``rank`` of ``world_size`` saves its store to when a context is saved at ``path``."""
    return f"{os.fspath(path)}.rank{rank}-of-{world_size}"


def _read_manifest(path: str) -> dict | None:
    """The manifest at ``path``, or None when ``path`` holds something else (a store)."""
    from .._fileformat import CorruptFileError, read_container

    if os.path.getsize(path) > _MANIFEST_MAX_BYTES:
        return None
    kind, meta, _ = read_container(path)
    if kind != MANIFEST_KIND:
        return None
    try:
        world = meta["world_size"]
        shards = meta["shards"]
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError("world_size must be an int >= 1")
        if not isinstance(meta["fingerprint"], dict):
            raise ValueError("fingerprint must be a dict")
        if not isinstance(shards, list) or len(shards) != world:
            raise ValueError("shards must list one entry per rank")
        for r, e in enumerate(shards):
            heads = e["kv_heads"]
            if (e["rank"] != r or not isinstance(e["file"], str) or os.path.basename(e["file"]) != e["file"]
                    or not isinstance(e["sha256"], str) or not isinstance(heads, list) or len(heads) != 2
                    or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads)):
                raise ValueError(f"shard entry {r} is malformed")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(path, f"inconsistent manifest ({e})") from None
    return meta


class KVStoreLayer(CacheLayerMixin):
    """One global-attention decoder layer's view of the shared :class:`kvstore.KVStore`.

    ``update`` returns the new key/value states ``[B, Hkv, T, D]`` unchanged;
    the attention function then fills the store (prefill) or appends to it and
    attends through it (decode).
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "KVStoreCache", layer_idx: int) -> None:
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.length = 0  # positions seen, padding included (what transformers counts)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.owner._follow(key_states, self.layer_idx)
        self.owner._begin(_Step(self.owner, self.layer_idx, "prefill" if self.length == 0 else "extend",
                                key_states, value_states))
        self.length += key_states.shape[2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self.is_initialized = False
        if self.owner.store is not None:
            self.owner.store.reset(self.layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(_NO_CROP)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(_NO_REORDER)


class KVStoreSlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer of a hybrid model: transformers' ``DynamicSlidingWindowLayer`` (the last
    ``sliding_window - 1`` tokens), attended exactly by the kvstore attention function; the store is not used."""

    def __init__(self, owner: "KVStoreCache", layer_idx: int, sliding_window: int) -> None:
        super().__init__(sliding_window=sliding_window)
        self.owner, self.layer_idx = owner, layer_idx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.owner._begin(_Step(self.owner, self.layer_idx, "window", keys, values))
        return keys, values


_NO_REORDER = ("KVStoreCache does not support beam search: the store cannot reorder its sequences between beams "
               "(reorder_cache); use greedy search or sampling")
_NO_CROP = ("KVStoreCache cannot crop: the store cannot remove tokens (crop), which assisted and speculative "
            "decoding need")
_NO_BATCH_EDIT = ("KVStoreCache cannot repeat or select sequences of its batch (batch_repeat_interleave, "
                  "batch_select_indices)")


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_types(text: Any) -> tuple[list[str], list[dict]]:
    """Per layer: its type and cache-layer kwargs, as transformers' ``DynamicCache(config=...)`` derives them."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        return get_layer_types_and_kwargs(text)
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
    return list(types), [{"sliding_window": window} if t == "sliding_attention" else {} for t in types]


def _check_attention(text: Any) -> None:
    """Refuse attention variants the store's decode cannot compute exactly as the model defines them."""
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None:
        raise ValueError(f"KVStoreCache does not support attention-logit softcapping (config.attn_logit_softcapping="
                         f"{cap}): the store attends with plain softmax scores; set it to None to use kvstore")
    if getattr(text, "use_bidirectional_attention", False):
        raise ValueError("KVStoreCache supports causal attention only (config.use_bidirectional_attention=True)")


class KVStoreCache(Cache):
    """A transformers ``Cache`` backed by a :class:`kvstore.KVStore` (the global-attention layers) and, for hybrid
    models, transformers' ``DynamicSlidingWindowLayer`` (the sliding-window layers, exact).

    Args:
        config: the model's config (``num_hidden_layers``,
            ``num_key_value_heads``, ``head_dim`` or ``hidden_size /
            num_attention_heads``, ``layer_types`` / ``sliding_window``).
        store_config: method and budgets (default ``StoreConfig()``). On a
            GPU, ``check_finite=False`` leaves out the NaN/inf check of each
            decode step, which makes the CPU wait for the GPU at every layer.
        device: where the store lives. ``None`` (the default): the device of
            the first key states, like transformers' ``DynamicCache``.
        store: a :class:`KVStore` to continue from (see :meth:`from_saved`);
            it fixes the device and the store config.

    ``store`` is ``None`` until the first update when ``device`` is not given. The store's KV head count is
    that of the first key states: under tensor parallelism each rank's store holds only the heads of its shard
    (``config.num_key_value_heads / tp_size``), and its fingerprint records which (``"shard"``: the rank, the
    world size and the slice ``kv_heads`` of the model's KV heads, read from the sharded ``k_proj`` weight).
    """

    def __init__(self, config: Any, store_config: StoreConfig | None = None, device: str | torch.device | None = None,
                 store: KVStore | None = None) -> None:
        fp = model_fingerprint(config)
        text = _text_config(config)
        _check_attention(text)
        if store_config is not None and not isinstance(store_config, StoreConfig):
            raise TypeError(f"store_config must be a StoreConfig, got {type(store_config).__name__}")
        if store is not None and store_config is not None:
            raise ValueError("pass store_config or store, not both (a store has its own config)")
        types, kwargs = _layer_types(text)
        layers: list[CacheLayerMixin] = []
        for i, (kind, kw) in enumerate(zip(types, kwargs)):
            if kind == "full_attention":
                layers.append(KVStoreLayer(self, i))
            elif kind == "sliding_attention":
                layers.append(KVStoreSlidingLayer(self, i, kw["sliding_window"]))
            else:
                raise ValueError(f"KVStoreCache supports layer types 'full_attention' and 'sliding_attention', "
                                 f"layer {i} of config.layer_types is {kind!r}")
        if not any(isinstance(layer, KVStoreLayer) for layer in layers):
            raise ValueError(f"every layer of this model is sliding-window attention (sliding_window="
                             f"{getattr(text, 'sliding_window', None)}): the store would hold nothing; use the "
                             f"model's own cache, or set config.sliding_window=None to attend the whole context")
        self.store_config = store.config if store is not None else (store_config or StoreConfig())
        self.fingerprint = fp
        self._device = None if device is None else torch.device(device)
        self._unconsumed: set[int] = set()  # layers updated whose attention has not run yet
        self._bound: set[int] = set()       # layers whose KV head slice was checked against the store's
        self._shard_open = store is None    # a new store takes its shard from its first prefill
        self.store: KVStore | None = store
        if store is not None:
            self._check_store(store, layers)
            self._device = store.device
        elif self._device is not None:
            self.store = self._new_store(self._device, self.fingerprint["num_key_value_heads"])
        super().__init__(layers=layers)
        if store is not None:
            for i, layer in enumerate(self.layers):
                if isinstance(layer, KVStoreLayer) and store.layer_cache(i) is not None:
                    layer.length = max(store.seq_lengths(i))
                    layer.device, layer.is_initialized = store.device, True

    def _new_store(self, device: torch.device, num_kv_heads: int) -> KVStore:
        """An empty store on ``device`` for ``num_kv_heads`` KV heads (the key states'); its shard is set by the
        first prefill (:meth:`_bind_shard`)."""
        fp = self.fingerprint
        self._bound.clear()
        self._shard_open = True
        return KVStore(fp["num_hidden_layers"], num_kv_heads, fp["head_dim"], self.store_config, device,
                       fingerprint=dict(fp))

    def _check_store(self, store: KVStore, layers: list) -> None:
        fp = self.fingerprint
        if not isinstance(store, KVStore):
            raise TypeError(f"store must be a KVStore, got {type(store).__name__}")
        shard = _store_shard(store)
        heads = fp["num_key_value_heads"] if not shard else shard["kv_heads"][1] - shard["kv_heads"][0]
        want = (fp["num_hidden_layers"], heads, fp["head_dim"])
        if (store.num_layers, store.num_kv_heads, store.head_dim) != want:
            raise ValueError(f"store holds (num_layers, num_kv_heads, head_dim) = "
                             f"{(store.num_layers, store.num_kv_heads, store.head_dim)}, the model {want}"
                             + (f" ({_shard_text(shard, fp['num_key_value_heads'])})" if shard else ""))
        if store.batch_size is not None and any(layer.is_sliding for layer in layers):
            raise ValueError("a KVStore holding tokens cannot continue a model with sliding-window layers: their "
                             "windows are not part of the store")

    def _bind_shard(self, layer: int, module: torch.nn.Module, key: torch.Tensor) -> None:
        """Record (a new store's first prefill) or check (every other layer, a loaded store) which of the model's
        KV heads this process's attention holds against the store's (``fingerprint["shard"]["kv_heads"]``; all
        of them without a shard). Host-only, once per layer."""
        fp = self.fingerprint
        total = fp["num_key_value_heads"]
        heads = list(_kv_head_slice(module, key.shape[1], total, fp["head_dim"], layer))
        rank, world = _distributed()
        store = self.store
        if self._shard_open:
            sharded = world > 1 or heads != [0, total]
            store.fingerprint = {**fp, "shard": {"rank": rank, "world_size": world, "kv_heads": heads}} if sharded \
                else dict(fp)
            self._shard_open = False
        else:
            have = _store_shard(store)
            if (have["kv_heads"] if have else [0, total]) != heads:
                mine = {"rank": rank, "world_size": world, "kv_heads": heads}
                raise ValueError(f"layer {layer}: this process's attention holds {_shard_text(mine, total)}, the "
                                 f"store {_shard_text(have, total)}: a context filled or saved under one "
                                 f"tensor-parallel sharding continues only under the same one (same world size, "
                                 f"each rank the same KV heads)")
        self._bound.add(layer)

    @property
    def device(self) -> torch.device | None:
        """The store's device (None before the first update when it follows the key states)."""
        return None if self.store is None else self.store.device

    def _follow(self, key_states: torch.Tensor, layer: int) -> None:
        """Put the store on the first key states' device with their KV head count (a tensor-parallel rank's
        shard has fewer than the config), unless it is pinned to a device or holds tokens."""
        device, heads = key_states.device, key_states.shape[1]
        store = self.store
        same_device = store is not None and _same_device(store.device, device)
        if same_device and store.num_kv_heads == heads:
            return
        empty = store is None or store.batch_size is None
        if empty and (self._device is None or same_device):
            self.store = self._new_store(device if self._device is None else self._device, heads)
            return
        if not same_device:
            if store.batch_size is None:
                why = (f"KVStoreCache(device={self._device}) keeps its store there; leave device unset to follow "
                       f"the model")
            else:
                why = ("the store keeps every global layer on one device and already holds tokens there (a model "
                       "split over devices is not supported; load a saved context with from_saved(..., device=...))")
            raise ValueError(f"layer {layer}: the key states are on {device}, the store on {store.device}: {why}")
        held = _shard_text(_store_shard(store), self.fingerprint["num_key_value_heads"])
        raise ValueError(f"layer {layer}: the key states have {heads} KV heads, the store holds "
                         f"{store.num_kv_heads} ({held}): a context filled or saved under one tensor-parallel "
                         f"sharding continues only under the same one")

    def _begin(self, step: _Step) -> None:
        if step.layer in self._unconsumed:
            self._unconsumed.clear()
            raise RuntimeError(f"layer {step.layer}: the tokens of its previous update never reached the kvstore "
                               f"attention function (or reached it changed); a KVStoreCache needs a model loaded with "
                               f"attn_implementation='kvstore' (or model.set_attn_implementation('kvstore'))")
        self._unconsumed.add(step.layer)
        _active.step = step

    # --- transformers' Cache operations ----------------------------------------------
    def reset(self) -> None:
        """Forget every token, keeping the objects (like ``DynamicCache.reset``): the next batch may have another
        size, and, unless ``device`` was given, another device."""
        super().reset()
        self._unconsumed.clear()

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(0)`` restricts the sliding windows to their working size; removing tokens raises
        ``NotImplementedError`` (before any layer changes)."""
        if tokens_to_remove != 0:
            raise NotImplementedError(_NO_CROP)
        super().crop(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search is not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_NO_REORDER)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(_NO_BATCH_EDIT)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(_NO_BATCH_EDIT)

    # --- saved contexts -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save the context (see :meth:`kvstore.KVStore.save`) for :meth:`from_saved`. Models with sliding-window
        layers cannot be saved (their windows are not part of the store).

        In one process: one file at ``path``. On a torch.distributed world of ``W > 1`` ranks (tensor
        parallelism: each rank's store holds its own KV heads) this is collective, like the model's forward:
        every rank must call it with the same ``path``. Each rank writes its store to
        ``path.rank{r}-of-{W}`` (:func:`shard_path`); the ranks then exchange what they wrote (one small
        ``all_gather_object``, which is also a barrier), and rank 0 writes the manifest at ``path``: the world
        size, the model fingerprint, and per rank its file, KV heads and the file's SHA-256, so that a shard
        rewritten by a later or failed save is refused at load. A last ``broadcast_object_list`` reports the
        manifest's write to every rank: when ``save`` returns on any rank, the whole context is on disk. Every
        file is written atomically; a failure on any rank raises on every rank (``RuntimeError`` naming the rank)
        and leaves the previous manifest in place. Decoding itself never communicates across ranks.
        """
        rank, world = _distributed()
        if world == 1:
            self._check_savable()
            self.store.save(path)
            return
        dist = torch.distributed
        own = shard_path(path, rank, world)
        error: BaseException | None = None
        try:
            self._check_savable()
            store = self.store
            model = {k: v for k, v in (store.fingerprint or {}).items() if k != "shard"}
            held = _store_shard(store)
            heads = held["kv_heads"] if held else [0, self.fingerprint["num_key_value_heads"]]
            store.fingerprint = {**model, "shard": {"rank": rank, "world_size": world, "kv_heads": heads}}
            store.save(own)
            report: Any = {"rank": rank, "file": os.path.basename(own), "kv_heads": heads,
                           "sha256": _file_digest(own), "fingerprint": model}
        except Exception as e:  # reported to every rank below, so that none waits for this one
            error, report = e, f"{type(e).__name__}: {e}"
        reports: list[Any] = [None] * world
        dist.all_gather_object(reports, report)
        failed = [(r, x) for r, x in enumerate(reports) if not isinstance(x, dict)]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"KVStoreCache.save({os.fspath(path)!r}): rank {failed[0][0]} failed "
                               f"({failed[0][1]}); no manifest was written")
        status = [None]
        if rank == 0:
            try:
                self._write_manifest(path, reports, world)
            except Exception as e:
                status = [f"{type(e).__name__}: {e}"]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise RuntimeError(f"KVStoreCache.save({os.fspath(path)!r}): rank 0 could not write the manifest "
                               f"({status[0]})")

    def _check_savable(self) -> None:
        if any(self.is_sliding):
            raise NotImplementedError("KVStoreCache.save: a model with sliding-window layers cannot be saved, their "
                                      "windows are not part of the store")
        if self.store is None:
            raise RuntimeError("KVStoreCache.save: the cache holds no tokens yet")

    def _write_manifest(self, path: str | os.PathLike, reports: list[dict], world: int) -> None:
        """Rank 0: the manifest of a sharded save, after checking the ranks saved one model, one sharding."""
        from .._fileformat import write_container

        fp = self.fingerprint
        for r in reports:
            if r["fingerprint"] != fp:
                raise ValueError(f"rank {r['rank']} saved a store of another model "
                                 f"({_fingerprint_diff(r['fingerprint'], fp)})")
            a, b = r["kv_heads"]
            if not 0 <= a < b <= fp["num_key_value_heads"]:
                raise ValueError(f"rank {r['rank']}'s store holds KV heads [{a}, {b}), not a slice of the model's "
                                 f"{fp['num_key_value_heads']}")
        shards = [{k: r[k] for k in ("rank", "file", "kv_heads", "sha256")} for r in reports]
        write_container(path, MANIFEST_KIND, {"world_size": world, "fingerprint": fp, "shards": shards}, {})

    @classmethod
    def from_saved(cls, path: str | os.PathLike, config: Any, device: str | torch.device = "cpu", mmap: bool = True
                   ) -> "KVStoreCache":
        """A cache holding a saved context, on ``device`` (the model's: the store cannot move once it holds
        tokens): generation continues from it with new tokens (pass the context's ids followed by the new ones
        to ``generate``; only the new ones are computed). Refuses a store saved for another model. One sequence
        per saved context.

        A context saved by ``W`` tensor-parallel ranks (a manifest at ``path``): each of ``W`` ranks calls this
        and loads its own shard; no communication. Refused with a ``ValueError`` naming what differs when this
        world's size is not ``W``, the model differs, or the shard file is not the one the manifest was saved
        with; the rank's KV heads are checked against the shard's at each layer's first step (the model's
        sharding is known only then).
        """
        fp = model_fingerprint(config)
        name = os.fspath(path)
        manifest = _read_manifest(name)
        if manifest is None:
            store = KVStore.load(path, device, mmap=mmap)
            if store.fingerprint != fp:
                saved = store.fingerprint if isinstance(store.fingerprint, dict) else {}
                if saved.get("shard") and {k: v for k, v in saved.items() if k != "shard"} == fp:
                    raise ValueError(f"{name} is one shard of a tensor-parallel context "
                                     f"({_shard_text(saved['shard'], fp['num_key_value_heads'])}): load the "
                                     f"manifest the save wrote next to it, on every rank")
                raise ValueError(f"{name} was saved for a different model or layout: "
                                 f"{_fingerprint_diff(store.fingerprint, fp)}")
            return cls(config, store=store)
        world = manifest["world_size"]
        rank, have = _distributed()
        if have != world:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            where = (f"this torch.distributed world has world_size={have}" if initialised
                     else "torch.distributed is not initialised (one process)")
            raise ValueError(f"{name} was saved by a tensor-parallel world of world_size={world}, {where}: load it "
                             f"on {world} ranks sharded as when it was saved")
        if manifest["fingerprint"] != fp:
            raise ValueError(f"{name} was saved for a different model or layout: "
                             f"{_fingerprint_diff(manifest['fingerprint'], fp)}")
        entry = manifest["shards"][rank]
        own = os.path.join(os.path.dirname(name), entry["file"])
        if _file_digest(own) != entry["sha256"]:
            raise ValueError(f"{own} is not the shard {name} was saved with (its SHA-256 differs): a later or "
                             f"interrupted save rewrote it; save the context again")
        store = KVStore.load(own, device, mmap=mmap)
        want = {**fp, "shard": {"rank": rank, "world_size": world, "kv_heads": entry["kv_heads"]}}
        if store.fingerprint != want:
            raise ValueError(f"{own} does not hold what {name} lists for rank {rank}: "
                             f"{_fingerprint_diff(store.fingerprint, want)}")
        return cls(config, store=store)


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What a saved context must match: the model's family, name and attention layout."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"KVStoreCache supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {"model_type": model_type, "name": os.path.basename(str(getattr(config, "_name_or_path", "")).rstrip("/")),
            "num_hidden_layers": text.num_hidden_layers,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
            "num_attention_heads": heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
            "hidden_size": text.hidden_size, "vocab_size": text.vocab_size}


# --- exact attention (prefill, sliding windows, no cache) -----------------------------------
def _padding_mask(attention_mask: torch.Tensor | None, B: int, N: int) -> torch.Tensor | None:
    """[B, N] bool of real prompt tokens from the 4-D mask transformers built (None: no padding)."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -N:]  # the last prompt token sees every real token
    real = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return real.expand(B, N).to("cpu")


def _chunked_exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float, softcap: float | None = None,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Exact attention, PREFILL_CHUNK queries at a time, the queries being the last ``Nq`` of the ``Nk`` positions.

    query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D]; attention_mask [B|1, 1, Nq, >=Nk] (bool, or additive float)
    or None (causal, within ``sliding_window`` if given) -> [B, Nq, Hq, Dv]. ``softcap``: scores become
    ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2).
    """
    B, Hq, Nq, _ = query.shape
    Nk = key.shape[2]
    G = Hq // key.shape[1]
    k = key.repeat_interleave(G, 1)
    v = value.repeat_interleave(G, 1)
    out = torch.empty(B, Hq, Nq, value.shape[-1], dtype=query.dtype, device=query.device)
    kpos = torch.arange(Nk, device=query.device)
    for q0 in range(0, Nq, PREFILL_CHUNK):
        q1 = min(Nq, q0 + PREFILL_CHUNK)
        if attention_mask is not None:
            m = attention_mask[:, :, q0:q1, :Nk]
        else:
            qpos = torch.arange(q0, q1, device=query.device)[:, None] + (Nk - Nq)
            m = kpos[None, :] <= qpos
            if sliding_window is not None:
                m &= kpos[None, :] > qpos - sliding_window
        q = query[:, :, q0:q1]
        if softcap is None:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)
        else:
            s = torch.matmul(q, k.transpose(2, 3)) * scaling
            s = torch.tanh(s / softcap) * softcap
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
            o = torch.matmul(torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), -1).to(q.dtype), v)
        out[:, :, q0:q1] = torch.nan_to_num(o)  # fully padded query rows attend nothing
    return out.transpose(1, 2)


def _causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact causal attention of an unpadded prompt in one SDPA call (query and key of one length N).

    query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, N, Hq, D]. On CUDA torch picks flash attention, which
    applies GQA and the causal mask itself, like transformers' own sdpa path for the full-attention model.
    """
    o = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                         enable_gqa=query.shape[1] != key.shape[1])
    return o.transpose(1, 2)


def _exact_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float, softcap: float | None = None,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Exact attention of the prompt: one causal call on CUDA when nothing is padded (the chunks with an explicit
    mask and a repeated KV made kvstore's 128K prefill 2.9x full attention's), query chunks otherwise (padding
    masks; float32, which flash attention does not take; the CPU: the math backend would hold the N x N scores)."""
    if (attention_mask is None and softcap is None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[2] == key.shape[2] and query.shape[-1] <= 256
            and (sliding_window is None or key.shape[2] <= sliding_window)):
        return _causal_sdpa(query, key, value, scaling)
    return _chunked_exact(query, key, value, attention_mask, scaling, softcap, sliding_window)


def _take_step(layer: int, key: torch.Tensor) -> _Step | None:
    """The step the cache layer ``layer`` just began, if these keys are the ones it returned."""
    step = _active.__dict__.pop("step", None)
    if step is None or step.layer != layer or step.key is not key:
        return None  # no KVStoreCache update just before (a stale step stays unconsumed: its cache's next update raises)
    step.cache._unconsumed.discard(layer)
    return step


def kvstore_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, sliding_window: int | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: exact prefill and sliding windows, decode through the KVStore.

    query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] (what the cache layer returned) -> ([B, Nq, Hq, Dv], None).
    """
    if dropout:
        raise ValueError(f"kvstore attention is for inference: dropout must be 0, got {dropout} (call model.eval())")
    D = query.shape[-1]
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(D)
    layer = module.layer_idx
    step = _take_step(layer, key)
    if step is None:
        if query.shape[2] != key.shape[2]:
            raise ValueError(f"layer {layer}: a decode step ({query.shape[2]} queries, {key.shape[2]} keys) reached "
                             f"attn_implementation='kvstore' from a cache that is not a KVStoreCache; pass "
                             f"cache=KVStoreCache(model.config) (generate builds one when given no cache)")
        return _exact_prefill(query, key, value, attention_mask, scaling, softcap, sliding_window), None
    if step.kind == "window":
        return _exact_prefill(query, key, value, attention_mask, scaling, softcap, sliding_window), None
    cache = step.cache
    if layer not in cache._bound:  # which KV heads this rank holds: recorded or checked, once per layer
        cache._bind_shard(layer, module, key)
    store = cache.store
    if step.kind == "prefill":
        out = _exact_prefill(query, key, value, attention_mask, scaling, softcap)
        store.prefill(layer, key, value, q=query, mask=_padding_mask(attention_mask, query.shape[0], key.shape[2]))
        return out, None
    if softcap is not None:
        raise ValueError(f"layer {layer}: kvstore decode cannot apply attention-logit softcapping (softcap={softcap})")
    factor = scaling * math.sqrt(D)
    q = query if abs(factor - 1) <= 1e-6 else query * factor  # the store attends with 1/sqrt(D)
    outs = []
    for t in range(q.shape[2]):  # each new token sees the store and the new tokens before it
        store.append(layer, key[:, :, t:t + 1], value[:, :, t:t + 1])
        outs.append(store.attend(layer, q[:, :, t:t + 1]))  # [B, Hq, 1, D]
    return torch.cat(outs, 2).transpose(1, 2), None


# --- generate: a KVStoreCache by default ------------------------------------------------------
def _uses_kvstore(config: Any) -> bool:
    names = {getattr(config, "_attn_implementation", None), getattr(_text_config(config), "_attn_implementation", None)}
    return bool(names & _NAMES)


def _store_config_from(cache_config: Any) -> StoreConfig:
    if cache_config is None:
        return StoreConfig()
    if isinstance(cache_config, StoreConfig):
        return cache_config
    if isinstance(cache_config, dict):
        return StoreConfig.from_dict(cache_config)
    raise TypeError(f"cache_config must be a StoreConfig or a dict of its fields for a KVStoreCache, "
                    f"got {type(cache_config).__name__}")


def _check_generation(model: Any, generation_config: Any, cache: Any, generation_mode: Any) -> None:
    """Refuse, before anything runs, what the kvstore attention or a KVStoreCache cannot do."""
    attn = getattr(model.config, "_attn_implementation", None)
    if not _uses_kvstore(model.config):
        raise ValueError(f"a KVStoreCache needs attn_implementation='kvstore', the model uses {attn!r}: load it with "
                         f"attn_implementation='kvstore' or call model.set_attn_implementation('kvstore')")
    if cache is not None and not isinstance(cache, KVStoreCache):
        raise ValueError(f"attn_implementation={attn!r} decodes through a KVStoreCache, got a {type(cache).__name__}: "
                         f"pass cache=KVStoreCache(model.config), or no cache")
    if cache is None and generation_config.use_cache is False:
        raise ValueError(f"use_cache=False with attn_implementation={attn!r}: every step would attend exactly over "
                         f"the whole sequence, never through the store; leave use_cache on")
    impl = generation_config.cache_implementation
    if impl not in (None, "dynamic"):
        raise ValueError(f"cache_implementation={impl!r} with attn_implementation={attn!r}: kvstore attention "
                         f"builds its own KVStoreCache; leave cache_implementation unset")
    from transformers.generation.configuration_utils import GenerationMode

    if isinstance(generation_mode, GenerationMode):
        mode = generation_mode.name.lower()
    else:  # a transformers version that does not pass the mode here
        mode = "beam_search" if (generation_config.num_beams or 1) > 1 else "sample"
    if mode not in ("greedy_search", "sample"):
        why = ("the store cannot reorder its sequences between beams (reorder_cache)" if "beam" in mode else
               "the store cannot remove the rejected draft tokens (crop)" if "assisted" in mode else
               "only greedy search and sampling are")
        raise ValueError(f"{mode.replace('_', ' ')} is not supported by kvstore attention: {why}; use greedy "
                         f"search or sampling")


def _install_generate_hook() -> None:
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.__dict__.get("_prepare_cache_for_generation")
    if original is None or getattr(original, "_kvstore", False):
        return

    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        key = next((k for k in ("cache", "past_key_values") if model_kwargs.get(k) is not None), None)
        cache = None if key is None else model_kwargs[key]
        if not (_uses_kvstore(self.config) or isinstance(cache, KVStoreCache)):
            return original(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)
        _check_generation(self, generation_config, cache, generation_mode)
        if cache is not None:
            return original(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)
        name = "cache" if "cache" in _forward_parameters(self) else "past_key_values"
        model_kwargs[name] = KVStoreCache(self.config, _store_config_from(generation_config.cache_config))

    _prepare_cache_for_generation._kvstore = True
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation


def _forward_parameters(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def register(name: str = "kvstore") -> None:
    """Register ``attn_implementation=name`` (the attention function and its mask) and make ``generate`` build a
    :class:`KVStoreCache` for models using it. Idempotent; runs when this module is imported."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, kvstore_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    _NAMES.add(name)
    _install_generate_hook()


register()
