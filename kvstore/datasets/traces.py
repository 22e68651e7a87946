"""Real query/key/value traces of SmolLM2-135M-Instruct.

:func:`capture_traces` runs the model once over real English text (see
:func:`kvstore.datasets.text.long_text`) and records, for chosen layers, the
post-RoPE attention inputs exactly as the attention kernel sees them:

* queries ``q``: ``[Hq=9, N, 64]``
* keys ``k`` and values ``v``: ``[Hkv=3, N, 64]``

They are stored once in a float16 ``.npz`` cache file and reloaded with
:func:`load_traces`. :func:`head_split` turns one KV head of a trace into an
ANN benchmark: the keys to index, the training queries (same positions as the
keys) and held-out test queries (the last positions, never used for training).

Command line::

    python -m kvstore.datasets.traces --tokens 8192 --layers 0,5,10,15,20,25,29
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._deps import require
from .text import SMOLLM2_MAX_POSITIONS, load_smollm2, long_text

__all__ = [
    "DEFAULT_LAYERS",
    "Trace",
    "capture_traces",
    "default_cache_dir",
    "head_split",
    "load_traces",
    "trace_path",
]

DEFAULT_LAYERS: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 29)
ATTN_NAME = "kvstore_capture"
_FORMAT_VERSION = 1
_CHARS_PER_TOKEN_GUESS = 6  # generous: this text averages ~3.5 characters a token


# --------------------------------------------------------------------------- data


@dataclass
class Trace:
    """Captured attention inputs of one forward pass.

    Attributes:
        layers: the captured layer indices, ascending.
        q: layer -> post-RoPE queries, ``[num_q_heads, num_tokens, head_dim]``.
        k: layer -> post-RoPE keys, ``[num_kv_heads, num_tokens, head_dim]``.
        v: layer -> values, ``[num_kv_heads, num_tokens, head_dim]``.
        num_tokens: sequence length N.
        num_q_heads / num_kv_heads / head_dim: the attention layout (9 / 3 / 64).
    """

    layers: list[int]
    q: dict[int, np.ndarray]
    k: dict[int, np.ndarray]
    v: dict[int, np.ndarray]
    num_tokens: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_q_heads // self.num_kv_heads


def default_cache_dir() -> pathlib.Path:
    """``$KVSTORE_CACHE`` if set, else ``~/.cache/kvstore/traces``."""
    env = os.environ.get("KVSTORE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "kvstore" / "traces"


def trace_path(num_tokens: int, layers: Sequence[int], cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache file name for a capture setting (the file may not exist)."""
    directory = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    layer_tag = "-".join(str(layer) for layer in layers)
    return directory / f"smollm2-135m_v{_FORMAT_VERSION}_n{num_tokens}_L{layer_tag}.npz"


# ----------------------------------------------------------------------- capture


class _Recorder:
    """Attention function that records q/k/v of chosen layers, then runs sdpa."""

    def __init__(self, layers: Sequence[int], num_layers: int, progress: bool) -> None:
        sdpa = require("transformers.integrations.sdpa_attention", "hf")
        self._sdpa: Callable[..., Any] = sdpa.sdpa_attention_forward
        self.layers = set(layers)
        self.q: dict[int, np.ndarray] = {}
        self.k: dict[int, np.ndarray] = {}
        self.v: dict[int, np.ndarray] = {}
        self._bar = _progress_bar(num_layers, "forward pass (layers)", progress)

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same signature as transformers' ``sdpa_attention_forward``.

        ``query`` is ``[B, Hq, N, D]``, ``key``/``value`` are ``[B, Hkv, N, D]``
        (RoPE already applied, GQA heads not yet repeated).
        """
        layer = int(module.layer_idx)
        if layer in self.layers:
            self.q[layer] = _to_f16(query[0])
            self.k[layer] = _to_f16(key[0])
            self.v[layer] = _to_f16(value[0])
        if self._bar is not None:
            self._bar.update(1)
        return self._sdpa(module, query, key, value, attention_mask, **kwargs)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _to_f16(x: torch.Tensor) -> np.ndarray:
    """``[H, N, D]`` tensor -> contiguous float16 numpy copy."""
    return x.detach().to(torch.float16).contiguous().cpu().numpy()


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="layer")


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(f"[kvstore.traces] {message}", flush=True)


def _register_attention(recorder: _Recorder) -> None:
    """Register ``recorder`` as attention ``"kvstore_capture"`` (mask as sdpa's)."""
    transformers = require("transformers", "hf")
    transformers.AttentionInterface.register(ATTN_NAME, recorder)
    # Without a registered mask function transformers builds no mask for a
    # custom attention name; registering sdpa's keeps the causal masking
    # identical to attn_implementation="sdpa".
    masking = require("transformers.masking_utils", "hf")
    masking.AttentionMaskInterface.register(ATTN_NAME, masking.sdpa_mask)


def _tokenize(tokenizer: Any, num_tokens: int) -> tuple[torch.Tensor, str]:
    """First ``num_tokens`` token ids of :func:`long_text` -> (``[1, N]`` ids, text)."""
    min_chars = num_tokens * _CHARS_PER_TOKEN_GUESS
    while True:
        text = long_text(min_chars)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= num_tokens:
            return ids[:, :num_tokens], text
        min_chars *= 2


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _save_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` next to ``path`` and ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _validate(num_tokens: int, layers: Sequence[int]) -> list[int]:
    if not 1 <= num_tokens <= SMOLLM2_MAX_POSITIONS:
        raise ValueError(
            f"num_tokens must be in [1, {SMOLLM2_MAX_POSITIONS}] (the model's positions), got {num_tokens}"
        )
    layer_list = sorted({int(layer) for layer in layers})
    if not layer_list or layer_list[0] < 0:
        raise ValueError(f"layers must be non-empty and non-negative, got {list(layers)}")
    return layer_list


def _find_cached(path: pathlib.Path, num_tokens: int, layers: list[int]) -> pathlib.Path | None:
    """``path`` if it exists, else a cached file of the same N whose layers include ``layers``."""
    if path.exists():
        return path
    if not path.parent.is_dir():
        return None
    prefix = f"smollm2-135m_v{_FORMAT_VERSION}_n{num_tokens}_L"
    for candidate in sorted(path.parent.glob(prefix + "*.npz")):
        tag = candidate.name[len(prefix) : -len(".npz")]
        try:
            have = {int(part) for part in tag.split("-")}
        except ValueError:
            continue
        if have.issuperset(layers):
            return candidate
    return None


def capture_traces(
    num_tokens: int = 8192,
    layers: Sequence[int] = DEFAULT_LAYERS,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Capture real Q/K/V of SmolLM2-135M-Instruct into a cached ``.npz``.

    Tokenizes :func:`long_text` (the tokenizer adds no BOS token for this
    model; whatever it adds is kept), keeps the first ``num_tokens`` tokens,
    and runs one full-attention forward pass on the CPU under
    ``torch.no_grad()``. For every layer in ``layers`` it stores, as float16:

    * ``q_L{layer}``: post-RoPE queries ``[9, N, 64]``
    * ``k_L{layer}``: post-RoPE keys ``[3, N, 64]``
    * ``v_L{layer}``: values ``[3, N, 64]``

    plus ``layers``, ``num_tokens``, ``input_ids`` ``[N]`` and the SHA-256 of
    the text and of the token ids, written atomically. If the file already
    exists, or a cached file of the same ``num_tokens`` holds a superset of
    ``layers`` (read it with :func:`load_traces` and index by layer), that
    file is returned without recomputation. 8192 tokens take about 50 s on 2
    CPU cores (20 s of it loading the model) and 1.4 GB of RAM.

    Args:
        num_tokens: sequence length N, at most 8192 (the model's positions).
        layers: layer indices to record (0..29).
        cache_dir: output directory; default :func:`default_cache_dir`.
        progress: print progress messages and a per-layer progress bar.

    Returns:
        The path of the ``.npz`` file.
    """
    layer_list = _validate(num_tokens, layers)
    path = trace_path(num_tokens, layer_list, cache_dir)
    cached = _find_cached(path, num_tokens, layer_list)
    if cached is not None:
        _log(f"cached: {cached}", progress)
        return cached

    start = time.perf_counter()
    _log("loading SmolLM2-135M-Instruct ...", progress)
    model, tokenizer = load_smollm2(torch.float32)
    config = model.config
    if num_tokens > config.max_position_embeddings:
        raise ValueError(f"num_tokens {num_tokens} > max_position_embeddings {config.max_position_embeddings}")
    if layer_list[-1] >= config.num_hidden_layers:
        raise ValueError(f"layer {layer_list[-1]} out of range: the model has {config.num_hidden_layers} layers")
    input_ids, text = _tokenize(tokenizer, num_tokens)
    _log(f"model loaded and {num_tokens} tokens ready in {time.perf_counter() - start:.1f}s", progress)

    recorder = _Recorder(layer_list, config.num_hidden_layers, progress)
    _register_attention(recorder)
    previous = config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        recorder.close()
        model.set_attn_implementation(previous)
    _log(f"forward pass over {num_tokens} tokens took {time.perf_counter() - t0:.1f}s", progress)

    missing = [layer for layer in layer_list if layer not in recorder.q]
    if missing:
        raise RuntimeError(f"the capture attention function never saw layers {missing}")
    arrays: dict[str, np.ndarray] = {
        "layers": np.asarray(layer_list, dtype=np.int64),
        "num_tokens": np.asarray(num_tokens, dtype=np.int64),
        "input_ids": input_ids[0].numpy().astype(np.int32),
        "text_sha256": np.asarray(_sha256(text.encode("utf-8"))),
        "tokens_sha256": np.asarray(_sha256(input_ids[0].numpy().astype(np.int64).tobytes())),
    }
    for layer in layer_list:
        arrays[f"q_L{layer}"] = recorder.q[layer]
        arrays[f"k_L{layer}"] = recorder.k[layer]
        arrays[f"v_L{layer}"] = recorder.v[layer]
    _save_atomic(path, arrays)
    _log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s total", progress)
    return path


# -------------------------------------------------------------------- load/split


def load_traces(path: str | os.PathLike) -> Trace:
    """Load a file written by :func:`capture_traces` (arrays stay float16)."""
    with np.load(path, allow_pickle=False) as data:
        layers = [int(layer) for layer in data["layers"]]
        q = {layer: data[f"q_L{layer}"] for layer in layers}
        k = {layer: data[f"k_L{layer}"] for layer in layers}
        v = {layer: data[f"v_L{layer}"] for layer in layers}
        num_tokens = int(data["num_tokens"])
    first_q, first_k = q[layers[0]], k[layers[0]]
    return Trace(
        layers=layers,
        q=q,
        k=k,
        v=v,
        num_tokens=num_tokens,
        num_q_heads=first_q.shape[0],
        num_kv_heads=first_k.shape[0],
        head_dim=first_k.shape[2],
    )


def _subsample(rows: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` rows of ``rows`` ``[M, D]`` chosen without replacement (order kept)."""
    if limit is None or limit >= rows.shape[0]:
        return rows
    if limit < 0:
        raise ValueError(f"subsample limit must be >= 0, got {limit}")
    index = np.sort(rng.choice(rows.shape[0], size=limit, replace=False))
    return rows[index]


def head_split(
    trace: Trace,
    layer: int,
    kv_head: int,
    test_tokens: int = 1024,
    max_train: int | None = None,
    max_test: int | None = 256,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys, training queries and held-out test queries of one KV head.

    With ``N = trace.num_tokens``, ``T = test_tokens``, ``D = head_dim`` and
    ``g = num_q_heads // num_kv_heads`` (GQA: query head ``h`` reads KV head
    ``h // g``, so KV head ``j`` serves query heads ``j*g .. j*g+g-1``):

    * ``keys``: ``[N - T, D]``, keys of positions ``[0, N - T)`` of ``kv_head``.
    * ``train_queries``: ``[min(g * (N - T), max_train), D]``, queries of the
      group's heads at positions ``[0, N - T)``, stacked head by head
      (head ``j*g`` first), then subsampled to ``max_train`` rows.
    * ``test_queries``: ``[min(g * T, max_test), D]``, queries of the group's
      heads at positions ``[N - T, N)`` (disjoint from the training ones),
      stacked the same way and subsampled to ``max_test`` rows.

    Subsampling draws rows without replacement with a seeded RNG (train and
    test use independent streams) and keeps their original order. ``None``
    keeps all rows. All outputs are float32 and C-contiguous.
    """
    if layer not in trace.q:
        raise KeyError(f"layer {layer} not in trace (has {trace.layers})")
    if not 0 <= kv_head < trace.num_kv_heads:
        raise ValueError(f"kv_head must be in [0, {trace.num_kv_heads}), got {kv_head}")
    n = trace.num_tokens
    if not 0 < test_tokens < n:
        raise ValueError(f"test_tokens must be in (0, {n}), got {test_tokens}")
    split = n - test_tokens
    g = trace.group_size
    heads = slice(kv_head * g, (kv_head + 1) * g)
    queries = trace.q[layer][heads]  # [g, N, D]
    dim = queries.shape[-1]

    keys = trace.k[layer][kv_head, :split]
    train = queries[:, :split].reshape(-1, dim)
    test = queries[:, split:].reshape(-1, dim)
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    train = _subsample(train, max_train, train_rng)
    test = _subsample(test, max_test, test_rng)
    return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in (keys, train, test))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- CLI


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers wants comma-separated integers, got {text!r}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: capture (or find cached) traces and print their shapes."""
    parser = argparse.ArgumentParser(
        prog="python -m kvstore.datasets.traces",
        description="Capture real post-RoPE Q/K/V traces of SmolLM2-135M-Instruct into a cached .npz.",
    )
    parser.add_argument("--tokens", type=int, default=8192, help="sequence length, at most 8192 (default 8192)")
    parser.add_argument(
        "--layers",
        type=_parse_layers,
        default=list(DEFAULT_LAYERS),
        help="comma-separated layer indices (default 0,5,10,15,20,25,29)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="output directory (default $KVSTORE_CACHE or ~/.cache/kvstore/traces)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    args = parser.parse_args(argv)

    path = capture_traces(args.tokens, args.layers, args.cache_dir, progress=not args.quiet)
    trace = load_traces(path)
    print(f"path: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    for layer in trace.layers:
        print(
            f"layer {layer:2d}: q {list(trace.q[layer].shape)} k {list(trace.k[layer].shape)} "
            f"v {list(trace.v[layer].shape)} {trace.q[layer].dtype}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
