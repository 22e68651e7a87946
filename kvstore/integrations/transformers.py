"""kvstore as a drop-in decode attention for Hugging Face transformers.

>>> from kvstore.integrations.transformers import KVStoreCache, register
>>> register()  # once: makes attn_implementation="kvstore" known
>>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvstore")
>>> cache = KVStoreCache(model.config, StoreConfig(method="wave"))
>>> model.generate(**inputs, past_key_values=cache, max_new_tokens=32)

The prompt (prefill) is attended exactly: on CUDA without padding in one causal
SDPA call (flash attention: GQA and the causal mask inside the kernel, no KV
copy), otherwise in query chunks so no ``N x N`` score matrix is held; its keys, values and queries then fill a
:class:`kvstore.KVStore`, and every decode step attends through the store.
Without a :class:`KVStoreCache` (e.g. ``use_cache=False``) the attention is
exact. Llama- and Qwen2-family models (any GQA layout) are supported.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import torch

from ..config import StoreConfig
from ..store import KVStore

SUPPORTED = ">=5.17,<6"  # transformers versions this module supports (tested with 5.24)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
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
    import re

    m = re.match(r"(\d+)\.(\d+)", found)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if major != 5 or minor < 17:
        raise ImportError(f"kvstore.integrations.transformers supports transformers {SUPPORTED}, found {found}")
    return transformers


_tf = _require_transformers()
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

_active = threading.local()  # the KVStoreCache whose layer was just updated, per thread


class KVStoreLayer(CacheLayerMixin):
    """One decoder layer's view of the shared KVStore (transformers' cache-layer interface)."""

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
        _active.cache = self.owner
        # The attention function does the work: a prefill is computed exactly
        # and then fills the store (it needs the queries and the padding mask);
        # later tokens are appended and attended through the store one by one.
        self.owner._pending[self.layer_idx] = ("prefill",) if self.length == 0 else ("extend", key_states,
                                                                                     value_states)
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
        self.owner.store.reset(self.layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVStoreCache does not support beam search")


class KVStoreCache(Cache):
    """A transformers ``Cache`` backed by a :class:`kvstore.KVStore`.

    Args:
        config: the model's config (``num_hidden_layers``,
            ``num_key_value_heads``, ``head_dim`` or ``hidden_size /
            num_attention_heads``).
        store_config: method and budgets. On a GPU, ``check_finite=False``
            leaves out the NaN/inf check of each decode step, which makes the
            CPU wait for the GPU at every layer.
        device: where the store lives (default CPU).
    """

    def __init__(self, config: Any, store_config: StoreConfig | None = None, device: str | torch.device = "cpu",
                 store: KVStore | None = None) -> None:
        fp = model_fingerprint(config)
        if store is None:
            store = KVStore(fp["num_hidden_layers"], fp["num_key_value_heads"], fp["head_dim"],
                            store_config or StoreConfig(), device, fingerprint=fp)
        self.store = store
        self._pending: dict[int, tuple] = {}
        super().__init__(layers=[KVStoreLayer(self, i) for i in range(fp["num_hidden_layers"])])
        for i, layer in enumerate(self.layers):
            if store.layer_cache(i) is not None:
                layer.length = max(store.seq_lengths(i))
                layer.is_initialized = True

    def save(self, path: str) -> None:
        """Save the context (see :meth:`kvstore.KVStore.save`) for :meth:`from_saved`."""
        self.store.save(path)

    @classmethod
    def from_saved(cls, path: str, config: Any, device: str | torch.device = "cpu", mmap: bool = True
                   ) -> "KVStoreCache":
        """A cache holding a saved context: generation continues from it with
        new tokens (pass the context's ids followed by the new ones to
        ``generate``; only the new ones are computed). Refuses a store saved
        for another model. One sequence per saved context."""
        store = KVStore.load(path, device, fingerprint=model_fingerprint(config), mmap=mmap)
        return cls(config, store=store)


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What a saved context must match: the model's family, name and attention layout."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"KVStoreCache supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    import os

    return {"model_type": model_type, "name": os.path.basename(str(getattr(config, "_name_or_path", "")).rstrip("/")),
            "num_hidden_layers": text.num_hidden_layers,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
            "num_attention_heads": heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
            "hidden_size": text.hidden_size, "vocab_size": text.vocab_size}


def _padding_mask(attention_mask: torch.Tensor | None, B: int, N: int) -> torch.Tensor | None:
    """[B, N] bool of real prompt tokens from the 4-D mask transformers built (None: no padding)."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -N:]  # the last prompt token sees every real token
    real = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return real.expand(B, N).to("cpu")


def _chunked_exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Exact causal attention of the prompt, PREFILL_CHUNK queries at a time.

    query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, N, Hq, D].
    """
    B, Hq, N, _ = query.shape
    G = Hq // key.shape[1]
    k = key.repeat_interleave(G, 1)
    v = value.repeat_interleave(G, 1)
    out = torch.empty(B, Hq, N, value.shape[-1], dtype=query.dtype, device=query.device)
    for q0 in range(0, N, PREFILL_CHUNK):
        q1 = min(N, q0 + PREFILL_CHUNK)
        if attention_mask is not None:
            m = attention_mask[:, :, q0:q1, :N]
        else:
            m = torch.arange(N, device=query.device)[None, :] <= torch.arange(q0, q1, device=query.device)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(query[:, :, q0:q1], k, v, attn_mask=m, scale=scaling)
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
                   attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Exact attention of the prompt: one causal call on CUDA when nothing is padded (the chunks with an explicit
    mask and a repeated KV made kvstore's 128K prefill 2.9x full attention's), query chunks otherwise (padding
    masks; float32, which flash attention does not take; the CPU: the math backend would hold the N x N scores)."""
    if (attention_mask is None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[2] == key.shape[2] and query.shape[-1] <= 256):
        return _causal_sdpa(query, key, value, scaling)
    return _chunked_exact(query, key, value, attention_mask, scaling)


def kvstore_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: exact prefill, kvstore decode."""
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    cache = _active.__dict__.pop("cache", None)  # set by this layer's cache update just before
    layer = module.layer_idx
    if cache is None:
        return _exact_prefill(query, key, value, attention_mask, scaling), None
    pending = cache._pending.pop(layer)
    if pending[0] == "prefill":
        out = _exact_prefill(query, key, value, attention_mask, scaling)
        mask = _padding_mask(attention_mask, query.shape[0], key.shape[2])
        cache.store.prefill(layer, key, value, q=query, mask=mask)
        return out, None
    if abs(scaling * math.sqrt(query.shape[-1]) - 1) > 1e-6:
        raise ValueError(f"kvstore decode uses 1/sqrt(head_dim) scaling, the model uses {scaling}")
    _, new_k, new_v = pending
    outs = []
    for t in range(query.shape[2]):  # each new token sees the store and the new tokens before it
        cache.store.append(layer, new_k[:, :, t:t + 1], new_v[:, :, t:t + 1])
        outs.append(cache.store.attend(layer, query[:, :, t:t + 1]))  # [B, Hq, 1, D]
    return torch.cat(outs, 2).transpose(1, 2), None


def register(name: str = "kvstore") -> None:
    """Register ``attn_implementation=name`` (the attention function and its mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, kvstore_attention)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
