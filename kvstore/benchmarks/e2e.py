"""End-to-end decode throughput of a Llama-3-8B-shaped model: full attention against kvstore.

A ``transformers`` LlamaForCausalLM with the Llama-3-8B configuration (hidden
4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, RoPE
theta 500 000) is built from the configuration with random weights (nothing
is downloaded), in bf16 on the GPU; ``--layers`` keeps fewer layers (weights
~16 GB at 32 layers; the KV of a 128K-token sequence is 16 GiB over 32
layers). After a random prompt of ``--context`` tokens, ``--new-tokens``
tokens are generated greedily by ``model.generate``, the way users run it:

* ``full``: ``attn_implementation="sdpa"`` and transformers' own cache;
* ``kvstore``: ``attn_implementation="kvstore"`` and
  ``cache=KVStoreCache(model.config)``: the :class:`~kvstore.StoreConfig`
  defaults, on the model's device;
* ``kvstore-offload``: the same with ``StoreConfig(gpu_mode="offload")``.

A logits processor reads the clock after every step (synchronising the GPU), so
the first step is the prefill (for kvstore it includes building the index) and
the steps after ``--warmup-steps`` more are the timed decode. Each kvstore
result records its ``store_config``.

Each method runs at the largest of ``--batches`` that fits (tried from the
largest down; an out-of-memory error frees everything and tries the next).
Reported: prefill seconds (for kvstore it includes building the index) and
decode throughput (``batch x steps / seconds`` over the timed steps only,
after ``--warmup-steps`` untimed ones). With random weights the attention is
not peaked like a trained model's, so this measures speed, not accuracy.

Writes ``<out>/e2e.json`` and the ``e2e`` section of ``<out>/decode.md``.
Needs a CUDA GPU. Run ``kvstore bench e2e --help``.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any, Sequence

import torch

from .._args import Parser
from ._output import Results, add_out_argument
from .decode import GiB, environment, fmt_size, parse_size, require_cuda, write_section

METHODS = ("full", "kvstore", "kvstore-offload")
# StoreConfig fields the kvstore methods set beyond the defaults (recorded in e2e.json and decode.md)
STORE_OPTIONS: dict[str, Any] = {}


def llama3_8b_config(layers: int = 32, max_positions: int = 131072):
    """A ``LlamaConfig`` with the Llama-3-8B shapes and ``layers`` decoder layers."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=max(8192, max_positions), rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def build_model(config: Any, device: torch.device, seed: int = 0):
    """Random-weight bf16 LlamaForCausalLM of ``config`` on ``device`` (weights created there), eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def _new_cache(model: Any, method: str) -> Any:
    """None (transformers' own cache, exact attention) for ``full``; a KVStoreCache for the kvstore methods."""
    if method == "full":
        model.set_attn_implementation("sdpa")
        return None
    from ..config import StoreConfig
    from ..integrations.transformers import KVStoreCache  # registers attn_implementation="kvstore"

    model.set_attn_implementation("kvstore")
    if method == "kvstore-offload":
        return KVStoreCache(model.config, StoreConfig(gpu_mode="offload", **STORE_OPTIONS))
    return KVStoreCache(model.config, StoreConfig(**STORE_OPTIONS)) if STORE_OPTIONS else KVStoreCache(model.config)


class _StepClock:
    """A logits processor that reads the clock after every generation step (the device synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@torch.no_grad()
def generate(model: Any, method: str, batch: int, context: int, new_tokens: int, device: torch.device,
             warmup_steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Prefill a random ``[batch, context]`` prompt, then ``warmup_steps + new_tokens`` greedy decode steps.

    Returns prefill seconds, timed decode seconds, tokens/s (``batch x
    new_tokens / seconds``), ms per step, the peak GPU memory and, for the
    kvstore methods, the ``store_config`` used.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    from transformers import LogitsProcessorList

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = _new_cache(model, method)
    clock = _StepClock(device)
    steps = 1 + warmup_steps + new_tokens
    _sync(device)
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                   do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
                   **({} if cache is None else {"cache": cache}))
    prefill_s = clock.times[0] - t0
    decode_s = clock.times[-1] - clock.times[warmup_steps]
    length = context + steps - 1
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    store = getattr(cache, "store", None)
    store_config = None if store is None else store.config.to_dict()
    del cache, store
    return {"method": method, "batch": batch, "context": context, "new_tokens": new_tokens,
            "final_length": int(length), "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": batch * new_tokens / decode_s, "ms_per_step": 1e3 * decode_s / new_tokens,
            "peak_gpu_bytes": peak, "store_config": store_config}


def largest_batch(model: Any, method: str, batches: Sequence[int], context: int, new_tokens: int,
                  device: torch.device, warmup_steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """:func:`generate` at the largest batch of ``batches`` that fits; ``tried`` lists every attempt."""
    tried: list[dict[str, Any]] = []
    for b in sorted(set(batches), reverse=True):
        _free(device)
        try:
            res = generate(model, method, b, context, new_tokens, device, warmup_steps, seed)
        except torch.cuda.OutOfMemoryError as e:
            tried.append({"batch": b, "outcome": "out of memory", "detail": str(e).splitlines()[0][:160]})
            continue
        finally:
            _free(device)
        tried.append({"batch": b, "outcome": "ok"})
        return {**res, "status": "ok", "tried": tried}
    return {"method": method, "batch": None, "context": context, "status": "oom", "tried": tried}


def table(results: Sequence[dict[str, Any]], title: str) -> str:
    """Markdown section: one row per method, plus throughput relative to full attention."""
    full = next((r for r in results if r["method"] == "full" and r["status"] == "ok"), None)
    lines = [f"## {title}", "",
             "| method | batch | prompt | prefill s | decode tokens/s | ms per step | vs full | peak GPU | tried |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tried = ", ".join(f"{t['batch']}: {t['outcome']}" for t in r.get("tried", []))
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | - | {fmt_size(r['context'])} | - | - | - | - | - | {tried} |")
            continue
        rel = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x" if full else "-"
        peak = "-" if r.get("peak_gpu_bytes") is None else f"{r['peak_gpu_bytes'] / GiB:.1f} GiB"
        lines.append(f"| {r['method']} | {r['batch']} | {fmt_size(r['context'])} | {r['prefill_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | {rel} | {peak} | {tried} |")
    return "\n".join(lines) + "\n"


def run(config: Any, methods: Sequence[str], batches: Sequence[int], context: int, new_tokens: int,
        device: torch.device, warmup_steps: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Build the model once and run every method at its largest fitting batch."""
    model = build_model(config, device, seed)
    try:
        return [largest_batch(model, m, batches, context, new_tokens, device, warmup_steps, seed) for m in methods]
    finally:
        del model
        _free(device)


def store_options_note() -> str:
    """The kvstore methods' StoreConfig, for the markdown report."""
    if not STORE_OPTIONS:
        return "KVStoreCache(model.config): the StoreConfig defaults"
    return "StoreConfig(" + ", ".join(f"{k}={v!r}" for k, v in STORE_OPTIONS.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="kvstore bench e2e", description=__doc__)
    p.add_argument("--context", type=parse_size, default=131072, help="prompt tokens (e.g. 32K, 128K; default 128K)")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps (default 32)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps first (default 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 8, 4, 2, 1],
                   help="batch sizes tried, largest first (default 16 8 4 2 1)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to run")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, as Llama-3-8B)")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p, "e2e")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        require_cuda("kvstore bench e2e")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    output = Results("e2e", a.out)
    config = llama3_8b_config(a.layers, a.context + a.new_tokens + a.warmup_steps + 16)
    t0 = time.perf_counter()
    results = run(config, a.methods, a.batches, a.context, a.new_tokens, device, a.warmup_steps, a.seed)
    env = environment(device)
    title = (f"End to end: random-weight Llama-3-8B shape ({a.layers} layers, bf16), {fmt_size(a.context)}-token "
             f"prompt, {a.new_tokens} decode steps, {env.get('gpu', env['device'])}")
    out = output.folder()
    (out / "e2e.json").write_text(json.dumps({"title": title, "environment": env, "args": vars(a),
                                              "store_options": STORE_OPTIONS,
                                              "seconds": time.perf_counter() - t0, "results": results},
                                             indent=1, default=str))
    md = table(results, title) + (
        "\nDecode tokens/s = batch x timed steps / seconds (manual loop of forward calls with the cache, after "
        f"{a.warmup_steps} untimed steps); kvstore prefill includes building the index. Random weights: speed only. "
        f"kvstore methods: {store_options_note()}.\n")
    write_section(out / "decode.md", "e2e", md)
    print(md)
    output.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
